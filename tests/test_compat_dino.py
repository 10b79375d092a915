"""dino_kernels.compat.dino: the official DINO loss class against main_dino.py's, transcribed below (the DINO repo is
not a package), step after step across the teacher-temperature warm-up: loss, student gradient, center, state_dict
and attributes; on our kernels (C++ and, with the interpreter, Triton)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - main_dino.py's name
from conftest import CPU_BACKENDS, cuda_param, rel_error
from torch import nn

import dino_kernels
from dino_kernels.compat.dino import DINOLoss


class OfficialDINOLoss(nn.Module):
    """facebookresearch/dino main_dino.py ``DINOLoss``, transcribed; the only change: ``update_center`` all-reduces
    only under torch.distributed (the original calls ``dist.all_reduce`` and ``dist.get_world_size`` always)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            world_size = torch.distributed.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# Not the defaults, so that an argument the class fails to pass on changes the numbers.
ARGS = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, nepochs=5, student_temp=0.12,
            center_momentum=0.8)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def _run_epochs(k, ncrops, dtype, device, backend):
    """Both classes through every epoch of ARGS (warm-up included), one step each from the same inputs: the relative
    errors of the loss, the student gradient (grad_output 1.7) and the center after each step."""
    ours = DINOLoss(k, ncrops, **ARGS).to(device, dtype)
    official = OfficialDINOLoss(k, ncrops, **ARGS).to(device, dtype)
    batch = 3
    errors = []
    for epoch in range(ARGS["nepochs"]):
        teacher = (torch.randn(2 * batch, k, dtype=dtype) * 3 + torch.randn(k, dtype=dtype)).to(device)
        student = torch.randn(ncrops * batch, k, dtype=dtype, device=device, requires_grad=True)
        student_official = student.detach().clone().requires_grad_()
        with dino_kernels.backend(backend):
            loss = ours(student, teacher, epoch)
            (loss * 1.7).backward()
        loss_official = official(student_official, teacher, epoch)
        (loss_official * 1.7).backward()
        errors.append((rel_error(loss, loss_official), rel_error(student.grad, student_official.grad),
                       rel_error(ours.center, official.center)))
    return errors


# fp64 runs on the C++ kernels (backend auto); the Triton kernels take fp32/fp16/bf16.
BACKEND_DTYPES = [("auto", torch.float64)] + [(backend, torch.float32) for backend in CPU_BACKENDS]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("ncrops", [2, 6])
def test_matches_main_dino_across_the_warmup(backend, dtype, ncrops):
    for step, errors in enumerate(_run_epochs(37, ncrops, dtype, "cpu", backend)):
        assert max(errors) <= TOLERANCE[dtype], (step, errors)


@pytest.mark.parametrize("device", [cuda_param("cuda")])
def test_matches_main_dino_across_the_warmup_cuda(device):
    for step, errors in enumerate(_run_epochs(1000, 6, torch.float32, device, "auto")):
        assert max(errors) <= TOLERANCE[torch.float32], (step, errors)


def test_attributes_schedule_and_state_dict_are_the_originals():
    ours, official = DINOLoss(11, 4, **ARGS), OfficialDINOLoss(11, 4, **ARGS)
    assert isinstance(ours.teacher_temp_schedule, np.ndarray)
    assert np.array_equal(ours.teacher_temp_schedule, official.teacher_temp_schedule)
    for name in ("student_temp", "center_momentum", "ncrops"):
        assert getattr(ours, name) == getattr(official, name), name
    assert list(ours.state_dict()) == list(official.state_dict()) == ["center"]
    official.center.normal_()
    ours.load_state_dict(official.state_dict())
    assert torch.equal(ours.center, official.center)
    ours.center.normal_()
    official.load_state_dict(ours.state_dict())
    assert torch.equal(official.center, ours.center)


def test_update_center_method_and_ncrops_setter():
    ours, official = DINOLoss(11, 4, **ARGS).double(), OfficialDINOLoss(11, 4, **ARGS).double()
    for _ in range(3):
        teacher = torch.randn(8, 11, dtype=torch.float64) + 2
        ours.update_center(teacher)
        official.update_center(teacher)
    assert rel_error(ours.center, official.center) <= 1e-12
    ours.ncrops = 3  # a fork that changes the crop count after construction
    assert ours.n_crops == 3
    with pytest.raises(ValueError, match="student_output has 16 rows"):
        ours(torch.zeros(16, 11), torch.zeros(8, 11), 0)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="ncrops must be >= 2"):
        DINOLoss(11, 1, **ARGS)
    with pytest.raises(TypeError, match="ncrops must be an int"):
        DINOLoss(11, 4.0, **ARGS)
    loss = DINOLoss(11, 4, **ARGS)
    with pytest.raises(ValueError, match="student_output has 10 rows; 4 crops .* B=3 make 12"):
        loss(torch.randn(10, 11), torch.randn(6, 11), 0)
    with pytest.raises(ValueError, match="teacher_output must hold the 2 global crops, .* got 5 rows"):
        loss(torch.randn(12, 11), torch.randn(5, 11), 0)
    with pytest.raises(ValueError, match="epoch must be in"):
        loss(torch.randn(12, 11), torch.randn(6, 11), ARGS["nepochs"])
    with pytest.raises(ValueError, match=r"student_output must be 2-d logits \(rows, out_dim=11\); got shape \(12, 1"):
        loss(torch.randn(12, 12), torch.randn(6, 12), 0)
    with pytest.raises(ValueError, match=r"teacher_output must be 2-d logits .* got shape \(6,\)"):
        loss(torch.randn(12, 11), torch.randn(6), 0)
    with pytest.raises(TypeError, match="teacher_output must be a torch.Tensor"):
        loss(torch.randn(12, 11), np.zeros((6, 11)), 0)
