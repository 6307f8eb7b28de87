#!/usr/bin/env bash
# On a GPU machine without network access: build against the installed torch (no build isolation), install the
# missing pure-Python/binary wheels from wheelhouse/ (made by scripts/fetch_gpu_wheels.sh), run the CUDA tests,
# then the CUDA tests again under compute-sanitizer memcheck.
#   PYTHON=python3 TORCH_CUDA_ARCH_LIST=9.0 scripts/gpu_tests.sh [extra pytest args]
# The whole time-boxed campaign (tests, sanitizers, benchmarks, one archive): scripts/gpu_campaign.sh, docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [[ -d wheelhouse ]]; then
  "$python" -m pip install --no-index --no-deps --find-links wheelhouse wheelhouse/*.whl
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
export CUDA_HOME GDEQ_EXT_WITH_CUDA=1 GDEQ_EXT_REQUIRE_COMPILED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
build_log=${TMPDIR:-/tmp}/gdeq_ext_build.log
if ! "$python" -m pip install --no-index --no-deps --no-build-isolation -v . >"$build_log" 2>&1; then
  tail -n 60 "$build_log"
  echo "build FAILED (full log: $build_log)" >&2
  exit 1
fi
grep -E '\[gdeq_ext build\]|Successfully' "$build_log" || true   # display only: the build's status is checked above
"$python" -P -c "import gdeq_ext, json; print(json.dumps(gdeq_ext.build_info(), indent=1))"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())"
# -P: do not put the source tree on sys.path, so the installed package (with its compiled kernels) is imported.
# -k "cuda or gpu": every CUDA test is marked cuda; -k matches marker names and test names, so a GPU test that
# lost its marker is still run (a superset of -m cuda).
"$python" -P -m pytest -p no:cacheprovider -ra -k "cuda or gpu" "$@" tests
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
    "$python" -P -m pytest -p no:cacheprovider -q -k "cuda or gpu" -x tests
fi
