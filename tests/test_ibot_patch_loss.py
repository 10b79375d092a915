"""The fused iBOT masked-patch loss against the official-style eager loss in float64: loss, gradient, collapse
statistics and the patch-center update, under our C++ kernels (`auto`) and our Triton kernels (interpreter), with
softmax and Sinkhorn-Knopp centering."""

import importlib
import math

import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    TOLERANCE,
    assert_loss_matches,
    cuda_param,
    implementations_run,
    rel_error,
    requires_interpreter,
)

import dino_kernels
from dino_kernels import reference
from dino_kernels.ibot_patch_loss import ibot_patch_loss

ibot_module = importlib.import_module("dino_kernels.ibot_patch_loss")

FP32 = TOLERANCE[torch.float32]
CENTERINGS = ("softmax", "sinkhorn_knopp")

# (K, masked patches of each image): odd K, one-block and multi-block rows, M = 1, images without a masked patch.
CASES = [(7, (2, 0, 1)), (1000, (1,)), (4097, (2, 0, 3, 1))]


def _inputs(k, counts, dtype, scale=1.0, device="cpu"):
    """Logits of the masked patches and their weights built as DINOv2 builds them: 1 / (masked patches of the
    image), from boolean masks; every image counts in n_images, masked or not."""
    n_patches = max(counts) + 2
    masks = torch.zeros(len(counts), n_patches, dtype=torch.bool)
    for image, count in enumerate(counts):
        masks[image, torch.randperm(n_patches)[:count]] = True
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    n_rows = int(masks.sum())
    student = (torch.randn(n_rows, k, device=device) * scale).to(dtype)
    teacher = (torch.randn(n_rows, k, device=device) * scale).to(dtype)
    center = torch.randn(k, device=device) * 0.3 * scale
    return student, teacher, center, weights.to(device), len(counts)


def _expected(student, teacher, center, weights, n_images, student_temp, teacher_temp, centering, grad_output):
    """Loss, d(grad_output * loss)/d(student) and stats of the eager reference in float64, from the same inputs."""
    s = student.detach().double().requires_grad_()
    loss, stats = reference.ibot_patch_loss(s, teacher.double(), center.double(), weights.double(), n_images=n_images,
                                            student_temp=student_temp, teacher_temp=teacher_temp,
                                            centering=centering, return_stats=True)
    (grad,) = torch.autograd.grad(loss * grad_output, s)
    return loss.detach(), grad, stats


def _ours(student, teacher, center, weights, n_images, student_temp, teacher_temp, centering, grad_output):
    student = student.detach().requires_grad_()
    loss, stats = ibot_patch_loss(student, teacher, center, weights, n_images=n_images, student_temp=student_temp,
                                  teacher_temp=teacher_temp, centering=centering, return_stats=True)
    (loss * grad_output).backward()
    return loss, student.grad, stats


