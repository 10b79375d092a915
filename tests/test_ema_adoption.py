"""dino_kernels.ema_ as the one-line swap for other code's teacher EMA: the official DINO loop, DINOv2's _foreach pair,
lightly's update_momentum and timm's real ModelEmaV3, each compared after several steps with its original (the maths
are the same, t·m + (1 − m)·s, rounded in another order: within fp32 rounding, 1e-6 relative); and the forms those
codes pass: generators, lists filtered from named_parameters, named_parameters pairs (names checked through DDP /
torch.compile prefixes), bf16 / fp16 students of an fp32 teacher."""

import copy
import inspect

import pytest
import torch
from conftest import CPU_BACKENDS, cuda_param, rel_error
from torch import nn

import dino_kernels
from dino_kernels import ema_

timm = pytest.importorskip("timm")
timm_utils = pytest.importorskip("timm.utils")

SWAP_TOLERANCE = 1e-6  # fp32, relative: the same maths in another rounding order
MOMENTA = (0.9, 0.996, 0.5)
DEVICES = ["cpu", cuda_param("cuda")]


def _model(device="cpu", batch_norm=False):
    layers = [nn.Linear(13, 24), nn.BatchNorm1d(24) if batch_norm else nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 5)]
    return nn.Sequential(*layers).to(device)


def _train_step(student):
    """A stand-in for an optimiser step (and, with BatchNorm in train mode, a forward that moves its buffers)."""
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        first = next(student.parameters())
        student(torch.randn(8, 13, device=first.device, dtype=first.dtype))


def _assert_close(ours, theirs, tolerance=SWAP_TOLERANCE):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert rel_error(a, b) <= tolerance, (i, rel_error(a, b))


