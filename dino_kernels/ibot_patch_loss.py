"""Fused iBOT masked-patch loss (DINOv2 ``iBOTPatchLoss.forward_masked``): teacher targets, the weighted
cross-entropy of the masked patches, its gradient and the collapse statistics.

Rows are the M masked patches of the whole batch: ``student_patch_logits`` and ``teacher_patch_logits`` are (M, K),
row m carrying the weight w_m (officially 1 / the number of masked patches of its image). The loss is
−Σ_m w_m Σ_k p_mk log softmax(s_m/τs)_k / n_images with p_m the teacher target of row m: its own centred softmax
softmax((t_m − c)/τt), or the Sinkhorn-Knopp targets of all M rows. The official code materialises fp32 softmax and
log_softmax tensors of size (M, K); here one program per row does everything in two sweeps over the row (column
blocks with an online max and sum, so K of 131,072 and beyond works), reading each logit twice and writing only the
gradient:

1. x = s/τs: online max and normaliser, and p·x. With softmax centering the teacher's max and normaliser come from
   the same sweep (p·x is kept re-based to the running teacher max), with the target's entropy. Sinkhorn-Knopp
   targets need every row, so :func:`dino_kernels.sinkhorn_knopp.sinkhorn_knopp_targets` computes their scalings
   (column shift, row max, row normaliser, entropy) beforehand and the sweep rebuilds p from them. The row's
   cross-entropy is LSE(x) − p·x (Σp = 1).
2. The gradient w_m (softmax(x) − p)/(τs·n_images), p rebuilt once more, stored in the forward, so that the backward
   only rescales it by grad_output, skipping even that when grad_output is 1.

The gradient flows to ``student_patch_logits`` only: the teacher targets are constants (as in the official code,
where they are computed under no_grad), and ``masks_weight`` and the center get none either.

Implementations: Triton (GPU, and CPU under ``TRITON_INTERPRET=1``), C++ CPU (``csrc/ibot_patch_loss.cpp``: parallel
over rows, vectorised loops), and the official-style eager loss in :mod:`dino_kernels.reference`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import triton
import triton.language as tl

from dino_kernels import reference
from dino_kernels._backend import TRITON_DTYPES, accumulation_dtype, get_backend, resolve
from dino_kernels._extension import ops
from dino_kernels._launch import TritonKernel
from dino_kernels._op import KernelOp, tracing
from dino_kernels._validation import FLOAT_DTYPES, check_floating, check_ndim, check_positive, check_same_device
from dino_kernels.dino_loss import DINOLossStats, _dino_loss_rescale_op, _target_block
from dino_kernels.sinkhorn_knopp import check_count, sinkhorn_knopp_targets

CENTERINGS = ("softmax", "sinkhorn_knopp")
# fp16 cannot hold the gradient itself: entries of w_m (softmax − p)/(τs·n_images) fall below its subnormal range at
# DINOv2's sizes (w_m ~ 1/100, n_images = 2B), although a GradScaler's grad_output would make them representable.
# fp16 gradients are therefore stored as (softmax − p)·w_m·2^e, with 2^e the largest power of two that keeps
# |w_m|·2^e <= _FP16_MAX for every row (|softmax − p| <= 1), and the backward multiplies grad_output by
# 1/(2^e·τs·n_images). 2^e depends on the weights, so it is computed on the device and the factor is an output.
_FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _target(teacher_row, shift_ptr, cols, mask, row_max, inv_norm, inv_teacher_temp):
    """Columns `cols` of the row's target p = exp((t − shift)/τt − row_max)·inv_norm (0 outside `mask`)."""
    t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + cols, mask=mask, other=0.0)
    return _target_block(t, shift, mask, row_max, inv_norm, inv_teacher_temp)


