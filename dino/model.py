"""Vision Transformer with a packed multi-crop forward, and the DINO projection head.

ViT (DINO's ``vision_transformer.py``): conv patch embedding, CLS token, learned position embedding interpolated
bicubically to any crop size (DINO's +0.1 offset), optional register tokens (after the position add, no position) and
LayerScale, pre-norm blocks (LayerNorm eps 1e-6, qkv bias, GELU MLP), stochastic depth linear 0 -> rate.

All crop groups of a step go through the blocks in one call: every residual branch runs once on the packed tokens of
all crops (``dino_kernels.drop_add_residual``, multi-crop form, which also skips the samples stochastic depth drops)
and attention is ``dino_kernels.packed_attention`` over one sequence per crop. The patch embedding is one GEMM,
and since ``forward`` returns the CLS features only, its last block runs the queries, the projection and the MLP on the
CLS rows alone (exact: the other tokens' outputs are never read). With ``--kernels reference`` :func:`build_model`
builds the plain-PyTorch model instead (``fused=False``): one ``scaled_dot_product_attention`` call per crop group,
the convolution, and every token through every block, as DINO v1/v3 do; the trainer then also runs the other ops
under the ``reference`` backend. The choice is made once, at construction: ``forward`` consults no global switch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import dino_kernels
from dino_kernels.stochastic_depth import kept_count

# DINO interpolates the position grid with scale (n + 0.1) / n0 rather than n / n0, so that floor() of the output
# size is exactly n even with float rounding (floor(n0 · n / n0) can come out as n − 1).
POS_INTERP_OFFSET = 0.1
LN_EPS = 1e-6


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def per_group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        groups: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Plain-PyTorch packed attention: one SDPA call per crop group of equal-length sequences.

    q, k, v (T, H, D) -> (T, H, D), packed as ``groups`` says: ``(count, tokens)`` per group, in order, with
    T = sum(count * tokens). The group shapes come from the host, so there is no device sync: a baseline, not a kernel.
    """
    total = sum(count * tokens for count, tokens in groups)
    if total != q.shape[0]:
        raise ValueError(f"groups {list(groups)} hold {total} tokens; q has {q.shape[0]}")
    outs, start = [], 0
    for count, tokens in groups:
        rows = slice(start, start + count * tokens)
        qs, ks, vs = (t[rows].unflatten(0, (count, tokens)).transpose(1, 2) for t in (q, k, v))  # (count, H, n, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).flatten(0, 1))
        start += count * tokens
    return torch.cat(outs)


