"""dino_kernels.timm: the packed multi-crop forward of timm VisionTransformers, against the real timm package.

Small timm ViTs (pretrained=False, every parameter perturbed so that LayerScale, tokens and norms are not at their
initial constants) with crop groups of different sizes and batch sizes: in eval mode ``forward_crops`` equals
timm's ``forward_features`` per group (forward and weight gradients, random cotangents); in train mode the kept /
dropped structure of stochastic depth is rebuilt with timm's own modules per group and the same draws.
"""

import copy
import functools
import pickle

import pytest
import torch
from conftest import TOLERANCE, rel_error, requires_interpreter
from torch import nn

import dino_kernels
import dino_kernels.timm as dk_timm

timm = pytest.importorskip("timm")
from timm.layers import Attention, ConvMlp, DropPath  # noqa: E402
from timm.models.vision_transformer import ResPostBlock, VisionTransformer  # noqa: E402

# Crop groups of different sizes and batch sizes: 3 "global" 32x32 crops (16 patches) and 5 "local" 16x16 ones (4).
CROP_SHAPES = ((3, 3, 32, 32), (5, 3, 16, 16))
VARIANTS = {
    "plain": {},
    "registers": {"reg_tokens": 2, "no_embed_class": True},
    "layerscale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
    "avg_pool_no_class_token": {"class_token": False, "global_pool": "avg"},
    "rmsnorm_swiglu_scale_norms": {"norm_layer": "rmsnorm", "mlp_layer": timm.layers.SwiGLU, "pre_norm": True,
                                   "scale_attn_norm": True, "scale_mlp_norm": True},
    "gated_attention": {"gated": True},
}


def _vit(dtype=torch.float32, gated=False, **options) -> VisionTransformer:
    options = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0,
               "dynamic_img_size": True, **options}
    model = VisionTransformer(**options)
    if gated:  # timm's Attention(gated=True) has no VisionTransformer option: swapped in, timm's forward uses it
        for block in model.blocks:
            block.attn = Attention(32, num_heads=2, qkv_bias=True, gated=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def _crops(dtype=torch.float32, device="cpu", shapes=CROP_SHAPES) -> list[torch.Tensor]:
    return [torch.randn(shape, dtype=dtype, device=device) for shape in shapes]


def _weight_grads(outs, model, cotangents):
    """Gradients of every parameter; zeros for those forward_features does not use (e.g. fc_norm, the head's)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(outs, params, cotangents, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _assert_parity(model, crops, tolerance):
    """forward_crops against timm's forward_features per group: outputs and every weight's gradient."""
    ours = model.forward_crops(crops)
    expected = [model.forward_features(c) for c in crops]
    cotangents = [torch.randn_like(e) for e in expected]
    assert [o.shape for o in ours] == [e.shape for e in expected]
    for o, e in zip(ours, expected):
        assert rel_error(o, e) <= tolerance, rel_error(o, e)
    _assert_grads_match(model, _weight_grads(ours, model, cotangents), _weight_grads(expected, model, cotangents),
                        tolerance)


def _assert_grads_match(model, grads, expected, tolerance):
    """Every weight's gradient within ``tolerance`` relative, except those that are (near) zero in exact maths
    (e.g. the k_norm bias: softmax ignores a shift of every key by one vector), which are compared with the norm of
    the whole gradient."""
    total = torch.cat([e.double().flatten() for e in expected]).norm().item()
    for (name, _), g, e in zip(model.named_parameters(), grads, expected):
        if e.double().norm().item() > 1e-3 * total:
            assert rel_error(g, e) <= tolerance, (name, rel_error(g, e))
        else:
            assert (g.double() - e.double()).norm().item() <= tolerance * total, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eval_matches_timm_forward_features(variant, dtype):
    model = dk_timm.enable(_vit(dtype, **VARIANTS[variant]).eval())
    _assert_parity(model, _crops(dtype), TOLERANCE[dtype])


@requires_interpreter
def test_eval_matches_timm_under_triton_backend():
    model = dk_timm.enable(_vit(init_values=0.1).eval())
    with dino_kernels.backend("triton"):
        _assert_parity(model, _crops(), TOLERANCE[torch.float32])


def test_static_img_size_takes_its_own_size():
    """dynamic_img_size=False: crops of the model's img_size (groups of different batch sizes) run, as in timm."""
    model = dk_timm.enable(_vit(dynamic_img_size=False).eval())
    _assert_parity(model, _crops(shapes=((3, 3, 32, 32), (2, 3, 32, 32))), TOLERANCE[torch.float32])


def _timm_branch_with_drops(x, branch, layer_scale, drop_path, generator):
    """DINOv2's stochastic depth written with timm's modules on one group: the branch (timm's per-group forward)
    on the kept samples ``randperm(B)[:keep]``, their residual scaled by B / keep, dropped rows unchanged."""
    batch, p = x.shape[0], getattr(drop_path, "drop_prob", 0.0)
    keep = max(int(batch * (1 - p)), 1)
    if keep == batch:
        return x + layer_scale(branch(x))
    kept = torch.randperm(batch, generator=generator)[:keep]
    return x.index_add(0, kept, layer_scale(branch(x[kept])), alpha=batch / keep)


def _expected_train_forward(model, crops, generator):
    xs = [model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(c)))) for c in crops]
    for block in model.blocks:
        # The draws of one residual add go group after group, attention's add before the MLP's.
        attn = functools.partial(lambda b, x: b.attn(b.norm1(x)), block)
        xs = [_timm_branch_with_drops(x, attn, block.ls1, block.drop_path1, generator) for x in xs]
        mlp = functools.partial(lambda b, x: b.mlp(b.norm2(x)), block)
        xs = [_timm_branch_with_drops(x, mlp, block.ls2, block.drop_path2, generator) for x in xs]
    return [model.norm(x) for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_drop_path_skips_the_dropped_samples(dtype):
    """drop_path_rate 0.8 over 2 blocks: block 0 keeps every sample, block 1 (rate 0.8) keeps 1 of 3 and 1 of 5."""
    model = dk_timm.enable(_vit(dtype, init_values=0.1, drop_path_rate=0.8).train())
    crops = _crops(dtype)
    ours = model.forward_crops(crops, generator=torch.Generator().manual_seed(3))
    expected = _expected_train_forward(model, crops, torch.Generator().manual_seed(3))
    eval_outs = [model.forward_features(c) for c in crops]
    cotangents = [torch.randn_like(e) for e in expected]
    for o, e, ev in zip(ours, expected, eval_outs):
        assert rel_error(o, e) <= TOLERANCE[dtype], rel_error(o, e)
        assert rel_error(o, ev) > 1e-3  # something was dropped and rescaled
    _assert_grads_match(model, _weight_grads(ours, model, cotangents), _weight_grads(expected, model, cotangents),
                        TOLERANCE[dtype])
    again = model.forward_crops(crops, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, o) for a, o in zip(again, ours))


