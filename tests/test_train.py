"""The DINO trainer (`python -m dino.train`): augmentations, schedules, checkpoints and exact resume, the NaN guard,
k-NN, the CLIs, and fused-vs-reference parity. Tiny configs: the whole file runs in a few minutes on 2 cores.

Training runs are pinned to the CPU (``device="cpu"``), also on a GPU machine: their exact-equality and rtol 1e-5
checks are CPU results (on CUDA the trainer would train under bf16 autocast). Tests that augment, as every training
run does, need kornia and skip without it (the GPU image has none); the others run without it.
The 2-process DDP run lives in tests/test_train_distributed.py.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TOLERANCE, cuda_param, rel_error

import dino.train as train_mod
import dino_kernels
from dino.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, blur_kernel_size
from dino.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from dino.config import PRESETS, Config, parse_args, resolve_config
from dino.data import build_datasets
from dino.eval_knn import knn_predict
from dino.model import DINOHead, VisionTransformer, build_model, per_group_attention
from dino.schedules import Schedules, cosine_schedule
from dino_kernels.dino_loss import teacher_temp_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny run on the digits: 1257 training images / 128 = 9 steps per epoch, a ViT of width 32 and depth 2.
TINY = {
    "preset": "cpu-tiny", "device": "cpu", "embed_dim": 32, "depth": 2, "num_heads": 2, "batch_size": 128,
    "n_local_crops": 2, "out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32, "num_workers": 0,
    "progress": False, "epochs": 3, "warmup_epochs": 1, "eval_every": 1, "drop_path_rate": 0.2,
}


def tiny_config(tmp_path, **overrides) -> tuple[Config, dict]:
    values = {**TINY, "output_dir": os.path.join(str(tmp_path), "run"), **overrides}
    return resolve_config(values), values


def subprocess_env() -> dict[str, str]:
    # The CLI must run like a user's shell runs it: without the test suite's Triton interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def kornia():
    """For the tests that augment: kornia, or a skip where it is not installed."""
    return pytest.importorskip("kornia", reason="the multi-crop augmentation needs kornia (pip install kornia)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, kornia):
    """One 3-epoch tiny run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("tiny")
    cfg, values = tiny_config(out)
    history = train_mod.train(cfg, values)
    return cfg, history


# ------------------------------------------------------------------------------------------- augmentation
def _images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.usefixtures("kornia")
def test_augmentation_shapes_layout_and_ranges():
    aug = MultiCropAugmentation(global_size=16, local_size=8, n_local_crops=3)
    b = 5
    crops = aug(_images(b))
    assert [tuple(c.shape) for c in crops] == [(2 * b, 3, 16, 16), (3 * b, 3, 8, 8)]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for c in crops:
        assert c.dtype == torch.float32 and torch.isfinite(c).all()
        pixels = c * std + mean  # undo the normalisation: every augmented pixel must lie in [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert pixels.std() > 0.05  # not a constant image
    # View-major rows: g1 and g2 of an image are different random views, as are all local views.
    g1, g2 = crops[0][:b], crops[0][b:]
    assert not torch.allclose(g1, g2)
    assert MultiCropAugmentation(16, 8, 0)(_images(2))[0].shape == (4, 3, 16, 16)
    assert len(MultiCropAugmentation(16, 8, 0)(_images(2))) == 1


@pytest.mark.usefixtures("kornia")
@pytest.mark.parametrize(("grayscale_p", "solarize_p"), [(None, None), (0.5, 0.6)])
def test_augmentation_probabilities(grayscale_p, solarize_p):
    """Grayscale fires with p = grayscale_p (DINO's 0.2 by default) per view; solarisation only on global 2 (p =
    solarize_p, 0.2 by default): on a constant bright image (flat, so crops, blur and flips do nothing) solarised
    pixels become dark."""
    chosen = {k: v for k, v in (("grayscale_p", grayscale_p), ("solarize_p", solarize_p)) if v is not None}
    grayscale_p, solarize_p = chosen.get("grayscale_p", 0.2), chosen.get("solarize_p", 0.2)
    torch.manual_seed(1)
    b = 400
    aug = MultiCropAugmentation(16, 8, 1, hflip_p=0.5, **chosen)
    colourful = _images(b, seed=3)
    crops = aug(colourful)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for c in crops:
        pixels = c * std + mean
        gray = ((pixels[:, 0] - pixels[:, 1]).abs().amax((1, 2)) < 1e-4) & (
            (pixels[:, 1] - pixels[:, 2]).abs().amax((1, 2)) < 1e-4)
        assert abs(gray.float().mean().item() - grayscale_p) < 0.08
    # A flat white image without colour jitter (which could lower it to 0.36 of white): solarise (threshold
    # 128/255) maps values >= 0.502 to 1 - v < 0.5.
    white = torch.full((b, 3, 32, 32), 255, dtype=torch.uint8)
    torch.manual_seed(2)
    g = MultiCropAugmentation(16, 8, 1, color_jitter_p=0.0, **chosen)(white)[0] * std + mean
    dark = g.mean((1, 2, 3)) < 0.5
    assert dark[:b].sum() == 0  # global 1 is never solarised
    assert abs(dark[b:].float().mean().item() - solarize_p) < 0.08


@pytest.mark.usefixtures("kornia")
def test_augmentation_without_colour_or_blur_only_crops():
    """With every colour operation and the blur off, a view is a crop (+ clamp) and nothing else: a flat grey image
    stays exactly that grey in every crop."""
    aug = MultiCropAugmentation(16, 8, 2, color_jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0, blur=False)
    for view in (*aug.global_views, aug.local):
        assert [type(op).__name__ for op in view] == ["RandomResizedCrop", "_ClampUnit", "RandomHorizontalFlip"]
    grey = torch.full((4, 3, 32, 32), 77, dtype=torch.uint8)
    expected = (77 / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for crops in aug(grey):
        torch.testing.assert_close(crops, expected.expand_as(crops), rtol=0, atol=1e-5)


@pytest.mark.usefixtures("kornia")
def test_augmentation_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        MultiCropAugmentation(16, 8, 1)(torch.rand(2, 3, 32, 32))


@pytest.mark.usefixtures("kornia")
def test_augmentation_global_crop_count():
    """G = 1 keeps global view 1 only; DINO has two global-view recipes, so G = 3 is refused."""
    b = 3
    crops = MultiCropAugmentation(16, 8, 2, n_global_crops=1)(_images(b))
    assert [tuple(c.shape) for c in crops] == [(b, 3, 16, 16), (2 * b, 3, 8, 8)]
    with pytest.raises(ValueError, match="n_global_crops must be 1 or 2"):
        MultiCropAugmentation(16, 8, 2, n_global_crops=3)


def test_blur_kernel_size():
    assert blur_kernel_size(2.0, 224) == 13
    assert blur_kernel_size(2.0, 8) == 7
    assert blur_kernel_size(0.5, 16) == 5


# ------------------------------------------------------------------------------------------- schedules
def test_cosine_schedule_matches_formula():
    base, final, epochs, ipe, warm = 1e-3, 1e-6, 7, 5, 2
    s = cosine_schedule(base, final, epochs, ipe, warm)
    assert s.shape == (epochs * ipe,)
    n_warm = warm * ipe
    np.testing.assert_allclose(s[:n_warm], np.linspace(0, base, n_warm))
    n = epochs * ipe - n_warm
    for i in range(n):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))
        assert s[n_warm + i] == pytest.approx(expected, rel=1e-12)
    assert s[n_warm] == pytest.approx(base)


