"""Image folders (`dino.data`): unreadable files are skipped before training with one warning, files that fail later
are skipped while loading, every image mode becomes the right RGB, and the CLIs report bad input in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dino.data as data_mod
import dino.train as train_mod
from dino import eval_knn, visualize
from dino.data import DataError, ImageFileDataset, UnreadableImageWarning, build_datasets, read_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _uniform(mode: str, value, size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new(mode, size, value)


def _palette_with_transparency() -> Image.Image:
    """Index 0 (red in the palette) is transparent, index 1 is green."""
    image = Image.new("P", (12, 10), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 12, 5))
    return image


def _first_two_thirds(image_format: str) -> bytes:
    """A noise image encoded as ``image_format``, cut short as an interrupted download is."""
    buffer = BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buffer, image_format)
    encoded = buffer.getvalue()
    return encoded[: len(encoded) * 2 // 3]


# Every readable file of the test folder, and the RGB every pixel of it must become (uniform images, so that the
# resize keeps the value); the tolerance covers JPEG and bicubic rounding.
GOOD = {
    "gray.png": (lambda p: _uniform("L", 77).save(p), (77, 77, 77)),
    "bilevel.png": (lambda p: _uniform("1", 1).save(p), (255, 255, 255)),
    "rgb.jpg": (lambda p: _uniform("RGB", (200, 40, 90)).save(p, quality=100), (200, 40, 90)),
    # CMYK (0, 128, 255, 64): R = 255 (1 - C)(1 - K) etc.
    "cmyk.jpg": (lambda p: _uniform("CMYK", (0, 128, 255, 64)).save(p, quality=100), (191, 95, 0)),
    # 16-bit gray 32896 of 65535 is 128 of 255 (PIL's own conversion clips it to 255).
    "gray16.png": (lambda p: Image.fromarray(np.full((10, 12), 32896, dtype=np.uint16)).save(p), (128, 128, 128)),
    "rgba_clear.png": (lambda p: _uniform("RGBA", (10, 20, 30, 0)).save(p), (255, 255, 255)),
    # alpha 128 over white: c * 128/255 + 255 * 127/255
    "rgba_half.png": (lambda p: _uniform("RGBA", (200, 100, 0, 128)).save(p), (227, 177, 127)),
    "la.png": (lambda p: _uniform("LA", (50, 255)).save(p), (50, 50, 50)),
    "tiny8.png": (lambda p: _uniform("RGB", (1, 2, 3), (8, 8)).save(p), (1, 2, 3)),
}
BAD = {
    "broken.png": lambda p: open(p, "wb").write(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4),
    "empty.jpg": lambda p: open(p, "wb").close(),
    "notes.jpg": lambda p: open(p, "w").write("<html>a web page saved as .jpg</html>"),
    "noise.gif": lambda p: open(p, "wb").write(np.random.default_rng(2).bytes(300)),
    # cut-short downloads: the PNG fails verify(); the JPEG still opens, lacks its end marker and fails decoding
    "truncated.png": lambda p: open(p, "wb").write(_first_two_thirds("PNG")),
    "truncated.jpg": lambda p: open(p, "wb").write(_first_two_thirds("JPEG")),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A flat folder of every good and bad kind of file, plus a text file that is not an image candidate."""
    folder = tmp_path_factory.mktemp("zoo")
    for name, (write, _) in GOOD.items():
        write(str(folder / name))
    for name, write in BAD.items():
        write(str(folder / name))
    (folder / "README.txt").write_text("not an image")
    _palette_with_transparency().save(str(folder / "palette.png"), transparency=0)
    return folder


def _build_quietly(folder, **kwargs):
    with pytest.warns(UnreadableImageWarning) as record:
        data = build_datasets(str(folder), image_size=16, global_size=16, **kwargs)
    return data, [w for w in record if issubclass(w.category, UnreadableImageWarning)]


def test_unreadable_files_are_skipped_with_one_warning(zoo):
    data, record = _build_quietly(zoo)
    assert len(record) == 1
    message = str(record[0].message)
    n_bad, n_files = len(BAD), len(BAD) + len(GOOD) + 1  # + palette.png; README.txt is no candidate
    assert f"skipping {n_bad} of the {n_files} image files" in message
    shown = sorted(BAD)[: data_mod.SKIPPED_FILES_SHOWN]
    for name in shown:
        assert str(zoo / name) in message
    assert f"and {n_bad - len(shown)} more" in message
    assert "README.txt" not in message
    assert sorted(os.path.basename(p) for p in data.train.paths) == sorted([*GOOD, "palette.png"])
    assert data.knn_train is None and set(data.train.labels) == {-1}
    # The reasons name the failure: PIL cannot identify the foreign files, the truncated ones fail reading.
    assert f"{zoo / 'notes.jpg'} (not an image file PIL can identify)" in message
    assert "truncated" in message.lower()


