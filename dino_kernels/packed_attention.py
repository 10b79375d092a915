"""Sequence-packed block-diagonal attention: every crop of every image in one call, each token attending only to
the tokens of its own sequence (DINOv2's xformers ``BlockDiagonalMask``, without xformers).

Layout (flash-attn varlen): ``q, k, v`` are ``(T, H, D)`` with the sequences one after another along ``T``;
``cu_seqlens`` (int32, ``(N + 1,)``) holds the sequence boundaries and ``max_seqlen`` an upper bound of their
lengths, a Python int, so that no launch needs a host sync.

GPU (Triton, FlashAttention-2 style). One launch builds a block table on the device from ``cu_seqlens``, once per
cu_seqlens tensor and version (a step's blocks share one, forward and backward): one entry
``(sequence start, sequence end, block start)`` per ``BLOCK_M``-row block of every sequence, so blocks never straddle
sequences and no program is spent on a block that does not exist (the grid is an upper bound of the block count
known from shapes alone; spare programs find a zero entry and return). With ``BLOCK_M = 64`` a 37- or 50-token local
crop is one program, one query tile and one key tile, and a 197- or 257-token global crop is 4 or 5 programs.
Why one small block per crop rather than several short sequences packed into one program's tile: a tile holding
several sequences computes their cross-sequence products only to mask them (three 37-token crops fill 25% of a
128 x 128 tile; one fills 33% of 64 x 64), and a local crop's attention is bandwidth-bound anyway (about 18 FLOP per
byte at D = 64), so what counts for it is reading its Q, K, V once, which one program per crop does.
- Forward, one program per (block, head): online softmax over ``BLOCK_N`` key tiles of its own sequence, fp32
  accumulators; writes the output and the log-sum-exp for the backward. Only the last key tile is masked.
- Backward, one program per (block, head), no atomics. A sequence that fits one block (every local crop) is done
  in one step: P is recomputed once and dq, dk, dv all come from it. A longer sequence's program computes dk, dv of
  its key block (looping over the sequence's queries) and then dq of its query block (looping over the keys), the
  Triton-tutorial split that trades one recomputation of QK^T for no atomics. ``delta = rowsum(dO * O)`` is
  recomputed from O and dO in each program rather than by a preprocessing launch: sequences are a few hundred
  tokens, so those re-reads come from L2.
Head dims 16, 32, 64, 128 (others fall back to the reference, with a warning); fp16 and bf16 on tensor cores, fp32
with IEEE products (exact, for checking; not fast: train under autocast).

CPU (C++, ``csrc/packed_attention.cpp``): one task per (sequence, head), handed out longest sequence first to the
threads; each task writes only its own rows (no atomic adds). A task copies its head's q, k, v rows (any strides with
a contiguous last dim, read in place) into scratch in the accumulation dtype (fp32; fp64 for fp64) and computes full
score rows for 16 queries at a time with small register-tiled matrix products: sequences are at most a few hundred
tokens, so the rows stay in L1 and the softmax needs no online rescaling. The backward recomputes P from the
log-sum-exp, renormalised to sum to 1 (which removes the LSE's fp32 rounding), and takes ``delta = rowsum(P * dP)``
rather than ``rowsum(dO * O)`` from the stored output. fp32, fp16, bf16 and fp64, any head dim.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from dino_kernels import reference
from dino_kernels._backend import (
    accumulation_dtype,
    debug_enabled,
    get_backend,
    resolve,
    triton_interpreting,
)
from dino_kernels._extension import ops
from dino_kernels._launch import DerivedTensors, TritonKernel, cdiv
from dino_kernels._op import KernelOp, tracing
from dino_kernels._validation import FLOAT_DTYPES, check_ndim, check_positive, check_same_device, check_tensor

# Rows of a program's query block (forward) and of its key and query blocks (backward); also the block size of
# the block table. 64 keeps a local crop (37-54 tokens) to one tile and pads a 197- or 257-token global crop to 256
# or 320 rows.
BLOCK_M = 64
# Key tile of the forward loop.
BLOCK_N = 64
# Tile of the backward loops (queries for dk/dv, keys for dq): smaller than BLOCK_M to pad a 197-token sequence to
# 224 rather than 256 rows and to keep the (BLOCK_M, BLOCK_SLAB) score tiles small next to the dk/dv accumulators.
BLOCK_SLAB = 32
# The head dims with Triton kernels: one forward and one backward config each (below).
HEAD_DIMS = (16, 32, 64, 128)

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _block_table_kernel(
    cu_seqlens,  # int32 (n_seqs + 1,)
    table,  # int32 (table_size, 3): sequence start, sequence end, block start
    status,  # int32 (1,): 1 when cu_seqlens is valid, else 0
    n_seqs,
    total_tokens,
    max_seqlen,
    table_size,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
):
    # One program: a DINO batch has a few thousand sequences at most, and one launch is cheaper than the handful of
    # torch ops (diff, cdiv, cumsum, searchsorted, gathers) that would build the same table.
    ok = (tl.load(cu_seqlens) == 0) & (tl.load(cu_seqlens + n_seqs) == total_tokens)
    max_blocks = tl.cdiv(max_seqlen, BLOCK)
    written = 0
    for first in range(0, n_seqs, SCAN):
        seq = first + tl.arange(0, SCAN)
        in_range = seq < n_seqs
        start = tl.load(cu_seqlens + seq, mask=in_range, other=0)
        end = tl.load(cu_seqlens + seq + 1, mask=in_range, other=0)
        bad = in_range & ((end < start) | (end - start > max_seqlen))
        ok = ok & (tl.sum(bad.to(tl.int32), 0) == 0)
        # Clamp into [0, total_tokens] and cap the blocks per sequence so that even invalid cu_seqlens (flagged in
        # `status`) never make a program address memory outside q, k, v or the table.
        start = tl.minimum(tl.maximum(start, 0), total_tokens)
        end = tl.minimum(tl.maximum(end, start), total_tokens)
        n_blocks = tl.minimum(tl.cdiv(end - start, BLOCK), max_blocks)
        first_entry = written + tl.cumsum(n_blocks, 0) - n_blocks
        for j in range(0, tl.max(n_blocks, 0)):  # not max_blocks: max_seqlen may be a loose bound
            entry = first_entry + j
            store = (j < n_blocks) & (entry < table_size)
            tl.store(table + entry * 3, start, mask=store)
            tl.store(table + entry * 3 + 1, end, mask=store)
            tl.store(table + entry * 3 + 2, start + j * BLOCK, mask=store)
        written += tl.sum(n_blocks, 0)
    # Spare programs read an empty entry (start = end = 0) and return at once.
    for first in range(written, table_size, SCAN):
        entry = first + tl.arange(0, SCAN)
        spare = entry < table_size
        zero = tl.zeros((SCAN,), tl.int32)
        tl.store(table + entry * 3, zero, mask=spare)
        tl.store(table + entry * 3 + 1, zero, mask=spare)
        tl.store(table + entry * 3 + 2, zero, mask=spare)
    tl.store(status, ok.to(tl.int32))


# SCAN: sequences scanned per step by the single-program block-table builder.
BLOCK_TABLE = TritonKernel(_block_table_kernel, {"BLOCK": BLOCK_M, "SCAN": 1024, "num_warps": 4})


@triton.jit
def _program_block(table):
    """This program's (head, sequence start, sequence end, block start) from the block table."""
    entry = table + tl.program_id(0) * 3
    return tl.program_id(1).to(tl.int64), tl.load(entry), tl.load(entry + 1), tl.load(entry + 2)


