#!/usr/bin/env bash
# Build csrc/ with CMake against the installed libtorch and run the C++ smoke test with ctest.
# Usage: scripts/cmake_smoke.sh [build-dir]   (CUDA kernels too when GDEQ_EXT_WITH_CUDA=1 and CUDA_HOME is set)
set -euo pipefail
build_dir=${1:-build-cmake}
python=${PYTHON:-python}
prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
torch_cuda=$("$python" -c 'import torch; print(torch.version.cuda or "")')
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
if [[ -n "$torch_cuda" ]]; then
  # A CUDA build of torch makes find_package(Torch) look for the toolkit even for CPU-only kernels;
  # torch's pip wheels ship nvrtc in the nvidia-cuda-nvrtc wheel rather than in the toolkit.
  : "${CUDA_HOME:?a CUDA build of torch needs CUDA_HOME pointing at the CUDA toolkit folder}"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # never probe for a GPU
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME")
  nvrtc=$("$python" - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
hits = [p for r in roots for p in glob.glob(os.path.join(r, "**", "libnvrtc.so*"), recursive=True) if "builtins" not in p and ".alt." not in p]
print(sorted(hits)[0] if hits else "")
PY
)
  if [[ -n "$nvrtc" ]]; then args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc"); fi
  if [[ "${GDEQ_EXT_WITH_CUDA:-0}" == "1" ]]; then
    args+=(-DGDEQ_EXT_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}")
  fi
fi
echo "[cmake_smoke] cmake ${args[*]}"
cmake -S . -B "$build_dir" "${args[@]}"
cmake --build "$build_dir" -j "${MAX_JOBS:-2}"
ctest --test-dir "$build_dir" --output-on-failure
