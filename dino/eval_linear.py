"""Linear probe on frozen features: multinomial logistic regression on the teacher's CLS features.

Features are those of the k-NN evaluation (:func:`dino.eval_knn.extract_features`: final-norm CLS token,
L2-normalised), standardised with the training split's mean and std. The probe minimises
½‖W‖² + C·Σ cross-entropy (bias unpenalised) with L-BFGS; C is the value of ``C_GRID`` that predicts best in a
seeded, stratified ``CV_FOLDS``-fold cross-validation on the training split alone, refitted on the whole of it;
the test split serves only for the reported top-1. The fit is torch's full-batch L-BFGS on any device (on the
digits' features 4-5× faster than scikit-learn's, which takes 20 s on 2 cores); ``backend="sklearn"`` solves the same
objective with scikit-learn, the cross-check. Unlike DINO's ``eval_linear.py`` (SGD on augmented images), features
are extracted once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dino.eval_knn import evaluation_parser, extract_splits, load_evaluation, parse_evaluation_args

BACKENDS = ("auto", "sklearn", "torch")
C_GRID = (1e-2, 0.1, 1.0, 10.0, 100.0)
CV_FOLDS = 3
DEFAULT_C = 1.0  # scikit-learn's, for classes too small to cross-validate
MAX_ITER = 1000

Predictor = Callable[[torch.Tensor], torch.Tensor]
Fitter = Callable[[torch.Tensor, torch.Tensor, int, float], Predictor]


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                          test_labels: torch.Tensor, num_classes: int, *, backend: str = "auto") -> float:
    """Top-1 accuracy in percent on the test split of a logistic regression fitted on the training split.

    Features (N, D) and (M, D), floating (fitted in fp32); labels (N,) and (M,), integer in [0, num_classes), on
    the features' device. ``backend``: ``torch`` (``auto``: on any device) or ``sklearn``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    _check_split("train", train_features, train_labels, num_classes)
    _check_split("test", test_features, test_labels, num_classes)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train_features and test_features differ in width: {train_features.shape[1]} and "
                         f"{test_features.shape[1]}")
    if train_labels.unique().numel() < 2 or not test_labels.numel():
        raise ValueError("a linear probe needs training images of at least 2 classes and at least one test image")
    if backend == "auto":
        backend = "torch"
    fit = _fit_torch if backend == "torch" else _fit_sklearn
    x, y, test = train_features.float(), train_labels.long(), test_features.float()
    mean, std = x.mean(0), x.std(0, correction=0)
    std = torch.where(std > 0, std, 1.0)  # as scikit-learn's StandardScaler: a constant feature is only centred
    x, test = (x - mean) / std, (test - mean) / std
    predict = fit(x, y, num_classes, _choose_c(fit, x, y, num_classes))
    return 100.0 * (predict(test) == test_labels).float().mean().item()


def _check_split(name: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if not features.is_floating_point() or labels.is_floating_point():
        raise TypeError(f"{name}_features must be floating and {name}_labels integer; got {features.dtype} and "
                        f"{labels.dtype}")
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"{name}_features must be (N, D) and {name}_labels (N,); got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise ValueError(f"{name}_labels must lie in [0, {num_classes}); got {int(labels.min())} to "
                         f"{int(labels.max())}")


def _choose_c(fit: Fitter, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """The C of ``C_GRID`` with the most correct held-out predictions over stratified folds of (x, y) (the smallest
    such C: the strongest penalty); ``DEFAULT_C`` when a class has a single image."""
    folds = min(CV_FOLDS, int(y.bincount()[y.unique()].min()))
    if folds < 2:
        return DEFAULT_C
    # Stratified and seeded: shuffle, stable-sort by class, deal the rows out to the folds in turn.
    shuffled = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(y.device)
    order = shuffled[y[shuffled].argsort(stable=True)]
    fold = torch.empty_like(y)
    fold[order] = torch.arange(len(y), device=y.device) % folds

    def correct(c: float) -> int:
        return sum(int((fit(x[fold != k], y[fold != k], num_classes, c)(x[fold == k]) == y[fold == k]).sum())
                   for k in range(folds))

    return max(C_GRID, key=correct)


def _fit_sklearn(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float) -> Predictor:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():  # the weakest penalties may stop at MAX_ITER, as the torch fit does, silently
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=c, max_iter=MAX_ITER).fit(x.cpu().numpy(), y.cpu().numpy())
    return lambda features: torch.from_numpy(model.predict(features.cpu().numpy())).to(features.device)


def _fit_torch(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float) -> Predictor:
    """scikit-learn's objective divided by C·N: mean cross-entropy + ‖W‖² / (2·C·N), from zero weights (the
    objective is convex, so the start only sets the path; no random numbers drawn)."""
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + weight.square().sum() / (2 * c * len(y))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return lambda features: F.linear(features, weight.detach(), bias.detach()).argmax(1)


def linear_accuracy(backbone: torch.nn.Module, train_set: Dataset, test_set: Dataset, num_classes: int, size: int,
                    device: torch.device, num_workers: int = 0, autocast_dtype: torch.dtype | None = None) -> float:
    """Linear-probe top-1 in percent of ``backbone`` features: fitted on ``train_set``, scored on ``test_set``."""
    features = extract_splits(backbone, train_set, test_set, size, device, num_workers, autocast_dtype)
    return linear_probe_accuracy(*features, num_classes)


def main(argv: list[str] | None = None) -> int:
    """The CLI: an error the user can fix is one ``error: ...`` line and exit code 2 (with ``--debug``, its
    traceback)."""
    from dino.config import run_command

    parser = evaluation_parser("python -m dino.eval_linear", (
        "Linear-probe top-1 of a checkpoint's teacher backbone (logistic regression on its normed CLS features, C "
        "cross-validated on the training split) on the held-out split of the training data or of --data."))
    args = parse_evaluation_args(parser, argv)
    return run_command(lambda: evaluate_checkpoint(args.checkpoint, args.data, args.device, args.num_workers),
                       args.debug)


def evaluate_checkpoint(checkpoint: str, data: str | None, device_name: str, num_workers: int) -> None:
    """Print the linear-probe top-1 of ``checkpoint``'s teacher backbone on ``data`` (default: the checkpoint's)."""
    backbone, datasets, size, device = load_evaluation(checkpoint, data, device_name, "a linear probe")
    acc = linear_accuracy(backbone, datasets.knn_train, datasets.knn_test, datasets.num_classes, size, device,
                          num_workers=num_workers)
    print(f"linear probe top-1 on {datasets.name}: {acc:.2f}% ({len(datasets.knn_test)} test images, "
          f"{len(datasets.knn_train)} training images)")


if __name__ == "__main__":
    raise SystemExit(main())