@triton.jit
def _dot(a, b):
    # fp32 inputs get IEEE products: the default TF32 would cost ~1e-3 relative error. fp16/bf16 use tensor cores.
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, key_lo, key_hi, seq_end, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    for key_start in range(key_lo, key_hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_valid = keys < seq_end
        # K is read transposed, (HEAD_DIM, BLOCK_N), so that the scores are one plain dot.
        k_t = tl.load(K + keys[None, :].to(tl.int64) * stride_kt + dims[:, None], mask=key_valid[None, :], other=0.0)
        s = _dot(q, k_t) * qk_scale  # log2 units: exp2 below is exp of the scaled scores
        if MASK_KEYS:  # only the sequence's last key tile has keys of the next sequence or past the end
            s = tl.where(key_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + keys[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=key_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out,  # (T, H, D), last dim contiguous; Out is contiguous
    LSE,  # fp32 (H, T): natural-log log-sum-exp of each query's scaled scores
    table,  # int32 (programs, 3) from _block_table_kernel
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_tokens,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    head, seq_start, seq_end, m_start = _program_block(table)
    if m_start >= seq_end:  # spare program
        return
    rows = m_start + tl.arange(0, BLOCK_M)
    row_valid = rows < seq_end
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qt + head * stride_qh + dims[None, :],
                mask=row_valid[:, None], other=0.0)
    # Rows past the sequence's end load zeros: their scores are finite, so no NaN appears, and they are not stored.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    full_end = seq_start + (seq_end - seq_start) // BLOCK_N * BLOCK_N
    K += head * stride_kh
    V += head * stride_vh
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, seq_start, full_end, seq_end,
                                    qk_scale, HEAD_DIM, BLOCK_N, False)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, full_end, seq_end, seq_end,
                                    qk_scale, HEAD_DIM, BLOCK_N, True)
    acc = acc / l_i[:, None]
    tl.store(Out + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + dims[None, :],
             acc.to(Out.dtype.element_ty), mask=row_valid[:, None])
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    tl.store(LSE + head * total_tokens + rows, lse, mask=row_valid)