@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,counts", CASES)
def test_matches_float64_reference(centering, backend, dtype, k, counts):
    student, teacher, center, weights, n_images = _inputs(k, counts, dtype)
    student_temp, teacher_temp = 0.05 + 0.2 * torch.rand(()).item(), 0.04 + 0.06 * torch.rand(()).item()
    grad_output = 0.5 + 2.5 * torch.rand(()).item()
    args = (student, teacher, center, weights, n_images, student_temp, teacher_temp, centering, grad_output)
    expected = _expected(*args)
    with dino_kernels.backend(backend):
        ours = _ours(*args)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    assert ours[1].dtype == dtype and ours[1].shape == student.shape
    # Loss and statistics are fp32 results of exact inputs: fp32 bounds for every input dtype. The gradient is
    # stored in the logits' dtype.
    assert_loss_matches(ours, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k,counts", CASES[:2])
def test_cpp_bfloat16_and_float64(centering, dtype, k, counts):
    # bf16 is broken in the Triton interpreter: the Triton bf16 configs are proven by the sm_80/sm_90 AOT compile.
    student, teacher, center, weights, n_images = _inputs(k, counts, dtype)
    args = (student, teacher, center, weights, n_images, 0.1, 0.07, centering, 1.3)
    ours = _ours(*args)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_matches(ours, _expected(*args), TOLERANCE[dtype],
                        tolerance=TOLERANCE[torch.float64] if dtype == torch.float64 else FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_and_non_contiguous_inputs(backend):
    student, teacher, center, weights, n_images = _inputs(301, (3, 1, 2), torch.float32)
    wide = torch.randn(student.shape[0], 2 * 301)
    wide[:, 1::2] = student  # a strided view with the same values
    teacher_t = teacher.half().t().contiguous().t()  # column-major, fp16
    spread = torch.zeros(2 * weights.numel(), dtype=torch.float64)
    spread[::2] = weights  # strided fp64 weights
    center = center.half()
    expected = _expected(student, teacher.half(), center, weights, n_images, 0.1, 0.07, "softmax", 1.0)
    with dino_kernels.backend(backend):
        ours = _ours(wide[:, 1::2], teacher_t, center[None, :], spread[::2], n_images, 0.1, 0.07, "softmax", 1.0)
    assert_loss_matches(ours, expected, FP32)


def test_cpp_k_131072():
    # Logits of DINOv2's scale (cosines); K = 131,072 prototypes (the ViT-L/g heads).
    student, teacher, center, weights, n_images = _inputs(131_072, (2, 1), torch.float32, scale=0.5)
    args = (student, teacher, center, weights, n_images, 0.1, 0.07, "softmax", 0.7)
    assert_loss_matches(_ours(*args), _expected(*args), FP32)


@requires_interpreter
def test_triton_multi_block_paths(monkeypatch):
    """Small blocks make every loop of the Triton kernel take several steps, so that the online max of the teacher
    sweep grows from block to block (a rising row), stays (its max in the first block), and ties across blocks
    (a uniform row: every column at the max; two equal peaks in different blocks)."""
    monkeypatch.setattr(ibot_module.PATCH_LOSS, "configs", ({"BLOCK_K": 16, "num_warps": 1},
                                                            {"BLOCK_K": 32, "num_warps": 1}))
    for k in (50, 301):
        student, teacher, center, weights, n_images = _inputs(k, (4, 3), torch.float32)
        teacher[0] = torch.linspace(-1, 1, k)
        teacher[1] = torch.linspace(1, -1, k)
        teacher[2] = 0.0
        teacher[3] = 0.0
        teacher[3, [3, k - 2]] = 2.0
        center[:] = 0.0
        for centering in CENTERINGS:
            args = (student, teacher, center, weights, n_images, 0.1, 0.05, centering, 2.0)
            with dino_kernels.backend("triton"):
                assert_loss_matches(_ours(*args), _expected(*args), FP32)


@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_masked_patch(backend, centering):
    """M = 0 (no masked patch in the batch): the official code's loss is an empty sum, 0, with a zero (empty)
    gradient; the statistics are means over no rows, NaN, as the reference's."""
    student = torch.zeros(0, 33, requires_grad=True)
    teacher, center, weights = torch.zeros(0, 33), torch.randn(33), torch.zeros(0)
    loss_ref, stats_ref = reference.ibot_patch_loss(student, teacher, center, weights, n_images=4,
                                                    centering=centering, return_stats=True)
    with dino_kernels.backend(backend):
        loss, stats = ibot_patch_loss(student, teacher, center, weights, n_images=4, centering=centering,
                                      return_stats=True)
    assert loss.item() == 0.0 == loss_ref.item()
    (loss * 3.0).backward()
    assert student.grad.shape == (0, 33)
    for ours, ref in zip(stats, stats_ref):
        assert ours.shape == ref.shape and ours.isnan().all() and ref.isnan().all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_extremes(backend):
    k = 513
    teacher = torch.zeros(2, k)  # uniform target: entropy ln K
    teacher[1, 7] = 40.0  # near one-hot at τt = 0.04: entropy ~ 1e-430 nats, i.e. 0
    student, weights = torch.randn(2, k), torch.ones(2)
    with dino_kernels.backend(backend), torch.no_grad():
        _, uniform = ibot_patch_loss(student[:1], teacher[:1], torch.zeros(k), weights[:1], n_images=1,
                                     teacher_temp=0.04, return_stats=True)
        _, sharp = ibot_patch_loss(student[1:], teacher[1:], torch.zeros(k), weights[1:], n_images=1,
                                   teacher_temp=0.04, return_stats=True)
    assert abs(uniform.teacher_entropy.item() - math.log(k)) <= 1e-6 * math.log(k)
    assert 0.0 <= sharp.teacher_entropy.item() <= 1e-30
    assert sharp.kl.item() >= 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float16_gradient_survives_loss_scaling(backend):
    """A GradScaler-sized grad_output with DINOv2's sizes (weights 1/|M_n| ~ 1/60, 2B images): entries of the true
    gradient below fp16's range must come back once scaled (the fp16 gradient is stored pre-scaled by a power of two
    chosen from the weights); and weights far above 1 must not overflow that stored gradient."""
    student, teacher, center, _, _ = _inputs(16_384, (1,) * 6, torch.float16)
    for weights, n_images, grad_output in ((torch.full((6,), 1 / 60), 128, 65_536.0), (torch.full((6,), 3e3), 1, 1.0)):
        args = (student, teacher, center, weights, n_images, 0.1, 0.07, "softmax", grad_output)
        _, grad_ref, _ = _expected(*args)
        with dino_kernels.backend(backend):
            _, grad, _ = _ours(*args)
        assert grad.isfinite().all()
        assert rel_error(grad, grad_ref) <= TOLERANCE[torch.float16]
    _, grad_ref, _ = _expected(student, teacher, center, torch.full((6,), 1 / 60), 128, 0.1, 0.07, "softmax", 65_536.0)
    # The first case is meaningful: storing the fp16 gradient itself would flush these entries to zero.
    assert (((grad_ref / 65_536.0).half() == 0) & (grad_ref.half() != 0)).sum() > 1000


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_only_matches_and_stores_no_gradient(backend):
    student, teacher, center, weights, n_images = _inputs(257, (2, 1), torch.float32)
    with dino_kernels.backend(backend):
        with torch.no_grad():
            loss, stats = ibot_patch_loss(student, teacher, center, weights, n_images=n_images, return_stats=True)
            outputs = torch.ops.dino_kernels.ibot_patch_loss(student, teacher, center, weights, None, None, None,
                                                             n_images, 0.1, 0.07, False)
        loss_grad, stats_grad = ibot_patch_loss(student.requires_grad_(), teacher, center, weights,
                                                n_images=n_images, return_stats=True)
    assert outputs[1].numel() == 0
    assert torch.equal(loss, loss_grad.detach())
    for a, b in zip(stats, stats_grad):
        assert torch.equal(a, b) and not b.requires_grad


def test_gradient_only_to_student_and_backward_variants():
    student, teacher, center, weights, n_images = _inputs(100, (2, 3), torch.float32)
    for t in (student, teacher, center, weights):
        t.requires_grad_()
    _, grad_ref, _ = _expected(student, teacher, center, weights, n_images, 0.1, 0.07, "softmax", 1.0)
    loss = ibot_patch_loss(student, teacher, center, weights, n_images=n_images)
    loss.backward(retain_graph=True)
    assert teacher.grad is None and center.grad is None and weights.grad is None
    assert rel_error(student.grad, grad_ref) <= FP32
    # The stored gradient is consumed in place: a second backward through the same graph raises, never doubles.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Called without the stored gradient, backward recomputes it.
    student.grad = None
    outputs = torch.ops.dino_kernels.ibot_patch_loss(student, teacher.detach(), center.detach(), weights.detach(),
                                                     None, None, None, n_images, 0.1, 0.07, False)
    (outputs[0] * 2.0).backward()
    assert rel_error(student.grad, 2.0 * grad_ref) <= FP32


@pytest.mark.parametrize("backend,expected", [
    ("auto", {"cpp.ibot_patch_loss_cpu"}),
    ("cpu", {"cpp.ibot_patch_loss_cpu"}),
    ("reference", {"reference.ibot_patch_loss"}),
    pytest.param("triton", {"triton._ibot_patch_loss_kernel", "triton._dino_loss_rescale_kernel"},
                 marks=requires_interpreter)])
def test_each_backend_runs_its_implementation(monkeypatch, backend, expected):
    """The backend switch picks the implementation (all of them give the same values, so only this tells them
    apart): `auto` runs the C++ kernel on CPU tensors; the backward's rescale is dino_loss's op."""
    calls = implementations_run(ibot_module, monkeypatch)
    student, teacher, center, weights, n_images = _inputs(40, (2, 1), torch.float32)
    with dino_kernels.backend(backend):
        _ours(student, teacher, center, weights, n_images, 0.1, 0.07, "softmax", 2.0)
    assert set(calls) == expected


def test_reference_backend_runs_the_reference():
    student, teacher, center, weights, n_images = _inputs(50, (2, 1), torch.float32)
    with dino_kernels.backend("reference"):
        loss, stats = ibot_patch_loss(student, teacher, center, weights, n_images=n_images, return_stats=True)
        with pytest.raises(ValueError, match="reference"):
            torch.ops.dino_kernels.ibot_patch_loss(student, teacher, center, weights, None, None, None, n_images,
                                                   0.1, 0.07, False)
    loss_ref, stats_ref = reference.ibot_patch_loss(student, teacher, center, weights, n_images=n_images,
                                                    return_stats=True)
    assert isinstance(stats, dino_kernels.DINOLossStats)
    assert torch.equal(loss, loss_ref) and all(torch.equal(a, b) for a, b in zip(stats, stats_ref))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_under_autocast(backend):
    torch.manual_seed(3)
    head = torch.nn.Linear(24, 130)
    features = torch.randn(5, 24)
    teacher, center, weights = torch.randn(5, 130), torch.zeros(1, 130), torch.tensor([0.5, 0.5, 1.0, 1 / 3, 1 / 3])
    dtype = torch.bfloat16 if backend == "auto" else torch.float16  # no bf16 in the Triton interpreter
    with dino_kernels.backend(backend), torch.autocast("cpu", dtype=dtype):
        logits = head(features)
        loss = ibot_patch_loss(logits, teacher.to(dtype), center, weights, n_images=4)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    # The same autocast forward with the eager reference loss (fp32 math, as softmax gets under autocast),
    # differentiated in float64 from the half-precision logits.
    expected = _expected(logits.detach(), teacher.to(dtype), center, weights, 4, 0.1, 0.07, "softmax", 1.0)
    assert rel_error(loss, expected[0]) <= FP32
    weight_grad_ref = expected[1].T @ features.double()  # logits = features @ W^T + b
    assert rel_error(head.weight.grad, weight_grad_ref) <= 2 * TOLERANCE[dtype]


# ---------------------------------------------------------------------------------------------- center update
@pytest.mark.parametrize("center_shape", [(37,), (1, 37)])
def test_update_center_with_the_patch_mean(center_shape):
    student, teacher, _, weights, n_images = _inputs(37, (3, 2), torch.float16)
    center = torch.randn(center_shape)
    _, stats = ibot_patch_loss(student, teacher, center, weights, n_images=n_images, return_stats=True)
    ours, expected = center.clone(), center.clone()
    dino_kernels.update_center_(ours, stats.teacher_mean, 0.9)
    reference.update_center_(expected, teacher, 0.9)  # the official patch-center update from the masked rows
    assert ours.shape == center_shape
    assert rel_error(ours, expected) <= FP32


# ------------------------------------------------------------------------------------------- op and compiler
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    student, teacher, center, weights, n_images = _inputs(33, (2, 1), torch.float32)
    scalings = (torch.randn(3), torch.rand(3) + 0.5, torch.rand(3))  # given targets: opcheck checks plumbing
    with dino_kernels.backend(backend):
        torch.library.opcheck(torch.ops.dino_kernels.ibot_patch_loss.default,
                              (student.requires_grad_(), teacher, center, weights, None, None, None, n_images, 0.1,
                               0.07, True))
        # Given targets, without the stored gradient and with a student that needs one: backward recomputes it.
        torch.library.opcheck(torch.ops.dino_kernels.ibot_patch_loss.default,
                              (student, teacher.half(), center, weights, *scalings, n_images, 0.1, 0.07, False))


@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_compile_fullgraph(device, dtype, centering):
    student, teacher, center, weights, n_images = _inputs(200, (3, 0, 2), dtype, device=device)

    def step(s, t, c, w):
        loss, stats = ibot_patch_loss(s, t, c, w, n_images=n_images, student_temp=0.1, teacher_temp=0.05,
                                      centering=centering, return_stats=True)
        return 3.0 * loss, stats.teacher_mean, stats.teacher_entropy

    compiled = torch.compile(step, fullgraph=True)
    s_compiled = student.clone().requires_grad_()
    loss, mean, entropy = compiled(s_compiled, teacher, center, weights)
    loss.backward()
    s_eager = student.clone().requires_grad_()
    loss_eager, mean_eager, entropy_eager = step(s_eager, teacher, center, weights)
    loss_eager.backward()
    assert torch.allclose(loss, loss_eager, rtol=1e-6)
    assert torch.allclose(mean, mean_eager) and torch.allclose(entropy, entropy_eager, rtol=1e-6)
    assert rel_error(s_compiled.grad, s_eager.grad) <= TOLERANCE[dtype]


@requires_interpreter
def test_launcher_configs_are_declared_for_aot(monkeypatch):
    """Every config the launcher picks is a declared one, the set `python -m dino_kernels._aot` compiles
    (tests/test_build.py): both configs (K below and above the first one's BLOCK_K) launch under the triton backend
    (TritonKernel.launch raises on an undeclared config)."""
    launched = []
    kernel = ibot_module.PATCH_LOSS
    launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda grid, config, **args: (launched.append(id(config)),
                                                                        launch(grid, config, **args)))
    small_k = kernel.configs[0]["BLOCK_K"]
    with dino_kernels.backend("triton"), torch.no_grad():
        for k in (small_k, small_k + 1):
            student, teacher, center, weights, n_images = _inputs(k, (1,), torch.float16)
            ibot_patch_loss(student, teacher, center, weights, n_images=n_images)
    assert set(launched) == {id(config) for config in kernel.configs}


# --------------------------------------------------------------------------------------------------- bad input
def _call(student=(5, 10), teacher=(5, 10), center=(10,), weights=(5,), **kwargs):
    make = lambda spec: spec if not isinstance(spec, tuple) else torch.zeros(spec)
    kwargs.setdefault("n_images", 2)
    ibot_patch_loss(make(student), make(teacher), make(center), make(weights), **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(teacher=(5, 11)), ValueError, r"teacher_patch_logits must have student_patch_logits' shape \(5, 10\)"),
        (dict(teacher=(4, 10)), ValueError, "teacher_patch_logits must have"),
        (dict(center=(11,)), ValueError, r"center must have shape \(10,\) or \(1, 10\)"),
        (dict(center=(2, 10)), ValueError, "center must have shape"),
        (dict(weights=(4,)), ValueError, r"masks_weight must have shape \(5,\).*got \(4,\)"),
        (dict(weights=(5, 1)), ValueError, "masks_weight must have shape"),
        (dict(n_images=0), ValueError, "n_images must be >= 1"),
        (dict(n_images=2.0), TypeError, "n_images must be an int"),
        (dict(n_images=None), TypeError, "n_images must be an int"),
        (dict(sk_iterations=0), ValueError, "sk_iterations"),
        (dict(student_temp=0.0), ValueError, "student_temp"),
        (dict(teacher_temp=-0.07), ValueError, "teacher_temp"),
        (dict(teacher_temp=float("inf")), ValueError, "teacher_temp"),
        (dict(student_temp="0.1"), TypeError, "student_temp"),
        (dict(centering="center"), ValueError, "centering must be one of 'softmax', 'sinkhorn_knopp'; got 'center'"),
        (dict(student=torch.zeros(5, 10, dtype=torch.int64)), TypeError, "student_patch_logits must have dtype"),
        (dict(teacher=torch.zeros(5, 10, dtype=torch.int32)), TypeError, "teacher_patch_logits must have dtype"),
        (dict(weights=torch.ones(5, dtype=torch.bool)), TypeError, "masks_weight must have dtype"),
        (dict(center=torch.zeros(10, device="meta")), ValueError, "center is on meta"),
        (dict(weights=torch.zeros(5, device="meta")), ValueError, "masks_weight is on meta"),
        (dict(student=(50,)), ValueError, "student_patch_logits must be 2-d"),
        (dict(student=(5, 0), teacher=(5, 0), center=(0,)), ValueError, "K must be > 0"),
        (dict(student=[[0.0] * 10] * 5), TypeError, "student_patch_logits must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


@requires_interpreter
def test_triton_rejects_float64_clearly():
    with dino_kernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        _call(student=torch.zeros(5, 10, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,counts", CASES + [(65_536, (40, 0, 25, 60)), (131_072, (3, 5))])
def test_cuda_matches_float64_reference(centering, dtype, k, counts):
    student, teacher, center, weights, n_images = _inputs(k, counts, dtype, scale=0.5, device="cuda")
    args = (student, teacher, center, weights, n_images, 0.1, 0.07, centering, 1.7)
    assert_loss_matches(_ours(*args), _expected(*args), TOLERANCE[dtype])
    # fp16's in-place rescale of a pre-scaled stored gradient cannot pass opcheck's eager-vs-AOT output comparison
    # by design (see test_dino_loss); its compiled gradients are compared with eager ones in the compile test.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    checks += () if dtype == torch.float16 else ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.dino_kernels.ibot_patch_loss.default,
                          (student[:, :512].contiguous().requires_grad_(), teacher[:, :512].contiguous(),
                           center[:512], weights, None, None, None, n_images, 0.1, 0.07, True), test_utils=checks)
