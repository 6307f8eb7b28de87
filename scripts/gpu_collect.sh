#!/usr/bin/env bash
# Collect a GPU campaign's archive (scripts/gpu_campaign.sh): unpack it, file the results, print the goals.
#
#   scripts/gpu_collect.sh ARCHIVE [--target DIR] [--readme FILE | --no-readme] [--allow-dry-run]
#
# Into the target (default benchmarks/results/): the GPU benchmark outputs, named as such (kernels_gpu.*,
# neighbors_gpu.*, memory_gpu*.*, basins_gpu.*), and everything else of the campaign (logs, junit XML, status,
# summary, env.json, nccl/) under TARGET/gpu_campaign/. Files without "_gpu" in their name (the CPU results) are
# never written. Then scripts/gpu_goals.py prints every goal met / missed from the JSONs and rewrites the README's
# section between <!-- bench:gpu:start --> and <!-- bench:gpu:end --> (appended, marked, if missing).
# A dry-run archive (CPU numbers) is refused unless --target and --readme/--no-readme are given explicitly.
set -euo pipefail
REPO=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
PY=${PYTHON:-python3}

usage() { sed -n '2,13p' "$(readlink -f "$0")"; }
(($#)) || { usage; exit 2; }
archive="" target="" readme="" no_readme=0 allow_dry=0
while (($#)); do
  case $1 in
    --target) target=$2; shift ;;
    --readme) readme=$2; shift ;;
    --no-readme) no_readme=1 ;;
    --allow-dry-run) allow_dry=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) archive=$1 ;;
  esac
  shift
done
[[ -f $archive ]] || { echo "no archive '$archive'" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$archive" -C "$tmp"
src="$tmp/gpu_campaign"
[[ -f $src/status.tsv ]] || { echo "$archive holds no gpu_campaign/status.tsv: not a campaign archive" >&2; exit 1; }
if [[ -f $src/DRY_RUN ]] && ((!allow_dry)) && [[ -z $target || (-z $readme && $no_readme == 0) ]]; then
  echo "$archive is a dry run (CPU numbers): give --target and --readme/--no-readme (or --allow-dry-run)" >&2
  exit 1
fi
target=${target:-$REPO/benchmarks/results}
readme=${readme:-$REPO/README.md}
mkdir -p "$target"

shopt -s nullglob
filed=()
for f in "$src"/*; do
  name=$(basename "$f")
  if [[ -f $f && $name == *_gpu* && $name =~ \.(json|md|png)$ ]]; then
    cp "$f" "$target/$name"
    filed+=("$name")
  fi
done
rm -rf "$target/gpu_campaign"
mkdir -p "$target/gpu_campaign"
for f in "$src"/* "$src"/.[!.]*; do
  name=$(basename "$f")
  [[ -f $f && $name == *_gpu* && $name =~ \.(json|md|png)$ ]] && continue
  cp -r "$f" "$target/gpu_campaign/"
done
echo "[collect] into $target: ${filed[*]:-no GPU benchmark files}; campaign files in $target/gpu_campaign/"
echo
cat "$src/summary.txt" 2>/dev/null || cat "$src/status.txt"
echo

goal_args=("$target" --markdown "$target/gpu_campaign/goals.md" --json "$target/gpu_campaign/goals.json")
((no_readme)) || goal_args+=(--readme "$readme" --campaign "$target/gpu_campaign")
"$PY" "$REPO/scripts/gpu_goals.py" "${goal_args[@]}"
