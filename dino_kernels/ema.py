"""Fused multi-tensor EMA of teacher weights: ``t <- m * t + (1 - m) * s`` for a whole parameter list.

DINO updates the teacher after every optimiser step with a Python loop over parameters (one or two kernel
launches per tensor); DINOv2 with ``_foreach_mul_`` + ``_foreach_add_`` (two passes over the teacher). Here each
(teacher dtype, student dtype) group of the list is updated by one launch that reads teacher and student once and
writes the teacher once: 3 memory accesses per element, the minimum.

Implementations: CUDA C++ (``csrc/ema.cu``: chunk table + grid-stride, 16-byte accesses), C++ CPU
(``csrc/ema.cpp``: parallel over chunks, vectorisable loop), Triton (below), and the plain-PyTorch reference.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import triton
import triton.language as tl

from dino_kernels import reference
from dino_kernels._backend import TRITON_DTYPES, get_backend, resolve
from dino_kernels._extension import ops
from dino_kernels._launch import TritonKernel
from dino_kernels._op import KernelOp, tracing
from dino_kernels._validation import check_tensor_list, check_unit_interval

# Elements per chunk of the work tables. A multiple of 8 so that every chunk of a 16-byte-aligned tensor starts
# 16-byte aligned (the CUDA kernel's vector path needs it).
CUDA_CHUNK = 1 << 16
CUDA_BLOCKS_PER_SM = 8
TRITON_CHUNK = 1 << 14

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# ---------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _ema_kernel(
    teacher_base,  # lowest-addressed teacher tensor of the group: every chunk is addressed relative to it
    student_base,  # likewise for the students
    chunks,  # int64 (n_chunks, 3): teacher element offset, student element offset, chunk length
    momentum,
    one_minus_momentum,  # 1 - m rounded once on the host (in fp64) rather than in fp32 here
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Multi-tensor apply without a pointer table: a tensor's address is the base address plus an element offset.
    # Triton cannot load pointers from memory in the interpreter, but base + int64 offset works compiled and
    # interpreted alike, so one launch covers every tensor of a dtype group.
    row = chunks + tl.program_id(0) * 3
    teacher_offset = tl.load(row)
    student_offset = tl.load(row + 1)
    length = tl.load(row + 2)
    for start in range(0, CHUNK, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < length
        t = tl.load(teacher_base + teacher_offset + idx, mask=mask).to(tl.float32)
        s = tl.load(student_base + student_offset + idx, mask=mask).to(tl.float32)
        updated = momentum * t + one_minus_momentum * s
        tl.store(teacher_base + teacher_offset + idx, updated.to(teacher_base.dtype.element_ty), mask=mask)


EMA = TritonKernel(_ema_kernel, {"CHUNK": TRITON_CHUNK, "BLOCK": 1024, "num_warps": 4})


# ------------------------------------------------------------------------------------------------- launchers
def _groups(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Non-empty pairs grouped by (teacher dtype, student dtype): one launch per group."""
    groups: dict[tuple[torch.dtype, torch.dtype], list] = {}
    for t, s in zip(teacher, student):
        if t.numel():
            groups.setdefault((t.dtype, s.dtype), []).append((t, s))
    return list(groups.values())


# Work tables depend only on addresses and sizes, which stay fixed across training steps: each is built once.
@functools.lru_cache(maxsize=16)
def _cuda_table(device: torch.device, pairs: tuple[tuple[int, int, int], ...]) -> tuple[torch.Tensor, int, int]:
    """int64 table of (teacher address, student address, numel) rows then (tensor, first element) chunk rows."""
    chunks = [[r, b] for r, (_, _, n) in enumerate(pairs) for b in range(0, n, CUDA_CHUNK)]
    flat = [v for row in [*pairs, *chunks] for v in row]
    return torch.tensor(flat, dtype=torch.int64).to(device), len(pairs), len(chunks)


