"""Plain-PyTorch reference implementations: the ground truth for every op of dino_kernels.

Readable first, fast never. Tests compare the fused kernels with these (in float64), benchmarks time them as the
``reference`` provider, and ``dino_kernels.set_backend("reference")`` routes every public op here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


# --------------------------------------------------------------------------------------------- teacher EMA
@torch.no_grad()
def ema_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In place ``t <- m * t + (1 - m) * s`` for every pair, in fp32 math (fp64 for fp64 teachers).

    The student may have another floating dtype than the teacher (e.g. bf16 student, fp32 teacher).
    """
    for t, s in zip(teacher, student, strict=True):
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        t.copy_(momentum * t.to(acc) + (1.0 - momentum) * s.to(acc))


# ---------------------------------------------------------------------------- sample-skipping stochastic depth
def scaled_index_add(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, alpha: float = 1.0,
                     scaling: torch.Tensor | None = None) -> torch.Tensor:
    """``out = x; out[index[j]] += alpha * scaling * src[j]`` (duplicates accumulate), fp32 math (fp64 for fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    update = src.to(acc) if scaling is None else src.to(acc) * scaling.to(acc)
    return torch.index_add(x.to(acc), 0, index, update, alpha=alpha).to(x.dtype)


def index_select_cat(xs: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows ``xs[i][indices[i]]`` of every group packed into ``(sum_i k_i * M_i, D)`` token rows."""
    return torch.cat([x.index_select(0, i).reshape(-1, x.shape[-1]) for x, i in zip(xs, indices, strict=True)])


