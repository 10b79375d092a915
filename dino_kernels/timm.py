"""timm Vision Transformers with a packed multi-crop forward: every crop group of a step through the blocks at once.

::

    import dino_kernels.timm

    model = timm.create_model("vit_small_patch16_224", dynamic_img_size=True, drop_path_rate=0.1, num_classes=0)
    dino_kernels.timm.enable(model)
    tokens = model.forward_crops([x_global, x_local])  # [(2B, N_g, D), (10B, N_l, D)], as forward_features gives

:func:`forward_crops` runs what timm's ``VisionTransformer.forward_features`` runs, on a list of crop groups:

- per group, timm's own modules: ``patch_embed`` -> ``_pos_embed`` (the position grid resampled to the crop's
  size when the model has ``dynamic_img_size=True``, class / register tokens) -> ``patch_drop`` -> ``norm_pre``;
- the blocks on all groups at once: each residual branch runs once on the packed tokens of all crops through
  :func:`dino_kernels.drop_add_residual` (multi-crop form: stochastic depth skips the dropped samples, LayerScale is
  fused into the add), attention is :func:`dino_kernels.packed_attention` with one sequence per crop (no padding),
  and the norms, projections, q/k norms and MLPs are the block's own timm modules;
- per group, the final ``norm``.

With ``model.set_grad_checkpointing(True)`` every block is checkpointed, as in timm (the same kept samples in the
recomputation).

The model gains no parameters or buffers: its ``state_dict``, ``forward`` and ``forward_features`` stay timm's.
timm is imported when first needed, so ``import dino_kernels.timm`` works without it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dino_kernels.packed_attention import packed_attention
from dino_kernels.stochastic_depth import drop_add_residual

__all__ = ["check_model", "enable", "forward_crops"]


@functools.cache
def _timm() -> SimpleNamespace:
    """The timm classes a supported model is built from (imported on first use: timm is optional)."""
    try:
        import timm.layers as layers
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as error:
        raise ImportError("dino_kernels.timm needs timm (pip install timm)") from error
    return SimpleNamespace(
        VisionTransformer=VisionTransformer, Block=Block, Attention=layers.Attention, LayerScale=layers.LayerScale,
        DropPath=layers.DropPath,
        # Norms over the last dim only: they give the same result per token whether tokens are (B, N, D) or packed.
        token_norms=(nn.Identity, nn.LayerNorm, nn.RMSNorm, layers.LayerNorm, layers.LayerNormFp32, layers.RmsNorm,
                     layers.RmsNormFp32, layers.SimpleNorm, layers.SimpleNormFp32),
        # MLPs of nn.Linear layers on the last dim (per token); GatedMlp's spatial gate and ConvMlp are not.
        token_mlps=(layers.Mlp, layers.GluMlp, layers.SwiGLU))


# ------------------------------------------------------------------------------------------------ model checks
def _check_norm(name: str, norm: nn.Module, t: SimpleNamespace) -> None:
    if type(norm) not in t.token_norms:
        supported = ", ".join(c.__name__ for c in t.token_norms)
        raise TypeError(f"{name} is {type(norm).__name__}; forward_crops supports per-token norms only ({supported})")


def _check_block(name: str, block: nn.Module, t: SimpleNamespace) -> None:
    if type(block) is not t.Block:
        raise TypeError(f"{name} is {type(block).__name__}; forward_crops runs timm's Block only (block_fn=Block)")
    attn = block.attn
    if type(attn) is not t.Attention:
        raise TypeError(f"{name}.attn is {type(attn).__name__}; forward_crops runs timm's Attention only "
                        "(attn_layer='attn')")
    if attn.attn_drop.p > 0:
        raise ValueError(f"{name}.attn.attn_drop.p (attn_drop_rate) must be 0: packed attention has no dropout of "
                         f"the attention weights; got {attn.attn_drop.p}")
    for part in ("norm1", "norm2"):
        _check_norm(f"{name}.{part}", getattr(block, part), t)
    for part in ("q_norm", "k_norm", "norm"):
        _check_norm(f"{name}.attn.{part}", getattr(attn, part), t)
    if type(block.mlp) not in t.token_mlps or not isinstance(getattr(block.mlp, "fc2", None), nn.Linear):
        supported = ", ".join(c.__name__ for c in t.token_mlps)
        raise TypeError(f"{name}.mlp is {type(block.mlp).__name__} (with {type(getattr(block.mlp, 'fc2', None))} "
                        f"layers); forward_crops supports the per-token MLPs {supported} with nn.Linear layers")
    _check_norm(f"{name}.mlp.norm", block.mlp.norm, t)
    for part in ("ls1", "ls2"):
        if type(getattr(block, part)) not in (t.LayerScale, nn.Identity):
            raise TypeError(f"{name}.{part} is {type(getattr(block, part)).__name__}; expected timm's LayerScale "
                            "or nn.Identity")
    for part in ("drop_path1", "drop_path2"):
        drop_path = getattr(block, part)
        if type(drop_path) not in (t.DropPath, nn.Identity):
            raise TypeError(f"{name}.{part} is {type(drop_path).__name__}; expected timm's DropPath or nn.Identity")
        if isinstance(drop_path, t.DropPath) and not drop_path.scale_by_keep:
            raise ValueError(f"{name}.{part}.scale_by_keep must be True (the kept samples' residuals are scaled "
                             "by B / kept); got False")


@torch.compiler.disable  # host-side checks of the modules: nothing for torch.compile to trace
def check_model(model: object) -> None:
    """Raise a TypeError / ValueError naming the option if :func:`forward_crops` cannot run ``model`` exactly.

    Supported: timm's ``VisionTransformer`` (or a subclass that keeps its ``forward_features``) of timm ``Block`` s
    with timm ``Attention`` (qk-norm, ``scale_attn_norm`` and the gated output included), any class / register
    tokens and position embedding, LayerScale, DropPath, ``Mlp`` / ``GluMlp`` / ``SwiGLU`` MLPs and per-token
    norms. Refused: attention dropout > 0, other block / attention / MLP / norm classes.
    """
    t = _timm()
    if not isinstance(model, t.VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer; got {type(model).__name__}")
    if type(model).forward_features is not t.VisionTransformer.forward_features:
        raise TypeError(f"model's class {type(model).__name__} overrides VisionTransformer.forward_features; "
                        "forward_crops only reproduces timm's VisionTransformer.forward_features")
    for i, block in enumerate(model.blocks):
        _check_block(f"model.blocks[{i}]", block, t)


def _check_crops(model: nn.Module, crops: object) -> None:
    if not isinstance(crops, (list, tuple)) or not crops:
        raise TypeError("crops must be a non-empty list of (B_i, C, H_i, W_i) image tensors; got "
                        f"{type(crops).__name__}" + (" of length 0" if isinstance(crops, (list, tuple)) else ""))
    # timm's PatchEmbed attributes; a custom embed_layer without them is left to its own checks.
    patch_embed = model.patch_embed
    channels = getattr(model, "in_chans", None)
    img_size = getattr(patch_embed, "img_size", None)
    static_size = img_size is not None and getattr(patch_embed, "strict_img_size", False) and not model.dynamic_img_size
    patch = None if getattr(patch_embed, "dynamic_img_pad", False) else getattr(patch_embed, "patch_size", None)
    for i, crop in enumerate(crops):
        if not isinstance(crop, torch.Tensor):
            raise TypeError(f"crops[{i}] must be a torch.Tensor, got {type(crop).__name__}")
        if crop.dim() != 4 or crop.shape[0] == 0 or (channels is not None and crop.shape[1] != channels):
            raise ValueError(f"crops[{i}] must be (B_i, C, H_i, W_i) with B_i >= 1 and C = the model's in_chans = "
                             f"{channels}; got shape {tuple(crop.shape)}")
        if not crop.is_floating_point():
            raise TypeError(f"crops[{i}] must be floating point; got {crop.dtype}")
        if crop.dtype != crops[0].dtype or crop.device != crops[0].device:
            raise ValueError(f"every crop group must have the dtype and device of crops[0] ({crops[0].dtype}, "
                             f"{crops[0].device}); crops[{i}] has ({crop.dtype}, {crop.device})")
        height, width = crop.shape[-2:]
        if static_size and (height, width) != tuple(img_size):
            raise ValueError(f"crops[{i}] is {height}x{width} but the model was built with dynamic_img_size=False, "
                             f"which takes {img_size[0]}x{img_size[1]} images only; build it with "
                             "dynamic_img_size=True for crops of other sizes")
        if patch is not None and (height % patch[0] or width % patch[1]):
            raise ValueError(f"crops[{i}] is {height}x{width}, not a multiple of the patch size {patch[0]}x{patch[1]}; "
                             "build the model with dynamic_img_pad=True to pad it")


# ------------------------------------------------------------------------------------------------ packed forward
def _attention_branch(block: nn.Module, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """timm's ``attn(norm1(x))`` on packed tokens (T, D) -> (T, D), attention within each crop."""
    attn = block.attn
    x = block.norm1(x)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(-3)  # each (T, H, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attn.norm(packed_attention(q, k, v, cu_seqlens, max_seqlen, scale=attn.scale).flatten(-2))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _mlp_branch(block: nn.Module, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    return block.mlp(block.norm2(x))