@triton.jit
def _ibot_patch_loss_kernel(
    student_ptr,  # (n_rows, n_cols) student patch logits
    teacher_ptr,  # (n_rows, n_cols) teacher patch logits
    shift_ptr,  # fp32 (n_cols,): the center (softmax targets) or the Sinkhorn-Knopp column shift
    row_max_ptr,  # fp32 (n_rows,): given targets only (unused when SOFTMAX_TARGETS)
    row_inv_norm_ptr,  # fp32 (n_rows,): given targets only (unused when SOFTMAX_TARGETS)
    grad_weight_ptr,  # fp32 (n_rows,): factor of each stored gradient row
    grad_ptr,  # like student: (softmax − p)·grad_weight, written when compute_grad
    row_loss_ptr,  # fp32 (n_rows,): cross-entropy of each row
    entropy_ptr,  # fp32 (n_rows,): entropy of each target row, written when SOFTMAX_TARGETS
    n_cols,
    inv_student_temp,
    inv_teacher_temp,  # 1/τt rounded to fp32
    inv_teacher_temp_lo,  # 1/τt − inv_teacher_temp, so that the fp64 u below gets 1/τt to fp64 precision
    compute_grad,
    SOFTMAX_TARGETS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    offset = row.to(tl.int64) * n_cols
    student_row = student_ptr + offset
    teacher_row = teacher_ptr + offset
    if SOFTMAX_TARGETS:
        # The teacher's own statistics, from the same sweep: online max m and normaliser z of u = (t − c)/τt in
        # fp32, formed as _target forms it, so that the targets sweep 2 rebuilds sum to 1, and Σ exp(u − m)·x,
        # re-based with z whenever m grows (p·x is that over z). The entropy log z − Σ e·(u − max)/z (two terms
        # >= 0) needs more care for a sharp teacher (entropy -> 0): its u is formed in fp64, where (t − c)·(1/τt)
        # is exact for fp32 operands, and only u − max goes to fp32; z = 1 + tiny there, so it is kept as (count
        # of columns at the max, where e = 1) + (the rest), and log z = log(count) + log(1 + rest/count).
        m = float("-inf")
        z = 0.0
        m64 = tl.full((), float("-inf"), tl.float64)
        count = 0.0
        rest = 0.0
        w = 0.0  # Σ e·(u − m64)
    else:
        row_max = tl.load(row_max_ptr + row)
        inv_norm = tl.load(row_inv_norm_ptr + row)

    # Sweep 1: online max m_s and normaliser z_s of x = s/τs, and p·x.
    m_s = float("-inf")
    z_s = 0.0
    dot = 0.0
    for start in range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        x = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_student_temp
        if SOFTMAX_TARGETS:
            t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + cols, mask=mask, other=0.0)
            u = tl.where(mask, (t - shift) * inv_teacher_temp, float("-inf"))
            m_next = tl.maximum(m, tl.max(u))
            rebase = tl.exp(m - m_next)
            e = tl.exp(u - m_next)
            z = z * rebase + tl.sum(e)
            dot = dot * rebase + tl.sum(e * x)  # masked columns: e = 0 and x = 0
            m = m_next

            d64 = t.to(tl.float64) - shift.to(tl.float64)
            u64 = tl.where(mask, d64 * inv_teacher_temp + d64 * inv_teacher_temp_lo, float("-inf"))
            m64_new = tl.maximum(m64, tl.max(u64))
            # Re-base what the earlier blocks summed to the new max: e -> e·scale, (u − m64) -> (u − m64) + delta,
            # and columns that were at the old max join the rest when the max grows. On the first block nothing
            # was summed (delta = -inf): the tl.where keeps -inf·0 out.
            delta = (m64 - m64_new).to(tl.float32)
            scale = tl.exp(delta)
            summed = count + rest
            w = tl.where(summed > 0, (w + delta * summed) * scale, 0.0)
            grew = m64_new > m64
            rest = tl.where(grew, summed * scale, rest)
            count = tl.where(grew, 0.0, count)
            shifted = (u64 - m64_new).to(tl.float32)
            e64 = tl.exp(shifted)
            at_max = mask & (u64 == m64_new)  # not shifted == 0: u64 − m64_new may be fused into an FMA
            count += tl.sum(at_max.to(tl.float32))
            rest += tl.sum(tl.where(at_max, 0.0, e64))
            w += tl.sum(e64 * tl.where(mask, shifted, 0.0))
            m64 = m64_new
        else:
            p = _target(teacher_row, shift_ptr, cols, mask, row_max, inv_norm, inv_teacher_temp)
            dot += tl.sum(p * x)  # masked columns: p = 0 and x = 0
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(x))
        z_s = z_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(x - m_new))
        m_s = m_new
    if SOFTMAX_TARGETS:
        row_max = m
        inv_norm = 1.0 / z
        dot = dot * inv_norm
        log_z64 = tl.log(count) + tl.log(1.0 + (rest / count).to(tl.float64)).to(tl.float32)
        tl.store(entropy_ptr + row, log_z64 - w / (count + rest))
    tl.store(row_loss_ptr + row, m_s + tl.log(z_s) - dot)

    # Sweep 2: the gradient, stored in the forward so that the backward only rescales it.
    if compute_grad != 0:
        grad_row = grad_ptr + offset
        coef = tl.load(grad_weight_ptr + row)
        softmax_coef = coef / z_s
        for start in range(0, n_cols, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            mask = cols < n_cols
            x = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_student_temp
            p = _target(teacher_row, shift_ptr, cols, mask, row_max, inv_norm, inv_teacher_temp)
            # softmax − p, with softmax = exp(x − m_s)/z_s for the same reason as in _target_block.
            g = tl.exp(tl.where(mask, x - m_s, float("-inf"))) * softmax_coef - p * coef
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# One program per masked row. The first config for K up to its BLOCK_K, else the second; 8 elements per thread, as in
# dino_loss's student kernel (the same sweeps), keep the fp64 entropy path of sweep 1 in registers.
PATCH_LOSS = TritonKernel(_ibot_patch_loss_kernel, {"BLOCK_K": 1024, "num_warps": 4}, {"BLOCK_K": 2048, "num_warps": 8})


# ------------------------------------------------------------------------------------------------- launchers
_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _ibot_patch_loss_triton(student: torch.Tensor, teacher: torch.Tensor, shift: torch.Tensor,
                            grad_weight: torch.Tensor, row_max: torch.Tensor | None,
                            row_inv_norm: torch.Tensor | None, student_temp: float, teacher_temp: float,
                            compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row cross-entropies, row target entropies (empty for given targets), stored gradient), from contiguous
    logits, fp32 (K,) shift, (M,) grad_weight and, for given targets, (M,) row_max and row_inv_norm."""
    n_rows, n_cols = student.shape
    small, large = PATCH_LOSS.configs
    config = small if n_cols <= small["BLOCK_K"] else large
    softmax_targets = row_max is None
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    entropy = torch.empty(n_rows if softmax_targets else 0, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    inv_teacher_temp = float(np.float32(1.0 / teacher_temp))
    PATCH_LOSS.launch((n_rows,), config, student_ptr=student, teacher_ptr=teacher, shift_ptr=shift,
                  row_max_ptr=row_loss if softmax_targets else row_max,  # (a placeholder the kernel never reads)
                  row_inv_norm_ptr=row_loss if softmax_targets else row_inv_norm, grad_weight_ptr=grad_weight,
                  grad_ptr=grad, row_loss_ptr=row_loss, entropy_ptr=entropy, n_cols=n_cols,
                  inv_student_temp=1.0 / student_temp, inv_teacher_temp=inv_teacher_temp,
                  inv_teacher_temp_lo=1.0 / teacher_temp - inv_teacher_temp, compute_grad=int(compute_grad),
                  SOFTMAX_TARGETS=softmax_targets)
    return row_loss, entropy, grad


def aot_examples() -> None:
    """Every (student dtype, teacher dtype) pair with softmax and with given targets, K below and above the first
    config's BLOCK_K."""
    for s, t in itertools.product(TRITON_DTYPES, repeat=2):
        for k in (8, 2 * PATCH_LOSS.configs[0]["BLOCK_K"]):
            for given in (False, True):
                scalings = (torch.empty(3), torch.empty(3)) if given else (None, None)
                _ibot_patch_loss_triton(torch.empty(3, k, dtype=s), torch.empty(3, k, dtype=t), torch.empty(k),
                                        torch.empty(3), *scalings, 0.1, 0.07, True)


# ------------------------------------------------------------------------------------------------ dispatch
def _gradient_weights(student_dtype: torch.dtype, weight: torch.Tensor, student_temp: float,
                      n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor of each stored gradient row, factor the backward multiplies grad_output by: 0-d for fp16 logits, else
    empty, meaning 1). See _FP16_MAX."""
    exact = 1.0 / (student_temp * n_images)
    if student_dtype != torch.float16:
        return weight * exact, weight.new_empty(0)
    if weight.numel() == 0:
        return weight, weight.new_ones(())
    # 2^floor(log2(_FP16_MAX / max|w|)), on the device (no host sync); a floor on max|w| keeps all-zero weights
    # finite.
    largest = weight.abs().amax().clamp_min(2.0**-60)
    stored = torch.exp2(torch.floor(torch.log2(_FP16_MAX / largest)))
    return weight * stored, exact / stored


def _ibot_patch_loss_forward(student: torch.Tensor, teacher: torch.Tensor, column_shift: torch.Tensor,
                             masks_weight: torch.Tensor, row_max: torch.Tensor | None,
                             row_inv_norm: torch.Tensor | None, row_entropy: torch.Tensor | None, n_images: int,
                             student_temp: float, teacher_temp: float, compute_grad: bool) -> _Outputs:
    """(loss, stored gradient, mean target entropy, mean KL, backward factor). The gradient is empty unless
    compute_grad; it is the loss gradient times the backward factor's inverse (see _gradient_weights). Softmax
    targets when row_max is None; else the given targets (row_max, row_inv_norm, row_entropy)."""
    # The Triton kernels take fp32/fp16/bf16 logits: an fp64 one (if any) is the dtype the backend must serve.
    dtype = next((t.dtype for t in (student, teacher) if t.dtype not in TRITON_DTYPES), student.dtype)
    impl = resolve(student.device, "ibot_patch_loss", dtype, cuda_runs_triton=True)
    if impl == "reference":
        raise ValueError("dino_kernels::ibot_patch_loss is the fused kernel; under the 'reference' backend call "
                         "dino_kernels.ibot_patch_loss, which runs dino_kernels.reference.ibot_patch_loss")
    acc = accumulation_dtype(student, teacher)
    student, teacher = student.contiguous(), teacher.contiguous()
    shift = column_shift.reshape(-1).to(acc).contiguous()
    weight = masks_weight.to(acc).contiguous()
    grad_weight, factor = _gradient_weights(student.dtype, weight, student_temp, n_images)
    given = [None if t is None else t.to(acc).contiguous() for t in (row_max, row_inv_norm)]
    if student.shape[0] == 0:  # no masked patch in the batch: loss 0, an empty gradient; the means below are NaN
        row_loss, entropy = weight, weight
        grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    elif impl == "cpu":
        row_loss, entropy, grad = ops().ibot_patch_loss_cpu(student, teacher, shift, grad_weight, *given,
                                                            student_temp, teacher_temp, compute_grad)
    else:
        row_loss, entropy, grad = _ibot_patch_loss_triton(student, teacher, shift, grad_weight, *given, student_temp,
                                                          teacher_temp, compute_grad)
    if row_entropy is not None:
        entropy = row_entropy.to(acc)
    row_loss = row_loss.to(acc)
    loss = (row_loss * weight).sum() / n_images
    mean_entropy = entropy.to(acc).mean()
    # Unweighted row means, as the reference: KL(p_m ‖ softmax(s_m/τs)) = CE_m − H(p_m).
    return loss, grad, mean_entropy, row_loss.mean() - mean_entropy, factor


# ----------------------------------------------------------------------------------------------- registered op
def _ibot_patch_loss_fake(student: torch.Tensor, teacher: torch.Tensor, column_shift: torch.Tensor,
                          masks_weight: torch.Tensor, row_max: torch.Tensor | None, row_inv_norm: torch.Tensor | None,
                          row_entropy: torch.Tensor | None, n_images: int, student_temp: float, teacher_temp: float,
                          compute_grad: bool) -> _Outputs:
    acc = accumulation_dtype(student, teacher)
    grad = student.new_empty(student.shape if compute_grad else (0,))
    factor = student.new_empty(() if student.dtype == torch.float16 else (0,), dtype=acc)
    return (student.new_empty((), dtype=acc), grad, student.new_empty((), dtype=acc),
            student.new_empty((), dtype=acc), factor)


_N_INPUTS = 11


def _ibot_patch_loss_setup_context(ctx, inputs, output) -> None:
    student, teacher, column_shift, masks_weight, row_max, row_inv_norm, row_entropy = inputs[:7]
    ctx.compute_grad = inputs[-1]
    # Only the loss is differentiable; the other outputs get no zero-filled gradients (one has the logits' size).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if ctx.compute_grad:
        ctx.save_for_backward(output[1], output[4])
    else:  # called without the gradient (ibot_patch_loss never does this when one can be needed): recompute it
        ctx.args = inputs[7:-1]
        ctx.save_for_backward(student, teacher, column_shift, masks_weight, row_max, row_inv_norm, row_entropy)


def _ibot_patch_loss_vjp(ctx, grad_loss, *_unused):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * _N_INPUTS
    if ctx.compute_grad:
        grad, factor = ctx.saved_tensors
    else:
        outputs = _ibot_patch_loss_op(*ctx.saved_tensors, *ctx.args, True)
        grad, factor = outputs[1], outputs[4]
    if factor.numel():  # fp16: the stored gradient carries the scale 2^e
        grad_loss = grad_loss * factor
    if tracing(grad):
        # AOTAutograd cannot partition a backward that mutates a saved forward output, so a traced graph rescales
        # out of place (the compiler fuses the multiply).
        return (grad.float() * grad_loss.float()).to(grad.dtype), *(None,) * (_N_INPUTS - 1)
    # In place on the stored gradient (dino_loss's rescale op), skipped on the device when grad_output is 1. This
    # bumps the gradient's version, so a second backward through the same graph raises rather than rescaling twice.
    _dino_loss_rescale_op(grad, grad_loss, 1.0)
    return grad, *(None,) * (_N_INPUTS - 1)


_ibot_patch_loss_op = KernelOp("ibot_patch_loss", _ibot_patch_loss_forward, fake=_ibot_patch_loss_fake,
                               setup_context=_ibot_patch_loss_setup_context, backward=_ibot_patch_loss_vjp)


# ------------------------------------------------------------------------------------------------- public API
def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, masks_weight: torch.Tensor,
                  n_images: int, student_temp: float, teacher_temp: float, centering: str,
                  sk_iterations: int) -> None:
    for name, t in (("student_patch_logits", student), ("teacher_patch_logits", teacher), ("center", center),
                    ("masks_weight", masks_weight)):
        check_floating(name, t, FLOAT_DTYPES)
    check_same_device(student_patch_logits=student, teacher_patch_logits=teacher, center=center,
                      masks_weight=masks_weight)
    check_ndim("student_patch_logits", student, 2, "(M, K)")
    check_ndim("teacher_patch_logits", teacher, 2, "(M, K)")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_patch_logits must have student_patch_logits' shape {tuple(student.shape)} (M, K); "
                         f"got {tuple(teacher.shape)}")
    n_rows, n_cols = student.shape
    if n_cols == 0:
        raise ValueError(f"student_patch_logits has K=0 columns (shape {tuple(student.shape)}); K must be > 0")
    if center.shape not in ((n_cols,), (1, n_cols)):
        raise ValueError(f"center must have shape ({n_cols},) or (1, {n_cols}); got {tuple(center.shape)}")
    if masks_weight.shape != (n_rows,):
        raise ValueError(f"masks_weight must have shape ({n_rows},), one weight per masked patch; got "
                         f"{tuple(masks_weight.shape)}")
    check_count("n_images", n_images)
    check_count("sk_iterations", sk_iterations)
    check_positive("student_temp", student_temp)
    check_positive("teacher_temp", teacher_temp)
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {', '.join(map(repr, CENTERINGS))}; got {centering!r}")


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_logits: torch.Tensor,
    center: torch.Tensor,
    masks_weight: torch.Tensor,
    *,
    n_images: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.07,
    centering: str = "softmax",
    sk_iterations: int = 3,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DINOLossStats]:
    """DINOv2's masked-patch iBOT loss, fused: −Σ_m w_m Σ_k p_mk log softmax(s_m/τs)_k / n_images.

    Args:
        student_patch_logits: (M, K) head outputs of the M masked patches of the batch (student); fp32, fp16, bf16
            (or fp64 on the CPU backends). M = 0 (no masked patch) gives a loss of 0 and an empty gradient.
        teacher_patch_logits: (M, K) the teacher's outputs at the same patches; no gradient flows to it.
        center: (K,) or (1, K) patch center, any float dtype (unused, but validated, under Sinkhorn-Knopp).
        masks_weight: (M,) weight of each patch, officially 1 / (number of masked patches of its image); any float
            dtype; no gradient flows to it.
        n_images: the number of images (global crops) of the batch, those without a masked patch included.
        student_temp, teacher_temp: τs, τt > 0.
        centering: ``"softmax"``: p_m = softmax((t_m − c)/τt); ``"sinkhorn_knopp"``: DINOv2's Sinkhorn-Knopp
            targets of the M rows (all-reduced across ranks when ``torch.distributed`` is initialised).
        sk_iterations: Sinkhorn-Knopp iterations (>= 1).
        return_stats: also return :class:`~dino_kernels.DINOLossStats`: ``teacher_mean`` (K,), the mean raw teacher
            row, which :func:`dino_kernels.update_center_` takes for the patch center; ``teacher_entropy`` and ``kl``,
            the unweighted row means of the target entropy and of KL(target ‖ student). With M = 0 they are NaN
            (means over no rows): skip the center update then.

    Returns:
        The 0-d loss (fp32; fp64 for fp64 logits), differentiable w.r.t. ``student_patch_logits`` only; with
        ``return_stats``, ``(loss, stats)``.
    """
    _check_inputs(student_patch_logits, teacher_patch_logits, center, masks_weight, n_images, student_temp,
                  teacher_temp, centering, sk_iterations)
    if get_backend() == "reference":  # the eager official-style loss, with its own autograd
        out = reference.ibot_patch_loss(student_patch_logits, teacher_patch_logits, center, masks_weight,
                                        n_images=n_images, student_temp=student_temp, teacher_temp=teacher_temp,
                                        centering=centering, sk_iterations=sk_iterations, return_stats=return_stats)
        return (out[0], DINOLossStats(*out[1])) if return_stats else out
    compute_grad = torch.is_grad_enabled() and student_patch_logits.requires_grad
    shift, scalings = center, (None, None, None)
    if centering == "sinkhorn_knopp" and student_patch_logits.shape[0] > 0:
        targets = sinkhorn_knopp_targets(teacher_patch_logits.detach(), float(teacher_temp), sk_iterations)
        shift, scalings = targets.column_shift, (targets.row_max, targets.row_inv_norm, targets.entropy)
    loss, _, entropy, kl, _ = _ibot_patch_loss_op(student_patch_logits, teacher_patch_logits, shift, masks_weight,
                                                  *scalings, n_images, float(student_temp), float(teacher_temp),
                                                  compute_grad)
    if not return_stats:
        return loss
    teacher_mean = teacher_patch_logits.detach().mean(0, dtype=accumulation_dtype(student_patch_logits,
                                                                                  teacher_patch_logits))
    return loss, DINOLossStats(teacher_mean, entropy.detach(), kl.detach())
