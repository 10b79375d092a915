"""``python -m benchmarks.learning``, the benchmark the README's training figures come from: one tiny real run per
kernel set through its command line, and the JSON and table it writes from the runs' metrics."""

from __future__ import annotations

import json

import pytest

from benchmarks import learning

TINY = ["--epochs", "2", "--embed-dim", "24", "--num-heads", "2", "--depth", "1", "--batch-size", "256",
        "--n-local-crops", "1", "--out-dim", "32", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
        "--eval-every", "1", "--device", "cpu"]


def test_learning_benchmark_runs_each_seed_and_writes_its_table(tmp_path, monkeypatch):
    pytest.importorskip("kornia")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the runs are a user's command lines
    out = tmp_path / "learning"
    assert learning.main(["--seeds", "3", "--reference-seeds", "3", "--out", str(out), "--", *TINY]) == 0
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert [(r["seed"], r["kernels"]) for r in runs] == [(3, "fused"), (3, "reference")]
    for r in runs:
        assert r["epochs"] == 2 and [epoch for epoch, _ in r["knn_curve"]] == [1, 2]
        assert 10.0 < r["knn_top1"] <= 100.0 and 10.0 < r["linear_top1"] <= 100.0
        assert r["wall_seconds"] > r["train_seconds"] > 0 and r["img_per_s"] > 0
        assert 0 < r["min_entropy_fraction"] <= r["max_entropy_fraction"] <= 1
    table = out.with_suffix(".md").read_text()
    for r in runs:
        assert f"| 3 | {r['kernels']} | {r['knn_top1']:.2f} % | {r['linear_top1']:.2f} % |" in table
        assert f"| mean | {r['kernels']} | {r['knn_top1']:.2f} % |" in table
