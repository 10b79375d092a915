"""The drop-in loss classes against the classes they replace, as a user's loop calls them (README, "Use in your own
training code").

- ``lightly DINOLoss``: ``lightly.loss.DINOLoss`` (provider ``lightly``) against
  ``dino_kernels.compat.lightly.DINOLoss`` (``ours``), one training step of the loss:
  ``criterion(teacher_out, student_out, epoch=...)`` and the gradient of every student view. Both update their center
  in the call, as they do in training.

main_dino.py's class is not a package: its swap, ``dino_kernels.compat.dino.DINOLoss``, runs the fused op that
``bench_dino_loss.py`` times against the official maths (provider ``reference``). The timm backbone's swap is
``bench_timm.py``; the EMA's, ``bench_ema.py``.

Cases: 2 global + 6 local views of B = 32 images, K = 16,384, fp32 (CPU: the same shape as bench_dino_loss's CPU
case); 2 + 10 views of B = 128, K = 65,536, fp32 (CUDA: lightly's class takes no bf16 logits with its fp32
center; not in the GPU session set, whose image has no lightly).
"""

from __future__ import annotations

import pytest
import torch

from dino_kernels.compat.lightly import DINOLoss

lightly_loss = pytest.importorskip("lightly.loss")

# name: (B, global views, local views, K, dtype, device); the CUDA case skips where there is no GPU.
CASES = {"B=32 2+6 K=16k fp32": (32, 2, 6, 16_384, torch.float32, "cpu"),
         "B=128 2+10 K=64k fp32": (128, 2, 10, 65_536, torch.float32, "cuda")}
PROVIDERS = {"lightly": lightly_loss.DINOLoss, "ours": DINOLoss}
DRY_RUN_SHRINK = 256  # a dry run keeps the views, uses B = 2 and K / 256


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", list(CASES))
def test_lightly_dino_loss(benchmark, measure, bench_env, case, provider):
    batch, n_global, n_local, k, dtype, device = CASES[case]
    device = bench_env.device(device)
    if bench_env.dry_run:
        batch, k = 2, k // DRY_RUN_SHRINK
    criterion = PROVIDERS[provider](output_dim=k, warmup_teacher_temp_epochs=10).to(device)
    # Logits of DINO's scale: the head's cosine similarities, in [-1, 1].
    student_out = [(torch.rand(batch, k, device=device) * 2 - 1).to(dtype).requires_grad_()
                   for _ in range(n_global + n_local)]
    teacher_out = [(torch.rand(batch, k, device=device) * 2 - 1).to(dtype) for _ in range(n_global)]

    def step():
        return torch.autograd.grad(criterion(teacher_out, student_out, epoch=3), student_out)

    views = n_global + n_local
    measure(benchmark, step, case=f"lightly DINOLoss {case} fwd+bwd", provider=provider, device=device,
            bytes_moved=(2 * views + n_global) * batch * k * student_out[0].element_size())
