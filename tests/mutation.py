"""Mutation check: plants realistic single-point bugs, one at a time, in a copy of the tree and runs the tests that
must catch each one.

    python -m tests.mutation               # every mutant, then the last line `mutation score: K/N killed`
    python -m tests.mutation --list        # the mutants (and whether each snippet is still found), nothing run
    python -m tests.mutation --only ema    # the mutants whose name contains "ema" (repeatable: --only a --only b)

A mutant is one edit of one file: a snippet that must occur exactly once there (the check stops before running
anything otherwise, so that a mutant whose code moved cannot silently test nothing), its replacement, the pytest
selection that must fail on it (a test file and a ``-k`` expression, as narrow as still kills it) and what the bug
is. They are the bugs kernel and trainer authors really make: masks one element too wide, swapped factors, a
missing rescale, a wrong offset, a skipped tail, a backend switch that picks another implementation, and the
trainer's recipe (schedules, center, EMA, clip, freeze, resume) not applied as configured.

How it runs: the repository's files (tracked, and untracked but not ignored) and its built extension
(``dino_kernels/_C*.so``, ``_build_info.json``) are copied to a temporary directory, where every selection first
runs on the unmutated tree and must pass (the baseline). Then for each mutant: the file is edited; a mutant of a
``csrc/*.cpp`` file rebuilds the extension there (``setup.py build_ext --inplace``, CPU kernels only; the mutants
of one source file run one after another so that each rebuild recompiles few files); its selection runs under
``pytest -x -m "not cuda"`` with ``TRITON_INTERPRET=1``, so Triton kernels run in the interpreter on any machine;
then the file and the extension are restored. Mutants of CUDA sources (``csrc/*.cu``) cannot be reached by CPU
tests: they are listed as SKIPPED with that reason and not counted.

Outcomes: KILLED (a selected test failed), KILLED (crash) (a collection or import error, or a signal), KILLED
(timeout), SURVIVED (every selected test passed), ERROR (the selection matched no test: a broken mutant, not a
result). A mutant that cannot change any result (an equivalent mutant) would carry the reason in its
``equivalent`` field and be reported with it when it survives; none of the mutants below is equivalent.

Run time, measured on the 2-core development machine: 14.9 minutes for the 79 mutants of 2026-11-27 (77 run on
CPU, 2 need a GPU), about 6 of them for the 9 C++ mutants (their rebuilds; the first compiles every C++ file) and up
to 3 for the baseline; a Python mutant takes 3 to 11 s. That run killed 76 of 77; the survivor was an equivalent
mutant, which was replaced (the replacement is killed: ``--only compat-lightly``). The 8 mutants added since (the C++
short-sequence attention and stochastic-depth kernels, the fused model's CLS-only last block and patch GEMM; one
mutant of the torch CPU path those kernels replaced was retired) ran alone: 8/8 killed in 4.4 minutes. Not part of
CI (too slow for every push): run it after changing a kernel, a test of one, or the trainer's step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTEST_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Mutant:
    """One single-point bug: ``original`` replaced by ``replacement`` in ``file``, which the test selection must
    catch."""

    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: str  # the test file to run
    select: str  # its -k expression ("" = the whole file)
    description: str
    equivalent: str = ""  # why the mutant cannot change any result, if it cannot

    @property
    def needs_gpu(self) -> bool:
        return self.file.endswith(".cu")

    @property
    def needs_build(self) -> bool:
        return self.file.startswith("csrc/") and not self.needs_gpu


EMA_GUARD = "tests/test_ema.py", "outside_the_teachers"
LOSS_BLOCKS = "tests/test_dino_loss.py", "multi_block_paths"
ATTN_TRITON = "tests/test_packed_attention.py", "test_matches_float64_reference and triton and edges-H3"
ATTN_GUARD = "tests/test_packed_attention.py", "inside_their_buffers"
SD_GUARD = "tests/test_stochastic_depth.py", "write_only_their_output"
RECIPE = "tests/test_train.py", "applies_the_recipe"
RESUME = "tests/test_train.py", "test_exact_resume"
DINOV2_STEP = "tests/test_train.py", "dinov2_step_adds_ibot"


def mutant(name: str, file: str, original: str, replacement: str, selection: tuple[str, str],
           description: str) -> Mutant:
    return Mutant(name, file, original, replacement, *selection, description)


MUTANTS = [
    # ------------------------------------------------------------------------------------------------ EMA
    mutant("ema-triton-tail-mask", "dino_kernels/ema.py",
           "mask = idx < length", "mask = idx <= length", EMA_GUARD,
           "Triton tail mask one element too wide: each tensor's last chunk writes one element past its end"),
    mutant("ema-triton-swapped-factors", "dino_kernels/ema.py",
           "updated = momentum * t + one_minus_momentum * s", "updated = one_minus_momentum * t + momentum * s",
           EMA_GUARD, "Triton kernel weighs the teacher with 1 - m and the student with m"),
    mutant("ema-triton-student-offset", "dino_kernels/ema.py",
           "rows = [[t + b, s + b, min(TRITON_CHUNK, n - b)]", "rows = [[t + b, s, min(TRITON_CHUNK, n - b)]",
           EMA_GUARD, "work table: the student offset is not advanced chunk by chunk (every chunk reads chunk 0)"),
    mutant("ema-dispatch-cpu-runs-reference", "dino_kernels/ema.py",
           "ops().ema_cpu_(teacher, student, momentum)", "reference.ema_(teacher, student, momentum)",
           ("tests/test_ema.py", "each_backend_runs"),
           "backend switch: `auto`/`cpu` on CPU tensors run the per-tensor reference loop, not the C++ kernel"),
    mutant("ema-cpp-swapped-factors", "csrc/ema.cpp",
           "static_cast<T>(m * static_cast<acc_t>(teacher[i]) + one_minus_m * static_cast<acc_t>(student[i]))",
           "static_cast<T>(one_minus_m * static_cast<acc_t>(teacher[i]) + m * static_cast<acc_t>(student[i]))",
           ("tests/test_ema.py", "outside_the_teachers and auto"), "C++ CPU kernel swaps m and 1 - m"),
    mutant("ema-cpp-overlap-check", "csrc/ema.cpp",
           "if (ranges[r].begin < ranges[r - 1].end) {", "if (ranges[r].begin < ranges[r - 1].begin) {",
           ("tests/test_ema.py", "rejects_overlapping_teachers"),
           "C++ overlap check compares starts instead of start and end: overlapping teachers race unreported"),
    Mutant("ema-cuda-scalar-tail", "csrc/ema.cu",
           "for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {",
           "for (int64_t i = done + threadIdx.x; i <= n; i += kThreads) {",
           "tests/test_ema.py", "outside_the_teachers and cuda",
           "CUDA kernel's scalar tail loop writes one element past each chunk"),
    Mutant("ema-cuda-one-minus-m", "csrc/ema.cu",
           "const A one_minus_m = static_cast<A>(1.0 - momentum);", "const A one_minus_m = static_cast<A>(momentum);",
           "tests/test_ema.py", "cuda_matches_float64", "CUDA kernel weighs the student with m instead of 1 - m"),
    # --------------------------------------------------------------------------------------- backend switch
    mutant("backend-auto-cpu-is-reference", "dino_kernels/_backend.py",
           '    if name == "auto" and not is_cuda:\n        return "cpu"',
           '    if name == "auto" and not is_cuda:\n        return "reference"',
           ("tests/test_backend.py", "resolution_per_device"),
           "`auto` sends CPU tensors to the plain-PyTorch reference instead of the C++ kernels"),
    mutant("backend-auto-cuda-unmapped", "dino_kernels/_backend.py",
           'impl = "cuda" if name == "auto" else name', "impl = name",
           ("tests/test_backend.py", "resolution_per_device"),
           "`auto` on CUDA tensors is returned as 'auto', which no op dispatches"),
    mutant("backend-triton-takes-float64", "dino_kernels/_backend.py",
           '(impl == "triton" or impl == "cuda" and cuda_runs_triton)', '(impl == "cuda" and cuda_runs_triton)',
           ("tests/test_ema.py", "triton_rejects_float64"),
           "the `triton` backend accepts float64, which the Triton kernels cannot run (no clear error)"),
    # ------------------------------------------------------------------------------------------ DINO loss
    mutant("loss-triton-finalize-missing-rescale", "dino_kernels/dino_loss.py",
           "z += tl.sum(tl.where(mask, tl.exp(m_j - m), 0.0) * z_j)", "z += tl.sum(tl.where(mask, 1.0, 0.0) * z_j)",
           LOSS_BLOCKS, "teacher finalize adds the slices' normalisers without rebasing them to the row max"),
    mutant("loss-triton-n-targets-off-by-one", "dino_kernels/dino_loss.py",
           "n_targets = n_global - (crop < n_global).to(tl.int32)",
           "n_targets = n_global - (crop <= n_global).to(tl.int32)", LOSS_BLOCKS,
           "student pass: |q| off by one for the first local crop"),
    mutant("loss-triton-same-view-test", "dino_kernels/dino_loss.py",
           "        if i != crop:\n", "        if i != image:\n", LOSS_BLOCKS,
           "teacher target excludes the teacher crop of the image index instead of the student's own view"),
    mutant("loss-triton-grad-missing-n-targets", "dino_kernels/dino_loss.py",
           "softmax_coef = n_targets * grad_scale / z", "softmax_coef = grad_scale / z", LOSS_BLOCKS,
           "stored gradient: softmax term without its factor |q|"),
    mutant("loss-triton-rescale-mask", "dino_kernels/dino_loss.py",
           "        mask = offsets < n_elements\n", "        mask = offsets <= n_elements\n",
           ("tests/test_dino_loss.py", "writes_only_the_gradient and triton"),
           "backward rescale mask one element too wide: writes past the stored gradient"),
    mutant("loss-triton-rescale-skips-on-grad-output", "dino_kernels/dino_loss.py",
           "    if factor != 1.0:", "    if tl.load(grad_output_ptr) != 1.0:",
           ("tests/test_dino_loss.py", "rescale_op_skips_when_factor_is_one and triton"),
           "backward rescale skipped when grad_output is 1, although the stored fp16 gradient still needs its scale"),
    mutant("loss-triton-teacher-mean-not-divided", "dino_kernels/dino_loss.py",
           "tl.store(mean_ptr + cols, col_sum * inv_rows, mask=col_mask)",
           "tl.store(mean_ptr + cols, col_sum, mask=col_mask)", LOSS_BLOCKS,
           "teacher pass stores the column sums as the batch mean (center update off by the batch size)"),
    mutant("loss-backward-factor", "dino_kernels/dino_loss.py",
           "ctx.factor = _grad_scales(student.dtype, n_global, student_temp, batch, pairs)[1]",
           "ctx.factor = _grad_scales(student.dtype, n_global, student_temp, batch, pairs)[0]",
           ("tests/test_dino_loss.py", "mixed_student_teacher"),
           "backward multiplies by the forward's storage scale instead of the backward factor"),
    mutant("loss-center-update-count", "dino_kernels/dino_loss.py",
           "batch_center.view(center.shape) * ((1.0 - momentum) / count)",
           "batch_center.view(center.shape) * (1.0 - momentum)",
           ("tests/test_dino_loss.py", "update_center_matches_reference"),
           "update_center_ from logits: the row sum is not divided by the row count"),
    mutant("loss-module-center-momentum-dropped", "dino_kernels/dino_loss.py",
           "update_center_(self.center, stats.teacher_mean, self.center_momentum)",
           "update_center_(self.center, stats.teacher_mean)", ("tests/test_dino_loss.py", "dinoloss_module_schedule"),
           "DINOLoss does not pass its center_momentum on (the default 0.9 is used)"),
    mutant("loss-teacher-temp-warmup-off-by-one", "dino_kernels/dino_loss.py",
           "np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)",
           "np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs + 1)",
           ("tests/test_dino_loss.py", "dinoloss_module_schedule"),
           "teacher-temperature warm-up one epoch longer than configured"),
    mutant("loss-dispatch-rescale", "dino_kernels/dino_loss.py",
           'resolve(grad.device, "dino_loss") != "triton"', 'resolve(grad.device, "dino_loss") == "triton"',
           ("tests/test_dino_loss.py", "each_backend_runs"),
           "backend switch of the backward rescale inverted: `auto` runs Triton, `triton` runs C++"),
    mutant("loss-cpp-n-targets-off-by-one", "csrc/dino_loss.cpp",
           "static_cast<acc_t>(v < G ? G - 1 : G)", "static_cast<acc_t>(v <= G ? G - 1 : G)",
           ("tests/test_dino_loss.py", "mixed_student_teacher and auto"),
           "C++ kernel: |q| off by one for the first local crop"),
    mutant("loss-cpp-rescale-tail", "csrc/dino_loss.cpp",
           "hi = std::min(n, end * kChunk);", "hi = std::min(n + 1, end * kChunk);",
           ("tests/test_dino_loss.py", "writes_only_the_gradient and auto"),
           "C++ rescale: the last chunk runs one element past the gradient"),
    # ---------------------------------------------------------------------------------- packed attention
    mutant("attn-triton-last-key-tile-mask", "dino_kernels/packed_attention.py",
           "key_valid = keys < seq_end\n        # K is read transposed",
           "key_valid = keys <= seq_end\n        # K is read transposed", ATTN_TRITON,
           "forward: the last key tile takes the next sequence's first key"),
    mutant("attn-triton-scale-not-log2", "dino_kernels/packed_attention.py",
           "total_tokens=total, qk_scale=scale * _LOG2E)", "total_tokens=total, qk_scale=scale)",
           ("tests/test_packed_attention.py", "log_sum_exp_saved and triton"),
           "forward launcher passes the softmax scale without the log2(e) factor of exp2"),
    mutant("attn-triton-dk-from-k", "dino_kernels/packed_attention.py",
           "_dot(tl.trans(ds), q) * sm_scale", "_dot(tl.trans(ds), k) * sm_scale", ATTN_TRITON,
           "backward (one-block path): dk = dS^T K instead of dS^T Q"),
    mutant("attn-triton-lse-not-natural-log", "dino_kernels/packed_attention.py",
           "lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634", "lse = m_i + tl.math.log2(l_i)",
           ("tests/test_packed_attention.py", "log_sum_exp_saved and triton"),
           "forward stores the log-sum-exp in log2 units"),
    mutant("attn-triton-dk-missing-scale", "dino_kernels/packed_attention.py",
           "_store_rows(DK, keys, key_valid, stride_ot, dk * sm_scale, HEAD_DIM)",
           "_store_rows(DK, keys, key_valid, stride_ot, dk, HEAD_DIM)", ATTN_TRITON,
           "backward (long sequences): dk stored without the softmax scale"),
    mutant("derived-tensors-ignore-version", "dino_kernels/_launch.py",
           "key = (tensor._version, *key)", "key = (0, *key)",
           ("tests/test_packed_attention.py", "block_table_is_built_once"),
           "launch inputs derived from a tensor (block tables, CSR segments) kept across in-place changes of it"),
    mutant("attn-checked-cu-seqlens-any-max-seqlen", "dino_kernels/packed_attention.py",
           "_CHECKED.get(cu_seqlens, (total, max_seqlen),", "_CHECKED.get(cu_seqlens, (total,),",
           ("tests/test_packed_attention.py", "checked_once_per_version"),
           "a cu_seqlens checked once passes unchecked with a smaller max_seqlen"),
    mutant("attn-triton-out-row-mask", "dino_kernels/packed_attention.py",
           "    rows = m_start + tl.arange(0, BLOCK_M)\n    row_valid = rows < seq_end",
           "    rows = m_start + tl.arange(0, BLOCK_M)\n    row_valid = rows <= seq_end", ATTN_GUARD,
           "forward row mask one row too wide: the last sequence writes a row past the output"),
    mutant("attn-triton-one-block-row-mask", "dino_kernels/packed_attention.py",
           "    rows = seq_start + tl.arange(0, BLOCK)\n    valid = rows < seq_end",
           "    rows = seq_start + tl.arange(0, BLOCK)\n    valid = rows <= seq_end", ATTN_GUARD,
           "backward one-block path: one row too many (a key of the next sequence, a row past the gradients)"),
    mutant("attn-triton-block-table-skips-tail", "dino_kernels/packed_attention.py",
           "n_blocks = tl.minimum(tl.cdiv(end - start, BLOCK), max_blocks)",
           "n_blocks = tl.minimum((end - start) // BLOCK, max_blocks)",
           ("tests/test_packed_attention.py", "block_table_covers"),
           "block table: floor instead of ceil, the partial last block of every sequence gets no program"),
    mutant("attn-dispatch-cpu-runs-triton", "dino_kernels/packed_attention.py",
           '    if impl in ("reference", "cpu"):\n        return impl',
           '    if impl == "reference":\n        return impl',
           ("tests/test_packed_attention.py", "each_backend_runs"),
           "backend switch: the `cpu` backend runs the Triton kernels"),
    mutant("attn-cpp-lse-unscaled", "csrc/packed_attention.cpp",
           "= m * scale + std::log(sum);", "= m + std::log(sum);",
           ("tests/test_packed_attention.py", "log_sum_exp_saved and auto"),
           "C++ forward: the saved log-sum-exp misses the scale on the row max"),
    mutant("attn-cpp-dk-missing-scale", "csrc/packed_attention.cpp",
           "dk_r[d] = static_cast<T>(dk_sr[d] * scale);", "dk_r[d] = static_cast<T>(dk_sr[d]);",
           ("tests/test_packed_attention.py", "cpu_kernel_strided_views"), "C++ backward: dk without the scale"),
    mutant("attn-cpp-short-no-delta", "csrc/packed_attention.cpp",
           "for (int64_t j = 0; j < n; ++j) ds[i][j] = p[i][j] * (ds[i][j] - delta);",
           "for (int64_t j = 0; j < n; ++j) ds[i][j] = p[i][j] * ds[i][j];",
           ("tests/test_packed_attention.py", "cpu_kernel_head_dims"),
           "C++ short-sequence backward: dS = P * dP without subtracting the row's delta"),
    mutant("attn-cpp-short-dv-from-ds", "csrc/packed_attention.cpp",
           "add_scaled(acc_b, p[i][j], a.grad_out.row(start + i, head), dims);",
           "add_scaled(acc_b, ds[i][j], a.grad_out.row(start + i, head), dims);",
           ("tests/test_packed_attention.py", "many_short_sequences"),
           "C++ short-sequence backward: dV weighted by dS instead of P"),
    mutant("attn-cpp-short-chunk-skips-last", "csrc/packed_attention.cpp",
           "for (int64_t i = plan.chunk_starts[chunk]; i < plan.chunk_starts[chunk + 1]; ++i) {",
           "for (int64_t i = plan.chunk_starts[chunk]; i + 1 < plan.chunk_starts[chunk + 1]; ++i) {",
           ("tests/test_packed_attention.py", "many_short_sequences"),
           "C++ short-sequence tasks: the last sequence of every chunk is never computed"),
    mutant("packing-swapped-group-shape", "dino_kernels/packing.py",
           "lengths = [n for b, n in shapes for _ in range(b)]", "lengths = [b for b, n in shapes for _ in range(n)]",
           ("tests/test_packed_attention.py", "pack_unpack_round_trip"),
           "cu_seqlens from (B, N) read as (N, B): N sequences of B tokens per crop group"),
    # --------------------------------------------------------------------------------- stochastic depth
    mutant("sd-tile-mask", "dino_kernels/stochastic_depth.py",
           "mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)",
           "mask = (offs_m[:, None] < M) & (offs_d[None, :] <= D)", SD_GUARD,
           "tile mask one column too wide: the last row's tile writes past the output"),
    mutant("sd-gather-alpha-dropped", "dino_kernels/stochastic_depth.py",
           "scaled = alpha * gathered", "scaled = gathered", SD_GUARD,
           "gather (the backward of scaled_index_add for src) ignores alpha"),
    mutant("sd-index-add-skips-last", "dino_kernels/stochastic_depth.py",
           "for p in range(start, end):", "for p in range(start, end - 1):", SD_GUARD,
           "index-add loop skips the last source row of every segment"),
    mutant("sd-scaling-grad-product", "dino_kernels/stochastic_depth.py",
           "tl.sum(gathered * o, axis=0)", "tl.sum(scaled * o, axis=0)", SD_GUARD,
           "LayerScale gradient takes the scaled rows: alpha and scaling applied twice"),
    mutant("sd-scaling-grad-without-alpha", "dino_kernels/stochastic_depth.py",
           "alpha * tl.sum(gathered * o, axis=0)", "tl.sum(gathered * o, axis=0)",
           ("tests/test_stochastic_depth.py", "scaled_index_add_matches_float64 and triton"),
           "LayerScale gradient without alpha (B / keep) in the kernel's partial sums"),
    mutant("sd-cat-scaling-grad-last-group", "dino_kernels/stochastic_depth.py",
           "grad_scaling = group_scaling if grad_scaling is None else grad_scaling + group_scaling",
           "grad_scaling = group_scaling",
           ("tests/test_stochastic_depth.py", "drop_add_residual_multi_crop and auto"),
           "multi-crop residual add: the LayerScale gradient of the last crop group only"),
    mutant("sd-cpp-grad-ignores-scaling", "csrc/stochastic_depth.cpp",
           "dst[d] = static_cast<T>(alpha * scaling[d] * static_cast<acc_t>(in[d]));",
           "dst[d] = static_cast<T>(alpha * static_cast<acc_t>(in[d]));",
           ("tests/test_stochastic_depth.py", "strided_inputs_and_partial_grads and auto"),
           "C++ backward: the gradient of src misses the LayerScale factor"),
    mutant("sd-cpp-duplicates-skip-last", "csrc/stochastic_depth.cpp",
           "for (int64_t p = begin + 1; p < end; ++p) {", "for (int64_t p = begin + 1; p < end - 1; ++p) {",
           ("tests/test_stochastic_depth.py", "scaled_index_add_matches_float64 and auto"),
           "C++ index-add: a row with several contributions drops the last one"),
    mutant("sd-cpp-partial-last-chunk", "csrc/stochastic_depth.cpp",
           "for (int64_t c = 1; c < partials.size(0); ++c) {", "for (int64_t c = 1; c + 1 < partials.size(0); ++c) {",
           ("tests/test_stochastic_depth.py", "many_rows"),
           "C++ LayerScale gradient: the last chunk's partial sums are left out (only seen past 16 rows)"),
    mutant("sd-kept-count", "dino_kernels/stochastic_depth.py",
           "return max(int(batch * (1.0 - drop_rate)), 1)", "return max(int(batch * drop_rate), 1)",
           ("tests/test_stochastic_depth.py", "drop_add_residual_semantics and auto"),
           "keeps drop_rate of the samples instead of 1 - drop_rate"),
    mutant("sd-alpha-inverted", "dino_kernels/stochastic_depth.py",
           "residual.to(x.dtype), scaling, batch / keep)", "residual.to(x.dtype), scaling, keep / batch)",
           ("tests/test_stochastic_depth.py", "drop_add_residual_semantics and auto"),
           "residual scaled by keep / B instead of B / keep"),
    mutant("sd-dispatch-triton-runs-torch", "dino_kernels/stochastic_depth.py",
           '    return impl in ("cuda", "triton") and dtype in TRITON_DTYPES',
           '    return impl == "cuda" and dtype in TRITON_DTYPES',
           ("tests/test_stochastic_depth.py", "each_backend_runs"),
           "backend switch: stochastic depth under `triton` runs torch's index_select / index_add"),
    # -------------------------------------------------------------------------------------------- trainer
    mutant("train-center-momentum-dropped", "dino/train.py",
           "dino_kernels.update_center_(self.center, stats.teacher_mean, cfg.center_momentum)",
           "dino_kernels.update_center_(self.center, stats.teacher_mean)", RECIPE,
           "the step does not pass cfg.center_momentum (update_center_'s default 0.9 is used)"),
    mutant("train-ema-one-minus-m", "dino/train.py",
           "float(self.schedules.momentum[it]))", "1.0 - float(self.schedules.momentum[it]))", RECIPE,
           "the teacher EMA gets 1 - m instead of m"),
    mutant("train-clip-wrong-model", "dino/train.py",
           "clip_gradients_(self.student, cfg.clip_grad)", "clip_gradients_(self.teacher, cfg.clip_grad)", RECIPE,
           "clips the teacher's gradients (it has none): the student's are never clipped"),
    mutant("train-clip-cpu-skips-every-gradient", "dino/train.py",
           "zip(grads, factors.tolist()) if f != 1.0]", "zip(grads, factors.tolist()) if f > 1.0]",
           ("tests/test_train.py", "clip"), "on CPU the per-tensor clip scales no gradient"),
    mutant("train-cuda-graph-auto-for-reference", "dino/train.py",
           '(cfg.cuda_graph == "auto" and cfg.kernels == "fused" and not problems)',
           '(cfg.cuda_graph == "auto" and not problems)',
           ("tests/test_train.py", "cuda_graph"),
           "--kernels reference is captured too: the A/B's plain eager run is gone"),
    mutant("train-cuda-graph-on-ignores-problems", "dino/train.py",
           'if cfg.cuda_graph == "on" and problems:', 'if cfg.cuda_graph == "on" and not problems:',
           ("tests/test_train.py", "cuda_graph"), "--cuda-graph on is taken on a CPU or under torchrun"),
    mutant("train-freeze-boundary", "dino/train.py",
           "if epoch < cfg.freeze_last_layer:", "if epoch <= cfg.freeze_last_layer:", RECIPE,
           "the last layer stays frozen one epoch longer than freeze_last_layer"),
    mutant("train-teacher-temp-epoch-off-by-one", "dino/train.py",
           "teacher_temp = float(self.schedules.teacher_temp[epoch])",
           "teacher_temp = float(self.schedules.teacher_temp[epoch - 1])", RECIPE,
           "the loss gets the previous epoch's teacher temperature"),
    mutant("train-student-temp-dropped", "dino/train.py",
           "n_global_crops=cfg.n_global_crops, student_temp=cfg.student_temp,", "n_global_crops=cfg.n_global_crops,",
           RECIPE, "the step does not pass cfg.student_temp (dino_loss's default 0.1 is used)"),
    mutant("train-weight-decay-on-every-group", "dino/train.py",
           '            if i == 0:\n                group["weight_decay"]',
           '            if i >= 0:\n                group["weight_decay"]', RECIPE,
           "the weight-decay schedule is applied to biases and norms too"),
    mutant("train-koleo-weight-dropped", "dino/train.py",
           "total = total + cfg.koleo_weight * koleo", "total = total + koleo", RECIPE,
           "KoLeo enters the objective with weight 1 instead of koleo_weight"),
    mutant("train-ibot-weight-dropped", "dino/train.py",
           "total = total + cfg.ibot_weight * ibot", "total = total + ibot", DINOV2_STEP,
           "the iBOT term enters the objective with weight 1 instead of ibot_weight"),
    mutant("train-dinov2-dino-weighting-dropped", "dino/train.py",
           "total = loss * self.dino_loss_scale if self.dinov2 else loss", "total = loss", DINOV2_STEP,
           "the DINO term is not weighted as DINOv2 weights it (2/3 with no local crop)"),
    mutant("train-centers-move-under-sinkhorn", "dino/train.py",
           '        if centering == "softmax":  # the center EMAs', "        if True:  # the center EMAs", DINOV2_STEP,
           "the center EMAs keep moving after the switch to Sinkhorn-Knopp centering"),
    mutant("model-cls-queries-from-keys", "dino/model.py",
           "F.linear(x.index_select(0, cls_rows), weight[:dim], bias[:dim])",
           "F.linear(x.index_select(0, cls_rows), weight[dim:2 * dim], bias[dim:2 * dim])",
           ("tests/test_train.py", "fused_model_computes"),
           "fused last block: the CLS queries projected with the key weights"),
    mutant("model-patch-gemm-transposed-patches", "dino/model.py",
           ".permute(0, 2, 4, 1, 3, 5)", ".permute(0, 2, 4, 1, 5, 3)",
           ("tests/test_train.py", "fused_model_computes"),
           "fused patch embedding: each patch's pixels unfolded transposed against the convolution's weights"),
    mutant("train-masks-not-applied", "dino/model.py",
           "xs = [self.prepare_tokens(c, masks if i == 0 else None) for i, c in enumerate(crops)]",
           "xs = [self.prepare_tokens(c) for c in crops]", DINOV2_STEP,
           "the student's global crops are not masked (the mask token never reaches the network)"),
    mutant("train-resume-rng-not-restored", "dino/train.py",
           'restore_rng_state(state["rng"][self.info.rank])', 'state["rng"][self.info.rank]', RESUME,
           "resume does not restore the RNG states: augmentations and drop-path draws differ from the straight run"),
    mutant("train-resume-step-from-epoch", "dino/train.py",
           'self.epoch, self.step = int(state["epoch"]), int(state["step"])',
           'self.epoch, self.step = int(state["epoch"]), int(state["epoch"])', RESUME,
           "resume restores the global step from the epoch counter"),
    mutant("schedules-cosine-off-by-one", "dino/schedules.py",
           "np.cos(np.pi * i / max(n, 1))", "np.cos(np.pi * i / max(n - 1, 1))",
           ("tests/test_train.py", "cosine_schedule_matches_formula"),
           "cosine runs over n - 1 steps: the schedule reaches its final value one step early"),
    mutant("schedules-warmup-skips-zero", "dino/schedules.py",
           "np.linspace(warmup_start, base, warmup_iters)", "np.linspace(warmup_start, base, warmup_iters + 1)[1:]",
           RECIPE, "the lr warm-up starts at peak / W instead of 0 (DINO's first step has lr 0)"),
    mutant("schedules-peak-lr-ignores-world-size", "dino/schedules.py",
           "peak_lr = cfg.base_lr * cfg.batch_size * world_size / 256.0",
           "peak_lr = cfg.base_lr * cfg.batch_size / 256.0",
           ("tests/test_train.py", "schedules_from_config_follow_dino"),
           "the linear lr scaling uses the per-process batch, not the total one"),
    # ------------------------------------------------------------------------------------ iBOT patch loss
    mutant("ibot-triton-entropy-rebase", "dino_kernels/ibot_patch_loss.py",
           "rest = tl.where(grew, summed * scale, rest)", "rest = tl.where(grew, rest * scale, rest)",
           ("tests/test_ibot_patch_loss.py", "multi_block_paths"),
           "teacher sweep: columns at the old max are dropped, not moved to the rest, when a later block raises it"),
    mutant("ibot-fp16-backward-factor", "dino_kernels/ibot_patch_loss.py",
           "return weight * stored, exact / stored", "return weight * stored, exact",
           ("tests/test_ibot_patch_loss.py", "float16_gradient_survives and auto"),
           "fp16: the backward does not undo the power of two the stored gradient carries"),
    mutant("ibot-cpp-given-targets-norm", "csrc/teacher_targets.h",
           "prob[j] = exp_acc(static_cast<acc_t>(u - row_max)) * row_inv_norm;",
           "prob[j] = exp_acc(static_cast<acc_t>(u - row_max));",
           ("tests/test_ibot_patch_loss.py", "matches_float64_reference and auto and sinkhorn_knopp"),
           "C++ kernel: Sinkhorn-Knopp targets rebuilt without their row normaliser"),
    # ------------------------------------------------------------------------------------- Sinkhorn-Knopp
    mutant("sk-triton-row-entropy-rebase", "dino_kernels/sinkhorn_knopp.py",
           "w = scale * (w + tl.where(z > 0.0, rebase, 0.0) * z) + tl.sum(e * shifted)",
           "w = scale * w + tl.sum(e * shifted)",
           ("tests/test_sinkhorn_knopp.py", "row_max_in_a_later_block and triton"),
           "row pass: Σ e·(u − m) of the earlier blocks is not shifted when a later block raises the max (entropy)"),
    mutant("sk-cpp-column-sum-dropped", "csrc/sinkhorn_knopp.cpp",
           "temp * (col_max[j] + std::log(col_sum[j]))", "temp * col_max[j]",
           ("tests/test_sinkhorn_knopp.py", "matches_float64_reference and auto"),
           "C++ column pass: the column scaling takes the column max for its log-sum-exp"),
    mutant("sk-all-reduce-unscaled", "dino_kernels/sinkhorn_knopp.py",
           "total = torch.exp((column_shift - top) / teacher_temp)", "total = torch.exp(column_shift - top)",
           ("tests/test_sinkhorn_knopp.py", "two_ranks and auto"),
           "across ranks: the column log-sum-exps are combined in logit units, without dividing by τt"),
    # ---------------------------------------------------------------------------------------------- KoLeo
    mutant("koleo-triton-split-tie", "dino_kernels/koleo.py",
           "        better = value > best\n", "        better = value >= best\n",
           ("tests/test_koleo.py", "multi_block_paths"),
           "combining the column splits, a tie goes to the later split: the highest index, not the lowest"),
    mutant("koleo-triton-scatter-sign", "dino_kernels/koleo.py",
           "g -= coef_i * tl.where(mask, zi - zj + shift, 0.0)", "g += coef_i * tl.where(mask, zi - zj + shift, 0.0)",
           ("tests/test_koleo.py", "matches_float64_reference and triton"),
           "backward: the terms of the rows whose neighbour is j are added instead of subtracted"),
    mutant("koleo-cpp-clamp-projection", "csrc/koleo.cpp",
           "norms[j] >= eps ? lane_sum", "norms[j] > 0 ? lane_sum",
           ("tests/test_koleo.py", "duplicate_zero_and_tiny_rows and auto"),
           "C++ backward: a row below eps (its norm clamped) still gets the normalisation's projection"),
    # ------------------------------------------------------------------------------- drop-in for other code
    mutant("timm-layerscale-dropped", "dino_kernels/timm.py",
           "generator=generator, scaling=_scaling(block.ls1))", "generator=generator, scaling=None)",
           ("tests/test_timm.py", "eval_matches_timm_forward_features and layerscale"),
           "timm packed forward: the attention branch's LayerScale is not applied"),
    mutant("timm-k-norm-skipped", "dino_kernels/timm.py",
           "q, k = attn.q_norm(q), attn.k_norm(k)", "q, k = attn.q_norm(q), k",
           ("tests/test_timm.py", "eval_matches_timm_forward_features and qk_norm"),
           "timm packed forward: qk-norm normalises the queries only"),
    mutant("timm-final-norm-skipped", "dino_kernels/timm.py",
           "return [model.norm(x) for x in xs]", "return xs",
           ("tests/test_timm.py", "eval_matches_timm_forward_features and plain"),
           "timm packed forward: the final norm of forward_features is left out"),
    mutant("timm-mlp-drop-rate-of-attention", "dino_kernels/timm.py",
           "_drop_rate(block.drop_path2)", "_drop_rate(block.drop_path1) * 0",
           ("tests/test_timm.py", "train_drop_path_skips_the_dropped_samples"),
           "timm packed forward: the MLP branch ignores its drop-path rate in training"),
    mutant("compat-dino-local-crops", "dino_kernels/compat/dino.py",
           "super().__init__(out_dim, 2, ncrops - 2", "super().__init__(out_dim, 2, ncrops - 1",
           ("tests/test_compat_dino.py", "matches_main_dino_across_the_warmup"),
           "main_dino's DINOLoss: ncrops counted as local crops besides the 2 global ones"),
    mutant("compat-lightly-schedule-lag", "dino_kernels/compat/lightly.py",
           "return float(self.teacher_temp_schedule[epoch])", "return float(self.teacher_temp_schedule[epoch - 1])",
           ("tests/test_compat_lightly.py", "matches_lightly_step_after_step"),
           "lightly's DINOLoss: the warm-up temperature is the previous epoch's (the first wraps to the last)"),
    mutant("compat-lightly-temperature-not-fp32", "dino_kernels/compat/lightly.py",
           "return _fp32(teacher_temp)", "return teacher_temp",
           ("tests/test_compat_lightly.py", "matches_lightly_step_after_step and auto"),
           "lightly's DINOLoss: an explicit teacher_temp is used in fp64, where lightly rounds it to fp32"),
    mutant("ema-names-unchecked", "dino_kernels/ema.py",
           "if t != s and _unwrapped_name(t) != _unwrapped_name(s):", "if False:",
           ("tests/test_ema_adoption.py", "misaligned_named_parameters"),
           "ema_ with named_parameters pairs: misaligned names are not refused"),
]


# ------------------------------------------------------------------------------------------------ the tree
def check_snippets(mutants: Iterable[Mutant]) -> list[str]:
    """One line per mutant whose snippet does not occur exactly once in its file (empty: all fine)."""
    problems = []
    for m in mutants:
        path = REPO / m.file
        count = path.read_text().count(m.original) if path.exists() else 0
        if count != 1:
            problems.append(f"{m.name}: snippet found {count} times in {m.file} (must be exactly once): "
                            f"{m.original!r}")
    return problems


def copy_tree(dest: Path) -> None:
    """The repository's tracked and untracked-but-not-ignored files, and its built extension, into ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    built = [p.relative_to(REPO) for p in (REPO / "dino_kernels").glob("_C*.so")]
    if not built:
        sys.exit("tests.mutation: dino_kernels/_C*.so is missing: build the extension first "
                 "(pip install --no-build-isolation -e .)")
    for name in [*filter(None, listed), *map(str, built), "dino_kernels/_build_info.json"]:
        source = REPO / name
        if source.is_file():  # a tracked file may be deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def extension_files(root: Path) -> list[Path]:
    return [*(root / "dino_kernels").glob("_C*.so"), root / "dino_kernels" / "_build_info.json"]


