"""Packing crop groups of different lengths into one token sequence, the layout of
:func:`dino_kernels.packed_attention` (flash-attn's varlen layout) and of the multi-crop stochastic depth."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch

from dino_kernels._validation import check_ndim, check_tensor


def _check_crops(xs: Sequence[torch.Tensor]) -> None:
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"xs must be a non-empty list of (B_i, N_i, D) tensors; got {type(xs).__name__}"
                        + (" of length 0" if isinstance(xs, (list, tuple)) else ""))
    for i, x in enumerate(xs):
        check_tensor(f"xs[{i}]", x)
        check_ndim(f"xs[{i}]", x, 3, "(B_i, N_i, D)")
        if x.shape[-1] != xs[0].shape[-1] or x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise ValueError(f"every crop group must share D, dtype and device with xs[0] ({xs[0].shape[-1]}, "
                             f"{xs[0].dtype}, {xs[0].device}); xs[{i}] has ({x.shape[-1]}, {x.dtype}, {x.device})")


@functools.lru_cache(maxsize=32)
def cu_seqlens_for(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of B_i sequences of N_i tokens per group ``(B_i, N_i)``, built once per (shapes,
    device); shared by :func:`pack` and the multi-crop :func:`~dino_kernels.drop_add_residual`, which packs its kept
    crops the same way."""
    lengths = [n for b, n in shapes for _ in range(b)]
    bounds = [0, *itertools.accumulate(lengths)]  # on the host: no tensor round trip (a graph break under dynamo)
    # A cached tensor outlives the caller's mode: made under inference_mode it would be an inference tensor, which
    # autograd cannot save, and a later training step with these shapes would fail.
    with torch.inference_mode(False):
        return torch.tensor(bounds, dtype=torch.int32).to(device), max(n for _, n in shapes)


def pack(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate crop groups into one packed token sequence for :func:`~dino_kernels.packed_attention`.

    Args:
        xs: crop groups ``(B_i, N_i, D)`` (e.g. the 2 global crops ``(2B, 197, D)`` and the local ones
            ``(10B, 37, D)``), one dtype and device.

    Returns:
        ``packed`` ``(sum_i B_i * N_i, D)`` with every image crop a sequence (group by group, crop by crop),
        ``cu_seqlens`` int32 ``(sum_i B_i + 1,)`` on the same device (cached per shapes and device, so a training
        loop does no host work after its first step) and ``max_seqlen = max_i N_i``.
    """
    _check_crops(xs)
    cu_seqlens, max_seqlen = cu_seqlens_for(tuple((x.shape[0], x.shape[1]) for x in xs), xs[0].device)
    packed = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    return packed, cu_seqlens, max_seqlen


def unpack(packed: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Invert :func:`pack`: views ``(B_i, N_i, *packed.shape[1:])`` of ``packed`` ``(T, ...)``.

    ``shapes`` holds ``(B_i, N_i)`` or ``(B_i, N_i, D)`` per group (e.g. ``[x.shape for x in xs]``); only
    ``B_i, N_i`` are used, so features may have changed width since packing.
    """
    check_tensor("packed", packed)
    if packed.dim() < 1:
        raise ValueError("packed must have a token axis; got a 0-d tensor")
    counts = []
    for i, shape in enumerate(shapes):
        if len(shape) not in (2, 3) or any(not isinstance(s, int) or s < 0 for s in shape):
            raise ValueError(f"shapes[{i}] must be (B_i, N_i) or (B_i, N_i, D) of non-negative ints; got {shape}")
        counts.append(shape[0] * shape[1])
    if sum(counts) != packed.shape[0]:
        raise ValueError(f"shapes hold {sum(counts)} tokens but packed has {packed.shape[0]} (shape "
                         f"{tuple(packed.shape)})")
    return [part.view(shape[0], shape[1], *packed.shape[1:])
            for part, shape in zip(torch.split(packed, counts), shapes)]
