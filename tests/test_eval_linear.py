"""The linear probe (`dino.eval_linear`) on synthetic features, with both backends: what it must tell apart, what it
must not learn from noise, that the test labels never reach the fit, its input checks and its CLI errors. The CLI
on a trained checkpoint and the trainer's ``linear_top1`` are checked on tests/test_train.py's tiny run."""

from __future__ import annotations

import pytest
import sklearn.linear_model
import torch

from dino import eval_linear
from dino.eval_linear import linear_probe_accuracy

BACKENDS = ("sklearn", "torch")


def blobs(spread: float, num_classes: int = 10, dim: int = 16, per_class: int = 20, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian blobs (unit noise) around class centres drawn with std ``spread``: train and test features (N, D)
    fp32, labels (N,) int64, ``per_class`` images of each class in each split."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * spread
    labels = torch.arange(num_classes).repeat(2 * per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=g)
    n = num_classes * per_class
    return features[:n], labels[:n], features[n:], labels[n:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_separable_classes_are_all_found(backend):
    assert linear_probe_accuracy(*blobs(spread=5.0), 10, backend=backend) == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_labels_score_near_chance(backend):
    """Noise features (spread 0), 32-d for 200 training rows: enough for a weakly penalised fit to memorise the
    training labels, which must not carry over to the test split (chance: 10 %)."""
    assert linear_probe_accuracy(*blobs(spread=0.0, dim=32), 10, backend=backend) < 25.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_test_labels_never_reach_the_fit(backend):
    """Scored against every cyclic relabelling y + s (mod 5) of the test split, each test image is right for exactly
    one s: the accuracies sum to 100 % if and only if the predictions ignore the test labels. A probe choosing C on
    the test split would fit each relabelling apart (here: sum 110 %). Overlapping classes in few rows and many
    dimensions, where C changes the predictions; the probe does fit its training split."""
    train_x, train_y, test_x, test_y = blobs(spread=0.4, num_classes=5, dim=48, per_class=10)
    total = sum(linear_probe_accuracy(train_x, train_y, test_x, (test_y + s) % 5, 5, backend=backend)
                for s in range(5))
    assert total == pytest.approx(100.0, abs=1e-3)
    assert linear_probe_accuracy(train_x, train_y, train_x, train_y, 5, backend=backend) > 90.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_validation_picks_a_good_c(backend, monkeypatch):
    """Overlapping classes, where the penalty matters (test top-1 from about 55 % at the grid's weakest penalty to
    67 % at C = 0.1): the C chosen on the training split scores within 3 points of the best C in hindsight, far above
    the weakest penalty."""
    split = blobs(spread=0.5, dim=24, per_class=30)
    chosen = linear_probe_accuracy(*split, 10, backend=backend)
    grid, in_hindsight = eval_linear.C_GRID, {}
    for c in grid:
        monkeypatch.setattr(eval_linear, "C_GRID", (c,))
        in_hindsight[c] = linear_probe_accuracy(*split, 10, backend=backend)
    assert chosen >= max(in_hindsight.values()) - 3.0 and chosen >= in_hindsight[max(grid)] + 5.0


def test_backends_agree_and_draw_no_random_numbers(monkeypatch):
    """The torch fit minimises scikit-learn's objective (divided by C·N), with the same C: on overlapping classes the
    two score within a point of each other. ``auto`` is torch, on CPU tensors too. None touches the global RNG
    (the trainer's)."""
    split = blobs(spread=0.5, dim=24, per_class=30)
    before = torch.get_rng_state()
    scores = [linear_probe_accuracy(*split, 10, backend=backend) for backend in BACKENDS]
    assert torch.equal(torch.get_rng_state(), before)
    assert 50.0 < scores[0] < 80.0 and abs(scores[0] - scores[1]) <= 1.0

    def refuse(*args, **kwargs):
        raise AssertionError("the other backend's solver ran")

    monkeypatch.setattr(torch.optim, "LBFGS", refuse)
    assert linear_probe_accuracy(*split, 10, backend="sklearn") == scores[0]
    monkeypatch.undo()
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", refuse)
    assert linear_probe_accuracy(*split, 10) == scores[1]


def test_scaler_is_fitted_on_the_training_split():
    """Standardised with the training split's statistics: a per-feature affine change of both splits (scales from
    1e-2 to 1e2) leaves the top-1 as it is, and each test image is classified alone (its top-1 over single-image test
    splits is that of the whole test split), as a scaler fitted on the test split would not."""
    train_x, train_y, test_x, test_y = blobs(spread=0.5, dim=24, per_class=30)
    scale, shift = torch.logspace(-2, 2, 24)[torch.randperm(24)], torch.randn(24) * 10
    top1 = linear_probe_accuracy(train_x, train_y, test_x, test_y, 10)
    assert linear_probe_accuracy(train_x * scale + shift, train_y, test_x * scale + shift, test_y, 10) == pytest.approx(
        top1, abs=1.0)
    few_x, few_y = test_x[:10], test_y[:10]
    alone = [linear_probe_accuracy(train_x, train_y, few_x[i:i + 1], few_y[i:i + 1], 10) for i in range(10)]
    assert sum(alone) / 10 == pytest.approx(linear_probe_accuracy(train_x, train_y, few_x, few_y, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_classes_too_small_to_cross_validate(backend):
    """One or two training images per class: fewer than 3 folds, or no cross-validation at all, still a fit."""
    for per_class in (1, 2):
        assert linear_probe_accuracy(*blobs(spread=5.0, per_class=per_class), 10, backend=backend) == 100.0


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"train_labels": torch.zeros(5, dtype=torch.long)}, ValueError, r"\(N,\); got \(200, 16\) and \(5,\)"),
    ({"test_features": torch.zeros(200, 8)}, ValueError, "differ in width: 16 and 8"),
    ({"test_features": torch.zeros(200, 16, 1)}, ValueError, r"test_features must be \(N, D\)"),
    ({"train_features": torch.zeros(200, 16, dtype=torch.long)}, TypeError, "train_features must be floating"),
    ({"test_labels": torch.zeros(200)}, TypeError, "test_labels integer; got torch.float32"),
    ({"num_classes": 5}, ValueError, r"train_labels must lie in \[0, 5\); got 0 to 9"),
    ({"train_labels": torch.zeros(200, dtype=torch.long)}, ValueError, "at least 2 classes"),
    ({"backend": "cuml"}, ValueError, "backend must be one of auto, sklearn, torch; got 'cuml'"),
])
def test_bad_input_is_refused(change, error, match):
    train_x, train_y, test_x, test_y = blobs(spread=5.0)
    kwargs = {"train_features": train_x, "train_labels": train_y, "test_features": test_x, "test_labels": test_y,
              "num_classes": 10, **change}
    with pytest.raises(error, match=match):
        linear_probe_accuracy(**kwargs)


def test_cli_errors(tmp_path, capsys):
    assert eval_linear.main(["--checkpoint", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    for argv in (["--num-workers", "-1"], ["--device", "tpu9"]):
        with pytest.raises(SystemExit) as exit_info:
            eval_linear.main(["--checkpoint", str(tmp_path), *argv])
        assert exit_info.value.code == 2
        assert "error: " in capsys.readouterr().err