@functools.lru_cache(maxsize=16)
def _triton_table(device: torch.device, pairs: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """int64 (n_chunks, 3) rows of (teacher element offset, student element offset, length)."""
    rows = [[t + b, s + b, min(TRITON_CHUNK, n - b)] for t, s, n in pairs for b in range(0, n, TRITON_CHUNK)]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _ema_cuda(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    device = teacher[0].device
    stream = torch.cuda.current_stream(device).cuda_stream
    grid = torch.cuda.get_device_properties(device).multi_processor_count * CUDA_BLOCKS_PER_SM
    for group in _groups(teacher, student):
        # Addresses and element counts only: the table is the same for any dtypes (they are launch arguments).
        table, n_tensors, n_chunks = _cuda_table(device, tuple((t.data_ptr(), s.data_ptr(), t.numel())
                                                                for t, s in group))
        t0, s0 = group[0]
        ops().ema_cuda_launch(table, n_tensors, n_chunks, CUDA_CHUNK, momentum, _DTYPE_CODE[t0.dtype],
                              _DTYPE_CODE[s0.dtype], grid, stream)


def _ema_triton(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    for group in _groups(teacher, student):
        teacher_base = min((t for t, _ in group), key=lambda t: t.data_ptr())
        student_base = min((s for _, s in group), key=lambda s: s.data_ptr())
        # Element offsets from the group's lowest address (see the kernel).
        table = _triton_table(teacher_base.device, tuple(
            ((t.data_ptr() - teacher_base.data_ptr()) // t.element_size(),
             (s.data_ptr() - student_base.data_ptr()) // s.element_size(), t.numel()) for t, s in group))
        config = EMA.configs[0]
        EMA.launch((table.shape[0],), config, teacher_base=teacher_base, student_base=student_base, chunks=table,
                   momentum=momentum, one_minus_momentum=1.0 - momentum)


def aot_examples() -> None:
    """One launch per (teacher dtype, student dtype) pair the trainer and DINOv2-style code use."""
    for t, s in [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]:
        _ema_triton([torch.empty(8, dtype=t)], [torch.empty(8, dtype=s)], 0.9)


# ------------------------------------------------------------------------------------------------ dispatch
def _ema_forward(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    if not teacher:
        return
    # The Triton kernel takes fp32/fp16/bf16 teachers: under the triton backend an fp64 one (if any) is the dtype it
    # must serve (the scan is skipped otherwise: a ViT has hundreds of tensors).
    triton = get_backend() == "triton"
    dtype = next((t.dtype for t in teacher if t.dtype not in TRITON_DTYPES), None) if triton else None
    impl = resolve(teacher[0].device, "ema_", dtype)
    if impl == "reference":
        reference.ema_(teacher, student, momentum)
    elif impl == "cpu":
        ops().ema_cpu_(teacher, student, momentum)
    elif impl == "cuda":
        _ema_cuda(teacher, student, momentum)
    else:
        _ema_triton(teacher, student, momentum)


# ----------------------------------------------------------------------------------------------- registered op
def _ema_fake(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    return None


_ema_op = KernelOp("ema_", _ema_forward, fake=_ema_fake, mutates_args=("teacher",))


# ------------------------------------------------------------------------------------------------- public API
# Problems ema_check (csrc/ema.cpp) reports.
_LENGTH, _TEACHER_DTYPE, _STUDENT_DTYPE, _SHAPE, _DEVICE, _STRIDES, _OVERLAP = range(1, 8)


def _check_pairs(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> None:
    """Shapes, dtypes, devices, strides and overlaps of every pair, checked in C++ in one call for the whole list
    (csrc/ema.cpp), which says what is wrong as (problem, i, j); the message is worded here."""
    found = ops().ema_check(teacher, student)
    if not found:
        return
    problem, i, j = found
    if problem == _LENGTH:
        raise ValueError(f"teacher and student must have the same length; got {len(teacher)} and {len(student)}")
    t, s = teacher[i], student[i]
    floating = "must be floating point (float32, float16, bfloat16 or float64)"
    if problem in (_TEACHER_DTYPE, _STUDENT_DTYPE):
        name, dtype = ("teacher", t.dtype) if problem == _TEACHER_DTYPE else ("student", s.dtype)
        raise TypeError(f"{name}[{i}] {floating}; got {dtype}")
    raise ValueError({
        _SHAPE: f"teacher[{i}] has shape {list(t.shape)} but student[{i}] has {list(s.shape)}",
        _DEVICE: f"all tensors must be on one device: teacher[0] is on {teacher[0].device}, teacher[{i}] on "
                 f"{t.device}, student[{i}] on {s.device}",
        _STRIDES: f"teacher[{i}] and student[{i}] must be dense with equal strides (e.g. both contiguous); got "
                  f"strides {t.stride()} and {s.stride()}",
        _OVERLAP: f"teacher[{i}] and teacher[{j}] overlap in memory (views of one storage, or one tensor passed "
                  "twice): updating both in place would race; pass each teacher tensor once",
    }[problem])


# Wrappers that prefix parameter names: DistributedDataParallel / DataParallel ("module.") and torch.compile
# ("_orig_mod."), possibly stacked.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.partition(".")[2]
    return name


def _split_names(name: str, items: list) -> tuple[list, list[str] | None]:
    """The tensors of ``items``, and their names when ``items`` holds ``named_parameters()``-style pairs."""
    if not items or not isinstance(items[0], tuple):
        return items, None
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"{name}[{i}] must be a (name, tensor) pair, as {name}[0] is; got {type(item).__name__}")
    return [tensor for _, tensor in items], [n for n, _ in items]


def _check_names(teacher_names: list[str], student_names: list[str]) -> None:
    for i, (t, s) in enumerate(zip(teacher_names, student_names)):
        if t != s and _unwrapped_name(t) != _unwrapped_name(s):
            raise ValueError(f"teacher[{i}] is {t!r} but student[{i}] is {s!r}: the named lists do not pair the "
                             "same parameters (names are compared without 'module.' / '_orig_mod.' prefixes)")


def ema_(teacher: Iterable[torch.Tensor | tuple[str, torch.Tensor]],
         student: Iterable[torch.Tensor | tuple[str, torch.Tensor]], momentum: float) -> None:
    """Teacher EMA in place: ``t <- momentum * t + (1 - momentum) * s`` for every pair of the two lists.

    Args:
        teacher: tensors updated in place (fp32, fp16, bf16 or fp64): ``teacher.parameters()`` (a generator), a
            list (e.g. filtered from ``named_parameters()``), a ``state_dict().values()`` selection, or
            ``teacher.named_parameters()`` itself: with (name, tensor) pairs on both sides the names must agree,
            ignoring the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, which catches lists that
            zip would pair wrongly; pairs on one side only are taken for their tensors.
        student: tensors of the same shapes and strides, on the same device, any floating dtype (a bf16 / fp16
            student with an fp32 teacher is read in its dtype, no fp32 copy is made).
        momentum: in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.

    Math is fp32 (fp64 for fp64 teachers), rounded once to the teacher's dtype. Runs without autograd, so
    ``nn.Parameter`` lists work as they are. Lists built once and reused skip the per-call list building.

    The one-line swap in other training loops (the same maths; results differ only by rounding order, within
    fp32 rounding):

    - official DINO: ``for param_q, param_k in zip(student.parameters(), teacher.parameters()):
      param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`` -> ``ema_(teacher.parameters(),
      student.parameters(), m)``;
    - DINOv2: ``torch._foreach_mul_(teacher_param_list, m); torch._foreach_add_(teacher_param_list,
      student_param_list, alpha=1 - m)`` -> ``ema_(teacher_param_list, student_param_list, m)``;
    - lightly: ``update_momentum(student, teacher, m)`` (student first) -> ``ema_(teacher.parameters(),
      student.parameters(), m)``;
    - timm ``ModelEmaV3``: ``model_ema.update(model, step)`` -> ``ema_(model_ema.module.parameters(),
      model.parameters(), model_ema.get_decay(step))`` for a model without buffers (a ViT). With buffers, do what
      ModelEmaV3 does with them too: by default it also averages the floating buffers (pass the floating
      ``state_dict().values()`` of both instead of the parameters) and copies the others; with
      ``exclude_buffers=True`` it copies every buffer (``for e, b in zip(model_ema.module.buffers(),
      model.buffers()): e.copy_(b)``). Its bf16 EMA tensors get stochastic rounding, ours round to nearest: keep
      the EMA in fp32 (``ModelEmaV3(model, dtype=torch.float32)``) for a bf16 / fp16 model.
    """
    teacher, teacher_names = _split_names("teacher", list(teacher))
    student, student_names = _split_names("student", list(student))
    check_unit_interval("momentum", momentum)
    check_tensor_list("teacher", teacher)
    check_tensor_list("student", student)
    if teacher_names is not None and student_names is not None:
        _check_names(teacher_names, student_names)
    if not teacher and not student:
        return
    if not tracing(teacher[0] if teacher else student[0]):  # addresses and strides are known only at run time
        _check_pairs(teacher, student)
    with torch.no_grad():
        _ema_op(teacher, student, float(momentum))
