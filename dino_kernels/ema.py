"""Fused multi-tensor EMA of teacher weights: ``t <- m * t + (1 - m) * s`` for a whole parameter list.

DINO updates the teacher after every optimiser step with a Python loop over parameters (one or two kernel
launches per tensor); DINOv2 with ``_foreach_mul_`` + ``_foreach_add_`` (two passes over the teacher). Here each
(teacher dtype, student dtype) group of the list is updated by one launch that reads teacher and student once and
writes the teacher once: 3 memory accesses per element, the minimum.

Implementations: CUDA C++ (``csrc/ema.cu``: chunk table + grid-stride, 16-byte accesses), C++ CPU
(``csrc/ema.cpp``: parallel over chunks, vectorisable loop), Triton (below), and the plain-PyTorch reference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
import triton
import triton.language as tl

from dino_kernels import reference
from dino_kernels._aot import AOTKernel
from dino_kernels._backend import device_guard, resolve
from dino_kernels._extension import ops
from dino_kernels._validation import check_unit_interval

# Elements per chunk of the work tables. A multiple of 8 so that every chunk of a 16-byte-aligned tensor starts
# 16-byte aligned (the CUDA kernel's vector path needs it).
CUDA_CHUNK = 1 << 16
CUDA_BLOCKS_PER_SM = 8
TRITON_CHUNK = 1 << 14
TRITON_BLOCK = 1024
TRITON_NUM_WARPS = 4
TRITON_TEACHER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_TABLE_CACHE: OrderedDict[tuple, tuple[torch.Tensor, int, int]] = OrderedDict()
_TABLE_CACHE_SIZE = 16


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


def _aot_signature(teacher: str, student: str) -> dict[str, str]:
    return {"teacher_base": f"*{teacher}", "student_base": f"*{student}", "chunks": "*i64", "momentum": "fp32",
            "one_minus_momentum": "fp32", "CHUNK": "constexpr", "BLOCK": "constexpr"}


AOT_KERNELS = [
    AOTKernel(
        _ema_kernel,
        signatures=tuple(_aot_signature(t, s) for t, s in
                         [("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"), ("fp16", "fp16")]),
        configs=({"CHUNK": TRITON_CHUNK, "BLOCK": TRITON_BLOCK, "num_warps": TRITON_NUM_WARPS},),
    )
]


# ------------------------------------------------------------------------------------------------ launchers
def _groups(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Non-empty pairs grouped by (teacher dtype, student dtype): one launch per group."""
    groups: dict[tuple[torch.dtype, torch.dtype], list] = {}
    for t, s in zip(teacher, student):
        if t.numel():
            groups.setdefault((t.dtype, s.dtype), []).append((t, s))
    return list(groups.values())


def _cached_table(key: tuple, build) -> tuple[torch.Tensor, int, int]:
    """Work tables depend only on addresses and sizes, which stay fixed across training steps: build once."""
    if key in _TABLE_CACHE:
        _TABLE_CACHE.move_to_end(key)
        return _TABLE_CACHE[key]
    entry = build()
    _TABLE_CACHE[key] = entry
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


