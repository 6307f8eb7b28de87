#!/usr/bin/env bash
# On a machine WITH network access: download the wheels that an offline GPU machine lacks into wheelhouse/.
# Defaults match the lent H100/H200 machines (Python 3.12, x86_64, torch/cupy/pytest/hypothesis preinstalled).
# Usage: scripts/fetch_gpu_wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p wheelhouse
pip download --no-deps --only-binary=:all: --python-version "$version" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d wheelhouse ase matscipy vesin
ls -l wheelhouse
