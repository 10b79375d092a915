"""Sinkhorn-Knopp (SK) teacher centering (DINOv2), without the (N, K) matrix.

DINOv2's ``sinkhorn_knopp_teacher`` materialises Q = exp(t/τt)ᵀ in fp32 and rescales its prototype rows and sample
columns in turn. Those rescalings are two diagonal scalings, so every iterate, and the result, is

    p_ik = exp(t_ik/τt + α_k + β_i)

for per-prototype (column) and per-sample (row) log-scalings α (K,) and β (N,). The constants of the official code
(the first division by the total, /K, /n_samples, the final ×n_samples) are global scalars that cancel exactly, so
only α and β are kept. One iteration is two passes over the teacher logits:

1. Column pass: α_k ← −log Σ_i exp(t_ik/τt + β_i) over all samples, all-reduced across ranks when
   ``torch.distributed`` is initialised (a MAX all-reduce of the local log-sum-exps, then a SUM all-reduce of their
   exponentials re-based to that max), as the official code all-reduces its prototype sums.
2. Row pass: β_i ← −log Σ_k exp(t_ik/τt + α_k) over the (local) prototypes.

Everything is in the log domain with max shifts, so logits far outside fp32's exp range (t/τt from −100 to +100
and beyond) give the finite result that the fp64 maths gives, where the official fp32 formula overflows to inf/NaN.
The scalings are stored in the form of the DINO loss's softmax teacher (see :class:`TeacherTargets`): a column
shift in logit units (the DINO center's place), and per row the max of the shifted, scaled logits and the inverse
normaliser, so that the DINO loss's student kernels rebuild SK targets on the fly with no change, and the last row
pass also gives each target row's entropy. The shifted logits t − column_shift stay within the column's spread
(the shift tracks each column's log-sum-exp), which keeps the fp32 rounding of the rebuilt exponent small.

Implementations: Triton (GPU, and CPU under ``TRITON_INTERPRET=1``), C++ CPU (``csrc/sinkhorn_knopp.cpp``; fp64
logits run there only), and the official-style eager code in :mod:`dino_kernels.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dino_kernels import reference
from dino_kernels._backend import TRITON_DTYPES, accumulation_dtype, get_backend, resolve
from dino_kernels._extension import ops
from dino_kernels._launch import TritonKernel, cdiv
from dino_kernels._op import KernelOp
from dino_kernels._validation import FLOAT_DTYPES, check_floating, check_int, check_ndim, check_positive


# ---------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _sk_column_kernel(
    teacher_ptr,  # (n_rows, n_cols) raw teacher logits
    column_shift_ptr,  # fp32 (n_cols,): read, then advanced in place by τt·(this pass's column log-sum-exp)
    row_max_ptr,  # fp32 (n_rows,) from the previous row pass (0 before the first)
    row_inv_norm_ptr,  # fp32 (n_rows,) from the previous row pass (1 before the first)
    mean_ptr,  # fp32 (n_cols,): column means of the raw logits, written when write_mean
    n_rows,
    n_cols,
    teacher_temp,
    inv_teacher_temp,
    inv_rows,
    write_mean,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < n_cols
    shift = tl.load(column_shift_ptr + cols, mask=col_mask, other=0.0)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_K], dtype=tl.float32)
    col_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for row_start in range(0, n_rows, BLOCK_ROWS):
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        t = tl.load(teacher_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        col_sum += tl.sum(t, axis=0)
        # log of row i's current normaliser, LSE_k((t_ik − shift_k)/τt) = row max + log(1/inv_norm)
        row_lse = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0) - tl.log(
            tl.load(row_inv_norm_ptr + rows, mask=row_mask, other=1.0))
        # Only rows past the end are -inf: every block has a valid row, so the block max is finite in every
        # column (padded columns read 0) and the online rescale exp(m − m_new) never meets -inf − -inf.
        u = tl.where(row_mask[:, None], (t - shift[None, :]) * inv_teacher_temp - row_lse[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(u, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new[None, :]), axis=0)
        m = m_new
    tl.store(column_shift_ptr + cols, shift + teacher_temp * (m + tl.log(s)), mask=col_mask)
    if write_mean != 0:
        tl.store(mean_ptr + cols, col_sum * inv_rows, mask=col_mask)


# One program per BLOCK_K columns walking down all rows: the column sums need no atomics and are deterministic, and
# 128 columns give K / 128 = 512 programs at DINOv2's K = 65,536, enough to fill an H100. 32-row tiles (16 elements
# per thread) keep 8 KB of bf16 logits in flight per program, ~4 MB over the GPU, enough to stream at DRAM speed.
COLUMN = TritonKernel(_sk_column_kernel, {"BLOCK_ROWS": 32, "BLOCK_K": 128, "num_warps": 8})


@triton.jit
def _sk_row_kernel(
    teacher_ptr,  # (n_rows, n_cols) raw teacher logits
    column_shift_ptr,  # fp32 (n_cols,)
    row_max_ptr,  # fp32 (n_rows,) out: max_k (t_ik − shift_k)/τt
    row_inv_norm_ptr,  # fp32 (n_rows,) out: 1 / Σ_k exp((t_ik − shift_k)/τt − row max)
    entropy_ptr,  # fp32 (n_rows,) out: entropy of the row's targets, nats
    n_cols,
    inv_teacher_temp,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    teacher_row = teacher_ptr + row.to(tl.int64) * n_cols
    # One online sweep over u = (t − shift)/τt, formed exactly as the DINO loss's student kernel rebuilds it (so that
    # the rebuilt targets of a row sum to 1 and never exceed exp(0)): the running max m, z = Σ e and w = Σ e·(u − m)
    # with e = exp(u − m). A new max m' rescales e by exp(m − m') and shifts u − m by m − m'. The entropy is
    # log z − w/z, two terms >= 0.
    m = float("-inf")
    z = 0.0
    w = 0.0
    for start in range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(column_shift_ptr + cols, mask=mask, other=0.0)
        u = (t - shift) * inv_teacher_temp
        m_new = tl.maximum(m, tl.max(tl.where(mask, u, float("-inf"))))  # finite: every block has a valid column
        shifted = tl.where(mask, u - m_new, 0.0)  # 0 on padded columns: no exp overflow there
        e = tl.where(mask, tl.exp(shifted), 0.0)
        rebase = m - m_new  # -inf on the first block, where z = w = 0 and the old terms must stay 0
        scale = tl.exp(rebase)
        w = scale * (w + tl.where(z > 0.0, rebase, 0.0) * z) + tl.sum(e * shifted)
        z = scale * z + tl.sum(e)
        m = m_new
    tl.store(row_max_ptr + row, m)
    tl.store(row_inv_norm_ptr + row, 1.0 / z)
    tl.store(entropy_ptr + row, tl.log(z) - w / z)


# One program per sample row (the row pass reduces along K) in one sweep: BLOCK_K columns per step, 8 elements per
# thread, 8 warps so that the few programs (N = 2·B rows) keep many loads in flight.
ROW = TritonKernel(_sk_row_kernel, {"BLOCK_K": 2048, "num_warps": 8})


@triton.jit
def _sk_write_kernel(
    teacher_ptr,  # (n_rows, n_cols) raw teacher logits
    column_shift_ptr,  # fp32 (n_cols,)
    row_max_ptr,  # fp32 (n_rows,)
    row_inv_norm_ptr,  # fp32 (n_rows,)
    out_ptr,  # fp32 (n_rows, n_cols): the targets
    n_cols,
    inv_teacher_temp,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < n_cols
    offsets = row.to(tl.int64) * n_cols + cols
    t = tl.load(teacher_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(column_shift_ptr + cols, mask=mask, other=0.0)
    shifted = tl.where(mask, (t - shift) * inv_teacher_temp - tl.load(row_max_ptr + row), 0.0)
    p = tl.exp(shifted) * tl.load(row_inv_norm_ptr + row)
    tl.store(out_ptr + offsets, p, mask=mask)


# One program per (row, BLOCK_K columns): an elementwise map, 8 elements per thread.
WRITE = TritonKernel(_sk_write_kernel, {"BLOCK_K": 1024, "num_warps": 4})


# ------------------------------------------------------------------------------------------------- launchers
class TeacherTargets(NamedTuple):
    """Sinkhorn-Knopp targets of N teacher rows in the DINO loss's softmax-teacher form:

        p_ik = exp((t_ik − column_shift_k) · (1/τt) − row_max_i) · row_inv_norm_i

    with row_max_i the max over k of the first term (so every exp <= 1) and row_inv_norm_i the inverse of the row's
    sum of those exps, as the kernels formed them (the Triton ones in fp32, the C++ ones in fp64 before the exp):
    rebuilt in fp32 either way, the targets are within fp32 rounding of each other. fp32 tensors (fp64 for fp64
    logits).
    """

    column_shift: torch.Tensor  # (K,)
    row_max: torch.Tensor  # (N,)
    row_inv_norm: torch.Tensor  # (N,)
    entropy: torch.Tensor  # (N,) entropy of each target row, nats


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_column_shift(column_shift: torch.Tensor, teacher_temp: float) -> None:
    """In place: column_shift = τt · log Σ_ranks exp(column_shift / τt), a log-sum-exp across ranks, overflow-free."""
    top = column_shift.clone()
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    total = torch.exp((column_shift - top) / teacher_temp)
    torch.distributed.all_reduce(total)
    torch.add(top, torch.log(total), alpha=teacher_temp, out=column_shift)


def _column_pass_triton(teacher: torch.Tensor, targets: TeacherTargets, mean: torch.Tensor, teacher_temp: float,
                        write_mean: bool) -> None:
    n_rows, n_cols = teacher.shape
    config = COLUMN.configs[0]
    COLUMN.launch((cdiv(n_cols, config["BLOCK_K"]),), config, teacher_ptr=teacher,
                  column_shift_ptr=targets.column_shift, row_max_ptr=targets.row_max,
                  row_inv_norm_ptr=targets.row_inv_norm, mean_ptr=mean, n_rows=n_rows, n_cols=n_cols,
                  teacher_temp=teacher_temp, inv_teacher_temp=1.0 / teacher_temp, inv_rows=1.0 / n_rows,
                  write_mean=int(write_mean))


def _row_pass_triton(teacher: torch.Tensor, targets: TeacherTargets, teacher_temp: float) -> None:
    config = ROW.configs[0]
    ROW.launch((teacher.shape[0],), config, teacher_ptr=teacher, column_shift_ptr=targets.column_shift,
               row_max_ptr=targets.row_max, row_inv_norm_ptr=targets.row_inv_norm, entropy_ptr=targets.entropy,
               n_cols=teacher.shape[1], inv_teacher_temp=1.0 / teacher_temp)


def _write_triton(teacher: torch.Tensor, targets: TeacherTargets, teacher_temp: float) -> torch.Tensor:
    n_rows, n_cols = teacher.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.float32, device=teacher.device)
    config = WRITE.configs[0]
    WRITE.launch((n_rows, cdiv(n_cols, config["BLOCK_K"])), config, teacher_ptr=teacher,
                 column_shift_ptr=targets.column_shift, row_max_ptr=targets.row_max,
                 row_inv_norm_ptr=targets.row_inv_norm, out_ptr=out, n_cols=n_cols,
                 inv_teacher_temp=1.0 / teacher_temp)
    return out


def compute_targets(teacher: torch.Tensor, teacher_temp: float, n_iterations: int, impl: str,
                    acc: torch.dtype) -> tuple[TeacherTargets, torch.Tensor | None]:
    """The SK scalings of contiguous teacher logits (N, K) by ``impl`` ("cpu" or "triton"/"cuda"), in ``acc``
    (fp32 or fp64; the Triton kernels take fp32 only): (targets, column means of the raw logits (K,) fp32 from the
    Triton column pass; None for the C++ kernels, where the DINO loss computes its own)."""
    n_rows, n_cols = teacher.shape
    targets = TeacherTargets(teacher.new_zeros(n_cols, dtype=acc), teacher.new_zeros(n_rows, dtype=acc),
                             teacher.new_ones(n_rows, dtype=acc), teacher.new_empty(n_rows, dtype=acc))
    mean = None if impl == "cpu" else teacher.new_empty(n_cols, dtype=torch.float32)
    distributed = _distributed()
    for iteration in range(n_iterations):
        if impl == "cpu":
            ops().sinkhorn_knopp_column_cpu_(teacher, targets.column_shift, targets.row_max, targets.row_inv_norm,
                                             teacher_temp)
        else:
            _column_pass_triton(teacher, targets, mean, teacher_temp, iteration == 0)
        if distributed:
            _all_reduce_column_shift(targets.column_shift, teacher_temp)
        if impl == "cpu":
            ops().sinkhorn_knopp_row_cpu_(teacher, targets.column_shift, targets.row_max, targets.row_inv_norm,
                                          targets.entropy, teacher_temp)
        else:
            _row_pass_triton(teacher, targets, teacher_temp)
    return targets, mean


def aot_examples() -> None:
    """The three kernels for every logit dtype (the column pass with and without the mean store is one signature)."""
    for dtype in TRITON_DTYPES:
        teacher = torch.empty(5, 300, dtype=dtype)
        targets, _ = compute_targets(teacher, 0.04, 1, "triton", torch.float32)
        _write_triton(teacher, targets, 0.04)


# ------------------------------------------------------------------------------------------------ dispatch
def _impl(teacher: torch.Tensor, op: str) -> str:
    impl = resolve(teacher.device, op, teacher.dtype, cuda_runs_triton=True)
    if impl == "reference":
        raise ValueError(f"dino_kernels::{op} is the fused kernel; under the 'reference' backend call "
                         "dino_kernels.sinkhorn_knopp.sinkhorn_knopp, which runs dino_kernels.reference.sinkhorn_knopp")
    return impl


def _sinkhorn_knopp_forward(teacher: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
    """(N, K) targets, fp32 (fp64 for fp64 logits)."""
    impl = _impl(teacher, "sinkhorn_knopp")
    teacher = teacher.contiguous()
    targets, _ = compute_targets(teacher, teacher_temp, n_iterations, impl, accumulation_dtype(teacher))
    if impl == "cpu":
        return ops().sinkhorn_knopp_write_cpu(teacher, targets.column_shift, targets.row_max, targets.row_inv_norm,
                                              teacher_temp)
    return _write_triton(teacher, targets, teacher_temp)


_Targets = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _sinkhorn_knopp_targets_forward(teacher: torch.Tensor, teacher_temp: float, n_iterations: int) -> _Targets:
    impl = _impl(teacher, "sinkhorn_knopp_targets")
    return tuple(compute_targets(teacher.contiguous(), teacher_temp, n_iterations, impl,
                                 accumulation_dtype(teacher))[0])


def _sinkhorn_knopp_fake(teacher: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
    return teacher.new_empty(teacher.shape, dtype=accumulation_dtype(teacher))


def _sinkhorn_knopp_targets_fake(teacher: torch.Tensor, teacher_temp: float, n_iterations: int) -> _Targets:
    acc = accumulation_dtype(teacher)
    n_rows, n_cols = teacher.shape
    rows = [teacher.new_empty(n_rows, dtype=acc) for _ in range(3)]
    return teacher.new_empty(n_cols, dtype=acc), *rows


# Teacher targets: no autograd formula (nothing is differentiable, as in the official no_grad code).
_sinkhorn_knopp_op = KernelOp("sinkhorn_knopp", _sinkhorn_knopp_forward, fake=_sinkhorn_knopp_fake)
_sinkhorn_knopp_targets_op = KernelOp("sinkhorn_knopp_targets", _sinkhorn_knopp_targets_forward,
                                      fake=_sinkhorn_knopp_targets_fake)


# ------------------------------------------------------------------------------------------------- public API
def check_count(name: str, value: int) -> None:
    """An int (not a bool) >= 1, such as an iteration count (also checks the losses' ``sk_iterations``)."""
    if check_int(name, value) < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")


def _check_arguments(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int,
                     n_samples: int | None) -> None:
    check_floating("teacher_logits", teacher_logits, FLOAT_DTYPES)
    check_ndim("teacher_logits", teacher_logits, 2, "(N, K)")
    if teacher_logits.numel() == 0:
        raise ValueError(f"teacher_logits must have N > 0 rows and K > 0 columns; got shape "
                         f"{tuple(teacher_logits.shape)}")
    check_positive("teacher_temp", teacher_temp)
    check_count("n_iterations", n_iterations)
    if n_samples is not None:
        check_count("n_samples", n_samples)


def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                   n_samples: int | None = None) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets (``DINOLoss.sinkhorn_knopp_teacher``), materialised.

    Args:
        teacher_logits: (N, K) raw teacher logits (this rank's rows), fp32, fp16, bf16 (fp64 on the CPU backends).
        teacher_temp: τt > 0.
        n_iterations: SK iterations (>= 1), each a prototype (column) and a sample (row) normalisation.
        n_samples: the global sample count of the official code (default N · world size). It only scales
            intermediate values and cancels exactly, so any value >= 1 gives the same targets; it is accepted for
            drop-in use.

    Returns:
        (N, K) targets, each row summing to 1, fp32 (fp64 for fp64 logits); no gradient. When
        ``torch.distributed`` is initialised the prototype sums are all-reduced across ranks, as officially.
    """
    _check_arguments(teacher_logits, teacher_temp, n_iterations, n_samples)
    if get_backend() == "reference":
        return reference.sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, n_samples=n_samples)
    with torch.no_grad():
        return _sinkhorn_knopp_op(teacher_logits, float(teacher_temp), n_iterations)


def sinkhorn_knopp_targets(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                           n_samples: int | None = None) -> TeacherTargets:
    """The scalings of :func:`sinkhorn_knopp`'s targets as :class:`TeacherTargets` (K + 3·N numbers, not N·K), for
    losses that rebuild the targets on the fly; same arguments. Not served by the ``reference`` backend."""
    _check_arguments(teacher_logits, teacher_temp, n_iterations, n_samples)
    with torch.no_grad():
        return TeacherTargets(*_sinkhorn_knopp_targets_op(teacher_logits, float(teacher_temp), n_iterations))
