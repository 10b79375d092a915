"""lightly's DINO loss class (``lightly.loss.DINOLoss``, lightly 1.6) on dino_kernels' fused op.

A lightly pipeline swaps one import line::

    from dino_kernels.compat.lightly import DINOLoss  # was: from lightly.loss import DINOLoss

and keeps ``criterion = DINOLoss(output_dim=...)`` and ``criterion(teacher_out, student_out, epoch=epoch)`` (or
``teacher_temp=...``). lightly's ``update_momentum(student, teacher, m)`` becomes
``dino_kernels.ema_(teacher.parameters(), student.parameters(), m)`` (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dino_kernels._validation import check_int, check_ndim, check_positive, check_tensor, check_unit_interval
from dino_kernels.dino_loss import dino_loss, update_center_

CENTER_MODES = ("mean",)  # lightly 1.6's modes (lightly.models.modules.center.CENTER_MODE_TO_FUNCTION)


def _fp32(value: float) -> float:
    """The value lightly divides by: it wraps a float temperature in ``torch.tensor``, i.e. rounds it to fp32."""
    return float(torch.tensor(value, dtype=torch.float32))


class DINOLoss(nn.Module):
    """lightly's ``DINOLoss(output_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.04,
    warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9, center_mode="mean")``.

    Same attributes as lightly's (``teacher_temp``, ``student_temp``, ``center_momentum``,
    ``warmup_teacher_temp_epochs``, ``teacher_temp_schedule`` as the same fp32 ``torch.linspace``), the same
    ``center`` buffer (1, 1, output_dim) and so the same state_dict; ``update_center(teacher_out)`` takes the stacked
    (views, B, output_dim) teacher output as lightly's does.

    The teacher temperature of a call, as lightly picks it: ``teacher_temp`` when given; else, with ``epoch``,
    ``teacher_temp_schedule[epoch]`` during the warm-up and ``self.teacher_temp`` after it; else
    ``self.teacher_temp`` — each rounded to fp32, as lightly's ``torch.tensor(...)`` does.

    What differs, deliberately: loss, gradient and batch center come from one fused pass (no stacked copies of
    the softmax / log_softmax, no (views, views) einsum); no gradient flows to the teacher outputs (lightly does
    not detach them; DINO's teacher runs without gradient anyway); the center is updated in place and keeps its
    dtype (lightly's assignment promotes an fp32 center to fp64 after an fp64 teacher batch); more teacher views
    than student views, which lightly allows, is refused (DINO's teacher views are the first student views).
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean") -> None:
        super().__init__()
        check_int("output_dim", output_dim)
        check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs)
        if output_dim < 1 or warmup_teacher_temp_epochs < 0:
            raise ValueError(f"need output_dim >= 1 and warmup_teacher_temp_epochs >= 0; got output_dim={output_dim}, "
                             f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs}")
        for name, value in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp),
                            ("student_temp", student_temp)):
            check_positive(name, value)
        check_unit_interval("center_momentum", center_momentum)
        if center_mode not in CENTER_MODES:
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are {sorted(CENTER_MODES)}.")
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(start=warmup_teacher_temp, end=teacher_temp,
                                                    steps=warmup_teacher_temp_epochs)

    def _teacher_temperature(self, teacher_temp: float | None, epoch: int | None) -> float:
        if teacher_temp is not None:
            check_positive("teacher_temp", teacher_temp)
            return _fp32(teacher_temp)
        if epoch is not None:
            if check_int("epoch", epoch) < 0:
                raise ValueError(f"epoch must be >= 0; got {epoch}")
            if epoch < self.warmup_teacher_temp_epochs:
                return float(self.teacher_temp_schedule[epoch])  # fp32 values already
        return _fp32(self.teacher_temp)

    def forward(self, teacher_out: Sequence[torch.Tensor], student_out: Sequence[torch.Tensor],
                teacher_temp: float | None = None, epoch: int | None = None) -> torch.Tensor:
        """The mean cross-entropy over every (teacher view t, student view s ≠ t) pair and image, then the center
        update from this batch's teacher views.

        Args:
            teacher_out: T tensors (B, output_dim), one per teacher (global) view.
            student_out: S >= T tensors (B, output_dim), the T teacher views first, in the same order.
            teacher_temp: the teacher temperature of this call (overrides the schedule).
            epoch: picks the warm-up temperature when ``teacher_temp`` is None.

        Returns:
            The 0-d loss (fp32; fp64 for fp64 inputs), differentiable w.r.t. every student view.
        """
        temperature = self._teacher_temperature(teacher_temp, epoch)
        teachers, students = list(teacher_out), list(student_out)
        if not teachers or len(students) < max(len(teachers), 2):
            raise ValueError(f"DINOLoss needs at least 1 teacher view and at least as many student views (2 or more: "
                             f"the same view index is not compared); got {len(teachers)} teacher view(s) and "
                             f"{len(students)} student view(s)")
        check_ndim("teacher_out[0]", check_tensor("teacher_out[0]", teachers[0]), 2, "(B, output_dim)")
        expected = (teachers[0].shape[0], self.center.shape[-1])
        for name, views in (("teacher_out", teachers), ("student_out", students)):
            for i, view in enumerate(views):
                check_tensor(f"{name}[{i}]", view)
                if view.dim() != 2 or view.shape != expected:
                    raise ValueError(f"{name}[{i}] must have shape (B, output_dim) = {expected} (B of "
                                     f"teacher_out[0]); got {tuple(view.shape)}")
        teacher_logits = teachers[0] if len(teachers) == 1 else torch.cat(teachers)
        loss, stats = dino_loss(torch.cat(students), teacher_logits, self.center.view(-1),
                                n_global_crops=len(teachers), student_temp=self.student_temp,
                                teacher_temp=temperature, return_stats=True)
        update_center_(self.center.view(-1), stats.teacher_mean, self.center_momentum)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``center <- center_momentum * center + (1 - center_momentum) * mean over views and images`` of the
        (views, B, output_dim) teacher output (averaged over the ranks when ``torch.distributed`` is initialised)."""
        check_tensor("teacher_out", teacher_out)
        if teacher_out.dim() != 3 or teacher_out.shape[-1] != self.center.shape[-1]:
            raise ValueError(f"teacher_out must be (views, B, {self.center.shape[-1]}); got "
                             f"{tuple(teacher_out.shape)}")
        update_center_(self.center.view(-1), teacher_out.reshape(-1, teacher_out.shape[-1]), self.center_momentum)
