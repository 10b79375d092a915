"""The fused DINO loss against the official-style eager loss and the torch.compile'd eager loss.

Cases: DINO's multi-crop mix, 2 global + 10 local crops of B images per GPU, K ∈ {65,536, 131,072} prototypes, fp32
and bf16 logits (GPU); 2 + 6 crops of B = 32 images at K = 16,384 in fp32 (CPU). Modes:

- ``fwd``: the training forward (the student logits require a gradient; ours computes and stores it here);
- ``bwd``: the backward alone, of a graph built once: ``torch.autograd.grad(loss, student, retain_graph=True)``
  for the eager and compiled loss. Ours stores its gradient in the forward and consumes it in place in the
  backward, so its graph cannot be run backward twice; its ``bwd`` times what that backward runs, the in-place
  rescale op with grad_output = 1 (a skipped launch on GPU, a host check on CPU);
- ``fwd+bwd``: one training step of the loss, ``torch.autograd.grad(loss(...), student)``.

Bytes that the fused loss must move (the GB/s column, for every provider): the student logits read once, the
teacher logits read once and the gradient written once; the backward with grad_output = 1 moves nothing.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dino_kernels
from dino_kernels import reference

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
# name: (B, global crops, local crops, K, dtype, device); the GPU cases where CUDA is available.
CASES = {"B=32 2+6 K=16k fp32": (32, 2, 6, 16_384, torch.float32, "cpu")}
if torch.cuda.is_available():
    CASES.update({f"B={b} 2+10 K={k // 1024}k {name}": (b, 2, 10, k, dtype, "cuda")
                  for b in (32, 64, 128) for k in (65_536, 131_072)
                  for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))})
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("reference", "compiled", "ours")


@functools.cache
def _compiled():
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
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(loss(), student)
    graph = loss()
    return lambda: torch.autograd.grad(graph, student, retain_graph=True)


def _ours_backward(student, teacher, center):
    """What the backward of dino_kernels.dino_loss runs: the in-place rescale of the stored gradient."""
    outputs = torch.ops.dino_kernels.dino_loss(student.detach(), teacher, center, 2, STUDENT_TEMP, TEACHER_TEMP, True)
    grad_output = torch.ones((), device=student.device)
    return lambda: torch.ops.dino_kernels.dino_loss_rescale_(outputs[1], grad_output, 1.0)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_dino_loss(benchmark, measure, case, mode, provider):
    batch, n_global, n_local, k, dtype, device = CASES[case]
    student, teacher, center = _inputs(batch, n_global, n_local, k, dtype, device)
    if provider == "ours" and mode == "bwd":
        fn = _ours_backward(student, teacher, center)
    else:
        fn = _step(LOSSES[provider](), mode, student, teacher, center)
    measure(benchmark, fn, case=f"dino_loss {case} {mode}", provider=provider, device=device,
            bytes_moved=None if mode == "bwd" else _bytes_moved(student, teacher))