def restore_extension(tree: Path) -> None:
    for path in extension_files(REPO):
        shutil.copy2(path, tree / path.relative_to(REPO))


def build_extension(tree: Path) -> str | None:
    """Rebuild the C++ extension in ``tree`` (CPU kernels only); the build's output on failure, else None."""
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "DINO_KERNELS_SKIP_CUDA": "1"}
    try:
        result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the build took more than {BUILD_TIMEOUT_S} s"
    return None if result.returncode == 0 else result.stdout[-2000:] + result.stderr[-4000:]


# ------------------------------------------------------------------------------------------------ pytest
def pytest_command(test_file: str, select: str) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not cuda", test_file]
    return command + (["-k", select] if select else [])


def run_pytest(tree: Path, command: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, or None on timeout; the output's tail). The tests import the copy's packages, never the repo's."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DINO_KERNELS_BACKEND", None)
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the test's own subprocesses (DataLoader workers, CLIs) too
        output, _ = process.communicate()
        return None, output[-3000:]
    return process.returncode, output[-3000:]


def outcome(code: int | None) -> tuple[str, bool | None]:
    """(what a pytest exit code means for a mutant, killed?); None: not a result (a broken selection)."""
    if code is None:
        return "KILLED (timeout)", True
    if code == 0:
        return "SURVIVED", False
    if code == 1:
        return "KILLED", True
    if code in (2, 3) or code < 0:  # interrupted by collection/import errors, internal error, or a signal
        return f"KILLED (crash: {'signal ' + str(-code) if code < 0 else 'pytest exit code ' + str(code)})", True
    if code == 5:
        return "ERROR (the selection matched no test)", None
    return f"ERROR (pytest exit code {code})", None


def baseline(tree: Path, mutants: list[Mutant], timeout: float) -> bool:
    """Every selection passes on the unmutated tree (one pytest run per test file)."""
    selections: dict[str, set[str]] = {}
    for m in mutants:
        selections.setdefault(m.tests, set()).add(m.select)
    ok = True
    for test_file, expressions in sorted(selections.items()):
        select = "" if "" in expressions else " or ".join(f"({e})" for e in sorted(expressions))
        start = time.perf_counter()
        code, output = run_pytest(tree, pytest_command(test_file, select), timeout)
        print(f"baseline {test_file}: {'passed' if code == 0 else 'FAILED'} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        if code != 0:
            print(output, flush=True)
            ok = False
    return ok


# ------------------------------------------------------------------------------------------------ the run
def run_mutant(tree: Path, m: Mutant, timeout: float, verbose: bool) -> tuple[str, bool | None, str]:
    """(outcome, killed?, output to show) of one mutant; the tree is restored afterwards."""
    path = tree / m.file
    original = path.read_text()
    path.write_text(original.replace(m.original, m.replacement, 1))
    try:
        if m.needs_build:
            failure = build_extension(tree)
            if failure is not None:  # a mutant that does not compile is a broken mutant, not a kill
                return "ERROR (the mutant does not build)", None, failure
        code, output = run_pytest(tree, pytest_command(m.tests, m.select), timeout)
        text, killed = outcome(code)
        return text, killed, output if verbose or killed is None or text.startswith("KILLED (crash") else ""
    finally:
        path.write_text(original)
        if m.needs_build:
            restore_extension(tree)


def ordered(mutants: list[Mutant]) -> list[Mutant]:
    """Python mutants first, then the C++ ones grouped by file (each rebuild then recompiles one or two files)."""
    return sorted(mutants, key=lambda m: (m.needs_build, m.file if m.needs_build else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="SUBSTRING", action="append",
                        help="run the mutants whose name contains SUBSTRING (repeatable: any of them)")
    parser.add_argument("--list", action="store_true", help="list the mutants and check their snippets")
    parser.add_argument("--timeout", type=float, default=PYTEST_TIMEOUT_S, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the selections on the "
                                                                    "unmutated tree")
    parser.add_argument("--verbose", action="store_true", help="show the end of pytest's output for every mutant")
    args = parser.parse_args(argv)
    selected = [m for m in MUTANTS if args.only is None or any(part in m.name for part in args.only)]
    if not selected:
        parser.error(f"no mutant name contains {args.only!r}")
    problems = check_snippets(MUTANTS)
    if args.list:
        for m in selected:
            where = f"{m.tests} -k {m.select!r}" if m.select else m.tests
            print(f"{m.name}\n    {m.file}: {m.description}\n    killed by: {where}"
                  + ("\n    needs a GPU (not run)" if m.needs_gpu else ""))
    if problems:
        print("\n".join(["tests.mutation: snippets that moved or changed; update these mutants:", *problems]),
              file=sys.stderr)
        return 2
    if args.list:
        return 0

    runnable = [m for m in selected if not m.needs_gpu]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dino-kernels-mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        check_imports_from(tree)
        if not args.no_baseline and not baseline(tree, runnable, args.timeout):
            print("tests.mutation: the selections fail on the unmutated tree; fix the tests first", file=sys.stderr)
            return 2
        results = run_all(tree, runnable, args.timeout, args.verbose)
    return report(results, [m for m in selected if m.needs_gpu], time.perf_counter() - start)


def check_imports_from(tree: Path) -> None:
    """The copy's packages are the ones its tests import (not an installed or editable copy of the repository)."""
    code = "import dino, dino_kernels; print(dino.__file__); print(dino_kernels.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    paths = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True, capture_output=True,
                           text=True).stdout.split()
    if not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in paths):
        sys.exit(f"tests.mutation: the copy imports {paths} instead of its own packages")


def run_all(tree: Path, mutants: list[Mutant], timeout: float, verbose: bool) -> list[tuple[Mutant, bool | None]]:
    """Every mutant in turn, one line each; (mutant, killed?) pairs, None for a broken mutant."""
    results = []
    for i, m in enumerate(ordered(mutants), 1):
        begin = time.perf_counter()
        text, killed, output = run_mutant(tree, m, timeout, verbose)
        results.append((m, killed))
        print(f"[{i:2d}/{len(mutants)}] {text:<24} {m.name} ({time.perf_counter() - begin:.0f} s): {m.description}",
              flush=True)
        if killed is False and m.equivalent:
            print(f"        equivalent: {m.equivalent}", flush=True)
        if output:
            print("        " + output.strip().replace("\n", "\n        "), flush=True)
    return results


def report(results: list[tuple[Mutant, bool | None]], gpu_only: list[Mutant], seconds: float) -> int:
    """The skipped mutants, the survivors and the score (the last line); exit code 1 for an unexplained survivor
    or a broken mutant."""
    for m in gpu_only:
        print(f"SKIPPED (needs a GPU)    {m.name}: {m.description} ({m.file} runs on CUDA only)")
    survivors = [m for m, killed in results if killed is False]
    errors = [m for m, killed in results if killed is None]
    for m in survivors:
        print(f"survivor {m.name}: " + (f"equivalent: {m.equivalent}" if m.equivalent else
                                        "NOT explained: a test is missing"))
    for m in errors:
        print(f"error {m.name}: not a result, fix the mutant")
    killed = sum(1 for _, k in results if k)
    print(f"ran {len(results)} mutants in {seconds / 60:.1f} min")
    print(f"mutation score: {killed}/{len(results) - len(errors)} killed")
    return 0 if not errors and all(m.equivalent for m in survivors) else 1


if __name__ == "__main__":
    sys.exit(main())
