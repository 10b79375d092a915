"""Stochastic depth that skips the dropped samples: fused gather and scaled index-add, forward and backward.

timm's DropPath multiplies the residual of dropped samples by zero, so their compute is still spent. DINOv2
(``drop_add_residual_stochastic_depth[_list]``) runs each residual branch only on the kept samples: it gathers them
(xformers ``index_select_cat``), runs the branch, and adds the result back with a scaled index-add (xformers
``scaled_index_add``, LayerScale and ``alpha = B / kept`` fused). Those xformers kernels are CUDA-only Triton; here
both ops run on any device, with the multi-crop packed layout of :func:`dino_kernels.packed_attention`.

Kernels (Triton, below): every tensor is viewed as rows of ``(M, D)`` tiles, one row per sample, and one program
handles a ``BLOCK_M x BLOCK_D`` tile of one row, so the loads are contiguous along ``D`` (16-byte vectors when the
row width allows) and any row width works through masks.

- ``_gather_rows_kernel``: ``out[j] = alpha * scaling * src[index[j]]``. It is the forward of ``index_select_cat``
  (alpha 1, no scaling) and the backward of ``scaled_index_add`` for ``src`` (the gather of the grad rows, scaled),
  where it also reduces ``grad_out[index[j]] * src[j]`` over the tile's rows for the gradient of ``scaling``.
- ``_index_add_rows_kernel``: ``out[b] = x[b] + alpha * scaling * sum_{j: index[j] = b} src[j]`` in one pass that
  writes every output row once while copying ``x`` (the dropped rows) and fusing the add for the kept ones. It is
  the forward of ``scaled_index_add`` and, without ``x``, the backward of ``index_select_cat``.

Duplicate indices accumulate (xformers' and ``torch.index_add``'s semantics) without atomics: the launcher sorts
the index (stable, so the order of a row's contributions is fixed and results are deterministic) and builds CSR
segments ``seg_start`` (B + 1,), ``seg_rows`` (k,), once per index tensor and version (stochastic depth index-adds
with one index in the forward and again in the backward); program ``b`` sums ``src`` over its segment. Unique
indices, the stochastic-depth case, are the same path with segments of length 0 or 1, so they cost no extra pass.
Out-of-range indices: the public functions raise an ``IndexError`` for CPU tensors (and for CUDA tensors with
``DINO_KERNELS_DEBUG=1``); on CUDA they otherwise assert on the device (``torch._assert_async``), since a host check
would sync every call. Inside the kernels such rows can never be reached anyway (the gather masks them, and the
segments only cover ``[0, B)``), so no read or write ever leaves the tensors, also under ``torch.compile`` where the
value checks are skipped.

Registration: ``dino_kernels::scaled_index_add``, ``::index_select_cat``, ``::scaled_index_add_cat`` (the
multi-crop form's residual add: every group's from the branch's packed output, so that autograd neither splits it
nor concatenates its gradient) and their backward ops are :class:`~dino_kernels._op.KernelOp` s with fakes and
autograd, which is what ``torch.compile`` sees; eager calls run the same functions without the custom-op wrapper's
per-call cost.

CPU (``auto`` and ``cpu`` on CPU tensors): the C++ twins of both kernels (``csrc/stochastic_depth.cpp``: the same
contract, one pass per output row, duplicates summed in index order) for the index-add and every backward, and
``torch.index_select`` (already one pass) for the forward gather; math in fp32 (fp64 for fp64). They replaced a
copy, an ``index_add_`` and a dtype conversion per call, which cost a DINO step on 2 cores as much as a block's
attention. float64 on CUDA takes the torch path.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from dino_kernels import reference
from dino_kernels._backend import DEBUG_ENV_VAR, TRITON_DTYPES, accumulation_dtype, debug_enabled, resolve
from dino_kernels._extension import ops
from dino_kernels._launch import DerivedTensors, TritonKernel, cdiv
from dino_kernels._op import KernelOp, tracing
from dino_kernels._validation import check_float, check_floating, check_same_device, check_tensor
from dino_kernels.packing import cu_seqlens_for

# Program tiles, the two launch configs of both kernels. ROWS: 32 tokens x 128 features (4096 elements, 32 per
# thread); FLAT: a whole 1024-feature stretch of one token, for rows of at most FLAT_MAX_M tokens (e.g. (B, D)
# inputs) where a 32-token tile would idle.
ROWS_CONFIG = {"BLOCK_M": 32, "BLOCK_D": 128, "num_warps": 4}
FLAT_CONFIG = {"BLOCK_M": 1, "BLOCK_D": 1024, "num_warps": 4}
FLAT_MAX_M = 4
# Without a LayerScale vector the split of a row into (M, D) is free: D = gcd(row width, FREE_D) gives long
# contiguous, 16-byte-aligned stretches whenever the width has a power-of-two factor (e.g. DINOv2's flatten(1) rows).
FREE_D = 1024


# ---------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _tile(pid, n_m_blocks, n_d_blocks, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row, tile offsets inside the row, tile mask and (row, m-block) number of program ``pid``."""
    # One flat grid axis: axes 1 and 2 of a CUDA grid stop at 65535, which long rows or many rows would exceed.
    row_block = pid // n_d_blocks
    d_block = pid % n_d_blocks
    row = row_block // n_m_blocks
    m_block = row_block % n_m_blocks
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return row, row_block, offs_m[:, None] * D + offs_d[None, :], offs_d, mask


