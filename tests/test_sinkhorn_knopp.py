"""Sinkhorn-Knopp teacher targets and the DINO loss with SK centering against the official-style eager code in
float64, under our C++ kernels (`auto`) and our Triton kernels (interpreter), single-process and across 2 ranks."""

import importlib

import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    TOLERANCE,
    cuda_param,
    implementations_run,
    rel_error,
    requires_interpreter,
    run_two_ranks,
)

import dino_kernels
from dino_kernels import reference

sk = importlib.import_module("dino_kernels.sinkhorn_knopp")

FP32 = TOLERANCE[torch.float32]

# (N, K, τt, logit scale, iterations): N = 1, K = 1, odd K, K over the row kernel's BLOCK_K and over several column
# slices, N over the column kernel's BLOCK_ROWS, a sharp teacher (τt = 0.04, logits ±3: t/τt spans ±75) and 1 and 5
# iterations.
CASES = [(1, 5, 0.05, 1.0, 3), (7, 33, 0.1, 1.0, 1), (12, 2100, 0.04, 3.0, 3), (41, 257, 0.07, 1.0, 5),
         (3, 1, 0.1, 1.0, 2)]


def _expected_targets(teacher, teacher_temp, n_iterations, n_samples=None):
    """The reference targets in float64 of the same (dtype-rounded) logits, and each row's entropy."""
    p = reference.sinkhorn_knopp(teacher.double(), teacher_temp, n_iterations, n_samples=n_samples)
    return p, -torch.where(p > 0, p * torch.log(p), 0).sum(-1)


def _rebuild(teacher, targets, teacher_temp):
    """p from TeacherTargets by the documented formula (in float64: the exact maths of the stored scalings)."""
    shift, row_max, inv_norm = (t.double() for t in targets[:3])
    u = (teacher.double() - shift) * (1.0 / teacher_temp) - row_max[:, None]
    return torch.exp(u) * inv_norm[:, None], u


def _check_targets(teacher, teacher_temp, n_iterations, tolerance, **kwargs):
    expected, entropy = _expected_targets(teacher, teacher_temp, n_iterations, kwargs.get("n_samples"))
    p = sk.sinkhorn_knopp(teacher, teacher_temp, n_iterations, **kwargs)
    targets = sk.sinkhorn_knopp_targets(teacher, teacher_temp, n_iterations, **kwargs)
    acc = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    assert p.dtype == acc and p.shape == teacher.shape and not p.requires_grad
    assert all(t.dtype == acc for t in targets)
    assert targets.column_shift.shape == (teacher.shape[1],)
    assert all(t.shape == (teacher.shape[0],) for t in targets[1:])
    assert rel_error(p, expected) <= tolerance, rel_error(p, expected)
    rebuilt, u = _rebuild(teacher, targets, teacher_temp)
    # row_max makes every exp <= 1, up to the fp32 rounding of the Triton kernels' t/τt-sized terms
    assert (u.max(1).values <= 2e-7 * (1 + targets.row_max.double().abs())).all()
    assert rel_error(rebuilt, expected) <= tolerance, rel_error(rebuilt, expected)
    assert rel_error(targets.entropy, entropy) <= tolerance, rel_error(targets.entropy, entropy)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,teacher_temp,scale,n_iterations", CASES)
