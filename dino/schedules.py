"""DINO v1 schedules, indexed by global iteration or epoch (as DINO's ``utils.cosine_scheduler`` makes them).

- lr: linear warmup from 0 to ``base_lr · total_batch / 256`` over ``warmup_epochs``, then cosine to ``min_lr``.
- weight decay: cosine ``weight_decay -> weight_decay_end``.
- teacher momentum: cosine ``momentum_teacher -> momentum_teacher_end``:
  m(it) = end − (end − m0)·(1 + cos(π·it/T))/2.
- teacher temperature, per epoch: linear ``warmup_teacher_temp -> teacher_temp`` over the warmup epochs, then constant
  (:func:`dino_kernels.dino_loss.teacher_temp_schedule`, the one definition ``DINOLoss`` uses too).

The formulas: docs/algorithm.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dino_kernels.dino_loss import teacher_temp_schedule


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """One value per iteration: linear ``warmup_start -> base`` over the warmup iterations, then
    ``final + (base − final)·(1 + cos(π·i/n))/2`` for i = 0 … n−1 over the n remaining ones (DINO's
    ``utils.cosine_scheduler``)."""
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters) if warmup_iters > 0 else np.array([])
    n = epochs * iters_per_epoch - warmup_iters
    i = np.arange(max(n, 0))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(n, 1)))
    schedule = np.concatenate([warmup, cosine])
    return schedule[: epochs * iters_per_epoch]


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: tuple[float, ...]  # per epoch

    @classmethod
    def from_config(cls, cfg, iters_per_epoch: int, world_size: int = 1) -> Schedules:
        peak_lr = cfg.base_lr * cfg.batch_size * world_size / 256.0
        return cls(
            lr=cosine_schedule(peak_lr, cfg.min_lr, cfg.epochs, iters_per_epoch, cfg.warmup_epochs),
            weight_decay=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters_per_epoch),
            momentum=cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, iters_per_epoch),
            teacher_temp=teacher_temp_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                               cfg.warmup_teacher_temp_epochs, cfg.epochs),
        )
