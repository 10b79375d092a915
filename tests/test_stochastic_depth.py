"""Sample-skipping stochastic depth: scaled_index_add, index_select_cat and drop_add_residual.

Every result is checked against float64 formulas computed from the same (rounded) inputs; the Triton kernels run
in the interpreter on small shapes (``triton`` backend), the CPU path under ``auto``, and on a GPU the parity tests
run on CUDA tensors too (compiled Triton kernels, bf16 included; marked ``cuda``).
"""

import itertools
import math

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
from dino_kernels import reference, stochastic_depth
from dino_kernels._aot import _arg_type
from dino_kernels._launch import recording

# The interpreter turns the loaded segment bounds of the index-add loop into Python ints through a numpy call that
# numpy >= 1.25 flags as deprecated; it is the interpreter's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

DTYPES = (torch.float32, torch.float16)
# (backend, device, dtype): CPU tensors under every CPU backend in fp32 and fp16, CUDA tensors in every dtype.
DEVICE_CASES = ([(b, "cpu", d) for b in CPU_BACKENDS for d in DTYPES]
                + [cuda_param("auto", "cuda", d) for d in CUDA_DTYPES])
# The `triton` backend on CPU tensors (the interpreter) and on CUDA tensors (compiled).
TRITON_DEVICES = [pytest.param("cpu", marks=requires_interpreter), cuda_param("cuda")]

# (x shape, index): duplicates, a single row, 2-d rows (the flat tile), 4-d rows, every row, odd widths, and rows of
# several 32 x 128 tiles in both directions (67 tokens, width 260).
INDEX_CASES = [
    ((5, 3, 7), [3, 0, 3]),
    ((1, 1, 1), [0]),
    ((6, 13), [5, 1, 2, 0]),
    ((4, 2, 3, 5), [1, 3]),
    ((3, 37, 9), [2, 0, 1]),
    ((4, 6, 130), [0, 3, 0, 0, 2]),
    ((5, 67, 260), [4, 0, 4, 2]),
]


def _float64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _grads(output, inputs, grad_output):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(output, wanted, grad_output)


