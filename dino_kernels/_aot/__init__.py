"""Ahead-of-time compile harness for every Triton kernel, for GPUs we do not have.

Each op module wraps its Triton kernels in :class:`~dino_kernels._launch.TritonKernel` (the kernel and the launch
configs its launcher may pick) and defines ``aot_examples()``, which calls its launchers on small CPU tensors once
per dtype variant and config. ``python -m dino_kernels._aot`` records those launches instead of running them,
derives each signature from the recorded arguments (the launch-time types the JIT would see), and compiles every
distinct (signature, config) for sm_80 and sm_90 with ``triton.compile`` and a ``GPUTarget`` (no GPU needed),
reporting shared memory against each architecture's per-block limit. This catches lowering errors and
shared-memory overflows that the interpreter cannot see. Pointers and ``stride*`` arguments are compiled as
divisible by 16, the specialisation the JIT applies to aligned tensors at run time: it turns on software
pipelining, so that variant is the one whose shared memory must fit.

The harness fails on a ``*_kernel`` that no ``TritonKernel`` wraps and on a declared config that no example
launches. It must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions), so the
tests call it in a subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import pkgutil
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from dino_kernels._launch import LAUNCH_OPTIONS, TritonKernel, recording

# Largest dynamic shared memory one block may use, in bytes (CUDA programming guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
TARGETS = (80, 90)
_POINTER_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64"}

# A compile job: (module, kernel name, signature, constexpr values, launch options, first job of its kernel).
Job = tuple[str, str, dict[str, str], dict[str, Any], dict[str, Any], bool]


def kernel_modules() -> list[str]:
    import dino_kernels

    return [f"dino_kernels.{m.name}" for m in pkgutil.iter_modules(dino_kernels.__path__) if not m.name.startswith("_")]


def _declared(module: Any) -> dict[str, TritonKernel]:
    return {k.name: k for k in vars(module).values() if isinstance(k, TritonKernel)}


def _arg_type(name: str, value: Any) -> str:
    """The type the JIT gives a launch argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def _job(module_name: str, kernel: TritonKernel, args: dict[str, Any], config: dict[str, Any]) -> Job:
    signature, constexprs = {}, {}
    for param in kernel.fn.params:
        name = param.name
        value = config[name] if name in config else args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = _arg_type(name, value)
    options = {n: v for n, v in config.items() if n in LAUNCH_OPTIONS}
    return module_name, kernel.name, signature, constexprs, options, False


def _jobs(only: str | None = None) -> tuple[list[Job], list[str]]:
    """Every distinct compile the examples launch, and what the declarations leave uncovered."""
    jobs: dict[str, Job] = {}
    problems = []
    for module_name in kernel_modules():
        if only and module_name.rsplit(".", 1)[-1] != only:
            continue
        module = importlib.import_module(module_name)
        declared = _declared(module)
        if not declared:
            continue
        with recording() as launches:
            module.aot_examples()
        used = set()
        for kernel, args, config in launches:
            used.add((kernel.name, id(config)))
            job = _job(module_name, kernel, args, config)
            key = json.dumps(job[1:5], sort_keys=True, default=str)
            first = not any(j[1] == kernel.name for j in jobs.values())
            jobs.setdefault(key, (*job[:5], first))
        for kernel in declared.values():
            problems += [f"{module_name}.{kernel.name}: config {c} is declared but aot_examples() never launches it"
                         for c in kernel.configs if (kernel.name, id(c)) not in used]
    return list(jobs.values()), problems


def undeclared_kernels(only: str | None = None) -> list[str]:
    """``*_kernel`` Triton functions that no ``TritonKernel`` of their module wraps."""
    from triton.runtime.jit import JITFunction

    missing = []
    for module_name in kernel_modules():
        if only and module_name.rsplit(".", 1)[-1] != only:
            continue
        module = importlib.import_module(module_name)
        wrapped = {id(k.fn) for k in _declared(module).values()}
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and id(value) not in wrapped:
                missing.append(f"{module_name}.{name}")
    return missing


def _aligned_attrs(signature: dict[str, str]) -> dict[tuple[int], list[list]]:
    """Divisibility-by-16 hints for pointers and strides, as the JIT derives them from aligned tensors."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
            if kind.startswith("*") or (name.startswith("stride") and kind in ("i32", "i64"))}


def compile_one(job: Job) -> list[dict[str, Any]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, kernel_name, signature, constexprs, options, first = job
    kernel = _declared(importlib.import_module(module_name))[kernel_name]
    variants = [(signature, constexprs)]
    ones = [n for n, kind in signature.items() if kind in ("i32", "i64")]
    if first and ones:
        # The JIT turns every integer argument equal to 1 into a constant (a Python int inside the kernel, where
        # e.g. `n.to(tl.int64)` fails to compile): compile that specialisation too, once per kernel.
        variants.append(({n: "constexpr" if n in ones else kind for n, kind in signature.items()},
                         {**constexprs, **dict.fromkeys(ones, 1)}))
    results = []
    for (sig, consts), arch in itertools.product(variants, TARGETS):
        record = {"kernel": f"{module_name}.{kernel_name}", "arch": f"sm_{arch}", "signature": sig,
                  "config": {**consts, **options}}
        try:
            source = ASTSource(fn=kernel.fn, signature=sig, constexprs=consts, attrs=_aligned_attrs(sig))
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            shared = int(compiled.metadata.shared)
            record.update(ok=shared <= SHARED_MEMORY_LIMIT[arch], shared=shared,
                          error=None if shared <= SHARED_MEMORY_LIMIT[arch] else
                          f"shared memory {shared} B > sm_{arch} limit {SHARED_MEMORY_LIMIT[arch]} B")
        except Exception as error:  # report every failure, not just the first
            record.update(ok=False, shared=None, error=f"{type(error).__name__}: {error}"[:2000])
        results.append(record)
    return results


def compile_all(jobs: list[Job], processes: int | None = None) -> list[dict[str, Any]]:
    with ProcessPoolExecutor(max_workers=processes or os.cpu_count() or 1) as pool:
        return [r for batch in pool.map(compile_one, jobs) for r in batch]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every compile's record to this file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--module", help="only this module of dino_kernels, e.g. ema")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs real @triton.jit functions", file=sys.stderr)
        return 2
    jobs, uncovered = _jobs(args.module)
    results = compile_all(jobs, args.jobs)
    missing = undeclared_kernels(args.module) + uncovered
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "undeclared": missing}, f, indent=1)
    failures = [r for r in results if not r["ok"]]
    for r in failures:
        print(f"FAIL {r['kernel']} {r['arch']} {r['config']} {r['signature']}: {r['error']}")
    for name in missing:
        print(f"FAIL {name}" + ("" if ":" in name else ": Triton kernel not wrapped in a TritonKernel"))
    print(f"{len(results) - len(failures)} compiled, {len(failures)} failed, {len(missing)} undeclared")
    return 1 if failures or missing else 0


