"""One small case of every kernel, forward and backward, checked against the float64 reference.

Made to run under ``compute-sanitizer`` (memcheck, racecheck) on a GPU machine, where each launch costs ~100x its
normal time, and to prove its own plumbing on CPU:

    python -m benchmarks.kernel_cases --device cuda            # every CUDA C++ and Triton kernel, once each
    compute-sanitizer --tool memcheck python -m benchmarks.kernel_cases --device cuda
    python -m benchmarks.kernel_cases --device cpu             # the C++ CPU kernels (and the same checks)

Shapes are odd on purpose (tails in every tile). Exits 1 when a result differs from the reference beyond the
dtype's tolerance, so a kernel that reads or writes the wrong place fails here even where the sanitizer is missing.
Then every C++ op gets one bad input: each must raise a Python error, never crash (on the GPU machines' build an
error path of the C++ EMA check once segfaulted; this proves the C++ error paths there).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import dino_kernels
from dino_kernels import reference
from dino_kernels.ibot_patch_loss import ibot_patch_loss

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def _case_dino_loss(device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    b, k = 3, 1000
    student = (torch.rand(b * 6, k, device=device) * 2 - 1).to(dtype).requires_grad_()
    teacher = (torch.rand(b * 2, k, device=device) * 2 - 1).to(dtype)
    center = torch.randn(1, k, device=device) * 0.1
    loss = dino_kernels.dino_loss(student, teacher, center)
    (grad,) = torch.autograd.grad(loss * 1.7, student)
    ref_student = student.detach().double().requires_grad_()
    ref_loss = reference.dino_loss(ref_student, teacher.double(), center.double())
    (ref_grad,) = torch.autograd.grad(ref_loss * 1.7, ref_student)
    return [("loss", _rel_error(loss, ref_loss)), ("grad", _rel_error(grad, ref_grad))]


def _case_ibot_patch_loss(device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    m, k = 37, 1000
    student = (torch.rand(m, k, device=device) * 2 - 1).to(dtype).requires_grad_()
    teacher = (torch.rand(m, k, device=device) * 2 - 1).to(dtype)
    center = torch.randn(1, k, device=device) * 0.1
    weights = torch.rand(m, device=device)
    loss = ibot_patch_loss(student, teacher, center, weights, n_images=5)
    (grad,) = torch.autograd.grad(loss * 1.7, student)
    ref_student = student.detach().double().requires_grad_()
    ref_loss = reference.ibot_patch_loss(ref_student, teacher.double(), center.double(), weights.double(), n_images=5)
    (ref_grad,) = torch.autograd.grad(ref_loss * 1.7, ref_student)
    return [("loss", _rel_error(loss, ref_loss)), ("grad", _rel_error(grad, ref_grad))]


def _case_sinkhorn_knopp(device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    from dino_kernels.sinkhorn_knopp import sinkhorn_knopp

    teacher = (torch.rand(11, 2100, device=device) * 6 - 3).to(dtype)  # a sharp teacher at τt = 0.04
    student = (torch.rand(3 * 4, 2100, device=device) * 2 - 1).to(dtype).requires_grad_()
    targets = sinkhorn_knopp(teacher, 0.04, 3)
    ref_targets = reference.sinkhorn_knopp(teacher.double(), 0.04, 3)
    center = torch.zeros(2100, device=device)
    loss = dino_kernels.dino_loss(student, teacher[:6], center, centering="sinkhorn_knopp")
    (grad,) = torch.autograd.grad(loss * 1.7, student)
    ref_student = student.detach().double().requires_grad_()
    ref_loss = reference.dino_loss(ref_student, teacher[:6].double(), center.double(), centering="sinkhorn_knopp")
    (ref_grad,) = torch.autograd.grad(ref_loss * 1.7, ref_student)
    return [("targets", _rel_error(targets, ref_targets)), ("loss", _rel_error(loss, ref_loss)),
            ("grad", _rel_error(grad, ref_grad))]


def _case_packed_attention(device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    heads, dim = 3, 64
    xs = [torch.empty(2, 67, 1), torch.empty(5, 13, 1)]  # one multi-block sequence length, one short one
    _, cu_seqlens, max_seqlen = dino_kernels.pack([x.to(device) for x in xs])
    total = int(cu_seqlens[-1])
    qkv = torch.randn(total, 3, heads, dim, device=device).to(dtype).requires_grad_()
    q, k, v = qkv.unbind(1)  # strided views, as a ViT block makes them
    out = dino_kernels.packed_attention(q, k, v, cu_seqlens, max_seqlen)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref_out = reference.packed_attention(*ref_qkv.unbind(1), cu_seqlens)
    (ref_grad,) = torch.autograd.grad(ref_out, ref_qkv, grad_out.double())
    return [("out", _rel_error(out, ref_out)), ("grad qkv", _rel_error(grad, ref_grad))]


def _case_stochastic_depth(device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    x = torch.randn(7, 5, 33, device=device).to(dtype).requires_grad_()
    src = torch.randn(4, 5, 33, device=device).to(dtype).requires_grad_()
    index = torch.tensor([5, 0, 5, 2], device=device)  # a duplicate index accumulates
    scaling = torch.randn(33, device=device).requires_grad_()
    out = dino_kernels.scaled_index_add(x, index, src, alpha=1.75, scaling=scaling)
    gathered = dino_kernels.index_select_cat([x, src], [index[:3], torch.tensor([3, 1], device=device)])
    grad_out, grad_gathered = torch.randn_like(out), torch.randn_like(gathered)
    grads = torch.autograd.grad((out, gathered), (x, src, scaling), (grad_out, grad_gathered))
    leaves = [t.detach().double().requires_grad_() for t in (x, src, scaling)]
    ref_out = reference.scaled_index_add(leaves[0], index, leaves[1], alpha=1.75, scaling=leaves[2])
    ref_gathered = reference.index_select_cat([leaves[0], leaves[1]], [index[:3], torch.tensor([3, 1], device=device)])
    ref_grads = torch.autograd.grad((ref_out, ref_gathered), leaves, (grad_out.double(), grad_gathered.double()))
    checks = [("scaled_index_add", _rel_error(out, ref_out)), ("index_select_cat", _rel_error(gathered, ref_gathered))]
    names = ("x", "src", "scaling")
    return checks + [(f"grad {name}", _rel_error(g, r)) for name, g, r in zip(names, grads, ref_grads)]


def _case_ema(device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    shapes = [(3, 5), (1001,), (17, 3, 3), (4096 + 7,)]
    teacher = [torch.randn(s, device=device) for s in shapes]
    student = [torch.randn(s, device=device).to(dtype) for s in shapes]
    expected = [t.double() * 0.996 + s.double() * (1 - 0.996) for t, s in zip(teacher, student)]
    dino_kernels.ema_(teacher, student, 0.996)
    return [(f"tensor {i}", _rel_error(t, e)) for i, (t, e) in enumerate(zip(teacher, expected))]


def _case_koleo(device: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    from dino_kernels.koleo import koleo_loss

    features = torch.randn(67, 130, device=device).to(dtype).requires_grad_()  # row and D tails in every tile
    loss = koleo_loss(features)
    (grad,) = torch.autograd.grad(loss * 1.7, features)
    ref_features = features.detach().double().requires_grad_()
    ref_loss = reference.koleo_loss(ref_features)
    (ref_grad,) = torch.autograd.grad(ref_loss * 1.7, ref_features)
    return [("loss", _rel_error(loss, ref_loss)), ("grad", _rel_error(grad, ref_grad))]


def _bad_inputs(device: str) -> list[tuple[str, Callable[[], object]]]:
    """One call per C++ entry point that its own checks must reject (past the Python checks where there are any)."""
    from dino_kernels._extension import ops

    buffer, x = torch.randn(30, device=device), torch.randn(4, 8)
    cu = torch.tensor([0, 1, 4], dtype=torch.int32)
    return [
        ("ema_ shapes", lambda: dino_kernels.ema_([torch.randn(3, device=device)], [torch.randn(4, device=device)],
                                                  0.5)),
        ("ema_ overlap", lambda: dino_kernels.ema_([buffer[0:10], buffer[5:15]], [buffer[:10].clone()] * 2, 0.5)),
        ("attention C++ cu_seqlens", lambda: ops().packed_attention_fwd_cpu(
            x.view(4, 2, 4), x.view(4, 2, 4), x.view(4, 2, 4), cu.flip(0), 0.5)),
        ("dino_loss C++ rescale", lambda: ops().dino_loss_rescale_cpu_(x, torch.ones(3), 1.0)),
        ("koleo C++ neighbours", lambda: ops().koleo_backward_cpu(torch.ones(()), x, x, torch.full((4,), 4), x[:, 0],
                                                                  x[:, 0], 1e-8)),
        ("sinkhorn_knopp C++ shapes", lambda: ops().sinkhorn_knopp_write_cpu(x, torch.zeros(7), x[:, 0], x[:, 0], 0.1)),
        ("ibot_patch_loss C++ shapes", lambda: ops().ibot_patch_loss_cpu(x, x[:3], torch.zeros(8), torch.zeros(4), None,
                                                                          None, 0.1, 0.07, True)),
    ]


CASES: dict[str, Callable[[str, torch.dtype], list[tuple[str, float]]]] = {
    "dino_loss": _case_dino_loss,
    "ibot_patch_loss": _case_ibot_patch_loss,
    "sinkhorn_knopp": _case_sinkhorn_knopp,
    "packed_attention": _case_packed_attention,
    "stochastic_depth": _case_stochastic_depth,
    "ema": _case_ema,
    "koleo": _case_koleo,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        help="input dtypes (bfloat16 is skipped under the Triton interpreter)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: cuda and triton on CUDA (CUDA C++ where an op has it, and Triton), auto on CPU")
    args = parser.parse_args(argv)
    backends = args.backends or (["cuda", "triton"] if args.device.startswith("cuda") else ["auto"])
    failures = 0
    for backend in backends:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for name, case in CASES.items():
                torch.manual_seed(0)
                with dino_kernels.backend(backend):
                    results = case(args.device, dtype)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                bad = [(what, err) for what, err in results if not err <= TOLERANCE[dtype]]
                failures += bool(bad)
                worst = max(err for _, err in results)
                status = "FAIL " + ", ".join(f"{w}: {e:.2e}" for w, e in bad) if bad else "ok"
                print(f"{backend:7s} {dtype_name:9s} {name:17s} max rel error {worst:.2e}  {status}", flush=True)
    for name, call in _bad_inputs(args.device):
        try:
            call()
            failures += 1
            print(f"bad input {name:25s} FAIL: no error raised", flush=True)
        except (ValueError, TypeError, IndexError, RuntimeError) as error:
            print(f"bad input {name:25s} ok: {type(error).__name__}", flush=True)
    print(f"kernel cases: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
