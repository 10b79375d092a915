"""The official DINO loss class (facebookresearch/dino ``main_dino.py``: ``DINOLoss``) on dino_kernels' fused op.

A DINO v1 fork deletes its ``class DINOLoss`` and imports this one instead::

    from dino_kernels.compat.dino import DINOLoss

keeping its constructor call ``DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
warmup_teacher_temp_epochs, nepochs, student_temp, center_momentum)`` and ``dino_loss(student_output,
teacher_output, epoch)``. Its teacher EMA loop becomes :func:`dino_kernels.ema_` (see its docstring).
"""

from __future__ import annotations

import numpy as np
import torch

from dino_kernels._validation import check_int, check_tensor
from dino_kernels.dino_loss import DINOLoss as FusedDINOLoss
from dino_kernels.dino_loss import update_center_


class DINOLoss(FusedDINOLoss):
    """main_dino.py's ``DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
    nepochs, student_temp=0.1, center_momentum=0.9)``: 2 global crops (the teacher output is split in 2, as the
    original's ``chunk(2)``) and ``ncrops - 2`` local crops.

    Kept from the original, for forks that read or set them: ``student_temp``, ``center_momentum``, ``ncrops``,
    ``teacher_temp_schedule`` (the same numpy array, one temperature per epoch), the ``center`` buffer (1, out_dim)
    (the only state_dict key, as in the original) and ``update_center(teacher_output)``.

    What differs, deliberately: the loss, its gradient and the batch center come from one fused pass (no
    ``log_softmax`` / ``softmax`` tensors of the batch); the center update is all-reduced only when
    ``torch.distributed`` is initialised (the original calls ``dist.all_reduce`` unconditionally and fails in a
    single process); bad shapes or epochs raise a ValueError instead of chunking unevenly or indexing past the
    schedule; the center keeps its dtype (update in place).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        if check_int("ncrops", ncrops) < 2:
            raise ValueError(f"ncrops must be >= 2 (the 2 global crops, then the local crops); got {ncrops}")
        super().__init__(out_dim, 2, ncrops - 2, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                         nepochs, student_temp, center_momentum)
        # The original's numpy array (same values: the schedule function is the original's expression).
        self.teacher_temp_schedule = np.asarray(self.teacher_temp_schedule, dtype=np.float64)

    @property
    def ncrops(self) -> int:
        """The total number of crops (2 global + local), the original's attribute."""
        return self.n_crops

    @ncrops.setter
    def ncrops(self, value: int) -> None:
        self.n_crops = value

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss of the (ncrops·B, K) student and (2·B, K) teacher logits at ``epoch``, crop-major as main_dino.py
        concatenates them; then the center update, from the teacher mean of the same fused pass (``forward`` does
        not call ``update_center``). Returns the 0-d loss (fp32; fp64 for fp64 inputs)."""
        out_dim = self.center.shape[-1]
        for name, logits in (("student_output", student_output), ("teacher_output", teacher_output)):
            check_tensor(name, logits)
            if logits.dim() != 2 or logits.shape[1] != out_dim:
                raise ValueError(f"{name} must be 2-d logits (rows, out_dim={out_dim}); got shape "
                                 f"{tuple(logits.shape)}")
        if teacher_output.shape[0] % 2:
            raise ValueError(f"teacher_output must hold the 2 global crops, (2·B, K); got {teacher_output.shape[0]} "
                             "rows")
        return super().forward(student_output, teacher_output, epoch)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """``center <- center_momentum * center + (1 - center_momentum) * mean of the (N, K) teacher logits``
        (averaged over the ranks when ``torch.distributed`` is initialised), in place."""
        check_tensor("teacher_output", teacher_output)
        update_center_(self.center, teacher_output, self.center_momentum)
