#!/usr/bin/env bash
# On a machine WITH network access: download the wheels that an offline GPU machine lacks into wheelhouse/.
# Defaults match the lent H100/H200 machines (Python 3.12, manylinux x86_64). Their image already holds what ase,
# matscipy and vesin need (numpy, scipy, matplotlib, typing-extensions, packaging; torch, tqdm, pytest, hypothesis
# too), so only these three come along: the versions installed in this environment when there are any (the ones
# the CPU tests ran with), else the newest. wheelhouse/tools/ gets setuptools >= 77, which scripts/gpu_campaign.sh
# installs only where the machine's setuptools is too old to build this package. Every run starts wheelhouse/ afresh
# (two versions of one package stop the whole offline install). Carry it with the device tool: docs/gpu.md.
# Usage: scripts/fetch_gpu_wheels.sh [python-version, default 3.12] [extra requirement ...]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
shift || true
py=${PYTHON:-python3}

pinned() {  # NAME -> NAME==VERSION of this environment, or NAME
  "$py" -c 'import importlib.metadata as m, sys
try: print(f"{sys.argv[1]}=={m.version(sys.argv[1])}")
except m.PackageNotFoundError: print(sys.argv[1])' "$1"
}
requirements=("$(pinned ase)" "$(pinned matscipy)" "$(pinned vesin)" "$@")
target=(--only-binary=:all: --python-version "$version" --implementation cp)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf wheelhouse
mkdir -p wheelhouse/tools
echo "downloading for CPython $version, manylinux x86_64: ${requirements[*]}"
"$py" -m pip download -q --no-deps "${target[@]}" "${platforms[@]}" -d wheelhouse "${requirements[@]}"
"$py" -m pip download -q --no-deps "${target[@]}" -d wheelhouse/tools "setuptools>=77"

"$py" - wheelhouse/*.whl <<'PY'
import re, sys, zipfile

for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        needs = [line.split(":", 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
                 if line.startswith("Requires-Dist:") and "extra ==" not in line]
    names = [re.split(r"[ ;<>=!~\[(]", n)[0] for n in needs]
    print(f"{path.split('/')[-1]}: needs {', '.join(names) or 'nothing'}")
PY
ls -l wheelhouse wheelhouse/tools
du -sh wheelhouse