# ------------------------------------------------------------------------------------------ scaled_index_add
@pytest.mark.parametrize("backend,device,dtype", DEVICE_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("with_scaling", [False, True])
@pytest.mark.parametrize("shape,rows", INDEX_CASES)
def test_scaled_index_add_matches_float64(backend, device, dtype, index_dtype, with_scaling, shape, rows):
    x = torch.randn(shape).to(dtype).to(device).requires_grad_()
    index = torch.tensor(rows, dtype=index_dtype, device=device)
    src = torch.randn(len(rows), *shape[1:]).to(dtype).to(device).requires_grad_()
    scaling = torch.randn(shape[-1], device=device).requires_grad_() if with_scaling else None
    alpha = 1.7
    grad_output = torch.randn(shape).to(dtype).to(device)
    with dino_kernels.backend(backend):
        out = dino_kernels.scaled_index_add(x, index, src, alpha=alpha, scaling=scaling)
        grads = _grads(out, [x, src, scaling], grad_output)
    x64, src64, scaling64 = _float64(x, src, scaling)
    # The formula, written out: out[b] = x[b] + alpha * scaling * sum_{j: index[j] = b} src[j].
    update = src64 if scaling64 is None else src64 * scaling64
    expected = x64 + alpha * torch.stack([update[index == b].sum(0) for b in range(shape[0])])
    expected_grads = _grads(expected, [x64, src64, scaling64], grad_output.double())
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_error(out, expected) <= TOLERANCE[dtype]
    for name, got, want in zip(["x", "src", "scaling"], grads, expected_grads):
        assert got.dtype == (torch.float32 if name == "scaling" else dtype)
        assert rel_error(got, want) <= TOLERANCE[dtype], (name, rel_error(got, want))
    untouched = [b for b in range(shape[0]) if b not in rows]
    assert torch.equal(out[untouched], x[untouched])  # rows nobody adds to are exact copies


def test_scaled_index_add_bfloat16_and_float64():
    for dtype in (torch.bfloat16, torch.float64):
        x, src, scaling = torch.randn(6, 5, 8).to(dtype), torch.randn(4, 5, 8).to(dtype), torch.randn(8)
        index = torch.tensor([5, 0, 2, 0])
        out = dino_kernels.scaled_index_add(x, index, src, alpha=0.5, scaling=scaling)
        expected = torch.index_add(x.double(), 0, index, src.double() * scaling.double(), alpha=0.5)
        assert out.dtype == dtype
        assert rel_error(out, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scaled_index_add_strided_inputs_and_partial_grads(backend):
    """Permuted strides and a strided index; src without grad but scaling with it (and the converse), scaling in
    another dtype than x."""
    x = torch.randn(7, 4, 6).transpose(0, 1)  # (4, 7, 6), not contiguous
    src = torch.randn(3, 6, 7).permute(0, 2, 1)  # (3, 7, 6), not contiguous
    scaling = torch.randn(6, dtype=torch.float64).requires_grad_()
    index = torch.tensor([3, 2, 1, 2, 0])[::2]  # [3, 1, 0], strided
    grad_output = torch.randn(4, 7, 6).transpose(1, 2).contiguous().transpose(1, 2)
    with dino_kernels.backend(backend):
        out = dino_kernels.scaled_index_add(x, index, src, alpha=2.0, scaling=scaling)
        (grad_scaling,) = torch.autograd.grad(out, [scaling], grad_output)
    gathered = grad_output.double()[index]
    expected = torch.index_add(x.double(), 0, index, src.double() * scaling.detach(), alpha=2.0)
    assert out.is_contiguous() and rel_error(out, expected) <= TOLERANCE[torch.float32]
    assert grad_scaling.dtype == torch.float64
    assert rel_error(grad_scaling, 2.0 * (gathered * src.double()).sum((0, 1))) <= TOLERANCE[torch.float32]
    src.requires_grad_()
    with dino_kernels.backend(backend):
        out = dino_kernels.scaled_index_add(x, index, src, alpha=2.0, scaling=scaling.detach())
        (grad_src,) = torch.autograd.grad(out, [src], grad_output)
    assert rel_error(grad_src, 2.0 * scaling.detach() * gathered) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------------------------------------ index_select_cat
@pytest.mark.parametrize("backend,device,dtype", DEVICE_CASES)
def test_index_select_cat_matches_float64(backend, device, dtype):
    xs = [torch.randn(shape).to(dtype).to(device).requires_grad_() for shape in ((4, 5, 6), (7, 2, 6), (3, 6))]
    indices = [torch.tensor(rows, dtype=index_dtype, device=device) for rows, index_dtype in
               (([3, 0, 3], torch.int64), ([6, 1], torch.int32), ([2, 1, 0, 2], torch.int64))]
    with dino_kernels.backend(backend):
        packed = dino_kernels.index_select_cat(xs, indices)
        grad_output = torch.randn_like(packed)
        grads = torch.autograd.grad(packed, xs, grad_output)
    assert packed.shape == (3 * 5 + 2 * 2 + 4, 6) and packed.dtype == dtype
    expected = torch.cat([x[i.long()].reshape(-1, 6) for x, i in zip(xs, indices)])
    assert torch.equal(packed, expected)  # a gather is a copy: bit-exact
    xs64 = _float64(*xs)
    expected_grads = torch.autograd.grad(reference.index_select_cat(xs64, indices), xs64, grad_output.double())
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape and rel_error(got, want) <= TOLERANCE[dtype]


GATHER, INDEX_ADD = "triton._gather_rows_kernel", "triton._index_add_rows_kernel"
CPP_GATHER, CPP_INDEX_ADD = "cpp.gather_rows_cpu", "cpp.index_add_rows_cpu"
# On CPU tensors the gather forward is torch.index_select (one pass already), everything else the C++ kernels.
CPP_CALLS = ([], [CPP_INDEX_ADD], [CPP_GATHER, CPP_INDEX_ADD])


@pytest.mark.parametrize("backend,dtype,expected", [
    ("auto", torch.float32, CPP_CALLS), ("cpu", torch.float32, CPP_CALLS),
    ("reference", torch.float32, (["reference.index_select_cat"], ["reference.scaled_index_add"], [])),
    pytest.param("triton", torch.float16, ([GATHER], [INDEX_ADD], [GATHER, INDEX_ADD]), marks=requires_interpreter)])
def test_each_backend_runs_its_implementation(monkeypatch, backend, dtype, expected):
    """The backend switch picks the implementation of index_select_cat, of scaled_index_add and of their backwards
    (all of them give the same values, so only this tells them apart)."""
    calls = implementations_run(stochastic_depth, monkeypatch)
    x, scaling = torch.randn(5, 3, 4).to(dtype).requires_grad_(), torch.randn(4, requires_grad=True)
    index = torch.tensor([4, 0])
    ran = []
    with dino_kernels.backend(backend):
        subset = dino_kernels.index_select_cat([x], [index]).view(2, 3, 4)
        ran.append(sorted(calls))
        calls.clear()
        out = dino_kernels.scaled_index_add(x, index, subset * 2, alpha=2.5, scaling=scaling)
        ran.append(sorted(calls))
        calls.clear()
        out.sum().backward()  # the gather for src and scaling, the index-add for index_select_cat's input
        ran.append(sorted(calls))
    assert tuple(ran) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
def test_cpu_kernels_many_rows_duplicates_and_empty_index(dtype):
    """The C++ kernels past one work chunk: 70 output rows (16-row chunks for the LayerScale gradient's partial sums,
    several threads' ranges), duplicates and untouched rows, LayerScale and its gradient; float64 exact (1e-12). An
    empty index leaves x as it is and gives zero gradients."""
    x = torch.randn(70, 3, 8, dtype=dtype, requires_grad=True)
    index = torch.tensor([69, 0, 5, 5, 5, *range(10, 60)], dtype=torch.int32)
    src = torch.randn(len(index), 3, 8, dtype=dtype, requires_grad=True)
    scaling = torch.randn(8, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(70, 3, 8, dtype=dtype)
    with dino_kernels.backend("cpu"):
        out = dino_kernels.scaled_index_add(x, index, src, alpha=1.3, scaling=scaling)
        grads = torch.autograd.grad(out, [x, src, scaling], grad_output)
    x64, src64, scaling64 = _float64(x, src, scaling)
    expected = x64.index_add(0, index, src64 * scaling64, alpha=1.3)
    expected_grads = torch.autograd.grad(expected, [x64, src64, scaling64], grad_output.double())
    assert rel_error(out, expected) <= TOLERANCE[dtype]
    for name, got, want in zip(["x", "src", "scaling"], grads, expected_grads):
        assert rel_error(got, want) <= TOLERANCE[dtype], name
    empty = torch.tensor([], dtype=torch.int64)
    with dino_kernels.backend("cpu"):
        out = dino_kernels.scaled_index_add(x, empty, src[:0], scaling=scaling)
        grad_src, grad_scaling = torch.autograd.grad(out, [src, scaling], grad_output)
    assert torch.equal(out, x) and not grad_src.any() and not grad_scaling.any()


def test_cpu_kernels_reject_bad_input_without_crashing():
    """The C++ ops called directly, past the Python checks: a clear RuntimeError, never a crash."""
    ops = dino_kernels._extension.ops()
    src, x = torch.randn(3, 2, 4), torch.randn(5, 2, 4)
    index = torch.tensor([4, 0, 2])
    assert torch.equal(ops.index_add_rows_cpu(x, index, src, 5, 1.0, None, 8)[index], x[index] + src)
    bad = [
        (lambda: ops.index_add_rows_cpu(x, torch.tensor([5, 0, 2]), src, 5, 1.0, None, 8), "out of range"),
        (lambda: ops.index_add_rows_cpu(x, torch.tensor([-1, 0, 2]), src, 5, 1.0, None, 8), "out of range"),
        (lambda: ops.index_add_rows_cpu(x, index.float(), src, 5, 1.0, None, 8), "int64 or int32"),
        (lambda: ops.index_add_rows_cpu(x, index[:2], src, 5, 1.0, None, 8), "one entry per src row"),
        (lambda: ops.index_add_rows_cpu(x[:4], index, src, 5, 1.0, None, 8), "x must be"),
        (lambda: ops.index_add_rows_cpu(x.half(), index, src, 5, 1.0, None, 8), "x must be"),
        (lambda: ops.index_add_rows_cpu(None, None, src, 5, 1.0, None, 8), "without an index"),
        (lambda: ops.index_add_rows_cpu(x, index, src, 5, 1.0, torch.ones(3), 3), "width must divide"),
        (lambda: ops.index_add_rows_cpu(x, index, src, 5, 1.0, torch.ones(4).double(), 4), "scaling must be"),
        (lambda: ops.index_add_rows_cpu(x, index, src.transpose(1, 2), 5, 1.0, None, 8), "contiguous"),
        (lambda: ops.gather_rows_cpu(x, torch.tensor([5]), 1.0, None, None, 8), "out of range"),
        (lambda: ops.gather_rows_cpu(x, index, 1.0, None, src[:2], 8), "other must be"),
        (lambda: ops.gather_rows_cpu(x, index, 1.0, torch.ones(4), None, 8), "width must divide"),
    ]
    for call, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_index_select_cat_empty_selection():
    xs = [torch.randn(3, 2, 4), torch.randn(2, 5, 4)]
    packed = dino_kernels.index_select_cat(xs, [torch.tensor([], dtype=torch.int64), torch.tensor([1])])
    assert torch.equal(packed, xs[1][1])


# ----------------------------------------------------------------------------------------- drop_add_residual
class Branch(torch.nn.Module):
    """A per-token residual branch (LayerNorm, MLP) that records what it was called with."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(2 * dim, dim)).to(device=device, dtype=dtype)
        self.calls = []

    def forward(self, x):
        out = self.net(x)
        self.calls.append((x.detach().clone(), out.detach().clone()))
        return out


class PackedBranch(Branch):
    """Tokens through the MLP plus each sequence's mean: right only if cu_seqlens delimits the images."""

    def forward(self, packed, cu_seqlens, max_seqlen):
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens[0] == 0 and cu_seqlens[-1] == packed.shape[0]
        lengths = cu_seqlens.diff().long()
        assert int(lengths.max()) <= max_seqlen
        tokens = self.net(packed)
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=packed.device), lengths)
        means = torch.zeros(len(lengths), packed.shape[1], dtype=tokens.dtype, device=packed.device).index_add(
            0, sequence, tokens)
        out = tokens + (means / lengths[:, None].to(tokens.dtype))[sequence]
        self.calls.append((packed.detach().clone(), out.detach().clone(), cu_seqlens.clone(), max_seqlen))
        return out


def _copy_to_float64(branch):
    twin = type(branch)(branch.net[0].normalized_shape[0], torch.float64, branch.net[0].weight.device)
    twin.net.load_state_dict({k: v.double() for k, v in branch.net.state_dict().items()})
    return twin


def _check_rows(out, x, branch_in, branch_out, alpha, scaling, dtype):
    """Each row of out is x, or x + alpha * scaling * branch(x) for exactly the rows the branch saw."""
    changed = [b for b in range(x.shape[0]) if not torch.equal(out[b], x[b])]
    assert len(changed) == branch_in.shape[0]
    # The branch ran on exactly the changed rows (gathered bit-exactly), in some order.
    order = [next(b for b in changed if torch.equal(x[b], row)) for row in branch_in]
    assert sorted(order) == changed
    update = branch_out.double() * (1.0 if scaling is None else scaling.double())
    expected = x[order].double() + alpha * update
    assert rel_error(out[order], expected) <= TOLERANCE[dtype]
    return order


@pytest.mark.parametrize("backend,device,dtype", DEVICE_CASES)
@pytest.mark.parametrize("batch,tokens,drop_rate", [(8, 5, 0.3), (10, 3, 0.9), (6, 1, 0.5), (1, 4, 0.4),
                                                    (5, 2, 0.0)])
def test_drop_add_residual_semantics(backend, device, dtype, batch, tokens, drop_rate):
    dim = 6
    x = torch.randn(batch, tokens, dim).to(dtype).to(device)
    scaling = torch.randn(dim, device=device)
    branch = Branch(dim, dtype, device)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    keep = max(int(batch * (1 - drop_rate)), 1)
    with dino_kernels.backend(backend), torch.no_grad():
        out = dino_kernels.drop_add_residual(x, branch, drop_rate, generator=generator, scaling=scaling)
    (branch_in, branch_out), = branch.calls
    assert branch_in.shape == (keep, tokens, dim)
    _check_rows(out, x, branch_in, branch_out, batch / keep, scaling, dtype)
    if keep == batch:
        assert torch.equal(generator.get_state(), state)  # nothing dropped: no random numbers drawn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_drop_add_residual_eval_mode_is_the_full_residual(backend):
    x, scaling, branch = torch.randn(4, 3, 5), torch.randn(5), Branch(5)
    with dino_kernels.backend(backend), torch.no_grad():
        out = dino_kernels.drop_add_residual(x, branch, 0.9, training=False, scaling=scaling)
        unscaled = dino_kernels.drop_add_residual(x, branch, 0.9, training=False)
    residual = branch.net(x).double()
    assert rel_error(out, x.double() + scaling.double() * residual) <= TOLERANCE[torch.float32]
    assert rel_error(unscaled, x.double() + residual) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend,device,dtype", DEVICE_CASES)
def test_drop_add_residual_gradients(backend, device, dtype):
    """Grads of x, of the branch's weights and of scaling against the same computation in float64."""
    batch, tokens, dim, drop_rate = 7, 3, 8, 0.4
    x = torch.randn(batch, tokens, dim).to(dtype).to(device).requires_grad_()
    scaling = torch.randn(dim, device=device).requires_grad_()
    branch = Branch(dim, dtype, device)
    grad_output = torch.randn(batch, tokens, dim).to(dtype).to(device)
    with dino_kernels.backend(backend):
        out = dino_kernels.drop_add_residual(x, branch, drop_rate, generator=torch.Generator().manual_seed(5),
                                             scaling=scaling)
        grads = torch.autograd.grad(out, [x, scaling, *branch.parameters()], grad_output)
    branch64 = _copy_to_float64(branch)
    x64, scaling64 = _float64(x, scaling)
    out64 = reference.drop_add_residual(x64, branch64, drop_rate, generator=torch.Generator().manual_seed(5),
                                        scaling=scaling64)
    grads64 = torch.autograd.grad(out64, [x64, scaling64, *branch64.parameters()], grad_output.double())
    # fp16, bf16: the branch itself runs in that dtype, so the bound is flash-attn's rule: at most twice the error of
    # the same computation done by the plain-PyTorch reference in that dtype (plus the dtype's rounding floor).
    with dino_kernels.backend("reference"):
        out_ref = reference.drop_add_residual(x, branch, drop_rate, generator=torch.Generator().manual_seed(5),
                                              scaling=scaling)
        grads_ref = torch.autograd.grad(out_ref, [x, scaling, *branch.parameters()], grad_output)
    assert rel_error(out, out64) <= max(2 * rel_error(out_ref, out64), TOLERANCE[dtype])
    for i, (got, ref, want) in enumerate(zip(grads, grads_ref, grads64)):
        bound = TOLERANCE[dtype] if dtype == torch.float32 else max(2 * rel_error(ref, want), TOLERANCE[dtype])
        assert rel_error(got, want) <= bound, (i, rel_error(got, want), rel_error(ref, want))


@pytest.mark.parametrize("backend,device,dtype", DEVICE_CASES)
def test_drop_add_residual_multi_crop(backend, device, dtype):
    """Two crop groups of different N: one packed branch call, each group its own subset, grads in float64."""
    dim, drop_rate = 8, 0.4
    xs = [torch.randn(shape).to(dtype).to(device).requires_grad_() for shape in ((5, 6, dim), (7, 2, dim))]
    scaling = torch.randn(dim, device=device).requires_grad_()
    branch = PackedBranch(dim, dtype, device)
    grad_outputs = [torch.randn_like(x) for x in xs]
    with dino_kernels.backend(backend):
        outs = dino_kernels.drop_add_residual(xs, branch, drop_rate, generator=torch.Generator().manual_seed(1),
                                              scaling=scaling)
        grads = torch.autograd.grad(outs, [*xs, scaling, *branch.parameters()], grad_outputs)
    (packed, residual, cu_seqlens, max_seqlen), = branch.calls
    keeps = [max(int(x.shape[0] * (1 - drop_rate)), 1) for x in xs]  # 3 of 5, 4 of 7
    assert packed.shape == (keeps[0] * 6 + keeps[1] * 2, dim) and max_seqlen == 6
    assert cu_seqlens.tolist() == [0, 6, 12, 18, 20, 22, 24, 26]
    offset = 0
    for x, out, keep in zip(xs, outs, keeps):
        rows = keep * x.shape[1]
        _check_rows(out.detach(), x.detach(), packed[offset:offset + rows].view(keep, *x.shape[1:]),
                    residual[offset:offset + rows].view(keep, *x.shape[1:]), x.shape[0] / keep, scaling.detach(),
                    dtype)
        offset += rows
    branch64 = _copy_to_float64(branch)
    xs64 = _float64(*xs)
    scaling64 = _float64(scaling)[0]
    outs64 = reference.drop_add_residual(xs64, branch64, drop_rate, generator=torch.Generator().manual_seed(1),
                                         scaling=scaling64)
    grads64 = torch.autograd.grad(outs64, [*xs64, scaling64, *branch64.parameters()],
                                  [g.double() for g in grad_outputs])
    outs_ref = reference.drop_add_residual(xs, branch, drop_rate, generator=torch.Generator().manual_seed(1),
                                           scaling=scaling)
    grads_ref = torch.autograd.grad(outs_ref, [*xs, scaling, *branch.parameters()], grad_outputs)
    for out, out64 in zip(outs, outs64):
        assert rel_error(out, out64) <= TOLERANCE[dtype]
    for i, (got, ref, want) in enumerate(zip(grads, grads_ref, grads64)):
        bound = TOLERANCE[dtype] if dtype == torch.float32 else max(2 * rel_error(ref, want), TOLERANCE[dtype])
        assert rel_error(got, want) <= bound, (i, rel_error(got, want), rel_error(ref, want))


def test_drop_add_residual_multi_crop_with_packed_attention():
    """The branch the trainer runs: dino_kernels.packed_attention on the packed kept crops (cu_seqlens as given)."""
    xs = [torch.randn(4, 9, 16), torch.randn(6, 3, 16)]
    scaling = torch.randn(16)

    def attention(packed, cu_seqlens, max_seqlen):
        tokens = packed.view(-1, 1, 16)
        return dino_kernels.packed_attention(tokens, tokens, tokens, cu_seqlens, max_seqlen).view_as(packed)

    outs = dino_kernels.drop_add_residual(xs, attention, 0.5, generator=torch.Generator().manual_seed(7),
                                          scaling=scaling)
    generator = torch.Generator().manual_seed(7)  # the same draws, group after group
    for x, out in zip(xs, outs):
        keep = x.shape[0] // 2
        kept = torch.randperm(x.shape[0], generator=generator)[:keep]
        expected = x.double().clone()
        for b in kept.tolist():
            image = x[b].double()
            expected[b] += 2.0 * scaling.double() * (torch.softmax(image @ image.T / 4.0, dim=-1) @ image)
        assert rel_error(out, expected) <= TOLERANCE[torch.float32]


def test_drop_add_residual_multi_crop_eval_and_keep_all():
    xs = [torch.randn(2, 3, 4), torch.randn(1, 5, 4)]
    branch = PackedBranch(4)
    with torch.no_grad():
        outs = dino_kernels.drop_add_residual(xs, branch, 0.3, training=False)
        kept_all = dino_kernels.drop_add_residual(xs, branch, 0.0)
    (packed, residual, cu_seqlens, max_seqlen), _ = branch.calls
    assert torch.equal(packed, torch.cat([x.reshape(-1, 4) for x in xs]))
    assert cu_seqlens.tolist() == [0, 3, 6, 11] and max_seqlen == 5
    expected = [x.double() + r.double().view_as(x) for x, r in zip(xs, residual.split([6, 5]))]
    for out, again, want in zip(outs, kept_all, expected):
        assert rel_error(out, want) <= TOLERANCE[torch.float32]
        assert torch.equal(out, again)


def test_drop_add_residual_matches_dinov2_under_a_fixed_permutation():
    """Same generator state -> the same subset as DINOv2's randperm(B)[:keep], bit for bit on the kept rows."""
    x, branch = torch.randn(9, 4, 6), Branch(6)
    generator = torch.Generator().manual_seed(11)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(11))[: int(9 * (1 - 0.3))]
    with torch.no_grad():
        out = dino_kernels.drop_add_residual(x, branch, 0.3, generator=generator)
        # DINOv2 drop_add_residual_stochastic_depth with this permutation (layers/block.py).
        residual = branch.net(x[perm])
        dinov2 = torch.index_add(x.flatten(1), 0, perm, residual.flatten(1), alpha=9 / len(perm)).view_as(x)
    assert torch.equal(branch.calls[0][0], x[perm])
    assert rel_error(out, dinov2) <= TOLERANCE[torch.float32]


