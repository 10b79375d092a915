"""Fused KoLeo loss (DINOv2's ``KoLeoLoss``): the nearest-neighbour spreading term on a batch of features.

z = x / max(‖x‖, eps) per row; each row's nearest neighbour nn(i) is the other row of largest z_i·z_j (the diagonal
counts as −1, so with B = 1 a row is its own neighbour; ties go to the lowest index); d_i = ‖z_i − z_nn(i) + 1e-8‖
and loss = −mean_i log(d_i + eps). The official module builds the B × B Gram matrix, fills its diagonal and takes a
row argmax, in the input dtype (fp16 makes duplicates and B = 1 infinite). Here, in fp32 (fp64 for fp64
features), three passes:

1. Normalise: the row norms and z = x / max(‖x‖, eps) (fp32, B × D), divided exactly as the official code does, so
   the exact ties (duplicates, ±1 when D = 1, antipodes against the diagonal's −1) stay exact.
2. Neighbour search, tiled: a program takes BLOCK_M rows and a contiguous range of column blocks, accumulates each
   BLOCK_M × BLOCK_N tile of cosines with ``tl.dot`` over D in BLOCK_K chunks (so any D fits in shared memory; 3xTF32,
   about fp32's precision) and folds it into a running max/argmax per row: the Gram matrix is never written.
   Programs split the columns when there are few row blocks; each writes its best (cosine, index) per row.
3. Per row: the splits' winners combined (ties keep the lower split, i.e. the lower index), the distance to the
   neighbour and log(d + eps); the loss is the mean of those (one torch reduction).

Backward (neighbours fixed, as in the official code): with c_i = −grad_output / (B (d_i + eps) d_i) and
w_i = z_i − z_nn(i) + 1e-8, the gradient w.r.t. z_j is c_j w_j − Σ_{i: nn(i)=j} c_i w_i. The rows whose neighbour
is j are gathered through a stable sort of the neighbour list (CSR segments), so there are no atomics and the result
is deterministic; then through the normalisation, (g − z_j (z_j·g)) / ‖x_j‖, or g / eps where the clamp holds.
One program per row, O(B·D) in all. The forward saves z, the neighbour indices, the norms and the distances (O(B·D)
memory, as the official autograd graph saves z too).

Implementations: Triton (GPU, and CPU under ``TRITON_INTERPRET=1``), C++ CPU (``csrc/koleo.cpp``: blocked Gram
sweep over the upper triangle in registers, parallel over row blocks), and the eager official-style loss in
:mod:`dino_kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dino_kernels import reference
from dino_kernels._backend import TRITON_DTYPES, accumulation_dtype, get_backend, resolve
from dino_kernels._extension import ops
from dino_kernels._launch import TritonKernel, cdiv
from dino_kernels._op import KernelOp
from dino_kernels._validation import check_floating, check_ndim, check_positive

# The official distance is ‖z_i − z_nn + 1e-8‖: a constant added to every component.
_SHIFT = 1e-8
# The neighbour search splits the columns until it has about this many programs (2 per SM of an H100), so that
# B = 128 (2 row blocks) still fills the GPU.
_TARGET_PROGRAMS = 256

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _koleo_normalise_kernel(
    x_ptr,  # (n_rows, n_cols) features
    norms_ptr,  # fp32 (n_rows,): ‖x_i‖
    z_ptr,  # fp32 (n_rows, n_cols): x_i / max(‖x_i‖, eps)
    n_rows,
    n_cols,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None] * n_cols
    squares = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        v = tl.load(x_ptr + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += tl.sum(v * v, axis=1)
    norms = tl.sqrt_rn(squares)
    tl.store(norms_ptr + rows, norms, mask=row_mask)
    denom = tl.maximum(norms, eps)[:, None]
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        v = tl.load(x_ptr + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # A correctly rounded division, as the official x / clamp_min(‖x‖, eps): z = ±1 exactly when D = 1, and
        # the exact ties (duplicates, antipodes against the diagonal's −1) stay exact.
        tl.store(z_ptr + row_offsets + cols[None, :], tl.math.div_rn(v, denom), mask=mask)


# 4 rows × 512 columns per step: D = 384..1536 in 1-3 steps, 16 elements per thread.
NORMALISE = TritonKernel(_koleo_normalise_kernel, {"BLOCK_ROWS": 4, "BLOCK_D": 512, "num_warps": 4})


@triton.jit
def _koleo_neighbour_kernel(
    z_ptr,  # fp32 (n_rows, n_cols) normalised features
    best_ptr,  # fp32 (n_rows, n_splits): the largest cosine of each row within the program's columns
    best_index_ptr,  # int32 (n_rows, n_splits): its column, the lowest on ties
    n_rows,
    n_cols,
    n_splits,
    blocks_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None] * n_cols
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_M], dtype=tl.int32)
    col_begin = split * blocks_per_split * BLOCK_N
    col_end = tl.minimum(col_begin + blocks_per_split * BLOCK_N, n_rows)
    for col_start in range(col_begin, col_end, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_rows
        col_offsets = cols.to(tl.int64)[None, :] * n_cols
        cosine = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, n_cols, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = ks < n_cols
            a = tl.load(z_ptr + row_offsets + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(z_ptr + col_offsets + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            # 3xTF32: about fp32's precision (plain TF32 would round the cosines to ~1e-3 and could pick another
            # neighbour than fp32 math does).
            cosine = tl.dot(a, b, cosine, input_precision="tf32x3")
        cosine = tl.where(rows[:, None] == cols[None, :], -1.0, cosine)  # the official fill_diagonal_(-1)
        cosine = tl.where(col_mask[None, :], cosine, float("-inf"))
        tile_best = tl.max(cosine, axis=1)
        tile_index = tl.argmax(cosine, axis=1, tie_break_left=True) + col_start
        better = tile_best > best  # strictly: on a tie the earlier (lower) column stays
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    out = rows * n_splits + split
    tl.store(best_ptr + out, best, mask=row_mask)
    tl.store(best_index_ptr + out, best_index, mask=row_mask)


# 64 × 64 tiles of cosines (32 fp32 accumulators per thread at 4 warps), 32 columns of D per step: 16 KB of
# operands per pipeline stage, 48 KB for 3 stages, well inside sm_80's and sm_90's shared memory for every D (D is
# looped over, never held whole).
NEIGHBOUR = TritonKernel(_koleo_neighbour_kernel,
                         {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3})


@triton.jit
def _koleo_distance_kernel(
    z_ptr,  # fp32 (n_rows, n_cols) normalised features
    best_ptr,  # fp32 (n_rows, n_splits) from the neighbour search
    best_index_ptr,  # int32 (n_rows, n_splits)
    neighbour_ptr,  # int64 (n_rows,): nn(i)
    distance_ptr,  # fp32 (n_rows,): ‖z_i − z_nn(i) + 1e-8‖
    row_log_ptr,  # fp32 (n_rows,): log(d_i + eps)
    n_rows,
    n_cols,
    n_splits,
    eps,
    shift,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    best = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    neighbour = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    for s in range(0, n_splits):  # in column order, strictly larger wins: ties keep the lowest index
        value = tl.load(best_ptr + rows * n_splits + s, mask=row_mask, other=float("-inf"))
        index = tl.load(best_index_ptr + rows * n_splits + s, mask=row_mask, other=0)
        better = value > best
        best = tl.where(better, value, best)
        neighbour = tl.where(better, index, neighbour)
    row_offsets = rows.to(tl.int64)[:, None] * n_cols
    neighbour_offsets = neighbour.to(tl.int64)[:, None] * n_cols
    squares = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        zi = tl.load(z_ptr + row_offsets + cols[None, :], mask=mask, other=0.0)
        zn = tl.load(z_ptr + neighbour_offsets + cols[None, :], mask=mask, other=0.0)
        w = tl.where(mask, zi - zn + shift, 0.0)
        squares += tl.sum(w * w, axis=1)
    distance = tl.sqrt_rn(squares)
    tl.store(neighbour_ptr + rows, neighbour.to(tl.int64), mask=row_mask)
    tl.store(distance_ptr + rows, distance, mask=row_mask)
    tl.store(row_log_ptr + rows, tl.log(distance + eps), mask=row_mask)


# 16 rows × 128 columns per step (gathered neighbour rows: short contiguous runs per row).
DISTANCE = TritonKernel(_koleo_distance_kernel, {"BLOCK_ROWS": 16, "BLOCK_D": 128, "num_warps": 4})


@triton.jit
def _grad_z_chunk(z_ptr, distance_ptr, seg_rows_ptr, seg_begin, seg_end, j, cols, mask, zj, w_j, coef_j, n_cols,
                  eps, scale, shift):
    """Columns `cols` of the gradient w.r.t. z_j: c_j w_j − Σ_{i: nn(i)=j, i≠j} c_i (z_i − z_j + shift)."""
    g = coef_j * w_j
    for s in range(seg_begin, seg_end):
        i = tl.load(seg_rows_ptr + s)
        d_i = tl.load(distance_ptr + i)
        coef_i = tl.where((d_i > 0) & (i != j), scale / ((d_i + eps) * d_i), 0.0)
        zi = tl.load(z_ptr + i * n_cols + cols, mask=mask, other=0.0)
        g -= coef_i * tl.where(mask, zi - zj + shift, 0.0)
    return g


@triton.jit
def _koleo_backward_kernel(
    z_ptr,  # fp32 (n_rows, n_cols) normalised features
    norms_ptr,  # fp32 (n_rows,)
    neighbour_ptr,  # int64 (n_rows,)
    distance_ptr,  # fp32 (n_rows,)
    seg_start_ptr,  # int64 (n_rows + 1,): rows whose neighbour is j are seg_rows[seg_start[j]:seg_start[j + 1]]
    seg_rows_ptr,  # int64 (n_rows,)
    grad_output_ptr,  # fp32 0-d
    grad_ptr,  # (n_rows, n_cols), the features' dtype
    n_rows,
    n_cols,
    eps,
    shift,
    BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    # c_i = scale / ((d_i + eps) d_i), grad_output read on the device so the backward never waits for the host.
    scale = -tl.load(grad_output_ptr).to(tl.float32) / n_rows
    norm_j = tl.load(norms_ptr + j)
    inv_j = 1.0 / tl.maximum(norm_j, eps)
    nn = tl.load(neighbour_ptr + j)
    d_j = tl.load(distance_ptr + j)
    # The norm's gradient is 0 at 0. A row that is its own neighbour (B = 1, an antipodal tie) has a constant
    # distance: its own term and its segment entry cancel, and both are skipped (an exact 0, not a residue).
    coef_j = tl.where((d_j > 0) & (nn != j), scale / ((d_j + eps) * d_j), 0.0)
    seg_begin = tl.load(seg_start_ptr + j)
    seg_end = tl.load(seg_start_ptr + j + 1)
    row = z_ptr + j * n_cols
    neighbour_row = z_ptr + nn * n_cols
    # The projection z_j·g needs all of g first: a first sweep over D computes it (unless the clamp holds ‖x_j‖ at
    # eps), the second recomputes g chunk by chunk and writes the gradient. Rows are re-read from L2, never stored.
    projection = 0.0
    if norm_j >= eps:
        for start in range(0, n_cols, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < n_cols
            zj = tl.load(row + cols, mask=mask, other=0.0)
            w_j = tl.where(mask, zj - tl.load(neighbour_row + cols, mask=mask, other=0.0) + shift, 0.0)
            g = _grad_z_chunk(z_ptr, distance_ptr, seg_rows_ptr, seg_begin, seg_end, j, cols, mask, zj, w_j, coef_j,
                              n_cols, eps, scale, shift)
            projection += tl.sum(zj * g)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        zj = tl.load(row + cols, mask=mask, other=0.0)
        w_j = tl.where(mask, zj - tl.load(neighbour_row + cols, mask=mask, other=0.0) + shift, 0.0)
        g = _grad_z_chunk(z_ptr, distance_ptr, seg_rows_ptr, seg_begin, seg_end, j, cols, mask, zj, w_j, coef_j,
                          n_cols, eps, scale, shift)
        tl.store(grad_ptr + j * n_cols + cols, ((g - zj * projection) * inv_j).to(grad_ptr.dtype.element_ty),
                 mask=mask)


# One program per row, 512 columns per step (4 elements per thread at 4 warps).
BACKWARD = TritonKernel(_koleo_backward_kernel, {"BLOCK_D": 512, "num_warps": 4})


# ------------------------------------------------------------------------------------------------- launchers
def _splits(n_rows: int) -> tuple[int, int, int]:
    """(row blocks, column splits, column blocks per split) of the neighbour search: every split non-empty."""
    config = NEIGHBOUR.configs[0]
    row_blocks = cdiv(n_rows, config["BLOCK_M"])
    col_blocks = cdiv(n_rows, config["BLOCK_N"])
    per_split = cdiv(col_blocks, max(1, min(col_blocks, _TARGET_PROGRAMS // row_blocks)))
    return row_blocks, cdiv(col_blocks, per_split), per_split


def _koleo_triton(x: torch.Tensor, eps: float) -> Outputs:
    """Normalisation, neighbour search and distances of contiguous (B, D) fp32/fp16/bf16 features."""
    n_rows, n_cols = x.shape
    fp32 = dict(dtype=torch.float32, device=x.device)
    normalise_config, search_config, distance_config = NORMALISE.configs[0], NEIGHBOUR.configs[0], DISTANCE.configs[0]
    row_blocks, n_splits, per_split = _splits(n_rows)
    norms = torch.empty(n_rows, **fp32)
    z = torch.empty((n_rows, n_cols), **fp32)
    best = torch.empty((n_rows, n_splits), **fp32)
    best_index = torch.empty((n_rows, n_splits), dtype=torch.int32, device=x.device)
    neighbours = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    distances = torch.empty(n_rows, **fp32)
    row_log = torch.empty(n_rows, **fp32)
    NORMALISE.launch((cdiv(n_rows, normalise_config["BLOCK_ROWS"]),), normalise_config, x_ptr=x,
                     norms_ptr=norms, z_ptr=z, n_rows=n_rows, n_cols=n_cols, eps=eps)
    NEIGHBOUR.launch((row_blocks, n_splits), search_config, z_ptr=z, best_ptr=best, best_index_ptr=best_index,
                     n_rows=n_rows, n_cols=n_cols, n_splits=n_splits, blocks_per_split=per_split)
    DISTANCE.launch((cdiv(n_rows, distance_config["BLOCK_ROWS"]),), distance_config, z_ptr=z, best_ptr=best,
                    best_index_ptr=best_index, neighbour_ptr=neighbours, distance_ptr=distances, row_log_ptr=row_log,
                    n_rows=n_rows, n_cols=n_cols, n_splits=n_splits, eps=eps, shift=_SHIFT)
    return -row_log.mean(), neighbours, norms, distances, z


def _koleo_backward_triton(grad_output: torch.Tensor, features: torch.Tensor, z: torch.Tensor,
                           neighbours: torch.Tensor, norms: torch.Tensor, distances: torch.Tensor,
                           eps: float) -> torch.Tensor:
    n_rows, n_cols = z.shape
    # CSR segments of the inverse neighbour map: a stable sort keeps each segment in row order (deterministic sums).
    targets, seg_rows = torch.sort(neighbours, stable=True)
    seg_start = torch.searchsorted(targets, torch.arange(n_rows + 1, device=z.device))
    grad = torch.empty((n_rows, n_cols), dtype=features.dtype, device=z.device)
    BACKWARD.launch((n_rows,), BACKWARD.configs[0], z_ptr=z, norms_ptr=norms, neighbour_ptr=neighbours,
                    distance_ptr=distances, seg_start_ptr=seg_start, seg_rows_ptr=seg_rows,
                    grad_output_ptr=grad_output.to(torch.float32), grad_ptr=grad, n_rows=n_rows, n_cols=n_cols,
                    eps=eps, shift=_SHIFT)
    return grad


def aot_examples() -> None:
    """Forward and backward for every Triton dtype."""
    for dtype in TRITON_DTYPES:
        x = torch.empty(5, 7, dtype=dtype)
        _, neighbours, norms, distances, z = _koleo_triton(x, 1e-8)
        _koleo_backward_triton(torch.empty(()), x, z, neighbours.zero_(), norms, distances, 1e-8)


# ------------------------------------------------------------------------------------------------ dispatch
def _koleo_forward(features: torch.Tensor, eps: float) -> Outputs:
    """(loss, neighbours (B,) int64, norms (B,), distances (B,), z (B, D)), the floats in the accumulation dtype:
    the loss and what its backward needs."""
    impl = resolve(features.device, "koleo_loss", features.dtype, cuda_runs_triton=True)
    if impl == "reference":
        raise ValueError("dino_kernels::koleo is the fused kernel; under the 'reference' backend call "
                         "dino_kernels.koleo.koleo_loss, which runs dino_kernels.reference.koleo_loss")
    x = features.contiguous()
    if impl == "cpu":
        return ops().koleo_cpu(x, eps)
    return _koleo_triton(x, eps)


def _koleo_backward(grad_output: torch.Tensor, features: torch.Tensor, z: torch.Tensor, neighbours: torch.Tensor,
                    norms: torch.Tensor, distances: torch.Tensor, eps: float) -> torch.Tensor:
    """d(grad_output · loss)/d(features) from the forward's saved outputs, in the features' dtype (``features``
    gives only its dtype and shape)."""
    # C++ for CPU tensors unless the Triton kernels are asked for (a backend switched to "reference" between forward
    # and backward still gets the gradient of the fused forward).
    if z.device.type == "cpu" and resolve(z.device, "koleo_loss") != "triton":
        return ops().koleo_backward_cpu(grad_output, features, z, neighbours, norms, distances, eps)
    return _koleo_backward_triton(grad_output, features, z, neighbours, norms, distances, eps)


# ----------------------------------------------------------------------------------------------- registered ops
def _koleo_backward_fake(grad_output: torch.Tensor, features: torch.Tensor, z: torch.Tensor,
                         neighbours: torch.Tensor, norms: torch.Tensor, distances: torch.Tensor,
                         eps: float) -> torch.Tensor:
    return features.new_empty(features.shape)


_koleo_backward_op = KernelOp("koleo_backward", _koleo_backward, fake=_koleo_backward_fake)


def _koleo_fake(features: torch.Tensor, eps: float) -> Outputs:
    acc = accumulation_dtype(features)
    n_rows = features.shape[0]
    return (features.new_empty((), dtype=acc), features.new_empty((n_rows,), dtype=torch.int64),
            features.new_empty((n_rows,), dtype=acc), features.new_empty((n_rows,), dtype=acc),
            features.new_empty(features.shape, dtype=acc))


def _koleo_setup_context(ctx, inputs, output) -> None:
    features, eps = inputs
    ctx.eps = eps
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    # The features themselves only for their dtype and shape: saving them keeps no extra memory alive.
    ctx.save_for_backward(features, output[4], *output[1:4])


def _koleo_vjp(ctx, grad_loss, *_unused):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None
    return _koleo_backward_op(grad_loss, *ctx.saved_tensors, ctx.eps), None


_koleo_op = KernelOp("koleo", _koleo_forward, fake=_koleo_fake, setup_context=_koleo_setup_context,
                     backward=_koleo_vjp)


# ------------------------------------------------------------------------------------------------- public API
def koleo_loss(features: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo loss, fused: −mean_i log(‖z_i − z_nn(i) + 1e-8‖ + eps), z = x / max(‖x‖, eps) per row.

    Args:
        features: (B, D) with B, D >= 1, e.g. one global crop's CLS features; fp32, fp16, bf16 (or fp64 on the CPU
            backends). nn(i) is the other row of largest cosine (B = 1: the row itself; ties: the lowest index).
        eps: > 0, the normalisation clamp and the log's offset (DINOv2: 1e-8).

    Returns:
        The 0-d loss, fp32 (fp64 for fp64 features), differentiable w.r.t. ``features`` with the neighbours held
        fixed. Finite for duplicate rows and B = 1, also for fp16 features (the math runs in fp32).
    """
    check_floating("features", features)
    check_ndim("features", features, 2, "(B, D)")
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features must have B >= 1 rows and D >= 1 columns; got shape {tuple(features.shape)}")
    check_positive("eps", eps)
    if get_backend() == "reference":  # the eager official-style loss, with its own autograd
        return reference.koleo_loss(features, eps=eps)
    return _koleo_op(features, float(eps))[0]
