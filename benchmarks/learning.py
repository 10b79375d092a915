"""The learning benchmark: the default ``python -m dino.train`` on several seeds, timed as a user runs it.

Each seed runs the whole command in a subprocess (start-up, training, the periodic k-NN evaluations, the final linear
probe, the outputs) and the wall time is that of the command. ``--reference-seeds`` adds the same runs with
``--kernels reference`` (plain PyTorch ops), the A/B check that the kernels do not change what is learned;
``--preset`` measures another preset than the default (e.g. ``cpu-tiny-v2``, the DINOv2 recipe). Writes
``<out>.json`` (every seed's metrics and curve) and ``<out>.md`` (the table the README quotes), one section per
preset: a run replaces the results of its own preset and keeps the others' (each with its own date and machine).

    python -m benchmarks.learning --seeds 0 1 2                      # -> benchmarks/results/learning-cpu.{json,md}
    python -m benchmarks.learning --seeds 0 1 2 --reference-seeds 0  # and seed 0 on --kernels reference
    python -m benchmarks.learning --preset cpu-tiny-v2 --seeds 0     # the DINOv2 preset, next to the default

Run it on an otherwise idle machine: the wall times are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "learning-cpu")
TARGET_KNN, TARGET_SECONDS = 97.0, 300.0
DEFAULT_PRESET = "cpu-tiny"


def run_seed(seed: int, kernels: str, extra: list[str], preset: str | None = None) -> dict:
    """One run (of the default preset unless ``preset``): the final k-NN and linear top-1, wall time, mean img/s and
    the k-NN curve."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "dino.train", *(["--preset", preset] if preset else []), "--seed",
                   str(seed), "--kernels", kernels, "--output-dir", out, "--no-progress", *extra]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f]
    last = history[-1]
    return {
        "seed": seed, "kernels": kernels, "knn_top1": last["knn_top1"], "linear_top1": last.get("linear_top1"),
        "wall_seconds": wall, "train_seconds": sum(r["epoch_seconds"] for r in history),
        "img_per_s": statistics.fmean(r["img_per_s"] for r in history), "epochs": last["epoch"],
        "min_entropy_fraction": min(r["teacher_entropy"] / r["ln_k"] for r in history),
        "max_entropy_fraction": max(r["teacher_entropy"] / r["ln_k"] for r in history),
        "knn_curve": [(r["epoch"], r["knn_top1"]) for r in history if r["knn_top1"] is not None],
    }


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}, Python {platform.python_version()}")


def _group_markdown(group: dict) -> list[str]:
    runs, preset = group["runs"], group["preset"]
    title = "the default `python -m dino.train`" if preset == DEFAULT_PRESET else f"`python -m dino.train --preset " \
        f"{preset}`"
    lines = [
        f"## {preset}: {title}", "",
        f"Measured {group['date']} on {group['machine']}, nothing else running, by `{group['command']}`.", "",
        "| seed | kernels | k-NN top-1 | linear top-1 | wall | training | img/s | teacher entropy / ln K |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        linear = f"{r['linear_top1']:.2f} %" if r["linear_top1"] is not None else "–"
        lines.append(f"| {r['seed']} | {r['kernels']} | {r['knn_top1']:.2f} % | {linear} | {r['wall_seconds']:.0f} s "
                     f"| {r['train_seconds']:.0f} s | {r['img_per_s']:.0f} | {r['min_entropy_fraction']:.2f} – "
                     f"{r['max_entropy_fraction']:.2f} |")
    for kernels in dict.fromkeys(r["kernels"] for r in runs):
        knn = [r["knn_top1"] for r in runs if r["kernels"] == kernels]
        lines.append(f"| mean | {kernels} | {statistics.fmean(knn):.2f} % | | | | | |")
    lines += ["", "k-NN top-1 per evaluated epoch:", ""]
    for r in runs:
        curve = ", ".join(f"{epoch}: {knn:.1f}" for epoch, knn in r["knn_curve"])
        lines.append(f"- seed {r['seed']}, {r['kernels']}: {curve}")
    return lines + [""]


def markdown(groups: list[dict]) -> str:
    lines = [
        "# Learning benchmark on the digits", "",
        f"Target of the default preset: k-NN top-1 ≥ {TARGET_KNN:.0f} % on every seed within "
        f"{TARGET_SECONDS / 60:.0f} minutes of wall time for the whole command. k-NN: k = 20, T = 0.07, teacher CLS "
        "features, held-out 30 % of the digits. Linear: logistic regression on the same frozen features "
        "(`python -m dino.eval_linear`).", "",
    ]
    for group in groups:
        lines += _group_markdown(group)
    return "\n".join(lines)


def load_groups(path: str) -> list[dict]:
    """The preset groups already in ``path`` (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["groups"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reference-seeds", type=int, nargs="*", default=[],
                        help="seeds to run again with --kernels reference")
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="the preset to measure (default: %(default)s, "
                        "what `python -m dino.train` trains on a CPU)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output path without extension (default: %(default)s)")
    parser.add_argument("extra", nargs="*", help="further `python -m dino.train` options, after --")
    args = parser.parse_args(argv)
    runs = []
    for kernels, seeds in (("fused", args.seeds), ("reference", args.reference_seeds)):
        for seed in seeds:
            runs.append(run_seed(seed, kernels, args.extra, None if args.preset == DEFAULT_PRESET else args.preset))
            r = runs[-1]
            print(f"seed {seed}, {kernels}: k-NN {r['knn_top1']:.2f} %, linear {r['linear_top1']}, "
                  f"{r['wall_seconds']:.0f} s", flush=True)
    command = ("python -m benchmarks.learning " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    group = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command,
             "runs": runs}
    groups = [g for g in load_groups(args.out + ".json") if g["preset"] != args.preset]
    groups = sorted([*groups, group], key=lambda g: (g["preset"] != DEFAULT_PRESET, g["preset"]))
    with open(args.out + ".json", "w") as f:
        json.dump({"groups": groups}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(groups))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
