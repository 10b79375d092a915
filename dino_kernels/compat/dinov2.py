"""DINOv2's loss modules (``dinov2/loss``: ``DINOLoss``, ``iBOTPatchLoss``, ``KoLeoLoss``) on dino_kernels' ops.

A DINOv2 fork swaps one import line::

    from dino_kernels.compat.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss

and keeps its training loop: the same constructors, methods, arguments and results (the teacher targets as
probabilities, the losses as DINOv2 sums them, the center EMA applied lazily at the next ``*_center_teacher`` call
after an ``update_center``, all-reduced across ranks when ``torch.distributed`` is initialised). What runs:

- ``sinkhorn_knopp_teacher``: :func:`dino_kernels.sinkhorn_knopp` (no (K, N) working copies; never overflows where
  the official fp32 ``exp(t/τ)`` does).
- ``forward`` / ``forward_masked``: the fused cross-entropy of :func:`dino_kernels.ibot_patch_loss`, whose gradient
  is made in the forward; no fp32 ``log_softmax`` of the student is materialised. The teacher probabilities of a
  student chunk are summed over the teacher chunks first, so each student chunk is read once whatever the number of
  teacher chunks.
- ``KoLeoLoss``: :func:`dino_kernels.koleo_loss` (no B × B Gram matrix; fp32 math for half inputs).

Differences, all deliberate: the losses are fp32 (fp64 for fp64 inputs) whatever the input dtype (DINOv2 computes
KoLeo in the input dtype, where fp16 duplicates or B = 1 give inf); ``iBOTPatchLoss.sinkhorn_knopp_teacher``
leaves ``n_masked_patches_tensor`` alone (DINOv2 all-reduces the caller's tensor in place, even without a process
group, which fails in a single process; the count cancels in the iterations).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dino_kernels.ibot_patch_loss import ibot_patch_loss
from dino_kernels.koleo import koleo_loss
from dino_kernels.sinkhorn_knopp import sinkhorn_knopp

_TINY = torch.finfo(torch.float32).tiny


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _cross_entropy_sum(student: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | float,
                       student_temp: float, n_targets: int = 1) -> torch.Tensor:
    """``Σ_r w_r · (−Σ_k targets_rk · log softmax(student_r / τs)_k)`` for (R, K) targets that are each the sum of
    ``n_targets`` probability rows (so that every row sums to T = n_targets), on the fused iBOT kernel.

    The kernel takes teacher logits and applies softmax((t − c)/τt): with t = log(targets), c = 0, τt = 1 it rebuilds
    targets / T (renormalised: rows that sum to T only up to rounding give the same loss to rounding), so each row's
    weight is scaled by T. Zero probabilities are raised to the smallest normal float first (a change below 1e-33 of
    the loss), so that the logarithm stays finite.
    """
    log_targets = torch.log(targets.to(torch.float64 if targets.dtype == torch.float64 else torch.float32)
                            .clamp_min(_TINY))
    if isinstance(row_weight, float):
        row_weight = torch.full((student.shape[0],), row_weight, dtype=torch.float32, device=student.device)
    center = log_targets.new_zeros(log_targets.shape[-1])
    return ibot_patch_loss(student, log_targets, center, row_weight * n_targets, n_images=1, student_temp=student_temp,
                           teacher_temp=1.0)


class _LazyCenter(nn.Module):
    """DINOv2's center EMA: ``update_center`` starts the (async) all-reduce of the batch sum, the next
    ``apply_center_update`` waits for it and moves ``center``."""

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_output: int | None = None
        self.async_batch_center: torch.Tensor | None = None

    def _start_center_update(self, batch_sum: torch.Tensor, count: int) -> None:
        self.updated = False
        self.len_teacher_output = count
        self.async_batch_center = batch_sum
        if _distributed():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        if self.updated is False:
            world_size = dist.get_world_size() if _distributed() else 1
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            batch_center = self.async_batch_center / (self.len_teacher_output * world_size)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            self.updated = True


class DINOLoss(_LazyCenter):
    """DINOv2's ``DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)``: the CLS-token DINO loss with a (1, K)
    center buffer."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t − center)/τt) over the last dim, after applying a pending center update."""
        self.apply_center_update()
        return torch.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        """(N, K) Sinkhorn-Knopp targets of the (N, K) teacher logits (rows sum to 1), fp32, across ranks."""
        return sinkhorn_knopp(teacher_output.float(), teacher_temp, n_iterations)

    def forward(self, student_output_list: Sequence[torch.Tensor],
                teacher_out_softmaxed_centered_list: Iterable[torch.Tensor]) -> torch.Tensor:
        """−Σ_s Σ_t mean_b Σ_k t_bk · log softmax(s_b/τs)_k over every (student chunk, teacher chunk) pair: the sum
        DINOv2's training step then divides by its number of loss terms. Chunks are (B, K); the teacher argument may
        be a list or a (T, B, K) tensor."""
        teachers = list(teacher_out_softmaxed_centered_list)
        target_sum = torch.stack([t.float() for t in teachers]).sum(0) if len(teachers) > 1 else teachers[0]
        total = 0
        for s in student_output_list:
            if s.shape != target_sum.shape:
                raise ValueError(f"student_output_list has a chunk of shape {tuple(s.shape)} but the teacher chunks "
                                 f"are {tuple(target_sum.shape)}")
            total = total + _cross_entropy_sum(s, target_sum, 1.0 / s.shape[0], self.student_temp, len(teachers))
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Start the center update from the (N, K) raw teacher logits; applied at the next
        ``softmax_center_teacher``."""
        self._start_center_update(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))


class iBOTPatchLoss(_LazyCenter):  # noqa: N801 - DINOv2's name
    """DINOv2's ``iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)``: the masked-patch loss with
    a (1, 1, K) center buffer."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @property
    def len_teacher_patch_tokens(self) -> int | None:
        """DINOv2's name for the row count of the pending center update."""
        return self.len_teacher_output

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t − center)/τt) over the last dim, after applying a pending center update."""
        self.apply_center_update()
        self.center = self.center.to(device=teacher_patch_tokens.device)
        return torch.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor: torch.Tensor, n_iterations: int = 3) -> torch.Tensor:
        """(M, K) Sinkhorn-Knopp targets of the masked patches' teacher logits, across ranks. DINOv2 sums
        ``n_masked_patches_tensor`` over the ranks for its global sample count, a factor that cancels in the
        iterations: the targets do not depend on it, so it is neither read nor all-reduced here (no host sync)."""
        return sinkhorn_knopp(teacher_output.float(), teacher_temp, n_iterations)

    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor,
                student_masks_flat: torch.Tensor) -> torch.Tensor:
        """(B, N, K) student logits and teacher probabilities, (B, N) bool masks: −mean_b of each image's mean over
        its masked patches of Σ_k t · log softmax(s/τs) (an image without masked patch counts as 0)."""
        masks = student_masks_flat.bool()
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        rows = masks.flatten()
        student = student_patch_tokens.flatten(0, 1)[rows]
        targets = teacher_patch_tokens.flatten(0, 1)[rows]
        return _cross_entropy_sum(student, targets, weights.float() / masks.shape[0], self.student_temp)

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor, n_masked_patches: int | None = None,
                       masks_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss over the first ``n_masked_patches`` rows (all when None) of the (M, K) masked patches, each
        weighted by ``masks_weight`` (default 1 / its image's masked-patch count), summed and divided by the number
        of images B of the (B, N) masks."""
        if masks_weight is None:
            masks = student_masks_flat.bool()
            masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        rows = len(masks_weight) if n_masked_patches is None else n_masked_patches
        student, targets = student_patch_tokens_masked[:rows], teacher_patch_tokens_masked[:rows]
        weights = masks_weight[:rows].float() / student_masks_flat.shape[0]
        return _cross_entropy_sum(student, targets, weights, self.student_temp)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Start the center update from the raw teacher patch logits as DINOv2 passes them, (1, M, K): the batch
        center is their mean over dim 1, summed over dim 0; applied at the next ``softmax_center_teacher``."""
        self._start_center_update(torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True),
                                  len(teacher_patch_tokens))


class KoLeoLoss(nn.Module):
    """DINOv2's ``KoLeoLoss()``: the Kozachenko-Leonenko regulariser of a (B, D) batch, on :func:`koleo_loss`."""

    def __init__(self) -> None:
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - DINOv2's name
        """(B,) index of each L2-normalised row's nearest other row (largest dot product; itself when B = 1)."""
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        return dots.argmax(dim=1)

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """−mean_i log(‖z_i − z_nn(i) + 1e-8‖ + eps) of the (B, D) features, z = x / max(‖x‖, eps): 0-d, fp32
        (fp64 for fp64 input)."""
        return koleo_loss(student_output, eps=eps)
