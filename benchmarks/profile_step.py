"""Where the time of a step goes: the device kernels (and host time) of ours against the reference, per case.

The benchmarks say how long a step takes; this says which kernels make it up, so a GPU session brings back what the
next change should aim at. For every case and provider it profiles ``--steps`` steps after two warm-up steps with
``torch.profiler`` and writes a markdown table: wall time per step, device-busy time per step (their gap is host
time: launches, Python, syncs), the top kernels by their own device time, the top host operators by their own
CPU time (what fed the device, or kept it waiting), and for our eager cases the top Python functions by their own
time under cProfile (whose Python the host time is: ours, Triton's launcher, autograd's).

    python -m benchmarks.profile_step --out profile.md                  # GPU: the session's cases
    python -m benchmarks.profile_step --dry-run --out profile.md        # CPU: tiny shapes, host time only

Cases: the ViT-S/16 train step of ``bench_train_step`` (B=64, 2+10 crops, bf16 autocast), ``--kernels fused``
against ``reference``, and the fused step's forward, loss and backward alone; the ViT-g/14 block of
``bench_stochastic_depth`` at drop rate 0.4, ours against timm's DropPath (full compute) and the index path;
``bench_packed_attention``'s ViT-S/16 crops (bf16) forward + backward, ours against per-group SDPA and varlen
attention. On a GPU, the forward-and-backward, block and attention cases once more captured in a CUDA graph and
replayed: their wall time then is the kernels' alone, the bound on what cutting host time can win (a case that cannot
be captured says why in its row).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import dino_kernels
from benchmarks import bench_packed_attention as pa
from benchmarks import bench_stochastic_depth as sd

TOP_KERNELS = 12
NAME_WIDTH = 90


def _train_step_cases(dry_run: bool, device: str) -> tuple[dict, dict]:
    """The whole train step, ours and the reference; and our step's forward and backward alone (see
    :func:`_forward_backward`)."""
    from benchmarks.step_ab import training_step

    overrides = ({"preset": "cpu-tiny", "batch_size": 8, "n_local_crops": 2} if dry_run else
                 {"preset": "vit-s16", "batch_size": 64, "n_local_crops": 10, "amp": "bf16"})
    steps, parts = {}, {}
    for provider, kernels in (("ours", "fused"), ("reference", "reference")):
        trainer, crops, step = training_step(overrides, kernels, device, "off", tempfile.mkdtemp(prefix="dk-profile-"))
        steps[f"train step vit-s16 B=64 2+10 bf16 ({provider})"] = ("auto" if provider == "ours" else "reference", step)
        if provider == "ours":
            parts = _forward_backward(trainer, crops)
    return steps, parts


def _forward_backward(trainer: object, crops: list[torch.Tensor]) -> dict[str, tuple[str, Callable[[], object]]]:
    """The fused step's forward (teacher and student), DINO loss and backward alone, without the optimiser, the EMA
    and the loss's host read (the NaN guard), none of which a CUDA graph may hold as the step does them: what a
    captured step would leave of the host time."""
    cfg = trainer.cfg

    def step():
        with torch.autocast(trainer.device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
            out = trainer.forward_networks(crops, None)
            loss = dino_kernels.dino_loss(out.student, out.teacher, trainer.center, n_global_crops=cfg.n_global_crops,
                                          student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp)
        loss.backward()

    return {"train fwd+bwd vit-s16 B=64 2+10 bf16 (ours)": ("auto", step)}


def _sd_block_cases(dry_run: bool, device: str) -> dict[str, tuple[str, Callable[[], object]]]:
    *shape, _ = sd.MODELS["vit-g14"]
    block, xs, grads = sd._setup(sd.DRY_RUN_MODEL if dry_run else tuple(shape), device)
    params = list(block.parameters())
    cases = {}
    for provider in ("ours", "timm_droppath", "torch_index"):
        def step(run=sd.BLOCKS[provider]):
            return torch.autograd.grad(run(block, xs, 0.4), [*xs, *params], grads)

        cases[f"sd block vit-g14 p=0.4 fwd+bwd ({provider})"] = ("auto", step)
    return cases


def _attention_cases(dry_run: bool, device: str) -> dict[str, tuple[str, Callable[[], object]]]:
    shape, _ = pa.CASES["vit-s16"]
    q, k, v, cu_seqlens, max_seqlen, group_shapes, _ = pa._setup(pa.DRY_RUN_SHAPE if dry_run else shape, device)
    cases = {}
    for provider in ("ours", "per_group_sdpa") + (("varlen_attn",) if device == "cuda" else ()):
        attend = pa._provider(provider, cu_seqlens, max_seqlen, group_shapes, q.shape[0], device)
        outs = attend(q, k, v)
        grads = [torch.randn_like(o) for o in (outs if isinstance(outs, list) else [outs])]

        def step(attend=attend, grads=grads):
            out = attend(q, k, v)
            return torch.autograd.grad(out if isinstance(out, list) else [out], (q, k, v), grads)

        cases[f"packed attention vit-s16 fwd+bwd ({provider})"] = ("auto", step)
    return cases


def _graphed(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` captured once in a CUDA graph (after warm-up on a side stream, as capture requires); returns the
    replay, which runs the same kernels on the same tensors without the host's Python and launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _profile(step: Callable[[], object], steps: int, cuda: bool) -> tuple[float, dict[str, list], float]:
    """(wall ms per step, {"device": rows, "host": rows}, device-busy ms per step); a row is (name, calls per step,
    ms per step), by time. Device rows: CUDA kernels and copies (own time); host rows: operators' own CPU time."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - start) * 1e3 / steps
    rows = {"device": [], "host": []}
    for event in prof.key_averages():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        own = event.self_device_time_total if on_device else event.self_cpu_time_total
        if own > 0:
            rows["device" if on_device else "host"].append((event.key, round(event.count / steps), own / 1e3 / steps))
    for kind in rows:
        rows[kind].sort(key=lambda row: -row[2])
    busy = sum(ms for _, _, ms in rows["device"]) if cuda else float("nan")
    return wall, rows, busy