def drop_add_residual(x, branch, drop_rate: float, *, training: bool = True,
                      generator: torch.Generator | None = None, scaling: torch.Tensor | None = None):
    """DINOv2's ``drop_add_residual_stochastic_depth`` (tensor x) / ``_list`` (list of crop groups) with LayerScale.

    Per group of B samples: keep = max(int(B * (1 - drop_rate)), 1) rows of ``randperm(B)`` (no draw when all are
    kept, or in eval), the branch on those rows only, and ``x + (B / keep) * scaling * residual`` on them. The list
    form packs the kept samples of every group as (sum keep_i * N_i, D) and calls ``branch(packed, cu_seqlens,
    max_seqlen)`` once (int32 cu_seqlens, one sequence per kept image).
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1); got {drop_rate}")
    groups = [x] if isinstance(x, torch.Tensor) else list(x)
    kept = []
    for g in groups:
        batch = g.shape[0]
        keep = max(int(batch * (1.0 - drop_rate)), 1) if training else batch
        if keep < batch:
            rng_device = generator.device if generator is not None else g.device
            kept.append(torch.randperm(batch, generator=generator, device=rng_device)[:keep].to(g.device))
        else:
            kept.append(torch.arange(batch, device=g.device))
    if isinstance(x, torch.Tensor):
        residuals = [branch(x[kept[0]])]
    else:
        packed = index_select_cat(groups, kept)
        seqlens = [g.shape[1] for g, k in zip(groups, kept) for _ in range(len(k))]
        cu_seqlens = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32, device=packed.device)
        out = branch(packed, cu_seqlens, max(g.shape[1] for g in groups))
        residuals = [r.view(len(k), *g.shape[1:]) for g, k, r in
                     zip(groups, kept, out.split([len(k) * g.shape[1] for g, k in zip(groups, kept)]))]
    outs = [scaled_index_add(g, k, r.to(g.dtype), alpha=g.shape[0] / len(k), scaling=scaling)
            for g, k, r in zip(groups, kept, residuals)]
    return outs[0] if isinstance(x, torch.Tensor) else outs


# ------------------------------------------------------------------------------ packed block-diagonal attention
def _sequences(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _attention_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """``softmax(q_s k_s^T * scale) v_s`` for each sequence ``s = cu_seqlens[i]:cu_seqlens[i+1]`` of the packed
    ``(T, H, D)`` inputs, one sequence at a time, in fp32 (fp64 for fp64) math; ``(T, H, D)`` in q's dtype.
    ``scale`` defaults to ``D ** -0.5``. Differentiable through autograd."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _attention_dtype(q.dtype)
    outs = []
    for a, b in _sequences(cu_seqlens):
        qs, ks, vs = (t[a:b].transpose(0, 1).to(acc) for t in (q, k, v))  # (H, n, D)
        attn = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        outs.append((attn @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def packed_attention_lse(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """``(H, T)`` log-sum-exp (natural log) of each query's scaled scores over its sequence's keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _attention_dtype(q.dtype)
    lses = []
    for a, b in _sequences(cu_seqlens):
        qs, ks = (t[a:b].transpose(0, 1).to(acc) for t in (q, k))
        lses.append(torch.logsumexp(qs @ ks.transpose(1, 2) * scale, dim=-1))
    return torch.cat(lses, dim=1)


def packed_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens: torch.Tensor,
                              scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`packed_attention` for ``grad_out``, per sequence in closed form:
    ``P = softmax(S)``, ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dP * P))``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _attention_dtype(q.dtype)
    grads: tuple[list, list, list] = ([], [], [])
    for a, b in _sequences(cu_seqlens):
        qs, ks, vs, dos = (t[a:b].transpose(0, 1).to(acc) for t in (q, k, v, grad_out))
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        dp = dos @ vs.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        for dest, g in zip(grads, (scale * ds @ ks, scale * ds.transpose(1, 2) @ qs, p.transpose(1, 2) @ dos)):
            dest.append(g.transpose(0, 1))
    return tuple(torch.cat(g).to(t.dtype) for g, t in zip(grads, (q, k, v)))


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean ``(T, T)`` mask, True where query and key tokens belong to the same sequence (what xformers'
    ``BlockDiagonalMask.materialize`` describes): packed attention is dense attention under this mask."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                     output_size=total)
    return seq_id[:, None] == seq_id[None, :]


# ------------------------------------------------------------------------------------------------- DINO loss
def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor, *,
              n_global_crops: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04,
              centering: str = "softmax", sk_iterations: int = 3, return_stats: bool = False):
    """The official DINO loss (facebookresearch/dino main_dino.py ``DINOLoss.forward``), one crop pair at a time.

    student_logits (S·B, K) and teacher_logits (G·B, K) are crop-major, the G global crops first; center (K,) or
    (1, K). Math in fp32 (fp64 if an input is fp64), as the official code gets under autocast, where softmax and
    log_softmax run in fp32. ``centering="sinkhorn_knopp"`` takes DINOv2's Sinkhorn-Knopp targets of all G·B teacher
    rows (``sk_iterations`` iterations; ``center`` is then unused) instead of softmax((t − c)/τt). Returns the loss,
    or ``(loss, (teacher_mean, teacher_entropy, kl))`` with the batch mean of the raw teacher logits (K,), the mean
    teacher entropy and the mean KL(teacher ‖ student) over the pairs.
    """
    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    batch = teacher_logits.shape[0] // n_global_crops
    n_crops = student_logits.shape[0] // batch
    student_out = (student_logits.to(acc) / student_temp).chunk(n_crops)
    targets = _teacher_targets(teacher_logits, center, teacher_temp, centering, sk_iterations, acc).detach()
    teacher_out = targets.chunk(n_global_crops)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(n_crops):
            if v == iq:
                continue  # the teacher and the student see the same view
            loss = torch.sum(-q * torch.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss = total_loss + loss.mean()
            n_loss_terms += 1
    total_loss = total_loss / n_loss_terms
    if not return_stats:
        return total_loss
    with torch.no_grad():
        p_log_p = torch.where(targets > 0, targets * torch.log(targets), 0)
        entropy = -p_log_p.sum(-1).mean()
        p_log_p, p = p_log_p.chunk(n_global_crops), targets.chunk(n_global_crops)
        kl = sum((p_log_p[i] - p[i] * torch.log_softmax(student_out[v], dim=-1)).sum(-1).mean()
                 for i in range(n_global_crops) for v in range(n_crops) if v != i) / n_loss_terms
        stats = (teacher_logits.to(acc).mean(0), entropy, kl)
    return total_loss, stats


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> None:
    """The official center EMA (``DINOLoss.update_center``): ``c <- m c + (1 - m) batch_center``, in place.

    teacher_logits: the raw teacher logits (N, K), or their batch mean (K,). batch_center is the all-reduced sum of
    the rows divided by N · world size when ``torch.distributed`` is initialised.
    """
    acc = torch.float64 if torch.float64 in (center.dtype, teacher_logits.dtype) else torch.float32
    rows = teacher_logits.to(acc).reshape(-1, teacher_logits.shape[-1])
    batch_center = torch.sum(rows, dim=0, keepdim=True)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(batch_center)
        world_size = torch.distributed.get_world_size()
    batch_center = batch_center / (len(rows) * world_size)
    center.copy_((center.to(acc) * momentum + batch_center * (1 - momentum)).view(center.shape))


# ------------------------------------------------------------------------------------------- Sinkhorn-Knopp
def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                   n_samples: int | None = None) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets (``DINOLoss.sinkhorn_knopp_teacher``), (N, K), rows summing to 1.

    Q = exp(t/τt)ᵀ (K, N), divided by its all-reduced total; then ``n_iterations`` times: each prototype row divided
    by its all-reduced sum and by K, each sample column by its (local) sum and by the global sample count
    (``n_samples``, default N · world size); finally multiplied by that count. fp32 math (fp64 for fp64 logits), no
    max subtraction, as the official code.
    """
    acc = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    q = torch.exp(teacher_logits.to(acc) / teacher_temp).t()
    world_size = torch.distributed.get_world_size() if (
        torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
    n_total = q.shape[1] * world_size if n_samples is None else n_samples
    n_prototypes = q.shape[0]
    q = q / _all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q = q / _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / n_prototypes
        q = q / q.sum(dim=0, keepdim=True)
        q = q / n_total
    return (q * n_total).t()


def _teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float, centering: str,
                     sk_iterations: int, acc: torch.dtype) -> torch.Tensor:
    if centering == "softmax":
        return torch.softmax((teacher_logits.to(acc) - center.to(acc)) / teacher_temp, dim=-1)
    return sinkhorn_knopp(teacher_logits.to(acc), teacher_temp, sk_iterations)


# ------------------------------------------------------------------------------------------ iBOT patch loss
def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_logits: torch.Tensor, center: torch.Tensor,
                    masks_weight: torch.Tensor, *, n_images: int, student_temp: float = 0.1,
                    teacher_temp: float = 0.07, centering: str = "softmax", sk_iterations: int = 3,
                    return_stats: bool = False):
    """DINOv2's masked-patch iBOT loss (``iBOTPatchLoss.forward_masked``) on raw teacher logits.

    student_patch_logits, teacher_patch_logits (M, K): the masked patches' head outputs; center (K,) or (1, K);
    masks_weight (M,): each patch's weight (officially 1 / number of masked patches of its image). The targets are
    p = softmax((t − c)/τt) (``centering="softmax"``) or the Sinkhorn-Knopp targets of the M rows, and the loss is
    −Σ_m w_m Σ_k p_mk log softmax(s_m/τs)_k / n_images. fp32 math (fp64 for fp64 inputs). With ``return_stats``
    also ``(teacher_mean (K,), teacher_entropy, kl)``: the mean raw teacher row (the patch center update) and the
    unweighted row means of the target entropy and of KL(target ‖ student).
    """
    acc = torch.float64 if torch.float64 in (student_patch_logits.dtype, teacher_patch_logits.dtype) else torch.float32
    targets = _teacher_targets(teacher_patch_logits, center, teacher_temp, centering, sk_iterations, acc).detach()
    log_student = torch.log_softmax(student_patch_logits.to(acc) / student_temp, dim=-1)
    row_loss = -(targets * log_student).sum(-1)
    loss = (row_loss * masks_weight.to(acc)).sum() / n_images
    if not return_stats:
        return loss
    with torch.no_grad():
        log_targets = torch.log(targets)
        entropy = -torch.where(targets > 0, targets * log_targets, 0).sum(-1)
        stats = (teacher_patch_logits.to(acc).mean(0), entropy.mean(), (row_loss - entropy).mean())
    return loss, stats


# ------------------------------------------------------------------------------------------------- KoLeo
def koleo_loss(features: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's ``KoLeoLoss``: z = x / max(‖x‖, eps) per row; each row's nearest neighbour is the other row of
    largest z_i·z_j (the diagonal set to −1, so with B = 1 the row is its own neighbour; ties: the lowest index);
    loss = −mean_i log(‖z_i − z_nn(i) + 1e-8‖ + eps).

    features (B, D). Math in fp32 for fp32/fp16/bf16 inputs (the official module runs in the input dtype, where fp16
    makes duplicates and B = 1 infinite) and in fp64 for fp64; returns a 0-d tensor of that math dtype.
    Differentiable through autograd (the neighbour indices are constants, as in the official code).
    """
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    z = torch.nn.functional.normalize(features.to(acc), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = z @ z.t()
        dots.fill_diagonal_(-1)
        neighbour = dots.argmax(dim=1)
    distances = torch.linalg.vector_norm(z - z[neighbour] + 1e-8, dim=-1)
    return -torch.log(distances + eps).mean()
