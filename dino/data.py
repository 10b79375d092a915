"""Datasets: scikit-learn's digits (default, no download) and any folder of images.

Workers only decode and resize to a fixed base square (uint8, 3×S×S); every random augmentation runs batched on the
training device (:mod:`dino.augment`). Labels are used only by the k-NN evaluation (-1 when a folder has none).

Image folders tolerate damaged files: :func:`folder_datasets` checks every file's header before training and skips
those PIL cannot read, with one :class:`UnreadableImageWarning`; a file whose pixel data turns out damaged when it
is loaded is skipped then (:class:`ImageFileDataset`).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_SEED = 0
TEST_FRACTION = 0.3
# The header check: files per task of its thread pool, the folder size from which it shows a progress bar, and how
# many of the skipped files its warning names.
CHECK_CHUNK = 256
CHECK_PROGRESS_MIN_FILES = 2000
SKIPPED_FILES_SHOWN = 5
JPEG_END_OF_IMAGE = b"\xff\xd9"
# Transparent pixels are composited onto this background.
BACKGROUND = (255, 255, 255)


class DataError(ValueError):
    """Data that cannot be used (no readable images, an unreadable file, an impossible split); the message names
    the path and the problem."""


class UnreadableImageWarning(RuntimeWarning):
    """Image files that PIL cannot read were skipped."""


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


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image. 16- and 32-bit integer grayscale (``I;16*``, ``I``) is scaled from 0..65535 to 0..255
    (PIL's own conversion clips it at 255); transparency (alpha, a palette's or a tRNS colour) is composited onto
    white; every other mode (L, 1, P, CMYK, YCbCr, ...) takes PIL's conversion."""
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 tensor (converted by :func:`to_rgb`)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _reason(err: Exception) -> str:
    """Why PIL failed, in a few words (its message for an unidentified file repeats the path)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL can identify"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def read_image(path: str) -> Image.Image:
    """The image file ``path`` decoded and converted to RGB (:func:`to_rgb`); :class:`DataError` naming the file
    and the reason when PIL cannot read it."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for damaged files
        raise DataError(f"{path}: {_reason(err)}") from err


def header_problem(path: str) -> str | None:
    """Why ``path`` fails a quick check, or None when it passes. PIL must identify the file and ``verify()`` its
    structure, which decodes no pixels (for a PNG it walks every chunk's checksum to the end, so a cut-short PNG
    fails). A JPEG whose data does not end with the end-of-image marker, as a cut-short download does, is decoded
    in full. Other damage to pixel data shows only when the image is loaded (:class:`ImageFileDataset`)."""
    try:
        with Image.open(path) as image:
            is_jpeg = image.format == "JPEG"
            image.verify()
        if is_jpeg and not _ends_with(path, JPEG_END_OF_IMAGE):
            with Image.open(path) as image:
                image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for damaged files
        return _reason(err)
    return None


