"""Crashes of `python -m dino.train`: SIGKILL in the middle of an epoch, once or twice, then ``--resume``; SIGKILL
while the checkpoint is being written. Every resumed run must reproduce the uninterrupted run bit for bit on CPU.

The runs go through the real command line in a subprocess with the preset's default DataLoader worker count (the
workers are what made resuming inexact), on a small folder of digit images so that an epoch takes about a second.
A run is killed mid-epoch by watching its progress bar: once the bar of epoch N shows a finished step with steps
still to go, the process gets SIGKILL, so the last checkpoint is the one of epoch N - 1 and epoch N is redone.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dino.checkpoint import FILENAME, load_checkpoint
from dino.config import resolve_config
from dino.data import build_datasets, load_digits_arrays
from dino.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4
IMAGES_PER_CLASS = 30  # 300 images: 210 train (13 steps of 16 per epoch), 90 for the k-NN evaluation
# A tiny ViT on the cpu-tiny preset, with a DataLoader worker (the preset has none: its digits are in memory).
TINY_ARGS = ["--preset", "cpu-tiny", "--device", "cpu", "--num-workers", "1", "--embed-dim", "32", "--depth", "2",
             "--num-heads", "2", "--batch-size", "16", "--n-local-crops", "2", "--out-dim", "64",
             "--head-hidden-dim", "64", "--head-bottleneck-dim", "32", "--epochs", str(EPOCHS), "--warmup-epochs", "1",
             "--eval-every", "2", "--drop-path-rate", "0.2"]
# Metrics that measure the machine, not the run.
TIMING_METRICS = {"img_per_s", "epoch_seconds", "peak_mem_mb"}
RUN_TIMEOUT_S = 300


def cli_env() -> dict[str, str]:
    # The CLI runs as a user's shell runs it: without the test suite's Triton interpreter. Output unbuffered and the
    # progress bar redrawn at every step (tqdm's environment defaults), so that a kill lands early in its epoch, also
    # on a fast machine; one intra-op thread, because on a busy machine two threads that wait for each other make
    # these tiny runs several times slower (every run of a comparison uses the same setting).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0",
               TQDM_MINITERS="1", OMP_NUM_THREADS="1")
    return env


def run_cli(args: list[str], python_code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m dino.train ARGS`` to the end (or ``python -c CODE ARGS``, CODE running the same CLI)."""
    cmd = [sys.executable, "-c", python_code, *args] if python_code else [sys.executable, "-m", "dino.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def kill_inside_epoch(args: list[str], epoch: int) -> str:
    """Run the CLI and SIGKILL it as soon as its progress bar shows epoch ``epoch`` (1-based) part-way done; returns
    the output up to the kill."""
    bar = re.compile(rf"epoch {epoch}/{EPOCHS}:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) ")
    proc = subprocess.Popen([sys.executable, "-m", "dino.train", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = b""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            output += chunk
            text = output.decode(errors="replace")
            if not chunk:
                pytest.fail(f"the run ended or hung before it was inside epoch {epoch}:\n{text[-3000:]}")
            if any(0 < int(done) < int(total) for done, total in bar.findall(text)):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return text


def resume(run_dir: str) -> subprocess.CompletedProcess:
    done = run_cli(["--resume", run_dir])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in records]


def assert_same_run(expected_dir: str, actual_dir: str) -> None:
    """Every metric of every epoch equal (JSON floats round-trip exactly), and the final weights, optimizer state and
    center bit for bit."""
    expected = metrics(expected_dir)
    assert len(expected) == EPOCHS and expected[1]["knn_top1"] is not None
    assert metrics(actual_dir) == expected
    a, b = load_checkpoint(expected_dir), load_checkpoint(actual_dir)
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert torch.equal(a["center"], b["center"])
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name}"


def checkpoint_epoch(run_dir: str) -> int:
    return int(load_checkpoint(run_dir)["epoch"])


@pytest.fixture(scope="module")
def kornia():
    """For the tests that train: kornia, or a skip where it is not installed."""
    return pytest.importorskip("kornia", reason="the multi-crop augmentation needs kornia (pip install kornia)")


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> str:
    """A folder of digit PNGs in class sub-folders (decoded by the DataLoader workers)."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = load_digits_arrays()
    for digit in range(10):
        os.makedirs(root / str(digit))
        for i, index in enumerate((labels == digit).nonzero()[0][:IMAGES_PER_CLASS]):
            Image.fromarray(images[index], mode="L").save(root / str(digit) / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def straight_run(digits_folder, tmp_path_factory, kornia) -> str:
    """The uninterrupted run every crashed-and-resumed run is compared with."""
    run_dir = str(tmp_path_factory.mktemp("straight") / "run")
    done = run_cli([*TINY_ARGS, "--data", digits_folder, "--output-dir", run_dir])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(run_dir, "config.json")) as f:
        workers = json.load(f)["num_workers"]
    assert workers == 1  # the runs below use a DataLoader worker
    return run_dir


def test_sigkill_mid_epoch_then_resume_is_exact(straight_run, digits_folder, tmp_path):
    run_dir = str(tmp_path / "run")
    kill_inside_epoch([*TINY_ARGS, "--data", digits_folder, "--output-dir", run_dir], epoch=3)
    assert checkpoint_epoch(run_dir) == 2  # killed inside epoch 3, not between epochs
    done = resume(run_dir)
    assert "resumed at epoch 3" in done.stdout
    assert_same_run(straight_run, run_dir)


def test_two_sigkills_then_resume_is_exact(straight_run, digits_folder, tmp_path):
    run_dir = str(tmp_path / "run")
    kill_inside_epoch([*TINY_ARGS, "--data", digits_folder, "--output-dir", run_dir], epoch=2)
    assert checkpoint_epoch(run_dir) == 1
    kill_inside_epoch(["--resume", run_dir], epoch=4)
    assert checkpoint_epoch(run_dir) == 3
    resume(run_dir)
    assert_same_run(straight_run, run_dir)


# Runs the CLI with torch.save replaced by a writer that, at the checkpoint of epoch 2, writes the first half of the
# serialized checkpoint to the file, flushes it to disk and then SIGKILLs its own process.
DIE_WHILE_WRITING = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    import dino.checkpoint
    from dino.train import main

    real_save = torch.save

    def save_then_die_half_way(obj, f):
        if obj["epoch"] < 2:
            return real_save(obj, f)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    dino.checkpoint.torch.save = save_then_die_half_way
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_while_writing_the_checkpoint_keeps_the_previous_one(straight_run, digits_folder, tmp_path):
    run_dir = str(tmp_path / "run")
    died = run_cli([*TINY_ARGS, "--data", digits_folder, "--output-dir", run_dir], python_code=DIE_WHILE_WRITING)
    assert died.returncode == -signal.SIGKILL, died.stdout[-3000:] + died.stderr[-3000:]
    assert "epoch 2/4: loss" in died.stdout  # it died writing the checkpoint of epoch 2
    torn = [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    assert len(torn) == 1 and os.path.getsize(os.path.join(run_dir, torn[0])) > 0  # the half-written file
    assert checkpoint_epoch(run_dir) == 1  # the previous checkpoint, intact
    resume(run_dir)
    assert_same_run(straight_run, run_dir)
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(straight_run))  # the torn temporary file is gone
    assert FILENAME in os.listdir(run_dir)


@pytest.mark.usefixtures("kornia")
@pytest.mark.parametrize("workers", [0, 1])
def test_loader_and_evaluation_draw_nothing_from_the_global_rng(workers, digits_folder, tmp_path):
    """The process-global RNG feeds the training step only (augmentation, stochastic depth) and is checkpointed at
    each epoch end. Creating the loader's iterator (and its workers) and the k-NN evaluation, which runs on
    evaluation epochs only (--eval-every may change on --resume), must leave it untouched."""
    values = {"preset": "cpu-tiny", "device": "cpu", "data": digits_folder, "embed_dim": 32, "depth": 2,
              "num_heads": 2, "batch_size": 16, "n_local_crops": 2, "out_dim": 64, "head_hidden_dim": 64,
              "head_bottleneck_dim": 32, "num_workers": workers, "progress": False, "output_dir": str(tmp_path / "run")}
    trainer = Trainer(resolve_config(values), values)
    assert trainer.loader.num_workers == workers
    before = torch.get_rng_state()
    next(iter(trainer.loader))
    assert trainer.evaluate() is not None
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("source", ["digits", "folder"])
def test_datasets_draw_no_random_numbers(source, digits_folder):
    """What lets the DataLoader keep persistent workers across epochs and still resume exactly: an item is a function
    of its index alone, and reading it leaves every RNG of the worker where it was."""
    dataset = build_datasets(None if source == "digits" else digits_folder, 32, 12).train
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    images = [dataset[i][0] for i in (0, 5, 0)]
    assert torch.get_rng_state().equal(states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    assert images[0].equal(images[2]) and not images[0].equal(images[1])