def test_train_without_drop_path_matches_timm():
    """Train mode at drop_path_rate 0: every sample kept, timm's values; with timm's PatchDropout too, which draws
    from torch's generator group after group in both forwards, so that the same patches are kept."""
    model = dk_timm.enable(_vit(init_values=0.1).train())
    _assert_parity(model, _crops(), TOLERANCE[torch.float32])
    model = dk_timm.enable(_vit(patch_drop_rate=0.5, reg_tokens=1).train())
    crops = _crops()
    torch.manual_seed(1)
    ours = model.forward_crops(crops)
    torch.manual_seed(1)
    expected = [model.forward_features(c) for c in crops]
    assert [o.shape[1] for o in ours] == [2 + 8, 2 + 2]  # class and register tokens + half the patches
    for o, e in zip(ours, expected):
        assert rel_error(o, e) <= TOLERANCE[torch.float32]


# The library's packing helpers are lru_cache'd (dynamo traces through them and warns).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile():
    """The patched model compiles as before (forward_crops reachable through the compiled module), and the compiled
    packed forward (default dynamic shapes) matches eager in training, forward and grads."""
    model = dk_timm.enable(_vit(init_values=0.1, drop_path_rate=0.8).eval())
    crops = _crops()
    x = crops[0]
    compiled_model = torch.compile(model, backend="aot_eager")  # timm's own forward, unchanged
    assert rel_error(compiled_model(x), model(x)) <= TOLERANCE[torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(compiled_model.forward_crops(crops), model.forward_crops(crops)))
    model.train()
    compiled = torch.compile(model.forward_crops)
    outs = compiled(crops, generator=torch.Generator().manual_seed(5))
    eager = model.forward_crops(crops, generator=torch.Generator().manual_seed(5))
    cotangents = [torch.randn_like(e) for e in eager]
    for o, e in zip(outs, eager):
        assert rel_error(o, e) <= TOLERANCE[torch.float32]
    _assert_grads_match(model, _weight_grads(outs, model, cotangents), _weight_grads(eager, model, cotangents),
                        TOLERANCE[torch.float32])


