"""Ahead-of-time compile harness for every Triton kernel, for GPUs we do not have.

Each module that defines Triton kernels declares them in a module-level ``AOT_KERNELS`` list of
:class:`AOTKernel`: the kernel, the signatures it is launched with (one per dtype variant) and the block configs
its launcher can pick (the launcher reads the same constants). Pointers and ``stride*`` arguments are compiled as
divisible by 16, the specialisation the JIT applies to aligned tensors at run time: it turns on software
pipelining, so that variant is the one whose shared memory must fit. ``python -m dino_kernels._aot`` compiles every
declared (signature, config) for sm_80 and sm_90 with ``triton.compile`` and a ``GPUTarget`` (no GPU needed) and
reports shared memory against each architecture's per-block limit. This catches lowering errors and
shared-memory overflows that the interpreter cannot see.

Kernels are named ``*_kernel``; the harness fails on one that a module forgot to declare. It must run without
``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions), so the tests call it in a subprocess.
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
from dataclasses import dataclass, field
from typing import Any

# Largest dynamic shared memory one block may use, in bytes (CUDA programming guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
TARGETS = (80, 90)
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class AOTKernel:
    """A Triton kernel with every signature and block config its launcher may use.

    ``signatures``: each maps every argument name to a Triton type ("*fp32", "i32", "fp32", ...) or
    "constexpr". ``configs``: each maps every constexpr argument to its value, plus optional ``num_warps`` and
    ``num_stages``.
    """

    kernel: Any
    signatures: tuple[dict[str, str], ...]
    configs: tuple[dict[str, Any], ...] = field(default_factory=lambda: ({},))

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


def kernel_modules() -> list[str]:
    import dino_kernels

    return [f"dino_kernels.{m.name}" for m in pkgutil.iter_modules(dino_kernels.__path__) if not m.name.startswith("_")]


def _jobs(only: str | None = None) -> list[tuple[str, int, int, int]]:
    """(module, kernel index, signature index, config index) for every declared compile."""
    jobs = []
    for module_name in kernel_modules():
        if only and module_name.rsplit(".", 1)[-1] != only:
            continue
        module = importlib.import_module(module_name)
        for k, spec in enumerate(getattr(module, "AOT_KERNELS", ())):
            for s, c in itertools.product(range(len(spec.signatures)), range(len(spec.configs))):
                jobs.append((module_name, k, s, c))
    return jobs


def undeclared_kernels() -> list[str]:
    """``*_kernel`` Triton functions that no ``AOT_KERNELS`` list declares."""
    from triton.runtime.jit import JITFunction

    missing = []
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        declared = {id(spec.kernel) for spec in getattr(module, "AOT_KERNELS", ())}
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and id(value) not in declared:
                missing.append(f"{module_name}.{name}")
    return missing


def _aligned_attrs(signature: dict[str, str]) -> dict[tuple[int], list[list]]:
    """Divisibility-by-16 hints for pointers and strides, as the JIT derives them from aligned tensors."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
            if kind.startswith("*") or (name.startswith("stride") and kind in ("i32", "i64"))}


def compile_one(job: tuple[str, int, int, int]) -> list[dict[str, Any]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, k, s, c = job
    spec = importlib.import_module(module_name).AOT_KERNELS[k]
    signature, config = spec.signatures[s], spec.configs[c]
    constexprs = {n: v for n, v in config.items() if n not in LAUNCH_OPTIONS}
    options = {n: v for n, v in config.items() if n in LAUNCH_OPTIONS}
    variants = [(signature, constexprs)]
    if s == 0 and c == 0:
        # The JIT turns every integer argument equal to 1 into a constant (a Python int inside the kernel, where
        # e.g. `n.to(tl.int64)` fails to compile): compile that specialisation too, once per kernel.
        ones = [n for n, kind in signature.items() if kind in ("i32", "i64")]
        variants.append(({n: "constexpr" if n in ones else kind for n, kind in signature.items()},
                         {**constexprs, **dict.fromkeys(ones, 1)}))
    results = []
    for (sig, consts), arch in itertools.product(variants, TARGETS):
        record = {"kernel": f"{module_name}.{spec.name}", "arch": f"sm_{arch}", "signature": sig,
                  "config": {**config, **{n: v for n, v in consts.items() if n not in constexprs}}}
        try:
            source = ASTSource(fn=spec.kernel, signature=sig, constexprs=consts, attrs=_aligned_attrs(sig))
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            shared = int(compiled.metadata.shared)
            record.update(ok=shared <= SHARED_MEMORY_LIMIT[arch], shared=shared,
                          error=None if shared <= SHARED_MEMORY_LIMIT[arch] else
                          f"shared memory {shared} B > sm_{arch} limit {SHARED_MEMORY_LIMIT[arch]} B")
        except Exception as error:  # report every failure, not just the first
            record.update(ok=False, shared=None, error=f"{type(error).__name__}: {error}"[:2000])
        results.append(record)
    return results


def compile_all(jobs: int | None = None, only: str | None = None) -> list[dict[str, Any]]:
    work = _jobs(only)
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return [r for batch in pool.map(compile_one, work) for r in batch]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every compile's record to this file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--module", help="only this module of dino_kernels, e.g. ema")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs real @triton.jit functions", file=sys.stderr)
        return 2
    results = compile_all(args.jobs, args.module)
    missing = undeclared_kernels()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "undeclared": missing}, f, indent=1)
    failures = [r for r in results if not r["ok"]]
    for r in failures:
        print(f"FAIL {r['kernel']} {r['arch']} {r['config']} {r['signature']}: {r['error']}")
    for name in missing:
        print(f"FAIL {name}: Triton kernel not declared in its module's AOT_KERNELS")
    print(f"{len(results) - len(failures)} compiled, {len(failures)} failed, {len(missing)} undeclared")
    return 1 if failures or missing else 0

