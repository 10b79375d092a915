"""The fused DINO loss against the official-style eager loss in float64: loss, gradient, collapse statistics, center
update and the DINOLoss module, under our C++ kernels (`auto`) and our Triton kernels (interpreter)."""

import importlib
import math

import numpy as np
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
    run_two_ranks,
)

import dino_kernels
from dino_kernels import reference

# The module (the package attribute `dino_kernels.dino_loss` is the function).
dino_loss_module = importlib.import_module("dino_kernels.dino_loss")

FP32 = TOLERANCE[torch.float32]

# (K, B, crops S, global crops G): odd K, single-block and multi-block rows, B = 1, S = 2 (no local crops), G = 1.
CASES = [(7, 3, 4, 2), (1000, 2, 5, 1), (4097, 1, 2, 2), (1000, 1, 2, 1)]


def _inputs(k, batch, n_crops, n_global, dtype, scale=1.0, device="cpu"):
    student = (torch.randn(n_crops * batch, k, device=device) * scale).to(dtype)
    teacher = (torch.randn(n_global * batch, k, device=device) * scale).to(dtype)
    center = torch.randn(k, device=device) * 0.3 * scale
    return student, teacher, center


def _expected(student, teacher, center, n_global, student_temp, teacher_temp, grad_output):
    """Loss, d(grad_output * loss)/d(student) and stats of the eager reference in float64, from the same inputs."""
    s = student.detach().double().requires_grad_()
    loss, stats = reference.dino_loss(s, teacher.double(), center.double(), n_global_crops=n_global,
                                      student_temp=student_temp, teacher_temp=teacher_temp, return_stats=True)
    (grad,) = torch.autograd.grad(loss * grad_output, s)
    return loss.detach(), grad, stats


