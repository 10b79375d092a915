#!/usr/bin/env bash
# Download the wheels that the GPU machines' image lacks into .whl/ (git-ignored), on a machine with network.
# They travel with the working tree (device tool: carry [".whl"]), and benchmarks/gpu_session.sh installs them with
# `pip install --no-index --no-deps --target` before anything imports them. Missing there: kornia and its compiled
# companion kornia_rs (the trainer's augmentations), and lightly (the lightly compat tests; pure Python, and the parts
# they import need nothing beyond the image's torch, torchvision, numpy and tqdm).
#
#   bash benchmarks/gpu_wheels.sh                  # for the GPU image: CPython 3.12, manylinux x86_64
#   bash benchmarks/gpu_wheels.sh --this-python    # for this interpreter (gpu_session.sh --dry-run in CI)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# The versions CI tests with today; a newer kornia must still accept the image's torch 2.11 (kornia needs >= 2.5.1).
packages=("kornia==0.9.0" "kornia_rs==0.2.0" "lightly==1.6.0")
if [ "${1:-}" = "--this-python" ]; then
  target=()
else
  target=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fi
rm -rf .whl && mkdir -p .whl
$py -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d .whl "${packages[@]}"
ls -l .whl
