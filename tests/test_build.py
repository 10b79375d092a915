"""The compiled extension: loads, reports how it was built, and holds the CUDA code of every requested arch (sm_80
and sm_90 by default) when nvcc was there."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dino_kernels
from dino_kernels import _extension


def test_extension_loads_and_matches_torch():
    info = _extension.build_info()
    assert info, "setup.py did not record _build_info.json: was the package built?"
    assert info["torch_version"] == torch.__version__
    assert _extension.ops().cuda_compiled() == info["cuda_compiled"]


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return shutil.which("cuobjdump") or (str(bundled) if bundled.exists() else None)


def test_cuda_kernels_built_for_every_requested_arch_when_nvcc_present():
    """Every arch of DINO_KERNELS_CUDA_ARCHS at build time (default sm_80 and sm_90; a GPU session may build its own
    arch only) is in the library."""
    info = _extension.build_info()
    if not info.get("nvcc"):
        pytest.skip("nvcc was not found at build time: CPU-only build (CI always has nvcc)")
    assert info["cuda_compiled"] and info["cuda_archs"]
    tool = _cuobjdump()
    assert tool, "no cuobjdump to inspect the extension"
    _extension.ops()  # loads dino_kernels._C (the test may run before anything else did)
    library = Path(dino_kernels._C.__file__)
    listing = subprocess.run([tool, "--list-elf", str(library)], capture_output=True, text=True, check=True).stdout
    for arch in info["cuda_archs"]:
        assert f"sm_{arch}" in listing, listing
    symbols = subprocess.run([tool, "--dump-resource-usage", str(library)], capture_output=True, text=True,
                             check=True).stdout
    assert "ema_kernel" in symbols


def test_missing_extension_gives_the_fix(monkeypatch, tmp_path):
    _extension.ops.cache_clear()
    info = tmp_path / "_build_info.json"
    info.write_text('{"torch_version": "0.0.0-other"}')
    monkeypatch.setattr(_extension, "_BUILD_INFO", info)
    try:
        with pytest.raises(ImportError, match=r"built for torch 0\.0\.0-other.*pip install --no-build-isolation"):
            _extension.ops()
    finally:
        _extension.ops.cache_clear()


def test_aot_harness_compiles_every_triton_kernel_for_sm80_and_sm90(tmp_path):
    """Every declared Triton kernel config compiles for A100 and H100 and fits their shared memory."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, "-m", "dino_kernels._aot", "--json", str(report)], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    results = json.loads(report.read_text())
    kernels = {r["kernel"] for r in results["results"]}
    assert "dino_kernels.ema._ema_kernel" in kernels
    assert {r["arch"] for r in results["results"]} == {"sm_80", "sm_90"}
    assert all(r["ok"] for r in results["results"]) and not results["undeclared"]
