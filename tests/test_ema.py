import pytest
import torch
from conftest import CPU_BACKENDS, TOLERANCE, cuda_param, implementations_run, rel_error, requires_interpreter

import dino_kernels
from dino_kernels import _extension, reference
from dino_kernels import ema as ema_module

SHAPES = [(1,), (7,), (1000, 37), (3, 5, 7, 11), (65_537,)]


def _expected(teacher, student, momentum):
    """The EMA in float64 from the same (rounded) inputs."""
    return [momentum * t.double() + (1.0 - momentum) * s.double() for t, s in zip(teacher, student)]


def _make(shapes, teacher_dtype, student_dtype):
    teacher = [torch.randn(shape).to(teacher_dtype) for shape in shapes]
    student = [torch.randn(shape).to(student_dtype) for shape in shapes]
    return teacher, student


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.996, 0.5123])
@pytest.mark.parametrize(
    "teacher_dtype,student_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
     (torch.float16, torch.float16), (torch.float16, torch.float32)],
)
def test_ema_matches_float64(backend, momentum, teacher_dtype, student_dtype):
    teacher, student = _make(SHAPES, teacher_dtype, student_dtype)
    expected = _expected(teacher, student, momentum)
    with dino_kernels.backend(backend):
        dino_kernels.ema_(teacher, student, momentum)
    for t, e in zip(teacher, expected):
        assert t.dtype == teacher_dtype
        # One rounding to the teacher's dtype on top of fp32 math.
        assert rel_error(t, e) <= TOLERANCE[teacher_dtype], (t.shape, rel_error(t, e))
    if momentum == 1.0:
        # m = 1 leaves the teacher bit-identical.
        assert all(torch.equal(t, e.to(teacher_dtype)) for t, e in zip(teacher, expected))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ema_float64_teacher_is_exact(backend):
    teacher, student = _make(SHAPES, torch.float64, torch.float32)
    expected = _expected(teacher, student, 0.996)
    with dino_kernels.backend(backend):
        dino_kernels.ema_(teacher, student, 0.996)
    for t, e in zip(teacher, expected):
        assert rel_error(t, e) <= 1e-15


def test_ema_bfloat16_teacher_cpp():
    # bf16 is broken in the Triton interpreter: the Triton bf16 configs are proven by the sm_80/sm_90 AOT compile.
    teacher, student = _make(SHAPES, torch.bfloat16, torch.bfloat16)
    expected = _expected(teacher, student, 0.9)
    dino_kernels.ema_(teacher, student, 0.9)
    for t, e in zip(teacher, expected):
        assert rel_error(t, e) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ema_on_parameters_views_and_offsets(backend):
    """nn.Parameter lists as DINO passes them, plus views that start at odd element offsets (unaligned)."""
    torch.manual_seed(1)
    student_model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    teacher_model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    big_t, big_s = torch.randn(10_001), torch.randn(10_001)
    big_t_before, big_s_before = big_t.clone(), big_s.clone()
    teacher = list(teacher_model.parameters()) + [big_t[3:9_997], big_t[1:2]]
    student = list(student_model.parameters()) + [big_s[5:9_999], big_s[2:3]]
    expected = _expected(teacher, student, 0.99)
    with dino_kernels.backend(backend):
        dino_kernels.ema_(teacher, student, 0.99)  # grad mode on: the op runs under no_grad itself
    for t, e in zip(teacher, expected):
        assert rel_error(t.detach(), e) <= TOLERANCE[torch.float32]
    # Every element of big_t outside the two views keeps its value (a tail mask one element too wide would write
    # big_t[2] and big_t[9_997]), and the students are only read.
    outside = torch.ones(10_001, dtype=torch.bool)
    outside[1:2] = outside[3:9_997] = False
    assert torch.equal(big_t[outside], big_t_before[outside])
    assert torch.equal(big_s, big_s_before)


def _views_with_gaps(buffer, sizes, gap):
    """Views of ``buffer`` of the given sizes, one after another with ``gap`` elements between them (and before the
    first and after the last), and the mask of the elements that belong to no view."""
    views, outside, start = [], torch.ones(buffer.numel(), dtype=torch.bool), gap
    for n in sizes:
        views.append(buffer[start:start + n])
        outside[start:start + n] = False
        start += n + gap
    assert start <= buffer.numel()
    return views, outside


# Sizes around the chunk boundaries of the Triton (16,384 elements) and C++ (32,768) kernels, a 1-element tensor,
# and odd sizes, so that every kind of last chunk is a partial one.
GUARDED_SIZES = [1, 7, 1_000, 16_383, 16_384, 16_385, 32_769, 3]


@pytest.mark.parametrize("backend,device", [(b, "cpu") for b in CPU_BACKENDS]
                         + [cuda_param("cuda", "cuda"), cuda_param("triton", "cuda")])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16])