def test_schedules_from_config_follow_dino():
    cfg = resolve_config({"preset": "vit-s16", "epochs": 5, "warmup_epochs": 1, "batch_size": 32,
                          "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3,
                          "output_dir": "unused"})
    ipe, world = 4, 2
    s = Schedules.from_config(cfg, ipe, world)
    peak = cfg.base_lr * cfg.batch_size * world / 256
    assert s.lr[0] == 0 and s.lr[ipe - 1] == pytest.approx(peak) and s.lr.max() == pytest.approx(peak)
    n = (cfg.epochs - cfg.warmup_epochs) * ipe
    assert s.lr[-1] == pytest.approx(cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * (n - 1) / n)))
    # momentum: m(it) = end - (end - m0) (1 + cos(pi it / T)) / 2, T = total iterations
    total = cfg.epochs * ipe
    for it in (0, 3, total - 1):
        expected = 1.0 - (1.0 - 0.996) * (1 + math.cos(math.pi * it / total)) / 2
        assert s.momentum[it] == pytest.approx(expected, rel=1e-12)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4, rel=0.02)
    np.testing.assert_allclose(s.teacher_temp, [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 3), [0.04] * 3)
    # The loss module applies the same per-epoch teacher temperature as the one the trainer logs.
    loss_fn = dino_kernels.DINOLoss(16, 2, 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                    cfg.warmup_teacher_temp_epochs, cfg.epochs)
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, s.teacher_temp)


# ------------------------------------------------------------------------------------------- model
def test_vit_packed_forward_matches_per_crop_forward():
    """One packed call over all crop groups equals separate per-group calls (eval mode: no stochastic depth)."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, n_registers=2,
                            layerscale=0.1).eval()
    g, loc = torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)
    packed = vit([g, loc])
    separate = torch.cat([vit([g]), vit([loc])])
    assert packed.shape == (10, 32)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_per_group_attention_matches_reference():
    import dino_kernels.reference as ref

    torch.manual_seed(0)
    lengths = [5, 5, 3, 3, 3, 1]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, 8, dtype=torch.float64) for _ in range(3))
    groups = [(2, 5), (3, 3), (1, 1)]
    torch.testing.assert_close(per_group_attention(q, k, v, groups), ref.packed_attention(q, k, v, cu))
    with pytest.raises(ValueError, match="hold 21 tokens; q has 20"):
        per_group_attention(q, k, v, [(2, 5), (3, 3), (1, 2)])


def test_reference_attention_reads_nothing_back_from_the_device(monkeypatch):
    """The reference model's attention takes its crop groups from the host (no sync per layer on GPU), also when
    stochastic depth drops samples."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5,
                            fused=False).train()
    crops = [torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)]

    def no_sync(self, *args, **kwargs):
        raise AssertionError("host sync")

    with dino_kernels.backend("reference"):
        vit(crops)  # the cached cu_seqlens of these shapes are built here (once per shapes)
        monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
        monkeypatch.setattr(torch.Tensor, "item", no_sync)
        assert vit(crops).shape == (10, 32)


def test_build_model_chooses_attention_once(tmp_path, monkeypatch):
    """build_model picks packed_attention (kernels=fused) or per-group SDPA (kernels=reference) at construction;
    forward never reads the global backend switch, and both give the same logits."""
    fused = build_model(tiny_config(tmp_path, kernels="fused")[0], drop_path=False).eval()
    reference = build_model(tiny_config(tmp_path, kernels="reference")[0], drop_path=False).eval()
    reference.load_state_dict(fused.state_dict())
    assert all(block.attn.packed for block in fused.backbone.blocks)
    assert not any(block.attn.packed for block in reference.backbone.blocks)

    def no_switch():
        raise AssertionError("the model consulted the global backend switch")

    monkeypatch.setattr(dino_kernels, "get_backend", no_switch)
    crops = [torch.randn(4, 3, 12, 12), torch.randn(6, 3, 8, 8)]
    with torch.no_grad():
        torch.testing.assert_close(fused(crops), reference(crops), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,dtype,tolerance", [("cpu", torch.float64, 1e-12),
                                                    cuda_param("cuda", torch.float32, TOLERANCE[torch.float32])])
@pytest.mark.parametrize("n_registers,layerscale", [(0, 0.0), (2, 0.1)])
def test_fused_model_computes_the_reference_function(n_registers, layerscale, device, dtype, tolerance, no_tf32):
    """fused=True (packed attention, the patch GEMM on CPU, a last block on the CLS rows) against fused=False
    (per-group SDPA, the convolution, every token through every block), training with stochastic depth (the same
    draws), crops whose size the patches do not divide: the features and every parameter's gradient (grad_output
    != 1) agree to rounding (float64 on CPU; float32 without TF32 on CUDA, where the Triton kernels run). Only the
    CLS rows leave the last block, so nothing else may differ."""
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.5,
              n_registers=n_registers, layerscale=layerscale)
    fused = VisionTransformer(**kw, fused=True).to(device, dtype).train()
    plain = VisionTransformer(**kw, fused=False).to(device, dtype).train()
    plain.load_state_dict(fused.state_dict())
    crops = [torch.randn(4, 3, 18, 17, dtype=dtype, device=device),
             torch.randn(6, 3, 9, 8, dtype=dtype, device=device)]
    grad_output = torch.randn(10, 32, dtype=dtype, device=device)
    results = []
    for model, backend in ((fused, "auto"), (plain, "reference")):
        with dino_kernels.backend(backend):
            features = model(crops, torch.Generator().manual_seed(3))
            grads = torch.autograd.grad(features, list(model.parameters()), grad_output, allow_unused=True)
        results.append((features, grads))
    (features, grads), (expected, expected_grads) = results
    assert rel_error(features, expected) <= tolerance
    for (name, _), got, want in zip(fused.named_parameters(), grads, expected_grads):
        assert (got is None) == (want is None), name
        if got is not None:
            assert rel_error(got, want) <= tolerance, name


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
def test_fused_step_under_bf16_autocast_gives_the_reference_loss(tmp_path, device):
    """--amp bf16 (the GPU presets' default): the fused step (a CLS-only last block, packed attention, the fused
    loss) runs and gives the reference step's loss to bf16 rounding. Under autocast the block's norm is fp32 and
    its projection bf16: a last block that mixed the two once broke every GPU training run."""
    losses = []
    for kernels in ("fused", "reference"):
        torch.manual_seed(0)
        trainer = train_mod.Trainer(*tiny_config(tmp_path / kernels, kernels=kernels, amp="bf16", device=device))
        cfg, source = trainer.cfg, torch.Generator().manual_seed(1)
        crops = [torch.randn(n * cfg.batch_size, 3, size, size, generator=source).to(trainer.device)
                 for n, size in ((cfg.n_global_crops, cfg.global_size), (cfg.n_local_crops, cfg.local_size))]
        with dino_kernels.backend("auto" if kernels == "fused" else "reference"):
            losses.append(trainer.step_on_crops(crops, epoch=1).loss)
    fused, reference = losses
    assert math.isfinite(fused) and abs(fused - reference) <= TOLERANCE[torch.bfloat16] * abs(reference), losses