def _embed(model: nn.Module, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """timm's token embedding per group: (B_i, C, H_i, W_i) -> (B_i, N_i, D).

    A function of its own, free of graph breaks: torch.compile traces it once for all groups with their static
    shapes (where a frame re-run per group would be recompiled with dynamic shapes, under which the backward of the
    position grid's bicubic resampling fails in torch 2.14)."""
    return [model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(crop)))) for crop in crops]


def _drop_rate(drop_path: nn.Module) -> float:
    return float(getattr(drop_path, "drop_prob", 0.0))


def _scaling(layer_scale: nn.Module) -> torch.Tensor | None:
    return getattr(layer_scale, "gamma", None)


def _block_forward(block: nn.Module, xs: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
    """timm's ``Block.forward`` on every crop group (B_i, N_i, D) at once, DINOv2's stochastic depth."""
    xs = drop_add_residual(xs, functools.partial(_attention_branch, block), _drop_rate(block.drop_path1),
                           training=block.training, generator=generator, scaling=_scaling(block.ls1))
    return drop_add_residual(xs, functools.partial(_mlp_branch, block), _drop_rate(block.drop_path2),
                             training=block.training, generator=generator, scaling=_scaling(block.ls2))


def _checkpointed_block_forward(block: nn.Module, xs: list[torch.Tensor],
                                generator: torch.Generator | None) -> list[torch.Tensor]:
    """:func:`_block_forward` under activation checkpointing (timm's ``set_grad_checkpointing``): the backward
    recomputes the block with the same kept samples. torch's own generators are restored by ``checkpoint``; a given
    ``generator`` is rewound here for the recomputation and then put back where the forward pass left it."""
    start = generator.get_state() if generator is not None else None
    runs = 0

    def run(*groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal runs
        runs += 1
        if runs == 1 or generator is None:
            return tuple(_block_forward(block, list(groups), generator))
        resume = generator.get_state()
        generator.set_state(start)
        try:
            return tuple(_block_forward(block, list(groups), generator))
        finally:
            generator.set_state(resume)

    return list(checkpoint(run, *xs, use_reentrant=False))


def forward_crops(model: nn.Module, crops: Sequence[torch.Tensor], *,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """``model.forward_features`` of every crop group, all groups through the blocks in one packed pass.

    Args:
        model: a timm ``VisionTransformer`` that :func:`check_model` accepts.
        crops: crop groups ``(B_i, C, H_i, W_i)``, one floating dtype and device (e.g. the global crops
            ``(2B, 3, 224, 224)`` and the local ones ``(10B, 3, 96, 96)``); sizes other than the model's
            ``img_size`` need ``dynamic_img_size=True``.
        generator: draws the kept samples of stochastic depth in training (see :func:`enable`); default: torch's.

    Returns:
        ``[(B_i, N_i, D)]``: per group what ``model.forward_features(crops[i])`` returns (prefix tokens first, after
        the final norm). In eval mode, or without drop path, the same values up to rounding.
    """
    if not torch.compiler.is_compiling():  # enable() has checked the model; a traced graph needs no break here
        check_model(model)
    _check_crops(model, crops)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    xs = _embed(model, crops)
    block_forward = (_checkpointed_block_forward if model.grad_checkpointing and torch.is_grad_enabled()
                     else _block_forward)
    for block in model.blocks:
        xs = block_forward(block, xs, generator)
    return [model.norm(x) for x in xs]


def enable(model: nn.Module) -> nn.Module:
    """Give a timm ``VisionTransformer`` a packed multi-crop forward, in place: ``model.forward_crops(crops, *,
    generator=None)`` is then :func:`forward_crops` on it. Returns ``model``.

    Checks the model once here (:func:`check_model`: a TypeError / ValueError naming an unsupported option) and adds
    no parameter or buffer: ``state_dict`` (weights load both ways), ``forward`` and ``forward_features`` stay
    timm's. Idempotent; the model stays copyable and picklable (``forward_crops`` is a ``functools.partial`` of the
    module-level function). To compile the packed forward, compile ``model.forward_crops`` (``torch.compile(model)``
    compiles ``forward`` only).

    Stochastic depth in training is DINOv2's, not timm's: instead of a Bernoulli(1 - p) mask per sample
    (``DropPath``), each crop group keeps a uniformly drawn subset of ``max(int(B_i * (1 - p)), 1)`` of its ``B_i``
    samples per residual branch (``torch.randperm`` from ``generator``), the branch runs on the kept samples only
    and their residual is scaled by ``B_i / kept``; ``p`` is the block's ``drop_path1`` / ``drop_path2``
    ``drop_prob``. In eval mode nothing is dropped, as in timm. Dropout layers (``proj_drop``, the MLP's, ``pos_drop``)
    and ``PatchDropout`` run as timm's modules, with their own random streams.
    """
    check_model(model)
    bound = model.__dict__.get("forward_crops")
    if not (isinstance(bound, functools.partial) and bound.func is forward_crops and bound.args[0] is model):
        model.forward_crops = functools.partial(forward_crops, model)
    return model
