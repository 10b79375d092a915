"""dino_kernels.compat.lightly: lightly's DINO loss class against the real ``lightly.loss.DINOLoss``: signatures,
attributes, the temperature lightly picks (schedule, override, after the warm-up), loss, gradients w.r.t. every student
view and the center step after step, and state_dicts loaded both ways; on our kernels (C++ and, with the interpreter,
Triton)."""

import inspect

import pytest
import torch
from conftest import CPU_BACKENDS, cuda_param, rel_error

import dino_kernels
from dino_kernels.compat.lightly import DINOLoss

lightly_loss = pytest.importorskip("lightly.loss")

# Not lightly's defaults, so that an argument the class fails to pass on changes the numbers.
ARGS = dict(warmup_teacher_temp=0.03, teacher_temp=0.07, warmup_teacher_temp_epochs=3, student_temp=0.12,
            center_momentum=0.8)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
# fp64 runs on the C++ kernels (backend auto); the Triton kernels take fp32/fp16/bf16.
BACKEND_DTYPES = [("auto", torch.float64)] + [(backend, torch.float32) for backend in CPU_BACKENDS]
# (epoch, teacher_temp) of each step: through the warm-up and past it, an explicit temperature, neither.
CALLS = [(0, None), (1, None), (2, None), (3, None), (7, None), (None, 0.05), (1, 0.06), (None, None)]


def _parameters(function):
    """(name, kind, default) of each parameter: the annotations are spelt differently."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_signatures_are_lightlys():
    assert _parameters(DINOLoss.__init__) == _parameters(lightly_loss.DINOLoss.__init__)
    assert _parameters(DINOLoss.forward) == _parameters(lightly_loss.DINOLoss.forward)
    assert _parameters(DINOLoss.update_center) == _parameters(lightly_loss.DINOLoss.update_center)


def _run_steps(k, n_teacher, n_student, dtype, device, backend):
    """Both classes through CALLS from the same inputs: the relative errors of the loss, the gradients of every
    student view (grad_output 1.7) and the center after each step."""
    ours = DINOLoss(k, **ARGS).to(device, dtype)
    theirs = lightly_loss.DINOLoss(k, **ARGS).to(device, dtype)
    batch = 3
    errors = []
    for epoch, teacher_temp in CALLS:
        shift = torch.randn(k, dtype=dtype)
        teacher = [(torch.randn(batch, k, dtype=dtype) * 3 + shift).to(device) for _ in range(n_teacher)]
        student = [torch.randn(batch, k, dtype=dtype, device=device, requires_grad=True) for _ in range(n_student)]
        student_theirs = [s.detach().clone().requires_grad_() for s in student]
        with dino_kernels.backend(backend):
            loss = ours(teacher, student, teacher_temp=teacher_temp, epoch=epoch)
            (loss * 1.7).backward()
        loss_theirs = theirs(teacher, student_theirs, teacher_temp=teacher_temp, epoch=epoch)
        (loss_theirs * 1.7).backward()
        grad_errors = [rel_error(s.grad, t.grad) for s, t in zip(student, student_theirs)]
        errors.append((rel_error(loss, loss_theirs), *grad_errors, rel_error(ours.center, theirs.center)))
    return errors


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("n_teacher,n_student", [(2, 6), (2, 2), (1, 3)])
def test_matches_lightly_step_after_step(backend, dtype, n_teacher, n_student):
    for step, errors in enumerate(_run_steps(37, n_teacher, n_student, dtype, "cpu", backend)):
        assert max(errors) <= TOLERANCE[dtype], (CALLS[step], errors)


@pytest.mark.parametrize("device", [cuda_param("cuda")])
def test_matches_lightly_step_after_step_cuda(device):
    for step, errors in enumerate(_run_steps(1000, 2, 6, torch.float32, device, "auto")):
        assert max(errors) <= TOLERANCE[torch.float32], (CALLS[step], errors)


def test_positional_third_argument_is_the_teacher_temperature():
    """lightly's forward is (teacher_out, student_out, teacher_temp, epoch): a positional third argument is a
    temperature, not an epoch."""
    teacher, student = [torch.randn(4, 9) for _ in range(2)], [torch.randn(4, 9) for _ in range(3)]
    ours, theirs = DINOLoss(9, **ARGS), lightly_loss.DINOLoss(9, **ARGS)
    assert rel_error(ours(teacher, student, 0.5), theirs(teacher, student, 0.5)) <= TOLERANCE[torch.float32]


def test_attributes_and_state_dict_load_both_ways():
    ours, theirs = DINOLoss(13, **ARGS), lightly_loss.DINOLoss(13, **ARGS)
    for name in ("teacher_temp", "student_temp", "center_momentum", "warmup_teacher_temp_epochs"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert torch.equal(ours.teacher_temp_schedule, theirs.teacher_temp_schedule)
    assert ours.teacher_temp_schedule.dtype == theirs.teacher_temp_schedule.dtype
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["center"]
    assert ours.center.shape == theirs.center.shape == (1, 1, 13)
    teacher, student = [torch.randn(4, 13) for _ in range(2)], [torch.randn(4, 13) for _ in range(4)]
    theirs(teacher, student, epoch=1)  # a trained center, loaded into ours: the next losses agree
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.center, theirs.center)
    assert rel_error(ours(teacher, student, epoch=2), theirs(teacher, student, epoch=2)) <= TOLERANCE[torch.float32]
    ours(teacher, student, epoch=2)  # and back: ours trained further, loaded into lightly's
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.center, ours.center)


def test_update_center_method_matches():
    ours, theirs = DINOLoss(13, **ARGS).double(), lightly_loss.DINOLoss(13, **ARGS).double()
    for _ in range(3):
        teacher = torch.randn(2, 5, 13, dtype=torch.float64) + 1
        ours.update_center(teacher)
        theirs.update_center(teacher)
    assert rel_error(ours.center, theirs.center) <= 1e-12


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="Unknown mode 'median'"):
        DINOLoss(13, center_mode="median")
    with pytest.raises(ValueError, match="center_momentum must be in"):
        DINOLoss(13, center_momentum=1.5)
    loss = DINOLoss(13, **ARGS)
    views = [torch.randn(4, 13) for _ in range(3)]
    with pytest.raises(ValueError, match="2 teacher view.* and 1 student view"):
        loss(views[:2], views[:1])
    with pytest.raises(ValueError, match="1 teacher view.* and 1 student view"):
        loss(views[:1], views[:1])
    with pytest.raises(ValueError, match=r"student_out\[1\] must have shape .* \(4, 13\) .* got \(5, 13\)"):
        loss(views[:2], [views[0], torch.randn(5, 13)])
    with pytest.raises(ValueError, match=r"teacher_out\[0\] must have shape .* got \(4, 12\)"):
        loss([torch.randn(4, 12)], views)
    with pytest.raises(TypeError, match=r"student_out\[2\] must be a torch.Tensor"):
        loss(views[:2], [*views[:2], None])
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        loss(views[:2], views, epoch=-1)
    with pytest.raises(ValueError, match="teacher_temp must be a finite number > 0"):
        loss(views[:2], views, teacher_temp=0.0)