def test_fused_trainer_takes_the_fused_optimizer(tmp_path):
    """--kernels fused steps with PyTorch's fused AdamW, --kernels reference with the default one (as DINO)."""
    fused = train_mod.Trainer(*tiny_config(tmp_path / "f", kernels="fused"))
    reference = train_mod.Trainer(*tiny_config(tmp_path / "r", kernels="reference"))
    assert fused.optimizer.defaults["fused"] and not reference.optimizer.defaults["fused"]


def test_cuda_graph_is_taken_where_it_can_be(tmp_path):
    """--cuda-graph auto (the default) replays the step from a graph for our kernels in one CUDA process with DINO's
    recipe and no fp16, and otherwise runs eagerly; on refuses, naming every unmet condition, before the data and the
    models are built; off never graphs."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def uses(device=cuda, amp=torch.bfloat16, distributed=False, **overrides):
        return train_mod.uses_cuda_graph(tiny_config(tmp_path, **overrides)[0], device, amp, distributed)

    assert uses() and uses(amp=None) and uses(cuda_graph="on", kernels="reference")
    assert not uses(kernels="reference") and not uses(cuda_graph="off") and not uses(device=cpu)
    assert not uses(distributed=True) and not uses(amp=torch.float16) and not uses(**TINY_V2)
    with pytest.raises(ValueError, match=r"^cuda_graph=on needs one process \(got a torchrun run\)$"):
        uses(cuda_graph="on", distributed=True)
    assert train_mod.Trainer(*tiny_config(tmp_path / "auto")).graphed is None  # CPU
    with pytest.raises(ValueError, match=r"cuda_graph=on needs a CUDA device \(got cpu\)$"):
        train_mod.Trainer(*tiny_config(tmp_path / "cpu", cuda_graph="on"))
    with pytest.raises(ValueError, match=r"a CUDA device \(got cpu\), --recipe dino \(got dinov2\), --amp bf16 or "
                                         r"none \(got fp16\)"):
        train_mod.Trainer(*tiny_config(tmp_path / "v2", cuda_graph="on", amp="fp16", **TINY_V2))
    with pytest.raises(ValueError, match="cuda_graph must be auto, on or off; got 'yes'"):
        tiny_config(tmp_path, cuda_graph="yes")


@pytest.mark.cuda
def test_cuda_graph_step_is_the_eager_step(tmp_path):
    """--cuda-graph: the first step eager, then a capture and replays, a new capture when the teacher temperature
    changes (the warm-up epochs); the losses, the center, the student and the teacher stay the eager steps' on the
    same crops and seed. Stochastic depth's draws included: a capture registers the generator, so each replay draws
    new numbers, in the eager order. The last-layer freeze (epoch 0) drops gradients the next replay restores."""
    runs = []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        trainer = train_mod.Trainer(*tiny_config(tmp_path / str(cuda_graph), device="cuda", amp="none",
                                                 cuda_graph="on" if cuda_graph else "off",
                                                 warmup_teacher_temp_epochs=2,
                                                 freeze_last_layer=1))
        cfg, source = trainer.cfg, torch.Generator().manual_seed(1)
        losses, entropies = [], []
        for epoch, steps in ((0, 3), (1, 2), (2, 3)):
            for _ in range(steps):
                crops = [torch.randn(n * cfg.batch_size, 3, size, size, generator=source).to(trainer.device)
                         for n, size in ((cfg.n_global_crops, cfg.global_size), (cfg.n_local_crops, cfg.local_size))]
                result = trainer.step_on_crops(crops, epoch)
                losses.append(result.loss)
                entropies.append(result.teacher_entropy)
        if cuda_graph:
            assert trainer.graphed.key == (float(trainer.schedules.teacher_temp[2]), "softmax")
        runs.append((losses, torch.stack(entropies), trainer.center.clone(),
                     [p.detach().clone() for p in trainer.student_params + trainer.teacher_params]))
    (eager, eager_entropy, eager_center, eager_params), (graphed, entropy, center, params) = runs
    np.testing.assert_allclose(graphed, eager, rtol=1e-5)
    assert len(set(graphed)) == len(graphed)  # every replay trained on its own crops
    assert rel_error(entropy, eager_entropy) <= 1e-5 and rel_error(center, eager_center) <= 1e-5
    for got, want in zip(params, eager_params):
        assert rel_error(got, want) <= 1e-5


@pytest.mark.cuda
def test_cuda_graph_run_is_the_eager_run(tmp_path, kornia):
    """A whole tiny run with --cuda-graph (augmentation, k-NN evaluations and checkpoints between the replays) gives
    the eager run's per-epoch losses, and its k-NN accuracies within a test image (0.2 %) or two."""
    histories = []
    for cuda_graph in (False, True):
        cfg, values = tiny_config(tmp_path / str(cuda_graph), device="cuda", amp="none",
                                  cuda_graph="on" if cuda_graph else "off")
        histories.append(train_mod.train(cfg, values))
    eager, graphed = histories
    np.testing.assert_allclose([r["loss"] for r in graphed], [r["loss"] for r in eager], rtol=1e-5)
    np.testing.assert_allclose([r["knn_top1"] for r in graphed], [r["knn_top1"] for r in eager], atol=0.5)


@pytest.mark.cuda
def test_a_step_that_cannot_be_captured_runs_eagerly_under_auto(tmp_path, monkeypatch):
    """A host read inside the step breaks its capture: cuda_graph=auto warns once and goes on eagerly, with the
    eager run's losses; cuda_graph=on raises a RuntimeError that says what to do."""
    runs = {}
    for mode in ("off", "auto", "on"):
        torch.manual_seed(0)
        trainer = train_mod.Trainer(*tiny_config(tmp_path / mode, device="cuda", amp="none", cuda_graph=mode))
        losses_of = trainer.losses

        def losses_with_a_host_read(*args, losses_of=losses_of):
            losses = losses_of(*args)
            losses.loss.item()  # not allowed while a CUDA graph is being captured
            return losses

        monkeypatch.setattr(trainer, "losses", losses_with_a_host_read)
        cfg, source = trainer.cfg, torch.Generator().manual_seed(1)
        runs[mode] = []
        for step in range(4):
            crops = [torch.randn(n * cfg.batch_size, 3, size, size, generator=source).to(trainer.device)
                     for n, size in ((cfg.n_global_crops, cfg.global_size), (cfg.n_local_crops, cfg.local_size))]
            if mode == "on" and step == 1:
                with pytest.raises(RuntimeError, match="could not be captured.*use --cuda-graph off"):
                    trainer.step_on_crops(crops, 0)
                break
            if mode == "auto" and step == 1:
                with pytest.warns(RuntimeWarning, match="runs eagerly from now on"):
                    runs[mode].append(trainer.step_on_crops(crops, 0).loss)
            else:
                runs[mode].append(trainer.step_on_crops(crops, 0).loss)
        assert trainer.graphed is None or trainer.graphed.graph is None
    np.testing.assert_allclose(runs["auto"], runs["off"], rtol=1e-5)