def _python_profile(step: Callable[[], object], steps: int) -> list[tuple[str, int, float]]:
    """(function, calls per step, own ms per step) under cProfile, by own time: Python functions and the C functions
    they call (a launch, autograd's engine), which is where an eager step's host time is spent."""
    step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    rows = []
    for (file, line, function), (_, calls, own, *_) in pstats.Stats(profiler).stats.items():
        name = function if file == "~" else f"{os.path.basename(file)}:{line}({function})"
        rows.append((name, round(calls / steps), own * 1e3 / steps))
    return sorted(rows, key=lambda row: -row[2])


def _table(title: str, rows: list[tuple[str, int, float]]) -> list[str]:
    """Markdown lines of the top rows (name, calls per step, ms per step), each with its share of all rows' time."""
    total = sum(ms for _, _, ms in rows) or 1.0
    return ([f"| {title} | calls | ms | % |", "|---|---|---|---|"]
            + [f"| `{key[:NAME_WIDTH]}` | {calls} | {ms:.3f} | {100 * ms / total:.1f} |"
               for key, calls, ms in rows[:TOP_KERNELS]] + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per case (after 2 warm-up steps)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the plumbing only")
    parser.add_argument("--out", default=None, help="write the markdown tables to this file")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    lines = [f"# Step profiles on {torch.cuda.get_device_name() if cuda else 'CPU (dry run)'}, torch "
             f"{torch.__version__}", "",
             f"Per step, mean of {args.steps} profiled steps after 2 warm-up steps. 'busy': the sum of the device "
             "kernels' own time; wall - busy is host time the device waited for (or overlapped). 'host ops': the "
             "operators' own CPU time (launches included); wall - host ops is Python between them, and idle "
             "waits.", ""]
    train_steps, train_parts = _train_step_cases(args.dry_run, device)
    host_bound = {**train_parts, **_sd_block_cases(args.dry_run, device), **_attention_cases(args.dry_run, device)}
    cases = {**train_steps, **host_bound}
    if cuda:  # last: a capture that fails must not spoil the eager cases
        cases.update({f"{name[:-1]}, CUDA graph)": (backend, step, True)
                      for name, (backend, step) in host_bound.items()})
    summary = [f"| case | wall ms | busy ms | host ops ms | {'kernels' if cuda else 'host ops'} per step |",
               "|---|---|---|---|---|"]
    for name, (backend, step, *graphed) in cases.items():
        try:
            with dino_kernels.backend(backend):
                wall, rows, busy = _profile(_graphed(step) if graphed else step, args.steps, cuda)
        except Exception as error:  # noqa: BLE001 - a case that cannot run (capture) is reported, the rest go on
            summary.append(f"| {name} | failed: {type(error).__name__}: {str(error)[:200]} | | | |")
            continue
        launches = sum(calls for _, calls, _ in rows["device" if cuda else "host"])
        host = sum(ms for _, _, ms in rows["host"])
        summary.append(f"| {name} | {wall:.2f} | {busy:.2f} | {host:.2f} | {launches} |")
        lines += [f"## {name}: {wall:.2f} ms wall, {busy:.2f} ms busy per step", ""]
        # On a GPU both tables: the kernels the device ran, and the host operators that fed it (the wall - busy gap).
        for kind in ("device", "host") if cuda else ("host",):
            lines += _table(f"{kind} (own time)", rows[kind])
        if name.endswith("(ours)"):  # whose Python: ours, Triton's launcher's, autograd's (cProfile's own overhead
            with dino_kernels.backend(backend):  # inflates every row alike)
                lines += _table("python (own time, cProfile)", _python_profile(step, args.steps))
    text = "\n".join(lines[:4] + summary + [""] + lines[4:])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
