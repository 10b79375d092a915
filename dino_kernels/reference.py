"""Plain-PyTorch reference implementations: the ground truth for every op of dino_kernels.

Readable first, fast never. Tests compare the fused kernels with these (in float64), benchmarks time them as the
``reference`` provider, and ``dino_kernels.set_backend("reference")`` routes every public op here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


# --------------------------------------------------------------------------------------------- teacher EMA
@torch.no_grad()
def ema_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In place ``t <- m * t + (1 - m) * s`` for every pair, in fp32 math (fp64 for fp64 teachers).

    The student may have another floating dtype than the teacher (e.g. bf16 student, fp32 teacher).
    """
    for t, s in zip(teacher, student, strict=True):
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        t.copy_(momentum * t.to(acc) + (1.0 - momentum) * s.to(acc))
