"""Sample-skipping stochastic depth on a ViT block with DINOv2's multi-crop mix, against what others do.

A pre-norm ViT block (attention + MLP residual branches, LayerScale) runs forward + backward on the packed crops of
``images`` images: 2 global crops of 257 tokens and 8 local crops of 50 tokens each (patch 14). Providers:

- ``full``: no stochastic depth (the compute every provider is compared with: ``time / full at p=0``);
- ``timm_droppath``: timm's DropPath, a per-sample Bernoulli mask times the residual (full compute);
- ``torch_index``: DINOv2 without xformers / DINOv3: ``randperm``, ``x[kept]`` + ``torch.cat``, the branch on the
  kept samples, ``torch.index_add`` of ``ls * residual`` with ``alpha = B / kept``;
- ``reference``: :func:`dino_kernels.reference.drop_add_residual` (plain PyTorch, fp32 math);
- ``ours``: :func:`dino_kernels.drop_add_residual` (fused gather and scaled index-add).

Every provider computes attention the same way, one SDPA call per crop group of equal-length sequences, so the
differences are the stochastic-depth handling alone. ``test_index_ops`` times the two ops by themselves (fwd+bwd of
gather + scaled add, DINOv2-g shapes as in xformers' ``benchmark_indexing.py``) with the bytes they must move.

At the end, a table gives every block median relative to ``full`` at p = 0 of the same model. The GPU session set
(``-m session``): the ViT-g/14 block at p ∈ {0, 0.4}, ours against full compute, timm's DropPath and the index path.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import dino_kernels
from dino_kernels import reference

DROP_RATES = (0.0, 0.1, 0.3, 0.4)
# name: (dim, heads, images, global tokens, local tokens, device). GPU: ViT-L/14 and ViT-g/14 at DINOv2's crop mix;
# CPU: a small ViT (patch 28 at 224/98 px: 65 and 13 tokens) that runs in seconds on 2 cores.
MODELS = {
    "vit-l14": (1024, 16, 16, 257, 50, "cuda"),
    "vit-g14": (1536, 24, 12, 257, 50, "cuda"),
    "vit-tiny28": (192, 3, 4, 65, 13, "cpu"),
}
DRY_RUN_MODEL = (32, 2, 1, 17, 5)  # dim, heads, images, global tokens, local tokens
PROVIDERS = ("full", "timm_droppath", "torch_index", "reference", "ours")
SESSION_PROVIDERS = ("full", "timm_droppath", "torch_index", "ours")
_MEDIANS: dict[tuple[str, str, float], float] = {}


class ViTBlock(torch.nn.Module):
    """DINOv2's pre-norm block: x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(x)); branches on packed tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)
        self.ls1 = torch.nn.Parameter(torch.full((dim,), 1e-5))
        self.ls2 = torch.nn.Parameter(torch.full((dim,), 1e-5))

    def attn(self, packed: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
        """Attention within each image's crop; ``groups`` = (images, tokens) of the equal-length runs of packed."""
        qkv = self.qkv(self.norm1(packed))
        dim = packed.shape[-1]
        outs = []
        for part, (count, tokens) in zip(qkv.split([c * t for c, t in groups]), groups):
            q, k, v = part.view(count, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(count * tokens, dim))
        return self.proj(torch.cat(outs))

    def mlp(self, packed: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm2(packed))))


def _keep(batch: int, p: float) -> int:
    return max(int(batch * (1 - p)), 1)


def _groups(xs: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(x.shape[0], x.shape[1]) for x in xs]


def full_block(block: ViTBlock, xs: list[torch.Tensor], p: float) -> list[torch.Tensor]:
    packed = torch.cat([x.flatten(0, 1) for x in xs])
    y = packed + block.ls1 * block.attn(packed, _groups(xs))
    y = y + block.ls2 * block.mlp(y)
    return [part.view_as(x) for part, x in zip(y.split([x.shape[0] * x.shape[1] for x in xs]), xs)]


