"""Host overhead of one op call: the eager ``KernelOp`` path against the registered custom op.

``dino_kernels.scaled_index_add`` on tiny CPU tensors (x (8, 4, 16) fp32 requiring grad, 4 index rows, src
(4, 4, 16)), so that the times are the Python and dispatcher work around a kernel, not the kernel. Providers:

- ``ours``: the public function (argument checks, then the ``KernelOp``'s eager path: one generic
  ``autograd.Function`` around the op's dispatch function);
- ``kernel_op``: the same ``KernelOp`` called without the public function's checks (what ``ours`` costs beyond
  them);
- ``custom_op``: ``torch.ops.dino_kernels.scaled_index_add(x, index, src, None, 1.0)``, the registered op that
  ``torch.compile`` sees, through the custom-op wrapper (its dispatcher and autograd registration).

Cases: forward only (x requires grad, so autograd records the node) and forward + backward. CPU only: the host
overhead is the same in front of a GPU kernel, where it is what a training step waits on at DINO's shapes.
"""

import pytest
import torch

import dino_kernels
from dino_kernels.stochastic_depth import _scaled_index_add_op

PROVIDERS = {
    "ours": lambda x, index, src: dino_kernels.scaled_index_add(x, index, src),
    "kernel_op": lambda x, index, src: _scaled_index_add_op(x, index, src, None, 1.0),
    "custom_op": lambda x, index, src: torch.ops.dino_kernels.scaled_index_add(x, index, src, None, 1.0),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_scaled_index_add_dispatch(benchmark, measure, bench_env, provider, backward):
    device = bench_env.device("cpu")
    x = torch.randn(8, 4, 16, device=device, requires_grad=True)
    index = torch.tensor([6, 1, 3, 0], device=device)
    src = torch.randn(4, 4, 16, device=device)
    grad_out = torch.randn(8, 4, 16, device=device)
    fn = PROVIDERS[provider]

    def step():
        out = fn(x, index, src)
        return torch.autograd.grad(out, [x], grad_out) if backward else out

    case = f"dispatch scaled_index_add {'fwd+bwd' if backward else 'fwd'} (8, 4, 16) fp32"
    benchmark.extra_info["what"] = "host overhead per call (tiny CPU tensors)"
    measure(benchmark, step, case=case, provider=provider, device=device, warmup=20)
