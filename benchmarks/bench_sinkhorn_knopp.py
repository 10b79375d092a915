"""Sinkhorn-Knopp centering (DINOv2): ours against the official-style eager code and its torch.compile.

Cases: DINOv2's multi-crop mix, 2 global + 8 local crops of B = 128 images per GPU, K ∈ {65,536, 131,072}
prototypes, fp32 and bf16 logits (GPU); 2 + 4 crops of B = 16 images at K = 8,192 in fp32 (CPU). The GPU session
set (``-m session``) is the DINO loss with SK at K = 65,536 in bf16, fwd+bwd. Modes:

- ``sk``: the SK targets alone (``sinkhorn_knopp`` on the 2·B teacher rows, 3 iterations), materialised (N, K) fp32;
- ``fwd+bwd``: one training step of the DINO loss with SK centering, ``torch.autograd.grad(loss(...), student)``
  (ours never materialises the targets; the reference builds them, then the official loss).

Bytes that must move (the GB/s column, for every provider): ``sk``: the teacher read once and the targets written;
``fwd+bwd``: the student read once, the teacher read once and the gradient written.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dino_kernels
from dino_kernels import reference
from dino_kernels.sinkhorn_knopp import sinkhorn_knopp

STUDENT_TEMP, TEACHER_TEMP, SK_ITERATIONS = 0.1, 0.04, 3
# name: (B, global crops, local crops, K, dtype, device); the CUDA cases skip where there is no GPU.
CASES = {"B=16 2+4 K=8k fp32": (16, 2, 4, 8_192, torch.float32, "cpu")}
CASES.update({f"B=128 2+8 K={k // 1024}k {name}": (128, 2, 8, k, dtype, "cuda") for k in (65_536, 131_072)
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))})
MODES = ("sk", "fwd+bwd")
PROVIDERS = ("reference", "compiled", "ours")
SESSION_CASE, SESSION_MODE = "B=128 2+8 K=64k bf16", "fwd+bwd"
DRY_RUN_SHRINK = 256  # a dry run keeps the crops, uses B = 2 and K / 256 (still one shape per case)


def _params():
    for case in CASES:
        for mode in MODES:
            marks = [pytest.mark.session] if (case, mode) == (SESSION_CASE, SESSION_MODE) else []
            yield from (pytest.param(case, mode, provider, marks=marks) for provider in PROVIDERS)


def _reference_sk(teacher):
    return reference.sinkhorn_knopp(teacher, TEACHER_TEMP, SK_ITERATIONS)


def _reference_loss(student, teacher, center):
    return reference.dino_loss(student, teacher, center, student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP,
                               centering="sinkhorn_knopp", sk_iterations=SK_ITERATIONS)


def _ours_sk(teacher):
    return sinkhorn_knopp(teacher, TEACHER_TEMP, SK_ITERATIONS)


def _ours_loss(student, teacher, center):
    return dino_kernels.dino_loss(student, teacher, center, student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP,
                                  centering="sinkhorn_knopp", sk_iterations=SK_ITERATIONS)


@functools.cache
def _compiled(fn):
    # One graph per shape (dynamic=False), compiled in measure()'s warm-up (conftest makes a recompile-limit hit an
    # error, so no case silently times eager code).
    return torch.compile(fn, dynamic=False)


FUNCTIONS = {  # (sk, loss) per provider
    "reference": lambda: (_reference_sk, _reference_loss),
    "compiled": lambda: (_compiled(_reference_sk), _compiled(_reference_loss)),
    "ours": lambda: (_ours_sk, _ours_loss),
}


def _inputs(batch, n_global, n_local, k, dtype, device):
    # Logits of DINO's scale: the head's cosine similarities, in [-1, 1].
    student = (torch.rand((n_global + n_local) * batch, k, device=device) * 2 - 1).to(dtype).requires_grad_()
    teacher = (torch.rand(n_global * batch, k, device=device) * 2 - 1).to(dtype)
    center = torch.zeros(1, k, device=device)  # unused under SK centering
    return student, teacher, center


@pytest.mark.parametrize(("case", "mode", "provider"), list(_params()))
def test_sinkhorn_knopp(benchmark, measure, bench_env, case, mode, provider):
    batch, n_global, n_local, k, dtype, device = CASES[case]
    device = bench_env.device(device)
    if bench_env.dry_run:
        batch, k = 2, k // DRY_RUN_SHRINK
    student, teacher, center = _inputs(batch, n_global, n_local, k, dtype, device)
    sk_fn, loss_fn = FUNCTIONS[provider]()
    if mode == "sk":
        fn = functools.partial(sk_fn, teacher)
        bytes_moved = teacher.numel() * (teacher.element_size() + 4)
    else:
        fn = lambda: torch.autograd.grad(loss_fn(student, teacher, center), student)  # noqa: E731
        bytes_moved = 2 * student.numel() * student.element_size() + teacher.numel() * teacher.element_size()
    measure(benchmark, fn, case=f"sinkhorn_knopp {case} {mode}", provider=provider, device=device,
            bytes_moved=bytes_moved)