class Attention(nn.Module):
    """Multi-head self-attention on packed tokens: ``dino_kernels.packed_attention`` (``packed=True``) or
    :func:`per_group_attention` (plain PyTorch), fixed at construction."""

    def __init__(self, dim: int, num_heads: int, packed: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.packed = packed
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, D) packed tokens -> q, k, v each (T, H, D/H)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))
        return qkv.unbind(-3)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               groups: Sequence[tuple[int, int]]) -> torch.Tensor:
        """q, k, v (T, H, D/H) of the crop groups ``groups`` ((count, tokens) each) -> (T, H, D/H)."""
        if self.packed:
            return dino_kernels.packed_attention(q, k, v, cu_seqlens, max_seqlen)
        return per_group_attention(q, k, v, groups)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                groups: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(T, D) packed tokens of the crop groups ``groups`` -> (T, D)."""
        return self.proj(self.attend(*self.qkv_heads(x), cu_seqlens, max_seqlen, groups).flatten(-2))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, H, N) softmax attention of the CLS query (token 0) over all tokens."""
        q, k, _ = self.qkv_heads(x)  # (B, N, H, Dh)
        scale = q.shape[-1] ** -0.5
        logits = torch.einsum("bhd,bnhd->bhn", q[:, 0].float() * scale, k.float())
        return logits.softmax(-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block whose residual branches run on packed tokens of all crop groups."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, layerscale: float,
                 packed_attention: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, packed=packed_attention)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.gamma1 = nn.Parameter(torch.full((dim,), layerscale)) if layerscale > 0 else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layerscale)) if layerscale > 0 else None

    def _attn_branch(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     groups: Sequence[tuple[int, int]]) -> torch.Tensor:
        return self.attn(self.norm1(x), cu_seqlens, max_seqlen, groups)

    def _cls_attn_branch(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                         groups: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The attention branch where only the CLS rows of its output are read: keys and values of every token,
        queries and the projection of the CLS rows only; zeros in the other rows (queries and output)."""
        x = self.norm1(x)
        dim, heads = x.shape[-1], self.attn.num_heads
        cls_rows = cu_seqlens[:-1].long()  # every packed sequence starts with its CLS token
        weight, bias = self.attn.qkv.weight, self.attn.qkv.bias  # rows: q, k, v
        k, v = F.linear(x, weight[dim:], bias[dim:]).unflatten(-1, (2, heads, -1)).unbind(-3)
        q_cls = F.linear(x.index_select(0, cls_rows), weight[:dim], bias[:dim]).unflatten(-1, (heads, -1))
        q = k.new_zeros(k.shape).index_copy_(0, cls_rows, q_cls)
        out = self.attn.attend(q, k, v, cu_seqlens, max_seqlen, groups).index_select(0, cls_rows)
        projected = self.attn.proj(out.flatten(-2))  # under autocast in its dtype, not in the norm's fp32
        return projected.new_zeros(x.shape).index_copy_(0, cls_rows, projected)

    def _mlp_branch(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, xs: list[torch.Tensor], generator: torch.Generator | None = None,
                cls_only: bool = False) -> list[torch.Tensor]:
        """Crop groups (B_i, N_i, D) -> the block's output, the same shapes; with ``cls_only`` only its CLS tokens
        (B_i, 1, D), for a last block whose patch tokens nothing reads: the same values (and random draws), with the
        queries, the projection and the MLP run on the CLS rows alone."""
        rate = self.drop_path if self.training else 0.0
        # The crop groups of the packed tensor the branches see, known on the host (all samples at rate 0).
        groups = [(kept_count(x.shape[0], rate), x.shape[1]) for x in xs]
        attn_branch = functools.partial(self._cls_attn_branch if cls_only else self._attn_branch, groups=groups)
        xs = dino_kernels.drop_add_residual(xs, attn_branch, rate, training=self.training, generator=generator,
                                            scaling=self.gamma1)
        if cls_only:
            xs = [x[:, :1] for x in xs]
        return dino_kernels.drop_add_residual(xs, self._mlp_branch, rate, training=self.training,
                                              generator=generator, scaling=self.gamma2)


class VisionTransformer(nn.Module):
    """ViT backbone. ``forward(crops)`` takes a list of crop groups (B_i, 3, S_i, S_i) and returns the final-norm CLS
    features of all of them, concatenated in order: (Σ B_i, embed_dim).

    ``fused=True`` (``--kernels fused``): ``dino_kernels.packed_attention``, the patch embedding as one GEMM, and in
    ``forward`` a last block that runs the queries, the projection and the MLP on the CLS rows alone (only the CLS
    token leaves it). ``fused=False``: DINO's plain PyTorch (one SDPA call per crop group, the convolution, every
    token through every block). Both compute the same function."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, n_registers: int = 0,
                 layerscale: float = 0.0, in_chans: int = 3, fused: bool = True, mask_token: bool = False) -> None:
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.n_registers = n_registers
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        n_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, embed_dim))
        self.registers = nn.Parameter(torch.zeros(1, n_registers, embed_dim)) if n_registers else None
        # DINOv2's learned embedding of a masked patch (iBOT), initialised to 0.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        self.fused = fused
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r, layerscale, packed_attention=fused)
                                    for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.registers is not None:
            nn.init.trunc_normal_(self.registers, std=0.02)
        self.apply(_trunc_normal_init)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h×w patch grid: (1, 1 + h·w, D)."""
        n0 = self.pos_embed.shape[1] - 1
        if h * w == n0 and h == w:
            return self.pos_embed
        side = int(math.sqrt(n0))
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((h + POS_INTERP_OFFSET) / side, (w + POS_INTERP_OFFSET) / side)
        grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (h, w):
            raise ValueError(f"position embedding interpolated to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        grid = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C, H, W) images -> ((B, h·w, D) patch embeddings, h, w). The fused path runs the convolution (kernel =
        stride = patch size) as one GEMM over the unfolded patches, the same maths: on CPU without oneDNN's per-call
        setup, which costs more than the arithmetic on small crops; on an H200 cuDNN's default choice for it under
        bf16 autocast (its implicit-GEMM convolution, without ``cudnn.benchmark``) took 0.8 ms a call for a
        ViT-S/16 step's crops, about 5 % of the step's device time."""
        if not self.fused:
            patches = self.patch_embed(x)
            return patches.flatten(2).transpose(1, 2), patches.shape[-2], patches.shape[-1]
        (b, c), p = x.shape[:2], self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        unfolded = x[..., :h * p, :w * p].reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
        return F.linear(unfolded, self.patch_embed.weight.flatten(1), self.patch_embed.bias), h, w

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, 1 + R + h·w, D) tokens: CLS, registers, patches. ``masks`` (B, h·w) bool puts
        the mask token in place of the masked patches' embeddings, before the position embedding is added."""
        b = x.shape[0]
        patches, h, w = self.embed_patches(x)
        if masks is not None:
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w)
        if self.registers is not None:
            tokens = torch.cat([tokens[:, :1], self.registers.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        return tokens

    def forward_tokens(self, crops: Sequence[torch.Tensor], generator: torch.Generator | None = None,
                       masks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Final-normed tokens of each crop group: list of (B_i, N_i, D). ``masks`` (B_0, h·w) masks the patches of
        the first group (the global crops)."""
        xs = [self.prepare_tokens(c, masks if i == 0 else None) for i, c in enumerate(crops)]
        for block in self.blocks:
            xs = block(xs, generator)
        return [self.norm(x) for x in xs]

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not self.fused:
            return torch.cat([x[:, 0] for x in self.forward_tokens(crops, generator)])
        xs = [self.prepare_tokens(c) for c in crops]
        for block in self.blocks[:-1]:
            xs = block(xs, generator)
        return self.norm(torch.cat([x[:, 0] for x in self.blocks[-1](xs, generator, cls_only=True)]))

    @torch.no_grad()
    def last_cls_attention(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, heads, h, w): the last block's CLS attention over the patches (DINO's figure)."""
        x = self.prepare_tokens(images)
        for block in self.blocks[:-1]:
            x = block([x])[0]
        attn = self.blocks[-1].attn.cls_attention(self.blocks[-1].norm1(x))
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        return attn[:, :, 1 + self.n_registers:].reshape(x.shape[0], -1, h, w)


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> l2-normalise -> weight-normalised linear to K prototypes (no bias, gain g = 1).

    ``norm_last_layer=True`` freezes g, so the logits are cosines in [-1, 1].
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in in (in_dim, hidden_dim):
            layers += [nn.Linear(fan_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        self.apply(_trunc_normal_init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class DINOModel(nn.Module):
    """Backbone + head (+ DINOv2's separate iBOT head, if any): crop groups -> (Σ B_i, K) logits, rows in crop-group
    order."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead, ibot_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone, self.head, self.ibot_head = backbone, head, ibot_head

    def forward(self, crops: Sequence[torch.Tensor], generator: torch.Generator | None = None,
                return_features: bool = False, patch_indices: torch.Tensor | None = None,
                masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits (Σ B_i, K); with ``return_features`` also the backbone CLS features (Σ B_i, D) they came from.

        With ``patch_indices`` (DINOv2's forward; under DDP it must go through ``forward``): (CLS logits, CLS
        features, patch logits (M, K)), the patch logits being those of the first group's (the global crops')
        patches at the flat ``patch_indices`` into (B_0 · h·w). ``masks`` (B_0, h·w), the student's, replaces those
        patches by the mask token at the input. The CLS tokens and the patches go through the shared head in one
        call, or the patches through the iBOT head.
        """
        if patch_indices is None:
            features = self.backbone(crops, generator)
            logits = self.head(features)
            return (logits, features) if return_features else logits
        tokens = self.backbone.forward_tokens(crops, generator, masks)
        features = torch.cat([t[:, 0] for t in tokens])
        patches = tokens[0][:, 1 + self.backbone.n_registers:].flatten(0, 1).index_select(0, patch_indices)
        if self.ibot_head is not None:
            return self.head(features), features, self.ibot_head(patches)
        logits = self.head(torch.cat([features, patches]))
        return logits[:features.shape[0]], features, logits[features.shape[0]:]


def build_model(cfg, drop_path: bool) -> DINOModel:
    """Student (``drop_path=True``) or teacher network from a :class:`dino.config.Config` (with recipe ``dinov2``:
    a mask token, and a separate iBOT head if ``ibot_separate_head``). The attention implementation is chosen here,
    once: ``dino_kernels.packed_attention`` for ``kernels="fused"``, one plain-PyTorch SDPA call per crop group for
    ``kernels="reference"``."""
    backbone = VisionTransformer(
        img_size=cfg.global_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate if drop_path else 0.0,
        n_registers=cfg.n_registers, layerscale=cfg.layerscale, fused=cfg.kernels != "reference",
        mask_token=cfg.recipe == "dinov2")

    def head() -> DINOHead:
        return DINOHead(cfg.embed_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.norm_last_layer,
                        cfg.head_use_bn)

    return DINOModel(backbone, head(), head() if cfg.recipe == "dinov2" and cfg.ibot_separate_head else None)