def test_enable_keeps_state_dict_forward_and_copies():
    model = _vit(init_values=0.1, reg_tokens=1).eval()
    fresh = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert dk_timm.enable(model) is model
    bound = model.forward_crops
    assert dk_timm.enable(model) is model and model.forward_crops is bound  # idempotent
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert len(list(model.buffers())) == len(list(fresh.buffers()))
    fresh.load_state_dict(model.state_dict())  # weights load both ways, strictly
    model.load_state_dict(fresh.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), fresh(x)) and torch.equal(model.forward_features(x), fresh.forward_features(x))
    crops = _crops()
    outs = model.forward_crops(crops)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.forward_crops.args[0] is clone
        with torch.no_grad():
            next(clone.parameters()).add_(1.0)  # the clone's forward_crops uses the clone's weights
        assert not torch.equal(clone.forward_crops(crops)[0], outs[0])


class _OwnForwardFeatures(VisionTransformer):
    def forward_features(self, x, attn_mask=None, is_causal=False):
        return super().forward_features(x) * 2


def _with(module_name, attribute, value):
    def build():
        model = _vit()
        setattr(getattr(model.blocks[1], module_name) if module_name else model.blocks[1], attribute, value)
        return model
    return build


MODEL_ERRORS = [
    (lambda: nn.Linear(2, 2), TypeError, "timm VisionTransformer"),
    (lambda: _vit(attn_drop_rate=0.1), ValueError, r"attn_drop.p \(attn_drop_rate\) must be 0.*0.1"),
    (lambda: _vit(block_fn=ResPostBlock), TypeError, "blocks.0. is ResPostBlock"),
    (lambda: _vit(attn_layer="diff"), TypeError, r"blocks\[0\].attn is DiffAttention"),
    (lambda: _vit(mlp_layer=ConvMlp), TypeError, r"blocks\[0\].mlp is ConvMlp"),
    (_with("", "norm1", nn.BatchNorm1d(32)), TypeError, r"blocks\[1\].norm1 is BatchNorm1d"),
    (_with("", "drop_path1", DropPath(0.1, scale_by_keep=False)), ValueError, "drop_path1.scale_by_keep"),
    (_with("", "drop_path2", nn.Dropout(0.1)), TypeError, "drop_path2 is Dropout"),
    (_with("", "ls2", nn.Linear(32, 32)), TypeError, "ls2 is Linear"),
    (lambda: _OwnForwardFeatures(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), TypeError,
     "_OwnForwardFeatures overrides VisionTransformer.forward_features"),
]


@pytest.mark.parametrize(("build", "error", "match"), MODEL_ERRORS)
def test_unsupported_models_are_refused_at_enable(build, error, match):
    model = build()
    with pytest.raises(error, match=match):
        dk_timm.enable(model)
    with pytest.raises(error, match=match):
        dk_timm.forward_crops(model, _crops())


# timm's registered models that DINO users load (DINO's ViT-S/16, DINOv2's with registers, DeiT with its
# distillation token, CLIP's ViT-B/16 with its pre-norm, a global-pool model with registers), random weights.
NAMED_MODELS = ["vit_small_patch16_224", "vit_small_patch14_reg4_dinov2", "deit_small_distilled_patch16_224",
                "vit_base_patch16_clip_224", "vit_little_patch16_reg4_gap_256"]


@pytest.mark.parametrize("name", NAMED_MODELS)
def test_named_timm_models(name):
    torch.manual_seed(0)
    model = dk_timm.enable(timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0).eval())
    patch = model.patch_embed.patch_size[0]
    crops = [torch.randn(2, 3, 4 * patch, 4 * patch), torch.randn(3, 3, 2 * patch, 3 * patch)]
    with torch.no_grad():
        for ours, crop in zip(model.forward_crops(crops), crops):
            assert rel_error(ours, model.forward_features(crop)) <= TOLERANCE[torch.float32]


def test_eva_models_are_refused():
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, dynamic_img_size=True, num_classes=0)
    with pytest.raises(TypeError, match="model must be a timm VisionTransformer; got Eva"):
        dk_timm.enable(model)


def _fixed_cotangent(t: torch.Tensor) -> torch.Tensor:
    return torch.arange(t.numel(), dtype=t.dtype).sin().view(t.shape)