def test_every_image_mode_becomes_the_expected_rgb(zoo):
    data, _ = _build_quietly(zoo)
    expected = {name: rgb for name, (_, rgb) in GOOD.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every file that passed the check loads without a warning
        items = {os.path.basename(p): data.train[i][0] for i, p in enumerate(data.train.paths)}
    for name, rgb in expected.items():
        image = items[name]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16), name
        tolerance = 2 if name.endswith(".jpg") else 1
        diff = (image.int() - torch.tensor(rgb).view(3, 1, 1)).abs().max().item()
        assert diff <= tolerance, (name, image[:, 0, 0].tolist(), rgb)
    palette = items["palette.png"]  # top half green (index 1), bottom half transparent red -> white
    assert palette[:, 2, 8].tolist() == [0, 255, 0] and palette[:, 13, 8].tolist() == [255, 255, 255]


def test_16_and_32_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    expected = [0, 1, 4, 128, 255]  # round(v * 255 / 65535)
    Image.fromarray(levels).save(str(tmp_path / "g16.png"))
    read = read_image(str(tmp_path / "g16.png"))
    assert np.asarray(read)[0, :, 0].tolist() == expected and np.asarray(read).shape == (1, 5, 3)
    as_int32 = Image.fromarray(levels.astype(np.int32))
    assert as_int32.mode == "I"
    assert data_mod.to_uint8_tensor(as_int32)[0, 0].tolist() == expected


