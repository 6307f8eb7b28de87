#!/usr/bin/env bash
# The GPU campaign: one command that builds, verifies and measures every CUDA kernel in the minutes a GPU is lent
# (docs/gpu.md says how to run it with the device tool and what each step checks).
#
#   scripts/gpu_campaign.sh                 # on the GPU machine (no network): about 8 minutes
#   scripts/gpu_campaign.sh --dry-run       # on a CPU: tiny sizes, CUDA steps skipped with a reason (CI runs it)
#   scripts/gpu_campaign.sh --prepare       # here, with network: wheelhouse/ and benchmarks/results/cache/ to carry
#
# Options: --budget SECONDS (whole campaign, default 470; dry run 300), --only a,b / --skip a,b (step names below),
#          --out DIR (default $OUT, else ./gpu_campaign_out), --work DIR (scratch; default a fresh temporary folder),
#          --verbose (stream every step's log, not only the status lines).
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (all cores), CUDA_HOME (from nvcc),
#          SANITIZER_FILTER (default "--kernel-name kns=gdeq_ext": sanitize the project's kernels only; "" for all).
#
# Every step runs in its own `timeout` box, cut to what is left of the budget, and prints one status line
#   [campaign] step NAME: ok|FAILED rc|TIMEOUT|SKIPPED reason (N s)
# Results (JSON/MD/PNG, logs, junit XML) accumulate in WORK/gpu_campaign/, which is tarred into
# OUT/gpu_campaign.tar.gz after every step, next to OUT/gpu_campaign_summary.txt: a campaign cut short leaves
# what it finished. scripts/gpu_collect.sh ARCHIVE unpacks it into benchmarks/results/ and prints the goals.
# Steps: env wheels build pytest memcheck racecheck kernels neighbors memory nccl memory_t800 basins goals
#        (collect: the dry run only).
set -uo pipefail   # no -e: a failing step is recorded and the campaign goes on

SELF=$(readlink -f "$0")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
STEPS=(env wheels build pytest memcheck racecheck kernels neighbors memory nccl throughput memory_t800 basins goals collect)

# The reduced basin run (shared by --prepare, which caches its data set, and the basins step).
BASIN_DATA=(--n-train 8 --n-val 0 --n-test 16 --sizes 64 --data-seed 0)
BASE_MODEL_NAME=base_mlip_float32.pt   # benchmarks/memory.py's cached base MLIP (quick fit), reused by basins

say() { printf '[campaign] %s\n' "$*"; }
skip() { printf '%s\n' "$*" >"$LOGS/$STEP.skip"; echo "SKIPPED: $*"; exit 77; }

