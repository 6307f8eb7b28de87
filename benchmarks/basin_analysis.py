"""Where basin selection is won and lost: the basin study's finished cells broken down by defect and start (#17).

    python benchmarks/basin_analysis.py                                  # benchmarks/results/basins_full
    python benchmarks/basin_analysis.py --study FOLDER --output FOLDER/analysis   # any study folder

Reads only the study's cell JSONs and its data set's labels (the cached extxyz; nothing is trained or relaxed, a few
seconds) and writes ``analysis.{json,md}`` into the study folder (committed beside the summary, which the running
study rewrites; this file it never touches). Per method, at its chosen learning rate, pooled over the seeds done:

1. correct basins per (defect case, teacher basin) group of the test starts, and the starts fixed / broken against
   the base in each group (exact McNemar p per group is not given: the groups are small; the pooled test is in the
   summary);
2. how reproducible a start's outcome is across seeds: starts every seed gets right, none gets right, and the
   mixed ones (the seed decides);
3. how two methods overlap: starts the majority of one method's seeds fix (vs the base) and the other's do not;
4. how far the misses are: the quenched end state's largest per-atom deviation from the teacher's (Å) on wrong
   starts, split into near misses (< 0.5 Å: a neighbouring minimum of the same family) and far ones;
5. training stability over the learning-rate grid (seed 0): validation correct, whether training stopped, how many
   structure-steps the relaxation skipped (inexact fixed point, saddle, failed solve).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_json  # noqa: E402

NEAR = 0.5  # Å: a quenched end state this close to the target is a neighbouring minimum, not another defect


def load(folder: Path):
    import basins

    stored = json.loads((folder / "protocol.json").read_text())
    protocol = stored["protocol"]
    study = basins.Study(folder, protocol, basins._resolve(folder, stored["base"]), stored.get("device", "cpu"))
    cells = study.collect()
    test = basins.dataset(protocol).test
    groups = [f"{a.info['case']} → {a.info['basin']}" for a in test]
    return protocol, cells, groups


def method_outcomes(cells: dict) -> dict[str, dict]:
    """{method: {"seeds": [...], "correct": (seeds, starts) bool, "deviation": (seeds, starts) Å}} for methods with
    at least one seed at their chosen learning rate."""
    out = {}
    for name, record in cells["methods"].items():
        seeds = [record["seeds"][s] for s in sorted(record["seeds"])]
        if not seeds:
            continue
        out[name] = {
            "seeds": [s["seed"] for s in seeds],
            "lr": record.get("chosen_lr"),
            "correct": np.array([s["test"]["per_start_correct"] for s in seeds], dtype=bool),
            "deviation": np.array([s["test"]["per_start_quenched"] for s in seeds], dtype=float),
        }
    return out


def by_group(groups: list[str], base: np.ndarray, methods: dict) -> tuple[list[str], list[list], dict]:
    names = sorted(set(groups), key=lambda g: (-groups.count(g), g))
    index = {g: [k for k, x in enumerate(groups) if x == g] for g in names}
    header = ["test starts: case → teacher basin", "n", "base"] + [f"{m} (fixed/broken vs base)" for m in methods]
    rows, payload = [], {}
    for g in names:
        ks = index[g]
        row = [g, len(ks), f"{int(base[ks].sum())}/{len(ks)}"]
        payload[g] = {"n": len(ks), "base": int(base[ks].sum()), "methods": {}}
        for m, rec in methods.items():
            c = rec["correct"][:, ks]
            fixed = int((c & ~base[ks]).sum())
            broken = int((~c & base[ks]).sum())
            mean = c.sum(axis=1).mean()
            row.append(f"{mean:.1f}/{len(ks)} ({fixed}/{broken})")
            payload[g]["methods"][m] = {"mean_correct": float(mean), "fixed": fixed, "broken": broken}
        rows.append(row)
    return header, rows, payload


def on_common_seeds(methods: dict) -> tuple[dict, list[int]]:
    """The methods restricted to the seeds every one of them has (counts of 'seed decides' grow with the number of
    seeds, so methods are compared on the same seeds)."""
    common = sorted(set.intersection(*(set(rec["seeds"]) for rec in methods.values()))) if methods else []
    out = {}
    for m, rec in methods.items():
        rows = [rec["seeds"].index(s) for s in common]
        out[m] = {**rec, "seeds": common, "correct": rec["correct"][rows], "deviation": rec["deviation"][rows]}
    return out, common


def consistency(base: np.ndarray, methods: dict) -> tuple[list[str], list[list], dict]:
    header = ["method", "seeds", "right on every seed", "wrong on every seed", "seed decides",
              "fixed vs base by every seed", "broken vs base by every seed"]  # fmt: skip
    rows, payload = [], {}
    for m, rec in methods.items():
        c = rec["correct"]
        always, never = c.all(axis=0), (~c).all(axis=0)
        mixed = ~always & ~never
        entry = dict(always=int(always.sum()), never=int(never.sum()), mixed=int(mixed.sum()),
                     fixed_always=int((always & ~base).sum()), broken_always=int((never & base).sum()))  # fmt: skip
        payload[m] = entry
        rows.append([m, len(rec["seeds"]), entry["always"], entry["never"], entry["mixed"], entry["fixed_always"],
                     entry["broken_always"]])  # fmt: skip
    return header, rows, payload


def overlap(base: np.ndarray, methods: dict) -> tuple[list[str], list[list], dict]:
    """Starts fixed (majority of seeds right where the base is wrong) by one method and not by another."""
    fixed = {m: (rec["correct"].mean(axis=0) > 0.5) & ~base for m, rec in methods.items()}
    names = list(methods)
    header = ["fixed by (majority of seeds)", *names]
    rows, payload = [], {}
    for a in names:
        row = [a]
        for b in names:
            value = int(fixed[a].sum()) if a == b else int((fixed[a] & ~fixed[b]).sum())
            row.append(value if a == b else f"{value} not by {b}")
            payload.setdefault(a, {})[b] = value
        rows.append(row)
    return header, rows, payload


def misses(base: np.ndarray, base_deviation: np.ndarray, methods: dict) -> tuple[list[str], list[list], dict]:
    header = ["model", "wrong (start, seed) pairs", f"near misses (< {NEAR} Å)", "median deviation of the misses (Å)"]
    rows, payload = [], {}
    entries = [("base", ~base[None, :], base_deviation[None, :])]
    entries += [(m, ~rec["correct"], rec["deviation"]) for m, rec in methods.items()]
    for name, wrong, deviation in entries:
        d = deviation[wrong]
        near = int((d < NEAR).sum())
        median = float(np.median(d)) if d.size else float("nan")
        payload[name] = {"wrong": int(wrong.sum()), "near": near, "median_deviation": median}
        rows.append([name, int(wrong.sum()), f"{near} ({100 * near / max(1, d.size):.0f} %)", f"{median:.2f}"])
    return header, rows, payload


def stability(cells: dict) -> tuple[list[str], list[list], dict]:
    header = ["method", "lr", "val correct", "test correct", "training stopped", "skipped structure-steps",
              "saddles", "inexact", "solve failed"]  # fmt: skip
    rows, payload = [], defaultdict(dict)
    for name, record in cells["methods"].items():
        for lr in sorted(record.get("grid", {})):
            cell = record["grid"][lr]
            train = cell["train"]
            val = cell.get("val") or {}
            chosen = " (chosen)" if record.get("chosen_lr") == lr else ""
            entry = dict(val=val.get("correct"), test=cell["test"]["correct"], failed=train.get("failed"),
                         skipped=train.get("skipped", 0), saddles=train.get("saddles", 0),
                         inexact=train.get("inexact", 0), solve_failed=train.get("solve_failed", 0))  # fmt: skip
            payload[name][f"{lr:g}"] = entry
            rows.append([name, f"{lr:g}{chosen}", entry["val"], entry["test"], entry["failed"] or "no",
                         entry["skipped"], entry["saddles"], entry["inexact"], entry["solve_failed"]])  # fmt: skip
    return header, rows, dict(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=str(RESULTS / "basins_full"))
    parser.add_argument("--output", help="path stem of the .json/.md (default STUDY/analysis)")
    args = parser.parse_args()
    folder = Path(args.study)
    protocol, cells, groups = load(folder)
    if cells["base"] is None:
        raise SystemExit(f"{folder}: the base cell is not done yet")
    base = np.array(cells["base"]["test"]["per_start_correct"], dtype=bool)
    base_deviation = np.array(cells["base"]["test"]["per_start_quenched"], dtype=float)
    methods = method_outcomes(cells)
    common_methods, common = on_common_seeds(methods)
    parts = {
        "groups": by_group(groups, base, methods),
        "consistency": consistency(base, common_methods),
        "overlap": overlap(base, common_methods),
        "misses": misses(base, base_deviation, methods),
        "stability": stability(cells),
    }
    seeds = {m: rec["seeds"] for m, rec in methods.items()}
    intro = (
        f"Analysis of `{folder.name}` ({protocol['n_test']} test starts, {protocol['sizes']}-site cells) from its "
        f"finished cells: methods with seeds at their chosen learning rate: "
        + (", ".join(f"{m} (lr {methods[m]['lr']:g}, seeds {s})" for m, s in seeds.items()) or "none yet")
        + ". Correct = the strict criterion of the summary (SW quench within 0.1 Å per atom of SW's own end state)."
    )
    titles = {
        "groups": "1. By defect case and teacher basin (mean correct over seeds; fixed/broken pooled over seeds)",
        "consistency": f"2. Reproducibility across seeds (starts; the seeds all methods have: {common})",
        "overlap": f"3. Overlap: starts one method fixes and another does not (majority of seeds {common})",
        "misses": "4. How far the misses land (largest per-atom deviation of the quenched end state from the target)",
        "stability": "5. The learning-rate grid (seed 0)",
    }
    text = "# Basin study: where selection is won and lost\n\n" + intro + "\n"
    for key, (header, rows, _) in parts.items():
        text += f"\n## {titles[key]}\n\n" + markdown_table(header, rows) + "\n"
    output = Path(args.output) if args.output else folder / "analysis"
    write_json(output.with_suffix(".json"), {key: payload for key, (_, _, payload) in parts.items()} | {"seeds": seeds})
    output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
