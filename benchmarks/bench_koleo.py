"""The fused KoLeo loss against DINOv2's eager formula (``reference.koleo_loss``) and the torch.compile'd formula.

Cases: one global-crop chunk of B CLS features of width D (ViT-S/B/L/g: 384, 768, 1024, 1536), B = 128 to 1024,
fp32 and bf16 features (GPU); B = 256, D = 384 in fp32 (CPU). One training step of the term, fwd+bwd:
``torch.autograd.grad(koleo_loss(x), x)``; the neighbour search dominates (2·B²·D flops, the TFLOP/s column). The
eager formula materialises the B × B Gram matrix (and its autograd keeps z), ours never does: the peak-memory column
shows it. The GPU session set (``-m session``) is B = 1024, D = 1536 in bf16.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dino_kernels import reference
from dino_kernels.koleo import koleo_loss

# name: (B, D, dtype, device); the CUDA cases skip where there is no GPU.
CASES = {"B=256 D=384 fp32": (256, 384, torch.float32, "cpu")}
CASES.update({f"B={b} D={d} {name}": (b, d, dtype, "cuda")
              for b, d in ((128, 384), (128, 1536), (512, 768), (1024, 384), (1024, 1536))
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))})
SESSION_CASE = "B=1024 D=1536 bf16"
PROVIDERS = ("reference", "compiled", "ours")
DRY_RUN_SHAPE = (8, 16)  # a dry run keeps the dtype, with B = 8 and D = 16


def _params():
    for case in CASES:
        marks = [pytest.mark.session] if case == SESSION_CASE else []
        yield from (pytest.param(case, provider, marks=marks) for provider in PROVIDERS)


@functools.cache
def _compiled():
    # One graph per shape (dynamic=False), compiled in measure()'s warm-up (conftest makes a recompile-limit hit an
    # error, so no case silently times eager code).
    return torch.compile(reference.koleo_loss, dynamic=False)


LOSSES = {"reference": lambda: reference.koleo_loss, "compiled": _compiled, "ours": lambda: koleo_loss}


@pytest.mark.parametrize(("case", "provider"), list(_params()))
def test_koleo(benchmark, measure, bench_env, case, provider):
    batch, dim, dtype, device = CASES[case]
    device = bench_env.device(device)
    if bench_env.dry_run:
        batch, dim = DRY_RUN_SHAPE
    features = torch.randn(batch, dim, device=device).to(dtype).requires_grad_()
    loss_fn = LOSSES[provider]()
    measure(benchmark, lambda: torch.autograd.grad(loss_fn(features), features), case=f"koleo {case} fwd+bwd",
            provider=provider, device=device, flops=2.0 * batch * batch * dim)
