"""Shared benchmark harness on pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Each benchmark calls the ``measure`` fixture once per (case, provider):

    def test_ema(benchmark, measure, bench_env, ...):
        device = bench_env.device("cuda")       # skips where there is no GPU; "cpu" in a dry run
        measure(benchmark, fn, case="ema vit-l16 fp32", provider="ours", device=device, bytes_moved=n_bytes)

``measure`` warms ``fn`` up (torch.compile happens there), measures the peak extra memory of one call, times it and
records the median, peak memory and the achieved GB/s (``bytes_moved``) or TFLOP/s (``flops``):

- CUDA: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed between calls; median of the calls of
  about ``REP_MS``, at least ~10 calls). pytest-benchmark's table shows these per-call times too. (A host timer
  around a synchronize adds 10-20 µs per call, which compresses the ratios of sub-millisecond kernels.)
- CPU: pytest-benchmark (``perf_counter``); ``--dk-rounds N`` fixes the rounds. A call of ``SLOW_CALL_MS`` or more (a
  train step) gets ``SLOW_CALL_ROUNDS`` rounds rather than pytest-benchmark's one second (7 rounds of a 150-ms step,
  too few for the median on a machine whose speed drifts).

At the end of the session a table per case gives every provider's median, its speed-up over the ``reference``
provider and over the *best baseline*: the fastest provider other than ``ours`` in the same case, named (what a
user would pick instead of ours, e.g. ``_foreach_lerp_`` for the EMA, not only our slow reference).
``--dk-results PATH`` also writes that table to ``PATH.json`` and ``PATH.md`` (for ``benchmarks/results/``), with
the cases not measured (skipped or failed) and why.

Sets: everything by default; ``-m session`` selects the trimmed set of the GPU session (benchmarks/gpu_session.sh)
that answers the README's targets. ``--dk-dry-run`` runs the selected cases on CPU with tiny shapes and 2 rounds,
to check the plumbing (providers, compilation, ratios, result files) in a minute; its results say DRY RUN.

Providers: ``reference`` (eager plain PyTorch from ``dino_kernels.reference``), ``compiled`` (the reference under
``torch.compile(dynamic=False)``, where it applies), ``ours``, plus named baselines (e.g. ``foreach_lerp``).
Compiled baselines: every new shape is a recompile of the same code object, so dynamo's recompile limit (8) is
raised here and hitting it fails loudly instead of silently timing eager code; ``measure``'s warm-up calls
compile each case before the timing.
"""

from __future__ import annotations

import gc
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
import torch
import torch._dynamo

WARMUP_MS, REP_MS, MIN_CALLS = 25, 150, 10  # do_bench on CUDA: warm-up and timed durations, fewest timed calls
DRY_RUN_ROUNDS = 2
SLOW_CALL_MS, SLOW_CALL_ROUNDS = 20.0, 30  # CPU: calls at least this long get this many timed rounds
RECOMPILE_LIMIT = 256

_RECORDS: list[dict] = []
_NOT_MEASURED: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--dk-results", default=None, help="write the summary table to PATH.json and PATH.md")
    parser.addoption("--dk-rounds", type=int, default=None, help="timed rounds per case on CPU (default: by duration)")
    parser.addoption("--dk-dry-run", action="store_true",
                     help="run the selected cases on CPU with tiny shapes and 2 rounds: checks the plumbing, "
                          "measures nothing")


def pytest_configure(config):
    config.addinivalue_line("markers", "session: the trimmed benchmark set of the GPU session (gpu_session.sh)")
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.fail_on_recompile_limit_hit = True


@dataclass(frozen=True)
class BenchEnv:
    dry_run: bool

    def device(self, wanted: str) -> str:
        """The device a case made for ``wanted`` runs on: CPU in a dry run; skips a CUDA case without a GPU."""
        if self.dry_run:
            return "cpu"
        if wanted == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        return wanted


@pytest.fixture
def bench_env(request) -> BenchEnv:
    return BenchEnv(dry_run=request.config.getoption("--dk-dry-run"))


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


def _time_cuda(benchmark, fn: Callable[[], object], call_ms: float) -> None:
    """CUDA-event times of ``fn`` (do_bench) written into ``benchmark``'s stats, in seconds per call."""
    from triton.testing import do_bench

    times_ms: list[float] = []

    def timed():
        # Slow calls (a train step) get a longer window, so that the median is over at least ~MIN_CALLS calls.
        times_ms[:] = do_bench(fn, warmup=WARMUP_MS, rep=max(REP_MS, MIN_CALLS * call_ms), return_mode="all")

    benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:
        # pytest-benchmark timed the whole do_bench call; its table and JSON get the per-call event times instead.
        benchmark.stats.stats.data[:] = [t / 1e3 for t in times_ms]


