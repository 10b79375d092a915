"""Weighted k-NN classification on frozen features (DINO's ``eval_knn.py``).

Features are the teacher backbone's final-norm CLS token, L2-normalised; similarity is cosine; each of the top-k
training neighbours votes for its class with weight exp(sim / T); the class with the largest sum wins.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, Dataset

from dino.augment import eval_transform
from dino.data import DataError, Datasets, build_datasets

CHUNK = 256
DATA_HELP = ("labelled image folder (class sub-folders; train/ and val/ used when present, else a 70/30 stratified "
             "split); default: the checkpoint's data (digits if none)")


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, dataset: Dataset, size: int, device: torch.device,
                     batch_size: int = 256, num_workers: int = 0, autocast_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features (N, D) in fp32 on ``device`` and labels (N,) of every item of ``dataset``."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, y in loader:
        x = eval_transform(images.to(device, non_blocking=True), size)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            f = backbone(x)
        feats.append(torch.nn.functional.normalize(f.float(), dim=1))
        labels.append(y.to(device))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Predicted class (M,) of each test feature (features L2-normalised, (N, D) and (M, D))."""
    k = min(k, train_features.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], CHUNK):
        sim = test_features[start:start + CHUNK] @ train_features.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def extract_splits(backbone: torch.nn.Module, train_set: Dataset, test_set: Dataset, size: int, device: torch.device,
                   num_workers: int = 0, autocast_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`extract_features` of both splits: train features, train labels, test features, test labels."""
    train_f, train_y = extract_features(backbone, train_set, size, device, num_workers=num_workers,
                                        autocast_dtype=autocast_dtype)
    test_f, test_y = extract_features(backbone, test_set, size, device, num_workers=num_workers,
                                      autocast_dtype=autocast_dtype)
    return train_f, train_y, test_f, test_y


def knn_accuracy(backbone: torch.nn.Module, train_set: Dataset, test_set: Dataset, num_classes: int, size: int,
                 device: torch.device, k: int = 20, temperature: float = 0.07, num_workers: int = 0,
                 autocast_dtype: torch.dtype | None = None) -> float:
    """Top-1 k-NN accuracy in percent of ``backbone`` features: ``train_set`` is the memory bank."""
    train_f, train_y, test_f, test_y = extract_splits(backbone, train_set, test_set, size, device, num_workers,
                                                      autocast_dtype)
    pred = knn_predict(train_f, train_y, test_f, num_classes, k, temperature)
    return 100.0 * (pred == test_y).float().mean().item()


def load_teacher_backbone(checkpoint: str, device: torch.device):
    """The teacher backbone and config of a training checkpoint (file or run directory)."""
    from dino.checkpoint import load_checkpoint, load_state_dict_checked
    from dino.config import Config
    from dino.model import build_model

    state = load_checkpoint(checkpoint)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg, drop_path=False)
    load_state_dict_checked(model, state["teacher"], "teacher")
    return model.backbone.to(device).eval(), cfg


def load_evaluation(checkpoint: str, data: str | None, device_name: str, method: str
                    ) -> tuple[torch.nn.Module, Datasets, int, torch.device]:
    """What a CLI evaluation of frozen features needs: the teacher backbone of ``checkpoint``, the labelled datasets
    of ``data`` (default: the checkpoint's), the image size (the global crops') and the device (``auto``: cuda when
    available). :class:`DataError` when the data has no labels (``method`` names the evaluation that needs them)."""
    device = torch.device(device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, cfg = load_teacher_backbone(checkpoint, device)
    datasets = build_datasets(data if data is not None else cfg.data, cfg.image_size, cfg.global_size)
    if datasets.knn_train is None:
        raise DataError(f"--data: {datasets.name} has no class sub-folders: {method} needs labels")
    return backbone, datasets, cfg.global_size, device


def evaluation_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every evaluation CLI of a checkpoint shares: --checkpoint, --data, --device, --num-workers,
    --debug; a CLI adds its own, then calls :func:`parse_evaluation_args`."""
    from dino.config import DEBUG_HELP

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--data", default=None, help=DATA_HELP)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda when available")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def parse_evaluation_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments of an :func:`evaluation_parser`, with the shared ones checked (``parser.error`` otherwise)."""
    from dino.config import check_device

    args = parser.parse_args(argv)
    try:
        check_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0; got {args.num_workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The CLI: an error the user can fix is one ``error: ...`` line and exit code 2 (with ``--debug``, its
    traceback)."""
    from dino.config import run_command

    parser = evaluation_parser("python -m dino.eval_knn", (
        "Weighted k-NN top-1 of a checkpoint's teacher backbone (normed CLS features, cosine similarity, votes "
        "weighted exp(sim/T)) on the held-out split of the training data or of --data."))
    parser.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default 0.07)")
    args = parse_evaluation_args(parser, argv)
    if args.k < 1 or args.temperature <= 0:
        parser.error(f"--k must be >= 1 and --temperature > 0; got {args.k} and {args.temperature}")
    return run_command(lambda: evaluate_checkpoint(args.checkpoint, args.data, args.device, args.k, args.temperature,
                                                   args.num_workers), args.debug)


def evaluate_checkpoint(checkpoint: str, data: str | None, device_name: str, k: int, temperature: float,
                        num_workers: int) -> None:
    """Print the k-NN top-1 of ``checkpoint``'s teacher backbone on ``data`` (default: the checkpoint's data)."""
    backbone, datasets, size, device = load_evaluation(checkpoint, data, device_name, "k-NN")
    acc = knn_accuracy(backbone, datasets.knn_train, datasets.knn_test, datasets.num_classes, size, device, k,
                       temperature, num_workers=num_workers)
    print(f"k-NN (k={k}, T={temperature}) top-1 on {datasets.name}: {acc:.2f}% "
          f"({len(datasets.knn_test)} test images, {len(datasets.knn_train)} in the memory bank)")


if __name__ == "__main__":
    raise SystemExit(main())