def _ema_cuda(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    device = teacher[0].device
    stream = torch.cuda.current_stream(device).cuda_stream
    grid = torch.cuda.get_device_properties(device).multi_processor_count * CUDA_BLOCKS_PER_SM
    for group in _groups(teacher, student):
        # Addresses and element counts only: the table is the same for any dtypes (they are launch arguments).
        key = ("cuda", device, *((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in group))

        def build(group=group):
            rows = [[t.data_ptr(), s.data_ptr(), t.numel()] for t, s in group]
            chunks = [[r, b] for r, (_, _, n) in enumerate(rows) for b in range(0, n, CUDA_CHUNK)]
            flat = [v for row in rows + chunks for v in row]
            return torch.tensor(flat, dtype=torch.int64).to(device), len(rows), len(chunks)

        table, n_tensors, n_chunks = _cached_table(key, build)
        t0, s0 = group[0]
        ops().ema_cuda_launch(table, n_tensors, n_chunks, CUDA_CHUNK, momentum, _DTYPE_CODE[t0.dtype],
                              _DTYPE_CODE[s0.dtype], grid, stream)


def _ema_triton(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    for group in _groups(teacher, student):
        if group[0][0].dtype not in TRITON_TEACHER_DTYPES:
            raise TypeError("ema_: the triton backend updates float32/float16/bfloat16 teachers; got "
                            f"{group[0][0].dtype}. Use the 'cpu' or 'cuda' backend for float64")
        teacher_base = min((t for t, _ in group), key=lambda t: t.data_ptr())
        student_base = min((s for _, s in group), key=lambda s: s.data_ptr())
        # The table holds element offsets, so it depends on the element sizes as well as on the addresses.
        key = ("triton", teacher_base.device, teacher_base.dtype, student_base.dtype,
               *((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in group))

        def build(group=group, tb=teacher_base, sb=student_base):
            rows = []
            for t, s in group:
                t_off = (t.data_ptr() - tb.data_ptr()) // t.element_size()
                s_off = (s.data_ptr() - sb.data_ptr()) // s.element_size()
                for b in range(0, t.numel(), TRITON_CHUNK):
                    rows.append([t_off + b, s_off + b, min(TRITON_CHUNK, t.numel() - b)])
            return torch.tensor(rows, dtype=torch.int64).to(tb.device), len(group), len(rows)

        table, _, n_chunks = _cached_table(key, build)
        with device_guard(teacher_base.device):
            _ema_kernel[(n_chunks,)](teacher_base, student_base, table, momentum, 1.0 - momentum,
                                     CHUNK=TRITON_CHUNK, BLOCK=TRITON_BLOCK, num_warps=TRITON_NUM_WARPS)


# Problems ema_check (csrc/ema.cpp) reports.
_LENGTH, _TEACHER_DTYPE, _STUDENT_DTYPE, _SHAPE, _DEVICE, _STRIDES, _OVERLAP = range(1, 8)


def _validate(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> None:
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


def _run(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    _validate(teacher, student)
    if not teacher:
        return
    impl = resolve(teacher[0].device, "ema_")
    if impl == "reference":
        reference.ema_(teacher, student, momentum)
    elif impl == "cpu":
        ops().ema_cpu_(teacher, student, momentum)
    elif impl == "cuda":
        _ema_cuda(teacher, student, momentum)
    else:
        _ema_triton(teacher, student, momentum)


# ---------------------------------------------------------------------------------------- registered op
@torch.library.custom_op("dino_kernels::ema_", mutates_args=("teacher",), device_types="cpu")
def _ema_op(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    _run(teacher, student, momentum)


@_ema_op.register_kernel("cuda")
def _ema_op_cuda(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    _run(teacher, student, momentum)


@_ema_op.register_fake
def _ema_op_fake(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    return None


# ------------------------------------------------------------------------------------------- public API
def _check_tensors(name: str, tensors: list) -> None:
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        i, x = next((i, x) for i, x in enumerate(tensors) if not isinstance(x, torch.Tensor))
        raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(x).__name__}")


def ema_(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """Teacher EMA in place: ``t <- momentum * t + (1 - momentum) * s`` for every pair of the two lists.

    Args:
        teacher: tensors updated in place (fp32, fp16, bf16 or fp64), e.g. ``list(teacher.parameters())``.
        student: tensors of the same shapes and strides, on the same device, any floating dtype.
        momentum: in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.

    Math is fp32 (fp64 for fp64 teachers). Runs without autograd, so ``nn.Parameter`` lists work as they are.
    """
    teacher, student = list(teacher), list(student)
    check_unit_interval("momentum", momentum)
    _check_tensors("teacher", teacher)
    _check_tensors("student", student)
    if not teacher and not student:
        return
    with torch.no_grad():
        if torch.compiler.is_compiling():
            _ema_op(teacher, student, float(momentum))
        else:
            # Eager calls skip the custom-op wrapper: with hundreds of tensors its per-call cost (~1 µs a tensor)
            # would rival the update itself on a GPU.
            _run(teacher, student, float(momentum))