@pytest.fixture
def measure(request):
    def run(benchmark, fn: Callable[[], object], *, case: str, provider: str, device: str,
            bytes_moved: int | None = None, flops: float | None = None, warmup: int = 3) -> float:
        """Time ``fn`` after ``warmup`` calls (2 in a dry run) and record it; returns the median in seconds."""
        benchmark.group = case
        benchmark.name = f"{case} [{provider}]"
        dry_run = request.config.getoption("--dk-dry-run")

        def call():
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        for _ in range(1 if dry_run else warmup - 1):
            call()
        start = time.perf_counter()
        call()
        call_ms = (time.perf_counter() - start) * 1e3  # one warm call, to size do_bench's window
        peak = peak_extra_bytes(call, device)
        if device == "cuda":
            _time_cuda(benchmark, fn, call_ms)
        else:
            rounds = request.config.getoption("--dk-rounds") or (
                DRY_RUN_ROUNDS if dry_run else SLOW_CALL_ROUNDS if call_ms >= SLOW_CALL_MS else None)
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
            "timer": "cuda events (triton do_bench)" if device == "cuda" else "perf_counter (pytest-benchmark)",
            "dry_run": dry_run,
        }
        benchmark.extra_info.update(record)
        _RECORDS.append(record)
        return median

    return run


def _note(report, name: str) -> None:
    """Keeps why a benchmark was not measured: skipped (its reason) or failed (the error's last line)."""
    if report.failed:
        lines = report.longreprtext.strip().splitlines()
        _NOT_MEASURED.append({"test": name, "status": "failed", "reason": lines[-1] if lines else ""})
        return
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "--benchmark-only" not in reason:
        _NOT_MEASURED.append({"test": name, "status": "skipped", "reason": reason.removeprefix("Skipped: ")})


def _ours(report) -> bool:
    return "benchmarks/" in report.nodeid.replace("\\", "/") and (report.skipped or report.failed)


def pytest_runtest_logreport(report):
    if _ours(report) and report.when in ("setup", "call"):
        _note(report, report.nodeid.split("::", 1)[-1])


def pytest_collectreport(report):
    if _ours(report):  # a whole module, e.g. a missing import
        _note(report, report.nodeid)


def with_ratios(records: list[dict]) -> list[dict]:
    """Adds ``speedup_vs_reference`` and, against the fastest provider of the same case that is not ours (``ours``,
    or a variant such as ``ours_cuda_graph``), ``best_baseline`` (its name) and ``speedup_vs_best_baseline`` (its
    median / this median)."""
    out = []
    for r in records:
        same = [s for s in records if (s["case"], s["device"]) == (r["case"], r["device"])]
        ref = next((s["median_ms"] for s in same if s["provider"] == "reference"), None)
        best = min((s for s in same if s["provider"].split("_")[0] != "ours"), key=lambda s: s["median_ms"],
                   default=None)
        out.append({**r, "speedup_vs_reference": ref / r["median_ms"] if ref else None,
                    "best_baseline": best["provider"] if best else None,
                    "speedup_vs_best_baseline": best["median_ms"] / r["median_ms"] if best else None})
    return out


def _table(records: list[dict]) -> str:
    header = ("| case | device | provider | median ms | vs reference | vs best baseline | peak extra MB | GB/s | "
              "TFLOP/s |")
    lines = [header, "|" + "---|" * 9]

    def fmt(v, spec, suffix=""):
        return "" if v is None else format(v, spec) + suffix

    for r in records:
        best = r["speedup_vs_best_baseline"]
        best_cell = "" if best is None else f"{best:.2f}× ({r['best_baseline']})"
        lines.append(
            f"| {r['case']} | {r['device']} | {r['provider']} | {r['median_ms']:.3f} | "
            f"{fmt(r['speedup_vs_reference'], '.2f', '×')} | {best_cell} | "
            f"{r['peak_extra_mb']:.1f} | {fmt(r['gb_per_s'], '.1f')} | {fmt(r['tflop_per_s'], '.1f')} |"
        )
    return "\n".join(lines)


def _meta(config, records: list[dict]) -> dict:
    import triton

    dry_run = config.getoption("--dk-dry-run")
    return {"date": date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "devices": sorted({r["device"] for r in records}), "platform": platform.platform(),
            "set": config.getoption("markexpr") or "full", "dry_run": dry_run,
            **({"warning": "CPU, tiny shapes under the real cases' names, 2 rounds: checks the plumbing only"}
               if dry_run else {})}


def pytest_terminal_summary(terminalreporter, config):
    path = config.getoption("--dk-results")
    if not _RECORDS and not path:
        return
    records = with_ratios(_RECORDS)
    meta = _meta(config, records)
    title = "dino-kernels benchmark summary (speed-up = other median / this median)"
    terminalreporter.write_sep("=", ("DRY RUN (not a measurement): " if meta["dry_run"] else "") + title)
    terminalreporter.write_line(_table(records))
    if path:
        Path(f"{path}.json").write_text(json.dumps({"meta": meta, "records": records, "not_measured": _NOT_MEASURED},
                                                   indent=1) + "\n")
        versions = f"torch {meta['torch']}, triton {meta['triton']}"
        heading = (f"# DRY RUN, not a measurement: {meta['warning']} ({meta['date']}, {versions})" if meta["dry_run"]
                   else f"# Benchmarks {meta['date']} on {', '.join(meta['devices'])} ({versions})")
        notes = (f"\n\nSet: `{meta['set']}`. Medians: CUDA events (triton do_bench) on GPU, perf_counter "
                 "(pytest-benchmark) on CPU. \"vs best baseline\": the fastest provider other than ours in the same "
                 "case (named).\n\n")
        missing = "".join(f"- `{n['test']}` {n['status']}: {n['reason']}\n" for n in _NOT_MEASURED)
        Path(f"{path}.md").write_text(heading + notes + _table(records) + "\n"
                                      + (f"\nNot measured:\n\n{missing}" if missing else ""))