def _twin_teachers(student):
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.normal_()
    return teacher, copy.deepcopy(teacher)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_official_dino_loop(backend, device):
    """main_dino.py: ``for param_q, param_k in zip(student.parameters(), teacher.parameters()):
    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`` -> ``ema_(teacher.parameters(),
    student.parameters(), m)`` (generators, as the loop passes them)."""
    student = _model(device)
    ours, theirs = _twin_teachers(student)
    for m in MOMENTA:
        _train_step(student)
        with dino_kernels.backend(backend):
            ema_(ours.parameters(), student.parameters(), m)
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), theirs.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    _assert_close(ours.parameters(), theirs.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_dinov2_foreach_pair(backend, device):
    """DINOv2's update_teacher: ``torch._foreach_mul_(teacher_param_list, m); torch._foreach_add_(teacher_param_list,
    student_param_list, alpha=1 - m)`` -> ``ema_(teacher_param_list, student_param_list, m)``."""
    student = _model(device)
    ours, theirs = _twin_teachers(student)
    for m in MOMENTA:
        _train_step(student)
        with dino_kernels.backend(backend):
            ema_(list(ours.parameters()), list(student.parameters()), m)
        with torch.no_grad():
            teacher_param_list, student_param_list = list(theirs.parameters()), list(student.parameters())
            torch._foreach_mul_(teacher_param_list, m)
            torch._foreach_add_(teacher_param_list, student_param_list, alpha=1 - m)
    _assert_close(ours.parameters(), theirs.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_lightly_update_momentum(device):
    """lightly: ``update_momentum(student, teacher, m)`` (student first) -> ``ema_(teacher.parameters(),
    student.parameters(), m)``."""
    lightly_utils = pytest.importorskip("lightly.models.utils")  # a test dependency; not on the GPU image
    student = _model(device)
    ours, theirs = _twin_teachers(student)
    for m in MOMENTA:
        _train_step(student)
        ema_(ours.parameters(), student.parameters(), m)
        lightly_utils.update_momentum(student, theirs, m)
    _assert_close(ours.parameters(), theirs.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_timm_model_ema_v3_with_decay_warmup_and_low_precision_model(device, dtype):
    """timm's ``model_ema.update(model, step)`` -> ``ema_(model_ema.module.parameters(), model.parameters(),
    model_ema.get_decay(step))``, for a model without buffers; here a bf16 / fp16 model with an fp32 EMA
    (``dtype=torch.float32``), with timm's decay warm-up (decay 0 at the first steps: a copy)."""
    if "dtype" not in inspect.signature(timm_utils.ModelEmaV3).parameters:  # e.g. the GPU image's timm 1.0.29
        pytest.skip(f"timm {timm.__version__}'s ModelEmaV3 has no dtype argument (an EMA in another dtype)")
    model = _model(device).to(dtype)
    kwargs = dict(decay=0.999, use_warmup=True, update_after_step=1, dtype=torch.float32)
    ours, theirs = timm_utils.ModelEmaV3(model, **kwargs), timm_utils.ModelEmaV3(model, **kwargs)
    for step in range(6):
        _train_step(model)
        ema_(ours.module.parameters(), model.parameters(), ours.get_decay(step))
        theirs.update(model, step)
    _assert_close(ours.module.parameters(), theirs.module.parameters())
    assert all(p.dtype == torch.float32 for p in ours.module.parameters())


@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_timm_model_ema_v3_with_buffers(exclude_buffers):
    """With buffers (BatchNorm), ModelEmaV3's treatment of them goes along with the swap: by default it averages the
    floating state_dict entries (running mean and variance) and copies the others (num_batches_tracked); with
    exclude_buffers=True it averages the parameters and copies every buffer."""
    model = _model(batch_norm=True)
    ours = timm_utils.ModelEmaV3(model, decay=0.9, exclude_buffers=exclude_buffers)
    theirs = timm_utils.ModelEmaV3(model, decay=0.9, exclude_buffers=exclude_buffers)
    for step in range(4):
        _train_step(model)
        decay = ours.get_decay(step)
        if exclude_buffers:
            ema_(ours.module.parameters(), model.parameters(), decay)
            for ema_buffer, buffer in zip(ours.module.buffers(), model.buffers()):
                ema_buffer.copy_(buffer)
        else:
            pairs = list(zip(ours.module.state_dict().values(), model.state_dict().values()))
            ema_([e for e, _ in pairs if e.is_floating_point()], [v for e, v in pairs if e.is_floating_point()],
                 decay)
            for ema_value, value in pairs:
                if not ema_value.is_floating_point():
                    ema_value.copy_(value)
        theirs.update(model, step)
    _assert_close(ours.module.state_dict().values(), theirs.module.state_dict().values())


# bf16 is broken in the Triton interpreter: the Triton bf16 path is proven by the AOT compile and the cuda tests.
@pytest.mark.parametrize("backend,dtype", [(backend, torch.float16) for backend in CPU_BACKENDS]
                         + [("auto", torch.bfloat16)])
def test_low_precision_student_of_an_fp32_teacher_matches_fp64_maths(backend, dtype):
    """A bf16 / fp16 student is read as it is: the fp32 teacher gets m·t + (1 − m)·s of the student's values,
    rounded once to fp32."""
    student = _model().to(dtype)
    teacher = _model()
    expected = [0.996 * t.double() + 0.004 * s.double() for t, s in zip(teacher.parameters(), student.parameters())]
    with dino_kernels.backend(backend):
        ema_(teacher.parameters(), student.parameters(), 0.996)
    _assert_close(teacher.parameters(), expected, tolerance=1e-7)


class _Wrapper(nn.Module):
    """Names its wrapped model's parameters ``module.*``, as DistributedDataParallel does."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_named_parameters_through_ddp_and_compile_prefixes():
    """named_parameters() pairs as they are: names agree once 'module.' / '_orig_mod.' prefixes are dropped."""
    student = _model()
    ours, theirs = _twin_teachers(student)
    wrapped_student = torch.compile(_Wrapper(student))  # names: _orig_mod.module.0.weight, ...
    assert next(wrapped_student.named_parameters())[0].startswith("_orig_mod.module.")
    _train_step(student)
    ema_(ours.named_parameters(), wrapped_student.named_parameters(), 0.9)
    ema_(theirs.parameters(), student.parameters(), 0.9)
    _assert_close(ours.parameters(), theirs.parameters(), tolerance=0)
    ema_(ours.named_parameters(), student.parameters(), 0.5)  # named on one side only: nothing to compare
    ema_(theirs.parameters(), student.parameters(), 0.5)
    _assert_close(ours.parameters(), theirs.parameters(), tolerance=0)


def test_named_parameters_filtered_lists():
    """iBOT-style forks pair the parameters whose names both models have (a head the teacher lacks is left out)."""
    student, teacher = _model(), _model()
    student.add_module("extra_head", nn.Linear(5, 3))
    teacher_named = dict(teacher.named_parameters())
    common = [name for name, _ in student.named_parameters() if name in teacher_named]
    before = [teacher_named[name].detach().clone() for name in common]
    student_named = dict(student.named_parameters())
    ema_([teacher_named[name] for name in common], [student_named[name] for name in common], 0.9)
    expected = [0.9 * b + 0.1 * student_named[name].detach() for b, name in zip(before, common)]
    _assert_close([teacher_named[name] for name in common], expected)


def test_misaligned_named_parameters_are_refused():
    student, teacher = _model(), _model()
    before = [p.detach().clone() for p in teacher.parameters()]
    with pytest.raises(ValueError, match=r"teacher\[0\] is '0.weight' but student\[0\] is '3.bias'"):
        ema_(teacher.named_parameters(), reversed(list(student.named_parameters())), 0.9)
    assert all(torch.equal(p, b) for p, b in zip(teacher.parameters(), before))  # nothing was updated
    with pytest.raises(TypeError, match=r"student\[1\] must be a \(name, tensor\) pair, as student\[0\] is"):
        ema_(teacher.parameters(), [("0.weight", student[0].weight), student[0].bias], 0.9)
