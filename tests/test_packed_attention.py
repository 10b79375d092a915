"""Packed block-diagonal attention: outputs and dq/dk/dv against a float64 per-sequence reference.

The Triton kernels run in the interpreter here (one numpy pass per program), so the parity grid is sampled rather
than crossed: every head dim in fp32 and fp16, every length class (a lone token, block edges 63/64/65/128/129, DINO
global+local mixes, random lengths 1-300) and H in {1, 3, 6} appear, each case under both `auto` (CPU) and `triton`.
"""

import importlib
import math
import random

import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    CUDA_DTYPES,
    TOLERANCE,
    cuda_param,
    implementations_run,
    rel_error,
    requires_interpreter,
)

import dino_kernels
from dino_kernels import reference

pa = importlib.import_module("dino_kernels.packed_attention")  # the package attribute is the function


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _random_lengths(n, seed):
    rng = random.Random(seed)
    return [rng.randint(1, 300) for _ in range(n)]


def _inputs(lengths, heads, dim, dtype, requires_grad=True):
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim).to(dtype).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, _cu(lengths)


def _expected(q, k, v, cu, grad_out, scale=None):
    """Output and gradients in float64 from the same (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.packed_attention(*leaves, cu, scale)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return out.detach(), grads


def _assert_close(actual, expected, dtype, what):
    # A gradient that is exactly zero in float64 (dq, dk of length-1 sequences) is compared absolutely.
    error = rel_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]}"


# (name, lengths, H, D, dtype): every D in fp32 and fp16, every length class, every H.
CASES = [
    ("one-token", [1], 1, 16, torch.float32),
    ("one-token", [1], 3, 128, torch.float16),
    ("edges", [5, 1, 64, 65, 129], 3, 32, torch.float32),
    ("edges", [5, 1, 64, 65, 129], 1, 16, torch.float16),
    ("edges", [63, 128, 2], 1, 128, torch.float32),
    ("vit-s16-mix", [197, 197, 37, 37, 37], 6, 64, torch.float16),
    ("vit-l14-mix", [50, 257, 50], 3, 64, torch.float32),  # equal lengths apart: the CPU path gathers them
    ("vit-l14-mix", [257, 257, 50], 1, 32, torch.float16),
    ("random", _random_lengths(6, seed=1), 1, 64, torch.float16),
    ("random", _random_lengths(5, seed=2), 1, 128, torch.float32),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,lengths,heads,dim,dtype", CASES,
                         ids=[f"{c[0]}-H{c[2]}-D{c[3]}-{str(c[4]).removeprefix('torch.')}" for c in CASES])
def test_matches_float64_reference(backend, name, lengths, heads, dim, dtype):
    q, k, v, cu = _inputs(lengths, heads, dim, dtype)
    grad_out = torch.randn(q.shape).to(dtype)
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    with dino_kernels.backend(backend):
        out = dino_kernels.packed_attention(q, k, v, cu, max(lengths))
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close(out, expected, dtype, "out")
    for g, e, what in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert g.dtype == dtype
        _assert_close(g, e, dtype, what)


@pytest.mark.cuda
def test_cuda_kernels_match_float64_reference():
    """The compiled kernels on a GPU, bf16 included, every head dim, DINO-like mixes with every length class."""
    lengths = [197, 197] + [37] * 10 + [257, 50, 1, 64, 65, 129] + _random_lengths(8, seed=3)
    for dim in pa.HEAD_DIMS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q, k, v, cu = _inputs(lengths, 6, dim, dtype)
            q, k, v, cu = (t.detach().cuda() for t in (q, k, v, cu))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            grad_out = torch.randn(q.shape, device="cuda").to(dtype)
            expected, expected_grads = _expected(q, k, v, cu, grad_out)
            out = dino_kernels.packed_attention(q, k, v, cu, max(lengths))
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            for actual, exact, what in zip((out, *grads), (expected, *expected_grads), ("out", "dq", "dk", "dv")):
                _assert_close(actual, exact, dtype, f"D={dim} {dtype} {what}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_very_negative_scores_stay_finite(backend):
    """Every score near -200, so the LSE is too: a padded key's zero score would give exp(200) = inf in fp32 unless
    the kernels mask it. Such inputs are ill-conditioned: rounding a score s to fp32 moves exp(s) by up to
    u·|s| relative (u = 2^-24), which no fp32 computation avoids, so the bound is the larger of that floor (with a
    margin of 8 for the roundings of the products and sums) and flash-attn's rule (twice the error of the same
    computation in plain fp32 PyTorch). The floor depends on the inputs only, not on the machine: how accurate
    PyTorch's fp32 matmuls happen to be on a given CPU never makes the bound tighter."""
    lengths, dim = [5, 70, 1, 130], 16
    total = sum(lengths)
    direction = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    q = (28 * direction + 0.1 * torch.randn(total, 1, dim)).requires_grad_()
    k = (-28 * direction + 0.1 * torch.randn(total, 1, dim)).requires_grad_()
    v = torch.randn(total, 1, dim, requires_grad=True)
    cu, grad_out = _cu(lengths), torch.randn(total, 1, dim)
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    assert reference.packed_attention_lse(q.double(), k.double(), cu).max() < -150
    largest_score = max((q.double()[a:b, 0] @ k.double()[a:b, 0].T).abs().max().item() * dim**-0.5
                        for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]))
    floor = 8 * 2.0**-24 * largest_score  # about 1e-4 here; the kernels' errors are about 2e-5
    same_dtype = [t.detach().requires_grad_() for t in (q, k, v)]
    fp32_out = reference.packed_attention(*same_dtype, cu)
    fp32_grads = torch.autograd.grad(fp32_out, same_dtype, grad_out)
    with dino_kernels.backend(backend):
        out = dino_kernels.packed_attention(q, k, v, cu, max(lengths))
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for actual, fp32, exact, what in zip((out, *grads), (fp32_out, *fp32_grads), (expected, *expected_grads),
                                         ("out", "dq", "dk", "dv")):
        assert torch.isfinite(actual).all(), what
        bound = max(floor, 2 * rel_error(fp32, exact))
        assert rel_error(actual, exact) <= bound, f"{what}: relative error {rel_error(actual, exact):.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_log_sum_exp_saved_for_backward(backend):
    lengths = [3, 70, 1]
    q, k, v, cu = _inputs(lengths, 2, 16, torch.float32, requires_grad=False)
    with dino_kernels.backend(backend):
        _, lse = torch.ops.dino_kernels.packed_attention_fwd(q, k, v, cu, 70, 0.3)
    assert lse.shape == (2, sum(lengths)) and lse.dtype == torch.float32
    expected = reference.packed_attention_lse(q.double(), k.double(), cu, 0.3)
    assert rel_error(lse, expected) <= 1e-6


