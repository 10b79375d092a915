"""dino_kernels.compat.dinov2: DINOv2's loss classes, checked against their definitions written out here in float64
(DINOv2's loss modules and the way its training step calls them: centering with a one-step lag, Sinkhorn-Knopp,
DINO cross-entropy sums, the iBOT masked-patch loss, KoLeo), on our kernels (C++ and, with the interpreter, Triton)."""

import pytest
import torch
from conftest import CPU_BACKENDS, rel_error

import dino_kernels
from dino_kernels import reference
from dino_kernels.compat.dinov2 import DINOLoss, KoLeoLoss, iBOTPatchLoss

TOL = 1e-5  # fp32 relative


def _cross_entropy_pairs(student_list, teacher_list, student_temp):
    """−Σ_s Σ_t mean_b Σ_k t_bk log softmax(s_b/τs)_k, in float64."""
    total = 0
    for s in student_list:
        log_p = torch.log_softmax(s.double() / student_temp, dim=-1)
        for t in teacher_list:
            total = total - (t.double() * log_p).sum(-1).mean()
    return total


def _backends():
    return pytest.mark.parametrize("backend", CPU_BACKENDS)


@_backends()
@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_step_matches_dinov2_definitions(backend, n_local):
    """One DINOv2 training step's CLS-token loss, as its training step composes it: global crops meet the other
    view's teacher (teacher chunks swapped), local crops meet both, divided by the number of loss terms — which
    with 0 local crops is 2 + max(0, 1) = 3, not DINO v1's 2 pairs."""
    batch, k, temp, student_temp = 5, 37, 0.07, 0.1
    loss_module = DINOLoss(k, student_temp=student_temp)
    teacher = torch.randn(2 * batch, k) * 3
    student_global = torch.randn(2 * batch, k, requires_grad=True)
    student_local = torch.randn(max(n_local, 1) * batch, k, requires_grad=True)
    teacher_swapped = torch.cat(teacher.chunk(2)[::-1])
    n_terms = 2 + max(2 * n_local, 1)
    with dino_kernels.backend(backend):
        targets = loss_module.softmax_center_teacher(teacher_swapped, teacher_temp=temp).view(2, batch, k)
        loss = loss_module([student_global], [targets.flatten(0, 1)]) * 2 / n_terms
        if n_local:
            loss = loss + loss_module(student_local.chunk(n_local), targets) / n_terms
        (loss * 1.7).backward()
    expected_targets = torch.softmax(teacher_swapped.double() / temp, dim=-1)  # the center starts at 0
    sg, sl = student_global.detach().double().requires_grad_(), student_local.detach().double().requires_grad_()
    expected = _cross_entropy_pairs([sg], [expected_targets], student_temp) * 2 / n_terms
    if n_local:
        expected = expected + _cross_entropy_pairs(sl.chunk(n_local), expected_targets.view(2, batch, k),
                                                    student_temp) / n_terms
    (expected * 1.7).backward()
    assert rel_error(targets.flatten(0, 1), expected_targets) <= TOL
    assert rel_error(loss, expected) <= TOL
    assert rel_error(student_global.grad, sg.grad) <= TOL
    if n_local:
        assert rel_error(student_local.grad, sl.grad) <= TOL


def test_dino_center_update_is_applied_lazily_and_as_dinov2_averages():
    k, momentum = 11, 0.8
    loss_module = DINOLoss(k, center_momentum=momentum)
    first, second = torch.randn(6, k), torch.randn(4, k)
    loss_module.update_center(first)
    assert torch.equal(loss_module.center, torch.zeros(1, k))  # nothing moves before the next teacher call
    loss_module.softmax_center_teacher(second, teacher_temp=0.04)
    expected_center = (1 - momentum) * first.double().mean(0, keepdim=True)
    assert rel_error(loss_module.center, expected_center) <= TOL
    targets = loss_module.softmax_center_teacher(second, teacher_temp=0.04)  # applied once only
    assert rel_error(loss_module.center, expected_center) <= TOL
    assert rel_error(targets, torch.softmax((second.double() - expected_center) / 0.04, dim=-1)) <= TOL


@_backends()
def test_sinkhorn_knopp_teachers_match_the_definition(backend):
    teacher = torch.randn(9, 29) * 2
    with dino_kernels.backend(backend):
        dino_targets = DINOLoss(29).sinkhorn_knopp_teacher(teacher, teacher_temp=0.05)
        count = torch.tensor(9)
        ibot_targets = iBOTPatchLoss(29).sinkhorn_knopp_teacher(teacher, 0.05, n_masked_patches_tensor=count)
    expected = reference.sinkhorn_knopp(teacher.double(), 0.05, 3)
    assert dino_targets.dtype == torch.float32
    assert rel_error(dino_targets, expected) <= TOL
    assert rel_error(ibot_targets, expected) <= TOL
    assert count.item() == 9  # the caller's count is not summed in place