def _ends_with(path: str, marker: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < len(marker):
            return False
        f.seek(-len(marker), os.SEEK_END)
        return f.read() == marker


def find_unreadable(paths: list[str], progress: bool = False) -> dict[str, str]:
    """``{path: reason}`` of the files that fail :func:`header_problem`. Checked on a thread pool (opening a file
    mostly waits on the disk), with a progress bar on stderr from ``CHECK_PROGRESS_MIN_FILES`` files if
    ``progress``."""
    chunks = [paths[i:i + CHECK_CHUNK] for i in range(0, len(paths), CHECK_CHUNK)]
    found: dict[str, str] = {}
    with ThreadPoolExecutor() as pool, tqdm(total=len(paths), desc="checking images", unit="file", file=sys.stderr,
                                            disable=not progress or len(paths) < CHECK_PROGRESS_MIN_FILES,
                                            dynamic_ncols=True) as bar:
        for chunk, problems in zip(chunks, pool.map(_header_problems, chunks)):
            found.update((path, why) for path, why in zip(chunk, problems) if why is not None)
            bar.update(len(chunk))
    return found


def _header_problems(paths: list[str]) -> list[str | None]:
    return [header_problem(path) for path in paths]


class ArrayImageDataset(Dataset):
    """In-memory grayscale images (N, h, w) uint8, upsampled to ``size`` (bicubic) once, at construction: a small
    dataset such as the digits then costs the loader nothing per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int) -> None:
        upsampled = (Image.fromarray(image, mode="L").resize((size, size), Image.BICUBIC) for image in images)
        self.images = torch.stack([to_uint8_tensor(image) for image in upsampled])  # (N, 3, size, size)
        self.labels, self.size = labels, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class ImageFileDataset(Dataset):
    """Image files decoded with PIL (:func:`read_image`) and resized/centre-cropped to a ``size`` square on the
    worker.

    A file that cannot be read when its turn comes (damaged pixel data can pass the header check) is skipped with
    one :class:`UnreadableImageWarning`, and the next readable file of the list takes its place: batches keep their
    size and a run stays deterministic. The record of such files is a tensor in shared memory, so that DataLoader
    workers (and the copies of :meth:`at_size`) warn once per file and pass over it from then on.
    """

    def __init__(self, paths: list[str], labels: list[int], size: int, crop_fraction: float = 1.0) -> None:
        self.paths, self.labels, self.size, self.crop_fraction = paths, labels, size, crop_fraction
        self.failed = torch.zeros(len(paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for j in range(i, i + len(self.paths)):
            j %= len(self.paths)
            if self.failed[j]:
                continue
            try:
                image = read_image(self.paths[j])
            except DataError as err:
                self.failed[j] = True
                warnings.warn(f"skipping the unreadable image {err}; the next readable image of the dataset takes "
                              "its place", UnreadableImageWarning, stacklevel=2)
                continue
            return to_uint8_tensor(resize_square(image, self.size, self.crop_fraction)), self.labels[j]
        raise DataError(f"none of the {len(self.paths)} images of the dataset can be read any more (first: "
                        f"{self.paths[0]})")

    def at_size(self, size: int, crop_fraction: float = 1.0) -> ImageFileDataset:
        """The same files, and the same record of unreadable ones, at another size."""
        other = copy.copy(self)
        other.size, other.crop_fraction = size, crop_fraction
        return other


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


class Labelled(NamedTuple):
    """The readable images of a folder, their labels, the class names, and the class sub-folders left out because
    none of their images is readable."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    emptied: list[str]


def _labelled(folder: str, unreadable: dict[str, str]) -> Labelled:
    """Images of ``folder`` not in ``unreadable``; with class sub-folders, labels are their sorted indices, else
    every label is -1. A sub-folder without a readable image is no class."""
    found = {d.name: _images_under(d.path) for d in os.scandir(folder) if d.is_dir()}
    readable = {name: [p for p in paths if p not in unreadable] for name, paths in found.items()}
    classes = sorted(name for name, paths in readable.items() if paths)
    emptied = sorted(os.path.join(folder, name) for name, paths in found.items() if paths and not readable[name])
    if not classes:
        paths = [p for p in _images_under(folder) if p not in unreadable]
        return Labelled(paths, [-1] * len(paths), [], emptied)
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths += readable[name]
        labels += [label] * len(readable[name])
    return Labelled(paths, labels, classes, emptied)


def _listing(unreadable: dict[str, str]) -> str:
    """The first ``SKIPPED_FILES_SHOWN`` files with their reasons, and how many more there are."""
    shown = list(unreadable.items())[:SKIPPED_FILES_SHOWN]
    more = len(unreadable) - len(shown)
    return "; ".join(f"{path} ({why})" for path, why in shown) + (f"; and {more} more" if more else "")


def _split(folder: str) -> tuple[str, str | None]:
    """The training folder and the held-out one: ``train/`` and ``val/`` (or ``test/``) when present, else
    ``folder`` and None."""
    train, val, test = (os.path.join(folder, s) for s in ("train", "val", "test"))
    if os.path.isdir(train) and (os.path.isdir(val) or os.path.isdir(test)):
        return train, val if os.path.isdir(val) else test
    return folder, None


def folder_datasets(folder: str, image_size: int, eval_size: int, main_process: bool = True,
                    progress: bool = True) -> Datasets:
    """A folder of images. ``train/`` and ``val/`` (or ``test/``) sub-folders are used as the split when present;
    otherwise class sub-folders give labels and a 70/30 stratified split (DINO trains on the 70 %), and a folder
    without class sub-folders trains on everything with no k-NN evaluation. Evaluation images are resized with
    DINO's 256/224 centre crop.

    Every file is checked first (:func:`find_unreadable`, with a progress bar for large folders if ``progress``).
    The unreadable ones are skipped with one :class:`UnreadableImageWarning` (issued only if ``main_process``: the
    other processes of a distributed run find the same files), and a class sub-folder left without a readable
    image is no class, as one without image files; :class:`DataError` when no readable training image is left.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data: {folder!r} is not a directory")
    train_dir, test_dir = _split(folder)
    train_files = _images_under(train_dir)
    candidates = train_files + (_images_under(test_dir) if test_dir else [])
    unreadable = find_unreadable(candidates, progress=main_process and progress)
    train = _labelled(train_dir, unreadable)
    if not train_files:
        raise DataError(f"--data: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {train_dir!r}")
    if not train.paths:
        raise DataError(f"--data: none of the {len(train_files)} image files under {train_dir!r} can be read: "
                        + _listing({p: unreadable[p] for p in train_files}))
    test = _labelled(test_dir, unreadable) if test_dir else None
    if unreadable and main_process:
        emptied = train.emptied + (test.emptied if test else [])
        warnings.warn(f"--data: skipping {len(unreadable)} of the {len(candidates)} image files under {folder!r}, "
                      f"which cannot be read: {_listing(unreadable)}"
                      + (f". Class folders left out, with no readable image: {', '.join(emptied)}" if emptied else ""),
                      UnreadableImageWarning, stacklevel=2)
    classes = train.classes
    if test is not None:
        if classes and test.classes != classes:
            raise DataError(f"--data: class folders of {test_dir} {test.classes} differ from train/ {classes}")
        train_paths, train_labels, test_paths, test_labels = train.paths, train.labels, test.paths, test.labels
    elif classes:
        try:
            train_index, test_index = stratified_split(np.asarray(train.labels))
        except ValueError as err:  # scikit-learn's: a class of one image, or fewer held-out images than classes
            raise DataError(f"--data: the class folders of {folder!r} cannot be split 70/30 by class "
                            f"({str(err).rstrip('.')}); add images, or give train/ and val/ sub-folders") from err
        train_paths, train_labels = [train.paths[i] for i in train_index], [train.labels[i] for i in train_index]
        test_paths, test_labels = [train.paths[i] for i in test_index], [train.labels[i] for i in test_index]
    else:
        train_paths, train_labels, test_paths, test_labels = train.paths, train.labels, [], []
    train_ds = ImageFileDataset(train_paths, train_labels, image_size)
    if not classes or not test_paths:
        return Datasets(train=train_ds, knn_train=None, knn_test=None, num_classes=0, name=folder)
    crop_fraction = 224 / 256
    knn_train = train_ds.at_size(eval_size, crop_fraction)
    knn_test = ImageFileDataset(test_paths, test_labels, eval_size, crop_fraction)
    return Datasets(train=train_ds, knn_train=knn_train, knn_test=knn_test, num_classes=len(classes), name=folder)


def build_datasets(data: str | None, image_size: int, global_size: int, main_process: bool = True,
                   progress: bool = True) -> Datasets:
    """``data`` None -> digits; else a folder (see :func:`folder_datasets`)."""
    if data is None:
        return digits_datasets(image_size)
    return folder_datasets(data, image_size, global_size, main_process, progress)