def test_drop_add_residual_under_autocast():
    x, scaling, branch = torch.randn(6, 3, 8), torch.randn(8, requires_grad=True), Branch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dino_kernels.drop_add_residual(x, branch, 0.5, generator=torch.Generator().manual_seed(2),
                                             scaling=scaling)
    (branch_in, branch_out), = branch.calls
    assert branch_out.dtype == torch.bfloat16 and out.dtype == torch.float32
    _check_rows(out.detach(), x, branch_in, branch_out.float(), 2.0, scaling.detach(), torch.float32)
    out.sum().backward()
    assert scaling.grad is not None and torch.isfinite(scaling.grad).all()


def test_drop_add_residual_under_torch_compile():
    x, scaling, branch = torch.randn(6, 3, 8, requires_grad=True), torch.randn(8, requires_grad=True), Branch(8)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def block(x, scaling, kept):
        subset = dino_kernels.index_select_cat([x], [kept]).view(len(kept), 3, 8)
        return dino_kernels.scaled_index_add(x, kept, branch.net(subset), alpha=6 / len(kept), scaling=scaling)

    kept = torch.tensor([4, 0, 2])
    grad_output = torch.randn(6, 3, 8)
    out = block(x, scaling, kept)
    grads = torch.autograd.grad(out, [x, scaling], grad_output)
    expected = reference.scaled_index_add(x, kept, branch.net(x[kept]), alpha=2.0, scaling=scaling)
    expected_grads = torch.autograd.grad(expected, [x, scaling], grad_output)
    assert rel_error(out, expected) <= TOLERANCE[torch.float32]
    for got, want in zip(grads, expected_grads):
        assert rel_error(got, want) <= TOLERANCE[torch.float32]
    compiled = torch.compile(dino_kernels.drop_add_residual, backend="aot_eager")
    out = compiled(x, branch, 0.5, generator=torch.Generator().manual_seed(4), scaling=scaling)
    eager = dino_kernels.drop_add_residual(x, branch, 0.5, generator=torch.Generator().manual_seed(4), scaling=scaling)
    assert torch.equal(out, eager)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.zeros(4, 3), torch.tensor([4]), torch.zeros(1, 3)), {}, IndexError, r"index .*\[0, 4\)"),
        ((torch.zeros(4, 3), torch.tensor([-1]), torch.zeros(1, 3)), {}, IndexError, "index"),
        ((torch.zeros(4, 3), torch.tensor([0, 1]), torch.zeros(3, 3)), {}, ValueError, "one row per index"),
        ((torch.zeros(4, 3), torch.tensor([0]), torch.zeros(1, 2)), {}, ValueError, r"src must have shape"),
        ((torch.zeros(4, 3), torch.tensor([0]), torch.zeros(1, 1, 3)), {}, ValueError, r"src must have shape"),
        ((torch.zeros(4, 3), torch.tensor([0.0]), torch.zeros(1, 3)), {}, TypeError, "index must have dtype"),
        ((torch.zeros(4, 3), torch.tensor([[0]]), torch.zeros(1, 3)), {}, ValueError, "index must be 1-d"),
        ((torch.zeros(4, 3), [0], torch.zeros(1, 3)), {}, TypeError, "index must be a torch.Tensor"),
        ((torch.zeros(4), torch.tensor([0]), torch.zeros(1)), {}, ValueError, "at least 2 dims"),
        ((torch.zeros(4, 3, dtype=torch.int64), torch.tensor([0]), torch.zeros(1, 3)), {}, TypeError, "x must"),
        ((torch.zeros(4, 3), torch.tensor([0]), torch.zeros(1, 3)), {"scaling": torch.zeros(4)}, ValueError,
         r"scaling must have shape \(3,\)"),
        ((torch.zeros(4, 3), torch.tensor([0]), torch.zeros(1, 3)), {"alpha": "2"}, TypeError, "alpha"),
        ((torch.zeros(4, 3), torch.tensor([0], device="meta"), torch.zeros(1, 3)), {}, ValueError, "index is on"),
    ],
)
def test_scaled_index_add_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        dino_kernels.scaled_index_add(*args, **kwargs)