@functools.lru_cache(maxsize=8)
def _tokens_per_sample(groups: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([tokens for count, tokens in groups for _ in range(count)], device=device)


def timm_droppath_block(block: ViTBlock, xs: list[torch.Tensor], p: float) -> list[torch.Tensor]:
    packed = torch.cat([x.flatten(0, 1) for x in xs])
    tokens = _tokens_per_sample(tuple(_groups(xs)), packed.device)

    def drop_path(residual):  # timm.layers.drop_path: Bernoulli(1 - p) per sample, scaled by 1 / (1 - p)
        mask = residual.new_empty(len(tokens)).bernoulli_(1 - p).div_(1 - p)
        return residual * mask.repeat_interleave(tokens, output_size=packed.shape[0])[:, None]

    y = packed + drop_path(block.ls1 * block.attn(packed, _groups(xs)))
    y = y + drop_path(block.ls2 * block.mlp(y))
    return [part.view_as(x) for part, x in zip(y.split([x.shape[0] * x.shape[1] for x in xs]), xs)]


def torch_index_block(block: ViTBlock, xs: list[torch.Tensor], p: float) -> list[torch.Tensor]:
    def residual_add(xs, branch, scaling):  # dinov2 layers/block.py, torch.index_add path
        kept = [torch.randperm(x.shape[0], device=x.device)[:_keep(x.shape[0], p)] for x in xs]
        packed = torch.cat([x[k].flatten(0, 1) for x, k in zip(xs, kept)])
        residual = branch(packed, [(len(k), x.shape[1]) for x, k in zip(xs, kept)])
        parts = residual.split([len(k) * x.shape[1] for x, k in zip(xs, kept)])
        return [torch.index_add(x.flatten(1), 0, k, (scaling * r).view(len(k), -1), alpha=x.shape[0] / len(k))
                .view_as(x) for x, k, r in zip(xs, kept, parts)]

    xs = residual_add(xs, block.attn, block.ls1)
    return residual_add(xs, lambda packed, groups: block.mlp(packed), block.ls2)


def _drop_add_block(fn):
    def run(block: ViTBlock, xs: list[torch.Tensor], p: float) -> list[torch.Tensor]:
        groups = [(_keep(x.shape[0], p), x.shape[1]) for x in xs]
        xs = fn(xs, lambda packed, cu_seqlens, max_seqlen: block.attn(packed, groups), p, scaling=block.ls1)
        return fn(xs, lambda packed, cu_seqlens, max_seqlen: block.mlp(packed), p, scaling=block.ls2)

    return run


BLOCKS = {
    "full": full_block,
    "timm_droppath": timm_droppath_block,
    "torch_index": torch_index_block,
    "reference": _drop_add_block(reference.drop_add_residual),
    "ours": _drop_add_block(dino_kernels.drop_add_residual),
}


def _setup(shape: tuple[int, ...], device: str):
    dim, heads, images, global_tokens, local_tokens = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    block = ViTBlock(dim, heads).to(device, dtype)
    xs = [torch.randn(2 * images, global_tokens, dim, device=device, dtype=dtype, requires_grad=True),
          torch.randn(8 * images, local_tokens, dim, device=device, dtype=dtype, requires_grad=True)]
    return block, xs, [torch.randn_like(x) for x in xs]


@pytest.fixture(scope="module", autouse=True)
def _relative_table(request):
    yield
    if not _MEDIANS:
        return
    lines = ["", "stochastic depth: block fwd+bwd median relative to full compute at p = 0 (lower is better)",
             "| model | p | " + " | ".join(PROVIDERS) + " |", "|" + "---|" * (len(PROVIDERS) + 2)]
    for model in MODELS:
        full = _MEDIANS.get((model, "full", 0.0))
        if full is None:
            continue
        for p in DROP_RATES:
            cells = [f"{_MEDIANS[(model, prov, p)] / full:.3f}" if (model, prov, p) in _MEDIANS else ""
                     for prov in PROVIDERS]
            lines.append(f"| {model} | {p} | " + " | ".join(cells) + " |")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def _block_params():
    for model in MODELS:
        for p in DROP_RATES:
            # full compute does not depend on p: measured once, at p = 0
            for provider in PROVIDERS if p == 0.0 else PROVIDERS[1:]:
                session = model == "vit-g14" and p in (0.0, 0.4) and provider in SESSION_PROVIDERS
                yield pytest.param(model, p, provider, marks=[pytest.mark.session] if session else [])


@pytest.mark.parametrize(("model", "p", "provider"), list(_block_params()))
def test_vit_block(benchmark, measure, bench_env, model, p, provider):
    *shape, device = MODELS[model]
    device = bench_env.device(device)
    block, xs, grads = _setup(DRY_RUN_MODEL if bench_env.dry_run else tuple(shape), device)
    params = list(block.parameters())
    run = BLOCKS[provider]

    def step():
        outs = run(block, xs, p)
        return torch.autograd.grad(outs, [*xs, *params], grads)

    case = f"sd block {model} p={p}"
    _MEDIANS[(model, provider, p)] = measure(benchmark, step, case=case, provider=provider, device=device)


# ------------------------------------------------------------------------------------------ the ops alone
OP_SHAPES = {  # (global images, local images, global tokens, local tokens, dim, keep fraction, device)
    "dinov2-g": (48, 192, 257, 50, 1536, 0.6, "cuda"),
    "small": (16, 64, 65, 13, 192, 0.6, "cpu"),
}
DRY_RUN_OP_SHAPE = (4, 8, 17, 5, 32, 0.6)


def _torch_ops(xs, kept, residual_scale, scaling):
    packed = torch.cat([x[k].flatten(0, 1) for x, k in zip(xs, kept)])
    parts = (packed * 2).split([len(k) * x.shape[1] for x, k in zip(xs, kept)])  # a stand-in branch
    return [torch.index_add(x.flatten(1), 0, k, (scaling * r).view(len(k), -1), alpha=x.shape[0] / len(k))
            .view_as(x) for x, k, r in zip(xs, kept, parts)]


def _our_ops(module):
    def run(xs, kept, residual_scale, scaling):
        packed = module.index_select_cat(xs, kept)
        parts = (packed * 2).split([len(k) * x.shape[1] for x, k in zip(xs, kept)])
        return [module.scaled_index_add(x, k, r.view(len(k), *x.shape[1:]), alpha=x.shape[0] / len(k),
                                        scaling=scaling) for x, k, r in zip(xs, kept, parts)]

    return run


OP_PROVIDERS = {"reference": _our_ops(reference), "torch_index": _torch_ops, "ours": _our_ops(dino_kernels)}


@pytest.mark.parametrize("provider", list(OP_PROVIDERS))
@pytest.mark.parametrize("shape", list(OP_SHAPES))
def test_index_ops(benchmark, measure, bench_env, shape, provider):
    *sizes, device = OP_SHAPES[shape]
    device = bench_env.device(device)
    n_global, n_local, t_global, t_local, dim, fraction = DRY_RUN_OP_SHAPE if bench_env.dry_run else sizes
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    xs = [torch.randn(n_global, t_global, dim, device=device, dtype=dtype, requires_grad=True),
          torch.randn(n_local, t_local, dim, device=device, dtype=dtype, requires_grad=True)]
    scaling = torch.randn(dim, device=device, requires_grad=True)
    kept = [torch.randperm(x.shape[0], device=device)[: math.floor(x.shape[0] * fraction)] for x in xs]
    grads = [torch.randn_like(x) for x in xs]
    fn = OP_PROVIDERS[provider]

    def step():
        return torch.autograd.grad(fn(xs, kept, None, scaling), [*xs, scaling], grads)

    # Bytes the fused kernels must move, in rows of x: gather 2k, add 2B + k, grad of src and scaling 3k,
    # grad of the gather B + k (the stand-in branch and autograd's sum of x's two gradients are not counted).
    row_bytes = [x.shape[1] * dim * x.element_size() for x in xs]
    moved = sum(rb * (7 * len(k) + 3 * x.shape[0]) for rb, k, x in zip(row_bytes, kept, xs))
    measure(benchmark, step, case=f"sd ops {shape} fwd+bwd", provider=provider, device=device, bytes_moved=moved)
