"""Build of the `dino_kernels._C` extension.

One shared library from `csrc/`:
- every `csrc/*.cpp` (C++ CPU kernels with OpenMP, op registration) is always built against the installed torch;
- every `csrc/*.cu` is compiled by nvcc whenever nvcc is found, with only CUDA headers, for sm_80 and sm_90
  (+ PTX for newer GPUs), and linked with the static CUDA runtime. This works with the CPU torch wheel too, so
  CPU-only machines prove that the CUDA sources compile and link; the kernels run on GPU machines.

Knobs: MAX_JOBS (parallel compile jobs), DINO_KERNELS_CUDA_ARCHS (default "80;90"), DINO_KERNELS_SKIP_CUDA=1.
Install with `pip install --no-build-isolation -e .` so that the build uses (and never replaces) your torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - exercised only on broken machines
    sys.exit(
        "dino-kernels needs an installed PyTorch (>= 2.11) to build its extension.\n"
        "Install torch first (e.g. `pip install torch`), then `pip install --no-build-isolation -e .`."
    )


def _require_cxx_compiler() -> None:
    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler.split()[0]):
        sys.exit(
            "dino-kernels needs a C++ compiler (C++17, or C++20 for torch >= 2.13) to build its CPU kernels, and "
            f"`{compiler}` was not found.\n"
            "Install one (Debian/Ubuntu: `apt-get install g++`; conda: `conda install gxx`) or set CXX, then rerun "
            "`pip install --no-build-isolation -e .`."
        )


def _find_nvcc() -> str | None:
    if os.environ.get("DINO_KERNELS_SKIP_CUDA") == "1":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _max_jobs() -> int:
    return max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))


def _cuda_archs() -> list[str]:
    archs = os.environ.get("DINO_KERNELS_CUDA_ARCHS", "80;90")
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def _cuda_lib_dir(nvcc: str) -> Path:
    """The folder of the static CUDA runtime: next to the real nvcc binary (a wrapper script on the PATH may live
    elsewhere), else under CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    homes = [Path(nvcc).resolve().parent.parent]
    homes += [Path(h) for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if h]
    for home in homes:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (home / sub / "libcudart_static.a").exists():
                return home / sub
    raise RuntimeError(f"nvcc found at {nvcc} but no libcudart_static.a under {', '.join(map(str, homes))}; set "
                       "CUDA_HOME to the CUDA toolkit, or DINO_KERNELS_SKIP_CUDA=1 for a build without CUDA C++ "
                       "kernels (the Triton kernels still run on GPUs)")


class BuildWithNvcc(BuildExtension):
    """torch's BuildExtension for the C++ sources, plus an nvcc step for `csrc/*.cu`.

    The .cu files include only CUDA headers, so they compile without a CUDA build of torch; the C++ side
    calls them through plain `extern "C"` launchers.
    """

    def build_extension(self, ext):
        nvcc = _find_nvcc()
        cu_sources = sorted(CSRC.glob("*.cu"))
        archs = _cuda_archs()
        if nvcc and cu_sources:
            objects = self._compile_cuda(nvcc, cu_sources, archs)
            ext.extra_objects += [str(o) for o in objects]
            ext.library_dirs.append(str(_cuda_lib_dir(nvcc)))
            ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
            ext.extra_compile_args["cxx"].append("-DDINO_KERNELS_WITH_CUDA")
        elif not nvcc:
            print("dino-kernels: nvcc not found, building the CPU kernels only (CUDA kernels skipped).")
        super().build_extension(ext)
        info = {
            "torch_version": torch.__version__,
            "cuda_compiled": bool(nvcc and cu_sources),
            "cuda_archs": archs if nvcc else [],
            "nvcc": nvcc,
        }
        (ROOT / "dino_kernels" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")

    def _compile_cuda(self, nvcc: str, sources: list[Path], archs: list[str]) -> list[Path]:
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        flags = ["-O3", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", *gencode]  # nvcc 12+: C++17 by default

        def compile_one(src: Path) -> Path:
            obj = out_dir / (src.stem + ".o")
            if obj.exists() and obj.stat().st_mtime > max(src.stat().st_mtime, _newest_header()):
                return obj
            cmd = [nvcc, *flags, "-c", str(src), "-o", str(obj)]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            return obj

        with ThreadPoolExecutor(_max_jobs()) as pool:
            return list(pool.map(compile_one, sources))


def _newest_header() -> float:
    return max((h.stat().st_mtime for h in CSRC.glob("*.h")), default=0.0)


_require_cxx_compiler()
os.environ.setdefault("MAX_JOBS", str(_max_jobs()))

extension = CppExtension(
    name="dino_kernels._C",
    sources=sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")),
    # No -std flag: torch.utils.cpp_extension passes the standard the installed torch's headers need (C++17 for
    # torch 2.11, C++20 for 2.13 and later); forcing one would break the build on the other side of that line.
    extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[extension], cmdclass={"build_ext": BuildWithNvcc.with_options(use_ninja=True)})
