"""The train step's speed-up on a machine whose speed drifts: `--kernels fused` against `--kernels reference`,
interleaved in one process.

``pytest benchmarks/bench_train_step.py`` times one provider after the other, so on a shared 2-core VM (the same step
took 121 ms in one process and 144 ms in the next) the ratio moves by several percent between runs. Here both
trainers live in one process and alternate in blocks of ``--steps`` steps (the order flips every round); each round's
ratio is taken between its two neighbouring blocks, and the table gives the median ratio over the rounds with its
range. The step is :meth:`dino.train.Trainer.step_on_crops` on random crops of the preset's shapes, as in
``bench_train_step.py``.

    python -m benchmarks.step_ab                                   # cpu-tiny on CPU, 12 rounds of 5 steps
    python -m benchmarks.step_ab --out benchmarks/results/cpu-<date>-step-ab   # also <out>.json and <out>.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date

import torch

import dino_kernels
from benchmarks.learning import machine
from dino.config import resolve_config
from dino.train import StepResult, Trainer

PROVIDERS = {"reference": "reference", "ours": "fused"}


def training_step(overrides: dict, kernels: str, device: str, cuda_graph: str,
                  output_dir: str) -> tuple[Trainer, list[torch.Tensor], Callable[[], StepResult]]:
    """A trainer seeded with 0, fixed random crops of its augmentation's output shapes ([globals, locals]) and
    ``step()``, one :meth:`~dino.train.Trainer.step_on_crops` on them past the last-layer freeze (every parameter is
    updated), at one iteration of the schedules (the step count only indexes them). Shared with
    ``bench_train_step.py`` and ``profile_step.py``."""
    torch.manual_seed(0)
    values = {**overrides, "kernels": kernels, "device": device, "num_workers": 0, "progress": False,
              "epochs": 100, "output_dir": output_dir, "cuda_graph": cuda_graph}
    trainer = Trainer(resolve_config(values), values)
    cfg = trainer.cfg
    crops = [torch.randn(n * cfg.batch_size, 3, size, size, device=trainer.device)
             for n, size in ((cfg.n_global_crops, cfg.global_size), (cfg.n_local_crops, cfg.local_size))]
    epoch = cfg.freeze_last_layer

    def step() -> StepResult:
        trainer.step = epoch * trainer.iters_per_epoch
        return trainer.step_on_crops(crops, epoch)

    return trainer, crops, step


def _step(preset: str, kernels: str, device: str, overrides: dict) -> tuple[Callable[[], object], int]:
    trainer, _, step = training_step({"preset": preset, **overrides}, kernels, device, "off",
                                     tempfile.mkdtemp(prefix="dk-step-ab-"))
    return step, trainer.cfg.batch_size


def _block_ms(step, kernels: str, steps: int) -> float:
    with dino_kernels.backend("reference" if kernels == "reference" else "auto"):
        start = time.perf_counter()
        for _ in range(steps):
            step()  # returns the losses as Python floats: the step has synced
        return (time.perf_counter() - start) / steps * 1e3


def measure(preset: str, device: str, rounds: int, steps: int, warmup: int, overrides: dict) -> dict:
    """Per round, each provider's mean step time over one block of ``steps`` steps; the ratios reference / ours."""
    runs = {name: _step(preset, kernels, device, overrides) for name, kernels in PROVIDERS.items()}
    for name, (step, _) in runs.items():
        _block_ms(step, PROVIDERS[name], warmup)
    times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    for r in range(rounds):
        for name in (PROVIDERS if r % 2 == 0 else reversed(PROVIDERS)):
            times[name].append(_block_ms(runs[name][0], PROVIDERS[name], steps))
    ratios = [ref / ours for ref, ours in zip(times["reference"], times["ours"])]
    return {"preset": preset, "device": device, "batch_size": runs["ours"][1], "rounds": rounds,
            "steps_per_block": steps, "machine": machine(), "date": date.today().isoformat(), "block_ms": times,
            "ratios": ratios, "median_ratio": statistics.median(ratios),
            "median_ms": {name: statistics.median(t) for name, t in times.items()}}


def table(result: dict) -> str:
    ratios, median_ms = result["ratios"], result["median_ms"]
    lines = [f"# Train step, `--kernels fused` against `--kernels reference`, interleaved ({result['date']})", "",
             f"`python -m benchmarks.step_ab`: preset `{result['preset']}` on {result['device']} ({result['machine']}),"
             f" batch {result['batch_size']}; {result['rounds']} rounds, each a block of "
             f"{result['steps_per_block']} steps per provider, the order flipped every round.", "",
             "| provider | median ms a step | img/s |", "|---|---|---|"]
    for name, ms in median_ms.items():
        lines.append(f"| {name} | {ms:.1f} | {result['batch_size'] / ms * 1e3:.0f} |")
    lines += ["", f"**Speed-up (reference / ours, per round): median {result['median_ratio']:.3f}×, range "
              f"{min(ratios):.3f}–{max(ratios):.3f}×.**", "", "| round | reference ms | ours ms | ratio |",
              "|---|---|---|---|"]
    for i, (ref, ours, ratio) in enumerate(zip(result["block_ms"]["reference"], result["block_ms"]["ours"], ratios)):
        lines.append(f"| {i + 1} | {ref:.1f} | {ours:.1f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per provider first")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--out", default=None, help="also write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    result = measure(args.preset, args.device, args.rounds, args.steps, args.warmup, overrides)
    text = table(result)
    print(text)
    if args.out:
        with open(f"{args.out}.json", "w") as f:
            json.dump(result, f, indent=1)
        with open(f"{args.out}.md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
