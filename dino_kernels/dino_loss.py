"""Fused DINO loss: softmax-centred teacher targets, cross-entropy over every (teacher crop, student crop) pair, its
gradient, the center update and the collapse statistics.

Rows are crop-major: ``student_logits`` is (S·B, K) with crop v of image b at row v·B + b, the first
``n_global_crops`` crops being the global crops in the teacher's order; ``teacher_logits`` is (G·B, K). The official
code (facebookresearch/dino ``DINOLoss``) materialises fp32 ``log_softmax`` and ``softmax`` tensors of the whole batch
and a product per crop pair. Here nothing of size (rows, K) is written except the gradient, by two passes:

1. Teacher pass: for every teacher row the max, the normaliser and the entropy of p = softmax((t − c)/τt), and the
   batch mean of the raw teacher logits (what the center update needs), from one read of the teacher.
2. Student pass, one program per student row (v, b). Its target is q = Σ_{i≠v} p_i,b with |q| = #{i ≠ v}
   teacher crops, so the row's loss is |q|·LSE(s/τs) − q·s/τs and its gradient (|q|·softmax(s/τs) − q)/(τs·B·P),
   P = G·(S − 1) the number of pairs. Both come from the same sweep over the row (online max and sum over column
   blocks, so K up to 262,144 and beyond works); the gradient is stored in the forward and the backward only rescales
   it by grad_output, skipping even that when grad_output is 1 (Liger-Kernel's cross-entropy trick).

With ``centering="sinkhorn_knopp"`` (DINOv2) the targets are the Sinkhorn-Knopp targets of all G·B teacher rows
together: :mod:`dino_kernels.sinkhorn_knopp` computes their scalings in the form of the softmax teacher (a column
shift in the center's place, a row max and an inverse normaliser per row, and each row's entropy), which replaces
the teacher pass, and the same student pass rebuilds the targets from them. The teacher mean is still that of the raw
logits (from SK's first column pass).

Implementations: Triton (GPU, and CPU under ``TRITON_INTERPRET=1``), C++ CPU (``csrc/dino_loss.cpp``: parallel over
images, vectorised loops), and the official-style eager loss in :mod:`dino_kernels.reference`.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import nn

from dino_kernels import reference
from dino_kernels._backend import TRITON_DTYPES, accumulation_dtype, get_backend, resolve
from dino_kernels._extension import ops
from dino_kernels._launch import TritonKernel, cdiv
from dino_kernels._op import KernelOp, tracing
from dino_kernels._validation import (
    FLOAT_DTYPES,
    check_floating,
    check_int,
    check_ndim,
    check_positive,
    check_same_device,
    check_tensor,
    check_unit_interval,
)
from dino_kernels.sinkhorn_knopp import TeacherTargets, check_count, compute_targets

# fp16 cannot hold the gradient itself: entries of (|q| softmax − q)/(τs·B·P) fall below its subnormal range at
# DINO's sizes, while after a GradScaler's grad_output they would be representable. fp16 gradients are therefore
# stored as (|q| softmax − q)·2^e, the largest power of two that keeps |q| softmax − q (at most G in magnitude)
# finite, and the backward multiplies by grad_output / (2^e·τs·B·P).
_FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _dino_teacher_stats_kernel(
    teacher_ptr,  # (n_rows, n_cols) raw teacher logits
    center_ptr,  # (n_cols,) fp32
    partial_max64_ptr,  # fp64 (n_rows, n_slices): max of u per (row, column slice), u formed in fp64
    partial_ptr,  # fp32 (5, n_rows, n_slices): see the stores below
    mean_ptr,  # fp32 (n_cols,): column means of the raw logits
    n_rows,
    n_cols,
    n_slices,
    inv_teacher_temp,  # 1/τt rounded to fp32
    inv_teacher_temp_lo,  # 1/τt − inv_teacher_temp, so that the fp64 u below gets 1/τt to fp64 precision
    inv_rows,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    slice_id = tl.program_id(0)
    cols = slice_id * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < n_cols
    center = tl.load(center_ptr + cols, mask=col_mask, other=0.0)
    col_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    plane = tl.cast(n_rows, tl.int64) * n_slices  # tl.cast: the JIT passes n_rows = 1 as a plain int
    for row_start in range(0, n_rows, BLOCK_ROWS):
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        t = tl.load(teacher_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        col_sum += tl.sum(t, axis=0)

        # 1. Max and normaliser of u = (t − c)/τt in fp32, computed as the student pass recomputes u, so that the
        # probabilities it rebuilds from them sum to 1. Every slice has a valid column, so the max is finite on
        # valid rows; rows past the end get 0 so that u − max stays -inf there rather than NaN.
        u = tl.where(mask, (t - center[None, :]) * inv_teacher_temp, float("-inf"))
        m = tl.where(row_mask, tl.max(u, axis=1), 0.0)
        z = tl.sum(tl.exp(u - m[:, None]), axis=1)

        # 2. The entropy log z − Σ e·(u − max)/z, two terms >= 0, needs more care for a sharp teacher (|u| up to ~100
        # at τt = 0.04, entropy -> 0): u is formed in fp64, where (t − c)·(1/τt) is exact for fp32 operands, and
        # only u − max goes to fp32; z = 1 + tiny there, so it is kept as (count of columns at the max, where
        # e = 1) + (the rest) and the finalize kernel takes log z = log(count) + log(1 + rest/count).
        d64 = t.to(tl.float64) - center.to(tl.float64)[None, :]
        u64 = tl.where(mask, d64 * inv_teacher_temp + d64 * inv_teacher_temp_lo, float("-inf"))
        m64 = tl.where(row_mask, tl.max(u64, axis=1), 0.0)
        shifted64 = u64 - m64[:, None]
        shifted = shifted64.to(tl.float32)
        e = tl.exp(shifted)
        at_max = mask & (u64 == m64[:, None])  # not shifted64 == 0: u64 − m64 may be fused into an FMA
        count = tl.sum(at_max.to(tl.float32), axis=1)
        rest = tl.sum(tl.where(at_max, 0.0, e), axis=1)
        w = tl.sum(e * tl.where(mask, shifted, 0.0), axis=1)

        out = rows.to(tl.int64) * n_slices + slice_id
        tl.store(partial_max64_ptr + out, m64, mask=row_mask)
        tl.store(partial_ptr + out, m, mask=row_mask)
        tl.store(partial_ptr + plane + out, z, mask=row_mask)
        tl.store(partial_ptr + 2 * plane + out, count, mask=row_mask)
        tl.store(partial_ptr + 3 * plane + out, rest, mask=row_mask)
        tl.store(partial_ptr + 4 * plane + out, w, mask=row_mask)
    tl.store(mean_ptr + cols, col_sum * inv_rows, mask=col_mask)


# One program per BLOCK_K columns, walking down the rows BLOCK_ROWS at a time. Column slices (rather than one program
# per row) give the batch mean without atomics and a deterministic result; 128 columns make K / 128 >= 512 programs
# at DINO's K = 65,536, enough to fill an H100. 4 elements per thread: the fp64 entropy path is register-hungry
# (ptxas: 80 registers, no spills, on sm_80 and sm_90), and fewer registers let more programs share an SM.
TEACHER_STATS = TritonKernel(_dino_teacher_stats_kernel, {"BLOCK_ROWS": 8, "BLOCK_K": 128, "num_warps": 8})


@triton.jit
def _dino_teacher_finalize_kernel(
    partial_max64_ptr,  # fp64 (n_rows, n_slices) from the teacher pass
    partial_ptr,  # fp32 (5, n_rows, n_slices) from the teacher pass
    max_ptr,  # fp32 (n_rows,): max_k u_k, u = (t − c)/τt in fp32
    inv_norm_ptr,  # fp32 (n_rows,): 1 / Σ_k exp(u_k − max)
    entropy_ptr,  # fp32 (n_rows,)
    n_rows,
    n_slices,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    plane = tl.cast(n_rows, tl.int64) * n_slices  # tl.cast: the JIT passes n_rows = 1 as a plain int
    base = row.to(tl.int64) * n_slices
    m = float("-inf")
    m64 = tl.full((), float("-inf"), tl.float64)
    for start in range(0, n_slices, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_slices
        m = tl.maximum(m, tl.max(tl.load(partial_ptr + base + idx, mask=mask, other=float("-inf"))))
        m64 = tl.maximum(m64, tl.max(tl.load(partial_max64_ptr + base + idx, mask=mask, other=float("-inf"))))
    z = 0.0
    count = 0.0
    rest = 0.0
    w = 0.0
    for start in range(0, n_slices, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_slices
        # Each slice is re-based from its own max m_j to the row max: e -> e·exp(m_j − m) and
        # (u − m_j) -> (u − m_j) + (m_j − m).
        m_j = tl.load(partial_ptr + base + idx, mask=mask, other=0.0)
        z_j = tl.load(partial_ptr + plane + base + idx, mask=mask, other=0.0)
        z += tl.sum(tl.where(mask, tl.exp(m_j - m), 0.0) * z_j)
        m64_j = tl.load(partial_max64_ptr + base + idx, mask=mask, other=0.0)
        count_j = tl.load(partial_ptr + 2 * plane + base + idx, mask=mask, other=0.0)
        rest_j = tl.load(partial_ptr + 3 * plane + base + idx, mask=mask, other=0.0)
        w_j = tl.load(partial_ptr + 4 * plane + base + idx, mask=mask, other=0.0)
        delta = tl.where(mask, m64_j - m64, 0.0).to(tl.float32)
        scale = tl.where(mask, tl.exp(delta), 0.0)
        top = mask & (m64_j == m64)  # slices below the row max hold no column at it: all of theirs is rest
        count += tl.sum(tl.where(top, count_j, 0.0))
        rest += tl.sum(tl.where(top, rest_j, scale * (count_j + rest_j)))
        w += tl.sum(scale * (w_j + delta * (count_j + rest_j)))
    tl.store(max_ptr + row, m)
    tl.store(inv_norm_ptr + row, 1.0 / z)
    z64 = count + rest
    log_z64 = tl.log(count) + tl.log(1.0 + (rest / count).to(tl.float64)).to(tl.float32)
    tl.store(entropy_ptr + row, log_z64 - w / z64)


# Combining the per-slice partial statistics of a teacher row: BLOCK slices per step.
TEACHER_FINALIZE = TritonKernel(_dino_teacher_finalize_kernel, {"BLOCK": 1024, "num_warps": 4})


@triton.jit
def _target_block(t, shift, mask, row_max, inv_norm, inv_teacher_temp):
    """A block of one teacher target row, p = exp((t − shift)/τt − row_max)·inv_norm, from its fp32 logits t and
    column shifts (the center, or the Sinkhorn-Knopp column shift) and the row's max and 1/normaliser (0 outside
    `mask`). Shared with ibot_patch_loss."""
    # exp(u − max)·(1/z) rather than exp(u − log-sum-exp): u − max cancels exactly where p is large, while u − lse
    # would carry the rounding of two numbers of size |u| (up to ~100 at τt = 0.04) into p.
    return tl.where(mask, tl.exp((t - shift) * inv_teacher_temp - row_max) * inv_norm, 0.0)


@triton.jit
def _teacher_target(teacher_ptr, center_ptr, teacher_max_ptr, teacher_inv_norm_ptr, cols, mask, image, crop, batch,
                    n_global, n_cols, inv_teacher_temp, BLOCK_K: tl.constexpr):
    """Columns `cols` of q = Σ_{i≠crop} softmax((t_i − c)/τt) for one image, recomputed from the teacher logits and
    the per-row max and normaliser (never stored)."""
    center = tl.load(center_ptr + cols, mask=mask, other=0.0)
    q = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, n_global):
        if i != crop:
            teacher_row = i * batch + image
            t = tl.load(teacher_ptr + teacher_row.to(tl.int64) * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            row_max = tl.load(teacher_max_ptr + teacher_row)
            inv_norm = tl.load(teacher_inv_norm_ptr + teacher_row)
            q += _target_block(t, center, mask, row_max, inv_norm, inv_teacher_temp)
    return q


@triton.jit
def _dino_student_kernel(
    student_ptr,  # (n_crops·batch, n_cols) student logits
    teacher_ptr,  # (n_global·batch, n_cols) teacher logits
    center_ptr,  # fp32 (n_cols,)
    teacher_max_ptr,  # fp32 (n_global·batch,) from the teacher pass
    teacher_inv_norm_ptr,  # fp32 (n_global·batch,) from the teacher pass
    grad_ptr,  # like student: (|q| softmax − q)·grad_scale, written when compute_grad
    row_loss_ptr,  # fp32 (n_crops·batch,): Σ_{i≠v} CE(p_i, s_v) of each student row
    batch,
    n_global,
    n_crops,
    n_cols,
    inv_student_temp,
    inv_teacher_temp,
    grad_scale,
    compute_grad,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # Consecutive programs take the crops of one image: they read the same teacher rows, which then hit in L2.
    image = pid // n_crops
    crop = pid % n_crops
    row = crop * batch + image
    student_row = student_ptr + row.to(tl.int64) * n_cols
    n_targets = n_global - (crop < n_global).to(tl.int32)  # |q|: a global crop is not compared with itself

    # Sweep 1: online max m and normaliser z of x = s/τs, and q·x.
    m = float("-inf")
    z = 0.0
    dot = 0.0
    for start in range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        x = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_student_temp
        q = _teacher_target(teacher_ptr, center_ptr, teacher_max_ptr, teacher_inv_norm_ptr, cols, mask, image, crop,
                            batch, n_global, n_cols, inv_teacher_temp, BLOCK_K)
        dot += tl.sum(q * x)  # masked columns: q = 0 and x = 0
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new))
        m = m_new
    tl.store(row_loss_ptr + row, n_targets * (m + tl.log(z)) - dot)

    # Sweep 2: the gradient, stored in the forward so that the backward only rescales it.
    if compute_grad != 0:
        grad_row = grad_ptr + row.to(tl.int64) * n_cols
        softmax_coef = n_targets * grad_scale / z
        for start in range(0, n_cols, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            mask = cols < n_cols
            x = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_student_temp
            q = _teacher_target(teacher_ptr, center_ptr, teacher_max_ptr, teacher_inv_norm_ptr, cols, mask, image,
                                crop, batch, n_global, n_cols, inv_teacher_temp, BLOCK_K)
            # |q|·softmax − q, with softmax = exp(x − m)/z for the same reason as in _target_block.
            g = tl.exp(tl.where(mask, x - m, float("-inf"))) * softmax_coef - q * grad_scale
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# The first config for K up to its BLOCK_K, else the second. 8 elements per thread keep it near 70 registers, so that
# several programs share an SM and keep enough loads in flight.
STUDENT = TritonKernel(_dino_student_kernel, {"BLOCK_K": 1024, "num_warps": 4}, {"BLOCK_K": 2048, "num_warps": 8})


@triton.jit
def _dino_loss_rescale_kernel(
    grad_ptr,  # the stored gradient, rescaled in place
    grad_output_ptr,  # fp32 0-d: d(objective)/d(loss)
    scale,
    n_elements,
    BLOCK: tl.constexpr,
):
    # grad_output is read on the device, so the backward never synchronises with the host to test it.
    factor = tl.load(grad_output_ptr).to(tl.float32) * scale
    if factor != 1.0:  # `loss.backward()`: the stored gradient is already final, nothing is read or written
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(grad_ptr + offsets, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


# Backward rescale of the stored gradient: BLOCK elements per program.
RESCALE = TritonKernel(_dino_loss_rescale_kernel, {"BLOCK": 2048, "num_warps": 8})


# ------------------------------------------------------------------------------------------------- launchers
_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _layout(student: torch.Tensor, teacher: torch.Tensor, n_global: int) -> tuple[int, int, int]:
    """(batch B, student crops S, pairs P) from the row counts."""
    batch = teacher.shape[0] // n_global
    n_crops = student.shape[0] // batch
    return batch, n_crops, n_global * (n_crops - 1)


def _grad_scales(dtype: torch.dtype, n_global: int, student_temp: float, batch: int, pairs: int) -> tuple[float, float]:
    """(scale the forward stores |q| softmax − q with, factor the backward multiplies grad_output by)."""
    exact = 1.0 / (student_temp * batch * pairs)
    if dtype == torch.float16:
        stored = 2.0 ** math.floor(math.log2(_FP16_MAX / n_global))
        return stored, exact / stored
    return exact, 1.0


def _dino_loss_triton(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_global: int,
                      student_temp: float, teacher_temp: float, grad_scale: float, compute_grad: bool,
                      sk: tuple[TeacherTargets, torch.Tensor] | None = None) -> _Outputs:
    """The teacher pass, its finalize and the student pass, on contiguous logits and a contiguous fp32 (K,) center.
    With ``sk`` (Sinkhorn-Knopp targets and the raw teacher mean) the student pass alone, on those targets."""
    n_rows, n_cols = teacher.shape
    batch, n_crops, pairs = _layout(student, teacher, n_global)
    stats_config, finalize_config = TEACHER_STATS.configs[0], TEACHER_FINALIZE.configs[0]
    small, large = STUDENT.configs
    student_config = small if n_cols <= small["BLOCK_K"] else large
    fp32 = dict(dtype=torch.float32, device=student.device)
    row_loss = torch.empty(student.shape[0], **fp32)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    if sk is not None:  # SK's scalings take the place of the softmax teacher's center, max and normaliser
        (center, row_max, inv_norm, entropy), mean = sk
    else:
        n_slices = cdiv(n_cols, stats_config["BLOCK_K"])
        partial_max64 = torch.empty((n_rows, n_slices), dtype=torch.float64, device=student.device)
        partial = torch.empty((5, n_rows, n_slices), **fp32)
        mean = torch.empty(n_cols, **fp32)
        row_max = torch.empty(n_rows, **fp32)
        inv_norm = torch.empty(n_rows, **fp32)
        entropy = torch.empty(n_rows, **fp32)
        inv_teacher_temp = float(np.float32(1.0 / teacher_temp))
        TEACHER_STATS.launch((n_slices,), stats_config, teacher_ptr=teacher, center_ptr=center,
                             partial_max64_ptr=partial_max64, partial_ptr=partial, mean_ptr=mean, n_rows=n_rows,
                             n_cols=n_cols, n_slices=n_slices, inv_teacher_temp=inv_teacher_temp,
                             inv_teacher_temp_lo=1.0 / teacher_temp - inv_teacher_temp, inv_rows=1.0 / n_rows)
        TEACHER_FINALIZE.launch((n_rows,), finalize_config, partial_max64_ptr=partial_max64, partial_ptr=partial,
                                max_ptr=row_max, inv_norm_ptr=inv_norm, entropy_ptr=entropy, n_rows=n_rows,
                                n_slices=n_slices)
    STUDENT.launch((student.shape[0],), student_config, student_ptr=student, teacher_ptr=teacher, center_ptr=center,
                   teacher_max_ptr=row_max, teacher_inv_norm_ptr=inv_norm, grad_ptr=grad, row_loss_ptr=row_loss,
                   batch=batch, n_global=n_global, n_crops=n_crops, n_cols=n_cols, inv_student_temp=1.0 / student_temp,
                   inv_teacher_temp=1.0 / teacher_temp, grad_scale=grad_scale, compute_grad=int(compute_grad))
    loss = row_loss.sum() / (pairs * batch)
    mean_entropy = entropy.mean()
    # Each teacher crop meets S − 1 student crops, so the pair mean of the teacher entropy is its plain mean and
    # mean KL(p_i ‖ softmax(s_v/τs)) over the pairs = mean cross-entropy − mean entropy.
    return loss, grad, mean, mean_entropy, loss - mean_entropy


def _dino_loss_rescale_triton(grad: torch.Tensor, grad_output: torch.Tensor, scale: float) -> None:
    n = grad.numel()
    if n:
        config = RESCALE.configs[0]
        RESCALE.launch((cdiv(n, config["BLOCK"]),), config, grad_ptr=grad,
                       grad_output_ptr=grad_output.to(torch.float32), scale=scale, n_elements=n)


def aot_examples() -> None:
    """Every (student dtype, teacher dtype) pair with K below and above the first student config's BLOCK_K, and the
    rescale of each gradient dtype with an i32 and an i64 element count."""
    for s, t in itertools.product(TRITON_DTYPES, repeat=2):
        for k in (8, 2 * STUDENT.configs[0]["BLOCK_K"]):
            _dino_loss_triton(torch.empty(6, k, dtype=s), torch.empty(4, k, dtype=t), torch.empty(k), 2, 0.1, 0.04,
                              1.0, True)
    for d in TRITON_DTYPES:
        # Triton passes n_elements as i32 when it fits, else as i64 (nothing is allocated: a 0-stride view).
        for n in (8, 2**31):
            _dino_loss_rescale_triton(torch.empty(1, dtype=d).expand(n), torch.empty(()), 0.5)


# ------------------------------------------------------------------------------------------------ dispatch
def _dino_loss_forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_global: int,
                       student_temp: float, teacher_temp: float, compute_grad: bool,
                       sk_iterations: int = 0) -> _Outputs:
    """(loss, stored gradient, teacher batch mean, mean teacher entropy, mean KL). The gradient is empty unless
    compute_grad; it is the loss gradient times the backward's factor (1 except for fp16, see _grad_scales).
    sk_iterations > 0: Sinkhorn-Knopp centering with that many iterations (center unused); 0: softmax centering."""
    # The Triton kernels take fp32/fp16/bf16 logits: an fp64 one (if any) is the dtype the backend must serve.
    dtype = next((t.dtype for t in (student, teacher) if t.dtype not in TRITON_DTYPES), student.dtype)
    impl = resolve(student.device, "dino_loss", dtype, cuda_runs_triton=True)
    if impl == "reference":
        raise ValueError("dino_kernels::dino_loss is the fused kernel; under the 'reference' backend call "
                         "dino_kernels.dino_loss, which runs dino_kernels.reference.dino_loss")
    student, teacher = student.contiguous(), teacher.contiguous()
    center = center.reshape(-1).to(accumulation_dtype(student, teacher)).contiguous()
    batch, _, pairs = _layout(student, teacher, n_global)
    grad_scale, _ = _grad_scales(student.dtype, n_global, student_temp, batch, pairs)
    sk = None
    if sk_iterations:
        sk = compute_targets(teacher, teacher_temp, sk_iterations, impl, center.dtype)
    if impl == "cpu":
        return ops().dino_loss_cpu(student, teacher, center if sk is None else sk[0].column_shift, n_global,
                                   student_temp, teacher_temp, grad_scale, compute_grad,
                                   *(() if sk is None else sk[0][1:]))
    return _dino_loss_triton(student, teacher, center, n_global, student_temp, teacher_temp, grad_scale, compute_grad,
                             sk)


def _dino_loss_backward(grad: torch.Tensor, grad_output: torch.Tensor, scale: float) -> None:
    """In place grad *= grad_output * scale (fp32 math), a no-op when that factor is 1."""
    # C++ for CPU tensors unless the Triton kernels are asked for ("reference" can only be met here when the backend
    # was switched between forward and backward: the rescale is the same op either way).
    if grad.device.type == "cpu" and resolve(grad.device, "dino_loss") != "triton":
        ops().dino_loss_rescale_cpu_(grad, grad_output, scale)
    else:
        _dino_loss_rescale_triton(grad, grad_output, scale)


# ----------------------------------------------------------------------------------------------- registered op
def _dino_loss_rescale_fake(grad: torch.Tensor, grad_output: torch.Tensor, scale: float) -> None:
    return None


_dino_loss_rescale_op = KernelOp("dino_loss_rescale_", _dino_loss_backward, fake=_dino_loss_rescale_fake,
                                 mutates_args=("grad",))


def _dino_loss_fake(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_global: int,
                    student_temp: float, teacher_temp: float, compute_grad: bool, sk_iterations: int = 0) -> _Outputs:
    acc = accumulation_dtype(student, teacher)
    grad = student.new_empty(student.shape if compute_grad else (0,))
    return (student.new_empty((), dtype=acc), grad, student.new_empty((student.shape[1],), dtype=acc),
            student.new_empty((), dtype=acc), student.new_empty((), dtype=acc))


def _dino_loss_setup_context(ctx, inputs, output) -> None:
    student, teacher, center, n_global, student_temp, teacher_temp, compute_grad, *sk_iterations = inputs
    batch, _, pairs = _layout(student, teacher, n_global)
    ctx.factor = _grad_scales(student.dtype, n_global, student_temp, batch, pairs)[1]
    ctx.compute_grad = compute_grad
    # Only the loss is differentiable, and the other outputs get no zero-filled gradients (one of them has the size
    # of the logits) at every backward.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if compute_grad:
        ctx.save_for_backward(output[1])
    else:  # called without the gradient (dino_loss never does this when one can be needed): recompute it
        ctx.args = (n_global, student_temp, teacher_temp, True, *sk_iterations)
        ctx.save_for_backward(student, teacher, center)


def _dino_loss_vjp(ctx, grad_loss, *_unused):
    nones = (None,) * (len(ctx.needs_input_grad) - 1)
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, *nones
    if ctx.compute_grad:
        (grad,) = ctx.saved_tensors
    else:
        grad = _dino_loss_op(*ctx.saved_tensors, *ctx.args)[1]
    if tracing(grad):
        # AOTAutograd cannot partition a backward that mutates a saved forward output, so a traced graph rescales
        # out of place (the compiler fuses the multiply).
        return (grad.float() * (grad_loss.float() * ctx.factor)).to(grad.dtype), *nones
    # In place on the stored gradient, and skipped on the device when grad_output * factor is 1. This bumps the
    # gradient's version, so a second backward through the same graph (retain_graph=True) raises rather than
    # rescaling twice.
    _dino_loss_rescale_op(grad, grad_loss, ctx.factor)
    return grad, *nones


_dino_loss_op = KernelOp("dino_loss", _dino_loss_forward, fake=_dino_loss_fake,
                         setup_context=_dino_loss_setup_context, backward=_dino_loss_vjp)


# ------------------------------------------------------------------------------------------------- public API
CENTERINGS = ("softmax", "sinkhorn_knopp")


class DINOLossStats(NamedTuple):
    """Collapse monitors from the same pass as the loss (no gradient flows through them).

    teacher_mean: (K,) batch mean of the raw teacher logits, what :func:`update_center_` needs.
    teacher_entropy: 0-d, mean entropy of the teacher distributions in nats (ln K: uniform collapse; 0: one-hot).
    kl: 0-d, mean KL(teacher ‖ student) over the (teacher crop, student crop) pairs, in nats.
    """

    teacher_mean: torch.Tensor
    teacher_entropy: torch.Tensor
    kl: torch.Tensor


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_global_crops: int,
                  student_temp: float, teacher_temp: float) -> None:
    for name, t in (("student_logits", student), ("teacher_logits", teacher), ("center", center)):
        check_floating(name, t, FLOAT_DTYPES)
    check_same_device(student_logits=student, teacher_logits=teacher, center=center)
    check_ndim("student_logits", student, 2, "(n_crops * B, K)")
    check_ndim("teacher_logits", teacher, 2, "(n_global_crops * B, K)")
    check_int("n_global_crops", n_global_crops)
    if n_global_crops < 1:
        raise ValueError(f"n_global_crops must be >= 1; got {n_global_crops}")
    check_positive("student_temp", student_temp)
    check_positive("teacher_temp", teacher_temp)
    n_cols = student.shape[1]
    if teacher.shape[1] != n_cols:
        raise ValueError(f"teacher_logits has K={teacher.shape[1]} columns but student_logits has K={n_cols}")
    if n_cols == 0 or student.shape[0] == 0 or teacher.shape[0] == 0:
        raise ValueError(f"empty batch: student_logits has shape {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)}; both need rows and K > 0")
    if center.shape not in ((n_cols,), (1, n_cols)):
        raise ValueError(f"center must have shape ({n_cols},) or (1, {n_cols}); got {tuple(center.shape)}")
    if teacher.shape[0] % n_global_crops:
        raise ValueError(f"teacher_logits has {teacher.shape[0]} rows, not a multiple of n_global_crops="
                         f"{n_global_crops}")
    batch = teacher.shape[0] // n_global_crops
    if student.shape[0] % batch:
        raise ValueError(f"student_logits has {student.shape[0]} rows, not a multiple of the batch size B={batch} "
                         f"(teacher rows / n_global_crops)")
    n_crops = student.shape[0] // batch
    if n_crops < max(n_global_crops, 2):
        raise ValueError(f"student_logits holds {n_crops} crop(s) of B={batch} rows; it needs the "
                         f"{n_global_crops} global crop(s) first and at least 2 crops in all, so that some "
                         "(teacher crop, other student crop) pair exists")



def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    n_global_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    centering: str = "softmax",
    sk_iterations: int = 3,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DINOLossStats]:
    """The DINO loss, fused: (1/P) Σ_{i<G} Σ_{v≠i} mean_b CE(p_i,b, softmax(s_v,b/τs)), with the teacher targets
    p = softmax((t − c)/τt) (DINO) or, with ``centering="sinkhorn_knopp"``, DINOv2's Sinkhorn-Knopp targets of all
    G·B teacher rows (see :func:`dino_kernels.sinkhorn_knopp.sinkhorn_knopp`; all-reduced across ranks under
    ``torch.distributed``).

    Args:
        student_logits: (S·B, K), crop-major (the rows of crop 0, then crop 1, ...), the G global crops first in
            the teacher's order; fp32, fp16, bf16 (or fp64 on the CPU backends).
        teacher_logits: (G·B, K), same layout; no gradient flows to it.
        center: (K,) or (1, K) teacher center, any float dtype; validated but unused under Sinkhorn-Knopp centering.
        n_global_crops: G, the number of teacher (global) crops.
        student_temp, teacher_temp: τs, τt > 0.
        centering: ``"softmax"`` (DINO's centered softmax) or ``"sinkhorn_knopp"`` (DINOv2).
        sk_iterations: Sinkhorn-Knopp iterations (>= 1), used with ``centering="sinkhorn_knopp"``.
        return_stats: also return :class:`DINOLossStats` from the same pass (teacher_mean is the raw teacher
            logits' batch mean under either centering; entropy and KL are those of the targets used).

    Returns:
        The 0-d loss (fp32; fp64 for fp64 inputs), differentiable w.r.t. ``student_logits`` only; with
        ``return_stats``, ``(loss, stats)``.
    """
    _check_inputs(student_logits, teacher_logits, center, n_global_crops, student_temp, teacher_temp)
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {', '.join(map(repr, CENTERINGS))}; got {centering!r}")
    check_count("sk_iterations", sk_iterations)
    if get_backend() == "reference":  # the eager official-style loss, with its own autograd
        out = reference.dino_loss(student_logits, teacher_logits, center, n_global_crops=n_global_crops,
                                  student_temp=student_temp, teacher_temp=teacher_temp, centering=centering,
                                  sk_iterations=sk_iterations, return_stats=return_stats)
        return (out[0], DINOLossStats(*out[1])) if return_stats else out
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _, mean, entropy, kl = _dino_loss_op(student_logits, teacher_logits, center, n_global_crops,
                                               float(student_temp), float(teacher_temp), compute_grad,
                                               sk_iterations if centering == "sinkhorn_knopp" else 0)
    if not return_stats:
        return loss
    return loss, DINOLossStats(mean.detach(), entropy.detach(), kl.detach())



def update_center_(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> None:
    """In place ``center <- momentum * center + (1 - momentum) * batch_center`` (fp32 math, fp64 for fp64).

    Args:
        center: (K,) or (1, K) buffer, updated in place.
        teacher_logits: either the raw teacher logits (N, K), whose row mean is the batch center, or that mean
            itself, (K,) (e.g. ``stats.teacher_mean`` from :func:`dino_loss`, which saves a second read).
        momentum: in [0, 1].

    When ``torch.distributed`` is initialised the batch center is averaged over the ranks (all-reduce), as in the
    official code: sum of the rows / (N · world size) for logits, sum of the means / world size for a mean.
    """
    check_floating("center", center)
    check_floating("teacher_logits", teacher_logits)
    check_unit_interval("momentum", momentum)
    check_same_device(center=center, teacher_logits=teacher_logits)
    n_cols = center.shape[-1]
    if center.shape not in ((n_cols,), (1, n_cols)) or n_cols == 0:
        raise ValueError(f"center must have shape (K,) or (1, K) with K > 0; got {tuple(center.shape)}")
    if teacher_logits.dim() not in (1, 2) or teacher_logits.shape[-1] != n_cols or teacher_logits.numel() == 0:
        raise ValueError(f"teacher_logits must be the logits (N, {n_cols}) with N > 0 or their mean ({n_cols},); "
                         f"got shape {tuple(teacher_logits.shape)}")
    acc = accumulation_dtype(center, teacher_logits)
    with torch.no_grad():
        if teacher_logits.dim() == 2:
            batch_center, count = teacher_logits.sum(0, dtype=acc), teacher_logits.shape[0]
        else:
            batch_center, count = teacher_logits.to(acc, copy=True), 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            count *= torch.distributed.get_world_size()
        updated = center.to(acc) * momentum + batch_center.view(center.shape) * ((1.0 - momentum) / count)
        center.copy_(updated)



def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                          n_epochs: int) -> tuple[float, ...]:
    """The official teacher-temperature schedule (facebookresearch/dino ``DINOLoss``), one value per epoch:
    ``numpy.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)``, then ``teacher_temp`` (a warm-up longer
    than ``n_epochs`` is cut at ``n_epochs``)."""
    schedule = np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                               np.ones(max(n_epochs - warmup_epochs, 0)) * teacher_temp))
    return tuple(float(t) for t in schedule[:n_epochs])


class DINOLoss(nn.Module):
    """The official ``DINOLoss`` module (facebookresearch/dino main_dino.py) on the fused kernel.

    Holds the ``center`` buffer (1, out_dim) and the teacher-temperature schedule (linear from
    ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs, then constant);
    each call returns the loss and then updates the center from this batch's teacher logits (all-reduced across
    ranks when ``torch.distributed`` is initialised).
    """

    def __init__(self, out_dim: int, n_global_crops: int, n_local_crops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp_epochs: int, n_epochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        integers = {"out_dim": out_dim, "n_global_crops": n_global_crops, "n_local_crops": n_local_crops,
                    "warmup_teacher_temp_epochs": warmup_teacher_temp_epochs, "n_epochs": n_epochs}
        for name, value in integers.items():
            check_int(name, value)
        if out_dim < 1 or n_global_crops < 1 or n_local_crops < 0 or n_global_crops + n_local_crops < 2:
            raise ValueError(f"need out_dim >= 1, n_global_crops >= 1, n_local_crops >= 0 and at least 2 crops; got "
                             f"out_dim={out_dim}, n_global_crops={n_global_crops}, n_local_crops={n_local_crops}")
        if not 0 <= warmup_teacher_temp_epochs <= n_epochs:
            raise ValueError(f"warmup_teacher_temp_epochs must be in [0, n_epochs={n_epochs}]; got "
                             f"{warmup_teacher_temp_epochs}")
        for name, value in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp),
                            ("student_temp", student_temp)):
            check_positive(name, value)
        check_unit_interval("center_momentum", center_momentum)
        self.n_global_crops = n_global_crops
        self.n_crops = n_global_crops + n_local_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, n_epochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                return_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, DINOLossStats]:
        """Loss of (n_crops·B, K) student and (n_global_crops·B, K) teacher logits at ``epoch``; then the center
        update. ``return_stats`` also returns the :class:`DINOLossStats` of the batch."""
        check_int("epoch", epoch)
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(f"epoch must be in [0, {len(self.teacher_temp_schedule)}); got {epoch}")
        check_tensor("student_output", student_output)
        check_tensor("teacher_output", teacher_output)
        teacher_rows, student_rows = teacher_output.shape[0], student_output.shape[0]
        if teacher_output.dim() == 2 and student_output.dim() == 2 and teacher_rows % self.n_global_crops == 0:
            batch = teacher_rows // self.n_global_crops
            if student_rows != batch * self.n_crops:
                raise ValueError(f"student_output has {student_rows} rows; {self.n_crops} crops of the teacher's "
                                 f"batch B={batch} make {batch * self.n_crops}")
        loss, stats = dino_loss(student_output, teacher_output, self.center, n_global_crops=self.n_global_crops,
                                student_temp=self.student_temp, teacher_temp=self.teacher_temp_schedule[epoch],
                                return_stats=True)
        update_center_(self.center, stats.teacher_mean, self.center_momentum)
        return (loss, stats) if return_stats else loss
