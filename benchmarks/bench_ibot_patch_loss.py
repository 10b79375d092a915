"""The fused iBOT masked-patch loss against the official-style eager loss and the torch.compile'd eager loss.

Cases: DINOv2's masked patches, M = 0.4 × 2B × 256 (2B global crops of 256 patches, 40 % of them masked) of B images
per GPU, K = 65,536 prototypes, fp32 and bf16 logits, softmax centering, plus one Sinkhorn-Knopp case (GPU);
M = 512 patches of B = 4 images at K = 16,384 in fp32 (CPU). The GPU session set (``-m session``) is B = 128 in
bf16. One mode, ``fwd+bwd``: ``torch.autograd.grad(loss(...), student)``, one training step of the loss. Ours
computes the gradient in its forward and its backward is a rescale by grad_output (a no-op at 1), so timing either
half alone would compare nothing.

Bytes that the fused loss must move (the GB/s column, for every provider): the student and teacher logits read once
and the gradient written once.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dino_kernels import reference
from dino_kernels.ibot_patch_loss import ibot_patch_loss

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.07
PATCHES, MASKED = 256, 0.4
# name: (B, K, centering, dtype, device); M = MASKED × 2B × PATCHES except on the CPU. CUDA cases skip without a GPU.
CASES = {"B=4 M=512 K=16k fp32": (4, 16_384, "softmax", torch.float32, "cpu")}
CASES.update({f"B={b} M={round(MASKED * 2 * b * PATCHES)} K=64k {name}": (b, 65_536, "softmax", dtype, "cuda")
              for b in (64, 128) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))})
CASES["B=128 M=26214 K=64k bf16 sinkhorn-knopp"] = (128, 65_536, "sinkhorn_knopp", torch.bfloat16, "cuda")
SESSION = "B=128 M=26214 K=64k bf16"
PROVIDERS = ("reference", "compiled", "ours")
DRY_RUN_ROWS, DRY_RUN_SHRINK = 40, 256  # a dry run uses M = 40 rows of 2 images and K / 256


def _params():
    for case in CASES:
        marks = [pytest.mark.session] if case == SESSION else []
        yield from (pytest.param(case, provider, marks=marks) for provider in PROVIDERS)


@functools.cache
def _compiled():
    # One graph per shape (dynamic=False), compiled in measure()'s warm-up; conftest raises dynamo's recompile limit
    # and makes hitting it an error, so no case silently times eager code.
    return torch.compile(reference.ibot_patch_loss, dynamic=False)


LOSSES = {"reference": lambda: reference.ibot_patch_loss, "compiled": _compiled, "ours": lambda: ibot_patch_loss}


def _inputs(n_rows, n_images, k, dtype, device):
    # Logits of DINOv2's scale (the head's cosines, in [-1, 1]); weights 1/|M_n| with the rows spread evenly.
    student = (torch.rand(n_rows, k, device=device) * 2 - 1).to(dtype).requires_grad_()
    teacher = (torch.rand(n_rows, k, device=device) * 2 - 1).to(dtype)
    center = torch.zeros(1, k, device=device)
    image = torch.arange(n_rows, device=device) % n_images
    weights = 1.0 / torch.bincount(image, minlength=n_images).clamp(min=1)[image].float()
    return student, teacher, center, weights


@pytest.mark.parametrize(("case", "provider"), list(_params()))
def test_ibot_patch_loss(benchmark, measure, bench_env, case, provider):
    batch, k, centering, dtype, device = CASES[case]
    device = bench_env.device(device)
    n_rows, n_images = (512 if device == "cpu" else round(MASKED * 2 * batch * PATCHES)), 2 * batch
    if bench_env.dry_run:
        n_rows, n_images, k = DRY_RUN_ROWS, 4, k // DRY_RUN_SHRINK
    student, teacher, center, weights = _inputs(n_rows, n_images, k, dtype, device)
    loss_fn = LOSSES[provider]()

    def step():
        loss = loss_fn(student, teacher, center, weights, n_images=n_images, student_temp=STUDENT_TEMP,
                       teacher_temp=TEACHER_TEMP, centering=centering)
        return torch.autograd.grad(loss, student)

    measure(benchmark, step, case=f"ibot_patch_loss {case} fwd+bwd", provider=provider, device=device,
            bytes_moved=3 * student.numel() * student.element_size())
