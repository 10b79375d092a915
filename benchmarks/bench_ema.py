"""Teacher EMA over real ViT parameter lists: ours against what DINO, DINOv2 and timm do.

Providers: ``reference`` (our plain-PyTorch reference, fp32 math per tensor: slow, not what users run), ``compiled``
(it under torch.compile), ``dino_loop`` (DINO's per-parameter ``mul_`` + ``add_``), ``dinov2_foreach`` (DINOv2's
``_foreach_mul_`` + ``_foreach_add_``), ``foreach_lerp`` (timm's ``_foreach_lerp_``: the strongest baseline) and
``ours``. The GPU session set (``-m session``) is ViT-L on CUDA without ``compiled`` (Inductor compiles hundreds of
tensors there). Bytes that must move: teacher read + teacher write + student read, once each.
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
DRY_RUN_MODEL = dict(dim=32, depth=2, patch=4, tokens=17)
DEVICES = ("cpu", "cuda")


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


def _params():
    for device in DEVICES:
        for model in MODELS:
            for provider in PROVIDERS:
                session = device == "cuda" and model == "vit-l16" and provider != "compiled"
                yield pytest.param(device, model, provider, marks=[pytest.mark.session] if session else [])


@pytest.mark.parametrize(("device", "model", "provider"), list(_params()))
def test_ema(benchmark, measure, bench_env, device, model, provider):
    if provider == "compiled" and model == "vit-l16" and device == "cpu" and not bench_env.dry_run:
        pytest.skip("Inductor compiles one kernel per tensor; on 2 CPU cores that takes minutes at ViT-L")
    device = bench_env.device(device)
    shapes = vit_parameter_shapes(**(DRY_RUN_MODEL if bench_env.dry_run else MODELS[model]))
    teacher = [torch.randn(s, device=device) for s in shapes]
    student = [torch.randn(s, device=device) for s in shapes]
    numel = sum(t.numel() for t in teacher)
    fn = PROVIDERS[provider]
    measure(benchmark, lambda: fn(teacher, student, MOMENTUM), case=f"ema {model} fp32 ({numel / 1e6:.3g}M)",
            provider=provider, device=device, bytes_moved=numel * (4 + 4 + 4))