def test_pos_embed_interpolation_and_registers():
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, n_registers=3)
    assert vit.interpolate_pos_encoding(4, 4) is vit.pos_embed
    assert vit.interpolate_pos_encoding(2, 2).shape == (1, 5, 32)
    assert vit.interpolate_pos_encoding(8, 8).shape == (1, 65, 32)
    assert vit.prepare_tokens(torch.randn(2, 3, 8, 8)).shape == (2, 1 + 3 + 4, 32)
    attn = vit.eval().last_cls_attention(torch.randn(2, 3, 12, 12))
    assert attn.shape == (2, 2, 3, 3)
    total = attn.sum((-1, -2))  # softmax mass on the 9 patches; CLS and the 3 registers hold the rest
    assert torch.all(total > 0) and torch.all(total < 1)


def test_dino_head_weight_norm_and_freeze():
    head = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, norm_last_layer=True)
    logits = head(torch.randn(7, 32))
    assert logits.shape == (7, 50) and logits.abs().max() <= 1 + 1e-5  # cosines: g = 1, l2-normalised input
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert DINOHead(32, 50, 64, 16, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_param_groups_and_per_tensor_clip():
    cfg, _ = tiny_config("unused")
    model = build_model(cfg, drop_path=True)
    decay, no_decay = train_mod.param_groups(model)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert model.backbone.cls_token in decay["params"]  # DINO v1 decays cls/pos embeddings too
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    train_mod.clip_gradients_(model, 3.0)
    for p in model.parameters():
        if p.grad is not None:  # every tensor is clipped on its own to norm 3
            assert p.grad.norm().item() == pytest.approx(3.0, rel=1e-4)


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
def test_per_tensor_clip_scales_exactly_the_gradients_over_the_limit(device):
    """A gradient under the limit is left bit for bit (on CPU it is not even multiplied by 1), one over it gets the
    factor clip / (norm + 1e-6), and a non-finite one stays non-finite."""
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n, device=device)) for n in (7, 300, 5, 64)])
    grads = [torch.randn(7, device=device) * 10, torch.randn(300, device=device) * 1e-3,
             torch.full((5,), float("nan"), device=device), torch.randn(64, device=device) * 0.2]
    for p, g in zip(model, grads):
        p.grad = g.clone()
    train_mod.clip_gradients_(model, 3.0)
    factor = (3.0 / (grads[0].norm() + 1e-6)).clamp(max=1.0)
    assert torch.equal(model[0].grad, grads[0] * factor) and model[0].grad.norm().item() == pytest.approx(3.0)
    assert torch.equal(model[1].grad, grads[1]) and torch.equal(model[3].grad, grads[3])
    assert model[2].grad.isnan().all()


def test_collapse_warnings():
    ln_k = math.log(256)
    assert "uniform" in train_mod.collapse_warning(3, 0.97 * ln_k, ln_k)
    assert "one prototype" in train_mod.collapse_warning(3, 0.01, ln_k)
    assert train_mod.collapse_warning(3, 1.5, ln_k) is None


# ------------------------------------------------------------------------------------------- data
def _write_images(folder, n, size=(20, 14), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))


def test_digits_split_is_stratified_and_upsampled():
    data = build_datasets(None, image_size=32, global_size=12)
    assert (len(data.train), len(data.knn_test)) == (1257, 540) and data.num_classes == 10
    image, label = data.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    test_labels = np.array([data.knn_test[i][1] for i in range(len(data.knn_test))])
    assert np.bincount(test_labels).min() >= 50  # every digit is in the held-out 30 %


def test_image_folder_datasets(tmp_path):
    for name in ("cat", "dog"):
        _write_images(tmp_path / "labelled" / name, 10, seed=len(name))
    data = build_datasets(str(tmp_path / "labelled"), image_size=24, global_size=16)
    assert data.num_classes == 2 and (len(data.train), len(data.knn_test)) == (14, 6)
    assert data.train[0][0].shape == (3, 24, 24) and data.knn_test[0][0].shape == (3, 16, 16)
    for split in ("train", "val"):
        for name in ("a", "b"):
            _write_images(tmp_path / "split" / split / name, 3)
    data = build_datasets(str(tmp_path / "split"), image_size=24, global_size=16)
    assert (len(data.train), len(data.knn_test)) == (6, 6)
    _write_images(tmp_path / "flat", 5)
    data = build_datasets(str(tmp_path / "flat"), image_size=24, global_size=16)
    assert len(data.train) == 5 and data.knn_train is None and data.train[0][1] == -1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_datasets(str(tmp_path / "missing"), 24, 16)


# ------------------------------------------------------------------------------------------- k-NN
def test_knn_weighted_vote():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]]))
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]]))
    assert knn_predict(bank, labels, queries, 3, k=2).tolist() == [0, 1, 2]
    # With k = 5 every query sees all points; the exp(sim/T) weights still pick the near class.
    assert knn_predict(bank, labels, queries, 3, k=5, temperature=0.07).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------- config / CLI
def test_cli_help_documents_every_option():
    result = subprocess.run([sys.executable, "-m", "dino.train", "--help"], capture_output=True, text=True,
                            env=subprocess_env(), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in result.stdout
    assert "cpu-tiny" in result.stdout and "vit-s16" in result.stdout


def test_config_presets_and_overrides():
    cfg, _ = parse_args(["--preset", "cpu-tiny", "--epochs", "3", "--global-scale", "0.3", "1.0",
                         "--no-norm-last-layer", "--output-dir", "x"])
    assert cfg.epochs == 3 and cfg.global_scale == (0.3, 1.0) and cfg.norm_last_layer is False
    assert cfg.out_dim == PRESETS["cpu-tiny"]["out_dim"] and cfg.output_dir == "x"
    assert parse_args(["--preset", "vit-s16", "--output-dir", "x"])[0].out_dim == 65536
    auto = parse_args([])[0]
    assert auto.preset == ("vit-s16" if torch.cuda.is_available() else "cpu-tiny")
    assert auto.output_dir.startswith("runs/")
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SystemExit):
        parse_args(["--kernels", "fast"])
    with pytest.raises(SystemExit):
        parse_args(["--global-size", "15", "--output-dir", "x"])  # not a multiple of the patch size
    assert cfg.n_global_crops == 2 and parse_args(["--n-global-crops", "1", "--output-dir", "x"])[0].n_global_crops == 1
    for bad, message in (({"n_global_crops": 0}, "n_global_crops must be >= 1"),
                         ({"n_global_crops": 3}, "n_global_crops must be at most 2"),
                         ({"n_global_crops": 1, "n_local_crops": 0}, "n_global_crops \\+ n_local_crops must be >= 2"),
                         ({"epochs": 3, "warmup_teacher_temp_epochs": 4}, "warmup_teacher_temp_epochs must be in"),
                         ({"solarize_p": 1.5}, r"solarize_p is a probability, in \[0, 1\]; got 1.5"),
                         ({"color_jitter_p": -0.1}, "color_jitter_p is a probability")):
        with pytest.raises(ValueError, match=message):
            resolve_config({"preset": "cpu-tiny", "output_dir": "x", **bad})


