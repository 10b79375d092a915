"""Test setup: on a machine without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before anything imports triton (importing torch does not), hence at the top.
On a GPU machine the Triton kernels compile for real and the tests marked ``cuda`` (across the test files) run them
on CUDA tensors: ``pytest -m cuda`` selects exactly those. Without a GPU they are skipped.
"""

import multiprocessing
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import dino_kernels  # noqa: E402
from dino_kernels._launch import TritonKernel  # noqa: E402

# Implementations every op is proven under on CPU tensors: our C++ kernels (what `auto` picks for CPU tensors)
# and, where the interpreter is on, our Triton kernels.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ("auto", "triton") if INTERPRETING else ("auto",)
# For tests that run the `triton` backend on CPU tensors outside the CPU_BACKENDS parametrisation.
requires_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="Triton on CPU tensors needs the interpreter; on GPU machines the `cuda` tests run it"
)
HAS_CUDA = torch.cuda.is_available()
# Every dtype the GPU kernels take (bf16 included, which the interpreter cannot run).
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_param(*values, **kwargs):
    """A parametrize cell on CUDA tensors (marked ``cuda``, so ``pytest -m cuda`` selects it)."""
    return pytest.param(*values, marks=pytest.mark.cuda, **kwargs)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need CUDA tensors: skip them, with the reason, where there is no GPU."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="marked `cuda`: needs a CUDA GPU (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    torch.manual_seed(0)
    previous = dino_kernels.get_backend()
    yield
    dino_kernels.set_backend(previous)


@pytest.fixture
def no_tf32():
    """float32 matrix products and convolutions in full precision (TF32 off) for one test, restored after. Plain
    assignments: pytest's monkeypatch cannot restore these properties on every torch we support."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 when both are zero)."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0 else diff / denom


# Relative-error bounds per dtype of the kernel's inputs (DEVELOPERS' standards).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_loss_matches(ours, expected, grad_tolerance: float, tolerance: float = TOLERANCE[torch.float32]) -> None:
    """A DINO-family loss against its float64 reference: ours = (loss, grad, stats), expected = (loss, grad,
    (teacher_mean, teacher_entropy, kl)); the gradient within grad_tolerance, the rest within tolerance."""
    loss, grad, stats = ours
    loss_ref, grad_ref, (mean_ref, entropy_ref, kl_ref) = expected
    assert rel_error(loss, loss_ref) <= tolerance, rel_error(loss, loss_ref)
    assert rel_error(grad, grad_ref) <= grad_tolerance, rel_error(grad, grad_ref)
    assert rel_error(stats.teacher_mean, mean_ref) <= tolerance, rel_error(stats.teacher_mean, mean_ref)
    assert rel_error(stats.teacher_entropy, entropy_ref) <= tolerance, rel_error(stats.teacher_entropy, entropy_ref)
    assert rel_error(stats.kl, kl_ref) <= tolerance, rel_error(stats.kl, kl_ref)


def run_two_ranks(worker, tmp_path, *args) -> list:
    """Runs ``worker(rank, store, results, *args)`` in two spawned processes (a gloo group initialised from the file
    ``store``) and returns what each rank saved to ``f"{results}.{rank}"``, in rank order."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=worker, args=(rank, tmp_path / "store", tmp_path / "out", *args))
               for rank in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    return [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]


def implementations_run(module, monkeypatch) -> list[str]:
    """The implementations that ``module``'s ops run from here on, by name: ``cpp.<op>`` (an op of the C++
    extension), ``triton.<kernel>`` (a Triton launch), ``reference.<function>``."""
    calls: list[str] = []

    class Spy:
        def __init__(self, prefix, target):
            self.prefix, self.target = prefix, target

        def __getattr__(self, name):
            function = getattr(self.target, name)
            return lambda *args, **kwargs: (calls.append(f"{self.prefix}.{name}"), function(*args, **kwargs))[1]

    launch = TritonKernel.launch
    monkeypatch.setattr(TritonKernel, "launch", lambda kernel, grid, config, **args: (
        calls.append(f"triton.{kernel.name}"), launch(kernel, grid, config, **args))[1])
    monkeypatch.setattr(module, "reference", Spy("reference", module.reference))
    if hasattr(module, "ops"):
        ops = module.ops
        monkeypatch.setattr(module, "ops", lambda: Spy("cpp", ops()))
    return calls