@pytest.mark.parametrize(
    "xs,indices,error,match",
    [
        ([torch.zeros(3, 2, 4)], [torch.tensor([3])], IndexError, r"indices\[0\] .*\[0, 3\)"),
        ([torch.zeros(3, 2, 4), torch.zeros(2, 2, 4)], [torch.tensor([0]), torch.tensor([-2])], IndexError,
         r"indices\[1\]"),
        ([torch.zeros(3, 2, 4), torch.zeros(2, 2, 5)], [torch.tensor([0]), torch.tensor([0])], ValueError,
         "last dim"),
        ([torch.zeros(3, 2, 4), torch.zeros(2, 2, 4).half()], [torch.tensor([0]), torch.tensor([0])], TypeError,
         "one dtype"),
        ([torch.zeros(3, 2, 4)], [torch.tensor([0]), torch.tensor([0])], ValueError, "one index per group"),
        ([], [], ValueError, "at least one"),
        ([torch.zeros(3)], [torch.tensor([0])], ValueError, "at least 2 dims"),
    ],
)
def test_index_select_cat_bad_input(xs, indices, error, match):
    with pytest.raises(error, match=match):
        dino_kernels.index_select_cat(xs, indices)


@pytest.mark.parametrize(
    "x,branch,drop_rate,kwargs,error,match",
    [
        (torch.zeros(4, 2, 3), lambda t: t, 1.0, {}, ValueError, r"drop_rate must be in \[0, 1\)"),
        (torch.zeros(4, 2, 3), lambda t: t, -0.1, {}, ValueError, "drop_rate"),
        (torch.zeros(4, 2, 3), lambda t: t, 1.5, {}, ValueError, "drop_rate"),
        (torch.zeros(4, 2, 3), lambda t: t, True, {}, TypeError, "drop_rate"),
        (torch.zeros(4, 2, 3), lambda t: t[:, :1], 0.5, {}, ValueError, "branch must return the shape"),
        (torch.zeros(4, 2, 3), lambda t: None, 0.5, {}, TypeError, "branch must return a torch.Tensor"),
        (torch.zeros(4, 2, 3), "not callable", 0.5, {}, TypeError, "branch must be callable"),
        (torch.zeros(4, 3), lambda t: t, 0.5, {}, ValueError, r"x must be \(B, N, D\)"),
        (torch.zeros(4, 2, 3), lambda t: t, 0.5, {"scaling": torch.zeros(2)}, ValueError, "scaling"),
        (torch.zeros(4, 2, 3), lambda t: t, 0.5, {"generator": 3}, TypeError, "generator"),
        ([torch.zeros(4, 2, 3), torch.zeros(4, 2, 5)], lambda t, c, m: t, 0.5, {}, ValueError, "crop group"),
        ([], lambda t, c, m: t, 0.5, {}, ValueError, "at least one crop group"),
        ((torch.zeros(4, 2, 3),), lambda t, c, m: t[1:], 0.5, {}, ValueError, "branch must return the shape"),
        ("x", lambda t: t, 0.5, {}, TypeError, "x must be a tensor"),
    ],
)
def test_drop_add_residual_bad_input(x, branch, drop_rate, kwargs, error, match):
    with pytest.raises(error, match=match):
        dino_kernels.drop_add_residual(x, branch, drop_rate, **kwargs)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backend_rejects_float64_clearly(device):
    x = torch.zeros(3, 2, dtype=torch.float64, device=device)
    with dino_kernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        dino_kernels.scaled_index_add(x, torch.tensor([0], device=device), x[:1])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernels_never_leave_the_tensors_for_unchecked_indices(device):
    """The ops behind the public checks (torch.compile skips them) mask out-of-range rows instead of reading or
    writing outside the tensors: the gather yields zeros, the add ignores them."""
    x, src = torch.randn(3, 2, 4, device=device), torch.randn(2, 2, 4, device=device)
    index = torch.tensor([5, 1], device=device)
    with dino_kernels.backend("triton"):
        gathered = torch.ops.dino_kernels.index_select_cat([x], [torch.tensor([1, 7, -1], device=device)])
        added = torch.ops.dino_kernels.scaled_index_add(x, index, src, None, 1.0)
    assert torch.equal(gathered[:2], x[1]) and torch.equal(gathered[2:], torch.zeros(4, 4, device=device))
    assert torch.equal(added[[0, 2]], x[[0, 2]]) and torch.allclose(added[1], x[1] + src[1])