# ------------------------------------------------------------------------------------------- training runs
def test_tiny_run_outputs(tiny_run):
    cfg, history = tiny_run
    out = cfg.output_dir
    for name in ("checkpoint.pth", "metrics.jsonl", "config.json", "curves.png", "teacher_backbone.safetensors"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(lines) == cfg.epochs == len(history)
    required = {"epoch", "loss", "lr", "weight_decay", "teacher_temp", "momentum", "teacher_entropy", "kl",
                "knn_top1", "linear_top1", "img_per_s", "peak_mem_mb"}
    for line in lines:
        assert required <= set(line)
        assert math.isfinite(line["loss"]) and 0 <= line["knn_top1"] <= 100 and line["img_per_s"] > 0
        assert 0 <= line["teacher_entropy"] <= math.log(cfg.out_dim) + 1e-4
    # The linear probe runs once, at the end: far above chance (10 %) on the digits, even for this tiny ViT.
    assert [line["linear_top1"] for line in lines[:-1]] == [None] * (cfg.epochs - 1)
    assert isinstance(lines[-1]["linear_top1"], float) and 30 < lines[-1]["linear_top1"] <= 100
    state = load_checkpoint(out)
    assert state["epoch"] == cfg.epochs and isinstance(state["config"], dict)


def test_eval_knn_and_visualize_clis(tiny_run, tmp_path):
    cfg, history = tiny_run
    # On the device the run trained and evaluated on, so that the accuracies match to the hundredth.
    result = subprocess.run([sys.executable, "-m", "dino.eval_knn", "--checkpoint", cfg.output_dir, "--device", "cpu"],
                            capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    reported = float(result.stdout.split("top-1 on digits: ")[1].split("%")[0])
    assert reported == pytest.approx(history[-1]["knn_top1"], abs=0.01)
    for name in ("a", "b"):
        _write_images(tmp_path / "folder" / name, 6, seed=ord(name))
    result = subprocess.run([sys.executable, "-m", "dino.eval_knn", "--checkpoint", cfg.output_dir, "--device", "cpu",
                             "--data", str(tmp_path / "folder")], capture_output=True, text=True, env=subprocess_env(),
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(4 test images, 8 in the memory bank)" in result.stdout
    png = tmp_path / "attn.png"
    result = subprocess.run([sys.executable, "-m", "dino.visualize", "--checkpoint", cfg.output_dir, "--output",
                             str(png)], capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from dino import visualize

    own = tmp_path / "own.png"
    assert visualize.main(["--checkpoint", cfg.output_dir, "--image", str(tmp_path / "folder" / "a" / "0.png"),
                           "--size", "26", "--output", str(own)]) == 0
    assert own.stat().st_size > 0
    assert visualize.threshold_mask(torch.tensor([[0.5, 0.3], [0.15, 0.05]]), 0.6).tolist() == [[True, True],
                                                                                                  [False, False]]


def test_eval_linear_cli(tiny_run):
    """``python -m dino.eval_linear`` on the run directory reproduces the run's final linear probe (same device)."""
    cfg, history = tiny_run
    result = subprocess.run([sys.executable, "-m", "dino.eval_linear", "--checkpoint", cfg.output_dir, "--device",
                             "cpu"], capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    reported = float(result.stdout.split("linear probe top-1 on digits: ")[1].split("%")[0])
    assert reported == pytest.approx(history[-1]["linear_top1"], abs=0.01)
    assert "(540 test images, 1257 training images)" in result.stdout


def test_checkpoint_round_trip_and_rng(tmp_path):
    torch.manual_seed(5)
    rng = capture_rng_state()
    expected = torch.rand(3), np.random.rand(), __import__("random").random()
    path = str(tmp_path / "ck.pth")
    state = {"config": {"a": [1, 2]}, "epoch": 1, "step": 9, "student": {"w": torch.ones(2)}, "teacher": {},
             "optimizer": {}, "scaler": {}, "center": torch.zeros(3), "rng": rng, "history": [{"loss": 1.0}]}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)  # weights_only=True inside
    assert loaded["config"] == {"a": [1, 2]} and loaded["step"] == 9 and loaded["history"] == [{"loss": 1.0}]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and __import__("random").random() == expected[2]


def test_corrupt_checkpoint_gives_clear_error_and_stays(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(path))
    assert path.read_bytes() == b"not a checkpoint at all"
    save_checkpoint(str(path), {"epoch": 1, "student": {"w": torch.randn(1000)}})
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a write cut short (what the atomic rename prevents)
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(str(path))
    torch.save({"format": "something-else"}, path)
    with pytest.raises(CheckpointError, match="not a dino.train checkpoint"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(path, {"epoch": 1})
    before = open(path, "rb").read()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def _interrupt_then_resume(cfg, values, epochs_done: int, monkeypatch) -> list[dict]:
    """Run ``cfg`` until an interruption in epoch ``epochs_done + 1``, check that the checkpoint holds the epochs
    done, and resume it (on the CPU again: the device is a runtime option, not taken from the checkpoint); returns
    the resumed run's history."""
    real_epoch = train_mod.Trainer.train_epoch

    def crash(self, epoch):
        if epoch == epochs_done:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(train_mod.Trainer, "train_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, values)
    monkeypatch.undo()
    assert load_checkpoint(cfg.output_dir)["epoch"] == epochs_done
    overrides = {"resume": cfg.output_dir, "device": "cpu"}
    return train_mod.train(resolve_config(overrides), overrides)


def test_exact_resume(tiny_run, tmp_path, monkeypatch):
    """A run interrupted after epoch 2 and resumed reproduces the uninterrupted run exactly: loss curve, k-NN,
    weights and center."""
    cfg, history = tiny_run
    part_cfg, values = tiny_config(tmp_path)
    resumed = _interrupt_then_resume(part_cfg, values, 2, monkeypatch)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in history]
    assert [r["knn_top1"] for r in resumed] == [r["knn_top1"] for r in history]
    a, b = load_checkpoint(cfg.output_dir), load_checkpoint(part_cfg.output_dir)
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    assert torch.equal(a["center"], b["center"])
    lines = open(os.path.join(part_cfg.output_dir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_resume_rejects_a_different_recipe(tiny_run, tmp_path):
    cfg, _ = tiny_run
    with pytest.raises(CheckpointError, match="embed_dim"):
        train_mod.Trainer(resolve_config({"resume": cfg.output_dir, "embed_dim": 48}),
                          {"resume": cfg.output_dir, "embed_dim": 48})
    assert load_checkpoint(cfg.output_dir)["epoch"] == cfg.epochs  # untouched


@pytest.mark.usefixtures("kornia")
def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A NaN learning rate at step 2 of epoch 2 turns the weights (student, then teacher by the EMA) into NaN, so the
    loss of step 3 is NaN: the run must stop loudly and keep the checkpoint of epoch 1."""
    cfg, values = tiny_config(tmp_path, epochs=2)
    real = Schedules.from_config

    def poisoned(cfg, iters_per_epoch, world_size=1):
        schedules = real(cfg, iters_per_epoch, world_size)
        schedules.lr[iters_per_epoch + 1] = float("nan")
        return schedules

    monkeypatch.setattr(Schedules, "from_config", poisoned)
    code = train_mod.main(["--preset", "cpu-tiny"] + [arg for k, v in values.items() if k != "preset"
                                                     for arg in _cli(k, v)])
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "epoch 2" in err and "checkpoint.pth, epoch 1" in err
    state = load_checkpoint(cfg.output_dir)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    assert len(open(os.path.join(cfg.output_dir, "metrics.jsonl")).read().splitlines()) == 1


@pytest.mark.usefixtures("kornia")
def test_step_follows_the_config(tmp_path, monkeypatch):
    """n_global_crops drives the augmentation, the teacher's input, the loss and KoLeo (here G = 1); the loss gets the
    epoch's teacher temperature from the schedule, and the step updates the trainer's center in place."""
    cfg, values = tiny_config(tmp_path, n_global_crops=1, warmup_teacher_temp=0.01, teacher_temp=0.03,
                              warmup_teacher_temp_epochs=2)
    trainer = train_mod.Trainer(cfg, values)
    calls = []
    real = dino_kernels.dino_loss

    def recorded(student_logits, teacher_logits, center, **kwargs):
        calls.append((student_logits.shape[0], teacher_logits.shape[0], kwargs))
        return real(student_logits, teacher_logits, center, **kwargs)

    monkeypatch.setattr(dino_kernels, "dino_loss", recorded)
    images, _ = next(iter(trainer.loader))
    b = images.shape[0]
    crops = trainer.augment(images)
    assert [c.shape[0] for c in crops] == [b, cfg.n_local_crops * b]
    center = trainer.center
    loss, entropy, kl, koleo, _ = trainer.step_on_crops(crops, 1)
    assert math.isfinite(loss) and math.isfinite(koleo) and 0 <= entropy.item() <= math.log(cfg.out_dim) + 1e-4
    (student_rows, teacher_rows, kwargs), = calls
    assert (student_rows, teacher_rows) == ((1 + cfg.n_local_crops) * b, b)
    assert kwargs["n_global_crops"] == 1 and kwargs["teacher_temp"] == pytest.approx(0.03)
    assert trainer.center is center and center.abs().sum() > 0


# Non-default values (for the cpu-tiny preset and the dataclass alike) of every recipe field the training step uses,
# so that a field the trainer fails to pass on changes what the step test reads back.
STEP_RECIPE = {
    "student_temp": 0.2, "center_momentum": 0.8, "clip_grad": 0.05, "freeze_last_layer": 2, "koleo_weight": 0.3,
    "momentum_teacher": 0.9, "momentum_teacher_end": 0.95, "warmup_teacher_temp": 0.01, "teacher_temp": 0.03,
    "warmup_teacher_temp_epochs": 3, "base_lr": 2e-3, "min_lr": 1e-4, "warmup_epochs": 2, "weight_decay": 0.05,
    "weight_decay_end": 0.3,
}


def _cosine_value(base: float, final: float, i: int, n: int) -> float:
    """The cosine part of DINO's ``utils.cosine_scheduler`` at step i of n."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))


class _StepRecorder:
    """What one training step hands to the loss, the GradScaler and the optimizer, recorded on the way."""

    def __init__(self, trainer, monkeypatch):
        self.trainer, self.seen = trainer, {}
        real_loss, real_scale, real_step = dino_kernels.dino_loss, trainer.scaler.scale, trainer.optimizer.step

        def loss(*args, **kwargs):
            out = real_loss(*args, **kwargs)
            self.seen.update(loss_kwargs=kwargs, stats=out[1])
            return out

        def scale(total):
            self.seen["total"] = total.item()
            return real_scale(total)

        def step(*args, **kwargs):
            self.seen["grads"] = {name: None if p.grad is None else p.grad.clone()
                                  for name, p in trainer.student.named_parameters()}
            self.seen["groups"] = [(g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups]
            return real_step(*args, **kwargs)

        monkeypatch.setattr(dino_kernels, "dino_loss", loss)
        monkeypatch.setattr(trainer.scaler, "scale", scale)
        monkeypatch.setattr(trainer.optimizer, "step", step)

    def run(self, crops, epoch: int, it: int):
        """The step at global iteration ``it`` of ``epoch``; returns (its outputs, teacher and center before it)."""
        self.trainer.step = it
        teacher = [p.detach().clone() for p in self.trainer.teacher.parameters()]
        center = self.trainer.center.clone()
        return self.trainer.step_on_crops(crops, epoch), teacher, center


@pytest.mark.usefixtures("kornia")
def test_step_applies_the_recipe(tmp_path, monkeypatch):
    """One step at a time, with a non-default value for every recipe field, checks what arrives: lr and weight decay
    of the schedule at this iteration, the student temperature and this epoch's teacher temperature in the loss,
    the KoLeo weight in the objective, the per-tensor clip on the gradients the optimizer sees, the last-layer freeze
    for epochs < freeze_last_layer only, the center EMA with center_momentum, and the teacher EMA
    t <- m·t + (1 − m)·s with m from the momentum schedule."""
    cfg, values = tiny_config(tmp_path, **STEP_RECIPE)
    trainer = train_mod.Trainer(cfg, values)
    recorder = _StepRecorder(trainer, monkeypatch)
    images, _ = next(iter(trainer.loader))
    crops = trainer.augment(images)
    ipe, total = trainer.iters_per_epoch, cfg.epochs * trainer.iters_per_epoch
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    teacher_temps = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)
    for epoch in (1, 2):  # epoch 1 < freeze_last_layer = 2: last layer frozen; epoch 2: trained
        it = epoch * ipe + 1
        (loss, _, _, koleo, _), teacher_before, center_before = recorder.run(crops, epoch, it)
        seen = recorder.seen
        # The schedules at this iteration: lr in its warmup (epoch 1) or its cosine (epoch 2), weight decay on the
        # first parameter group only.
        warmup = cfg.warmup_epochs * ipe
        lr = peak_lr * it / (warmup - 1) if it < warmup else _cosine_value(peak_lr, cfg.min_lr, it - warmup,
                                                                            total - warmup)
        weight_decay = _cosine_value(cfg.weight_decay, cfg.weight_decay_end, it, total)
        assert seen["groups"][0] == pytest.approx((lr, weight_decay), rel=1e-9)
        assert seen["groups"][1] == pytest.approx((lr, 0.0), rel=1e-9)
        # The loss: student temperature, this epoch's teacher temperature, G; the objective adds KoLeo with its
        # weight.
        kwargs = seen["loss_kwargs"]
        assert kwargs["student_temp"] == cfg.student_temp and kwargs["n_global_crops"] == cfg.n_global_crops
        assert kwargs["teacher_temp"] == pytest.approx(float(teacher_temps[epoch]), rel=1e-12)
        assert seen["total"] == pytest.approx(loss + cfg.koleo_weight * koleo, rel=1e-5)
        # Per-tensor clip: no gradient the optimizer sees is longer than clip_grad, and at least one was clipped.
        grads = seen["grads"]
        norms = [g.norm().item() for g in grads.values() if g is not None]
        assert max(norms) <= cfg.clip_grad * (1 + 1e-5) and max(norms) >= cfg.clip_grad * 0.999
        # Last-layer freeze: no gradient (so no AdamW update) while epoch < freeze_last_layer.
        frozen = epoch < cfg.freeze_last_layer
        last_layer = [name for name in grads if "last_layer" in name and trainer.student.get_parameter(
            name).requires_grad]
        assert last_layer and all((grads[name] is None) == frozen for name in last_layer)
        # Center EMA with center_momentum, from this batch's teacher mean.
        expected_center = (cfg.center_momentum * center_before.double()
                           + (1 - cfg.center_momentum) * seen["stats"].teacher_mean.double())
        assert rel_error(trainer.center, expected_center) <= 1e-6
        # Teacher EMA after the optimizer step, with m from the momentum schedule (cosine over all iterations).
        m = cfg.momentum_teacher_end - (cfg.momentum_teacher_end - cfg.momentum_teacher) * (
            1 + math.cos(math.pi * it / total)) / 2
        for t, t_before, s in zip(trainer.teacher.parameters(), teacher_before, trainer.student.parameters()):
            expected = m * t_before.double() + (1 - m) * s.detach().double()
            assert rel_error(t.detach(), expected) <= 1e-6
        assert trainer.step == it + 1
    # The teacher differed from the student before the second step, so that step told m from 1 − m.
    assert any(not torch.equal(t, s) for t, s in zip(teacher_before, trainer.student.parameters()))


@pytest.mark.usefixtures("kornia")
def test_trainer_passes_its_config_on(tmp_path, monkeypatch):
    """The options the trainer hands to other objects arrive there, each with a non-default value read back from the
    object: the data (image size), the loader (batch size, workers), the augmentation (every crop option), the
    schedules (every schedule option), the model (widths), the center (K) and the k-NN evaluation (k, temperature,
    size)."""
    recorded = {}
    real_augmentation, real_knn = train_mod.MultiCropAugmentation, train_mod.knn_accuracy

    def augmentation(*args, **kwargs):
        recorded["augmentation"] = inspect.signature(real_augmentation).bind(*args, **kwargs).arguments
        return real_augmentation(*args, **kwargs)

    def knn(*args, **kwargs):
        recorded["knn"] = inspect.signature(real_knn).bind(*args, **kwargs).arguments
        return 50.0

    monkeypatch.setattr(train_mod, "MultiCropAugmentation", augmentation)
    monkeypatch.setattr(train_mod, "knn_accuracy", knn)
    options = {"image_size": 28, "global_size": 16, "local_size": 8, "n_local_crops": 3, "n_global_crops": 1,
               "global_scale": (0.5, 0.9), "local_scale": (0.2, 0.3), "blur_sigma": (0.2, 0.4), "hflip_p": 0.3,
               "color_jitter_p": 0.6, "grayscale_p": 0.1, "solarize_p": 0.4, "blur": False, "batch_size": 100,
               "out_dim": 48, "embed_dim": 24, "depth": 3, "knn_k": 7, "knn_temperature": 0.2,
               "epochs": 4, "warmup_epochs": 2, **STEP_RECIPE}
    cfg, values = tiny_config(tmp_path, **options)
    trainer = train_mod.Trainer(cfg, values)
    assert trainer.data.train[0][0].shape == trainer.data.knn_test[0][0].shape == (3, 28, 28)
    assert trainer.loader.batch_size == 100 and trainer.iters_per_epoch == len(trainer.data.train) // 100
    assert trainer.loader.num_workers == cfg.num_workers == 0
    augmentation_options = ("global_size", "local_size", "n_local_crops", "global_scale", "local_scale", "blur_sigma",
                            "hflip_p", "n_global_crops", "color_jitter_p", "grayscale_p", "solarize_p", "blur")
    assert {name: tuple(v) if isinstance(v, list) else v for name, v in recorded["augmentation"].items()} == {
        name: getattr(cfg, name) for name in augmentation_options}
    ipe = trainer.iters_per_epoch
    expected = Schedules(
        lr=cosine_schedule(cfg.base_lr * cfg.batch_size / 256, cfg.min_lr, cfg.epochs, ipe, cfg.warmup_epochs),
        weight_decay=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, ipe),
        momentum=cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, ipe),
        teacher_temp=teacher_temp_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs,
                                           cfg.epochs))
    for name in ("lr", "weight_decay", "momentum"):
        np.testing.assert_array_equal(getattr(trainer.schedules, name), getattr(expected, name), err_msg=name)
    assert trainer.schedules.teacher_temp == expected.teacher_temp
    for model in (trainer.student, trainer.teacher):
        assert len(model.backbone.blocks) == 3 and model.backbone.cls_token.shape[-1] == 24
        assert model.head.last_layer.weight.shape == (48, cfg.head_bottleneck_dim)
    assert trainer.center.shape == (1, 48)
    assert trainer.evaluate() == 50.0
    knn_args = recorded["knn"]
    assert (knn_args["k"], knn_args["temperature"], knn_args["size"]) == (7, 0.2, 16)


def _cli(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + key.replace("_", "-")]
    if isinstance(value, tuple):
        return [flag, *map(str, value)]
    return [flag, str(value)]


@pytest.mark.usefixtures("kornia")
def test_fused_and_reference_kernels_give_the_same_loss_curve(tmp_path):
    """--kernels fused vs --kernels reference at the same seed: the same losses up to float rounding (with a
    BatchNorm head, registers and LayerScale, so those paths run too)."""
    curves = {}
    for kernels in ("fused", "reference"):
        cfg, values = tiny_config(tmp_path / kernels, kernels=kernels, epochs=2, eval_every=0, head_use_bn=True,
                                  n_registers=2, layerscale=0.1)
        history = train_mod.train(cfg, values)
        curves[kernels] = np.array([r["loss"] for r in history])
    np.testing.assert_allclose(curves["fused"], curves["reference"], rtol=2e-3)


@pytest.mark.usefixtures("kornia")
def test_fused_and_reference_steps_agree_on_the_default_preset(tmp_path):
    """The first steps of the default CPU preset (KoLeo, stochastic depth, 6 local crops) give the same losses on
    our kernels and on plain PyTorch. Later steps drift apart by rounding only: the small-data recipe (teacher
    temperature 0.02) amplifies a 1e-7 difference to about 1e-3 within an epoch, as two thread counts would."""
    losses = {}
    for kernels in ("fused", "reference"):
        values = {"preset": "cpu-tiny", "device": "cpu", "kernels": kernels, "num_workers": 0, "progress": False,
                  "output_dir": str(tmp_path / kernels)}
        trainer = train_mod.Trainer(resolve_config(values), values)
        trainer.sampler.set_epoch(0)
        losses[kernels] = []
        with dino_kernels.backend("reference" if kernels == "reference" else "auto"):
            for step, (images, _) in enumerate(trainer.loader):
                losses[kernels].append(trainer.train_step(images, 0)[0])
                if step == 5:
                    break
    np.testing.assert_allclose(losses["fused"], losses["reference"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------- DINOv2
# The tiny run with recipe dinov2 on 16-px global crops (4x4 patch grids, so that block masks fit): iBOT on the masked
# patches, softmax centering for the first epoch, then Sinkhorn-Knopp, registers and LayerScale.
TINY_V2 = {"recipe": "dinov2", "image_size": 16, "global_size": 16, "local_size": 8, "centering": "sinkhorn_knopp",
           "centering_warmup_epochs": 1, "n_registers": 1, "layerscale": 0.1, "mask_probability": 1.0}


def test_vit_mask_token_replaces_the_masked_patch_embeddings():
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, mask_token=True)
    with torch.no_grad():
        vit.mask_token.normal_()
    images = torch.randn(3, 3, 16, 16)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[1, [0, 5, 15]] = True
    plain, masked = vit.prepare_tokens(images), vit.prepare_tokens(images, masks)
    pos = vit.interpolate_pos_encoding(4, 4)[0, 1:]
    torch.testing.assert_close(masked[1, 1:][masks[1]], vit.mask_token.expand(3, -1) + pos[masks[1]])
    torch.testing.assert_close(masked[:, 1:][~masks], plain[:, 1:][~masks])
    torch.testing.assert_close(masked[:, 0], plain[:, 0])


@pytest.mark.parametrize("separate", [False, True])
def test_dinov2_forward_returns_the_masked_patch_logits(tmp_path, separate):
    cfg, _ = tiny_config(tmp_path, **TINY_V2, ibot_separate_head=separate)
    model = build_model(cfg, drop_path=False).eval()
    assert (model.ibot_head is not None) == separate
    globals_, locals_ = torch.randn(4, 3, 16, 16), torch.randn(2 * 4, 3, 8, 8)
    indices = torch.tensor([0, 7, 20, 63])
    logits, features, patch_logits = model([globals_, locals_], patch_indices=indices)
    torch.testing.assert_close(logits, model([globals_, locals_]))
    tokens = model.backbone.forward_tokens([globals_])[0][:, 1 + cfg.n_registers:].flatten(0, 1)
    head = model.ibot_head if separate else model.head
    torch.testing.assert_close(patch_logits, head(tokens[indices]), rtol=1e-5, atol=1e-6)
    assert features.shape == (12, cfg.embed_dim) and patch_logits.shape == (4, cfg.out_dim)


@pytest.mark.usefixtures("kornia")
def test_dinov2_step_adds_ibot_and_switches_to_sinkhorn_knopp(tmp_path, monkeypatch):
    """The DINOv2 step: the masked patches reach the iBOT loss with DINOv2's weights and image count, the DINO terms
    are weighted as DINOv2 (2/3 with no local crop), softmax centering (both centers move) until
    centering_warmup_epochs, then Sinkhorn-Knopp (the centers stay), and the mask token gets a gradient."""
    cfg, values = tiny_config(tmp_path, **TINY_V2, n_local_crops=0, ibot_weight=0.7, koleo_weight=0.0)
    trainer = train_mod.Trainer(cfg, values)
    calls = {"dino": [], "ibot": []}
    real_dino, real_ibot = dino_kernels.dino_loss, dino_kernels.ibot_patch_loss

    def dino(*args, **kwargs):
        calls["dino"].append(kwargs)
        return real_dino(*args, **kwargs)

    def ibot(student, teacher, center, weights, **kwargs):
        out = real_ibot(student, teacher, center, weights, **kwargs)
        calls["ibot"].append((student.shape[0], teacher.shape[0], weights, kwargs, out.item()))
        return out

    totals = []
    real_scale = trainer.scaler.scale
    monkeypatch.setattr(dino_kernels, "dino_loss", dino)
    monkeypatch.setattr(dino_kernels, "ibot_patch_loss", ibot)
    monkeypatch.setattr(trainer.scaler, "scale", lambda total: totals.append(total.item()) or real_scale(total))
    grads = []
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: grads.append(
        trainer.student.backbone.mask_token.grad.clone()))
    images, _ = next(iter(trainer.loader))
    crops = trainer.augment(images)
    n_crops = crops[0].shape[0]
    for epoch in (0, 1):
        center, patch_center = trainer.center.clone(), trainer.patch_center.clone()
        torch.manual_seed(epoch)
        expected_masks = train_mod.batch_masks(n_crops, (4, 4), cfg.mask_ratio, cfg.mask_probability)
        torch.manual_seed(epoch)
        result = trainer.step_on_crops(crops, epoch)
        centering = "softmax" if epoch == 0 else "sinkhorn_knopp"
        assert calls["dino"][-1]["centering"] == centering
        rows, teacher_rows, weights, kwargs, ibot_value = calls["ibot"][-1]
        assert rows == teacher_rows == len(expected_masks.indices) > 0
        torch.testing.assert_close(weights, expected_masks.weights)
        assert kwargs["n_images"] == n_crops and kwargs["centering"] == centering
        assert result.ibot == pytest.approx(ibot_value)
        assert totals[-1] == pytest.approx(result.loss * 2 / 3 + 0.7 * ibot_value, rel=1e-5)
        moved = not torch.equal(center, trainer.center), not torch.equal(patch_center, trainer.patch_center)
        assert moved == ((True, True) if epoch == 0 else (False, False))
        assert grads[-1].abs().sum() > 0


@pytest.mark.usefixtures("kornia")
def test_dinov2_exact_resume_and_metrics(tmp_path, monkeypatch):
    """A DINOv2 run interrupted after epoch 1 and resumed reproduces the uninterrupted one exactly (masks replay from
    the saved RNG, the patch center is saved); its metrics carry the iBOT term."""
    cfg, values = tiny_config(tmp_path / "full", **TINY_V2, epochs=2, eval_every=0)
    history = train_mod.train(cfg, values)
    assert all(r["ibot"] > 0 for r in history)
    part_cfg, part_values = tiny_config(tmp_path / "part", **TINY_V2, epochs=2, eval_every=0)
    resumed = _interrupt_then_resume(part_cfg, part_values, 1, monkeypatch)
    assert [(r["loss"], r["ibot"]) for r in resumed] == [(r["loss"], r["ibot"]) for r in history]
    a, b = load_checkpoint(cfg.output_dir), load_checkpoint(part_cfg.output_dir)
    assert torch.equal(a["patch_center"], b["patch_center"]) and a["patch_center"].abs().sum() > 0
    for name in a["student"]:
        assert torch.equal(a["student"][name], b["student"][name]), name


@pytest.mark.usefixtures("kornia")
def test_dinov2_fused_and_reference_steps_agree(tmp_path):
    losses = {}
    for kernels in ("fused", "reference"):
        cfg, values = tiny_config(tmp_path / kernels, **{**TINY_V2, "centering_warmup_epochs": 0}, kernels=kernels)
        trainer = train_mod.Trainer(cfg, values)
        trainer.sampler.set_epoch(0)
        losses[kernels] = []
        with dino_kernels.backend("reference" if kernels == "reference" else "auto"):
            for step, (images, _) in enumerate(trainer.loader):
                result = trainer.train_step(images, 0)
                losses[kernels].append((result.loss, result.ibot, result.koleo))
                if step == 2:
                    break
    np.testing.assert_allclose(losses["fused"], losses["reference"], rtol=1e-5)


def test_dinov2_config_validation():
    with pytest.raises(ValueError, match="recipe"):
        resolve_config({"preset": "cpu-tiny", "recipe": "dinov3"})
    with pytest.raises(ValueError, match="n_global_crops"):
        resolve_config({"preset": "cpu-tiny-v2", "n_global_crops": 1})
    with pytest.raises(ValueError, match="mask_ratio"):
        resolve_config({"preset": "cpu-tiny-v2", "mask_ratio": (0.5, 0.1)})
    with pytest.raises(ValueError, match="centering"):
        resolve_config({"preset": "cpu-tiny-v2", "centering": "none"})
    cfg = resolve_config({"preset": "vit-s14-v2"})
    assert (cfg.recipe, cfg.patch_size, cfg.n_registers, cfg.centering) == ("dinov2", 14, 4, "sinkhorn_knopp")