def test_non_main_process_skips_without_warning(zoo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = build_datasets(str(zoo), image_size=16, global_size=16, main_process=False)
    assert len(data.train) == len(GOOD) + 1


def test_file_corrupted_after_the_check_is_skipped_while_loading(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(5):
        _uniform("RGB", (40 * i, 0, 0)).save(str(folder / f"{i}.png"))
    data = build_datasets(str(folder), image_size=8, global_size=8)
    dataset = data.train
    (folder / "2.png").write_bytes(b"garbage")
    (folder / "4.png").write_bytes(b"")
    with pytest.warns(UnreadableImageWarning, match="2.png") as record:
        image, label = dataset[2]
    assert len(record) == 1 and "next readable image" in str(record[0].message)
    assert torch.equal(image, dataset[3][0])  # the next file takes its place
    with pytest.warns(UnreadableImageWarning, match="4.png"):
        assert torch.equal(dataset[4][0], dataset[0][0])  # wraps around to the first file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later epochs pass over the files silently
        assert torch.equal(dataset[2][0], dataset[3][0]) and torch.equal(dataset[4][0], dataset[0][0])
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="none of the 5 images"):
            dataset[0]


def test_dataloader_workers_share_the_record_of_unreadable_files(tmp_path):
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.png"))
        _uniform("RGB", (10 * i, 0, 0)).save(paths[-1])
    dataset = ImageFileDataset(paths, list(range(8)), size=8)
    (tmp_path / "3.png").write_bytes(b"garbage")
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    for _ in range(2):
        batches = list(loader)
        assert [b[0].shape for b in batches] == [(4, 3, 8, 8)] * 2  # batches keep their size
        assert batches[0][1].tolist() == [0, 1, 2, 4]  # file 4 took the place of file 3
        assert batches[0][0][3, 0, 0, 0].item() == 40
    assert dataset.failed.tolist() == [i == 3 for i in range(8)]  # written by a worker, seen here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset[3][1] == 4


def test_class_folder_without_readable_images_is_left_out(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(4):
            _uniform("RGB", (i, 0, 0)).save(str(tmp_path / name / f"{i}.png"))
    (tmp_path / "eel").mkdir()
    (tmp_path / "eel" / "0.jpg").write_bytes(b"")
    (tmp_path / "eel" / "1.jpg").write_bytes(b"html")
    data, record = _build_quietly(tmp_path)
    assert len(record) == 1 and f"Class folders left out, with no readable image: {tmp_path / 'eel'}" in str(
        record[0].message)
    assert data.num_classes == 2 and len(data.train) + len(data.knn_test) == 8
    assert set(data.train.labels) == {0, 1}


def test_no_readable_images_is_one_clear_error(tmp_path):
    (tmp_path / "bad").mkdir()
    for name, write in BAD.items():
        write(str(tmp_path / "bad" / name))
    with pytest.raises(DataError, match=f"none of the {len(BAD)} image files under .* can be read: .*broken.png"):
        build_datasets(str(tmp_path / "bad"), 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images .* found under"):
        build_datasets(str(tmp_path / "empty"), 16, 16)
    for split in ("train", "val"):
        (tmp_path / "split" / split / "a").mkdir(parents=True)
    (tmp_path / "split" / "train" / "a" / "0.png").write_bytes(b"")
    _uniform("L", 3).save(str(tmp_path / "split" / "val" / "a" / "0.png"))
    with pytest.raises(DataError, match="none of the 1 image files under .*train' can be read"):
        build_datasets(str(tmp_path / "split"), 16, 16)


def test_class_too_small_to_split_is_a_data_error(tmp_path):
    for name, n in (("a", 5), ("b", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            _uniform("L", i).save(str(tmp_path / name / f"{i}.png"))
    with pytest.raises(DataError, match="cannot be split 70/30 by class .*train/ and val/"):
        build_datasets(str(tmp_path), 16, 16)


def test_progress_bar_only_for_large_folders(tmp_path, monkeypatch, capsys):
    for i in range(4):
        _uniform("L", i).save(str(tmp_path / f"{i}.png"))
    build_datasets(str(tmp_path), 8, 8)
    assert "checking images" not in capsys.readouterr().err
    monkeypatch.setattr(data_mod, "CHECK_PROGRESS_MIN_FILES", 4)
    build_datasets(str(tmp_path), 8, 8, progress=False)
    build_datasets(str(tmp_path), 8, 8, main_process=False)
    assert "checking images" not in capsys.readouterr().err
    build_datasets(str(tmp_path), 8, 8)
    captured = capsys.readouterr()
    assert "checking images" in captured.err and "4/4" in captured.err and captured.out == ""


# ------------------------------------------------------------------------------------------- CLI errors
def _one_error_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_train_cli_errors_are_one_line_and_debug_shows_them(tmp_path, capsys):
    assert train_mod.main(["--data", str(tmp_path / "missing"), "--no-progress"]) == 2
    _one_error_line(capsys, "missing", "is not a directory")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        train_mod.main(["--data", str(tmp_path / "missing"), "--debug"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    assert train_mod.main(["--data", str(tmp_path / "bad")]) == 2
    _one_error_line(capsys, "none of the 1 image files", "x.png")
    assert train_mod.main(["--preset", "cpu-tiny", "--batch-size", "5000", "--device", "cpu"]) == 2
    _one_error_line(capsys, "batch_size=5000", "lower --batch-size")


def test_train_cli_reports_an_unusable_output_dir_in_one_line(tmp_path, capsys):
    for i in range(4):
        _uniform("L", i).save(str(tmp_path / f"{i}.png"))
    (tmp_path / "file").write_text("")
    args = ["--preset", "cpu-tiny", "--data", str(tmp_path), "--batch-size", "2", "--epochs", "1", "--device", "cpu",
            "--embed-dim", "16", "--depth", "1", "--num-heads", "1", "--num-workers", "0", "--no-progress",
            "--output-dir", str(tmp_path / "file" / "run")]
    assert train_mod.main(args) == 2
    _one_error_line(capsys, "Not a directory", str(tmp_path / "file" / "run"))


def test_bad_option_values_are_argparse_errors(capsys):
    for argv in (["--device", "tpu9"], ["--device", "cuda:999"]):
        with pytest.raises(SystemExit) as exit_info:
            train_mod.main(argv)
        assert exit_info.value.code == 2
        assert "error: device " in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(SystemExit):
        eval_knn.main(["--checkpoint", "x", "--k", "0"])
    assert "error: --k must be >= 1" in capsys.readouterr().err


def test_eval_knn_and_visualize_errors_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert eval_knn.main(["--checkpoint", missing, "--device", "cpu"]) == 2
    _one_error_line(capsys, "does not exist")
    assert visualize.main(["--checkpoint", missing]) == 2
    _one_error_line(capsys, "does not exist")
    from dino.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        visualize.main(["--checkpoint", missing, "--debug"])


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_missing_data_folder_prints_one_line_from_the_shell():
    command = [sys.executable, "-m", "dino.train", "--data", "/no/such/dir"]
    result = subprocess.run(command, capture_output=True, text=True, env=_cli_env(), cwd=REPO, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --data: '/no/such/dir' is not a directory\n"
    result = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=_cli_env(), cwd=REPO,
                            timeout=300)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "FileNotFoundError" in result.stderr