def _view_in_buffer(shape, device, margin=1024):
    """A contiguous tensor of ``shape`` carved out of a larger random buffer, ``margin`` elements in, the buffer and
    a copy of it (to compare the elements around the view with)."""
    n = math.prod(shape)
    buffer = torch.randn(n + 2 * margin, device=device)
    return buffer[margin:margin + n].view(shape), buffer, buffer.clone()


def _assert_only_view_changed(view, buffer, before):
    start = view.data_ptr() // view.element_size() - buffer.data_ptr() // buffer.element_size()
    outside = torch.ones(buffer.numel(), dtype=torch.bool, device=buffer.device)
    outside[start:start + view.numel()] = False
    assert torch.equal(buffer[outside], before[outside])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("with_scaling", [False, True])
@pytest.mark.parametrize("shape,rows", [((5, 67, 260), [4, 0, 4, 2]), ((6, 13), [5, 1, 2, 5]), ((3, 37, 9), [0, 2]),
                                        ((4, 2, 3, 5), [3])])
def test_triton_launchers_write_only_their_output(device, with_scaling, shape, rows):
    """The Triton launchers write into the ``out`` they are given: as a view into a larger buffer it gets every
    row right and not one element around it changes (a tile mask one element too wide writes past the last row,
    which no comparison of the output alone can see). Both tiles, partial tiles in both directions, the last row
    a target."""
    x = torch.randn(shape, device=device)
    index = torch.tensor(rows, device=device)
    src = torch.randn(len(rows), *shape[1:], device=device)
    scaling = torch.randn(shape[-1], device=device) if with_scaling else None
    factor = 1.0 if scaling is None else scaling.double()

    added, buffer, before = _view_in_buffer(shape, device)
    stochastic_depth._index_add_triton(x, index, src, added, 1.5, scaling)
    expected = x.double().index_add(0, index, src.double() * factor, alpha=1.5)
    assert rel_error(added, expected) <= TOLERANCE[torch.float32]
    _assert_only_view_changed(added, buffer, before)

    gathered, buffer, before = _view_in_buffer(src.shape, device)
    product = stochastic_depth._gather_triton(x, index, gathered, 1.5, scaling, src if with_scaling else None)
    assert rel_error(gathered, 1.5 * x.double()[index] * factor) <= TOLERANCE[torch.float32]
    _assert_only_view_changed(gathered, buffer, before)
    if with_scaling:  # the gradient of the LayerScale: sum over rows and tokens of alpha * x[index] * src
        expected_product = 1.5 * (x.double()[index] * src.double()).reshape(-1, shape[-1]).sum(0)
        assert rel_error(product, expected_product) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------------------------------ registration and AOT
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    ops = torch.ops.dino_kernels
    x, src, scaling = torch.randn(5, 3, 4), torch.randn(3, 3, 4, requires_grad=True), torch.randn(4)
    index = torch.tensor([4, 0, 4])
    grad = torch.randn(5, 3, 4)
    xs = [torch.randn(4, 2, 4, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True)]
    indices = [torch.tensor([3, 1]), torch.tensor([2], dtype=torch.int32)]
    cases = [
        (ops.scaled_index_add.default, (x.requires_grad_(), index, src, scaling.requires_grad_(), 1.5)),
        (ops.scaled_index_add.default, (x, None, torch.randn(5, 3, 4), None, 1.0)),
        (ops.scaled_index_add_backward.default, (grad, index, src.detach(), scaling.detach(), 1.5, True)),
        (ops.scaled_index_add_backward.default, (grad, None, torch.randn(5, 3, 4), None, 1.0, False)),
        (ops.index_select_cat.default, (xs, indices)),
        (ops.index_select_cat_backward.default, (torch.randn(9, 4), indices, [4, 3], [2, 5])),
        # The multi-crop residual add, one group subsampled and one whole (None), with and without LayerScale.
        (ops.scaled_index_add_cat.default, ([x.detach().requires_grad_() for x in xs], [indices[0], None],
                                            torch.randn(19, 4, requires_grad=True), scaling, [2.0, 1.0])),
        (ops.scaled_index_add_cat.default, ([x.detach() for x in xs], [None, indices[1]],
                                            torch.randn(13, 4, requires_grad=True), None, [1.0, 3.0])),
        (ops.scaled_index_add_cat_backward.default, ([torch.randn(4, 2, 4), torch.randn(3, 5, 4)],
                                                     [indices[0], None], torch.randn(19, 4), scaling.detach(),
                                                     [2.0, 1.0], True)),
    ]
    with dino_kernels.backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registered_ops_match_the_eager_path(backend):
    """Eager calls skip the custom-op wrapper (its per-call cost); the registered ops, which torch.compile sees,
    give the same values and gradients."""
    xs = [torch.randn(5, 3, 4, requires_grad=True), torch.randn(4, 2, 4, requires_grad=True)]
    indices = [torch.tensor([4, 0, 4]), torch.tensor([1, 3], dtype=torch.int32)]
    scaling = torch.randn(4, requires_grad=True)
    with dino_kernels.backend(backend):
        results = []
        for gather, add in ((dino_kernels.index_select_cat, dino_kernels.scaled_index_add),
                            (torch.ops.dino_kernels.index_select_cat,
                             lambda x, i, s, alpha, scaling: torch.ops.dino_kernels.scaled_index_add(x, i, s, scaling,
                                                                                                     alpha))):
            packed = gather(xs, indices)
            out = add(xs[0], indices[0], packed[:9].view(3, 3, 4) * 2, alpha=1.5, scaling=scaling)
            results.append((out, torch.autograd.grad(out, [*xs, scaling], torch.randn(5, 3, 4,
                                                     generator=torch.Generator().manual_seed(0)))))
    (eager, eager_grads), (registered, registered_grads) = results
    assert torch.equal(eager, registered)
    for a, b in zip(eager_grads, registered_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multi_crop_residual_add_registered_and_compiled(backend):
    """The multi-crop form's residual add (one op over every group, from the packed branch output): the registered
    op gives the eager path's values and gradients, and drop_add_residual on crop groups compiles to the same."""
    xs = [torch.randn(5, 3, 4, requires_grad=True), torch.randn(4, 2, 4, requires_grad=True)]
    indices = [torch.tensor([4, 0, 1]), None]
    packed = torch.randn(3 * 3 + 4 * 2, 4, requires_grad=True)
    scaling = torch.randn(4, requires_grad=True)
    grad_outputs = [torch.randn_like(x) for x in xs]
    with dino_kernels.backend(backend):
        results = []
        for add in (stochastic_depth._scaled_index_add_cat_op, torch.ops.dino_kernels.scaled_index_add_cat):
            outs = add(xs, indices, packed, scaling, [5 / 3, 1.0])
            results.append((outs, torch.autograd.grad(outs, [*xs, packed, scaling], grad_outputs)))
        (eager, eager_grads), (registered, registered_grads) = results
        for a, b in zip([*eager, *eager_grads], [*registered, *registered_grads]):
            assert torch.equal(a, b)

        branch = lambda packed, cu_seqlens, max_seqlen: packed * 2  # noqa: E731
        compiled = torch.compile(dino_kernels.drop_add_residual, backend="aot_eager")
        outs = compiled(xs, branch, 0.5, generator=torch.Generator().manual_seed(4), scaling=scaling)
        expected = dino_kernels.drop_add_residual(xs, branch, 0.5, generator=torch.Generator().manual_seed(4),
                                                  scaling=scaling)
        grads = torch.autograd.grad(outs, [*xs, scaling], grad_outputs)
        expected_grads = torch.autograd.grad(expected, [*xs, scaling], grad_outputs)
    for a, b in zip([*outs, *grads], [*expected, *expected_grads]):
        assert torch.equal(a, b)


def _compiles(launches):
    """What a compile of each recorded launch depends on: the kernel, its config, the type of every argument as the
    AOT harness derives it, and the value of every flag (the constexpr variants)."""
    return {(kernel.name, id(config), tuple((name, value if isinstance(value, bool) else _arg_type(name, value))
                                            for name, value in sorted(args.items())))
            for kernel, args, config in launches}


@requires_interpreter
def test_aot_examples_cover_every_launch():
    """aot_examples(), which tests/test_build.py compiles for sm_80 and sm_90, makes every launch (kernel, config,
    argument types) that the ops make in fp32/fp16/bf16 with int32/int64 indices, with and without LayerScale and
    its gradient, on rows that take either tile. (Launching an undeclared config raises, and the harness fails on a
    declared config that no example launches.)"""
    with recording() as examples:
        stochastic_depth.aot_examples()
    with dino_kernels.backend("triton"), recording() as launched:
        for dtype, index_dtype, shape in itertools.product((torch.float32, torch.float16, torch.bfloat16),
                                                          (torch.int64, torch.int32), ((4, 37, 9), (6, 8))):
            index = torch.tensor([2, 0, 2], dtype=index_dtype)
            for needs in ((True, False), (False, True), (True, True)):  # grads of src, scaling
                x = torch.randn(shape).to(dtype).requires_grad_()
                src = torch.randn(3, *shape[1:]).to(dtype).requires_grad_(needs[0])
                for scaling in (None, torch.randn(shape[-1]).requires_grad_(needs[1])):
                    out = dino_kernels.scaled_index_add(x, index, src, alpha=0.5, scaling=scaling)
                    out.backward(torch.ones_like(out))
            dino_kernels.index_select_cat([x], [index]).sum().backward()
    assert {(kernel.name, id(config)) for kernel, _, config in launched} == {
        (kernel.name, id(config)) for kernel in (stochastic_depth.GATHER, stochastic_depth.INDEX_ADD)
        for config in kernel.configs}
    assert _compiles(launched) <= _compiles(examples)
    # The launchers pick the tile by the row's token count: few tokens the flat one, others the 32-token one.
    assert stochastic_depth._tile_config(1) is stochastic_depth.FLAT_CONFIG
    assert stochastic_depth._tile_config(257) is stochastic_depth.ROWS_CONFIG
    assert stochastic_depth._row_shape(257 * 1536, None) == (257 * 3, 512)
    assert stochastic_depth._row_shape(50 * 1024, 1024) == (50, 1024)


@requires_interpreter
def test_index_segments_are_built_once_per_index_version(monkeypatch):
    """The Triton index-add sorts an index tensor once (stochastic depth index-adds with one kept-sample index in the
    forward and again in the backward of its gather) and again after an in-place change of that index: results
    follow the current values, duplicates included."""
    sorts = []
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *args, **kwargs: sorts.append(1) or sort(*args, **kwargs))
    x, src = torch.randn(6, 3, 8), torch.randn(4, 3, 8)
    index = torch.tensor([4, 1, 4, 0])

    def check():
        with dino_kernels.backend("triton"):
            out = dino_kernels.scaled_index_add(x, index, src, alpha=1.5)
        expected = x.double().index_add(0, index, src.double(), alpha=1.5)
        assert rel_error(out, expected) <= TOLERANCE[torch.float32]

    check()
    check()
    assert len(sorts) == 1
    index.copy_(torch.tensor([2, 2, 5, 3]))  # in place: a new version
    check()
    assert len(sorts) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_after_inference_mode_with_the_same_shapes(backend):
    """pack() and drop_add_residual cache cu_seqlens and the identity index per shapes: first made under
    torch.inference_mode (an evaluation before training), they must still be tensors that a later training step's
    autograd can save."""
    xs = [torch.randn(3, 5, 32), torch.randn(4, 2, 32)]

    def branch(packed, cu_seqlens, max_seqlen):
        q = packed.view(-1, 2, 16)
        return dino_kernels.packed_attention(q, q, q, cu_seqlens, max_seqlen).view(-1, 32)

    with dino_kernels.backend(backend):
        with torch.inference_mode():
            dino_kernels.pack(xs)
            dino_kernels.drop_add_residual(xs, branch, 0.0, training=False)
        leaves = [x.clone().requires_grad_() for x in xs]
        outs = dino_kernels.drop_add_residual(leaves, branch, 0.0, training=False)
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(x) for x in xs])
    expected = reference.drop_add_residual([x.double().requires_grad_() for x in xs],
                                           lambda packed, cu, n: reference.packed_attention(
                                               packed.view(-1, 2, 16), packed.view(-1, 2, 16), packed.view(-1, 2, 16),
                                               cu).view(-1, 32), 0.0, training=False)
    for out, want in zip(outs, expected):
        assert rel_error(out, want) <= TOLERANCE[torch.float32]
    assert all(torch.isfinite(g).all() for g in grads)