# (backend, device, dtype): CPU tensors under every CPU backend in fp32 and fp16, CUDA tensors in every dtype.
DEVICE_CASES = ([(b, "cpu", d) for b in CPU_BACKENDS for d in (torch.float32, torch.float16)]
                + [cuda_param("auto", "cuda", d) for d in CUDA_DTYPES])


def _same_dtype_pytorch(q, k, v, cu, grad_out, scale=None):
    """Output and gradients of plain PyTorch attention run in the inputs' dtype (its matmuls and softmax), per
    sequence: the baseline of flash-attn's rule."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in leaves)
        outs.append((torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1) @ vs).transpose(0, 1))
    out = torch.cat(outs)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


def _assert_flash_rule(actual, expected, pytorch, dtype, what):
    """flash-attn's rule: at most twice the error of the same computation in plain PyTorch at the inputs' dtype,
    and never a bound tighter than the dtype's tolerance."""
    bound = max(TOLERANCE[dtype], 2 * rel_error(pytorch, expected))
    error = rel_error(actual, expected)
    assert error <= bound, f"{what}: relative error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend,device,dtype", DEVICE_CASES)
def test_strided_views_scale_and_upper_bound_max_seqlen(backend, device, dtype):
    """q, k, v as DINO gets them, ``qkv.view(T, 3, H, D).unbind(1)`` of a (T, 3 H D) projection, at odd lengths
    (a lone token, a two-block one); a custom scale; max_seqlen only an upper bound; a zero-length sequence."""
    lengths = [40, 0, 66, 3, 1, 129]
    total, heads, dim = sum(lengths), 2, 32
    projection = torch.randn(total, 3 * heads * dim).to(dtype).to(device).requires_grad_()
    q, k, v = projection.view(total, 3, heads, dim).unbind(1)
    assert q.stride() == (3 * heads * dim, dim, 1)
    cu = _cu(lengths).to(device)
    grad_out = torch.randn(total, heads, dim).to(dtype).to(device)
    expected, expected_grads = _expected(q, k, v, cu, grad_out, scale=0.07)
    pytorch, pytorch_grads = _same_dtype_pytorch(q, k, v, cu, grad_out, scale=0.07)
    with dino_kernels.backend(backend):
        out = dino_kernels.packed_attention(q, k, v, cu, 300, scale=0.07)
        (grad,) = torch.autograd.grad(out, projection, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    _assert_flash_rule(out, expected, pytorch, dtype, "out")
    grads = grad.view(total, 3, heads, dim).unbind(1)
    for g, e, p, what in zip(grads, expected_grads, pytorch_grads, ("dq", "dk", "dv")):
        _assert_flash_rule(g, e, p, dtype, what)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_with_strided_fp32_views(dtype):
    """The trainer's call on a GPU: fp32 q, k, v (strided views of one (T, 3, H, D) tensor) under
    torch.autocast("cuda"): the output comes in the autocast dtype, the gradients back in fp32, both against float64
    from the fp32 inputs (flash-attn's rule against the same cast computation in plain PyTorch)."""
    lengths = [197, 197, 37, 37, 37, 1, 50, 129, 65]
    total, heads, dim = sum(lengths), 6, 64
    cu = _cu(lengths).cuda()
    qkv = torch.randn(total, 3, heads, dim, device="cuda", requires_grad=True)
    q, k, v = qkv.unbind(1)
    grad_out = torch.randn(total, heads, dim, device="cuda").to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        out = dino_kernels.packed_attention(q, k, v, cu, max(lengths))
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    assert out.dtype == dtype and grad.dtype == torch.float32
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    pytorch, pytorch_grads = _same_dtype_pytorch(q.to(dtype), k.to(dtype), v.to(dtype), cu, grad_out)
    _assert_flash_rule(out, expected, pytorch, dtype, "out")
    for g, e, p, what in zip(grad.unbind(1), expected_grads, pytorch_grads, ("dq", "dk", "dv")):
        _assert_flash_rule(g, e, p, dtype, what)


# ------------------------------------------------------------------------------------- C++ CPU kernel
# Every length class of the CPU kernel: its short path (a lone token, 2, 5, and 16 = kShortSeq), and its tiling
# (16-row query blocks, 4-row micro-kernels, 16-column tiles) from 17 on: one under and one over 64, a ViT-S/16 global
# crop, and an empty sequence in the middle.
AWKWARD_LENGTHS = [1, 2, 63, 0, 16, 17, 65, 197, 5]


@pytest.mark.parametrize("dim", [8, 40, 64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_cpu_kernel_head_dims_and_dtypes(dim, dtype):
    """The C++ kernel against float64 in every dtype, head dims that are not multiples of its 16-wide tiles, and
    grad_output != 1; float64 must be exact (1e-12)."""
    q, k, v, cu = _inputs(AWKWARD_LENGTHS, 3, dim, dtype)
    grad_out = torch.randn(q.shape).to(dtype)
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    with dino_kernels.backend("cpu"):
        out = dino_kernels.packed_attention(q, k, v, cu, max(AWKWARD_LENGTHS))
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    _assert_close(out, expected, dtype, "out")
    for g, e, what in zip(grads, expected_grads, ("dq", "dk", "dv")):
        _assert_close(g, e, dtype, what)


def test_cpu_kernel_many_short_sequences_across_chunks():
    """DINO's multi-crop layout at coarse patches: hundreds of short sequences (several of the short path's
    128-token chunks, one ending inside a sequence) around long ones, fp32 and float64 (exact)."""
    lengths = [5] * 30 + [17] + [2] * 90 + [40] + [9] * 7 + [1, 16]
    for dtype, heads in ((torch.float32, 6), (torch.float64, 2)):
        q, k, v, cu = _inputs(lengths, heads, 32, dtype)
        grad_out = torch.randn(q.shape).to(dtype)
        expected, expected_grads = _expected(q, k, v, cu, grad_out)
        with dino_kernels.backend("cpu"):
            out = dino_kernels.packed_attention(q, k, v, cu, 40)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        _assert_close(out, expected, dtype, "out")
        for g, e, what in zip(grads, expected_grads, ("dq", "dk", "dv")):
            _assert_close(g, e, dtype, what)


def _strided_views(total, heads, dim):
    """q, k, v (T, H, D) in three layouts: head-major (H, T, D).transpose(0, 1), a slice of a wider tensor, and one
    whose last dim is not contiguous."""
    q = torch.randn(heads, total, dim).transpose(0, 1)
    k = torch.randn(total, heads + 2, dim + 5)[:, 1:-1, 3:-2]
    v = torch.randn(total, heads, dim, 2)[..., 1]
    return [t.requires_grad_() for t in (q, k, v)]


def test_cpu_kernel_strided_views_and_expanded_grad_output():
    lengths = [5, 70, 1, 33]
    q, k, v = _strided_views(sum(lengths), 2, 24)
    cu = _cu(lengths)
    grad_out = torch.randn(1, 2, 24).expand(sum(lengths), 2, 24)  # strides (0, 24, 1), as from a broadcast loss
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    with dino_kernels.backend("cpu"):
        out = dino_kernels.packed_attention(q, k, v, cu, 70)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _assert_close(out, expected, torch.float32, "out")
    for g, e, what in zip(grads, expected_grads, ("dq", "dk", "dv")):
        _assert_close(g, e, torch.float32, what)


@pytest.mark.parametrize("lengths", [[0], [0, 0], [0, 3, 0, 0]])
def test_cpu_kernel_empty_sequences(lengths):
    q, k, v, cu = _inputs(lengths, 2, 16, torch.float32)
    grad_out = torch.randn(q.shape)
    with dino_kernels.backend("cpu"):
        out, lse = torch.ops.dino_kernels.packed_attention_fwd(q.detach(), k.detach(), v.detach(), cu, 3, 0.25)
        out_grad = dino_kernels.packed_attention(q, k, v, cu, 3)
        grads = torch.autograd.grad(out_grad, (q, k, v), grad_out, allow_unused=True)
    assert out.shape == q.shape and lse.shape == (2, sum(lengths))
    if sum(lengths):
        expected, expected_grads = _expected(q, k, v, cu, grad_out)
        _assert_close(out, expected, torch.float32, "out")
        for g, e in zip(grads, expected_grads):
            _assert_close(g, e, torch.float32, "grad")
    else:
        assert all(g is None or g.shape == q.shape for g in grads)


def test_cpu_kernel_rejects_bad_input_without_crashing():
    """The C++ ops called directly, past the Python checks: a clear RuntimeError, never a crash."""
    ops = dino_kernels._extension.ops()
    q, k, v, cu = _inputs([3, 5], 2, 16, torch.float32, requires_grad=False)
    out, lse = ops.packed_attention_fwd_cpu(q, k, v, cu, 0.25)
    bad_fwd = [
        ((q, k, v, torch.tensor([0, 5, 3, 8], dtype=torch.int32)), "non-decreasing"),
        ((q, k, v, torch.tensor([0, 3, 9], dtype=torch.int32)), "from 0 to T"),
        ((q, k, v, torch.tensor([1, 3, 8], dtype=torch.int32)), "from 0 to T"),
        ((q, k, v, cu.long()), "int32"),
        ((q, k[:7], v, cu), "one shape and dtype"),
        ((q, k, v.double(), cu), "one shape and dtype"),
        ((q[0], k[0], v[0], cu), r"\(T, H, D\)"),
        ((q, k, torch.randn(8, 2, 16, 2)[..., 0], cu), "contiguous"),
    ]
    for args, match in bad_fwd:
        with pytest.raises(RuntimeError, match=match):
            ops.packed_attention_fwd_cpu(*args, 0.25)
    for bad_lse in (lse.double(), lse[:1], lse.t()):
        with pytest.raises(RuntimeError, match="lse must be"):
            ops.packed_attention_bwd_cpu(out, q, k, v, bad_lse, cu, 0.25)
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        ops.packed_attention_bwd_cpu(out[:7], q, k, v, lse, cu, 0.25)


@pytest.mark.parametrize("backend,expected", [
    ("auto", {"cpp.packed_attention_fwd_cpu", "cpp.packed_attention_bwd_cpu"}),
    ("cpu", {"cpp.packed_attention_fwd_cpu", "cpp.packed_attention_bwd_cpu"}),
    ("reference", {"reference.packed_attention", "reference.packed_attention_lse",
                   "reference.packed_attention_backward"}),
    pytest.param("triton", {"triton._block_table_kernel", "triton._attn_fwd_kernel", "triton._attn_bwd_kernel"},
                 marks=requires_interpreter)])
def test_each_backend_runs_its_implementation(monkeypatch, backend, expected):
    """The backend switch picks the implementation of the forward and the backward (all of them give the same
    values, so only this tells them apart): `auto` runs the C++ kernels on CPU tensors."""
    calls = implementations_run(pa, monkeypatch)
    q, k, v, cu = _inputs([3, 9], 2, 16, torch.float32)
    with dino_kernels.backend(backend):
        dino_kernels.packed_attention(q, k, v, cu, 9).sum().backward()
    assert set(calls) == expected


def test_gradcheck_float64_cpu():
    q, k, v, cu = _inputs([3, 1, 4], 2, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: dino_kernels.packed_attention(q, k, v, cu, 4), (q, k, v))


def test_reference_backend_and_reference_forms_agree():
    lengths = [6, 1, 9]
    q, k, v, cu = _inputs(lengths, 3, 16, torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    # The closed-form backward against autograd of the forward.
    for g, e in zip(reference.packed_attention_backward(grad_out, q, k, v, cu), expected_grads):
        assert rel_error(g, e) <= 1e-12
    # Dense attention under the block-diagonal mask is packed attention.
    mask = reference.block_diagonal_mask(cu, sum(lengths))
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                             attn_mask=mask).transpose(0, 1)
    assert rel_error(dense, expected) <= 1e-12
    with dino_kernels.backend("reference"):
        out = dino_kernels.packed_attention(q, k, v, cu, 9)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert rel_error(out, expected) <= 1e-12
    assert all(rel_error(g, e) <= 1e-12 for g, e in zip(grads, expected_grads))


# The `triton` backend on CPU tensors (the interpreter) and on CUDA tensors (compiled).
TRITON_DEVICES = [pytest.param("cpu", marks=requires_interpreter), cuda_param("cuda")]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_unsupported_head_dim_falls_back_to_reference_with_a_warning(device):
    q, k, v, cu = (t.detach().to(device) for t in _inputs([5, 9], 1, 24, torch.float32))
    expected, _ = _expected(q, k, v, cu, torch.ones_like(q))
    with dino_kernels.backend("triton"), pytest.warns(UserWarning, match="head dim 24 has no Triton kernel"):
        out = dino_kernels.packed_attention(q, k, v, cu, 9)
    _assert_close(out, expected, torch.float32, "out")


# ------------------------------------------------------------------------------------------ pack / unpack
def test_pack_unpack_round_trip_and_dino_equivalence():
    """pack() of DINO crop groups: packed attention equals one SDPA call per crop group (what DINO v1/v3 run)."""
    heads, dim = 2, 16
    xs = [torch.randn(4, 17, heads * dim, requires_grad=True), torch.randn(6, 5, heads * dim, requires_grad=True)]
    packed, cu, max_seqlen = dino_kernels.pack(xs)
    assert packed.shape == (4 * 17 + 6 * 5, heads * dim)
    assert cu.dtype == torch.int32 and cu.tolist() == [17 * i for i in range(5)] + [68 + 5 * i for i in range(1, 7)]
    assert max_seqlen == 17
    again = dino_kernels.pack([x.detach() for x in xs])
    assert again[1] is cu  # cached per shapes: no host work in the training loop
    parts = dino_kernels.unpack(packed, [x.shape for x in xs])
    assert all(torch.equal(p, x) for p, x in zip(parts, xs))
    heads_view = packed.view(-1, heads, dim)
    for backend in CPU_BACKENDS:
        with dino_kernels.backend(backend):
            out = dino_kernels.packed_attention(heads_view, heads_view, heads_view, cu, max_seqlen)
        for part, x in zip(dino_kernels.unpack(out, [(b, n) for b, n, _ in (x.shape for x in xs)]), xs):
            y = x.view(x.shape[0], x.shape[1], heads, dim).transpose(1, 2)
            per_group = torch.nn.functional.scaled_dot_product_attention(y, y, y).transpose(1, 2)
            assert part.shape == per_group.shape
            _assert_close(part, per_group.detach(), torch.float32, f"{backend} group {tuple(x.shape)}")
    out.sum().backward()  # gradients flow back through unpack/pack to the crop groups
    assert all(x.grad is not None and x.grad.shape == x.shape for x in xs)


@pytest.mark.parametrize(
    "xs,error,match",
    [
        ([], TypeError, "non-empty list"),
        (torch.zeros(2, 3, 4), TypeError, "non-empty list"),
        ([torch.zeros(3, 4)], ValueError, r"xs\[0\] must be 3-d"),
        ([torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)], ValueError, r"xs\[1\] has \(5"),
        ([torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float16)], ValueError, "share D, dtype"),
        ([torch.zeros(2, 3, 4), "x"], TypeError, r"xs\[1\] must be a torch.Tensor"),
    ],
)
def test_pack_bad_input(xs, error, match):
    with pytest.raises(error, match=match):
        dino_kernels.pack(xs)


def test_unpack_bad_input():
    with pytest.raises(ValueError, match="shapes hold 12 tokens but packed has 10"):
        dino_kernels.unpack(torch.zeros(10, 4), [(2, 3), (3, 2)])
    with pytest.raises(ValueError, match=r"shapes\[0\] must be"):
        dino_kernels.unpack(torch.zeros(10, 4), [(10,)])
    with pytest.raises(TypeError, match="packed must be a torch.Tensor"):
        dino_kernels.unpack([0.0], [(1, 1)])


# ---------------------------------------------------------------------------------------------- bad input
def _good():
    q, k, v, cu = _inputs([3, 5], 2, 16, torch.float32, requires_grad=False)
    return dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=5)


