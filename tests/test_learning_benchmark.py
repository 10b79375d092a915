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
    (group,) = json.loads(out.with_suffix(".json").read_text())["groups"]
    runs = group["runs"]
    assert group["preset"] == "cpu-tiny"
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


def test_learning_benchmark_keeps_the_other_presets_results(tmp_path, monkeypatch):
    """A run of one preset replaces that preset's section and keeps the others' (the DINOv2 preset next to the
    default); the command line it runs names the preset only when it is not the default."""
    out = tmp_path / "learning"
    commands = []

    def fake_run(seed, kernels, extra, preset=None):
        commands.append(preset)
        return {"seed": seed, "kernels": kernels, "knn_top1": 90.0 + seed, "linear_top1": None, "wall_seconds": 2.0,
                "train_seconds": 1.0, "img_per_s": 5.0, "epochs": 1, "min_entropy_fraction": 0.1,
                "max_entropy_fraction": 0.2, "knn_curve": [(1, 90.0 + seed)]}

    monkeypatch.setattr(learning, "run_seed", fake_run)
    learning.main(["--seeds", "1", "--out", str(out)])
    learning.main(["--preset", "cpu-tiny-v2", "--seeds", "2", "--out", str(out)])
    learning.main(["--preset", "cpu-tiny-v2", "--seeds", "3", "--out", str(out)])
    assert commands == [None, "cpu-tiny-v2", "cpu-tiny-v2"]
    groups = json.loads(out.with_suffix(".json").read_text())["groups"]
    assert [(g["preset"], [r["seed"] for r in g["runs"]]) for g in groups] == [("cpu-tiny", [1]),
                                                                               ("cpu-tiny-v2", [3])]
    table = out.with_suffix(".md").read_text()
    assert "## cpu-tiny: the default" in table
    assert "## cpu-tiny-v2: `python -m dino.train --preset cpu-tiny-v2`" in table
    assert "| 1 | fused | 91.00 % |" in table and "| 3 | fused | 93.00 % |" in table and "| 2 | fused" not in table


def test_step_ab_alternates_the_providers_and_writes_its_table(tmp_path, monkeypatch):
    """``python -m benchmarks.step_ab``: both trainers in one process, blocks alternating with the order flipped each
    round, a ratio per round between neighbouring blocks, their median, and the table and JSON it writes."""
    from benchmarks import step_ab

    calls, block_ms = [], {"reference": iter([30.0, 33.0, 36.0]), "fused": iter([20.0, 30.0, 12.0])}

    def fake_block_ms(step, kernels, steps):
        calls.append((kernels, steps))
        return 1.0 if steps == 2 else next(block_ms[kernels])

    monkeypatch.setattr(step_ab, "_block_ms", fake_block_ms)
    out = tmp_path / "ab"
    argv = ["--rounds", "3", "--steps", "4", "--warmup", "2", "--batch-size", "8", "--out", str(out)]
    assert step_ab.main(argv) == 0
    assert calls == [("reference", 2), ("fused", 2), ("reference", 4), ("fused", 4), ("fused", 4), ("reference", 4),
                     ("reference", 4), ("fused", 4)]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["ratios"] == pytest.approx([1.5, 1.1, 3.0]) and result["median_ratio"] == pytest.approx(1.5)
    assert result["batch_size"] == 8
    assert result["median_ms"] == {"reference": 33.0, "ours": 20.0}
    table = out.with_suffix(".md").read_text()
    assert "median 1.500×, range 1.100–3.000×" in table and "| ours | 20.0 | 400 |" in table
    assert "| 2 | 33.0 | 30.0 | 1.100 |" in table