def test_matches_float64_reference(backend, dtype, n, k, teacher_temp, scale, n_iterations):
    teacher = (torch.randn(n, k) * scale).to(dtype)
    with dino_kernels.backend(backend):
        # fp32 results of exact inputs: the fp32 bound for every input dtype.
        _check_targets(teacher, teacher_temp, n_iterations, FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k,teacher_temp,scale,n_iterations", CASES[2:4])
def test_cpp_bfloat16_and_float64(dtype, n, k, teacher_temp, scale, n_iterations):
    # bf16 is broken in the Triton interpreter: the Triton bf16 kernels are proven by the sm_80/sm_90 AOT compile.
    teacher = (torch.randn(n, k) * scale).to(dtype)
    _check_targets(teacher, teacher_temp, n_iterations, TOLERANCE[torch.float64] if dtype == torch.float64 else FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_wide_logit_range_where_the_official_fp32_formula_overflows(backend):
    # t/τt from −100 to +100: exp overflows fp32 beyond 88.7, so the official fp32 code returns NaN, while the fp64
    # maths (and ours) is finite.
    teacher = torch.linspace(-4.0, 4.0, 24 * 37)[torch.randperm(24 * 37)].reshape(24, 37)
    assert not torch.isfinite(reference.sinkhorn_knopp(teacher, 0.04, 3)).all()
    with dino_kernels.backend(backend):
        _check_targets(teacher, 0.04, 3, FP32)
        # A global offset of the logits cancels in SK, also where t/τt ~ 2,500 overflows even the fp64 reference
        # (compared here on the same fp32 logits shifted back in fp64, where that is exact). The bound is looser:
        # the fp32 column shift, of size ~100, rounds by up to 2^-18 · 100 ≈ 4e-6, i.e. 1e-4 in t/τt.
        ours = sk.sinkhorn_knopp(teacher + 100.0, 0.04, 3)
    assert rel_error(ours, _expected_targets((teacher + 100.0).double() - 100.0, 0.04, 3)[0]) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_max_in_a_later_block(backend):
    # The row kernel's online max over blocks of 2048 columns: at τt = 1 the running max of a row rises by small
    # steps in later blocks, where the sums of the earlier blocks still count after each rebase.
    teacher = torch.randn(4, 4 * 2048 + 7)
    with dino_kernels.backend(backend):
        _check_targets(teacher, 1.0, 2, FP32)
        targets = sk.sinkhorn_knopp_targets(teacher, 1.0, 2)
    assert ((teacher - targets.column_shift).argmax(1) >= 2048).sum() >= 2


def test_cpp_more_rows_than_a_sum_block():
    # The C++ column sums run in blocks of 1024 rows (iBOT's patch rows can be thousands).
    _check_targets(torch.randn(2100, 9) * 2, 0.05, 2, FP32)


def test_cpp_sharp_teacher_at_dinov2_k():
    # DINOv2's K = 65,536 with a sharp teacher (τt = 0.04, logits spread ±3).
    teacher = torch.rand(6, 65_536) * 6 - 3
    _check_targets(teacher, 0.04, 3, FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_n_samples_is_honoured(backend):
    # The official n_samples scales intermediate values only: the reference's result, whatever it is.
    teacher = torch.randn(5, 21)
    with dino_kernels.backend(backend):
        for n_samples in (1, 5, 1000):
            _check_targets(teacher, 0.05, 3, FP32, n_samples=n_samples)


def test_non_contiguous_and_no_grad():
    teacher = torch.randn(40, 14).t().requires_grad_()  # (14, 40), column-major
    with torch.enable_grad():
        p = sk.sinkhorn_knopp(teacher, 0.07, 2)
    assert not p.requires_grad
    assert rel_error(p, _expected_targets(teacher.detach(), 0.07, 2)[0]) <= FP32


@pytest.mark.parametrize("backend,expected", [
    ("auto", {"cpp.sinkhorn_knopp_column_cpu_", "cpp.sinkhorn_knopp_row_cpu_", "cpp.sinkhorn_knopp_write_cpu"}),
    ("reference", {"reference.sinkhorn_knopp"}),
    pytest.param("triton", {"triton._sk_column_kernel", "triton._sk_row_kernel", "triton._sk_write_kernel"},
                 marks=requires_interpreter)])
def test_each_backend_runs_its_implementation(monkeypatch, backend, expected):
    calls = implementations_run(sk, monkeypatch)
    teacher = torch.randn(4, 30)
    with dino_kernels.backend(backend):
        p = sk.sinkhorn_knopp(teacher, 0.1, 2)
    assert set(calls) == expected
    assert rel_error(p, _expected_targets(teacher, 0.1, 2)[0]) <= FP32


def test_reference_backend():
    teacher = torch.randn(4, 30)
    with dino_kernels.backend("reference"):
        assert torch.equal(sk.sinkhorn_knopp(teacher, 0.1, 2, n_samples=3),
                           reference.sinkhorn_knopp(teacher, 0.1, 2, n_samples=3))
        with pytest.raises(ValueError, match="reference"):
            sk.sinkhorn_knopp_targets(teacher, 0.1, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    teacher = torch.randn(5, 33)
    with dino_kernels.backend(backend):
        torch.library.opcheck(torch.ops.dino_kernels.sinkhorn_knopp.default, (teacher, 0.05, 3))
        torch.library.opcheck(torch.ops.dino_kernels.sinkhorn_knopp_targets.default, (teacher.half(), 0.05, 2))


def test_torch_compile_fullgraph():
    teacher = torch.randn(5, 33)
    compiled = torch.compile(lambda t: sk.sinkhorn_knopp(t, 0.05, 3) * 2, fullgraph=True)
    assert rel_error(compiled(teacher), 2 * _expected_targets(teacher, 0.05, 3)[0]) <= FP32


# ------------------------------------------------------------------------------------- DINO loss with SK centering
def _loss_expected(student, teacher, center, n_global, teacher_temp, n_iterations, grad_output):
    s = student.detach().double().requires_grad_()
    loss, stats = reference.dino_loss(s, teacher.double(), center.double(), n_global_crops=n_global,
                                      teacher_temp=teacher_temp, centering="sinkhorn_knopp",
                                      sk_iterations=n_iterations, return_stats=True)
    (grad,) = torch.autograd.grad(loss * grad_output, s)
    return loss.detach(), grad, stats


def _loss_ours(student, teacher, center, n_global, teacher_temp, n_iterations, grad_output):
    student = student.detach().requires_grad_()
    loss, stats = dino_kernels.dino_loss(student, teacher, center, n_global_crops=n_global, teacher_temp=teacher_temp,
                                         centering="sinkhorn_knopp", sk_iterations=n_iterations, return_stats=True)
    (loss * grad_output).backward()
    return loss, student.grad, stats


def _assert_loss_matches(ours, expected, grad_tolerance):
    (loss, grad, stats), (loss_ref, grad_ref, stats_ref) = ours, expected
    assert rel_error(loss, loss_ref) <= FP32, rel_error(loss, loss_ref)
    assert rel_error(grad, grad_ref) <= grad_tolerance, rel_error(grad, grad_ref)
    for name, value, value_ref in zip(("mean", "entropy", "kl"), stats, stats_ref):
        assert rel_error(value, value_ref) <= FP32, (name, rel_error(value, value_ref))


# (K, B, crops S, global crops G, τt, logit scale): odd K, multi-block rows, B = 1, G = 1, a sharp teacher.
LOSS_CASES = [(7, 3, 4, 2, 0.04, 1.0), (1100, 2, 5, 1, 0.04, 3.0), (300, 1, 2, 2, 0.07, 1.0)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,batch,n_crops,n_global,teacher_temp,scale", LOSS_CASES)
def test_dino_loss_matches_float64_reference(backend, dtype, k, batch, n_crops, n_global, teacher_temp, scale):
    student = torch.randn(n_crops * batch, k).to(dtype)
    teacher = (torch.randn(n_global * batch, k) * scale).to(dtype)
    center = torch.randn(k)  # unused under SK centering
    args = (student, teacher, center, n_global, teacher_temp, 2, 1.7)
    with dino_kernels.backend(backend):
        ours = _loss_ours(*args)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    _assert_loss_matches(ours, _loss_expected(*args), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dino_loss_cpp_bfloat16_and_float64(dtype):
    student, teacher, center = torch.randn(12, 301).to(dtype), (torch.randn(6, 301) * 2).to(dtype), torch.zeros(301)
    args = (student, teacher, center, 2, 0.04, 3, 0.6)
    _assert_loss_matches(_loss_ours(*args), _loss_expected(*args), TOLERANCE[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dino_loss_center_is_unused_and_forward_only(backend):
    student, teacher = torch.randn(8, 50), torch.randn(4, 50)
    with dino_kernels.backend(backend):
        losses = [dino_kernels.dino_loss(student, teacher, c, centering="sinkhorn_knopp")
                  for c in (torch.zeros(50), torch.randn(50) * 5)]
    assert torch.equal(losses[0], losses[1])
    expected = reference.dino_loss(student.double(), teacher.double(), torch.zeros(50), centering="sinkhorn_knopp")
    assert rel_error(losses[0], expected) <= FP32
    # Softmax centering is a different loss: the switch is honoured.
    assert rel_error(dino_kernels.dino_loss(student, teacher, torch.zeros(50)), expected) > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dino_loss_opcheck(backend):
    student, teacher, center = torch.randn(6, 33).requires_grad_(), torch.randn(4, 33), torch.randn(33)
    with dino_kernels.backend(backend):
        torch.library.opcheck(torch.ops.dino_kernels.dino_loss.default,
                              (student, teacher, center, 2, 0.1, 0.04, True, 3))
        # Without the stored gradient: the backward recomputes it, SK included.
        torch.library.opcheck(torch.ops.dino_kernels.dino_loss.default,
                              (student, teacher.half(), center, 2, 0.1, 0.04, False, 2))


def test_dino_loss_reference_backend():
    student, teacher, center = torch.randn(6, 20), torch.randn(4, 20), torch.randn(20)
    kwargs = dict(centering="sinkhorn_knopp", sk_iterations=2, return_stats=True)
    with dino_kernels.backend("reference"):
        loss, stats = dino_kernels.dino_loss(student, teacher, center, **kwargs)
    loss_ref, stats_ref = reference.dino_loss(student, teacher, center, **kwargs)
    assert torch.equal(loss, loss_ref) and all(torch.equal(a, b) for a, b in zip(stats, stats_ref))


# ------------------------------------------------------------------------------------------------ 2 ranks
def _distributed_worker(rank, path, results, backend):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        teacher = torch.randn(6, 23) * 2  # this rank's G = 2 crops of B = 3 images
        student = torch.randn(12, 23).requires_grad_()  # 4 crops
        with dino_kernels.backend(backend):
            p = sk.sinkhorn_knopp(teacher, 0.05, 3)
            loss, stats = dino_kernels.dino_loss(student, teacher, torch.zeros(23), teacher_temp=0.05,
                                                 centering="sinkhorn_knopp", return_stats=True)
            loss.backward()
        torch.save({"teacher": teacher, "student": student.detach(), "p": p, "loss": loss.detach(),
                    "grad": student.grad, "entropy": stats.teacher_entropy}, f"{results}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _crop_major(tensors, n_crops):
    """The crop-major rows of the concatenated batch from each rank's crop-major rows."""
    return torch.cat([c for crop in zip(*(t.chunk(n_crops) for t in tensors)) for c in crop])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_ranks_give_the_concatenated_batch(tmp_path, backend):
    out = run_two_ranks(_distributed_worker, tmp_path, backend)
    # sinkhorn_knopp: each rank's rows of the SK targets of all the ranks' rows.
    expected = reference.sinkhorn_knopp(torch.cat([o["teacher"] for o in out]).double(), 0.05, 3)
    assert rel_error(torch.cat([o["p"] for o in out]), expected) <= FP32
    # dino_loss: the mean of the ranks' losses (and their entropies) is the loss of the whole batch, and each rank's
    # gradient is half that of its rows of the whole batch (its loss is a mean over half the images).
    student = _crop_major([o["student"] for o in out], 4).double().requires_grad_()
    loss, stats = reference.dino_loss(student, _crop_major([o["teacher"] for o in out], 2).double(), torch.zeros(23),
                                      teacher_temp=0.05, centering="sinkhorn_knopp", return_stats=True)
    loss.backward()
    assert rel_error((out[0]["loss"] + out[1]["loss"]) / 2, loss) <= FP32
    assert rel_error((out[0]["entropy"] + out[1]["entropy"]) / 2, stats[1]) <= FP32
    assert rel_error(_crop_major([o["grad"] for o in out], 4), student.grad * 2) <= FP32


# ---------------------------------------------------------------------------------------------- bad input
def _call(fn, teacher=(4, 10), teacher_temp=0.04, n_iterations=3, n_samples=None):
    teacher = torch.zeros(teacher) if isinstance(teacher, tuple) else teacher
    return fn(teacher, teacher_temp, n_iterations, n_samples=n_samples)


@pytest.mark.parametrize("fn", ["sinkhorn_knopp", "sinkhorn_knopp_targets"])
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(teacher=(40,)), ValueError, r"teacher_logits must be 2-d \(N, K\); got shape \(40,\)"),
        (dict(teacher=(0, 10)), ValueError, "N > 0 rows and K > 0 columns"),
        (dict(teacher=(4, 0)), ValueError, "N > 0 rows and K > 0 columns"),
        (dict(teacher=torch.zeros(4, 10, dtype=torch.int64)), TypeError, "teacher_logits must have dtype"),
        (dict(teacher=[[0.0] * 10] * 4), TypeError, "teacher_logits must be a torch.Tensor"),
        (dict(teacher_temp=0.0), ValueError, "teacher_temp"),
        (dict(teacher_temp=float("inf")), ValueError, "teacher_temp"),
        (dict(teacher_temp="0.04"), TypeError, "teacher_temp"),
        (dict(n_iterations=0), ValueError, "n_iterations must be >= 1; got 0"),
        (dict(n_iterations=3.0), TypeError, "n_iterations must be an int"),
        (dict(n_iterations=True), TypeError, "n_iterations must be an int"),
        (dict(n_samples=0), ValueError, "n_samples must be >= 1"),
        (dict(n_samples=2.5), TypeError, "n_samples must be an int"),
    ],
)
def test_bad_input(kwargs, error, match, fn):
    with pytest.raises(error, match=match):
        _call(getattr(sk, fn), **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(centering="center"), ValueError, "centering must be one of 'softmax', 'sinkhorn_knopp'; got 'center'"),
        (dict(centering="sinkhorn_knopp", sk_iterations=0), ValueError, "sk_iterations must be >= 1"),
        (dict(centering="sinkhorn_knopp", sk_iterations=2.0), TypeError, "sk_iterations must be an int"),
    ],
)
def test_dino_loss_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        dino_kernels.dino_loss(torch.zeros(8, 10), torch.zeros(4, 10), torch.zeros(10), **kwargs)


@requires_interpreter
def test_triton_rejects_float64_clearly():
    with dino_kernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        _call(sk.sinkhorn_knopp, torch.zeros(4, 10, dtype=torch.float64))


def test_cpp_checks_its_arguments():
    from dino_kernels._extension import ops

    teacher, shift, rows = torch.zeros(4, 10), torch.zeros(10), torch.zeros(4)
    with pytest.raises(RuntimeError, match="column_shift"):
        ops().sinkhorn_knopp_column_cpu_(teacher, torch.zeros(9), rows, rows, 0.1)
    with pytest.raises(RuntimeError, match="row scalings"):
        ops().sinkhorn_knopp_write_cpu(teacher, shift, rows.double(), rows, 0.1)


# --------------------------------------------------------------------------------------------------- AOT
@requires_interpreter
def test_aot_examples_cover_every_launch(monkeypatch):
    """aot_examples(), which tests/test_build.py compiles for sm_80 and sm_90, launches the kernels of every SK
    call (the declared configs, the argument types) in fp32 and fp16: the sinkhorn_knopp op and dino_loss with SK."""
    from dino_kernels._launch import recording

    def signature(kernel, args, config):
        return kernel.name, id(config), tuple(sorted((n, str(v.dtype) if isinstance(v, torch.Tensor) else
                                                      type(v).__name__) for n, v in args.items()))

    with recording() as examples:
        sk.aot_examples()
    with dino_kernels.backend("triton"), recording() as launched:
        for dtype in (torch.float32, torch.float16):
            sk._sinkhorn_knopp_forward(torch.randn(3, 50).to(dtype), 0.1, 2)
    assert {signature(*call) for call in launched} <= {signature(*call) for call in examples}
    assert {(k.name, id(c)) for k, _, c in examples} == {(k.name, id(c)) for k in (sk.COLUMN, sk.ROW, sk.WRITE)
                                                         for c in k.configs}


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,teacher_temp,scale,n_iterations", [*CASES, (256, 65_536, 0.04, 3.0, 3)])
def test_cuda_matches_float64_reference(backend, dtype, n, k, teacher_temp, scale, n_iterations):
    teacher = (torch.randn(n, k, device="cuda") * scale).to(dtype)
    with dino_kernels.backend(backend):
        _check_targets_cuda(teacher, teacher_temp, n_iterations)


def _check_targets_cuda(teacher, teacher_temp, n_iterations):
    expected, entropy = _expected_targets(teacher.cpu(), teacher_temp, n_iterations)
    p = sk.sinkhorn_knopp(teacher, teacher_temp, n_iterations)
    targets = sk.sinkhorn_knopp_targets(teacher, teacher_temp, n_iterations)
    assert p.device == teacher.device
    assert rel_error(p.cpu(), expected) <= FP32
    assert rel_error(targets.entropy.cpu(), entropy) <= FP32


@pytest.mark.parametrize("dtype", [cuda_param(d) for d in (torch.float32, torch.float16, torch.bfloat16)])
def test_cuda_dino_loss_matches_float64_reference(dtype):
    student = torch.randn(10 * 4, 4097, device="cuda").to(dtype)
    teacher = (torch.randn(2 * 4, 4097, device="cuda") * 3).to(dtype)
    center = torch.zeros(4097, device="cuda")
    args = (student, teacher, center, 2, 0.04, 3, 1.7)
    ours = _loss_ours(*args)
    expected = _loss_expected(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    _assert_loss_matches(tuple(x.cpu() if isinstance(x, torch.Tensor) else type(x)(*(s.cpu() for s in x))
                               for x in ours), expected, TOLERANCE[dtype])
    torch.library.opcheck(torch.ops.dino_kernels.sinkhorn_knopp.default, (teacher, 0.04, 3))
