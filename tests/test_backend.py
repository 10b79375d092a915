import os
import subprocess
import sys

import pytest
import torch

import dino_kernels
from dino_kernels._backend import debug_enabled, resolve


def test_default_is_auto_and_context_restores():
    assert dino_kernels.get_backend() == "auto"
    with dino_kernels.backend("reference"):
        assert dino_kernels.get_backend() == "reference"
        with dino_kernels.backend("triton"):
            assert dino_kernels.get_backend() == "triton"
        assert dino_kernels.get_backend() == "reference"
    assert dino_kernels.get_backend() == "auto"


def test_context_restores_after_exception():
    with pytest.raises(RuntimeError), dino_kernels.backend("reference"):
        raise RuntimeError
    assert dino_kernels.get_backend() == "auto"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown dino_kernels backend 'gpu'"):
        dino_kernels.set_backend("gpu")


def test_resolution_per_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve(cpu, "op") == "cpu"
    assert resolve(cuda, "op") == "cuda"
    with dino_kernels.backend("reference"):
        assert resolve(cuda, "op") == "reference"
    with dino_kernels.backend("triton"):
        assert resolve(cpu, "op") == "triton"
    with dino_kernels.backend("cpu"), pytest.raises(ValueError, match="CPU tensors only"):
        resolve(cuda, "op")
    with dino_kernels.backend("cuda"), pytest.raises(ValueError, match="CUDA tensors only"):
        resolve(cpu, "op")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with dino_kernels.backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve(torch.device("cpu"), "op")


def test_environment_variable_sets_default():
    env = dict(os.environ, DINO_KERNELS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", "import dino_kernels; print(dino_kernels.get_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DINO_KERNELS_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", "import dino_kernels"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown dino_kernels backend 'bogus'" in bad.stderr


def test_debug_mode_switch(monkeypatch):
    monkeypatch.delenv("DINO_KERNELS_DEBUG", raising=False)
    assert not debug_enabled()
    monkeypatch.setenv("DINO_KERNELS_DEBUG", "1")
    assert debug_enabled()
