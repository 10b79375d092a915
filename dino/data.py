"""Datasets: scikit-learn's digits (default, no download) and any folder of images.

Workers only decode and resize to a fixed base square (uint8, 3×S×S); every random augmentation runs batched on the
training device (:mod:`dino.augment`). Labels are used only by the k-NN evaluation (-1 when a folder has none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_SEED = 0
TEST_FRACTION = 0.3


def resize_square(image: Image.Image, size: int, crop_fraction: float = 1.0) -> Image.Image:
    """Resize the shorter side to ``size / crop_fraction`` (bicubic), then centre-crop ``size`` × ``size``."""
    w, h = image.size
    short = round(size / crop_fraction)
    if w <= h:
        new_w, new_h = short, max(short, round(h * short / w))
    else:
        new_w, new_h = max(short, round(w * short / h)), short
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ArrayImageDataset(Dataset):
    """In-memory grayscale images (N, h, w) uint8; items are upsampled to ``size`` on the worker."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.images, self.labels, self.size = images, labels, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[i], mode="L").resize((self.size, self.size), Image.BICUBIC)
        return to_uint8_tensor(image), int(self.labels[i])


class ImageFileDataset(Dataset):
    """Image files decoded with PIL and resized/centre-cropped to a ``size`` square on the worker."""

    def __init__(self, paths: list[str], labels: list[int], size: int, crop_fraction: float = 1.0) -> None:
        self.paths, self.labels, self.size, self.crop_fraction = paths, labels, size, crop_fraction

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as image:
            image = resize_square(image.convert("RGB"), self.size, self.crop_fraction)
        return to_uint8_tensor(image), self.labels[i]


@dataclass
class Datasets:
    """``train`` feeds DINO; ``knn_train``/``knn_test`` (None without labels) feed the k-NN evaluation."""

    train: Dataset
    knn_train: Dataset | None
    knn_test: Dataset | None
    num_classes: int
    name: str


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digit images (shipped with the package), as uint8 0..255, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a 70/30 split stratified by label, fixed by ``SPLIT_SEED``."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return np.sort(train), np.sort(test)


def digits_datasets(image_size: int) -> Datasets:
    images, labels = load_digits_arrays()
    train, test = stratified_split(labels)
    train_ds = ArrayImageDataset(images[train], labels[train], image_size)
    test_ds = ArrayImageDataset(images[test], labels[test], image_size)
    return Datasets(train=train_ds, knn_train=train_ds, knn_test=test_ds, num_classes=10, name="digits")


def _images_under(folder: str) -> list[str]:
    found = []
    for root, _, files in os.walk(folder, followlinks=True):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _labelled(folder: str) -> tuple[list[str], list[int], list[str]]:
    """Images of ``folder``; with class sub-folders, labels are their sorted indices, else every label is -1."""
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir() and _images_under(d.path))
    if not classes:
        return _images_under(folder), [-1] * len(_images_under(folder)), []
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(os.path.join(folder, name))
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def folder_datasets(folder: str, image_size: int, eval_size: int) -> Datasets:
    """A folder of images. ``train/`` and ``val/`` (or ``test/``) sub-folders are used as the split when present;
    otherwise class sub-folders give labels and a 70/30 stratified split (DINO trains on the 70 %), and a folder
    without class sub-folders trains on everything with no k-NN evaluation. Evaluation images are resized with
    DINO's 256/224 centre crop."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data: {folder!r} is not a directory")
    split_dirs = [os.path.join(folder, s) for s in ("train", "val", "test")]
    if os.path.isdir(split_dirs[0]) and (os.path.isdir(split_dirs[1]) or os.path.isdir(split_dirs[2])):
        test_dir = split_dirs[1] if os.path.isdir(split_dirs[1]) else split_dirs[2]
        train_paths, train_labels, classes = _labelled(split_dirs[0])
        test_paths, test_labels, test_classes = _labelled(test_dir)
        if classes and test_classes != classes:
            raise ValueError(f"--data: class folders of {test_dir} {test_classes} differ from train/ {classes}")
    else:
        paths, labels, classes = _labelled(folder)
        if classes:
            train, test = stratified_split(np.asarray(labels))
            train_paths, train_labels = [paths[i] for i in train], [labels[i] for i in train]
            test_paths, test_labels = [paths[i] for i in test], [labels[i] for i in test]
        else:
            train_paths, train_labels, test_paths, test_labels = paths, labels, [], []
    if not train_paths:
        raise ValueError(f"--data: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder!r}")
    train_ds = ImageFileDataset(train_paths, train_labels, image_size)
    if not classes or not test_paths:
        return Datasets(train=train_ds, knn_train=None, knn_test=None, num_classes=0, name=folder)
    crop_fraction = 224 / 256
    knn_train = ImageFileDataset(train_paths, train_labels, eval_size, crop_fraction)
    knn_test = ImageFileDataset(test_paths, test_labels, eval_size, crop_fraction)
    return Datasets(train=train_ds, knn_train=knn_train, knn_test=knn_test, num_classes=len(classes), name=folder)


def build_datasets(data: str | None, image_size: int, global_size: int) -> Datasets:
    """``data`` None -> digits; else a folder (see :func:`folder_datasets`)."""
    if data is None:
        return digits_datasets(image_size)
    return folder_datasets(data, image_size, global_size)