# The flags the campaign passes to a script must exist in its argparse (the dry run's check of GPU-only steps).
check_flags() {
  local script=$1 flag missing=(); shift
  for flag in "$@"; do grep -q -- "\"$flag\"" "$REPO/$script" || missing+=("$flag"); done
  if ((${#missing[@]})); then echo "$script lacks the flags: ${missing[*]}"; return 1; fi
  echo "$script has every flag the campaign passes: $*"
}

find_sanitizer() {
  command -v compute-sanitizer && return
  local c
  for c in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
    [[ -n $c && -x $c/bin/compute-sanitizer ]] && { echo "$c/bin/compute-sanitizer"; return; }
  done
  return 1
}

# ------------------------------------------------------------------------------------------------------ steps
# Each runs in a child process (`timeout ... gpu_campaign.sh __step NAME`), its output in LOGS/NAME.log.
# Exit 0: ok; 77: skipped (reason in LOGS/NAME.skip); anything else: failed.

step_env() {
  date -u '+%Y-%m-%dT%H:%M:%SZ'
  uname -a
  echo "cores: $(nproc)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "no nvidia-smi"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  if san=$(find_sanitizer); then "$san" --version | tail -n 1; "$san" --help 2>&1 | grep -A2 -- '--kernel-name ' || true; fi
  "$PY" -P - "$R/env.json" "$R/.cuda" <<'PY'
import json, os, platform, sys
import torch

info = {
    "python": platform.python_version(),
    "executable": sys.executable,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "cpu_count": os.cpu_count(),
    "dry_run": os.environ.get("DRY") == "1",
}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count)
json.dump(info, open(sys.argv[1], "w"), indent=1)
open(sys.argv[2], "w").write("1" if torch.cuda.is_available() else "0")
print(json.dumps(info))
PY
}

step_wheels() {
  [[ $DRY == 1 ]] && skip "dry run: uses the packages of this environment"
  shopt -s nullglob
  local wheels=("$REPO"/wheelhouse/*.whl) tools=("$REPO"/wheelhouse/tools/*.whl) vesin=() others=() w
  for w in "${wheels[@]}"; do if [[ $(basename "$w") == vesin-* ]]; then vesin+=("$w"); else others+=("$w"); fi; done
  local install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target)
  if ((${#others[@]})); then "${install[@]}" "$SITE" "${others[@]}" || return 1; fi
  # vesin in a folder of its own: the neighbors step drops it from PYTHONPATH if its GPU path crashes.
  if ((${#vesin[@]})); then "${install[@]}" "$SITE_VESIN" "${vesin[@]}" || return 1; fi
  # setuptools >= 77 builds this package (pyproject's license string); carried in wheelhouse/tools/ for an older one.
  if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    ((${#tools[@]})) || { echo "setuptools < 77 and no wheelhouse/tools/ wheel: the build will fail"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" "${tools[@]}" || return 1
  fi
  "$PY" -P - <<'PY'
import importlib
import sys

missing = []
for name in ("ase", "matscipy", "vesin", "setuptools"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except ImportError as error:
        missing.append(name)
        print(f"{name}: MISSING ({error})")
if "ase" in missing:  # gdeq_ext imports it: nothing after this step would run
    sys.exit("ase is missing: make wheelhouse/ with scripts/fetch_gpu_wheels.sh and carry it")
PY
  ((${#wheels[@]})) || skip "no wheelhouse/*.whl carried (ase was there already)"
}

step_build() {
  [[ $DRY == 1 ]] && skip "dry run: uses the installed gdeq_ext"
  if [[ -z ${CUDA_HOME:-} ]]; then
    command -v nvcc >/dev/null || { echo "no nvcc on the PATH and no CUDA_HOME"; return 1; }
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
  export CUDA_HOME GDEQ_EXT_WITH_CUDA=1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  cd "$REPO" || return 1
  local rc=0
  env -u PYTHONSAFEPATH "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -v . \
    >"$LOGS/build_pip.log" 2>&1 || rc=$?
  grep -E '\[gdeq_ext build\]|Successfully installed' "$LOGS/build_pip.log" || true   # display only
  if ((rc)); then
    echo "pip install FAILED (rc $rc); the end of logs/build_pip.log:"
    tail -n 60 "$LOGS/build_pip.log"
    return "$rc"
  fi
  "$PY" -P - "$R/build_info.json" <<'PY'
import json, sys
import gdeq_ext

info = gdeq_ext.build_info()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
if not (info.get("compiled") and info.get("with_cuda") and info.get("cuda_kernels")):
    sys.exit("the installed gdeq_ext has no CUDA kernels")
PY
}

gpu_or_dry() { [[ $DRY == 1 || $HAVE_CUDA == 1 ]] || skip "no CUDA device visible"; }

# `-m cuda` plus the CUDA tests that lack the marker (the neighbor list's CPU<->CUDA parity among them): -k matches
# the marker's name and the test names, so this is a superset of `pytest -m cuda`.
CUDA_TESTS='cuda or gpu'
step_pytest() {
  gpu_or_dry
  cd "$REPO" || return 1
  local files=(tests)
  [[ $DRY == 1 ]] && files=(tests/test_edge_vectors.py tests/test_neighbor_list.py)
  local rc=0
  "$PY" -P -m pytest -p no:cacheprovider -ra -k "$CUDA_TESTS" --junitxml="$R/junit/pytest_cuda.xml" "${files[@]}" || rc=$?
  ((rc == 5)) && rc=0   # nothing selected
  return "$rc"
}

sanitize() {  # TOOL JUNIT_NAME -k EXPR FILES...
  local tool=$1 name=$2 san rc=0; shift 2
  [[ $DRY == 1 ]] && skip "dry run: needs a GPU"
  [[ $HAVE_CUDA == 1 ]] || skip "no CUDA device visible"
  san=$(find_sanitizer) || skip "compute-sanitizer not found"
  cd "$REPO" || return 1
  # No caching allocator: every tensor is its own allocation, so an overrun is not hidden inside a pooled block.
  # shellcheck disable=SC2086
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 86 --print-limit 50 ${SANITIZER_FILTER} \
    "$PY" -P -m pytest -p no:cacheprovider -q --junitxml="$R/junit/$name.xml" "$@" || rc=$?
  ((rc == 86)) && echo "compute-sanitizer $tool found errors (exit 86)"
  return "$rc"
}
step_memcheck() {
  sanitize memcheck memcheck -k "($CUDA_TESTS) and not gradcheck and not opcheck" tests/test_edge_vectors.py \
    tests/test_edge_moments.py tests/test_neighbor_list.py tests/test_verlet.py tests/test_mlip_fused.py
}
step_racecheck() {  # the neighbor-list and edge-moment kernels
  sanitize racecheck racecheck \
    -k "($CUDA_TESTS) and (28_neighbors or identical or overflow or values_and_derivatives or many_channels or edge_order or skin_edges)" \
    tests/test_neighbor_list.py tests/test_edge_moments.py
}

step_kernels() {
  gpu_or_dry
  cd "$REPO" || return 1
  if [[ $DRY == 1 ]]; then
    "$PY" -P benchmarks/kernels.py --device cpu --sizes 1 --budget 0.05 --threads 1 --output "$R/kernels_gpu"
  else  # 64, 512, 4096 (the goals' size) and 32768 atoms
    "$PY" -P benchmarks/kernels.py --device cuda --sizes 2 4 8 16 --budget 0.25 --output "$R/kernels_gpu"
  fi
}

step_neighbors() {
  gpu_or_dry
  cd "$REPO" || return 1
  if [[ $DRY == 1 ]]; then
    "$PY" -P benchmarks/neighbors.py --device cpu --quick --repeats 1 2 --batches 1 2 --output "$R/neighbors_gpu"
  else  # up to 4096 atoms and 512 x 64-atom cells (the goals), 32768 atoms; vesin's GPU path when it is installed
    # A crash of vesin's GPU path (it is not caught by the benchmark) must not take our own figures with it.
    if ! timeout 60 "$PY" -P -c 'import torch, vesin
nl = vesin.NeighborList(cutoff=5.0, full_list=True)
p = 5 * torch.rand(8, 3, device="cuda", dtype=torch.float64)
c = 5 * torch.eye(3, device="cuda", dtype=torch.float64)
print("vesin", vesin.__version__, "GPU path:", len(nl.compute(p, c, True, "ijS")[0]), "pairs"); torch.cuda.synchronize()'; then
      echo "vesin's GPU path failed (above): measuring without vesin"
      export PYTHONPATH=${PYTHONPATH//$SITE_VESIN/}
    fi
    "$PY" -P benchmarks/neighbors.py --device cuda --quick --repeats 2 3 4 6 8 16 --batches 1 8 64 512 \
      --output "$R/neighbors_gpu"
  fi
}

memory_run() {  # OUTPUT_NAME LENGTHS...
  local name=$1; shift
  local flags=(--device --quick --lengths --windows --structures --repeat --output)
  if [[ $DRY == 1 ]]; then
    check_flags benchmarks/memory.py "${flags[@]}" || return 1
    skip "dry run: needs a GPU (a CPU run takes minutes: one subprocess per configuration); flags checked"
  fi
  [[ $HAVE_CUDA == 1 ]] || skip "no CUDA device visible"
  cd "$REPO" || return 1
  # --quick only picks the quick base-model fit when none is cached; the sweep is set explicitly.
  "$PY" -P benchmarks/memory.py --device cuda --quick --lengths "$@" --windows 20 --structures 2 --repeat 2 \
    --output "$R/$name"
}
step_memory() { memory_run memory_gpu 100 200; }

step_throughput() {  # batched FIRE with compaction off / on (and torch-sim where installed), hybrid and BPTT steps
  gpu_or_dry
  cd "$REPO" || return 1
  if [[ $DRY == 1 ]]; then
    "$PY" -P benchmarks/throughput.py --quick --device cpu --output "$R/throughput_gpu"
  else  # the study's 16 validation starts (the carried cache), float64; the two-cores part is CPU-only
    "$PY" -P benchmarks/throughput.py --device cuda --repeats 2 --output "$R/throughput_gpu"
  fi
}
step_memory_t800() { memory_run memory_gpu_t800 800; }

step_nccl() {
  gpu_or_dry
  local run="$WORK/nccl_run" device=cuda backend=nccl rc=0
  local settings=(--set train.steps=4 --set train.eval_every=4 --set train.checkpoint_every=2 --set pretrain.epochs=20)
  if [[ $DRY == 1 ]]; then
    device=cpu backend=gloo
    settings=(--set train.steps=1 --set train.batch_size=2 --set train.eval_every=1 --set train.checkpoint_every=1
      --set pretrain.rattled=4 --set pretrain.thermal=0 --set pretrain.epochs=2 --set relax.max_relax_steps=30
      --set train.eval_train=false)
  fi
  rm -rf "$run"
  mkdir -p "$R/nccl"
  cd "$WORK" || return 1   # not the repository: the children import the installed package
  # (a) The training command under torchrun, one process on the GPU. With WORLD_SIZE=1 init_distributed joins no
  # process group, so (b) joins a one-rank NCCL group and runs the project's collectives through it.
  "$PY" -P -m torch.distributed.run --standalone --nproc_per_node=1 -m gdeq_ext.train "$REPO/examples/hybrid.toml" \
    --output-dir "$run" --no-progress --resume never --set "train.device=$device" "${settings[@]}" || rc=$?
  cp "$run"/{metrics.csv,summary.md,learning_curves.png,config.json} "$R/nccl/" 2>/dev/null
  ((rc)) && { echo "training under torchrun FAILED (rc $rc)"; return "$rc"; }
  cat >"$WORK/collectives.py" <<'PY'
"""One-rank process group (NCCL on the GPU, gloo on a CPU) through gdeq_ext.train.distributed's collectives."""
import dataclasses, datetime, json, os, sys
import torch
import torch.distributed as dist
from gdeq_ext.train.distributed import (DistributedContext, all_reduce_gradients, all_reduce_max, all_reduce_sum,
                                        broadcast_module)

backend = sys.argv[1]
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
kwargs = {"device_id": device} if backend == "nccl" else {}
dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=60), **kwargs)
group = DistributedContext.current(device)
# One GPU cannot hold two NCCL ranks; claim two so the multi-rank code path runs (a sum over one rank is the identity).
context = dataclasses.replace(group, world_size=2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
before = [p.detach().clone() for p in model.parameters()]
broadcast_module(model, context)
model(torch.randn(32, 8, device=device)).pow(2).mean().backward()
grads = [p.grad.clone() for p in model.parameters()]
all_reduce_gradients(model.parameters(), context)
values = torch.randn(5, device=device)
checks = {
    "broadcast": all(torch.equal(a, p) for a, p in zip(before, model.parameters())),
    "all_reduce_gradients": all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters())),
    "all_reduce_sum": torch.equal(all_reduce_sum(values, context), values),
    "all_reduce_max": torch.equal(all_reduce_max(values, context), values),
    "collective_device": str(context.collective_device),
}
dist.barrier()
dist.destroy_process_group()
ok = all(v for k, v in checks.items() if k != "collective_device")
print(json.dumps({"backend": group.backend, "ranks": group.world_size, "device": str(device), "ok": ok, **checks}))
sys.exit(0 if ok else 1)
PY
  "$PY" -P -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/collectives.py" "$backend" \
    >"$R/nccl/collectives.json" || rc=$?
  cat "$R/nccl/collectives.json"
  return "$rc"
}

step_basins() {
  local flags=(--quick --device --model --seeds --steps --batch-size --lrs --windows --variant-window --methods
    --n-train --n-val --n-test --sizes --data-seed --output)
  if [[ $DRY == 1 ]]; then
    check_flags benchmarks/basins.py "${flags[@]}" || return 1
    skip "dry run: needs a GPU; flags checked"
  fi
  [[ $HAVE_CUDA == 1 ]] || skip "no CUDA device visible"
  local model="$CACHE/$BASE_MODEL_NAME"
  [[ -f $model ]] || skip "no base MLIP at benchmarks/results/cache/$BASE_MODEL_NAME (carry it: --prepare)"
  cd "$REPO" || return 1
  # Reduced: one seed, 4 Adam steps x 4 starts, one lr, BPTT / implicit / hybrid K=10 (+ its guidance-only variant),
  # 8 training and 16 test starts of 64 sites, the memory benchmark's base MLIP.
  "$PY" -P benchmarks/basins.py --quick --device cuda --model "$model" --seeds 1 --steps 4 --batch-size 4 --lrs 1e-3 \
    --windows 10 --variant-window 10 --methods BPTT implicit "hybrid K=10" "${BASIN_DATA[@]}" --output "$R/basins_gpu"
}

step_goals() {
  "$PY" -P "$REPO/scripts/gpu_goals.py" "$R" --markdown "$R/goals.md" --json "$R/goals.json" >"$R/goals.txt" || return 1
  cat "$R/goals.txt"
}

step_collect() {  # the dry run: unpack the archive with gpu_collect.sh into a scratch folder, README copy included
  [[ $DRY == 1 ]] || skip "the dry run's check (collect a real campaign here with scripts/gpu_collect.sh)"
  local target="$WORK/collected"
  rm -rf "$target" && mkdir -p "$target" && cp "$REPO/README.md" "$target/README.md"
  bash "$REPO/scripts/gpu_collect.sh" "$OUT/gpu_campaign.tar.gz" --target "$target" --readme "$target/README.md" || return 1
  grep -q 'bench:gpu:start' "$target/README.md" || { echo "README section not written"; return 1; }
  ls -R "$target"
}

# ------------------------------------------------------------------------------------------------ internal
if [[ ${1:-} == __step ]]; then
  STEP=$2
  "step_$STEP"
  exit $?
fi

# ------------------------------------------------------------------------------------------------ options
DRY=0 PREPARE=0 BUDGET="" ONLY="" SKIP="" VERBOSE=0 OUT_DIR=${OUT:-} WORK=""
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --skip) SKIP=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --work) WORK=$2; shift ;;
    --verbose) VERBOSE=1 ;;
    -h | --help) sed -n '2,22p' "$SELF"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

for name in ${ONLY//,/ } ${SKIP//,/ }; do
  [[ " ${STEPS[*]} " == *" $name "* ]] || { echo "unknown step '$name' (steps: ${STEPS[*]})" >&2; exit 2; }
done

PY=${PYTHON:-python3}
CACHE="$REPO/benchmarks/results/cache"
export PY DRY REPO CACHE PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export SANITIZER_FILTER=${SANITIZER_FILTER-"--kernel-name kns=gdeq_ext"}

if ((PREPARE)); then  # here, with network: everything the GPU machine cannot fetch or should not spend minutes on
  set -e
  cd "$REPO"
  say "prepare: wheels (scripts/fetch_gpu_wheels.sh)"
  scripts/fetch_gpu_wheels.sh 3.12
  say "prepare: the memory benchmark's base MLIP and the reduced basin data set in benchmarks/results/cache/"
  "$PY" -P - "${BASIN_DATA[@]}" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
import torch
import memory  # benchmarks/memory.py
from gdeq_ext.datasets.silicon_defects import silicon_defects

memory.base_model(memory.CACHE / "base_mlip_float32.pt", torch.float32, True)
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
data = silicon_defects(n_train=int(a["--n-train"]), n_val=int(a["--n-val"]), n_test=int(a["--n-test"]),
                       sizes=tuple(int(s) for s in a["--sizes"].split()), seed=int(a["--data-seed"]),
                       cache=str(memory.CACHE))
print(data.summary())
PY
  du -sh wheelhouse benchmarks/results/cache
  say "carry: [\"wheelhouse\", \"benchmarks/results/cache\"] (docs/gpu.md)"
  exit 0
fi

BUDGET=${BUDGET:-$( ((DRY)) && echo 300 || echo 470)}
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/gpu_campaign_out}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_campaign.XXXXXX")}
mkdir -p "$OUT_DIR" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd) WORK=$(cd "$WORK" && pwd)
R="$WORK/gpu_campaign" LOGS="$WORK/gpu_campaign/logs" SITE="$WORK/site" SITE_VESIN="$WORK/site_vesin"
rm -rf "$R" "$SITE" "$SITE_VESIN" && mkdir -p "$LOGS" "$R/junit" "$SITE" "$SITE_VESIN"
OUT=$OUT_DIR
export OUT WORK R LOGS SITE SITE_VESIN HAVE_CUDA=0
export PYTHONPATH="$SITE:$SITE_VESIN${PYTHONPATH:+:$PYTHONPATH}"   # the carried wheels (installed by the wheels step)
((DRY)) && touch "$R/DRY_RUN"
((DRY)) || export GDEQ_EXT_REQUIRE_COMPILED=1

START=$(date +%s)
TAIL=30   # kept back from the steps for the goals and the last archive
DEADLINE=$((START + BUDGET - TAIL))
declare -A RESULT=()
printf 'step\tstatus\tseconds\tnote\n' >"$R/status.tsv"
: >"$R/status.txt"

selected() {
  local name=$1
  if [[ -n $ONLY && ",$ONLY," != *",$name,"* ]]; then return 1; fi
  if [[ -n $SKIP && ",$SKIP," == *",$name,"* ]]; then return 1; fi
  return 0
}

archive() {
  tar -czf "$OUT/gpu_campaign.part" -C "$WORK" gpu_campaign && mv -f "$OUT/gpu_campaign.part" "$OUT/gpu_campaign.tar.gz"
}

last_line() {  # PATTERN FILE: the last matching line without its ==== frame, or nothing
  [[ -f $2 ]] && grep -E "$1" "$2" | tail -n 1 | sed -E 's/^[= ]+//; s/[= ]+$//' | grep .
}

write_summary() {
  local device
  device=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("gpu") or "no GPU", "| torch", d["torch"], "| python", d["python"])' "$R/env.json" 2>/dev/null || echo unknown)
  {
    echo "gdeq_ext GPU campaign"
    echo "mode: $( ((DRY)) && echo 'DRY RUN on a CPU (no GPU figure)' || echo GPU)"
    echo "date: $(date -u -d "@$START" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || date -u)"
    echo "device: $device"
    echo "budget: $BUDGET s, elapsed $(( $(date +%s) - START )) s"
    echo
    cat "$R/status.txt"
    echo
    local line
    line=$(last_line '^=+ .*( in [0-9.]+s)' "$LOGS/pytest.log") && echo "pytest (CUDA tests): $line"
    line=$(last_line 'ERROR SUMMARY' "$LOGS/memcheck.log") && echo "memcheck: $line"
    line=$(last_line '^=+ .*( in [0-9.]+s)' "$LOGS/memcheck.log") && echo "memcheck tests: $line"
    line=$(last_line 'RACECHECK SUMMARY|ERROR SUMMARY' "$LOGS/racecheck.log") && echo "racecheck: $line"
    line=$(last_line '^\{' "$R/nccl/collectives.json" 2>/dev/null) && echo "nccl collectives: $line"
    [[ -f $R/goals.txt ]] && { echo; cat "$R/goals.txt"; }
  } >"$R/summary.txt"
  cp "$R/summary.txt" "$OUT/gpu_campaign_summary.txt"
}

record() {  # NAME STATUS SECONDS NOTE
  local name=$1 status=$2 secs=$3 note=$4 shown
  case $status in
    ok) shown=ok ;;
    FAILED) shown="FAILED ${note#rc }" ;;
    TIMEOUT) shown=TIMEOUT ;;
    *) shown="SKIPPED $note" ;;
  esac
  local line="[campaign] step $name: $shown ($secs s)"
  echo "$line"
  echo "$line" >>"$R/status.txt"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$note" >>"$R/status.tsv"
  RESULT[$name]=$status
  write_summary
  archive
}

run_step() {  # NAME MAX_S MIN_S [final]: run it in a time box cut to the budget left
  local name=$1 max=$2 min=$3 final=${4:-}
  selected "$name" || { record "$name" SKIPPED 0 "not selected (--only/--skip)"; return; }
  local now left box
  now=$(date +%s)
  left=$((DEADLINE - now))
  [[ -n $final ]] && left=$((START + BUDGET - now - 5))
  box=$((max < left ? max : left))
  if ((box < min)); then
    record "$name" SKIPPED 0 "no time left (${left} s of the budget, needs ${min} s)"
    return
  fi
  local rc=0
  ((VERBOSE)) && say "step $name: started (box $box s)"
  if ((VERBOSE)); then
    timeout -k 10 "$box" bash "$SELF" __step "$name" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$box" bash "$SELF" __step "$name" >"$LOGS/$name.log" 2>&1 || rc=$?
  fi
  local secs=$(( $(date +%s) - now ))
  case $rc in
    0) record "$name" ok "$secs" "" ;;
    77) record "$name" SKIPPED "$secs" "$(cat "$LOGS/$name.skip" 2>/dev/null || echo skipped)" ;;
    124 | 137) record "$name" TIMEOUT "$secs" "time box $box s" ;;
    *)
      record "$name" FAILED "$secs" "rc $rc"
      ((VERBOSE)) || tail -n 12 "$LOGS/$name.log" | sed 's/^/    | /'
      ;;
  esac
}

say "$( ((DRY)) && echo 'dry run (CPU)' || echo 'GPU run'): budget $BUDGET s; results $R; archive $OUT/gpu_campaign.tar.gz"
run_step env 30 5
HAVE_CUDA=$(cat "$R/.cuda" 2>/dev/null || echo 0)
export HAVE_CUDA
if ((!DRY && !HAVE_CUDA)); then say "no CUDA device visible: the GPU steps are skipped (on a CPU, use --dry-run)"; fi
run_step wheels 60 10
run_step build 300 60
if [[ ${RESULT[build]} == FAILED || ${RESULT[build]} == TIMEOUT ]]; then
  for name in pytest memcheck racecheck kernels neighbors memory nccl throughput memory_t800 basins; do
    record "$name" SKIPPED 0 "the build ${RESULT[build],,}: no CUDA kernels installed"
  done
else
  run_step pytest 120 30
  run_step memcheck 75 30
  run_step racecheck 60 20
  run_step kernels 75 20
  run_step neighbors 75 20
  run_step memory 90 30
  run_step nccl 75 30
  run_step throughput 60 20
  run_step memory_t800 180 60
  run_step basins 600 60
fi
run_step goals 20 3 final
if ((DRY)); then run_step collect 30 5 final; else record collect SKIPPED 0 "dry run only"; fi

failed=0
for name in "${!RESULT[@]}"; do [[ ${RESULT[$name]} == FAILED || ${RESULT[$name]} == TIMEOUT ]] && failed=$((failed + 1)); done
say "done in $(( $(date +%s) - START )) s: $failed step(s) failed or timed out; $OUT/gpu_campaign.tar.gz ($(du -h "$OUT/gpu_campaign.tar.gz" | cut -f1)), $OUT/gpu_campaign_summary.txt"
((failed == 0))