def test_ema_writes_nothing_outside_the_teachers(backend, device, teacher_dtype):
    """Teachers and students are views into one buffer each, with guard elements between and around them: every
    view gets the EMA, and every element outside the views keeps its value bit for bit."""
    if backend == "cuda" and not _extension.cuda_kernels_compiled():
        pytest.skip("the extension was built without nvcc: no CUDA C++ EMA kernel")
    size = sum(GUARDED_SIZES) + 5 * (len(GUARDED_SIZES) + 1)
    teacher_buffer = torch.randn(size, device=device).to(teacher_dtype)
    student_buffer = torch.randn(size, device=device)
    teacher_before, student_before = teacher_buffer.clone(), student_buffer.clone()
    teacher, outside = _views_with_gaps(teacher_buffer, GUARDED_SIZES, gap=5)
    student, _ = _views_with_gaps(student_buffer, GUARDED_SIZES, gap=5)
    expected = _expected(teacher, student, 0.9)
    with dino_kernels.backend(backend):
        dino_kernels.ema_(teacher, student, 0.9)
    for t, e in zip(teacher, expected):
        assert rel_error(t, e) <= TOLERANCE[teacher_dtype], (t.numel(), rel_error(t, e))
    outside = outside.to(device)
    assert torch.equal(teacher_buffer[outside], teacher_before[outside])
    assert torch.equal(student_buffer, student_before)


@pytest.mark.parametrize("backend,expected", [
    ("auto", {"cpp.ema_cpu_"}), ("cpu", {"cpp.ema_cpu_"}), ("reference", {"reference.ema_"}),
    pytest.param("triton", {"triton._ema_kernel"}, marks=requires_interpreter)])
def test_each_backend_runs_its_implementation(monkeypatch, backend, expected):
    """The backend switch picks the implementation (all of them give the same values, so only this tells them
    apart): `auto` runs the C++ kernel on CPU tensors."""
    calls = implementations_run(ema_module, monkeypatch)
    teacher, student = _make([(300,), (7,)], torch.float32, torch.float32)
    with dino_kernels.backend(backend):
        dino_kernels.ema_(teacher, student, 0.9)
    assert set(calls) - {"cpp.ema_check"} == expected  # ema_check validates the inputs under every backend


def test_ema_backends_agree_with_reference_module():
    teacher, student = _make(SHAPES, torch.float32, torch.float32)
    copy = [t.clone() for t in teacher]
    reference.ema_(copy, student, 0.7)
    dino_kernels.ema_(teacher, student, 0.7)
    for a, b in zip(teacher, copy):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_ema_empty_list_and_empty_tensors():
    dino_kernels.ema_([], [], 0.5)
    t, s = torch.empty(0), torch.empty(0)
    dino_kernels.ema_([t], [s], 0.5)
    assert t.numel() == 0


