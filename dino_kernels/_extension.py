"""Lazy loading of the compiled extension ``dino_kernels._C`` with errors that say how to fix it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

_BUILD_INFO = Path(__file__).with_name("_build_info.json")
_REBUILD = "rebuild it against this torch from the repository root: pip install --no-build-isolation -e ."


def build_info() -> dict[str, Any]:
    """What setup.py recorded when it built the extension ({} if it never ran)."""
    if not _BUILD_INFO.exists():
        return {}
    return json.loads(_BUILD_INFO.read_text())


@functools.cache
def ops() -> Any:
    """``torch.ops.dino_kernels_C``, loading the extension on first use."""
    built_for = build_info().get("torch_version")
    if built_for is not None and built_for != torch.__version__:
        raise ImportError(
            f"dino_kernels' compiled extension was built for torch {built_for}, but torch {torch.__version__} is "
            f"installed; {_REBUILD}"
        )
    try:
        from dino_kernels import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as error:
        raise ImportError(
            f"dino_kernels' compiled extension could not be loaded ({error}); {_REBUILD}. "
            "Or use the pure-PyTorch ops with dino_kernels.set_backend('reference')."
        ) from error
    return torch.ops.dino_kernels_C


def cuda_kernels_compiled() -> bool:
    """Whether the extension holds our CUDA C++ kernels (nvcc was found at build time)."""
    return bool(ops().cuda_compiled())
