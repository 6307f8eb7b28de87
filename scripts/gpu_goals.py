"""The GPU goals of the project, evaluated on a folder of GPU benchmark results (never hard-coded figures).

    python scripts/gpu_goals.py RESULTS_DIR [--markdown FILE] [--json FILE]
    python scripts/gpu_goals.py RESULTS_DIR --readme README.md --campaign CAMPAIGN_DIR

Reads ``kernels_gpu.json`` (benchmarks/kernels.py), ``neighbors_gpu.json`` (benchmarks/neighbors.py) and every
``memory_gpu*.json`` (benchmarks/memory.py; records of several runs are merged, so a short run and a T = 800 run
count together) from RESULTS_DIR, and prints one line per goal:

    [goal] NAME: MET|MISSED|NOT MEASURED|CPU ONLY  (figure; goal ...; source)

CPU ONLY: the file holds CPU numbers (the campaign's --dry-run), shown to exercise the evaluation but no GPU figure.
``--readme`` replaces the text between ``<!-- bench:gpu:start -->`` and ``<!-- bench:gpu:end -->`` in README.md
(appending a marked section when the markers are missing) with the campaign's step table, test and sanitizer
summaries (from CAMPAIGN_DIR: status.tsv and summary.txt written by scripts/gpu_campaign.sh) and the goals.
Used by scripts/gpu_campaign.sh (at the end of a campaign) and scripts/gpu_collect.sh (after unpacking one).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# The goals as the project states them (issue 18); thresholds here, figures from the JSONs.
BYTES_PER_EDGE_MAX = 500.0  # fused kernels <= 0.5 kB per edge (GPU peak allocation above the start / edges)
EF_SPEEDUP_MIN = 4.0  # fused energy + forces >= 4x faster than the reference ...
SPEEDUP_ATOMS = 4096  # ... at 4,096 atoms (also where H·v / E+F is read)
HV_OVER_EF_MAX = 2.5  # fused H·v <= 2.5x fused energy + forces
NEIGHBOR_MS_MAX = 0.1  # one neighbor-list call < 0.1 ms for every structure up to 4k atoms
NEIGHBOR_MAX_ATOMS = 4096
BATCH_MS_MAX = 0.39  # 512 x 64-atom cells in one call < 0.39 ms
BATCH_SIZE = 512
FLAT_T = 800  # hybrid peak memory flat (within 5 %) for T from 100 up to 800
FLAT_FROM_T = 100
FLAT_SPREAD_MAX = 0.05

MARK_START, MARK_END = "<!-- bench:gpu:start -->", "<!-- bench:gpu:end -->"


@dataclass
class Goal:
    name: str
    status: str  # MET, MISSED, NOT MEASURED, CPU ONLY
    figure: str
    goal: str
    source: str

    def line(self) -> str:
        return f"[goal] {self.name}: {self.status} ({self.figure}; goal {self.goal}; {self.source})"


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def judged(ok: bool, on_gpu: bool) -> str:
    if not on_gpu:
        return "CPU ONLY"
    return "MET" if ok else "MISSED"


def missing(name: str, goal: str, source: str, why: str) -> Goal:
    return Goal(name, "NOT MEASURED", why, goal, source)


# --------------------------------------------------------------------------------------------- kernels
def kernel_goals(folder: Path) -> list[Goal]:
    source = "kernels_gpu.json"
    names = (
        ("fused kernels <= 0.5 kB/edge", f"<= {BYTES_PER_EDGE_MAX:.0f} B/edge for every operation"),
        (f"E+F >= {EF_SPEEDUP_MIN:g}x faster than the reference at {SPEEDUP_ATOMS} atoms", f">= {EF_SPEEDUP_MIN:g}x"),
        (f"H·v <= {HV_OVER_EF_MAX:g}x E+F (fused)", f"<= {HV_OVER_EF_MAX:g}x"),
    )
    data = load(folder / source)
    if not data or not data.get("records"):
        return [missing(n, g, source, "no kernels_gpu.json") for n, g in names]
    on_gpu = str(data.get("machine", {}).get("device", "cpu")).startswith("cuda")
    records = data["records"]

    def pick(n_atoms, operation, backend):
        for r in records:
            if (r["n_atoms"], r["operation"], r["backend"]) == (n_atoms, operation, backend):
                return r
        return None

    goals = []
    largest = max(r["n_atoms"] for r in records)
    fused = [r for r in records if r["n_atoms"] == largest and r["backend"] == "fused"]
    worst = max(fused, key=lambda r: r["bytes_per_edge"])
    each = ", ".join(f"{r['operation']} {r['bytes_per_edge']:.0f}" for r in fused)
    goals.append(
        Goal(
            names[0][0],
            judged(worst["bytes_per_edge"] <= BYTES_PER_EDGE_MAX, on_gpu),
            f"worst {worst['operation']} {worst['bytes_per_edge']:.0f} B/edge at {largest} atoms ({each})",
            names[0][1],
            source,
        )
    )
    at = SPEEDUP_ATOMS if any(r["n_atoms"] == SPEEDUP_ATOMS for r in records) else None
    if at is None and not on_gpu:  # a CPU dry run: read the largest size, to exercise the evaluation
        at = largest
    ref, fus = (pick(at, "energy+forces", b) for b in ("reference", "fused")) if at else (None, None)
    if ref and fus:
        speedup = ref["time_s"] / fus["time_s"]
        goals.append(
            Goal(
                names[1][0],
                judged(speedup >= EF_SPEEDUP_MIN, on_gpu),
                f"{speedup:.2f}x at {at} atoms ({ref['time_s'] * 1e3:.3f} ms -> {fus['time_s'] * 1e3:.3f} ms)",
                names[1][1],
                source,
            )
        )
    else:
        goals.append(missing(*names[1], source, f"no {SPEEDUP_ATOMS}-atom record"))
    hv = pick(at, "H·v", "fused") if at else None
    if hv and fus:
        ratio = hv["time_s"] / fus["time_s"]
        goals.append(
            Goal(
                names[2][0],
                judged(ratio <= HV_OVER_EF_MAX, on_gpu),
                f"{ratio:.2f}x at {at} atoms ({hv['time_s'] * 1e3:.3f} ms vs {fus['time_s'] * 1e3:.3f} ms)",
                names[2][1],
                source,
            )
        )
    else:
        goals.append(missing(*names[2], source, f"no {SPEEDUP_ATOMS}-atom record"))
    return goals


# ------------------------------------------------------------------------------------------- neighbors
def neighbor_goals(folder: Path) -> list[Goal]:
    source = "neighbors_gpu.json"
    names = (
        (f"neighbor list < {NEIGHBOR_MS_MAX:g} ms up to 4k atoms", f"< {NEIGHBOR_MS_MAX:g} ms, float32, every size"),
        (f"{BATCH_SIZE} x 64-atom cells < {BATCH_MS_MAX:g} ms", f"< {BATCH_MS_MAX:g} ms, float32, one call"),
    )
    data = load(folder / source)
    if not data:
        return [missing(n, g, source, "no neighbors_gpu.json") for n, g in names]
    on_gpu = bool(data.get("gpu"))
    rows, key = (data["gpu"], "ours_f32_ms") if on_gpu else (data.get("cpu") or {}, "ours_ms")
    goals = []
    cells = [r for r in rows.get("supercells", []) if r["atoms"] <= NEIGHBOR_MAX_ATOMS and r.get(key) is not None]
    if cells:
        worst = max(cells, key=lambda r: r[key])
        largest = max(r["atoms"] for r in cells)
        partial = "" if largest >= NEIGHBOR_MAX_ATOMS else f"; measured only up to {largest} atoms"
        each = ", ".join(f"{r['atoms']}: {r[key]:.3f}" for r in cells)
        ok = worst[key] < NEIGHBOR_MS_MAX and largest >= NEIGHBOR_MAX_ATOMS
        f64 = [r["ours_f64_ms"] for r in cells if r.get("ours_f64_ms") is not None]
        extra = f"; float64 worst {max(f64):.3f} ms" if f64 else ""
        figure = f"worst {worst[key]:.3f} ms at {worst['atoms']} atoms (ms by atoms: {each}){extra}{partial}"
        goals.append(Goal(names[0][0], judged(ok, on_gpu), figure, names[0][1], source))
    else:
        goals.append(missing(*names[0], source, "no supercell rows"))
    batches = [r for r in rows.get("batches", []) if r.get(key) is not None]
    batch = next((r for r in batches if r["size"] == BATCH_SIZE), None)
    if batch is None and batches and not on_gpu:  # a CPU dry run: the largest batch, to exercise the evaluation
        batch = max(batches, key=lambda r: r["size"])
    if batch:
        goals.append(
            Goal(
                names[1][0],
                judged(batch[key] < BATCH_MS_MAX, on_gpu),
                f"{batch[key]:.3f} ms ({batch['size']} structures, {batch['pairs']} pairs)",
                names[1][1],
                source,
            )
        )
    else:
        goals.append(missing(*names[1], source, f"no {BATCH_SIZE}-structure batch row"))
    return goals


# ---------------------------------------------------------------------------------------------- memory
def memory_goals(folder: Path) -> list[Goal]:
    name = f"hybrid memory flat up to T = {FLAT_T}"
    goal = f"peak varies <= {100 * FLAT_SPREAD_MAX:.0f}% for T = {FLAT_FROM_T} ... {FLAT_T} (fused)"
    files = sorted(folder.glob("memory_gpu*.json"))
    records, on_gpu = {}, True
    for path in files:
        data = load(path)
        if not data:
            continue
        on_gpu &= str(data.get("machine", {}).get("device", "cpu")).startswith("cuda")
        for r in data.get("records", []):
            if "peak_bytes" in r:
                records[(r["mode"], r["backend"], r["steps_T"], r["window"], r.get("sites"))] = r["peak_bytes"]
    source = ", ".join(p.name for p in files) or "memory_gpu*.json"
    if not records:
        return [missing(name, goal, source, "no memory_gpu*.json with measured records")]
    series = {}
    for (mode, backend, steps, window, sites), peak in records.items():
        if mode == "hybrid" and backend == "fused" and FLAT_FROM_T <= steps <= FLAT_T:
            series.setdefault((window, sites), {})[steps] = peak
    complete = {k: v for k, v in series.items() if FLAT_T in v and len(v) > 1}
    if not complete:
        have = sorted({t for v in series.values() for t in v})
        return [missing(name, goal, source, f"hybrid (fused) measured at T = {have or 'none'}, need {FLAT_T}")]
    lines, worst = [], 0.0
    for (window, sites), peaks in sorted(complete.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        spread = max(peaks.values()) / min(peaks.values()) - 1
        worst = max(worst, spread)
        shown = ", ".join(f"T={t}: {b / 2**20:.1f} MiB" for t, b in sorted(peaks.items()))
        lines.append(f"K={window}, {sites} sites: {100 * spread:.1f}% ({shown})")
    return [Goal(name, judged(worst <= FLAT_SPREAD_MAX, on_gpu), "; ".join(lines), goal, source)]


def evaluate(folder: Path) -> list[Goal]:
    return kernel_goals(folder) + neighbor_goals(folder) + memory_goals(folder)


# -------------------------------------------------------------------------------------------- markdown
def goals_markdown(goals: list[Goal]) -> str:
    lines = ["| goal | GPU figure | status | source |", "|---|---|---|---|"]
    for g in goals:
        lines.append(f"| {g.name} ({g.goal}) | {g.figure} | **{g.status}** | `{g.source}` |")
    return "\n".join(lines)


def campaign_markdown(campaign: Path | None) -> str:
    """The step table and the test/sanitizer lines of a campaign folder (status.tsv, summary.txt)."""
    if campaign is None or not (campaign / "status.tsv").exists():
        return ""
    rows = ["| step | status | seconds | note |", "|---|---|---|---|"]
    for line in (campaign / "status.tsv").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 4 and parts[0] != "step":
            rows.append(f"| {parts[0]} | {parts[1]} | {parts[2]} | {parts[3]} |")
    head, details = [], []
    summary = campaign / "summary.txt"
    if summary.exists():
        for line in summary.read_text().splitlines():
            if line.startswith(("device:", "date:", "mode:")):
                head.append(f"{line}  ")
            elif line.startswith(("pytest", "memcheck", "racecheck", "nccl")):
                details.append(f"- {line}")
    return "\n".join([*head, "", *rows, "", *details]).strip() + "\n"


def update_readme(readme: Path, content: str) -> None:
    text = readme.read_text()
    block = f"{MARK_START}\n{content.strip()}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        before, rest = text.split(MARK_START, 1)
        _, after = rest.split(MARK_END, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n## GPU campaign results\n\n" + block + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="folder holding kernels_gpu.json, neighbors_gpu.json, memory_gpu*")
    parser.add_argument("--markdown", type=Path, help="write the goals table here")
    parser.add_argument("--json", type=Path, help="write the goals as JSON here")
    parser.add_argument("--readme", type=Path, help="update this README's bench:gpu section")
    parser.add_argument("--campaign", type=Path, help="the campaign folder (status.tsv, summary.txt) for --readme")
    args = parser.parse_args(argv)
    goals = evaluate(args.results)
    for g in goals:
        print(g.line())
    table = goals_markdown(goals)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(g) for g in goals], indent=2) + "\n")
    if args.readme:
        text = "GPU campaign (`scripts/gpu_campaign.sh`, collected by `scripts/gpu_collect.sh`; see docs/gpu.md).\n\n"
        text += campaign_markdown(args.campaign) + "\nGoals, read from the JSONs:\n\n" + table + "\n"
        update_readme(args.readme, text)
        print(f"updated {args.readme} ({MARK_START} ... {MARK_END})")
    counts = {s: sum(g.status == s for g in goals) for s in ("MET", "MISSED", "NOT MEASURED", "CPU ONLY")}
    print("[goals] " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