def _masks(batch, n_patches):
    masks = torch.rand(batch, n_patches) < 0.4
    masks[0] = False  # an image without any masked patch still counts in the mean over images
    masks[1, :3] = True
    return masks


@_backends()
def test_ibot_forward_masked_matches_the_definition(backend):
    batch, n_patches, k, student_temp = 4, 13, 31, 0.1
    masks = _masks(batch, n_patches)
    n_masked = int(masks.sum())
    upperbound = n_masked + 3  # DINOv2 runs the head on a padded buffer and passes n_masked_patches
    student = torch.randn(upperbound, k, requires_grad=True)
    teacher = torch.randn(1, n_masked, k)
    loss_module = iBOTPatchLoss(k, student_temp=student_temp)
    with dino_kernels.backend(backend):
        targets = loss_module.softmax_center_teacher(teacher, teacher_temp=0.07).squeeze(0)
        loss_default = loss_module.forward_masked(student[:n_masked], targets, student_masks_flat=masks)
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        loss = loss_module.forward_masked(student, targets, masks, n_masked_patches=n_masked, masks_weight=weights)
        (loss * 0.3).backward()
    image_of_patch = torch.arange(batch).unsqueeze(-1).expand_as(masks)[masks]
    s = student.detach().double().requires_grad_()
    log_p = torch.log_softmax(s[:n_masked] / student_temp, dim=-1)
    p = torch.softmax(teacher[0].double() / 0.07, dim=-1)
    per_patch = -(p * log_p).sum(-1) / masks.sum(-1)[image_of_patch]
    expected = per_patch.sum() / batch
    (expected * 0.3).backward()
    assert rel_error(loss_default, expected) <= TOL
    assert rel_error(loss, expected) <= TOL
    assert rel_error(student.grad, s.grad) <= TOL
    assert student.grad[n_masked:].abs().max() == 0  # the padding rows get no gradient


@_backends()
def test_ibot_forward_on_full_patch_grids_matches_the_definition(backend):
    batch, n_patches, k = 3, 10, 17
    masks = _masks(batch, n_patches)
    student = torch.randn(batch, n_patches, k, requires_grad=True)
    targets = torch.softmax(torch.randn(batch, n_patches, k), dim=-1)
    with dino_kernels.backend(backend):
        loss = iBOTPatchLoss(k)(student, targets, masks)
        loss.backward()
    s = student.detach().double().requires_grad_()
    per_patch = (targets.double() * torch.log_softmax(s / 0.1, dim=-1)).sum(-1)
    expected = -((per_patch * masks).sum(-1) / masks.sum(-1).clamp(min=1)).mean()
    expected.backward()
    assert rel_error(loss, expected) <= TOL
    assert rel_error(student.grad, s.grad) <= TOL


def test_ibot_center_update_takes_the_mean_over_masked_patches():
    k, momentum = 8, 0.9
    loss_module = iBOTPatchLoss(k, center_momentum=momentum)
    tokens = torch.randn(1, 6, k)  # DINOv2 passes the masked patches as (1, M, K)
    loss_module.update_center(tokens)
    loss_module.softmax_center_teacher(tokens, teacher_temp=0.07)
    assert loss_module.center.shape == (1, 1, k)
    assert rel_error(loss_module.center.view(-1), (1 - momentum) * tokens[0].double().mean(0)) <= TOL


@_backends()
@pytest.mark.parametrize("batch", [1, 2, 9])
def test_koleo_matches_the_definition(backend, batch):
    features = torch.randn(batch, 12, requires_grad=True)
    with dino_kernels.backend(backend):
        loss = KoLeoLoss()(features)
        (loss * 2.5).backward()
    x = features.detach().double().requires_grad_()
    z = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    dots = (z @ z.t()).detach()
    dots.fill_diagonal_(-1)
    neighbour = dots.argmax(dim=1)
    expected = -torch.log((z - z[neighbour] + 1e-8).norm(dim=-1) + 1e-8).mean()
    (expected * 2.5).backward()
    assert torch.isfinite(loss)
    assert rel_error(loss, expected) <= TOL
    assert rel_error(features.grad, x.grad) <= TOL
    assert torch.equal(KoLeoLoss().pairwise_NNs_inner(z.detach()), neighbour)
