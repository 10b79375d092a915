"""``python -m dino.train``: DINO self-supervised training of a ViT on our kernels.

One process: ``python -m dino.train [options]``. Several: ``torchrun --nproc_per_node=N -m dino.train [options]``
(DDP; NCCL on GPU, gloo on CPU; the DINO center is all-reduced; evaluation and checkpoints on rank 0).
Run ``python -m dino.train --help`` for every option. A run directory receives ``config.json``, ``metrics.jsonl``
(one JSON object per epoch), ``checkpoint.pth`` (every epoch, atomic), ``curves.png`` and
``teacher_backbone.safetensors`` (the final teacher backbone).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import dino_kernels
from dino.augment import MultiCropAugmentation
from dino.checkpoint import (
    FILENAME,
    CheckpointError,
    capture_rng_state,
    check_compatible,
    checkpoint_path,
    load_checkpoint,
    load_state_dict_checked,
    restore_rng_state,
    save_checkpoint,
)
from dino.config import RUNTIME_FIELDS, Config, parse_args, run_command
from dino.cuda_graph import GraphedStep
from dino.data import DataError, build_datasets
from dino.eval_knn import knn_accuracy
from dino.eval_linear import linear_accuracy
from dino.masking import BatchMasks, batch_masks
from dino.model import DINOModel, build_model
from dino.schedules import Schedules

# Collapse monitors, on the epoch-mean teacher entropy (nats) relative to ln K: near ln K every teacher output is
# uniform, near 0 every output is one-hot.
UNIFORM_COLLAPSE_FRACTION = 0.95
ONE_HOT_COLLAPSE_NATS = 0.05


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class EpochStats:
    loss: float = 0.0
    entropy: float = 0.0
    kl: float = 0.0
    koleo: float = 0.0
    ibot: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- setup
def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world_size,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """DINO v1's groups: weight decay on every tensor of ndim > 1 except biases; none on biases and 1-d (norms,
    LayerScale) tensors. Frozen tensors (the weight-norm gain under norm_last_layer) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_(model: torch.nn.Module, clip: float) -> None:
    """DINO v1's per-tensor clip: each gradient is scaled by clip / (‖g‖ + 1e-6) when that is below 1."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or clip <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    factors = (clip / (norms + 1e-6)).clamp_(max=1.0)
    if factors.device.type == "cpu":
        # Reading the factors costs no device sync here: scale only the gradients whose factor is not exactly 1
        # (usually none; g * 1.0 is g, and a NaN factor still scales), a pass over every gradient less per step.
        clipped = [(g, f) for g, f in zip(grads, factors.tolist()) if f != 1.0]
        if clipped:
            torch._foreach_mul_([g for g, _ in clipped], [f for _, f in clipped])
        return
    torch._foreach_mul_(grads, list(factors.unbind()))


def cancel_last_layer_grads(model: torch.nn.Module) -> None:
    """DINO v1's last-layer freeze: no update at all (AdamW skips ``grad=None``, weight decay included)."""
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------- step
class NetworkOutputs(NamedTuple):
    """One step's forward passes. teacher: (G·B, K) logits of the global crops; student: (S·B, K) logits of all
    crops and features: their (S·B, D) backbone CLS features; with DINOv2's masks also the (M, K) logits of the
    masked patches of the global crops, teacher_patches from the unmasked crops and student_patches from the masked
    ones (else None)."""

    teacher: torch.Tensor
    student: torch.Tensor
    features: torch.Tensor
    teacher_patches: torch.Tensor | None
    student_patches: torch.Tensor | None


class StepLosses(NamedTuple):
    """One step's 0-d losses before the backward: the DINO loss, the total (DINOv2's weighting, + iBOT, + KoLeo),
    the KoLeo and iBOT terms (zeros when off), and the DINO loss's teacher entropy and KL statistics."""

    loss: torch.Tensor
    total: torch.Tensor
    koleo: torch.Tensor
    ibot: torch.Tensor
    teacher_entropy: torch.Tensor
    kl: torch.Tensor


