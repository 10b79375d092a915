"""A short training run twice from the same seed, `--kernels fused` and `--kernels reference`: both loss curves.

The two runs share everything but the kernels (initial weights, data order, augmentations and drop-path draws come
from the same seeds), so their per-step DINO losses should agree at the start and drift apart only by rounding
(bf16 autocast on GPU). A kernel that is wrong in a way the unit tests missed shows up as curves that split early.
Both run eagerly (`--cuda-graph off`). On a GPU a third run, `--kernels fused --cuda-graph on`, replays the fused
step from a CUDA graph: the same kernels on the same random draws, so its losses should be the fused run's.

    python -m benchmarks.train_smoke --steps 100 --out smoke.json      # GPU: ViT-S/16 preset on the digits
    python -m benchmarks.train_smoke --preset cpu-tiny --steps 8       # CPU: the plumbing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import dino_kernels
from dino.config import default_preset, resolve_config
from dino.train import Trainer


def run(preset: str, kernels: str, steps: int, batch_size: int | None, num_workers: int,
        cuda_graph: str = "off") -> dict:
    """Per-step losses and step times of ``steps`` training steps with ``kernels`` (fused or reference)."""
    with tempfile.TemporaryDirectory() as tmp:
        values = {"preset": preset, "kernels": kernels, "seed": 0, "num_workers": num_workers, "progress": False,
                  "output_dir": tmp, "cuda_graph": cuda_graph}
        if batch_size:
            values["batch_size"] = batch_size
        trainer = Trainer(resolve_config(values), values)
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses, seconds = [], []
        with dino_kernels.backend("reference" if kernels == "reference" else "auto"):
            epoch = 0
            while len(losses) < steps:
                trainer.sampler.set_epoch(epoch)
                for images, _ in trainer.loader:
                    start = time.perf_counter()
                    loss, *_ = trainer.train_step(images, epoch)  # returns a Python float: the step has synced
                    seconds.append(time.perf_counter() - start)
                    losses.append(loss)
                    if len(losses) == steps:
                        break
                epoch += 1
        timed = seconds[min(10, len(seconds) // 2):]  # past compilation and allocator warm-up
        return {"kernels": kernels + (" + cuda graph" if cuda_graph == "on" else ""), "losses": losses,
                "step_seconds": seconds,
                "img_per_s": trainer.cfg.batch_size / statistics.median(timed),
                "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                "batch_size": trainer.cfg.batch_size, "device": str(trainer.device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="default: vit-s16 with a GPU, cpu-tiny without")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--out", default=None, help="write both runs to this JSON file")
    args = parser.parse_args(argv)
    preset = args.preset or default_preset()
    runs = [run(preset, kernels, args.steps, args.batch_size, args.num_workers) for kernels in ("fused", "reference")]
    if runs[0]["device"].startswith("cuda"):
        runs.append(run(preset, "fused", args.steps, args.batch_size, args.num_workers, cuda_graph="on"))
    fused, ref = (r["losses"] for r in runs[:2])
    diffs = [abs(a - b) for a, b in zip(fused, ref)]
    summary = {"preset": preset, "steps": args.steps, "max_abs_loss_diff_first_10": max(diffs[:10]),
               "max_abs_loss_diff": max(diffs), "runs": runs}
    if len(runs) == 3:
        summary["max_abs_loss_diff_graph"] = max(abs(a - b) for a, b in zip(fused, runs[2]["losses"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"{preset}, {args.steps} steps, batch {runs[0]['batch_size']} on {runs[0]['device']}, seed 0")
    print("| step | fused loss | reference loss |\n|---|---|---|")
    for i in sorted({*range(0, args.steps, max(1, args.steps // 10)), args.steps - 1}):
        print(f"| {i + 1} | {fused[i]:.4f} | {ref[i]:.4f} |")
    for r in runs:
        memory = f", peak {r['peak_mem_mb']:.0f} MB" if r["peak_mem_mb"] is not None else ""
        print(f"{r['kernels']}: {r['img_per_s']:.0f} img/s (median step){memory}")
    print(f"max |fused - reference| loss: first 10 steps {summary['max_abs_loss_diff_first_10']:.2e}, "
          f"all steps {summary['max_abs_loss_diff']:.2e}")
    if "max_abs_loss_diff_graph" in summary:
        print(f"max |fused + cuda graph - fused| loss: {summary['max_abs_loss_diff_graph']:.2e}")
    finite = all(x == x and abs(x) != float("inf") for r in runs for x in r["losses"])
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