@triton.jit
def _gather_rows_kernel(
    src,  # (n_src, M, D): rows gathered from
    index,  # (n_out,) int32/int64: the src row of every output row
    out,  # (n_out, M, D)
    scaling,  # fp32 (D,): LayerScale, read when HAS_SCALING
    other,  # (n_out, M, D): multiplied with the gathered rows for `partial`, read when WITH_PRODUCT
    partial,  # fp32 (n_out * n_m_blocks, D): alpha * sum over each tile's rows of src[index[j]] * other[j]
    alpha,
    n_src,
    M,
    D,
    n_m_blocks,
    n_d_blocks,
    HAS_SCALING: tl.constexpr,
    WITH_PRODUCT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    j, row_block, tile, offs_d, mask = _tile(tl.program_id(0), n_m_blocks, n_d_blocks, M, D, BLOCK_M, BLOCK_D)
    row_numel = tl.cast(M, tl.int64) * D  # tl.cast: the JIT passes M = 1 as a plain int
    source_row = tl.load(index + j).to(tl.int64)
    # Out-of-range rows read as zeros instead of outside src (the public API has already raised for them).
    in_range = (source_row >= 0) & (source_row < n_src)
    gathered = tl.load(src + source_row * row_numel + tile, mask=mask & in_range, other=0.0).to(tl.float32)
    scaled = alpha * gathered
    if HAS_SCALING:
        # Loaded straight in the tile's 2-d layout (a broadcast row, L1 hits) to avoid a layout shuffle.
        scaled = scaled * tl.load(scaling + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
    tl.store(out + j * row_numel + tile, scaled.to(out.dtype.element_ty), mask=mask)
    if WITH_PRODUCT:
        # Per-tile partial sums, reduced by one deterministic torch.sum afterwards (no float atomics).
        o = tl.load(other + j * row_numel + tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial + row_block.to(tl.int64) * D + offs_d, alpha * tl.sum(gathered * o, axis=0),
                 mask=offs_d < D)


GATHER = TritonKernel(_gather_rows_kernel, ROWS_CONFIG, FLAT_CONFIG)


@triton.jit
def _index_add_rows_kernel(
    x,  # (B, M, D): copied to out, read when HAS_X (else out starts from zeros)
    src,  # (k, M, D): rows added
    out,  # (B, M, D)
    scaling,  # fp32 (D,): LayerScale, read when HAS_SCALING
    seg_start,  # int64 (B + 1,): output row b sums src rows seg_rows[seg_start[b]:seg_start[b + 1]]
    seg_rows,  # int64 (k,): src rows ordered by their (stably sorted) target row
    alpha,
    M,
    D,
    n_m_blocks,
    n_d_blocks,
    HAS_X: tl.constexpr,
    HAS_SCALING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, row_block, tile, offs_d, mask = _tile(tl.program_id(0), n_m_blocks, n_d_blocks, M, D, BLOCK_M, BLOCK_D)
    row_numel = tl.cast(M, tl.int64) * D  # tl.cast: the JIT passes M = 1 as a plain int
    start = tl.load(seg_start + b)
    end = tl.load(seg_start + b + 1)
    # Duplicates accumulate here in fp32, in a fixed order; a dropped row has an empty segment and is a copy of x.
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for p in range(start, end):
        j = tl.load(seg_rows + p)
        acc += tl.load(src + j * row_numel + tile, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALING:
        acc = acc * tl.load(scaling + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
    result = alpha * acc
    if HAS_X:
        result += tl.load(x + b.to(tl.int64) * row_numel + tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + b.to(tl.int64) * row_numel + tile, result.to(out.dtype.element_ty), mask=mask)


INDEX_ADD = TritonKernel(_index_add_rows_kernel, ROWS_CONFIG, FLAT_CONFIG)


# ------------------------------------------------------------------------------------------------- launchers
def _row_shape(row_numel: int, width: int | None) -> tuple[int, int]:
    """(M, D) of a row of ``row_numel`` elements: D is the LayerScale width when there is one, else free."""
    d = width if width is not None else math.gcd(row_numel, FREE_D)
    return row_numel // d, d


def _tile_config(m: int) -> dict[str, int]:
    return FLAT_CONFIG if m <= FLAT_MAX_M else ROWS_CONFIG


def _grid(rows: int, m: int, d: int, config: dict[str, int]) -> tuple[int, int, int]:
    n_m_blocks, n_d_blocks = cdiv(m, config["BLOCK_M"]), cdiv(d, config["BLOCK_D"])
    return rows * n_m_blocks * n_d_blocks, n_m_blocks, n_d_blocks


@functools.lru_cache(maxsize=64)
def _row_boundaries(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``arange(rows + 1)``, built once per (rows, dtype, device): no per-call work in a training loop (never an
    inference tensor, which autograd could not save as the identity index, whatever mode first asks for it)."""
    with torch.inference_mode(False):
        return torch.arange(rows + 1, dtype=dtype, device=device)


def _identity(rows: int, device: torch.device) -> torch.Tensor:
    """The index ``arange(rows)`` (cached)."""
    return _row_boundaries(rows, torch.int64, device)[:-1]


# CSR segments by index tensor: stochastic depth index-adds with one kept-sample index twice, in the forward
# (scaled_index_add) and in the backward of the gather (index_select_cat).
_SEGMENTS = DerivedTensors()


def _sorted_segments(index: torch.Tensor, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    targets, seg_rows = torch.sort(index, stable=True)
    return torch.searchsorted(targets, _row_boundaries(rows, index.dtype, device)), seg_rows


def _segments(index: torch.Tensor | None, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR form of ``index``: ``seg_rows`` lists the src rows sorted by target, ``seg_start[b]`` where row b's begin
    (built once per index tensor, version and ``rows``)."""
    if index is None:  # the identity: row b is src row b
        return _row_boundaries(rows, torch.int64, device), _identity(rows, device)
    return _SEGMENTS.get(index, (rows,), lambda: _sorted_segments(index, rows, device))


@functools.lru_cache(maxsize=8)
def _placeholder(device: torch.device) -> torch.Tensor:
    """fp32 stand-in for the scaling pointer of a launch without LayerScale (never read: HAS_SCALING is off)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _scaling_as(scaling: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if scaling is None else scaling.detach().to(dtype).contiguous()


def _scaling_fp32(scaling: torch.Tensor | None) -> torch.Tensor | None:
    return _scaling_as(scaling, torch.float32)


def _gather_triton(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, alpha: float,
                   scaling: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
    """``out[j] = alpha * scaling * src[index[j]]`` for rows of ``src.shape[1:]``; with ``other``, also returns the
    fp32 (D,) sum over every row and token of ``alpha * src[index[j]] * other[j]`` (the gradient of ``scaling``)."""
    n, row_numel = index.shape[0], math.prod(src.shape[1:])
    if n == 0 or row_numel == 0:
        width = scaling.shape[0] if scaling is not None else 0
        return None if other is None else torch.zeros(width, dtype=torch.float32, device=src.device)
    m, d = _row_shape(row_numel, scaling.shape[0] if scaling is not None else None)
    config = _tile_config(m)
    programs, n_m_blocks, n_d_blocks = _grid(n, m, d, config)
    partial = torch.empty((n * n_m_blocks, d) if other is not None else (1,), dtype=torch.float32, device=src.device)
    GATHER.launch((programs,), config, src=src, index=index.contiguous(), out=out,
                  scaling=scaling if scaling is not None else partial, other=other if other is not None else out,
                  partial=partial, alpha=alpha, n_src=src.shape[0], M=m, D=d, n_m_blocks=n_m_blocks,
                  n_d_blocks=n_d_blocks, HAS_SCALING=scaling is not None, WITH_PRODUCT=other is not None)
    return partial.sum(0) if other is not None else None


def _index_add_triton(x: torch.Tensor | None, index: torch.Tensor | None, src: torch.Tensor, out: torch.Tensor,
                      alpha: float, scaling: torch.Tensor | None) -> None:
    """``out = x + alpha * scaling * (sum of src rows per index target)``; zeros instead of ``x`` when it is None."""
    rows, row_numel = out.shape[0], math.prod(out.shape[1:])
    if rows == 0 or row_numel == 0:
        return
    m, d = _row_shape(row_numel, scaling.shape[0] if scaling is not None else None)
    config = _tile_config(m)
    programs, n_m_blocks, n_d_blocks = _grid(rows, m, d, config)
    seg_start, seg_rows = _segments(index, rows, out.device)
    INDEX_ADD.launch((programs,), config, x=x if x is not None else out, src=src, out=out,
                     scaling=scaling if scaling is not None else _placeholder(out.device), seg_start=seg_start,
                     seg_rows=seg_rows, alpha=alpha, M=m, D=d, n_m_blocks=n_m_blocks, n_d_blocks=n_d_blocks,
                     HAS_X=x is not None, HAS_SCALING=scaling is not None)


def aot_examples() -> None:
    """Every launch the dispatch functions make, per dtype (and user index dtype) and tile config: the gather plain
    (index_select_cat, grad of src), scaled (grad of src with LayerScale) and with the product (and the grad of the
    LayerScale); the index-add of x + src, of x + scaled src (scaled_index_add) and of zeros + src (the gather's
    backward). Rows of 1 token take the flat tile, rows of 5 tokens the 32-token one."""
    for dtype, tokens in itertools.product(TRITON_DTYPES, (1, 5)):
        x, src, scaling = torch.empty(3, tokens, 8, dtype=dtype), torch.empty(2, tokens, 8, dtype=dtype), torch.empty(8)
        for index_dtype in (torch.int64, torch.int32):
            index = torch.tensor([2, 0], dtype=index_dtype)
            for with_scaling, other in ((None, None), (scaling, None), (scaling, src)):
                _gather_triton(x, index, src, 1.0, with_scaling, other)
            for with_x, with_scaling in ((x, None), (x, scaling), (None, None)):
                _index_add_triton(with_x, index, src, torch.empty_like(x), 1.0, with_scaling)


def _cpu_scaling(src: torch.Tensor, scaling: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """What the C++ kernels take besides the rows: scaling in the accumulation dtype, and the width a row is split
    into (scaling's length; without scaling the whole row)."""
    width = scaling.shape[0] if scaling is not None else max(math.prod(src.shape[1:]), 1)
    return _scaling_as(scaling, accumulation_dtype(src)), width


def _gather_cpu(src: torch.Tensor, index: torch.Tensor | None, alpha: float, scaling: torch.Tensor | None,
                other: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ gather: ``(alpha * scaling * src[index], sum of src[index] * other per feature)`` (the sum (0,)
    without ``other``); ``index`` None is the identity."""
    scaling, width = _cpu_scaling(src, scaling)
    return ops().gather_rows_cpu(src.contiguous(), index, alpha, scaling,
                                 None if other is None else other.contiguous(), width)


def _index_add_cpu(x: torch.Tensor | None, index: torch.Tensor | None, src: torch.Tensor, rows: int, alpha: float,
                   scaling: torch.Tensor | None) -> torch.Tensor:
    """The C++ index-add: ``x + alpha * scaling * (sum of src rows per index target)`` (zeros for x None)."""
    scaling, width = _cpu_scaling(src, scaling)
    return ops().index_add_rows_cpu(None if x is None else x.contiguous(), index, src.contiguous(), rows, alpha,
                                    scaling, width)


# ------------------------------------------------------------------------------------------------ dispatch
# Triton serves the `cuda` and `triton` backends for fp32/fp16/bf16 (resolve() refuses float64 for `triton`), the C++
# kernels the `auto` and `cpu` backends on CPU tensors; float64 on CUDA takes the torch path (index_select /
# index_add_ in float64).
def _runs_triton(impl: str, dtype: torch.dtype) -> bool:
    return impl in ("cuda", "triton") and dtype in TRITON_DTYPES


def _scaled_index_add_forward(x: torch.Tensor, index: torch.Tensor | None, src: torch.Tensor,
                              scaling: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``index`` None is the identity (src has x's rows): eval mode and batches that keep every sample."""
    impl = resolve(x.device, "scaled_index_add", x.dtype)
    if _runs_triton(impl, x.dtype):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        _index_add_triton(x.contiguous(), index, src.contiguous(), out, alpha, _scaling_fp32(scaling))
        return out
    if impl == "cpu":
        return _index_add_cpu(x, index, src, x.shape[0], alpha, scaling)
    index = index if index is not None else _identity(x.shape[0], x.device)
    if impl == "reference":
        return reference.scaled_index_add(x, index, src, alpha=alpha, scaling=scaling).contiguous()
    acc = accumulation_dtype(x)
    update = src.to(acc) if scaling is None else src.to(acc) * scaling.to(acc)
    out = x.to(acc, memory_format=torch.contiguous_format, copy=True)
    return out.index_add_(0, index, update, alpha=alpha).to(x.dtype)


def _scaled_index_add_backward(grad: torch.Tensor, index: torch.Tensor | None, src: torch.Tensor,
                               scaling: torch.Tensor | None, alpha: float,
                               need_scaling_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad of src (``alpha * scaling * grad[index]``) and of scaling ((0,) when not needed)."""
    return _scaled_index_add_backward_into(None, grad, index, src, scaling, alpha, need_scaling_grad)


def _scaled_index_add_backward_into(out: torch.Tensor | None, grad: torch.Tensor, index: torch.Tensor | None,
                                    src: torch.Tensor, scaling: torch.Tensor | None, alpha: float,
                                    need_scaling_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_scaled_index_add_backward` with the grad of src written into ``out`` (contiguous, src's shape) when
    given: the Triton gather writes it there, the other paths copy."""
    impl = resolve(grad.device, "scaled_index_add", grad.dtype)
    no_scaling_grad = grad.new_empty(0)  # the op always returns two tensors
    if _runs_triton(impl, grad.dtype):
        grad_src = out if out is not None else torch.empty_like(src, memory_format=torch.contiguous_format)
        index = index if index is not None else _identity(grad.shape[0], grad.device)
        grad_scaling = _gather_triton(grad.contiguous(), index, grad_src, alpha, _scaling_fp32(scaling),
                                      src.contiguous() if need_scaling_grad else None)
        return grad_src, grad_scaling.to(scaling.dtype) if need_scaling_grad else no_scaling_grad
    if impl == "cpu":
        grad_src, product = _gather_cpu(grad, index, alpha, scaling, src if need_scaling_grad else None)
        grad_src = grad_src if out is None else out.copy_(grad_src)
        return grad_src, (alpha * product).to(scaling.dtype) if need_scaling_grad else no_scaling_grad
    acc = accumulation_dtype(grad)
    rows = (grad if index is None else grad.index_select(0, index)).to(acc)
    factor = alpha if scaling is None else alpha * scaling.to(acc)
    grad_src = (rows * factor).to(src.dtype).contiguous()
    grad_src = grad_src if out is None else out.copy_(grad_src)
    if not need_scaling_grad:
        return grad_src, no_scaling_grad
    grad_scaling = alpha * (rows * src.to(acc)).reshape(-1, scaling.shape[0]).sum(0)
    return grad_src, grad_scaling.to(scaling.dtype)


def _index_select_cat_forward(xs: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
    impl = resolve(xs[0].device, "index_select_cat", xs[0].dtype)
    triton = _runs_triton(impl, xs[0].dtype)
    if impl == "reference":
        return reference.index_select_cat(xs, indices)
    rows = [i.shape[0] * math.prod(x.shape[1:-1]) for x, i in zip(xs, indices)]
    out = xs[0].new_empty((sum(rows), xs[0].shape[-1]))
    # Each group writes straight into its slice of the packed output: no per-group temporary, no torch.cat.
    # One launch per group (DINO has one or two groups): a multi-group launch would need a table of base pointers,
    # which the Triton interpreter cannot load.
    for x, index, part in zip(xs, indices, out.split(rows)):
        target = part.view(index.shape[0], *x.shape[1:])
        if triton:
            _gather_triton(x.contiguous(), index, target, 1.0, None, None)
        else:
            torch.index_select(x, 0, index, out=target)
    return out


def _index_select_cat_backward(grad: torch.Tensor, indices: list[torch.Tensor], group_rows: list[int],
                               group_tokens: list[int]) -> list[torch.Tensor]:
    """Per group: a (B_i, M_i, D) zero tensor with the packed grad rows added at their indices."""
    width = grad.shape[-1]
    impl = resolve(grad.device, "index_select_cat", grad.dtype)
    triton = _runs_triton(impl, grad.dtype)
    grads = []
    parts = grad.split([i.shape[0] * n for i, n in zip(indices, group_tokens)])
    for index, rows, tokens, part in zip(indices, group_rows, group_tokens, parts):
        part = part.reshape(index.shape[0], tokens, width)
        if impl == "cpu":
            grads.append(_index_add_cpu(None, index, part, rows, 1.0, None))
        elif triton:
            out = grad.new_empty((rows, tokens, width))
            _index_add_triton(None, index, part.contiguous(), out, 1.0, None)
            grads.append(out)
        else:
            zeros = grad.new_zeros((rows, tokens, width), dtype=accumulation_dtype(grad))
            grads.append(zeros.index_add_(0, index, part.to(zeros.dtype)).to(grad.dtype))
    return grads


def _group_rows(packed: torch.Tensor, groups: Sequence[torch.Tensor],
                indices: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Each group's rows of the packed ``(sum_i k_i * M_i, D)`` tensor as ``(k_i, *groups[i].shape[1:])``, where
    ``k_i`` is ``len(indices[i])`` (the group's batch size for None)."""
    counts = [index.shape[0] if index is not None else group.shape[0] for group, index in zip(groups, indices)]
    parts = packed.split([k * math.prod(group.shape[1:-1]) for group, k in zip(groups, counts)])
    return [part.reshape(k, *group.shape[1:]) for part, group, k in zip(parts, groups, counts)]


def _scaled_index_add_cat_forward(xs: list[torch.Tensor], indices: list[torch.Tensor | None], packed: torch.Tensor,
                                  scaling: torch.Tensor | None, alphas: list[float]) -> list[torch.Tensor]:
    """The inverse of index_select_cat: per group, ``xs[i]`` plus ``alphas[i] * scaling`` times its rows of
    ``packed`` added at ``indices[i]`` (None: the identity). The residual add of multi-crop stochastic depth, taking
    the branch's packed output as it is (no split and no concatenation of its gradient in autograd)."""
    return [_scaled_index_add_forward(x, index, part, scaling, alpha)
            for x, index, part, alpha in zip(xs, indices, _group_rows(packed, xs, indices), alphas)]


def _scaled_index_add_cat_backward(grads: list[torch.Tensor], indices: list[torch.Tensor | None],
                                   packed: torch.Tensor, scaling: torch.Tensor | None, alphas: list[float],
                                   need_scaling_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad of packed (each group's ``alpha * scaling * grad[index]``, written into its rows) and of scaling (the
    sum over groups; (0,) when not needed)."""
    grad_packed = torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
    grad_scaling = None
    for grad, index, src, alpha, out in zip(grads, indices, _group_rows(packed, grads, indices), alphas,
                                            _group_rows(grad_packed, grads, indices)):
        _, group_scaling = _scaled_index_add_backward_into(out, grad, index, src, scaling, alpha, need_scaling_grad)
        grad_scaling = group_scaling if grad_scaling is None else grad_scaling + group_scaling
    return grad_packed, grad_scaling if grad_scaling is not None else packed.new_empty(0)


# ----------------------------------------------------------------------------------------------- registered op
def _scaled_index_add_backward_fake(grad: torch.Tensor, index: torch.Tensor | None, src: torch.Tensor,
                                    scaling: torch.Tensor | None, alpha: float,
                                    need_scaling_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad_scaling = scaling.new_empty(scaling.shape) if need_scaling_grad else grad.new_empty((0,))
    return src.new_empty(src.shape), grad_scaling


_scaled_index_add_backward_op = KernelOp("scaled_index_add_backward", _scaled_index_add_backward,
                                         fake=_scaled_index_add_backward_fake)


def _scaled_index_add_fake(x: torch.Tensor, index: torch.Tensor | None, src: torch.Tensor,
                           scaling: torch.Tensor | None, alpha: float) -> torch.Tensor:
    return x.new_empty(x.shape)


def _scaled_index_add_setup_context(ctx, inputs, output) -> None:
    x, index, src, scaling, alpha = inputs
    ctx.alpha = alpha
    ctx.need_scaling_grad = scaling is not None and ctx.needs_input_grad[3]
    # src is only needed for the gradient of scaling: do not keep the branch output alive otherwise.
    ctx.save_for_backward(index, src if ctx.need_scaling_grad else None, scaling)
    ctx.src_meta = (src.shape, src.dtype, src.device)


def _scaled_index_add_vjp(ctx, grad):
    """Gradients of (x, index, src, scaling, alpha)."""
    index, src, scaling = ctx.saved_tensors
    grad_src = grad_scaling = None
    if ctx.needs_input_grad[2] or ctx.need_scaling_grad:
        if src is None:  # a (0-stride) stand-in with src's metadata: the kernels never read it
            shape, dtype, device = ctx.src_meta
            src = torch.empty((), dtype=dtype, device=device).expand(shape)
        grad_src, grad_scaling = _scaled_index_add_backward_op(grad, index, src, scaling, ctx.alpha,
                                                               ctx.need_scaling_grad)
    return (grad, None, grad_src if ctx.needs_input_grad[2] else None,
            grad_scaling if ctx.need_scaling_grad else None, None)


_scaled_index_add_op = KernelOp("scaled_index_add", _scaled_index_add_forward, fake=_scaled_index_add_fake,
                                setup_context=_scaled_index_add_setup_context, backward=_scaled_index_add_vjp)


def _index_select_cat_backward_fake(grad: torch.Tensor, indices: list[torch.Tensor], group_rows: list[int],
                                    group_tokens: list[int]) -> list[torch.Tensor]:
    return [grad.new_empty((rows, tokens, grad.shape[-1])) for rows, tokens in zip(group_rows, group_tokens)]


_index_select_cat_backward_op = KernelOp("index_select_cat_backward", _index_select_cat_backward,
                                         fake=_index_select_cat_backward_fake)


def _index_select_cat_fake(xs: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
    rows = sum(i.shape[0] * math.prod(x.shape[1:-1]) for x, i in zip(xs, indices))
    return xs[0].new_empty((rows, xs[0].shape[-1]))


def _index_select_cat_setup_context(ctx, inputs, output) -> None:
    xs, indices = inputs
    ctx.save_for_backward(*indices)
    ctx.shapes = [x.shape for x in xs]


def _index_select_cat_vjp(ctx, grad):
    """Gradients of (xs, indices): every group's, none for the indices."""
    rows = [shape[0] for shape in ctx.shapes]
    tokens = [math.prod(shape[1:-1]) for shape in ctx.shapes]
    grads = _index_select_cat_backward_op(grad, list(ctx.saved_tensors), rows, tokens)
    return [g.view(shape) for g, shape in zip(grads, ctx.shapes)], [None] * len(ctx.shapes)


_index_select_cat_op = KernelOp("index_select_cat", _index_select_cat_forward, fake=_index_select_cat_fake,
                                setup_context=_index_select_cat_setup_context, backward=_index_select_cat_vjp)


def _scaled_index_add_cat_backward_fake(grads: list[torch.Tensor], indices: list[torch.Tensor | None],
                                        packed: torch.Tensor, scaling: torch.Tensor | None, alphas: list[float],
                                        need_scaling_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad_scaling = scaling.new_empty(scaling.shape) if need_scaling_grad else packed.new_empty((0,))
    return packed.new_empty(packed.shape), grad_scaling


_scaled_index_add_cat_backward_op = KernelOp("scaled_index_add_cat_backward", _scaled_index_add_cat_backward,
                                             fake=_scaled_index_add_cat_backward_fake)


def _scaled_index_add_cat_fake(xs: list[torch.Tensor], indices: list[torch.Tensor | None], packed: torch.Tensor,
                               scaling: torch.Tensor | None, alphas: list[float]) -> list[torch.Tensor]:
    return [x.new_empty(x.shape) for x in xs]


def _scaled_index_add_cat_setup_context(ctx, inputs, output) -> None:
    xs, indices, packed, scaling, alphas = inputs
    ctx.alphas = alphas
    # Not ctx.needs_input_grad: with list arguments the registered op's setup sees it flat (one entry per tensor).
    ctx.need_scaling_grad = scaling is not None and scaling.requires_grad
    # packed is only needed for the gradient of scaling: do not keep the branch output alive otherwise.
    ctx.save_for_backward(packed if ctx.need_scaling_grad else None, scaling, *indices)
    ctx.packed_meta = (packed.shape, packed.dtype, packed.device)


def _scaled_index_add_cat_vjp(ctx, grads):
    """Gradients of (xs, indices, packed, scaling, alphas): every x's is its output's."""
    packed, scaling, *indices = ctx.saved_tensors
    grad_packed = grad_scaling = None
    if ctx.needs_input_grad[2] or ctx.need_scaling_grad:
        if packed is None:  # a (0-stride) stand-in with packed's metadata: the kernels never read it
            shape, dtype, device = ctx.packed_meta
            packed = torch.empty((), dtype=dtype, device=device).expand(shape)
        grad_packed, grad_scaling = _scaled_index_add_cat_backward_op(list(grads), indices, packed, scaling,
                                                                      ctx.alphas, ctx.need_scaling_grad)
    # None for the indices: one None for a list that holds a None (the registered op's autograd takes such a list
    # as one input), one per index otherwise.
    no_index_grads = None if any(index is None for index in indices) else [None] * len(indices)
    return (list(grads), no_index_grads, grad_packed if ctx.needs_input_grad[2] else None,
            grad_scaling if ctx.need_scaling_grad else None, None)


_scaled_index_add_cat_op = KernelOp("scaled_index_add_cat", _scaled_index_add_cat_forward,
                                    fake=_scaled_index_add_cat_fake, setup_context=_scaled_index_add_cat_setup_context,
                                    backward=_scaled_index_add_cat_vjp)


# ------------------------------------------------------------------------------------------------- public API
def _check_index(name: str, index: object, rows: int, device: torch.device) -> torch.Tensor:
    index = check_tensor(name, index)
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must have dtype int64 or int32; got {str(index.dtype).removeprefix('torch.')}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-d; got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the tensor it indexes is on {device}")
    if index.numel() == 0 or tracing(index):
        # Under torch.compile a value check would be a data-dependent branch; the kernels' masks still keep every
        # access inside the tensors.
        return index
    if device.type == "cuda" and not debug_enabled():
        # A host check would sync every call: assert on the device instead (as packed_attention does).
        in_range = (index >= 0).logical_and_(index < rows).all()
        torch._assert_async(in_range, f"{name} holds row numbers outside [0, {rows}); set {DEBUG_ENV_VAR}=1 for "
                                      "an IndexError with the values")
        return index
    low, high = torch.stack(torch.aminmax(index)).tolist()
    if low < 0 or high >= rows:
        raise IndexError(f"{name} must hold row numbers in [0, {rows}); got values in [{low}, {high}]")
    return index


def _check_scaling(scaling: object, x: torch.Tensor) -> None:
    check_floating("scaling", scaling)
    if scaling.shape != (x.shape[-1],):
        raise ValueError(f"scaling must have shape ({x.shape[-1]},) (the last dim of x); got {tuple(scaling.shape)}")
    check_same_device(x=x, scaling=scaling)


def scaled_index_add(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, alpha: float = 1.0,
                     scaling: torch.Tensor | None = None) -> torch.Tensor:
    """Out of place ``out = x; out[index[j]] += alpha * scaling * src[j]`` (xformers' ``scaled_index_add``).

    Args:
        x: (B, ..., D) float32/float16/bfloat16/float64.
        index: (k,) int64 or int32 rows of x in [0, B), else ``IndexError`` (on CUDA a device-side assert unless
            ``DINO_KERNELS_DEBUG=1``). Duplicates accumulate (like ``torch.index_add``), deterministically.
        src: (k, ..., D), the trailing shape of x; cast to x's dtype when it differs (as DINOv2 does).
        alpha: a Python float multiplying every added row (``B / kept`` in stochastic depth).
        scaling: optional (D,) LayerScale vector, any float dtype, multiplied into src along the last dim.

    Returns a new contiguous tensor shaped and typed like x; math in fp32 (fp64 for fp64), one rounding.
    Differentiable in x, src and scaling.
    """
    check_floating("x", x)
    check_floating("src", src)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, ..., D) with at least 2 dims; got shape {tuple(x.shape)}")
    check_same_device(x=x, src=src)
    index = _check_index("index", index, x.shape[0], x.device)
    if src.dim() != x.dim() or src.shape[1:] != x.shape[1:]:
        raise ValueError(f"src must have shape (len(index), *x.shape[1:]) = ({index.shape[0]}, "
                         f"{', '.join(map(str, x.shape[1:]))}); got {tuple(src.shape)}")
    if src.shape[0] != index.shape[0]:
        raise ValueError(f"src must have one row per index: len(index) = {index.shape[0]}, src has {src.shape[0]}")
    if scaling is not None:
        _check_scaling(scaling, x)
    alpha = check_float("alpha", alpha)
    return _scaled_index_add_op(x, index, src.to(x.dtype), scaling, alpha)


def index_select_cat(xs: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gather rows ``xs[i][indices[i]]`` of several groups into one packed tensor (xformers' ``index_select_cat``).

    Args:
        xs: groups (B_i, ..., D) with the same last dim D, dtype and device (e.g. DINO's (B_i, N_i, D) crops).
        indices: (k_i,) int64/int32 rows of each group, in [0, B_i) (checked like scaled_index_add's index);
            repeated rows are gathered repeatedly and their gradients accumulate.

    Returns (sum_i k_i * M_i, D) with M_i the product of xs[i].shape[1:-1]: group after group, each selected row's
    tokens contiguous, i.e. ``torch.cat([x[i].reshape(-1, D) for x, i in zip(xs, indices)])``, the layout of
    :func:`dino_kernels.pack` (``.view(-1)`` gives xformers' flat layout). Differentiable in every xs[i].
    """
    xs, indices = list(xs), list(indices)
    if not xs:
        raise ValueError("xs must hold at least one tensor; got an empty list")
    if len(indices) != len(xs):
        raise ValueError(f"indices must have one index per group: {len(xs)} groups, {len(indices)} indices")
    for i, x in enumerate(xs):
        check_floating(f"xs[{i}]", x)
        if x.dim() < 2:
            raise ValueError(f"xs[{i}] must be (B, ..., D) with at least 2 dims; got shape {tuple(x.shape)}")
        if x.dtype != xs[0].dtype:
            raise TypeError(f"every group must have one dtype: xs[0] is {xs[0].dtype}, xs[{i}] is {x.dtype}")
        if x.shape[-1] != xs[0].shape[-1]:
            raise ValueError(f"every group must have the last dim of xs[0] ({xs[0].shape[-1]}); "
                             f"xs[{i}] has shape {tuple(x.shape)}")
        check_same_device(**{"xs[0]": xs[0], f"xs[{i}]": x})
        _check_index(f"indices[{i}]", indices[i], x.shape[0], x.device)
    return _index_select_cat_op(xs, indices)


def _check_group(name: str, x: object) -> None:
    check_floating(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must be (B, N, D); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample; got shape {tuple(x.shape)}")


def _check_crop_groups(xs: list) -> None:
    for i, x in enumerate(xs):
        _check_group(f"xs[{i}]", x)
    if not xs:
        raise ValueError("xs must hold at least one crop group; got an empty list")
    for i, x in enumerate(xs):
        if x.shape[-1] != xs[0].shape[-1] or x.dtype != xs[0].dtype:
            raise ValueError(f"every crop group must have the dim and dtype of xs[0] ({xs[0].shape[-1]}, "
                             f"{xs[0].dtype}); xs[{i}] has shape {tuple(x.shape)} and dtype {x.dtype}")
        check_same_device(**{"xs[0]": xs[0], f"xs[{i}]": x})


def _check_residual(residual: object, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"branch must return a torch.Tensor, got {type(residual).__name__}")
    if tuple(residual.shape) != shape:
        raise ValueError(f"branch must return the shape of its input {what} {shape}; got {tuple(residual.shape)}")
    return residual


def kept_count(batch: int, drop_rate: float) -> int:
    """How many of ``batch`` samples :func:`drop_add_residual` keeps at ``drop_rate`` in training (DINOv2's rule):
    ``max(int(batch * (1 - drop_rate)), 1)``. Known on the host, e.g. for a branch that needs its crop groups."""
    return max(int(batch * (1.0 - drop_rate)), 1)


def _kept_samples(batch: int, drop_rate: float, generator: torch.Generator | None,
                  device: torch.device) -> tuple[torch.Tensor | None, int]:
    """DINOv2's subset: :func:`kept_count` rows of ``randperm(B)``.

    Returns (None, B) without drawing random numbers when every sample is kept.
    """
    keep = kept_count(batch, drop_rate)
    if keep >= batch:
        return None, batch
    rng_device = generator.device if generator is not None else device
    return torch.randperm(batch, generator=generator, device=rng_device)[:keep].to(device), keep


def _drop_add_residual_tensor(x, branch, drop_rate, training, generator, scaling):
    batch, tokens, width = x.shape
    kept, keep = _kept_samples(batch, drop_rate, generator, x.device) if training else (None, batch)
    subset = x if kept is None else _index_select_cat_op([x], [kept]).view(keep, tokens, width)
    residual = _check_residual(branch(subset), (keep, tokens, width), "x[kept]")
    return _scaled_index_add_op(x, kept, residual.to(x.dtype), scaling, batch / keep)


def _drop_add_residual_list(xs, branch, drop_rate, training, generator, scaling):
    drawn = [_kept_samples(x.shape[0], drop_rate, generator, x.device) if training else (None, x.shape[0])
             for x in xs]
    # Groups that keep every sample are gathered with the identity (cached): packing needs the copy anyway.
    gather = [kept if kept is not None else _identity(x.shape[0], x.device)
              for x, (kept, _) in zip(xs, drawn)]
    packed = _index_select_cat_op(xs, gather)
    lengths = tuple((keep, x.shape[1]) for x, (_, keep) in zip(xs, drawn))
    residual = branch(packed, *cu_seqlens_for(lengths, packed.device))
    residual = _check_residual(residual, tuple(packed.shape), "packed tensor")
    return _scaled_index_add_cat_op(xs, [kept for kept, _ in drawn], residual.to(xs[0].dtype), scaling,
                                    [x.shape[0] / keep for x, (_, keep) in zip(xs, drawn)])


def drop_add_residual(
    x: torch.Tensor | Sequence[torch.Tensor],
    branch: Callable[..., torch.Tensor],
    drop_rate: float,
    *,
    training: bool = True,
    generator: torch.Generator | None = None,
    scaling: torch.Tensor | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Residual add with sample-skipping stochastic depth (DINOv2's ``drop_add_residual_stochastic_depth``).

    Tensor form: x (B, N, D). In training, keep = max(int(B * (1 - drop_rate)), 1) samples drawn uniformly without
    replacement (``torch.randperm`` from ``generator`` when given), run ``branch`` ((b, N, D) -> (b, N, D)) on those
    rows only and return ``x + (B / keep) * scaling * branch(x[kept])`` on kept rows, x on the others. With
    ``training=False``: ``x + scaling * branch(x)``. When every sample is kept no random numbers are drawn.

    Multi-crop form: x a list of crop groups (B_i, N_i, D) with one D, dtype and device. Each group keeps its own
    subset; the kept samples of all groups are gathered into one packed (sum_i keep_i * N_i, D) tensor and
    ``branch(packed, cu_seqlens, max_seqlen)`` runs once on it (``cu_seqlens`` int32 (S + 1,), one sequence per
    kept image, ``max_seqlen`` = max N_i: the convention of :func:`dino_kernels.packed_attention`). Returns the list.

    Args:
        drop_rate: in [0, 1), else ``ValueError``.
        scaling: optional (D,) LayerScale vector fused into the add.

    Differentiable in x, in the branch's parameters and in scaling. The branch output is cast to x's dtype.
    """
    if not 0.0 <= check_float("drop_rate", drop_rate) < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1); got {drop_rate}")
    if not callable(branch):
        raise TypeError(f"branch must be callable, got {type(branch).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    groups = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else None
    if groups is None:
        raise TypeError(f"x must be a tensor (B, N, D) or a list of them; got {type(x).__name__}")
    if scaling is not None and groups and isinstance(groups[0], torch.Tensor):
        _check_scaling(scaling, groups[0])
    if isinstance(x, torch.Tensor):
        _check_group("x", x)
        return _drop_add_residual_tensor(x, branch, drop_rate, training, generator, scaling)
    _check_crop_groups(groups)
    return _drop_add_residual_list(groups, branch, drop_rate, training, generator, scaling)