class StepResult(NamedTuple):
    """What a training step reports: the DINO loss, the KoLeo and iBOT terms (Python floats: the step syncs once
    for them) and the teacher entropy and KL (0-d tensors)."""

    loss: float
    teacher_entropy: torch.Tensor
    kl: torch.Tensor
    koleo: float
    ibot: float


def koleo_loss(features: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """DINOv2's KoLeo regulariser, :func:`dino_kernels.koleo_loss` of each of the ``n_chunks`` global-crop chunks of
    B rows (one global view: a sample is never its own view's neighbour), summed; fp32 math whatever the autocast
    dtype. Pushes the features of a batch apart, against the feature collapse that small datasets invite."""
    return torch.stack([dino_kernels.koleo_loss(chunk) for chunk in features.chunk(n_chunks)]).sum()


def collapse_warning(epoch: int, entropy: float, ln_k: float) -> str | None:
    """The warning for an epoch-mean teacher entropy near ln K (uniform collapse) or near 0 (one-hot), else None."""
    if entropy > UNIFORM_COLLAPSE_FRACTION * ln_k:
        return (f"epoch {epoch}: teacher entropy {entropy:.3f} is near ln K = {ln_k:.3f}: the outputs are collapsing "
                "to uniform. Lower --teacher-temp or --out-dim, or use a faster teacher (lower --momentum-teacher).")
    if entropy < ONE_HOT_COLLAPSE_NATS:
        return (f"epoch {epoch}: teacher entropy {entropy:.4f} is near 0: the outputs are collapsing to one "
                "prototype. Raise --teacher-temp, or lower --center-momentum so that the center follows faster.")
    return None


def uses_cuda_graph(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None, distributed: bool) -> bool:
    """Whether the step replays from a CUDA graph (:mod:`dino.cuda_graph`). Its conditions: one CUDA process, DINO's
    recipe (DINOv2's masks are drawn on the host every step), no fp16 GradScaler. ``auto`` takes it where they hold
    with our kernels (``--kernels reference`` stays the plain eager run); ``on`` raises a ValueError naming every
    unmet one."""
    problems = [what for what, bad in (
        (f"a CUDA device (got {device})", device.type != "cuda"),
        ("one process (got a torchrun run)", distributed),
        ("--recipe dino (got dinov2)", cfg.recipe == "dinov2"),
        ("--amp bf16 or none (got fp16)", amp_dtype == torch.float16)) if bad]
    if cfg.cuda_graph == "on" and problems:
        raise ValueError(f"cuda_graph=on needs {', '.join(problems)}")
    return cfg.cuda_graph == "on" or (cfg.cuda_graph == "auto" and cfg.kernels == "fused" and not problems)


def _all_reduce_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Trainer:
    def __init__(self, cfg: Config, overrides: dict[str, Any] | None = None) -> None:
        self.info, self.device = setup_distributed(cfg.device)
        # As DINO v1: cuDNN times its convolution algorithms once for the run's fixed shapes (the reference model's
        # patch embedding; the fused model's is a GEMM).
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        resume_state = None
        if cfg.resume is not None:
            resume_state = load_checkpoint(cfg.resume)
            check_compatible(resume_state["config"], overrides or {}, RUNTIME_FIELDS)
            saved = Config.from_dict(resume_state["config"])
            for name in RUNTIME_FIELDS:
                if overrides and name in overrides:
                    setattr(saved, name, overrides[name])
            saved.resume = cfg.resume
            if saved.output_dir is None or not (overrides and "output_dir" in overrides):
                saved.output_dir = os.path.dirname(os.path.abspath(checkpoint_path(cfg.resume)))
            cfg = saved
        self.cfg = cfg
        self.amp_dtype = autocast_dtype(cfg, self.device)
        graphed = uses_cuda_graph(cfg, self.device, self.amp_dtype, self.info.enabled)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank

        self.data = build_datasets(cfg.data, cfg.image_size, cfg.global_size, main_process=self.info.main,
                                   progress=cfg.progress)
        n_per_rank = len(self.data.train) // self.info.world_size
        if n_per_rank < cfg.batch_size:
            raise DataError(f"batch_size={cfg.batch_size} per process exceeds the {n_per_rank} training images each "
                            f"of the {self.info.world_size} process(es) gets; lower --batch-size")
        # The run's random numbers: the data order is the sampler's own stream (seed + epoch); augmentation and
        # stochastic depth draw from the global RNG, which only the training step touches and each checkpoint saves.
        # The loader draws its workers' base seed when its iterator is created (epoch 1 of a fresh run, the first
        # epoch after a resume), hence its own generator, seeded from the config and the rank: the same worker seeds
        # whichever epoch starts them. The workers draw no random numbers (they only decode and resize, see
        # dino.data), so persistent workers carry no RNG state from one epoch to the next.
        self.sampler = DistributedSampler(self.data.train, num_replicas=self.info.world_size, rank=self.info.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
        self.loader = DataLoader(self.data.train, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                 pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(cfg.seed + self.info.rank))
        self.iters_per_epoch = len(self.loader)
        self.schedules = Schedules.from_config(cfg, self.iters_per_epoch, self.info.world_size)
        self.augment = MultiCropAugmentation(cfg.global_size, cfg.local_size, cfg.n_local_crops, cfg.global_scale,
                                             cfg.local_scale, cfg.blur_sigma, cfg.hflip_p,
                                             n_global_crops=cfg.n_global_crops, color_jitter_p=cfg.color_jitter_p,
                                             grayscale_p=cfg.grayscale_p, solarize_p=cfg.solarize_p,
                                             blur=cfg.blur).to(self.device)

        self.student: DINOModel = build_model(cfg, drop_path=True).to(self.device)
        self.teacher: DINOModel = build_model(cfg, drop_path=False).to(self.device)
        if self.info.enabled and self.device.type == "cuda" and cfg.head_use_bn:
            # As DINO v1: batch statistics over all ranks (SyncBatchNorm runs on GPUs only; CPU ranks keep their own).
            self.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        # Train mode as in DINO v1: the teacher has no stochastic depth, so this only makes a BatchNorm head (if any)
        # use batch statistics. The k-NN evaluation switches the backbone to eval mode.
        self.teacher.train()
        # --kernels fused also takes PyTorch's fused AdamW (one kernel per parameter instead of ~10 ops; the same
        # update to rounding); reference keeps the default, as DINO v1 does.
        self.optimizer = torch.optim.AdamW(param_groups(self.student), fused=cfg.kernels == "fused")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # The DINO center c: (1, K) fp32, an EMA of the teacher's batch-mean logits (update_center_ in the step).
        self.center = torch.zeros(1, cfg.out_dim, device=self.device)
        # DINOv2: the iBOT patch center, (1, K) fp32 like the DINO center; the masks' patch grid; and the DINO loss
        # weighting: DINOv2 divides its DINO terms by 2 + max(2L, 1) (3 with no local crop), where the fused loss
        # averages over its G·(S − 1) = 2 + 2L pairs.
        self.dinov2 = cfg.recipe == "dinov2"
        self.patch_center = torch.zeros(1, cfg.out_dim, device=self.device) if self.dinov2 else None
        self.mask_grid = (cfg.global_size // cfg.patch_size,) * 2
        pairs = cfg.n_global_crops * (cfg.n_global_crops + cfg.n_local_crops - 1)
        self.dino_loss_scale = pairs / (2 + max(2 * cfg.n_local_crops, 1)) if self.dinov2 else 1.0
        # Each rank draws its own augmentations and stochastic-depth subsets.
        torch.manual_seed(cfg.seed + self.info.rank)
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, Any]] = []
        if resume_state is not None:
            self._restore(resume_state)
        self.ddp_student = (DistributedDataParallel(self.student, device_ids=[self.device.index]
                                                    if self.device.type == "cuda" else None)
                            if self.info.enabled else self.student)
        # Lists built once: ema_ caches its work tables by tensor address, which stay fixed across steps.
        self.teacher_params = list(self.teacher.parameters())
        self.student_params = list(self.student.parameters())
        self.graphed = GraphedStep(self.student_params, fallback=cfg.cuda_graph == "auto") if graphed else None

    # ------------------------------------------------------------------------------------------ state
    def rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states, in rank order (a collective under DDP: all ranks must call it)."""
        state = capture_rng_state()
        if not self.info.enabled:
            return [state]
        gathered: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    def state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(), "epoch": self.epoch, "step": self.step,
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "center": self.center.detach().cpu(), "rng": rng, "history": self.history,
            **({"patch_center": self.patch_center.detach().cpu()} if self.dinov2 else {}),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        load_state_dict_checked(self.student, state["student"], "student")
        load_state_dict_checked(self.teacher, state["teacher"], "teacher")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this model: {err}") from err
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if state["center"].shape != self.center.shape:
            raise CheckpointError(f"the checkpoint's center has shape {tuple(state['center'].shape)}, expected "
                                  f"{tuple(self.center.shape)}")
        self.center.copy_(state["center"])
        if self.dinov2:
            self.patch_center.copy_(state["patch_center"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.step != self.epoch * self.iters_per_epoch:
            raise CheckpointError(f"the checkpoint is at step {self.step} of epoch {self.epoch}, but this data gives "
                                  f"{self.iters_per_epoch} steps per epoch: a different dataset or world size")
        self.history = list(state["history"])
        if len(state["rng"]) != self.info.world_size:
            raise CheckpointError(f"the checkpoint was written by {len(state['rng'])} process(es); resume it with "
                                  f"the same number, not {self.info.world_size}")
        restore_rng_state(state["rng"][self.info.rank])

    # ------------------------------------------------------------------------------------------ loop
    def train_step(self, images: torch.Tensor, epoch: int) -> StepResult:
        """Augment a uint8 batch on the device, then :meth:`step_on_crops`."""
        return self.step_on_crops(self.augment(images.to(self.device, non_blocking=True)), epoch)

    def step_on_crops(self, crops: list[torch.Tensor], epoch: int) -> StepResult:
        """One DINO (or DINOv2) iteration (docs/algorithm.md), on ``crops = [globals (G·B, ...), locals (L·B, ...)]``:
        (DINOv2: block masks for the global crops,) teacher and student forwards, DINO loss at this epoch's teacher
        temperature (+ iBOT, + KoLeo), center updates, NaN guard, backward, per-tensor clip, last-layer freeze,
        AdamW step, teacher EMA. Replayed from a CUDA graph (see :func:`uses_cuda_graph`), everything up to the
        backward is one replay and the guard reads the losses after it (still before any update)."""
        cfg, it = self.cfg, self.step
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.schedules.lr[it])
            if i == 0:
                group["weight_decay"] = float(self.schedules.weight_decay[it])
        teacher_temp = float(self.schedules.teacher_temp[epoch])
        centering = ("sinkhorn_knopp" if cfg.centering == "sinkhorn_knopp" and epoch >= cfg.centering_warmup_epochs
                     else "softmax")
        if self.graphed is None:
            masks = self.draw_masks(crops[0].shape[0]) if self.dinov2 else None
            losses = self.losses(crops, masks, teacher_temp, centering)
            values = self._finite_values(losses, epoch, it)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses.total).backward()
        else:
            def forward_backward(static_crops: list[torch.Tensor]) -> StepLosses:
                losses = self.losses(static_crops, None, teacher_temp, centering)
                losses.total.backward()
                return losses

            losses = self.graphed(crops, (teacher_temp, centering), forward_backward)
            values = self._finite_values(losses, epoch, it)
        self.scaler.unscale_(self.optimizer)
        clip_gradients_(self.student, cfg.clip_grad)
        if epoch < cfg.freeze_last_layer:
            cancel_last_layer_grads(self.student)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        dino_kernels.ema_(self.teacher_params, self.student_params, float(self.schedules.momentum[it]))
        self.step += 1
        loss_value, _, koleo_value, ibot_value = values
        entropy, kl = losses.teacher_entropy, losses.kl
        if self.graphed is not None:  # a graph's outputs are overwritten by its next replay
            entropy, kl = entropy.clone(), kl.clone()
        return StepResult(loss_value, entropy, kl, koleo_value, ibot_value)

    def losses(self, crops: list[torch.Tensor], masks: BatchMasks | None, teacher_temp: float,
               centering: str) -> StepLosses:
        """The forwards, the DINO loss (+ iBOT, + KoLeo) and the center updates of one step."""
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.forward_networks(crops, masks)
            loss, stats = dino_kernels.dino_loss(out.student, out.teacher, self.center,
                                                 n_global_crops=cfg.n_global_crops, student_temp=cfg.student_temp,
                                                 teacher_temp=teacher_temp, centering=centering, return_stats=True)
            total = loss * self.dino_loss_scale if self.dinov2 else loss
            ibot = koleo = torch.zeros_like(loss)
            if masks is not None:  # DINOv2's iBOT term on the masked patches of the global crops
                ibot = dino_kernels.ibot_patch_loss(out.student_patches, out.teacher_patches, self.patch_center,
                                                    masks.weights, n_images=masks.masks.shape[0],
                                                    student_temp=cfg.student_temp, teacher_temp=teacher_temp,
                                                    centering=centering)
                total = total + cfg.ibot_weight * ibot
        if centering == "softmax":  # the center EMAs (all-reduced under DDP); Sinkhorn-Knopp needs none
            dino_kernels.update_center_(self.center, stats.teacher_mean, cfg.center_momentum)
            if masks is not None:
                self.update_patch_center_(out.teacher_patches)
        if cfg.koleo_weight > 0:  # DINOv2's KoLeo term on the student's global-crop CLS features
            koleo = koleo_loss(out.features[: crops[0].shape[0]], n_chunks=cfg.n_global_crops)
            total = total + cfg.koleo_weight * koleo
        return StepLosses(loss, total, koleo, ibot, stats.teacher_entropy, stats.kl)

    def _finite_values(self, losses: StepLosses, epoch: int, it: int) -> list[float]:
        """The NaN guard: (loss, total, koleo, ibot) as floats, in one host sync; raises on a non-finite loss."""
        values = torch.stack([t.detach().float() for t in (losses.loss, losses.total, losses.koleo,
                                                            losses.ibot)]).tolist()
        loss_value, total_value = values[:2]
        if _all_reduce_flag(not (math.isfinite(loss_value) and math.isfinite(total_value)), self.info, self.device):
            raise NonFiniteLossError(
                f"non-finite loss ({total_value}) at epoch {epoch + 1}, step {it}: training stopped. The last good "
                f"checkpoint ({self._last_good()}) was kept. Lower --base-lr, use --amp none or bf16 instead of "
                f"fp16, or raise --teacher-temp, then --resume from it.")
        return values

    def draw_masks(self, n_crops: int) -> BatchMasks:
        """DINOv2's block masks for the ``n_crops`` global crops, drawn from the global RNG (see dino.masking)."""
        masks = batch_masks(n_crops, self.mask_grid, self.cfg.mask_ratio, self.cfg.mask_probability)
        return BatchMasks(*(t.to(self.device, non_blocking=True) for t in masks))

    def forward_networks(self, crops: list[torch.Tensor], masks: BatchMasks | None) -> NetworkOutputs:
        """Teacher on the global crops (no gradient), student on all crops; with DINOv2's masks also the logits of
        the masked patches, the student's from its masked global crops."""
        if masks is None:
            with torch.no_grad():
                teacher = self.teacher([crops[0]])
            student, features = self.ddp_student(crops, return_features=True)
            return NetworkOutputs(teacher, student, features, None, None)
        with torch.no_grad():
            teacher, _, teacher_patches = self.teacher([crops[0]], patch_indices=masks.indices)
        student, features, student_patches = self.ddp_student(crops, patch_indices=masks.indices, masks=masks.masks)
        return NetworkOutputs(teacher, student, features, teacher_patches, student_patches)

    @torch.no_grad()
    def update_patch_center_(self, teacher_patches: torch.Tensor) -> None:
        """The iBOT center EMA on the mean raw teacher logits of the masked patches of every rank; kept as it is
        when no rank has a masked patch (no host sync: the choice is made on the device)."""
        sums = torch.cat([teacher_patches.float().sum(0), teacher_patches.new_full((1,), teacher_patches.shape[0],
                                                                                    dtype=torch.float32)])
        if self.info.enabled:
            dist.all_reduce(sums)
        count = sums[-1]
        momentum = self.cfg.center_momentum
        updated = self.patch_center * momentum + (sums[:-1] / count.clamp(min=1.0)) * (1.0 - momentum)
        self.patch_center.copy_(torch.where(count > 0, updated, self.patch_center))

    def _last_good(self) -> str:
        path = os.path.join(self.cfg.output_dir, FILENAME)
        return f"{path}, epoch {self.epoch}" if os.path.exists(path) else "none written yet"

    def train_epoch(self, epoch: int) -> EpochStats:
        self.sampler.set_epoch(epoch)
        self.student.train()
        stats = EpochStats()
        entropy = torch.zeros((), device=self.device)
        kl = torch.zeros((), device=self.device)
        images_per_step = self.cfg.batch_size * self.info.world_size
        bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="it",
                   disable=not (self.info.main and self.cfg.progress), dynamic_ncols=True, leave=True, file=sys.stdout)
        start = time.perf_counter()
        for images, _ in self.loader:
            result = self.train_step(images, epoch)
            loss = result.loss
            stats.losses.append(loss)
            stats.koleo += result.koleo
            stats.ibot += result.ibot
            entropy += result.teacher_entropy
            kl += result.kl
            stats.steps += 1
            stats.images += images_per_step
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.schedules.lr[self.step - 1]:.2e}",
                            img_s=f"{stats.images / elapsed:.0f}", refresh=False)
            bar.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.seconds = time.perf_counter() - start
        bar.close()
        # Epoch means over all ranks (one collective per epoch).
        means = torch.stack([torch.tensor(sum(stats.losses), dtype=torch.float64, device=self.device),
                             entropy.double(), kl.double(),
                             torch.tensor(stats.koleo, dtype=torch.float64, device=self.device),
                             torch.tensor(stats.ibot, dtype=torch.float64, device=self.device)]) / stats.steps
        if self.info.enabled:
            dist.all_reduce(means)
            means /= self.info.world_size
        stats.loss, stats.entropy, stats.kl, stats.koleo, stats.ibot = means.tolist()
        return stats

    def evaluate(self) -> float | None:
        """k-NN top-1 (percent) of the teacher backbone on the held-out split; None without labels.

        It runs on a fork of the RNG states (its DataLoaders draw seeds): which epochs are evaluated (rank 0 only,
        and ``--eval-every`` may change on ``--resume``) must not shift the training's random numbers."""
        if self.data.knn_train is None:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return knn_accuracy(self.teacher.backbone, self.data.knn_train, self.data.knn_test,
                                self.data.num_classes, self.cfg.global_size, self.device, self.cfg.knn_k,
                                self.cfg.knn_temperature, num_workers=0, autocast_dtype=self.amp_dtype)

    def linear_probe(self) -> float | None:
        """Linear-probe top-1 (percent, :mod:`dino.eval_linear`) of the teacher backbone on the held-out split, on a
        fork of the RNG states as :meth:`evaluate`; None without labels or with a single class."""
        if self.data.knn_train is None or self.data.num_classes < 2:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return linear_accuracy(self.teacher.backbone, self.data.knn_train, self.data.knn_test,
                                   self.data.num_classes, self.cfg.global_size, self.device,
                                   autocast_dtype=self.amp_dtype)

    def fit(self) -> list[dict[str, Any]]:
        cfg, info = self.cfg, self.info
        ln_k = math.log(cfg.out_dim)
        if info.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
            self._write_metrics()
            print(f"DINO on {self.data.name}: {len(self.data.train)} training images, {self.iters_per_epoch} steps "
                  f"per epoch, {info.world_size} process(es) on {self.device}, kernels={cfg.kernels}, preset "
                  f"{cfg.preset}; run directory {cfg.output_dir}", flush=True)
            if self.epoch:
                print(f"resumed at epoch {self.epoch + 1} (step {self.step})", flush=True)
        previous_backend = dino_kernels.get_backend()
        dino_kernels.set_backend("reference" if cfg.kernels == "reference" else "auto")
        try:
            while self.epoch < cfg.epochs:
                epoch = self.epoch
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                stats = self.train_epoch(epoch)
                last = epoch + 1 == cfg.epochs
                knn = linear = None
                if info.main and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                    knn = self.evaluate()
                if info.main and last:
                    linear = self.linear_probe()
                it = self.step - 1
                record = {
                    "epoch": epoch + 1, "step": self.step, "loss": stats.loss, "lr": float(self.schedules.lr[it]),
                    "weight_decay": float(self.schedules.weight_decay[it]),
                    "teacher_temp": float(self.schedules.teacher_temp[epoch]),
                    "momentum": float(self.schedules.momentum[it]), "teacher_entropy": stats.entropy,
                    "ln_k": ln_k, "kl": stats.kl, "koleo": stats.koleo, "ibot": stats.ibot, "knn_top1": knn,
                    "linear_top1": linear,
                    "img_per_s": stats.images / stats.seconds, "epoch_seconds": stats.seconds,
                    "peak_mem_mb": peak_memory_mb(self.device),
                }
                self.history.append(record)
                self.epoch += 1
                rng = self.rng_states()
                if info.main:
                    self._report(record, ln_k)
                    self._write_metrics()
                    save_checkpoint(os.path.join(cfg.output_dir, FILENAME), self.state(rng))
                if info.enabled:
                    dist.barrier()
        finally:
            dino_kernels.set_backend(previous_backend)
        if info.main:
            self._finish()
        return self.history

    # ------------------------------------------------------------------------------------------ output
    def _report(self, record: dict[str, Any], ln_k: float) -> None:
        knn = f", k-NN top-1 {record['knn_top1']:.2f}%" if record["knn_top1"] is not None else ""
        ibot = f", iBOT {record['ibot']:.4f}" if self.dinov2 else ""
        tqdm.write(f"epoch {record['epoch']}/{self.cfg.epochs}: loss {record['loss']:.4f}{ibot}, teacher entropy "
                   f"{record['teacher_entropy']:.3f} (ln K = {ln_k:.3f}), KL {record['kl']:.4f}{knn}, "
                   f"{record['img_per_s']:.0f} img/s", file=sys.stdout)
        message = collapse_warning(record["epoch"], record["teacher_entropy"], ln_k)
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history (a resumed run drops lines of epochs it will redo)."""
        path = os.path.join(self.cfg.output_dir, "metrics.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for record in self.history:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)

    def _finish(self) -> None:
        from safetensors.torch import save_file

        from dino.plots import plot_curves

        out = self.cfg.output_dir
        plot_curves(self.history, os.path.join(out, "curves.png"), self.cfg.out_dim)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.teacher.backbone.state_dict().items()}
        save_file(weights, os.path.join(out, "teacher_backbone.safetensors"),
                  metadata={"config": json.dumps(self.cfg.to_dict())})
        final = self.history[-1] if self.history else {}
        knn, linear = final.get("knn_top1"), final.get("linear_top1")
        total = sum(r["epoch_seconds"] for r in self.history)
        print(f"done: {len(self.history)} epochs, {total:.0f} s of training"
              + (f", final k-NN top-1 {knn:.2f}%" if knn is not None else "")
              + (f", linear probe top-1 {linear:.2f}%" if linear is not None else "")
              + f". Run directory: {out}", flush=True)


def train(cfg: Config, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a training; returns the per-epoch metrics."""
    trainer = Trainer(cfg, overrides)
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    """The CLI: an error the user can fix is one ``error: ...`` line and exit code 2 (with ``--debug``, its
    traceback)."""
    cfg, overrides = parse_args(argv)
    try:
        return run_command(lambda: train(cfg, overrides), cfg.debug, (NonFiniteLossError,))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
