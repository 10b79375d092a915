"""Teacher EMA over real ViT parameter lists: ours against what DINO, DINOv2 and timm do.

Bytes that must move: teacher read + teacher write + student read, once each.
"""

import pytest
import torch

import dino_kernels
from dino_kernels import reference

MOMENTUM = 0.996


def vit_parameter_shapes(dim: int, depth: int, patch: int = 16, tokens: int = 197) -> list[tuple[int, ...]]:
    """Shapes of a timm/DINO ViT backbone's parameters, in `named_parameters()` order."""
    shapes = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


MODELS = {"vit-s16": dict(dim=384, depth=12), "vit-l16": dict(dim=1024, depth=24)}


def official_dino_loop(teacher, student, m):
    for pt, ps in zip(teacher, student):  # facebookresearch/dino main_dino.py
        pt.detach().mul_(m).add_((1 - m) * ps.detach())


def dinov2_foreach(teacher, student, m):
    torch._foreach_mul_(teacher, m)  # facebookresearch/dinov2 SSLMetaArch.update_teacher
    torch._foreach_add_(teacher, student, alpha=1 - m)


def foreach_lerp(teacher, student, m):
    torch._foreach_lerp_(teacher, student, 1 - m)  # timm ModelEmaV3


PROVIDERS = {
    "reference": reference.ema_,
    "compiled": torch.compile(reference.ema_, dynamic=False),
    "dino_loop": official_dino_loop,
    "dinov2_foreach": dinov2_foreach,
    "foreach_lerp": foreach_lerp,
    "ours": dino_kernels.ema_,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_ema(benchmark, measure, device, model, provider):
    if provider == "compiled" and model == "vit-l16" and device == "cpu":
        pytest.skip("Inductor compiles one kernel per tensor; on 2 CPU cores that takes minutes at ViT-L")
    shapes = vit_parameter_shapes(**MODELS[model])
    teacher = [torch.randn(s, device=device) for s in shapes]
    student = [torch.randn(s, device=device) for s in shapes]
    numel = sum(t.numel() for t in teacher)
    fn = PROVIDERS[provider]
    measure(benchmark, lambda: fn(teacher, student, MOMENTUM), case=f"ema {model} fp32 ({numel / 1e6:.0f}M)",
            provider=provider, device=device, bytes_moved=numel * (4 + 4 + 4))
