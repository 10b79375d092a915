"""The fused KoLeo loss against DINOv2's formula in float64 (dino_kernels.reference.koleo_loss): loss, gradient
(grad_output != 1), neighbour choice on ties and degenerate rows, under our C++ kernels (`auto`) and our Triton
kernels (interpreter)."""

import importlib
import math

import pytest
import torch
from conftest import CPU_BACKENDS, TOLERANCE, cuda_param, implementations_run, rel_error, requires_interpreter

import dino_kernels
from dino_kernels import reference

koleo = importlib.import_module("dino_kernels.koleo")
koleo_loss = koleo.koleo_loss

FP32 = TOLERANCE[torch.float32]
# (B, D): B = 1 (a row is its own neighbour), 2, 3, 37 rows; D = 1 (every z is ±1: exact ties), 5, 130.
SHAPES = [(1, 5), (2, 1), (2, 5), (3, 130), (37, 1), (37, 5), (37, 130)]


def _pinned_reference(features: torch.Tensor, neighbours: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """reference.koleo_loss in float64 with the neighbours given instead of searched (for rows whose neighbour is
    ambiguous within rounding); test_pinned_reference_is_the_reference ties it to the reference."""
    z = torch.nn.functional.normalize(features.double(), p=2, dim=-1, eps=eps)
    return -torch.log(torch.linalg.vector_norm(z - z[neighbours] + 1e-8, dim=-1) + eps).mean()


def _reference_neighbours(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The reference's neighbour choice, in float64."""
    z = torch.nn.functional.normalize(features.double(), p=2, dim=-1, eps=eps)
    dots = z @ z.t()
    dots.fill_diagonal_(-1)
    return dots.argmax(dim=1)


def _assert_reference_neighbours(neighbours, features):
    """Ours are the float64 reference's choice, except where the reference took another copy of the same row (its
    float64 matmul may round equal columns apart, by ~1e-16): ours is then the lowest copy, the documented tie rule."""
    expected = _reference_neighbours(features)
    differ = neighbours != expected
    assert torch.equal(features[neighbours[differ]], features[expected[differ]])
    assert (neighbours[differ] < expected[differ]).all()


def _expected(features, grad_output, eps=1e-8, neighbours=None):
    """Loss and d(grad_output * loss)/d(features) in float64: the reference, or with pinned neighbours."""
    x = features.detach().double().requires_grad_()
    loss = reference.koleo_loss(x, eps=eps) if neighbours is None else _pinned_reference(x, neighbours, eps)
    (grad,) = torch.autograd.grad(loss * grad_output, x)
    return loss.detach(), grad


def _ours(features, grad_output, eps=1e-8):
    x = features.detach().clone().requires_grad_()
    loss = koleo_loss(x, eps=eps)
    (loss * grad_output).backward()
    return loss, x.grad


def _neighbours(features, eps=1e-8):
    return torch.ops.dino_kernels.koleo(features, eps)[1]


def _assert_matches(ours, expected, grad_tolerance, tolerance=FP32):
    (loss, grad), (loss_ref, grad_ref) = ours, expected
    assert rel_error(loss, loss_ref) <= tolerance, (loss, loss_ref)
    assert rel_error(grad, grad_ref) <= grad_tolerance, rel_error(grad, grad_ref)


def _assert_matches_with_duplicate_pair(ours, expected, pair, grad_tolerance):
    """A duplicate pair's own terms (~1e13 at d = ‖1e-8‖) cancel exactly, their distances being equal: ours gives
    the pair's rows only the other rows' terms, the float64 reference a residue of ~2^-52 of them, ~2e-3, besides."""
    (loss, grad), (loss_ref, grad_ref) = ours, expected
    others = torch.ones(grad.shape[0], dtype=torch.bool)
    others[pair] = False
    assert rel_error(loss, loss_ref) <= FP32
    assert rel_error(grad[others], grad_ref[others]) <= grad_tolerance
    assert torch.allclose(grad[~others].double(), grad_ref[~others], rtol=0, atol=1e-2)


def test_pinned_reference_is_the_reference():
    x = torch.randn(9, 7, dtype=torch.float64)
    assert torch.equal(_pinned_reference(x, _reference_neighbours(x)), reference.koleo_loss(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,dim", SHAPES)
def test_matches_float64_reference(backend, dtype, batch, dim):
    features = torch.randn(batch, dim).to(dtype)
    grad_output = 0.5 + 2.5 * torch.rand(()).item()
    loss_ref, grad_ref = _expected(features, grad_output)
    with dino_kernels.backend(backend):
        neighbours = _neighbours(features)
        loss, grad = _ours(features, grad_output)
    _assert_reference_neighbours(neighbours, features)  # random rows: no near-ties at these seeds
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == features.shape
    assert rel_error(loss, loss_ref) <= FP32, (loss, loss_ref)
    if batch == 1 or dim == 1:
        # The loss is constant in the features there (B = 1: ‖z − z + 1e-8‖; D = 1: z = ±1): the reference's
        # gradient is float64 rounding noise, ours exactly 0.
        assert grad_ref.abs().max() <= 1e-6 and torch.count_nonzero(grad) == 0
    else:
        assert rel_error(grad, grad_ref) <= TOLERANCE[dtype], rel_error(grad, grad_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,dim", [(2, 5), (37, 130), (64, 33)])
def test_cpp_bfloat16_and_float64(dtype, batch, dim):
    # bf16 is broken in the Triton interpreter: the Triton bf16 launches are proven by the sm_80/sm_90 AOT compile.
    features = torch.randn(batch, dim).to(dtype)
    expected = _expected(features, 1.7)
    ours = _ours(features, 1.7)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours[1].dtype == dtype
    _assert_matches(ours, expected, TOLERANCE[dtype], TOLERANCE[torch.float64] if dtype == torch.float64 else FP32)


def test_cpp_search_across_tasks_panels_and_threads():
    """The C++ sweep computes each dot of the upper triangle once, in tasks of 16 rows against panels of 32 columns
    handed out to up to 3 threads here (one per 2^23 dots x D), and merges the threads' running bests: copies in
    different tasks and panels still tie to the lowest index, and the result does not depend on the thread count."""
    features = torch.randn(1030, 50)
    features[500] = features[3]
    features[1027] = features[3]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((_neighbours(features), *_ours(features, 1.1)))
    finally:
        torch.set_num_threads(threads)
    neighbours, loss, grad = results[0]
    assert neighbours[3] == 500 and neighbours[500] == 3 and neighbours[1027] == 3
    _assert_reference_neighbours(neighbours, features)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    _assert_matches((loss, grad), _expected(features, 1.1, neighbours=neighbours), FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_ties_go_to_the_lowest_index(backend):
    """Rows whose cosines are exact in any arithmetic (multiples of unit vectors): duplicates (rows 0, 2, 3), a row
    tied between two others (row 4 between 1 and 6), a row tied at cosine 0 with five others (row 5), and antipodes
    against the diagonal's −1."""
    e = torch.eye(3)
    features = torch.stack([2 * e[0], e[1], 3 * e[0], 5 * e[0], e[1] + e[2], -e[2], 0.5 * e[1]])
    expected_neighbours = torch.tensor([2, 6, 0, 0, 1, 0, 1])
    assert torch.equal(_reference_neighbours(features), expected_neighbours)
    antipodes = torch.stack([e[0], -e[0]])  # row 0: [−1 (itself), −1] -> itself; row 1: [−1, −1 (itself)] -> 0
    assert torch.equal(_reference_neighbours(antipodes), torch.tensor([0, 0]))
    with dino_kernels.backend(backend):
        assert torch.equal(_neighbours(features), expected_neighbours)
        _assert_matches(_ours(features, 0.8), _expected(features, 0.8), FP32)
        assert torch.equal(_neighbours(antipodes), torch.tensor([0, 0]))
        loss, grad = _ours(antipodes, 0.8)
    loss_ref, grad_ref = _expected(antipodes, 0.8)
    assert rel_error(loss, loss_ref) <= FP32
    # The gradient is only the 1e-8 shift's, 1e-9 here: the float64 reference carries a rounding residue of
    # 2^-29 ≈ 1.9e-9 from row 0's cancelling self terms (~8.6e6 each), which ours skips.
    assert torch.allclose(grad.double(), grad_ref, rtol=0, atol=2e-9) and grad.abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_duplicate_zero_and_tiny_rows(backend, dtype):
    """Exact duplicates (the distance is ‖1e-8‖); in fp32 three copies (the ties go to the lowest copy), a zero row
    (z = 0) and a row below eps (the clamp holds its norm at eps, so its gradient skips the projection). fp16 gets a
    pair only: the gradients of the others (~1e5 to 1e7) are beyond its range, in the reference too."""
    features = torch.randn(9, 21)
    features[4] = features[1]
    if dtype == torch.float32:
        features[7] = features[1]
        features[2] = 0.0
        features[5] *= 1e-10
    features = features.to(dtype)
    with dino_kernels.backend(backend):
        neighbours = _neighbours(features)
        ours = _ours(features, 1.3)
    assert neighbours[1] == 4 and neighbours[4] == 1 and (dtype == torch.float16 or neighbours[7] == 1)
    _assert_reference_neighbours(neighbours, features)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    if dtype == torch.float32:
        _assert_matches(ours, _expected(features, 1.3), FP32)
        return
    _assert_matches_with_duplicate_pair(ours, _expected(features, 1.3), [1, 4], TOLERANCE[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_neighbour_ambiguous_within_rounding(backend):
    """Rows 1 and 2 mirror each other about row 0's direction: both are at the same cosine from row 0 in exact
    arithmetic, so rounding decides. Either choice is right; the loss (equal distances) matches the reference, and
    the gradient matches the reference formula with our choice pinned."""
    torch.manual_seed(1)
    base = torch.randn(11, 16)
    along, across = base[0] / base[0].norm(), base[1] - (base[1] @ base[0]) * base[0] / base[0].norm() ** 2
    base[1], base[2] = 3 * along + 0.5 * across, 3 * along - 0.5 * across
    with dino_kernels.backend(backend):
        neighbours = _neighbours(base)
        ours = _ours(base, 2.1)
    assert neighbours[0] in (1, 2)
    assert rel_error(ours[0], _expected(base, 2.1)[0]) <= FP32
    _assert_matches(ours, _expected(base, 2.1, neighbours=neighbours), FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float16_features_stay_finite_where_the_official_fp16_loss_is_infinite(backend):
    """The official module in fp16: a duplicate's distance ‖0 + 1e-8‖ and eps underflow to 0, log(0) = −inf. Ours
    computes in fp32 and matches the reference."""
    features = torch.randn(6, 32).half()
    features[3] = features[0]
    z = torch.nn.functional.normalize(features, eps=1e-8)  # the official KoLeoLoss, in the input dtype
    dots = z @ z.t()
    dots.fill_diagonal_(-1)
    official = -torch.log(torch.nn.functional.pairwise_distance(z, z[dots.argmax(dim=1)], 2, eps=1e-8) + 1e-8).mean()
    assert official.isinf()
    with dino_kernels.backend(backend):
        ours = _ours(features, 1.0)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    _assert_matches_with_duplicate_pair(ours, _expected(features, 1.0), [0, 3], TOLERANCE[torch.float16])


@requires_interpreter
def test_triton_multi_block_paths(monkeypatch):
    """Small blocks make every loop of the Triton kernels take several steps on interpreter-sized inputs: D chunks
    of the normalisation, the distances and the backward, column blocks, D steps and column splits of the neighbour
    search (the winning neighbours sit in different splits)."""
    monkeypatch.setattr(koleo.NORMALISE, "configs", ({"BLOCK_ROWS": 4, "BLOCK_D": 16, "num_warps": 1},))
    monkeypatch.setattr(koleo.NEIGHBOUR, "configs", ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1,
                                                      "num_stages": 1},))
    monkeypatch.setattr(koleo.DISTANCE, "configs", ({"BLOCK_ROWS": 4, "BLOCK_D": 16, "num_warps": 1},))
    monkeypatch.setattr(koleo.BACKWARD, "configs", ({"BLOCK_D": 16, "num_warps": 1},))
    monkeypatch.setattr(koleo, "_TARGET_PROGRAMS", 6)  # 3 row blocks x 2 splits of the 3 column blocks
    features = torch.randn(37, 50)
    features[30] = features[3] + 0.01 * torch.randn(50)  # neighbours across splits, both ways
    features[20] = features[36]  # a duplicate pair in the last split, one of them in the last row block
    assert koleo._splits(37) == (3, 2, 2)
    with dino_kernels.backend("triton"):
        neighbours = _neighbours(features)
        ours = _ours(features, 1.9)
    assert neighbours[4] == 20  # nearest to the copies 20 and 36, where the reference's float64 matmul takes 36
    _assert_reference_neighbours(neighbours, features)
    _assert_matches_with_duplicate_pair(ours, _expected(features, 1.9, neighbours=neighbours), [20, 36], FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_features_and_eps(backend):
    wide = torch.randn(13, 2 * 40)
    features = wide[:, 1::2]  # a strided view
    features[4] *= 1e-4  # below eps = 1e-3: clamped
    with dino_kernels.backend(backend):
        ours = _ours(features, 0.6, eps=1e-3)
    _assert_matches(ours, _expected(features.contiguous(), 0.6, eps=1e-3), FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_only_and_gradient_flags(backend):
    features = torch.randn(10, 12)
    with dino_kernels.backend(backend):
        with torch.no_grad():
            loss = koleo_loss(features.clone().requires_grad_())
        assert not loss.requires_grad
        loss_grad, _ = _ours(features, 1.0)
    assert torch.equal(loss, loss_grad.detach())


@pytest.mark.parametrize("backend,expected", [
    ("auto", {"cpp.koleo_cpu", "cpp.koleo_backward_cpu"}),
    ("cpu", {"cpp.koleo_cpu", "cpp.koleo_backward_cpu"}),
    ("reference", {"reference.koleo_loss"}),
    pytest.param("triton", {"triton._koleo_normalise_kernel", "triton._koleo_neighbour_kernel",
                            "triton._koleo_distance_kernel", "triton._koleo_backward_kernel"},
                 marks=requires_interpreter)])
def test_each_backend_runs_its_implementation(monkeypatch, backend, expected):
    calls = implementations_run(koleo, monkeypatch)
    with dino_kernels.backend(backend):
        _ours(torch.randn(5, 8), 1.5)
    assert set(calls) == expected


def test_reference_backend_runs_the_reference():
    features = torch.randn(6, 10)
    with dino_kernels.backend("reference"):
        assert torch.equal(koleo_loss(features), reference.koleo_loss(features))
        with pytest.raises(ValueError, match="reference"):
            torch.ops.dino_kernels.koleo(features, 1e-8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    features = torch.randn(7, 9)
    with dino_kernels.backend(backend):
        torch.library.opcheck(torch.ops.dino_kernels.koleo.default, (features.requires_grad_(), 1e-8))
        outputs = torch.ops.dino_kernels.koleo(features.detach(), 1e-8)
        torch.library.opcheck(torch.ops.dino_kernels.koleo_backward.default,
                              (torch.tensor(1.5), features.detach().half(), outputs[4], *outputs[1:4], 1e-8))


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_compile_fullgraph(device, dtype):
    features = torch.randn(12, 24, device=device).to(dtype)

    def step(x):
        return 0.1 * koleo_loss(x[:6]) + 0.1 * koleo_loss(x[6:])  # DINOv2: one term per global-crop chunk

    compiled = torch.compile(step, fullgraph=True)
    x_compiled = features.clone().requires_grad_()
    loss = compiled(x_compiled)
    loss.backward()
    x_eager = features.clone().requires_grad_()
    loss_eager = step(x_eager)
    loss_eager.backward()
    assert torch.allclose(loss, loss_eager, rtol=1e-6)
    assert rel_error(x_compiled.grad, x_eager.grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    "features,eps,error,match",
    [
        ([[1.0, 2.0]], 1e-8, TypeError, "features must be a torch.Tensor"),
        (torch.zeros(4, 3, dtype=torch.int64), 1e-8, TypeError, "features must have dtype"),
        (torch.zeros(4), 1e-8, ValueError, r"features must be 2-d \(B, D\); got shape \(4,\)"),
        (torch.zeros(2, 4, 3), 1e-8, ValueError, "features must be 2-d"),
        (torch.zeros(0, 3), 1e-8, ValueError, r"B >= 1 rows and D >= 1 columns; got shape \(0, 3\)"),
        (torch.zeros(3, 0), 1e-8, ValueError, r"got shape \(3, 0\)"),
        (torch.zeros(3, 4), 0.0, ValueError, "eps must be a finite number > 0"),
        (torch.zeros(3, 4), -1e-8, ValueError, "eps"),
        (torch.zeros(3, 4), float("nan"), ValueError, "eps"),
        (torch.zeros(3, 4), float("inf"), ValueError, "eps"),
        (torch.zeros(3, 4), "1e-8", TypeError, "eps must be a float"),
    ],
)
def test_bad_input(features, eps, error, match):
    with pytest.raises(error, match=match):
        koleo_loss(features, eps=eps)


@requires_interpreter
def test_triton_rejects_float64_clearly():
    with dino_kernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        koleo_loss(torch.zeros(3, 4, dtype=torch.float64))


def test_aot_examples_launch_every_declared_config():
    """What `python -m dino_kernels._aot` compiles for this module (tests/test_build.py runs that compile for sm_80
    and sm_90): aot_examples() launches every declared config, and the kernels that read the features or write the
    gradient for each Triton dtype."""
    from dino_kernels._launch import recording

    with recording() as launches:
        koleo.aot_examples()
    kernels = (koleo.NORMALISE, koleo.NEIGHBOUR, koleo.DISTANCE, koleo.BACKWARD)
    assert {(k.name, id(c)) for k, _, c in launches} == {(k.name, id(c)) for k in kernels for c in k.configs}
    typed = {(k.name, args.get("x_ptr", args.get("grad_ptr")).dtype) for k, args, _ in launches
             if "x_ptr" in args or "grad_ptr" in args}
    assert typed == {(name, dtype) for name in ("_koleo_normalise_kernel", "_koleo_backward_kernel")
                     for dtype in (torch.float32, torch.float16, torch.bfloat16)}


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,dim", SHAPES + [(128, 384), (1024, 1536), (300, 1000)])
def test_cuda_matches_float64_reference(dtype, batch, dim):
    features = torch.randn(batch, dim, device="cuda").to(dtype)
    if batch >= 37 and dim > 1:
        features[batch - 1] = features[5]  # three copies: ties to the lowest index across tiles and splits
        features[batch // 2] = features[5]
    loss_ref, grad_ref = _expected(features, 1.7)
    neighbours = _neighbours(features)
    loss, grad = _ours(features, 1.7)
    # Where ours differs from the reference's choice (copies, near-ties), both are within rounding of the best
    # cosine; the loss and gradient match the reference with our choice pinned.
    reference_neighbours = _reference_neighbours(features)
    differ = (neighbours != reference_neighbours).nonzero().flatten()
    z = torch.nn.functional.normalize(features.double(), eps=1e-8)
    gap = (z[differ] * (z[reference_neighbours[differ]] - z[neighbours[differ]])).sum(-1)
    assert (gap.abs() <= 1e-6).all(), gap
    assert rel_error(loss, loss_ref) <= FP32
    if batch >= 37 and dim > 1:
        assert neighbours[5] == batch // 2 and neighbours[batch - 1] == 5 and neighbours[batch // 2] == 5
    if batch > 1 and dim > 1:
        pinned_loss, pinned_grad = _expected(features, 1.7, neighbours=neighbours)
        copies = torch.tensor([5, batch // 2, batch - 1] if batch >= 37 else [], dtype=torch.long)
        others = torch.ones(batch, dtype=torch.bool)
        others[copies] = False
        # Large fp16 batches have gradients of ~1e-6, subnormal in fp16, where rounding the exact value alone costs
        # up to ~1e-2: flash-attn's rule, at most twice the error of the float64 gradient rounded to the dtype.
        rounding = rel_error(pinned_grad[others].to(dtype), pinned_grad[others])
        _assert_matches((loss, grad[others]), (pinned_loss, pinned_grad[others]), max(TOLERANCE[dtype], 2 * rounding))
        # The copies' rows carry terms of ~1 / ‖1e-8‖: they cancel for the pair that are each other's neighbours
        # (to 0 in float64, to a residue of fp32 rounding of those terms in ours) and stay for the third copy,
        # which in fp16 can be past the largest finite value: there ours must be the rounded float64 value, ±inf.
        if len(copies):
            expected = pinned_grad[copies].to(dtype)
            finite = expected.isfinite()
            assert torch.equal(grad[copies][~finite], expected[~finite])
            huge = pinned_grad[copies].abs().max().item()
            assert torch.allclose(grad[copies][finite].double(), pinned_grad[copies][finite],
                                  rtol=TOLERANCE[dtype], atol=huge * 2**-20)
    else:  # a loss constant in the features
        assert torch.count_nonzero(grad) == 0
    torch.library.opcheck(torch.ops.dino_kernels.koleo.default, (features[:64].detach().requires_grad_(), 1e-8))


@pytest.mark.cuda
def test_cuda_matches_cpp():
    features = torch.randn(200, 96)
    on_cpu = _ours(features, 0.9)
    on_gpu = _ours(features.cuda(), 0.9)
    assert math.isclose(on_cpu[0].item(), on_gpu[0].item(), rel_tol=FP32)
    assert rel_error(on_gpu[1].cpu(), on_cpu[1]) <= FP32
