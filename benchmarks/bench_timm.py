"""A timm ViT's multi-crop training forward + backward: timm per crop group against ``dino_kernels.timm``.

The model is timm's ``VisionTransformer`` with the architecture of ``vit_small_patch16_224`` (patch 16, D = 384,
12 blocks, 6 heads), ``dynamic_img_size=True``, ``drop_path_rate=0.1``, in train mode, no classifier. A step is
the forward of every crop group and the backward to the weights (random cotangents on the output tokens).
Providers:

- ``timm_per_group``: ``model.forward_features`` once per crop group (timm's SDPA attention, DropPath's Bernoulli
  mask over the full compute), what a DINO training loop on timm does;
- ``ours``: ``model.forward_crops(crops)`` after :func:`dino_kernels.timm.enable`: every group through the blocks at
  once, packed attention, the dropped samples' residual branches skipped.

Cases: ``timm vit-s16 B=64 2+10 bf16 fwd+bwd`` on CUDA (2 x 64 crops of 224² and 10 x 64 of 96², bf16 autocast over
fp32 weights, as the trainer's ``--amp bf16``; the GPU session set, ``-m session``) and a small CPU case in fp32
(B=8, 2 x 8 crops of 64² and 4 x 8 of 32²). ``--dk-dry-run``: a 2-block ViT on tiny crops, on CPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import dino_kernels.timm  # noqa: E402

VIT_S16 = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}
# case: (device, model options, images B, (n_global, global size), (n_local, local size), dtype, in the session set)
CASES = {
    "timm vit-s16 B=64 2+10 bf16 fwd+bwd": ("cuda", VIT_S16, 64, (2, 224), (10, 96), torch.bfloat16, True),
    "timm vit-s16 B=8 2+4 fp32 fwd+bwd": ("cpu", VIT_S16, 8, (2, 64), (4, 32), torch.float32, False),
}
DRY_RUN = ({"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, 2, (2, 32), (2, 16))
PROVIDERS = ("timm_per_group", "ours")


def _params():
    for case, (*_, session) in CASES.items():
        for provider in PROVIDERS:
            yield pytest.param(case, provider, marks=[pytest.mark.session] if session else [])


@pytest.mark.parametrize(("case", "provider"), list(_params()))
def test_timm_multi_crop_step(benchmark, measure, bench_env, case, provider):
    device, options, images, (n_global, global_size), (n_local, local_size), dtype, _ = CASES[case]
    device = bench_env.device(device)
    if bench_env.dry_run:
        options, images, (n_global, global_size), (n_local, local_size) = DRY_RUN
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, num_classes=0, dynamic_img_size=True, drop_path_rate=0.1,
                              **options).to(device).train()
    dino_kernels.timm.enable(model)
    crops = [torch.randn(n_global * images, 3, global_size, global_size, device=device),
             torch.randn(n_local * images, 3, local_size, local_size, device=device)]
    params = list(model.parameters())
    autocast = (torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        cotangents = [torch.randn_like(t) for t in model.forward_crops(crops)]

    def forward():
        if provider == "ours":
            return model.forward_crops(crops)
        return [model.forward_features(c) for c in crops]

    def step():
        with autocast:
            outs = forward()
        return torch.autograd.grad(outs, params, cotangents)

    measure(benchmark, step, case=case, provider=provider, device=device)
