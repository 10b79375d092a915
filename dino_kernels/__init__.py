"""dino-kernels: fused Triton, CUDA and C++ kernels for DINO / DINOv2 self-supervised ViT training.

Every op has a plain-PyTorch ground truth in :mod:`dino_kernels.reference`; :func:`backend` /
:func:`set_backend` / ``DINO_KERNELS_BACKEND`` choose which implementation runs.
"""

from dino_kernels._backend import BACKENDS, backend, get_backend, set_backend
from dino_kernels.dino_loss import DINOLoss, DINOLossStats, dino_loss, update_center_
from dino_kernels.ema import ema_
from dino_kernels.ibot_patch_loss import ibot_patch_loss
from dino_kernels.koleo import koleo_loss
from dino_kernels.packed_attention import packed_attention
from dino_kernels.packing import pack, unpack
from dino_kernels.sinkhorn_knopp import sinkhorn_knopp
from dino_kernels.stochastic_depth import drop_add_residual, index_select_cat, scaled_index_add

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backend", "get_backend", "set_backend", "ema_", "drop_add_residual", "scaled_index_add",
           "index_select_cat", "packed_attention", "pack", "unpack", "dino_loss", "update_center_", "DINOLoss",
           "DINOLossStats", "sinkhorn_knopp", "ibot_patch_loss", "koleo_loss"]