def _ours(student, teacher, center, n_global, student_temp, teacher_temp, grad_output):
    student = student.detach().requires_grad_()
    loss, stats = dino_kernels.dino_loss(student, teacher, center, n_global_crops=n_global,
                                         student_temp=student_temp, teacher_temp=teacher_temp, return_stats=True)
    (loss * grad_output).backward()
    return loss, student.grad, stats


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,batch,n_crops,n_global", CASES)
def test_matches_float64_reference(backend, dtype, k, batch, n_crops, n_global):
    student, teacher, center = _inputs(k, batch, n_crops, n_global, dtype)
    student_temp, teacher_temp = 0.05 + 0.2 * torch.rand(()).item(), 0.02 + 0.06 * torch.rand(()).item()
    grad_output = 0.5 + 2.5 * torch.rand(()).item()
    expected = _expected(student, teacher, center, n_global, student_temp, teacher_temp, grad_output)
    with dino_kernels.backend(backend):
        ours = _ours(student, teacher, center, n_global, student_temp, teacher_temp, grad_output)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    assert ours[1].dtype == dtype and ours[1].shape == student.shape
    # Loss and statistics are fp32 results of exact inputs: fp32 bounds for every input dtype. The gradient is
    # stored in the logits' dtype.
    assert_loss_matches(ours, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k,batch,n_crops,n_global", CASES[:3])
def test_cpp_bfloat16_and_float64(dtype, k, batch, n_crops, n_global):
    # bf16 is broken in the Triton interpreter: the Triton bf16 configs are proven by the sm_80/sm_90 AOT compile.
    student, teacher, center = _inputs(k, batch, n_crops, n_global, dtype)
    expected = _expected(student, teacher, center, n_global, 0.1, 0.04, 1.3)
    ours = _ours(student, teacher, center, n_global, 0.1, 0.04, 1.3)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_matches(ours, expected, TOLERANCE[dtype],
                        tolerance=TOLERANCE[torch.float64] if dtype == torch.float64 else FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_student_teacher_and_center_dtypes(backend):
    student, teacher, center = _inputs(300, 2, 3, 2, torch.float32)
    teacher, center = teacher.half(), center.half()
    expected = _expected(student, teacher, center, 2, 0.1, 0.04, 1.0)
    with dino_kernels.backend(backend):
        assert_loss_matches(_ours(student, teacher, center, 2, 0.1, 0.04, 1.0), expected, FP32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,batch,n_crops,n_global", CASES + [(65_536, 4, 12, 2), (262_144, 2, 3, 2)])
def test_cuda_matches_float64_reference(dtype, k, batch, n_crops, n_global):
    student, teacher, center = _inputs(k, batch, n_crops, n_global, dtype, scale=0.5, device="cuda")
    expected = _expected(student, teacher, center, n_global, 0.1, 0.04, 1.7)
    assert_loss_matches(_ours(student, teacher, center, n_global, 0.1, 0.04, 1.7), expected, TOLERANCE[dtype])
    # fp16 stores its gradient pre-scaled by a power of 2 (dino_loss._grad_scales) and the backward rescales that
    # output in place, so after a backward the eager forward's output differs from the copy AOTAutograd rescales:
    # opcheck's eager-vs-AOT comparison of outputs cannot hold there by design. The fp16 gradients under
    # torch.compile are compared with eager ones in test_torch_compile_fullgraph instead.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    checks += () if dtype == torch.float16 else ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.dino_kernels.dino_loss.default,
                          (student[: 2 * batch, :512].contiguous().requires_grad_(), teacher[:, :512].contiguous(),
                           center[:512], n_global, 0.1, 0.04, True), test_utils=checks)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    student, teacher, center = _inputs(301, 2, 3, 2, torch.float32)
    wide = torch.randn(student.shape[0], 2 * 301)
    wide[:, 1::2] = student  # a strided view with the same values
    teacher_t = teacher.t().contiguous().t()  # column-major
    expected = _expected(student, teacher, center, 2, 0.1, 0.04, 1.0)
    with dino_kernels.backend(backend):
        ours = _ours(wide[:, 1::2], teacher_t, center[None, :].expand(3, -1)[1], 2, 0.1, 0.04, 1.0)
    assert_loss_matches(ours, expected, FP32)


def test_cpp_k_262144():
    # Logits of DINO's scale (cosines); K up to 262,144 prototypes.
    student, teacher, center = _inputs(262_144, 1, 3, 2, torch.float32, scale=0.5)
    expected = _expected(student, teacher, center, 2, 0.1, 0.04, 0.7)
    assert_loss_matches(_ours(student, teacher, center, 2, 0.1, 0.04, 0.7), expected, FP32)


@requires_interpreter
def test_triton_multi_block_paths(monkeypatch):
    """Small blocks make every loop of the Triton kernels take several steps on interpreter-sized inputs: row tiles
    of the teacher pass, slice blocks of the finalize kernel, column blocks of the student pass."""
    monkeypatch.setattr(dino_loss_module.TEACHER_STATS, "configs", ({"BLOCK_ROWS": 4, "BLOCK_K": 16, "num_warps": 8},))
    monkeypatch.setattr(dino_loss_module.TEACHER_FINALIZE, "configs", ({"BLOCK": 8, "num_warps": 4},))
    monkeypatch.setattr(dino_loss_module.STUDENT, "configs", ({"BLOCK_K": 64, "num_warps": 1},
                                                              {"BLOCK_K": 128, "num_warps": 2}))
    for k in (50, 1001):
        student, teacher, center = _inputs(k, 3, 4, 2, torch.float32)
        expected = _expected(student, teacher, center, 2, 0.1, 0.04, 2.0)
        with dino_kernels.backend("triton"):
            assert_loss_matches(_ours(student, teacher, center, 2, 0.1, 0.04, 2.0), expected, FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float16_gradient_survives_loss_scaling(backend):
    """A GradScaler-sized grad_output: entries of the true gradient below fp16's range must come back once scaled,
    as with the eager loss (the fp16 gradient is stored pre-scaled by a power of two)."""
    student, teacher, center = _inputs(16_384, 2, 12, 2, torch.float16)
    grad_output = 65_536.0
    _, grad_ref, _ = _expected(student, teacher, center, 2, 0.1, 0.04, grad_output)
    with dino_kernels.backend(backend):
        _, grad, _ = _ours(student, teacher, center, 2, 0.1, 0.04, grad_output)
    assert rel_error(grad, grad_ref) <= TOLERANCE[torch.float16]
    # Entries that storing the fp16 gradient itself would flush to zero, although fp16 holds them once scaled.
    at_risk = ((grad_ref / grad_output).half() == 0) & (grad_ref.half() != 0)
    assert at_risk.sum() > 1000  # the case is meaningful
    assert (grad[at_risk] == 0).sum() <= 0.001 * at_risk.sum()  # (a few may round to 0 at fp16's very bottom)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_extremes(backend):
    k = 513
    teacher = torch.zeros(2, k)  # uniform teacher: entropy ln K
    teacher[1, 7] = 40.0  # near one-hot at τt = 0.04: entropy ~ 1e-430 nats, i.e. 0
    student = torch.randn(4, k)
    with dino_kernels.backend(backend), torch.no_grad():
        _, stats = dino_kernels.dino_loss(student, teacher, torch.zeros(k), n_global_crops=2, return_stats=True)
    assert abs(stats.teacher_entropy.item() - math.log(k) / 2) <= 1e-6
    with dino_kernels.backend(backend), torch.no_grad():
        _, stats = dino_kernels.dino_loss(student[2:], teacher[1:], torch.zeros(k), n_global_crops=1, return_stats=True)
    assert 0.0 <= stats.teacher_entropy.item() <= 1e-30
    assert stats.kl.item() >= 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_only_matches_and_stores_no_gradient(backend):
    student, teacher, center = _inputs(257, 2, 4, 2, torch.float32)
    with dino_kernels.backend(backend):
        with torch.no_grad():
            loss, stats = dino_kernels.dino_loss(student, teacher, center, return_stats=True)
            outputs = torch.ops.dino_kernels.dino_loss(student, teacher, center, 2, 0.1, 0.04, False)
        loss_grad, stats_grad = dino_kernels.dino_loss(student.requires_grad_(), teacher, center, return_stats=True)
    assert outputs[1].numel() == 0
    assert torch.equal(loss, loss_grad.detach())
    for a, b in zip(stats, stats_grad):
        assert torch.equal(a, b) and not b.requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rescale_op_skips_when_factor_is_one(backend, dtype):
    """Skipped exactly when grad_output * scale is 1; grad_output = 1 alone (`loss.backward()` on fp16 logits, whose
    stored gradient carries a scale) is not enough."""
    grad = torch.randn(5, 33).to(dtype)
    original = grad.clone()
    with dino_kernels.backend(backend):
        torch.ops.dino_kernels.dino_loss_rescale_(grad, torch.tensor(1.0), 1.0)
        assert torch.equal(grad, original)
        torch.ops.dino_kernels.dino_loss_rescale_(grad, torch.tensor(1.0), 0.5)
        torch.ops.dino_kernels.dino_loss_rescale_(grad, torch.tensor(3.0), 0.25)
    expected = original.double() * 0.5 * 0.75
    assert rel_error(grad, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rescale_writes_only_the_gradient(backend, dtype):
    """The in-place rescale of a gradient that is a view into a larger buffer: the view is scaled, every element
    around it keeps its value (a mask one element too wide, or a chunk bound past the end, would change them).
    40,001 elements: partial last blocks of the Triton kernel (2,048) and of the C++ one (32,768)."""
    buffer = torch.randn(40_001 + 10).to(dtype)
    before = buffer.clone()
    grad = buffer[3:40_004]
    with dino_kernels.backend(backend):
        torch.ops.dino_kernels.dino_loss_rescale_(grad, torch.tensor(3.0), 0.25)
    assert rel_error(grad, before[3:40_004].double() * 0.75) <= TOLERANCE[dtype]
    assert torch.equal(buffer[:3], before[:3]) and torch.equal(buffer[40_004:], before[40_004:])


def test_gradient_only_to_student_and_backward_variants():
    student, teacher, center = _inputs(100, 2, 3, 2, torch.float32)
    student.requires_grad_()
    teacher.requires_grad_()
    center.requires_grad_()
    _, grad_ref, _ = _expected(student, teacher, center, 2, 0.1, 0.04, 1.0)
    loss = dino_kernels.dino_loss(student, teacher, center)
    loss.backward(retain_graph=True)
    assert teacher.grad is None and center.grad is None
    assert rel_error(student.grad, grad_ref) <= FP32
    # The stored gradient is consumed in place: a second backward through the same graph raises, never doubles.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Only the teacher asks for a gradient: backward runs and gives it none.
    teacher_only = dino_kernels.dino_loss(student.detach(), teacher, center)
    teacher_only.backward()
    assert teacher.grad is None
    # Called without the stored gradient, backward recomputes it.
    student.grad = None
    outputs = torch.ops.dino_kernels.dino_loss(student, teacher.detach(), center.detach(), 2, 0.1, 0.04, False)
    (outputs[0] * 2.0).backward()
    assert rel_error(student.grad, 2.0 * grad_ref) <= FP32


@pytest.mark.parametrize("backend,expected", [
    ("auto", {"cpp.dino_loss_cpu", "cpp.dino_loss_rescale_cpu_"}),
    ("cpu", {"cpp.dino_loss_cpu", "cpp.dino_loss_rescale_cpu_"}),
    ("reference", {"reference.dino_loss"}),
    pytest.param("triton", {"triton._dino_teacher_stats_kernel", "triton._dino_teacher_finalize_kernel",
                            "triton._dino_student_kernel", "triton._dino_loss_rescale_kernel"},
                 marks=requires_interpreter)])
def test_each_backend_runs_its_implementation(monkeypatch, backend, expected):
    """The backend switch picks the implementation of the forward and of the backward's rescale (all of them give
    the same values, so only this tells them apart): `auto` runs the C++ kernels on CPU tensors."""
    calls = implementations_run(dino_loss_module, monkeypatch)
    student, teacher, center = _inputs(40, 2, 3, 2, torch.float32)
    with dino_kernels.backend(backend):
        _ours(student, teacher, center, 2, 0.1, 0.04, 2.0)
    assert set(calls) == expected


def test_reference_backend_runs_the_reference():
    student, teacher, center = _inputs(50, 2, 4, 2, torch.float32)
    with dino_kernels.backend("reference"):
        loss, stats = dino_kernels.dino_loss(student, teacher, center, return_stats=True)
        with pytest.raises(ValueError, match="reference"):
            torch.ops.dino_kernels.dino_loss(student, teacher, center, 2, 0.1, 0.04, False)
    loss_ref, stats_ref = reference.dino_loss(student, teacher, center, return_stats=True)
    assert isinstance(stats, dino_kernels.DINOLossStats)
    assert torch.equal(loss, loss_ref) and all(torch.equal(a, b) for a, b in zip(stats, stats_ref))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    student, teacher, center = _inputs(33, 2, 3, 2, torch.float32)
    with dino_kernels.backend(backend):
        torch.library.opcheck(torch.ops.dino_kernels.dino_loss.default,
                              (student.requires_grad_(), teacher, center, 2, 0.1, 0.04, True))
        # Without the stored gradient and with a student that needs one: the backward recomputes it.
        torch.library.opcheck(torch.ops.dino_kernels.dino_loss.default,
                              (student, teacher.half(), center, 2, 0.1, 0.04, False))
        torch.library.opcheck(torch.ops.dino_kernels.dino_loss_rescale_.default,
                              (torch.randn(6, 33), torch.tensor(2.0), 0.5))


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_compile_fullgraph(device, dtype):
    student, teacher, center = _inputs(200, 2, 4, 2, dtype, device=device)

    def step(s, t, c):
        loss, stats = dino_kernels.dino_loss(s, t, c, n_global_crops=2, student_temp=0.1, teacher_temp=0.05,
                                             return_stats=True)
        return 3.0 * loss, stats.teacher_mean, stats.teacher_entropy

    compiled = torch.compile(step, fullgraph=True)
    s_compiled = student.clone().requires_grad_()
    loss, mean, entropy = compiled(s_compiled, teacher, center)
    loss.backward()
    s_eager = student.clone().requires_grad_()
    loss_eager, mean_eager, entropy_eager = step(s_eager, teacher, center)
    loss_eager.backward()
    assert torch.allclose(loss, loss_eager, rtol=1e-6)
    assert torch.allclose(mean, mean_eager) and torch.allclose(entropy, entropy_eager, rtol=1e-6)
    assert rel_error(s_compiled.grad, s_eager.grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_under_autocast(backend):
    torch.manual_seed(3)
    head = torch.nn.Linear(24, 130)
    features = torch.randn(4 * 2, 24)
    teacher = torch.randn(2 * 2, 130)
    center = torch.zeros(1, 130)
    dtype = torch.bfloat16 if backend == "auto" else torch.float16  # no bf16 in the Triton interpreter
    with dino_kernels.backend(backend), torch.autocast("cpu", dtype=dtype):
        logits = head(features)
        loss = dino_kernels.dino_loss(logits, teacher.to(dtype), center)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    # The same autocast forward with the eager reference loss (which computes in fp32, as softmax does under
    # autocast), differentiated in float64 from the bf16 logits.
    expected = _expected(logits.detach(), teacher.to(dtype), center, 2, 0.1, 0.04, 1.0)
    assert rel_error(loss, expected[0]) <= FP32
    weight_grad_ref = expected[1].T @ features.double()  # logits = features @ W^T + b
    assert rel_error(head.weight.grad, weight_grad_ref) <= 2 * TOLERANCE[dtype]


# ---------------------------------------------------------------------------------------------- center update
@pytest.mark.parametrize("center_shape", [(37,), (1, 37)])
@pytest.mark.parametrize("momentum", [0.0, 0.9, 1.0])
def test_update_center_matches_reference(center_shape, momentum):
    teacher = torch.randn(10, 37)
    center = torch.randn(center_shape)
    expected = center.double() * momentum + (1 - momentum) * teacher.double().mean(0).view(center_shape)
    from_logits, from_mean, ref = center.clone(), center.clone(), center.clone()
    dino_kernels.update_center_(from_logits, teacher, momentum)
    dino_kernels.update_center_(from_mean, teacher.mean(0), momentum)
    reference.update_center_(ref, teacher, momentum)
    for c in (from_logits, from_mean, ref):
        assert c.shape == center_shape
        assert rel_error(c, expected) <= FP32
    if momentum == 1.0:
        assert torch.equal(from_logits, center)


def test_update_center_with_stats_from_the_loss():
    student, teacher, center = _inputs(64, 3, 4, 2, torch.float16)
    _, stats = dino_kernels.dino_loss(student, teacher, center, return_stats=True)
    from_stats, from_logits = center.clone(), center.clone()
    dino_kernels.update_center_(from_stats, stats.teacher_mean)
    dino_kernels.update_center_(from_logits, teacher)
    assert rel_error(from_stats, from_logits) <= FP32


def _distributed_worker(rank, path, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        teacher = torch.randn(6, 11)
        center = torch.ones(11)
        from_logits, from_mean = center.clone(), center.clone()
        dino_kernels.update_center_(from_logits, teacher, 0.8)
        dino_kernels.update_center_(from_mean, teacher.mean(0), 0.8)
        torch.save({"teacher": teacher, "from_logits": from_logits, "from_mean": from_mean}, f"{results}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_update_center_all_reduces_across_ranks(tmp_path):
    out = run_two_ranks(_distributed_worker, tmp_path)
    batch_center = torch.cat([o["teacher"] for o in out]).double().mean(0)
    expected = 0.8 + 0.2 * batch_center
    for o in out:
        assert rel_error(o["from_logits"], expected) <= FP32
        assert rel_error(o["from_mean"], expected) <= FP32


# --------------------------------------------------------------------------------------------- DINOLoss module
# (G, L, student temperature, center momentum): the official values (G = 2 and 0.1, 0.9 are also the defaults of
# dino_loss and update_center_), and others, so that an argument the module fails to pass on changes the result.
@pytest.mark.parametrize("n_global,n_local,student_temp,center_momentum", [(2, 3, 0.1, 0.9), (1, 3, 0.15, 0.8)])
def test_dinoloss_module_schedule_and_center_updates(n_global, n_local, student_temp, center_momentum):
    k, batch = 50, 3
    module = dino_kernels.DINOLoss(k, n_global, n_local, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                   warmup_teacher_temp_epochs=3, n_epochs=5, student_temp=student_temp,
                                   center_momentum=center_momentum)
    official = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(2) * 0.07))
    assert module.teacher_temp_schedule == tuple(official.tolist())
    assert module.center.shape == (1, k) and "center" in module.state_dict()
    center = torch.zeros(1, k)
    for epoch in range(5):
        student, teacher, _ = _inputs(k, batch, n_global + n_local, n_global, torch.float32)
        expected = reference.dino_loss(student.double(), teacher.double(), center.double(), n_global_crops=n_global,
                                       student_temp=student_temp, teacher_temp=official[epoch])
        loss, stats = module(student, teacher, epoch, return_stats=True)
        assert rel_error(loss, expected) <= FP32
        reference.update_center_(center, teacher, center_momentum)  # the official update, after the loss
        assert rel_error(module.center, center) <= FP32
        assert module(student, teacher, epoch).shape == ()  # plain call: the loss alone (and one more update)
        reference.update_center_(center, teacher, center_momentum)


def test_dinoloss_module_bad_input():
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        dino_kernels.DINOLoss(10, 2, 2, 0.04, 0.04, 6, 5)
    with pytest.raises(TypeError, match="out_dim"):
        dino_kernels.DINOLoss(10.0, 2, 2, 0.04, 0.04, 0, 5)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_kernels.DINOLoss(10, 2, 2, 0.04, 0.0, 0, 5)
    module = dino_kernels.DINOLoss(10, 2, 2, 0.04, 0.04, 0, 5)
    with pytest.raises(ValueError, match="epoch"):
        module(torch.zeros(8, 10), torch.zeros(4, 10), 5)
    with pytest.raises(ValueError, match="student_output has 6 rows"):
        module(torch.zeros(6, 10), torch.zeros(4, 10), 0)


# --------------------------------------------------------------------------------------------------- bad input
def _call(student=(8, 10), teacher=(4, 10), center=(10,), **kwargs):
    make = lambda spec: spec if not isinstance(spec, tuple) else torch.zeros(spec)
    dino_kernels.dino_loss(make(student), make(teacher), make(center), **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(teacher=(4, 11)), ValueError, "K=11"),
        (dict(student=(7, 10)), ValueError, "not a multiple of the batch size B=2"),
        (dict(teacher=(5, 10)), ValueError, "not a multiple of n_global_crops=2"),
        (dict(center=(11,)), ValueError, r"center must have shape \(10,\) or \(1, 10\)"),
        (dict(center=(2, 10)), ValueError, "center must have shape"),
        (dict(student_temp=0.0), ValueError, "student_temp"),
        (dict(teacher_temp=-0.04), ValueError, "teacher_temp"),
        (dict(teacher_temp=float("nan")), ValueError, "teacher_temp"),
        (dict(student_temp="0.1"), TypeError, "student_temp"),
        (dict(student=torch.zeros(8, 10, dtype=torch.int64)), TypeError, "student_logits must have dtype"),
        (dict(teacher=torch.zeros(4, 10, dtype=torch.int32)), TypeError, "teacher_logits must have dtype"),
        (dict(center=torch.zeros(10, dtype=torch.bool)), TypeError, "center must have dtype"),
        (dict(student=(0, 10)), ValueError, "empty batch"),
        (dict(student=(8, 0), teacher=(4, 0), center=(0,)), ValueError, "empty batch"),
        (dict(teacher=(0, 10)), ValueError, "empty batch"),
        (dict(center=torch.zeros(10, device="meta")), ValueError, "center is on meta"),
        (dict(student=(80,)), ValueError, "student_logits must be 2-d"),
        (dict(teacher=(4, 10, 1)), ValueError, "teacher_logits must be 2-d"),
        (dict(n_global_crops=0), ValueError, "n_global_crops must be >= 1"),
        (dict(n_global_crops=2.0), TypeError, "n_global_crops must be an int"),
        (dict(student=(2, 10), teacher=(2, 10), n_global_crops=1), ValueError, "at least 2 crops"),
        (dict(student=(4, 10), teacher=(6, 10), n_global_crops=3), ValueError, "at least 2 crops"),
        (dict(student=[[0.0] * 10] * 8), TypeError, "student_logits must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


@requires_interpreter
def test_triton_rejects_float64_clearly():
    with dino_kernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        _call(student=torch.zeros(8, 10, dtype=torch.float64))


@pytest.mark.parametrize(
    "center,teacher,momentum,error,match",
    [
        ((10,), (4, 10), 1.5, ValueError, "momentum"),
        ((10,), (4, 11), 0.9, ValueError, "teacher_logits must be the logits"),
        ((2, 10), (4, 10), 0.9, ValueError, "center must have shape"),
        ((10,), (0, 10), 0.9, ValueError, "teacher_logits must be the logits"),
        ((10,), (4, 10, 1), 0.9, ValueError, "teacher_logits must be the logits"),
        (torch.zeros(10, dtype=torch.int64), (4, 10), 0.9, TypeError, "center must have dtype"),
    ],
)
def test_update_center_bad_input(center, teacher, momentum, error, match):
    make = lambda spec: spec if not isinstance(spec, tuple) else torch.zeros(spec)
    with pytest.raises(error, match=match):
        dino_kernels.update_center_(make(center), make(teacher), momentum)


@requires_interpreter
def test_launcher_configs_are_declared_for_aot(monkeypatch):
    """Every config the launchers pick is a declared one, the set `python -m dino_kernels._aot` compiles
    (tests/test_build.py): both student configs (K below and above the first one's BLOCK_K), the teacher passes and
    the rescale all launch under the triton backend (TritonKernel.launch raises on an undeclared config)."""
    launched = []
    for kernel in (dino_loss_module.TEACHER_STATS, dino_loss_module.TEACHER_FINALIZE, dino_loss_module.STUDENT,
                   dino_loss_module.RESCALE):
        launch = kernel.launch
        monkeypatch.setattr(kernel, "launch", lambda grid, config, _launch=launch, _kernel=kernel, **args: (
            launched.append((_kernel.name, id(config))), _launch(grid, config, **args)))
    small_k = dino_loss_module.STUDENT.configs[0]["BLOCK_K"]
    with dino_kernels.backend("triton"):
        for k in (small_k, small_k + 1):
            student, teacher, center = _inputs(k, 1, 2, 1, torch.float16)
            _ours(student, teacher, center, 1, 0.1, 0.04, 2.0)
    declared = {(kernel.name, id(config)) for kernel in (dino_loss_module.TEACHER_STATS,
                                                         dino_loss_module.TEACHER_FINALIZE, dino_loss_module.STUDENT,
                                                         dino_loss_module.RESCALE) for config in kernel.configs}
    assert set(launched) == declared
