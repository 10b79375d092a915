"""Checkpoints that resume a run exactly, written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds plain types and tensors only (the config as a dict, RNG states as tensors/lists), so loading never
unpickles arbitrary objects. Writes go to a temporary file in the same directory, are flushed to disk and then
renamed over the previous checkpoint: a crash mid-write leaves the previous checkpoint intact, never a torn file.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

FORMAT = "dino-train-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pth"
TEMPORARY_SUFFIX = ".tmp"  # of the file a checkpoint is written to before it is renamed over the previous one
REQUIRED = ("format", "version", "config", "epoch", "step", "student", "teacher", "optimizer", "scaler", "center",
            "rng", "history")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run."""


def checkpoint_path(path: str) -> str:
    """A run directory means its ``checkpoint.pth``."""
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states as tensors and plain lists."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same directory, fsync, rename over ``path``,
    fsync of the directory. A process killed at any moment leaves the previous checkpoint whole (and at worst its
    own temporary file, which the next successful write removes)."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = f".{name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMPORARY_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)  # makes the rename itself survive a power loss
    for entry in os.scandir(directory):  # left by writers that were killed mid-write
        if entry.name.startswith(prefix) and entry.name.endswith(TEMPORARY_SUFFIX):
            os.remove(entry.path)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and sanity-check a checkpoint (file or run directory); raise :class:`CheckpointError` with the reason."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        # torch's own message for a foreign pickle suggests weights_only=False, which is the wrong advice here.
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(err).__name__}); it is corrupt, truncated "
                              "or not a dino.train checkpoint. It was left untouched.") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a dino.train checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {state.get('version')}, this code reads "
                              f"version {VERSION}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}; it is incomplete")
    return state


def check_compatible(saved: dict[str, Any], requested: dict[str, Any], runtime_fields: frozenset[str]) -> None:
    """Options given on the command line of a resumed run must match the checkpoint's recipe."""
    conflicts = {k: (saved.get(k), v) for k, v in requested.items()
                 if k not in runtime_fields and not (k == "preset" and v == "auto") and _norm(saved.get(k)) != _norm(v)}
    if conflicts:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in sorted(conflicts.items()))
        raise CheckpointError(f"cannot resume with a different recipe ({detail}); only {sorted(runtime_fields)} may "
                              "change on --resume")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a clear error when the architecture differs."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint's {what} does not fit this model: {err}") from err