# One config per head dim. D=128: two stages keep the fp32 variant within sm_80's shared memory.
ATTN_FWD = TritonKernel(
    _attn_fwd_kernel,
    {"HEAD_DIM": 16, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": 4, "num_stages": 3},
    {"HEAD_DIM": 32, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": 4, "num_stages": 3},
    {"HEAD_DIM": 64, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": 4, "num_stages": 3},
    {"HEAD_DIM": 128, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": 4, "num_stages": 2},
)


@triton.jit
def _load_rows(ptr, rows, row_valid, stride_t, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_t + dims[None, :], mask=row_valid[:, None], other=0.0)


@triton.jit
def _store_rows(ptr, rows, row_valid, stride_t, value, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    tl.store(ptr + rows[:, None].to(tl.int64) * stride_t + dims[None, :], value.to(ptr.dtype.element_ty),
             mask=row_valid[:, None])


@triton.jit
def _load_query_stats(Out, DO, LSE, rows, row_valid, stride_ot, stride_dot, HEAD_DIM: tl.constexpr):
    """log2-domain LSE (+inf past the end, so those rows get P = 0) and delta = rowsum(dO * Out) of query rows."""
    o = _load_rows(Out, rows, row_valid, stride_ot, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO, rows, row_valid, stride_dot, HEAD_DIM)
    lse2 = tl.load(LSE + rows, mask=row_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.sum(o * do.to(tl.float32), 1)
    return do, lse2, delta


@triton.jit
def _bwd_one_block(Q, K, V, Out, DO, DQ, DK, DV, LSE, stride_qt, stride_kt, stride_vt, stride_ot, stride_dot,
                   seq_start, seq_end, sm_scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # The whole sequence is one tile of queries and one of keys: P once, then dq, dk, dv from it.
    rows = seq_start + tl.arange(0, BLOCK)
    valid = rows < seq_end
    q = _load_rows(Q, rows, valid, stride_qt, HEAD_DIM)
    k = _load_rows(K, rows, valid, stride_kt, HEAD_DIM)
    v = _load_rows(V, rows, valid, stride_vt, HEAD_DIM)
    do, lse2, delta = _load_query_stats(Out, DO, LSE, rows, valid, stride_ot, stride_dot, HEAD_DIM)
    p = tl.math.exp2(_dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    # Keys past the end: their zero rows make finite scores whose exp2 could still overflow against a very
    # negative LSE, and inf * 0 would poison dq, so P is zeroed there explicitly.
    p = tl.where(valid[None, :], p, 0.0)
    _store_rows(DV, rows, valid, stride_ot, _dot(tl.trans(p.to(do.dtype)), do), HEAD_DIM)
    ds = p * (_dot(do, tl.trans(v)) - delta[:, None])
    ds = ds.to(q.dtype)
    _store_rows(DQ, rows, valid, stride_ot, _dot(ds, k) * sm_scale, HEAD_DIM)
    _store_rows(DK, rows, valid, stride_ot, _dot(tl.trans(ds), q) * sm_scale, HEAD_DIM)


@triton.jit
def _bwd_key_block(Q, K, V, Out, DO, DK, DV, LSE, stride_qt, stride_kt, stride_vt, stride_ot, stride_dot,
                   seq_start, seq_end, n_start, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SLAB: tl.constexpr):
    # dk, dv of keys [n_start, n_start + BLOCK) over every query of the sequence, in transposed form
    # (P^T is (keys, queries)) so that both accumulate as plain dots. Keys past the end only touch their own rows
    # of dk, dv, which are not stored; queries past the end have LSE = +inf, hence P = 0.
    keys = n_start + tl.arange(0, BLOCK)
    key_valid = keys < seq_end
    k = _load_rows(K, keys, key_valid, stride_kt, HEAD_DIM)
    v = _load_rows(V, keys, key_valid, stride_vt, HEAD_DIM)
    dk = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    for q_start in range(seq_start, seq_end, BLOCK_SLAB):
        rows = q_start + tl.arange(0, BLOCK_SLAB)
        row_valid = rows < seq_end
        q = _load_rows(Q, rows, row_valid, stride_qt, HEAD_DIM)
        do, lse2, delta = _load_query_stats(Out, DO, LSE, rows, row_valid, stride_ot, stride_dot, HEAD_DIM)
        p_t = tl.math.exp2(_dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        dv += _dot(p_t.to(do.dtype), do)
        ds_t = p_t * (_dot(v, tl.trans(do)) - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q)
    _store_rows(DK, keys, key_valid, stride_ot, dk * sm_scale, HEAD_DIM)
    _store_rows(DV, keys, key_valid, stride_ot, dv, HEAD_DIM)


@triton.jit
def _bwd_query_block(Q, K, V, Out, DO, DQ, LSE, stride_qt, stride_kt, stride_vt, stride_ot, stride_dot,
                     seq_start, seq_end, m_start, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SLAB: tl.constexpr):
    # dq of queries [m_start, m_start + BLOCK) over every key of the sequence.
    rows = m_start + tl.arange(0, BLOCK)
    row_valid = rows < seq_end
    q = _load_rows(Q, rows, row_valid, stride_qt, HEAD_DIM)
    do, lse2, delta = _load_query_stats(Out, DO, LSE, rows, row_valid, stride_ot, stride_dot, HEAD_DIM)
    dq = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    for k_start in range(seq_start, seq_end, BLOCK_SLAB):
        keys = k_start + tl.arange(0, BLOCK_SLAB)
        key_valid = keys < seq_end
        k = _load_rows(K, keys, key_valid, stride_kt, HEAD_DIM)
        v = _load_rows(V, keys, key_valid, stride_vt, HEAD_DIM)
        p = tl.math.exp2(_dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        p = tl.where(key_valid[None, :], p, 0.0)  # see _bwd_one_block
        ds = p * (_dot(do, tl.trans(v)) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k)
    _store_rows(DQ, rows, row_valid, stride_ot, dq * sm_scale, HEAD_DIM)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, Out, DO,  # (T, H, D), last dim contiguous
    DQ, DK, DV,  # (T, H, D) contiguous, same strides as Out
    LSE,  # fp32 (H, T) from the forward
    table,  # int32 (programs, 3) from _block_table_kernel
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh,
    total_tokens,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_SLAB: tl.constexpr,
):
    head, seq_start, seq_end, block_start = _program_block(table)
    if block_start >= seq_end:  # spare program
        return
    qk_scale = sm_scale * 1.4426950408889634
    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    Out += head * stride_oh
    DO += head * stride_doh
    DQ += head * stride_oh
    DK += head * stride_oh
    DV += head * stride_oh
    LSE += head * total_tokens
    if seq_end - seq_start <= BLOCK:
        _bwd_one_block(Q, K, V, Out, DO, DQ, DK, DV, LSE, stride_qt, stride_kt, stride_vt, stride_ot, stride_dot,
                       seq_start, seq_end, sm_scale, qk_scale, HEAD_DIM, BLOCK)
    else:
        _bwd_key_block(Q, K, V, Out, DO, DK, DV, LSE, stride_qt, stride_kt, stride_vt, stride_ot, stride_dot,
                       seq_start, seq_end, block_start, sm_scale, qk_scale, HEAD_DIM, BLOCK, BLOCK_SLAB)
        _bwd_query_block(Q, K, V, Out, DO, DQ, LSE, stride_qt, stride_kt, stride_vt, stride_ot, stride_dot,
                         seq_start, seq_end, block_start, sm_scale, qk_scale, HEAD_DIM, BLOCK, BLOCK_SLAB)


# One config per head dim. D=128: eight warps, as (64, 128) fp32 dk, dv accumulators and the K, V tiles stay in
# registers.
ATTN_BWD = TritonKernel(
    _attn_bwd_kernel,
    {"HEAD_DIM": 16, "BLOCK": BLOCK_M, "BLOCK_SLAB": BLOCK_SLAB, "num_warps": 4, "num_stages": 2},
    {"HEAD_DIM": 32, "BLOCK": BLOCK_M, "BLOCK_SLAB": BLOCK_SLAB, "num_warps": 4, "num_stages": 2},
    {"HEAD_DIM": 64, "BLOCK": BLOCK_M, "BLOCK_SLAB": BLOCK_SLAB, "num_warps": 4, "num_stages": 2},
    {"HEAD_DIM": 128, "BLOCK": BLOCK_M, "BLOCK_SLAB": BLOCK_SLAB, "num_warps": 8, "num_stages": 2},
)


# ------------------------------------------------------------------------------------------------- launchers
def _table_size(total_tokens: int, n_seqs: int, max_seqlen: int) -> int:
    """Upper bound of sum_s cdiv(n_s, BLOCK_M) from shapes alone: at most cdiv(max_seqlen, BLOCK_M) blocks per
    sequence, and, since cdiv(n, B) < n / B + 1 for every non-empty sequence, at most cdiv(T, B) + min(N, T)."""
    per_sequence = n_seqs * cdiv(max_seqlen, BLOCK_M)
    return min(per_sequence, cdiv(total_tokens, BLOCK_M) + min(n_seqs, total_tokens))


def _block_table_triton(cu_seqlens: torch.Tensor, total_tokens: int,
                        max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-side block table and its status (int32 ``(1,)``, 1 when cu_seqlens is valid); on CUDA, asserts
    on the device (no host sync) that cu_seqlens is valid."""
    n_seqs = cu_seqlens.numel() - 1
    size = _table_size(total_tokens, n_seqs, max_seqlen)
    table = torch.empty((size, 3), dtype=torch.int32, device=cu_seqlens.device)
    status = torch.empty(1, dtype=torch.int32, device=cu_seqlens.device)
    BLOCK_TABLE.launch((1,), BLOCK_TABLE.configs[0], cu_seqlens=cu_seqlens, table=table, status=status,
                       n_seqs=n_seqs, total_tokens=total_tokens, max_seqlen=max_seqlen, table_size=size)
    # CUDA only: packed_attention() checks the values of CPU tensors' cu_seqlens on the host before dispatch, while
    # CUDA ones skip that check (it would cost a host sync) unless DINO_KERNELS_DEBUG=1. On CPU, aot_examples()
    # records this launch without running it, so `status` is never written there.
    if cu_seqlens.is_cuda:
        torch._assert_async(status, "packed_attention: invalid cu_seqlens (must start at 0, be non-decreasing and "
                                    "end at T, with every length <= max_seqlen); set DINO_KERNELS_DEBUG=1 for a "
                                    "precise error")
    return table, status


# Block tables by cu_seqlens tensor: a training step passes the same cu_seqlens (cached by pack) to every block's
# attention, forward and backward.
_TABLES = DerivedTensors()


def _block_table(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int) -> torch.Tensor:
    """The block table of cu_seqlens, built once per (tensor, version, total_tokens, max_seqlen)."""
    return _TABLES.get(cu_seqlens, (total_tokens, max_seqlen),
                       lambda: _block_table_triton(cu_seqlens, total_tokens, max_seqlen)[0])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# The launchers pick the declared config of the head dim.
_FWD_CONFIG = {config["HEAD_DIM"]: config for config in ATTN_FWD.configs}
_BWD_CONFIG = {config["HEAD_DIM"]: config for config in ATTN_BWD.configs}


def _attn_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    total, heads, dim = q.shape
    out = torch.empty((total, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    if total == 0:
        return out, lse
    table = _block_table(cu_seqlens, total, max_seqlen)
    ATTN_FWD.launch((table.shape[0], heads), _FWD_CONFIG[dim], Q=q, K=k, V=v, Out=out, LSE=lse, table=table,
                    stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
                    stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
                    total_tokens=total, qk_scale=scale * _LOG2E)
    return out, lse


def _attn_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, q, k, v = (_last_dim_contiguous(t) for t in (grad_out, q, k, v))
    total, heads, dim = q.shape
    # One layout for O and the three gradients: the kernel addresses them with O's strides.
    out = out.contiguous()
    dq, dk, dv = (torch.empty((total, heads, dim), dtype=q.dtype, device=q.device) for _ in range(3))
    if total == 0:
        return dq, dk, dv
    table = _block_table(cu_seqlens, total, max_seqlen)
    ATTN_BWD.launch((table.shape[0], heads), _BWD_CONFIG[dim], Q=q, K=k, V=v, Out=out, DO=grad_out, DQ=dq, DK=dk,
                    DV=dv, LSE=lse.contiguous(), table=table, stride_qt=q.stride(0), stride_qh=q.stride(1),
                    stride_kt=k.stride(0), stride_kh=k.stride(1), stride_vt=v.stride(0), stride_vh=v.stride(1),
                    stride_ot=out.stride(0), stride_oh=out.stride(1), stride_dot=grad_out.stride(0),
                    stride_doh=grad_out.stride(1), total_tokens=total, sm_scale=scale)
    return dq, dk, dv


def aot_examples() -> None:
    """Forward and backward (each with its block table) for every head dim in fp16, bf16 and fp32."""
    cu_seqlens = torch.tensor([0, 2], dtype=torch.int32)
    lse = torch.zeros(1, 2)
    for dim in HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.zeros(2, 1, dim, dtype=dtype)
            _attn_fwd_triton(x, x, x, cu_seqlens, 2, 1.0)
            _attn_bwd_triton(x, x, x, x, x, lse, cu_seqlens, 2, 1.0)


# ------------------------------------------------------------------------------------------------ dispatch
def _resolve(q: torch.Tensor) -> str:
    """The implementation for q's device, dtype and head dim: ``reference``, ``cpu`` or ``triton`` (which is also
    what the ``cuda`` backend runs)."""
    impl = resolve(q.device, "packed_attention", q.dtype, cuda_runs_triton=True)
    if impl in ("reference", "cpu"):
        return impl
    if q.shape[-1] not in HEAD_DIMS:
        warnings.warn(f"packed_attention: head dim {q.shape[-1]} has no Triton kernel (head dims {HEAD_DIMS}); "
                      "falling back to the plain-PyTorch reference, which syncs with the host and is slow",
                      stacklevel=3)
        return "reference"
    if q.dtype == torch.bfloat16 and triton_interpreting():
        raise TypeError("packed_attention: bfloat16 is broken in the Triton interpreter (TRITON_INTERPRET=1); use "
                        "float16/float32 there, or the 'cpu' backend")
    return "triton"


def _packed_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                              max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _resolve(q)
    if impl == "reference":
        return (reference.packed_attention(q, k, v, cu_seqlens, scale),
                reference.packed_attention_lse(q, k, cu_seqlens, scale).to(accumulation_dtype(q)))
    if impl == "cpu":
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        return ops().packed_attention_fwd_cpu(q, k, v, cu_seqlens, scale)
    return _attn_fwd_triton(q, k, v, cu_seqlens, max_seqlen, scale)


def _packed_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _resolve(q)
    if impl == "reference":
        return reference.packed_attention_backward(grad_out, q, k, v, cu_seqlens, scale)
    if impl == "cpu":
        # `out` is not needed: the kernel takes delta = rowsum(dO * O) as rowsum(P * dP) from the recomputed P.
        grad_out, q, k, v = (_last_dim_contiguous(t) for t in (grad_out, q, k, v))
        return ops().packed_attention_bwd_cpu(grad_out, q, k, v, lse, cu_seqlens, scale)
    return _attn_bwd_triton(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)


# ----------------------------------------------------------------------------------------------- registered op
def _packed_attention_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    total, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total), dtype=accumulation_dtype(q))


def _packed_attention_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _packed_attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _packed_attention_vjp(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _packed_attention_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_packed_attention_bwd_op = KernelOp("packed_attention_bwd", _packed_attention_backward,
                                    fake=_packed_attention_bwd_fake)
_packed_attention_fwd_op = KernelOp("packed_attention_fwd", _packed_attention_forward,
                                    fake=_packed_attention_fwd_fake, setup_context=_packed_attention_setup_context,
                                    backward=_packed_attention_vjp)


# ------------------------------------------------------------------------------------------------- public API
# cu_seqlens tensors whose values passed the check, by version: a step's blocks all pass the same one (on CPU the
# check, a copy to Python and a loop over its N sequences, cost as long as a small block's attention kernel).
_CHECKED = DerivedTensors()


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got cu_seqlens[0] = {bounds[0]}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at T = q.shape[0] = {total}; got cu_seqlens[-1] = {bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing; got cu_seqlens[{i}] = {bounds[i]} > "
                             f"cu_seqlens[{i + 1}] = {bounds[i + 1]}")
    longest = max(lengths)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen must bound every sequence length; got max_seqlen = {max_seqlen} but sequence "
                         f"{lengths.index(longest)} has {longest} tokens")


def _check_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_ndim(name, t, 3, "(T, H, D)")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be floating point (float32, float16, bfloat16 or float64); got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q, {tuple(q.shape)}; got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q, {q.dtype}; got {t.dtype}")
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype int32; got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-d (N + 1,) with N >= 1 sequences; got shape {tuple(cu_seqlens.shape)}")
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
    n_seqs, total = cu_seqlens.numel() - 1, q.shape[0]
    # Free necessary condition: the longest of N sequences holding T tokens has at least ceil(T / N).
    if max_seqlen < 1 or max_seqlen * n_seqs < total:
        raise ValueError(f"max_seqlen must be >= 1 and bound every sequence length; got {max_seqlen} for T = {total} "
                         f"tokens in N = {n_seqs} sequences")
    # Values are free to check on CPU; on CUDA under the reference (which syncs anyway) or in debug mode, else the
    # block table asserts on the device; never while tracing, where tensors have no values (the kernels' own guards
    # remain).
    if not tracing(q) and (q.device.type == "cpu" or get_backend() == "reference" or debug_enabled()):
        _CHECKED.get(cu_seqlens, (total, max_seqlen), lambda: _check_cu_seqlens_values(cu_seqlens, total, max_seqlen))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, scale: float | None = None) -> torch.Tensor:
    """Block-diagonal (per-sequence) non-causal attention over sequences packed along the token axis.

    Args:
        q, k, v: ``(T, H, D)``, one dtype (float32, float16, bfloat16; float64 on CPU) and device; views such as
            ``qkv.unbind(1)`` of a ``(T, 3, H, D)`` projection are read in place.
        cu_seqlens: int32 ``(N + 1,)`` on the same device, ``cu_seqlens[0] = 0``, non-decreasing,
            ``cu_seqlens[N] = T``: sequence ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i + 1]`` (see
            :func:`~dino_kernels.pack`). On GPU its block table is built once per tensor and version: change it
            through PyTorch ops (which bump the version) or pass a new tensor, not through ``.data``.
        max_seqlen: a Python int bounding every sequence length (an upper bound is fine; no ``.item()``).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(T, H, D)`` in the dtype of ``q``: ``softmax(q_s k_s^T * scale) v_s`` for each sequence ``s``.
        Differentiable in ``q``, ``k``, ``v``. Under autocast the inputs are cast to the autocast dtype, as for
        ``scaled_dot_product_attention``. Values of ``cu_seqlens`` are checked (once per tensor and version) on CPU
        always and on CUDA when ``DINO_KERNELS_DEBUG=1`` (else a device-side assert guards the kernels).
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_positive("scale", scale)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, _ = _packed_attention_fwd_op(q, k, v, cu_seqlens, max_seqlen, float(scale))
    return out
