"""One full DINO training step of `dino.train`: `--kernels fused` (ours) against `--kernels reference`.

A step is what the trainer does per iteration after augmentation: teacher forward on the global crops, student
forward on all crops in one packed call, DINO loss and center update, backward, per-tensor gradient clipping, AdamW,
teacher EMA (:meth:`dino.train.Trainer.step_on_crops`). The crops are random tensors of the augmentation's output
shapes, made once up front: the augmentation (identical for both providers) is not timed. Providers:

- ``reference``: ``--kernels reference``: every op on plain PyTorch (per-crop-group SDPA attention, the reference
  loss, index-based stochastic depth, a Python-loop EMA);
- ``ours``: ``--kernels fused --cuda-graph off``: packed attention, the fused DINO loss, sample-skipping stochastic
  depth, fused EMA, every op launched from Python;
- ``ours_cuda_graph`` (GPU only): ``--kernels fused --cuda-graph on`` (on one GPU, the default), the same step with
  its forward, losses and backward replayed from a CUDA graph (the crops copied into the graph's inputs; clip, AdamW
  and EMA eager). Its peak extra memory reads near 0: the graph's pool is allocated at the capture, before the timed
  calls (the training smoke run reports the whole run's peak).

Cases: the ``cpu-tiny`` preset on CPU (the default training of ``python -m dino.train``), and ViT-S/16 with B=64,
2 global + 10 local crops, K=65,536, bf16 autocast on GPU (CUDA only; the GPU session set, ``-m session``). Each
reports img/s (images per step / median) next to the harness's median and peak memory.
"""

from __future__ import annotations

import pytest

import dino_kernels

try:
    from benchmarks.step_ab import training_step
except ModuleNotFoundError as error:  # e.g. kornia (the augmentation) missing on a GPU image
    pytest.skip(f"dino.train cannot be imported: {error}", allow_module_level=True)

CASES = {
    # name: (device, config overrides, in the GPU session set)
    "cpu-tiny": ("cpu", {"preset": "cpu-tiny"}, False),
    "vit-s16 B=64 2+10 bf16": ("cuda", {"preset": "vit-s16", "batch_size": 64, "n_local_crops": 10, "amp": "bf16"},
                               True),
}
DRY_RUN_OVERRIDES = {"preset": "cpu-tiny", "batch_size": 8, "n_local_crops": 2}
PROVIDERS = {"reference": ("reference", "off"), "ours": ("fused", "off"), "ours_cuda_graph": ("fused", "on")}
# Untimed steps first: on CPU the first few steps of a process run up to 40 % slower than the later ones.
WARMUP_STEPS = 8
_IMG_PER_S: dict[tuple[str, str], float] = {}


def _params():
    for case, (device, _, session) in CASES.items():
        for provider in PROVIDERS:
            if provider == "ours_cuda_graph" and device != "cuda":
                continue
            yield pytest.param(case, provider, marks=[pytest.mark.session] if session else [])


@pytest.mark.parametrize(("case", "provider"), list(_params()))
def test_train_step(benchmark, measure, bench_env, case, provider, tmp_path):
    device, overrides, _ = CASES[case]
    device = bench_env.device(device)
    kernels, cuda_graph = PROVIDERS[provider]
    if cuda_graph == "on" and device != "cuda":
        pytest.skip("a CUDA graph needs a GPU (dry run on CPU)")
    trainer, _, step = training_step(DRY_RUN_OVERRIDES if bench_env.dry_run else overrides, kernels, device,
                                     cuda_graph, str(tmp_path))
    cfg = trainer.cfg
    with dino_kernels.backend("reference" if provider == "reference" else "auto"):
        median = measure(benchmark, step, case=case, provider=provider, device=device, warmup=WARMUP_STEPS)
    _IMG_PER_S[(case, provider)] = cfg.batch_size / median
    benchmark.extra_info["img_per_s"] = cfg.batch_size / median
    ref = _IMG_PER_S.get((case, "reference"))
    if provider != "reference" and ref:
        print(f"\n{case}: {provider} {cfg.batch_size / median:.1f} img/s, reference {ref:.1f} img/s "
              f"({cfg.batch_size / median / ref:.2f}x)")
