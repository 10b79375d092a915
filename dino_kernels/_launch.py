"""Triton kernels with their launch configs declared once, launched by keyword.

Every Triton kernel of an op module is wrapped once, next to its definition::

    STUDENT = TritonKernel(_dino_student_kernel, {"BLOCK_K": 1024, "num_warps": 4}, {"BLOCK_K": 2048, ...})

and launched by its launcher as ``STUDENT.launch(grid, config, name=value, ...)``, where ``config`` is one of the
declared dicts (the launcher picks one; any other raises). The launch runs on the tensors' device (see
:func:`~dino_kernels._backend.device_guard`). The ahead-of-time harness (:mod:`dino_kernels._aot`) reads the same
declarations: it records the launches of each module's ``aot_examples()`` instead of running them, derives every
compile signature from the recorded arguments (a tensor gives a pointer of its dtype, an int ``i32`` or ``i64`` by
value, a float ``fp32``), and checks that every declared config was launched. A new kernel argument is therefore a
change to the kernel and to its launch, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from dino_kernels._backend import device_guard

LAUNCH_OPTIONS = ("num_warps", "num_stages")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grid sizes: plain integer arithmetic (``triton.cdiv`` is a constexpr function whose
    Python call costs about 2 µs of host time, on every launch)."""
    return -(-a // b)


_recording: list[tuple[TritonKernel, dict[str, Any], dict[str, Any]]] | None = None


class TritonKernel:
    """A ``@triton.jit`` function and the launch configs (constexprs plus ``num_warps``/``num_stages``) its launcher
    may pass."""

    def __init__(self, fn: Any, *configs: dict[str, Any]) -> None:
        self.fn = fn
        self.configs = configs or ({},)
        self.name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__

    def launch(self, grid: tuple[int, ...], config: dict[str, Any], **args: Any) -> None:
        """``fn[grid](**args, **config)`` on the device of the first tensor argument."""
        if not any(config is declared for declared in self.configs):
            raise ValueError(f"{self.name}: launch config {config} is not one of the declared {self.configs}")
        if _recording is not None:
            _recording.append((self, args, config))
            return
        device = next(a.device for a in args.values() if isinstance(a, torch.Tensor))
        with device_guard(device):
            self.fn[grid](**args, **config)


def recording_active() -> bool:
    """Whether launches are being recorded (the AOT harness) rather than run: their outputs hold no values."""
    return _recording is not None


class DerivedTensors:
    """Launch inputs derived from a tensor (a block table from cu_seqlens, CSR segments from an index), built once
    per tensor and version: an entry lives as long as its tensor (weak keys), and every in-place PyTorch op on the
    tensor bumps its version, so a changed tensor gets a new entry. A training step derives the same ones in every
    block, forward and backward, and each build costs host time that the GPU waits for at DINO's sizes."""

    def __init__(self) -> None:
        self._entries = WeakTensorKeyDictionary()

    def get(self, tensor: torch.Tensor, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, or what it returned for ``tensor`` at its current version and the same ``key``."""
        # Built every time: inference tensors (no version counter), recorded launches (their outputs hold no
        # values), CUDA graph capture (the result would live in the graph's memory pool).
        if (tensor.is_inference() or recording_active()
                or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())):
            return build()
        key = (tensor._version, *key)
        entry = self._entries.get(tensor)
        if entry is None or entry[0] != key:
            entry = key, build()
            self._entries[tensor] = entry
        return entry[1]


@contextmanager
def recording() -> Iterator[list[tuple[TritonKernel, dict[str, Any], dict[str, Any]]]]:
    """Within this context launches are recorded as ``(kernel, args, config)`` instead of run (the AOT harness)."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous
