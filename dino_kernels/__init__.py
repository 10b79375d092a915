"""dino-kernels: fused Triton, CUDA and C++ kernels for DINO / DINOv2 self-supervised ViT training.

Every op has a plain-PyTorch ground truth in :mod:`dino_kernels.reference`; :func:`backend` /
:func:`set_backend` / ``DINO_KERNELS_BACKEND`` choose which implementation runs.
"""

from dino_kernels._backend import BACKENDS, backend, get_backend, set_backend
from dino_kernels.ema import ema_

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backend", "get_backend", "set_backend", "ema_"]