BAD_INPUTS = [
    (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, r"must end at T = q.shape\[0\] = 8"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens must have dtype int32; got torch.int64"),
    (dict(cu_seqlens=torch.tensor([[0, 3, 8]], dtype=torch.int32)), ValueError, r"cu_seqlens must be 1-d"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, r"cu_seqlens must be 1-d"),
    (dict(cu_seqlens=[0, 3, 8]), TypeError, "cu_seqlens must be a torch.Tensor"),
    (dict(max_seqlen=4), ValueError, "max_seqlen = 4 but sequence 1 has 5 tokens"),
    (dict(max_seqlen=3), ValueError, "max_seqlen must be >= 1 and bound"),
    (dict(max_seqlen=5.0), TypeError, "max_seqlen must be a Python int"),
    (dict(max_seqlen=torch.tensor(5)), TypeError, "max_seqlen must be a Python int"),
    (dict(k=torch.zeros(8, 2, 32)), ValueError, r"k must have the shape of q, \(8, 2, 16\); got \(8, 2, 32\)"),
    (dict(v=torch.zeros(7, 2, 16)), ValueError, r"v must have the shape of q"),
    (dict(k=torch.zeros(8, 2, 16, dtype=torch.float16)), TypeError, "k must have the dtype of q"),
    (dict(q=torch.zeros(8, 32)), ValueError, r"q must be 3-d \(T, H, D\); got shape \(8, 32\)"),
    (dict(v=torch.zeros(1, 8, 2, 16)), ValueError, "v must be 3-d"),
    (dict(q=torch.zeros(8, 2, 16, dtype=torch.int32)), TypeError, "q must be floating point"),
    (dict(k=torch.zeros(8, 2, 16, device="meta")), ValueError, "k is on meta but q is on cpu"),
    (dict(q="q"), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("device", ["cpu", cuda_param("cuda")])
@pytest.mark.parametrize("backend", CPU_BACKENDS + ("reference",))
@pytest.mark.parametrize("change,error,match", BAD_INPUTS, ids=[m[:30] for _, _, m in BAD_INPUTS])
def test_bad_input(monkeypatch, device, backend, change, error, match):
    # On CUDA the values of cu_seqlens are checked on the host in debug mode only, which this test turns on.
    monkeypatch.setenv("DINO_KERNELS_DEBUG", "1")
    args = {**_good(), **change}
    args = {n: a.to(device) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for n, a in args.items()}
    with dino_kernels.backend(backend), pytest.raises(error, match=match.replace("cpu", device)):
        dino_kernels.packed_attention(**args)


@pytest.mark.parametrize("scale,error", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                         ("0.1", TypeError)])
def test_bad_scale(scale, error):
    with pytest.raises(error, match="scale"):
        dino_kernels.packed_attention(**_good(), scale=scale)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_rejects_what_it_cannot_run(device):
    args = {n: a.to(device) if isinstance(a, torch.Tensor) else a for n, a in _good().items()}
    with dino_kernels.backend("triton"):
        with pytest.raises(TypeError, match="float64"):
            dino_kernels.packed_attention(**{**args, **{n: args[n].double() for n in "qkv"}})
        if device == "cpu":  # a limitation of the interpreter only
            with pytest.raises(TypeError, match="bfloat16 is broken in the Triton interpreter"):
                dino_kernels.packed_attention(**{**args, **{n: args[n].bfloat16() for n in "qkv"}})


# CPU only: on CUDA the device-side assertion would poison the process's CUDA context for every later test.
@requires_interpreter
def test_device_side_guard_without_host_checks():
    """On CUDA, outside debug mode, cu_seqlens values are not checked on the host: the block-table kernel clamps
    every address and flags them in its status, on which the launcher raises a device-side assertion instead. Run
    the kernel directly (interpreter, CPU, where the launcher leaves the assertion out: the host checks them)."""
    total = 8
    for bad in ([0, 3, 9], [0, 6, 2, 8], [2, 8], [0, 8]):
        table, status = pa._block_table_triton(torch.tensor(bad, dtype=torch.int32), total, max_seqlen=5)
        assert status.tolist() == [0], bad
        assert table.min() >= 0 and table.max() <= total, bad  # clamped: no program reads outside q, k, v
    table, status = pa._block_table_triton(torch.tensor([0, 3, 3, 8], dtype=torch.int32), total, max_seqlen=5)
    assert status.tolist() == [1]
    assert table.tolist()[:2] == [[0, 3, 0], [3, 8, 3]] and not table[2:].any()  # spare programs: empty entries


class _GuardedEmpty:
    """A stand-in for ``torch.empty`` that hands out views into larger buffers filled with a sentinel, MARGIN
    elements of it on each side of every view."""

    MARGIN = 4096  # more than a (H, D) row of the tensors below: a row written past the end lands in the margin
    SENTINEL = -7  # exact in every dtype the launchers allocate (float32 and int32)

    def __init__(self):
        self.empty, self.buffers = torch.empty, []

    def __call__(self, *size, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        n = math.prod(shape)
        buffer = self.empty(n + 2 * self.MARGIN, dtype=dtype, device=device, **kwargs).fill_(self.SENTINEL)
        self.buffers.append((buffer, n))
        return buffer[self.MARGIN:self.MARGIN + n].view(shape)

    def assert_margins_untouched(self):
        for buffer, n in self.buffers:
            margins = torch.cat([buffer[:self.MARGIN], buffer[self.MARGIN + n:]])
            assert (margins == self.SENTINEL).all(), f"a kernel wrote outside its {buffer.dtype} buffer of {n}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("lengths", [[5, 130, 1, 37], [37, 1, 5, 70]], ids=["last-one-block", "last-two-blocks"])
def test_triton_kernels_write_only_inside_their_buffers(device, lengths, monkeypatch):
    """Every buffer the Triton launchers allocate (block table and status, output, LSE, dq, dk, dv) is a view into a
    larger buffer with a sentinel around it: after a forward and a backward the sentinel is intact, so no program
    writes a row past its sequence (for the last sequence that row lies outside the tensor, where comparing values
    cannot see it). The last sequence takes the backward's one-block path in the first case, the two-pass one in
    the second."""
    q, k, v, cu = (t.to(device) for t in _inputs(lengths, 2, 16, torch.float32, requires_grad=False))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, device=device)
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    guarded = _GuardedEmpty()
    monkeypatch.setattr(torch, "empty", guarded)
    with dino_kernels.backend("triton"):
        out = dino_kernels.packed_attention(q, k, v, cu, max(lengths))
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    monkeypatch.undo()
    assert len(guarded.buffers) >= 5  # at least out, lse, dq, dk, dv (and the block tables)
    guarded.assert_margins_untouched()
    _assert_close(out, expected, torch.float32, "out")
    for g, e, what in zip(grads, expected_grads, ("dq", "dk", "dv")):
        _assert_close(g, e, torch.float32, what)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_block_table_covers_every_block_once(device):
    lengths = [1, 64, 65, 0, 200, 37, 129]
    table = pa._block_table_triton(_cu(lengths).to(device), sum(lengths), max(lengths))[0].cpu()
    cu = _cu(lengths).tolist()
    expected = [[cu[i], cu[i + 1], cu[i] + j] for i, n in enumerate(lengths) for j in range(0, n, pa.BLOCK_M)]
    assert table.shape[0] >= len(expected)
    assert table.tolist()[:len(expected)] == expected and not table[len(expected):].any()


# ------------------------------------------------------------------------------ registration and compilers
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    q, k, v, cu = _inputs([5, 1, 70], 2, 16, torch.float32)
    with dino_kernels.backend(backend):
        torch.library.opcheck(torch.ops.dino_kernels.packed_attention_fwd.default, (q, k, v, cu, 70, 0.25))
        out, lse = torch.ops.dino_kernels.packed_attention_fwd(q, k, v, cu, 70, 0.25)
        grad_out = torch.randn(q.shape)
        torch.library.opcheck(torch.ops.dino_kernels.packed_attention_bwd.default,
                              (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, 70, 0.25))


def test_autocast_cpu():
    q, k, v, cu = _inputs([37, 197], 2, 32, torch.float32)
    grad_out = torch.randn(q.shape)
    expected, expected_grads = _expected(q, k, v, cu, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dino_kernels.packed_attention(q, k, v, cu, 197)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (q, k, v), grad_out.bfloat16())
    assert all(g.dtype == torch.float32 for g in grads)
    assert rel_error(out, expected) <= TOLERANCE[torch.bfloat16]
    assert all(rel_error(g, e) <= TOLERANCE[torch.bfloat16] for g, e in zip(grads, expected_grads))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """An attention block (qkv projection, packed attention, output projection) compiles without graph breaks and
    trains: the custom ops' fakes and autograd are traced."""
    torch._dynamo.reset()
    lengths, heads, dim = [9, 3, 70], 2, 16
    cu = _cu(lengths)
    x = torch.randn(sum(lengths), heads * dim, requires_grad=True)
    qkv_proj = torch.nn.Linear(heads * dim, 3 * heads * dim)
    out_proj = torch.nn.Linear(heads * dim, heads * dim)

    def block(x):
        q, k, v = qkv_proj(x).view(-1, 3, heads, dim).unbind(1)
        return out_proj(dino_kernels.packed_attention(q, k, v, cu, 70).reshape(-1, heads * dim))

    with dino_kernels.backend(backend):
        eager = block(x)
        (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
    assert rel_error(compiled, eager) <= 1e-6
    assert rel_error(compiled_grad, eager_grad) <= 1e-6


def test_cu_seqlens_values_are_checked_once_per_version(monkeypatch):
    """The CPU path checks a cu_seqlens tensor's values once (a step's blocks pass the same one), again after an
    in-place change, which it then refuses if the values are bad, and for another tensor or max_seqlen."""
    checks = []
    check = pa._check_cu_seqlens_values
    monkeypatch.setattr(pa, "_check_cu_seqlens_values",
                        lambda cu, *args: checks.append(cu.tolist()) or check(cu, *args))
    q, k, v, cu = _inputs([3, 5, 4], heads=2, dim=16, dtype=torch.float32)
    for _ in range(2):
        dino_kernels.packed_attention(q, k, v, cu, max_seqlen=5)
    assert checks == [[0, 3, 8, 12]]
    dino_kernels.packed_attention(q, k, v, cu, max_seqlen=6)
    dino_kernels.packed_attention(q, k, v, cu.clone(), max_seqlen=5)
    assert len(checks) == 3
    cu.copy_(_cu([9, 1, 2]))  # in place: a new version, whose longest sequence max_seqlen no longer bounds
    with pytest.raises(ValueError, match="max_seqlen must bound every sequence length"):
        dino_kernels.packed_attention(q, k, v, cu, max_seqlen=5)


@requires_interpreter
def test_block_table_is_built_once_per_cu_seqlens_version(monkeypatch):
    """The Triton path builds a cu_seqlens tensor's block table once (every block of a step passes the same one,
    forward and backward) and builds it again after an in-place change of the tensor, or for another tensor: the
    results always follow the current boundaries."""
    builds = []
    build = pa._block_table_triton
    monkeypatch.setattr(pa, "_block_table_triton", lambda *args: builds.append(args[0].tolist()) or build(*args))
    q, k, v, cu = _inputs([3, 5, 4], heads=2, dim=16, dtype=torch.float32)
    grad_out = torch.randn_like(q)

    def check(cu):
        with dino_kernels.backend("triton"):
            out = dino_kernels.packed_attention(q, k, v, cu, max_seqlen=9)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        expected, expected_grads = _expected(q, k, v, cu, grad_out)
        _assert_close(out, expected, torch.float32, "out")
        for got, want, name in zip(grads, expected_grads, "qkv"):
            _assert_close(got, want, torch.float32, f"d{name}")

    check(cu)
    check(cu)
    assert builds == [[0, 3, 8, 12]]  # one build for two forwards and two backwards
    cu.copy_(_cu([9, 1, 2]))  # in place: a new version of the same tensor
    check(cu)
    assert builds[1:] == [[0, 9, 10, 12]]
    check(_cu([9, 1, 2]))  # an equal but distinct tensor: its own table
    assert len(builds) == 3
