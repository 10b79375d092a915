"""Shared benchmark harness on pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Each benchmark calls the ``measure`` fixture once per (case, provider):

    def test_ema(benchmark, measure):
        measure(benchmark, fn, case="vit-l fp32", provider="ours", bytes_moved=n_bytes)

``measure`` warms ``fn`` up (torch.compile happens there), measures the peak extra memory of one call, times it
with pytest-benchmark (synchronising CUDA inside the timed call) and records the median, peak memory and the
achieved GB/s (``bytes_moved``) or TFLOP/s (``flops``). At the end of the session a table per case gives every
provider's median and its speed-up over the ``reference`` provider measured in the same run.
``--dk-results PATH`` also writes that table to ``PATH.json`` and ``PATH.md`` (for ``benchmarks/results/``).

Providers: ``reference`` (eager plain PyTorch from ``dino_kernels.reference``), ``compiled`` (the reference under
``torch.compile``, where it applies), ``ours``, plus named baselines (e.g. ``foreach_lerp``).
"""

from __future__ import annotations

import gc
import json
import platform
import re
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest
import torch

_RECORDS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--dk-results", default=None, help="write the summary table to PATH.json and PATH.md")
    parser.addoption("--dk-rounds", type=int, default=None, help="timed rounds per case (default: by duration)")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        metafunc.parametrize("device", devices)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def _rss(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory above what was allocated before the call, for one call of ``fn``.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above the resident set before the call; glibc returns large blocks to the system, so
    this follows the tensors' lifetimes.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS")
    fn()
    return max(0, _rss("VmHWM") - before)


@pytest.fixture
def measure(request):
    def run(benchmark, fn: Callable[[], object], *, case: str, provider: str, device: str,
            bytes_moved: int | None = None, flops: float | None = None, warmup: int = 2) -> float:
        """Time ``fn`` and record it; returns the median in seconds."""
        benchmark.group = case
        benchmark.name = f"{case} [{provider}]"

        def call():
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        for _ in range(warmup):
            call()
        peak = peak_extra_bytes(call, device)
        rounds = request.config.getoption("--dk-rounds")
        if rounds:
            benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
        else:
            benchmark(call)
        if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
            return float("nan")
        times = benchmark.stats.stats.data
        median = statistics.median(times)
        record = {
            "case": case, "provider": provider, "device": device_name(device),
            "median_ms": median * 1e3, "rounds": len(times), "peak_extra_mb": peak / 2**20,
            "gb_per_s": bytes_moved / median / 1e9 if bytes_moved else None,
            "tflop_per_s": flops / median / 1e12 if flops else None,
        }
        benchmark.extra_info.update(record)
        _RECORDS.append(record)
        return median

    return run


def _with_ratios(records: list[dict]) -> list[dict]:
    reference = {(r["case"], r["device"]): r["median_ms"] for r in records if r["provider"] == "reference"}
    out = []
    for r in records:
        ref = reference.get((r["case"], r["device"]))
        out.append({**r, "speedup_vs_reference": ref / r["median_ms"] if ref else None})
    return out


def _table(records: list[dict]) -> str:
    header = "| case | device | provider | median ms | vs reference | peak extra MB | GB/s | TFLOP/s |"
    lines = [header, "|" + "---|" * 8]
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    for r in records:
        lines.append(
            f"| {r['case']} | {r['device']} | {r['provider']} | {r['median_ms']:.3f} | "
            f"{fmt(r['speedup_vs_reference'], '.2f')}{'×' if r['speedup_vs_reference'] else ''} | "
            f"{r['peak_extra_mb']:.1f} | {fmt(r['gb_per_s'], '.1f')} | {fmt(r['tflop_per_s'], '.1f')} |"
        )
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, config):
    if not _RECORDS:
        return
    records = _with_ratios(_RECORDS)
    terminalreporter.write_sep("=", "dino-kernels benchmark summary (speed-up = reference median / median)")
    terminalreporter.write_line(_table(records))
    path = config.getoption("--dk-results")
    if path:
        meta = {"date": date.today().isoformat(), "torch": torch.__version__,
                "device": records[0]["device"], "platform": platform.platform()}
        Path(f"{path}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        Path(f"{path}.md").write_text(f"# Benchmarks {meta['date']} on {meta['device']} (torch {meta['torch']})\n\n"
                                      + _table(records) + "\n")