@pytest.mark.parametrize(
    "teacher,student,momentum,error,match",
    [
        ([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.5, ValueError, "same length"),
        ([torch.zeros(3)], [torch.zeros(4)], 0.5, ValueError, r"teacher\[0\] has shape"),
        ([torch.zeros(3)], [torch.zeros(3)], 1.5, ValueError, "momentum"),
        ([torch.zeros(3)], [torch.zeros(3)], -0.1, ValueError, "momentum"),
        ([torch.zeros(3)], [torch.zeros(3)], "0.5", TypeError, "momentum"),
        ([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3)], 0.5, TypeError, r"teacher\[0\] must be floating"),
        ([torch.zeros(3)], [torch.zeros(3, dtype=torch.int32)], 0.5, TypeError, r"student\[0\] must be floating"),
        ([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.5, ValueError, "one device"),
        ([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.5, ValueError, "equal strides"),
        ([torch.zeros(3)], [[0.0, 0.0, 0.0]], 0.5, TypeError, r"student\[0\] must be a torch.Tensor"),
    ],
)
def test_ema_bad_input(teacher, student, momentum, error, match):
    with pytest.raises(error, match=match):
        dino_kernels.ema_(teacher, student, momentum)


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
def test_ema_rejects_overlapping_teachers(device):
    """Teacher tensors sharing memory would race in the fused update: a ValueError names the pair, before any
    write. Views of one storage that only touch are fine."""
    buffer = torch.randn(100, device=device)
    matrix = torch.randn(4, 6, device=device)
    other = torch.randn(10, device=device)
    before = [t.clone() for t in (buffer, matrix, other)]
    student = [torch.randn(10, device=device) for _ in range(3)]
    with pytest.raises(ValueError, match=r"teacher\[0\] and teacher\[2\] overlap in memory"):
        dino_kernels.ema_([buffer[5:15], other, buffer[0:10]], student, 0.5)
    with pytest.raises(ValueError, match=r"teacher\[1\] and teacher\[2\] overlap in memory"):
        dino_kernels.ema_([other, buffer[:10], buffer[:10]], student, 0.5)  # one tensor passed twice
    # A transposed (dense, non-contiguous) view and a row of the same matrix.
    transposed_student = torch.randn(4, 6, device=device).t()
    with pytest.raises(ValueError, match=r"teacher\[0\] and teacher\[2\] overlap in memory"):
        dino_kernels.ema_([matrix.t(), other, matrix[3]], [transposed_student, student[0], student[1][:6]], 0.5)
    assert all(torch.equal(t, b) for t, b in zip((buffer, matrix, other), before))
    teacher = [buffer[0:10], buffer[10:20], other]
    expected = _expected(teacher, student, 0.5)
    dino_kernels.ema_(teacher, student, 0.5)
    assert all(rel_error(t, e) <= TOLERANCE[torch.float32] for t, e in zip(teacher, expected))


# The `triton` backend on CPU tensors (the interpreter) and on CUDA tensors (compiled).
TRITON_DEVICES = [pytest.param("cpu", marks=requires_interpreter), cuda_param("cuda")]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_ema_triton_work_tables_are_keyed_by_dtype(device):
    """Two calls with the same addresses and sizes but another teacher element size: the second must not reuse the
    first's work table, whose element offsets would then point at the wrong elements."""
    buffer = torch.zeros(4096, dtype=torch.uint8, device=device)
    student = [torch.randn(100, device=device), torch.randn(100, device=device)]
    for dtype in (torch.float32, torch.float16):
        elements = buffer.view(dtype)
        second = 1024 // elements.element_size()  # the second tensor starts 1 KiB after the first in both calls
        teacher = [elements[:100], elements[second:second + 100]]
        for t in teacher:
            t.copy_(torch.randn(100, device=device))
        expected = _expected(teacher, student, 0.5)
        with dino_kernels.backend("triton"):
            dino_kernels.ema_(teacher, student, 0.5)
        for t, e in zip(teacher, expected):
            assert rel_error(t, e) <= TOLERANCE[dtype], (dtype, rel_error(t, e))


@requires_interpreter
def test_ema_triton_rejects_float64_teacher_clearly():
    with dino_kernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        dino_kernels.ema_([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)], 0.5)


def test_ema_opcheck():
    teacher, student = _make([(5, 3), (4,)], torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.dino_kernels.ema_.default, (teacher, student, 0.9))


def test_ema_under_torch_compile():
    teacher, student = _make([(33,), (2, 9)], torch.float32, torch.float32)
    expected = _expected(teacher, student, 0.9)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(t, s):
        torch.ops.dino_kernels.ema_(t, s, 0.9)

    step(teacher, student)
    for t, e in zip(teacher, expected):
        assert rel_error(t, e) <= TOLERANCE[torch.float32]


@requires_interpreter
def test_ema_triton_one_launch_per_dtype_group(monkeypatch):
    """Multi-tensor apply: the whole list costs one launch per (teacher dtype, student dtype) group."""
    from dino_kernels import ema

    launches = []
    launch = ema.EMA.launch
    monkeypatch.setattr(ema.EMA, "launch", lambda grid, config, **args: (launches.append(grid),
                                                                        launch(grid, config, **args)))
    teacher = [torch.randn(s) for s in [(17,), (3, 300), (1,), (20_000,)]] + [torch.randn(9).half()]
    student = [torch.randn(t.shape) for t in teacher]
    expected = _expected(teacher, student, 0.9)
    with dino_kernels.backend("triton"):
        dino_kernels.ema_(teacher, student, 0.9)
    assert len(launches) == 2
    for t, e in zip(teacher, expected):
        assert rel_error(t, e) <= TOLERANCE[t.dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize(
    "teacher_dtype,student_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
     (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
     (torch.float16, torch.float32), (torch.float64, torch.float32)],
)
def test_ema_cuda_matches_float64(backend, teacher_dtype, student_dtype):
    if backend != "triton" and not _extension.cuda_kernels_compiled():
        pytest.skip("the extension was built without nvcc: no CUDA C++ EMA kernel (the triton cells still run)")
    if backend == "triton" and teacher_dtype == torch.float64:
        teacher_dtype = torch.float32  # the Triton kernel rejects fp64 teachers (tested on CPU)
    # Disjoint views at odd offsets exercise the unaligned (scalar) path next to the 16-byte one.
    big_t = torch.randn(1_000_003, device="cuda").to(teacher_dtype)
    big_s = torch.randn(1_000_003, device="cuda").to(student_dtype)
    teacher = [torch.randn(s, device="cuda").to(teacher_dtype) for s in SHAPES]
    teacher += [big_t[1:500_000], big_t[500_003:]]
    student = [torch.randn(s, device="cuda").to(student_dtype) for s in SHAPES]
    student += [big_s[5:500_004], big_s[500_002:1_000_002]]
    expected = _expected(teacher, student, 0.996)
    with dino_kernels.backend(backend):
        dino_kernels.ema_(teacher, student, 0.996)
        dino_kernels.ema_(teacher, student, 0.996)  # second call: cached work tables
    expected = [0.996 * e + 0.004 * s.double() for e, s in zip(expected, student)]
    for t, e in zip(teacher, expected):
        assert rel_error(t, e) <= 2 * TOLERANCE[teacher_dtype]
