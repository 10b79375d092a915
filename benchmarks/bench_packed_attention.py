"""Packed block-diagonal attention over DINO's global + local crops, forward and forward+backward.

Providers: ``reference`` (per-sequence plain PyTorch), ``per_group_sdpa`` (one SDPA call per crop group: DINO v1,
DINOv3), ``masked_sdpa`` (SDPA over all packed tokens under the materialised block-diagonal mask), and where the
machine has them ``flex_document_mask`` (FlexAttention, document mask), ``varlen_attn``
(``torch.nn.attention.varlen``), ``xformers`` (``BlockDiagonalMask``, as DINOv2), then ``ours``.
The GPU session set (``-m session``): ViT-S/16 and ViT-L/14 in bf16, fwd and fwd+bwd, against per-group SDPA,
``varlen_attn`` and FlexAttention (compiled once per case and mode, before the timing). TFLOP/s count only
within-sequence work: 4 * sum(n^2) * H * D forward, 2.5x that backward (flash-attn convention).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import dino_kernels
from dino_kernels import reference

# name -> (heads, head dim, images, ((crops per image, tokens per crop), ...)); device the case runs on.
CASES = {
    "vit-s16": ((6, 64, 64, ((2, 197), (10, 37))), "cuda"),
    "vit-b16": ((12, 64, 64, ((2, 197), (10, 37))), "cuda"),
    "vit-l14": ((16, 64, 32, ((2, 257), (8, 50))), "cuda"),
    "vit-s16 2 images": ((6, 64, 2, ((2, 197), (10, 37))), "cpu"),
    # The trainer's CPU preset: width 192 in 6 heads, 8 and 4 px crops of 4 px patches (CLS + 4 and CLS + 1 tokens).
    "cpu-tiny": ((6, 32, 64, ((2, 5), (6, 2))), "cpu"),
}
DRY_RUN_SHAPE = (2, 16, 1, ((2, 17), (4, 5)))
MODES = ("fwd", "fwd+bwd")
SESSION_CASES = ("vit-s16", "vit-l14")
SESSION_PROVIDERS = ("per_group_sdpa", "flex_document_mask", "varlen_attn", "ours")


def _setup(shape: tuple, device: str):
    heads, dim, images, crops = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    group_shapes = [(images * n_crops, tokens) for n_crops, tokens in crops]
    # cu_seqlens as a training loop gets it: pack() of the crop groups (tokens of width 1 suffice here).
    _, cu_seqlens, max_seqlen = dino_kernels.pack([torch.empty(b, n, 1, device=device) for b, n in group_shapes])
    total = sum(b * n for b, n in group_shapes)
    q, k, v = (torch.randn(total, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flops = 4 * sum(b * n * n for b, n in group_shapes) * heads * dim
    return q, k, v, cu_seqlens, max_seqlen, group_shapes, flops


def _per_group_sdpa(group_shapes):
    def attend(q, k, v):
        outs, start = [], 0
        for b, n in group_shapes:
            views = [t[start:start + b * n].view(b, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
            outs.append(torch.nn.functional.scaled_dot_product_attention(*views))
            start += b * n
        return outs

    return attend


def _masked_sdpa(cu_seqlens, total):
    mask = reference.block_diagonal_mask(cu_seqlens, total)
    return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask)


def _flex(cu_seqlens, total, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx], None, None, total, total,
                                   device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)


def _varlen(cu_seqlens, max_seqlen):
    from torch.nn.attention.varlen import varlen_attn

    return lambda q, k, v: varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _xformers(cu_seqlens):
    from xformers.ops import fmha

    bias = fmha.BlockDiagonalMask.from_seqlens((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
    return lambda q, k, v: fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)


def _available(provider: str, device: str, mode: str) -> str | None:
    """Why ``provider`` cannot run here, or None."""
    if provider == "flex_document_mask" and device == "cpu" and mode == "fwd+bwd":
        return "FlexAttention has no CPU backward (pytorch #148752)"
    if provider in ("varlen_attn", "xformers"):
        module = {"varlen_attn": "torch.nn.attention.varlen", "xformers": "xformers"}[provider]
        if device != "cuda" or importlib.util.find_spec(module) is None:
            return f"{provider} needs CUDA and {module}"
    return None


def _provider(name, cu_seqlens, max_seqlen, group_shapes, total, device):
    """The attention function of provider ``name``; masks and compilation are built here, outside the timing."""
    if name == "reference":
        return lambda q, k, v: reference.packed_attention(q, k, v, cu_seqlens)
    if name == "per_group_sdpa":
        return _per_group_sdpa(group_shapes)
    if name == "masked_sdpa":
        return _masked_sdpa(cu_seqlens, total)
    if name == "flex_document_mask":
        return _flex(cu_seqlens, total, device)
    if name == "varlen_attn":
        return _varlen(cu_seqlens, max_seqlen)
    if name == "xformers":
        return _xformers(cu_seqlens)
    return lambda q, k, v: dino_kernels.packed_attention(q, k, v, cu_seqlens, max_seqlen)


PROVIDERS = ("reference", "per_group_sdpa", "masked_sdpa", "flex_document_mask", "varlen_attn", "xformers", "ours")


def _params():
    for case in CASES:
        for mode in MODES:
            for provider in PROVIDERS:
                session = case in SESSION_CASES and provider in SESSION_PROVIDERS
                yield pytest.param(case, mode, provider, marks=[pytest.mark.session] if session else [])


@pytest.mark.parametrize(("case", "mode", "provider"), list(_params()))
def test_packed_attention(benchmark, measure, bench_env, case, mode, provider):
    shape, device = CASES[case]
    device = bench_env.device(device)
    reason = _available(provider, device, mode)
    if reason:
        pytest.skip(reason)
    q, k, v, cu_seqlens, max_seqlen, group_shapes, flops = _setup(DRY_RUN_SHAPE if bench_env.dry_run else shape,
                                                                   device)
    attend = _provider(provider, cu_seqlens, max_seqlen, group_shapes, q.shape[0], device)
    if mode == "fwd":
        q, k, v = q.detach(), k.detach(), v.detach()  # FlexAttention on CPU refuses inputs that require grad

        def fn():
            with torch.no_grad():
                return attend(q, k, v)
    else:
        flops *= 3.5  # forward + 2.5x forward for the backward
        outs = attend(q, k, v)
        grad_outs = [torch.randn_like(o) for o in (outs if isinstance(outs, list) else [outs])]

        def fn():
            out = attend(q, k, v)
            return torch.autograd.grad(out if isinstance(out, list) else [out], (q, k, v), grad_outs)

    dtype = str(q.dtype).removeprefix("torch.")
    measure(benchmark, fn, case=f"packed attention {case} {mode} {dtype}", provider=provider, device=device,
            flops=flops)