def test_grad_checkpointing_recomputes_the_same_subsets():
    """timm's set_grad_checkpointing: every block checkpointed, the recomputation draws the forward's kept samples
    (a given generator rewound, torch's restored by checkpoint) and the generator ends where the forward left it."""
    model = dk_timm.enable(_vit(init_values=0.1, drop_path_rate=0.8).train())
    crops = _crops()
    runs = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        generator = torch.Generator().manual_seed(4)
        outs = model.forward_crops(crops, generator=generator)
        grads = _weight_grads(outs, model, [_fixed_cotangent(o) for o in outs])
        torch.manual_seed(9)  # generator=None: torch's default generator
        default_outs = model.forward_crops(crops)
        default_grads = _weight_grads(default_outs, model, [_fixed_cotangent(o) for o in default_outs])
        runs[checkpointing] = (outs, grads, generator.get_state(), default_outs, default_grads)
    plain, checkpointed = runs[False], runs[True]
    for i in (0, 1, 3, 4):
        for a, b in zip(plain[i], checkpointed[i]):
            assert rel_error(b, a) <= TOLERANCE[torch.float32]
    assert torch.equal(plain[2], checkpointed[2])


CROP_ERRORS = [
    ([], TypeError, "non-empty list.*of length 0"),
    (torch.zeros(2, 3, 16, 16), TypeError, "non-empty list.*got Tensor"),
    ([torch.zeros(2, 3, 16, 16), "crop"], TypeError, r"crops\[1\] must be a torch.Tensor"),
    ([torch.zeros(3, 16, 16)], ValueError, r"crops\[0\] must be \(B_i, C, H_i, W_i\).*\(3, 16, 16\)"),
    ([torch.zeros(2, 1, 16, 16)], ValueError, r"in_chans = 3.*\(2, 1, 16, 16\)"),
    ([torch.zeros(0, 3, 16, 16)], ValueError, "B_i >= 1"),
    ([torch.zeros(2, 3, 16, 16, dtype=torch.int64)], TypeError, "floating point"),
    ([torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16, dtype=torch.float64)], ValueError,
     r"crops\[1\] has \(torch.float64"),
    ([torch.zeros(2, 3, 20, 16)], ValueError, "20x16, not a multiple of the patch size 8x8"),
]


@pytest.mark.parametrize(("crops", "error", "match"), CROP_ERRORS)
def test_bad_crops(crops, error, match):
    with pytest.raises(error, match=match):
        dk_timm.enable(_vit()).forward_crops(crops)


def test_bad_generator_and_static_size():
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got int"):
        dk_timm.enable(_vit()).forward_crops(_crops(), generator=3)
    with pytest.raises(ValueError, match="16x16 but the model was built with dynamic_img_size=False"):
        dk_timm.enable(_vit(dynamic_img_size=False)).forward_crops(_crops())


@pytest.mark.cuda
def test_cuda_matches_timm(no_tf32):
    """Compiled Triton kernels against timm on CUDA. fp32 with TF32 off: within fp32 tolerance. bf16 weights and
    crops: the outputs and the whole weight gradient as close to timm's fp32 values as 1e-2, or as timm's own bf16
    forward is (twice its error), whichever is looser."""
    model = dk_timm.enable(_vit(init_values=0.1, reg_tokens=2).cuda().eval())
    crops = _crops(device="cuda")
    _assert_parity(model, crops, TOLERANCE[torch.float32])

    low = copy.deepcopy(model).to(torch.bfloat16)
    low_crops = [c.bfloat16() for c in crops]
    exact = [model.forward_features(c) for c in crops]
    cotangents = [torch.randn_like(e) for e in exact]
    runs = {"exact": (model, exact, cotangents), "ours": (low, low.forward_crops(low_crops), None),
            "timm": (low, [low.forward_features(c) for c in low_crops], None)}
    flat = {}
    for name, (net, outs, cot) in runs.items():
        cot = cot or [c.bfloat16() for c in cotangents]
        flat[name] = (torch.cat([o.flatten() for o in outs]),
                      torch.cat([g.flatten() for g in _weight_grads(outs, net, cot)]))
    for i, what in enumerate(("output", "weight gradient")):
        bound = max(TOLERANCE[torch.bfloat16], 2 * rel_error(flat["timm"][i], flat["exact"][i]))
        assert rel_error(flat["ours"][i], flat["exact"][i]) <= bound, what
