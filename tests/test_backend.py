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


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_run_on_their_tensors_device_not_the_current_one():
    """Triton and CUDA launches go to the current device unless guarded: with cuda:0 current, every op on cuda:1
    tensors gives what it gives on the CPU, and cuda:0 is still current afterwards."""
    from conftest import TOLERANCE, rel_error

    def run_ops(device, backend):
        torch.manual_seed(0)  # inputs drawn on the CPU, so every device gets the same values
        q, k, v = (torch.randn(70, 2, 32).to(device).requires_grad_() for _ in range(3))
        cu = torch.tensor([0, 5, 70], dtype=torch.int32).to(device)
        x = torch.randn(6, 3, 8).to(device).requires_grad_()
        student = torch.randn(8, 300).to(device).requires_grad_()
        teacher, center = torch.randn(4, 300).to(device), torch.zeros(300).to(device)
        ema_teacher, ema_student = [torch.randn(1000).to(device)], [torch.randn(1000).to(device)]
        kept = torch.tensor([4, 1]).to(device)
        with dino_kernels.backend(backend):
            attention = dino_kernels.packed_attention(q, k, v, cu, 65)
            gathered = dino_kernels.index_select_cat([x], [kept]).view(2, 3, 8)
            added = dino_kernels.scaled_index_add(x, kept, gathered * 2, alpha=3.0)
            loss = dino_kernels.dino_loss(student, teacher, center)
            grads = torch.autograd.grad(attention.sum() + added.square().sum() + loss, [q, k, v, x, student])
            dino_kernels.ema_(ema_teacher, ema_student, 0.9)
        return [attention, added, loss, *grads, ema_teacher[0]]

    expected = run_ops("cpu", "auto")
    for backend in ("auto", "triton"):
        torch.cuda.set_device(0)
        results = run_ops("cuda:1", backend)
        assert torch.cuda.current_device() == 0
        for got, want in zip(results, expected):
            assert got.device == torch.device("cuda", 1)
            assert rel_error(got.cpu(), want) <= TOLERANCE[torch.float32]
