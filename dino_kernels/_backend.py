"""Which implementation an op runs: the process-wide backend switch.

Names:
- ``auto`` (default): CUDA tensors -> our GPU kernels, CPU tensors -> our C++ CPU kernels.
- ``reference``: the plain-PyTorch ops of :mod:`dino_kernels.reference` (the ground truth).
- ``cpu``: our C++ CPU kernels (CPU tensors only).
- ``cuda``: our GPU kernels (CUDA tensors only): the op's CUDA C++ kernel where it has one, else its Triton kernel.
- ``triton``: our Triton kernels; on CPU tensors too when ``TRITON_INTERPRET=1`` was set before Triton was
  imported (that is how CI proves them without a GPU).

The switch is process-wide rather than thread-local on purpose: autograd runs CUDA backward passes on its own
threads, and they must see the backend that the forward saw.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Literal

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# The dtypes every Triton kernel takes; float64 runs on the C++ CPU kernels or the reference.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Impl = Literal["reference", "cpu", "cuda", "triton"]
ENV_VAR = "DINO_KERNELS_BACKEND"


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown dino_kernels backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_current = _validate(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend name in force (see module docstring)."""
    return _current


def set_backend(name: str) -> None:
    """Set the process-wide backend: one of ``auto``, ``reference``, ``cpu``, ``cuda``, ``triton``."""
    global _current
    _current = _validate(name)


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager that runs its body under backend ``name`` and restores the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


DEBUG_ENV_VAR = "DINO_KERNELS_DEBUG"


def debug_enabled() -> bool:
    """``DINO_KERNELS_DEBUG=1``: ops also check index and ``cu_seqlens`` values of CUDA tensors on the host.

    That gives a precise Python error at the cost of a host sync per call; without it, CUDA launches guard their
    memory accesses and fail through a device-side assert instead.
    """
    return os.environ.get(DEBUG_ENV_VAR, "0") == "1"


def device_guard(device: torch.device) -> AbstractContextManager:
    """Context in which ``device`` is the current CUDA device (a no-op for other devices).

    Triton launches a kernel on the current device and its current stream, not on its tensors' device: every Triton
    launch runs inside this guard, so that tensors on ``cuda:1`` work while ``cuda:0`` is current.
    """
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype every op accumulates in: float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve(device: torch.device, op: str, dtype: torch.dtype | None = None, *,
            cuda_runs_triton: bool = False) -> Impl:
    """The implementation ``op`` runs for tensors on ``device`` (of ``dtype``) under the current backend.

    Raises ``ValueError`` when the requested backend cannot serve that device, ``TypeError`` when the Triton kernels
    are asked for a dtype outside :data:`TRITON_DTYPES`: under the ``triton`` backend, and for ops whose CUDA
    implementation is their Triton kernels (``cuda_runs_triton``) also under ``auto``/``cuda`` on CUDA tensors.
    """
    name = get_backend()
    is_cuda = device.type == "cuda"
    if name == "reference":
        return "reference"
    if name == "auto" and not is_cuda:
        return "cpu"
    if name == "cpu" and is_cuda:
        raise ValueError(f"{op}: backend 'cpu' runs on CPU tensors only, got tensors on {device}")
    if name == "cuda" and not is_cuda:
        raise ValueError(f"{op}: backend 'cuda' runs on CUDA tensors only, got tensors on {device}")
    if name == "triton" and not is_cuda and not triton_interpreting():
        raise ValueError(
            f"{op}: backend 'triton' on {device} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or use CUDA tensors"
        )
    impl = "cuda" if name == "auto" else name
    if dtype is not None and dtype not in TRITON_DTYPES and (impl == "triton" or impl == "cuda" and cuda_runs_triton):
        raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16 tensors; got {dtype}. For "
                        "float64 use CPU tensors (the 'auto' or 'cpu' backend) or the 'reference' backend")
    return impl  # type: ignore[return-value]
