"""The fused DINO loss against the official-style eager loss and the torch.compile'd eager loss.

Cases: DINO's multi-crop mix, 2 global + 10 local crops of B images per GPU, K ∈ {65,536, 131,072} prototypes, fp32
and bf16 logits (GPU); 2 + 6 crops of B = 32 images at K = 16,384 in fp32 (CPU). The GPU session set (``-m session``)
is B = 128 in bf16, fwd+bwd. Modes:

- ``fwd``: the training forward (the student logits require a gradient; ours computes and stores it here);
- ``fwd+bwd``: one training step of the loss, ``torch.autograd.grad(loss(...), student)``.

There is no backward-alone mode: ours computes the gradient in its forward, so its backward is a rescale by
grad_output (a no-op at 1) and timing it alone would compare nothing. ``fwd+bwd`` is the comparison that counts.

Bytes that the fused loss must move (the GB/s column, for every provider): the student logits read once, the
teacher logits read once and the gradient written once.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dino_kernels
from dino_kernels import reference

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
# name: (B, global crops, local crops, K, dtype, device); the CUDA cases skip where there is no GPU.
CASES = {"B=32 2+6 K=16k fp32": (32, 2, 6, 16_384, torch.float32, "cpu")}
CASES.update({f"B={b} 2+10 K={k // 1024}k {name}": (b, 2, 10, k, dtype, "cuda")
              for b in (32, 64, 128) for k in (65_536, 131_072)
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))})
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("reference", "compiled", "ours")
DRY_RUN_SHRINK = 256  # a dry run keeps the crops, uses B = 2 and K / 256 (still one shape per case)


def _params():
    for case, (batch, _, _, _, dtype, device) in CASES.items():
        session = device == "cuda" and batch == 128 and dtype == torch.bfloat16
        for mode in MODES:
            marks = [pytest.mark.session] if session and mode == "fwd+bwd" else []
            yield from (pytest.param(case, mode, provider, marks=marks) for provider in PROVIDERS)


@functools.cache
def _compiled():
    # One graph per shape (dynamic=False), compiled in measure()'s warm-up; conftest raises dynamo's recompile limit
    # (8 by default, fewer than our shapes) and makes hitting it an error, so no case silently times eager code.
    return torch.compile(reference.dino_loss, dynamic=False)


LOSSES = {"reference": lambda: reference.dino_loss, "compiled": _compiled, "ours": lambda: dino_kernels.dino_loss}


def _inputs(batch, n_global, n_local, k, dtype, device):
    # Logits of DINO's scale: the head's cosine similarities, in [-1, 1].
    student = (torch.rand((n_global + n_local) * batch, k, device=device) * 2 - 1).to(dtype).requires_grad_()
    teacher = (torch.rand(n_global * batch, k, device=device) * 2 - 1).to(dtype)
    center = torch.zeros(1, k, device=device)
    return student, teacher, center


def _bytes_moved(student: torch.Tensor, teacher: torch.Tensor) -> int:
    return 2 * student.numel() * student.element_size() + teacher.numel() * teacher.element_size()


def _step(loss_fn, mode, student, teacher, center):
    def loss():
        return loss_fn(student, teacher, center, n_global_crops=2, student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP)

    if mode == "fwd":
        return loss
    return lambda: torch.autograd.grad(loss(), student)


@pytest.mark.parametrize(("case", "mode", "provider"), list(_params()))
def test_dino_loss(benchmark, measure, bench_env, case, mode, provider):
    batch, n_global, n_local, k, dtype, device = CASES[case]
    device = bench_env.device(device)
    if bench_env.dry_run:
        batch, k = 2, k // DRY_RUN_SHRINK
    student, teacher, center = _inputs(batch, n_global, n_local, k, dtype, device)
    fn = _step(LOSSES[provider](), mode, student, teacher, center)
    measure(benchmark, fn, case=f"dino_loss {case} {mode}", provider=provider, device=device,
            bytes_moved=_bytes_moved(student, teacher))
