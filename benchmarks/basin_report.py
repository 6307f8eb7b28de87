"""The basin-selection study's statistics, table and figure, from its finished cells (benchmarks/basins.py).

Everything here reads cell JSONs and never trains: ``python benchmarks/basins.py --report FOLDER`` re-renders a
study's summary at any time, finished or not (methods with fewer seeds than the protocol are marked).

Statistics (per method, over the seeds run at its chosen learning rate):

* correct basins per 100 test starts, mean ± std over seeds, and a 95 % bootstrap interval of the seed-mean
  (starts resampled with replacement, 2000 draws, the same draws for every method);
* paired per-start comparisons against the base and against BPTT: for every (seed, start) pair, "fixed" (method
  correct, reference wrong) and "broken" (the reverse); the exact McNemar test is the two-sided binomial test of
  fixed vs broken at p = 1/2 (``scipy.stats.binomtest``), pooled over seeds and per seed. Pooling treats the seeds'
  runs on one start as independent trials, which they are not quite (same start); the per-seed p-values and the
  sign of every seed's difference are reported beside the pooled one for that reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

BOOTSTRAP_DRAWS = 2000
SIGNIFICANCE = 0.05


def mcnemar(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value of ``fixed`` vs ``broken`` discordant pairs (1.0 when there are none)."""
    from scipy.stats import binomtest

    n = fixed + broken
    return 1.0 if n == 0 else float(binomtest(fixed, n, 0.5).pvalue)


def discordant(method: list[list[bool]], reference: list[list[bool]]) -> tuple[int, int]:
    """(fixed, broken) over paired (seed, start) outcomes; ``reference`` rows pair with ``method`` rows."""
    pairs = [(m, r) for row_m, row_r in zip(method, reference, strict=True) for m, r in zip(row_m, row_r, strict=True)]
    return sum(m and not r for m, r in pairs), sum(r and not m for m, r in pairs)


def bootstrap_interval(outcomes: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    """95 % percentile interval of the seed-mean correct share (×100) over bootstrap resamples of the starts.

    Args:
        outcomes: (n_seeds, n_starts) bool.
        draws: (n_draws, n_starts) int, resampled start indices (shared by all methods).
    """
    per_draw = outcomes[:, draws].mean(axis=(0, 2)) * 100.0  # (n_draws,)
    low, high = np.percentile(per_draw, [2.5, 97.5])
    return float(low), float(high)


def _fmt_p(p: float) -> str:
    mark = " *" if p < SIGNIFICANCE else ""
    return (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}") + mark


def aggregate(cells: dict, protocol: dict) -> dict:
    """The study's summary from its cells.

    Args:
        cells: {"base": base cell, "methods": {name: {"grid": {lr: cell}, "seeds": {seed: cell}, "chosen_lr": lr,
            "memory": {...}}}} as benchmarks/basins.py collects them.
        protocol: the study's protocol (seeds, test size, ...).

    Returns:
        a JSON-able dict: per method the per-seed numbers, mean/std/CI and the paired tests.
    """
    base = cells.get("base")
    n_test = protocol["n_test"]
    rng = np.random.default_rng(20261203)
    draws = rng.integers(0, n_test, size=(BOOTSTRAP_DRAWS, n_test))
    summary = {"protocol": protocol, "methods": {}}
    base_correct = None
    if base is not None:
        base_correct = np.array(base["test"]["per_start_correct"], dtype=bool)
        summary["base"] = {
            "correct": int(base_correct.sum()),
            "direct_correct": base["test"]["direct_correct"],
            "dq_mean": base["test"]["dq_mean"],
            "ci95": bootstrap_interval(base_correct[None, :], draws),
            "diagnosis": base.get("diagnosis"),
        }
    bptt_outcomes = None
    for name, record in cells["methods"].items():
        seeds = [record["seeds"][s] for s in sorted(record["seeds"])]
        if not seeds:
            summary["methods"][name] = {
                "seeds_done": 0,
                "chosen_lr": record.get("chosen_lr"),
                "grid": _grid(record),
                "memory": record.get("memory"),
                "memory_only": bool(record.get("memory_only")),
            }
            continue
        outcomes = np.array([s["test"]["per_start_correct"] for s in seeds], dtype=bool)
        correct = outcomes.sum(axis=1).astype(float)
        entry = {
            "seeds_done": len(seeds),
            "seeds": [s["seed"] for s in seeds],
            "chosen_lr": record.get("chosen_lr"),
            "grid": _grid(record),
            "correct": correct.tolist(),
            "correct_mean": float(correct.mean() * 100.0 / n_test),
            "correct_std": float(correct.std(ddof=1) * 100.0 / n_test) if len(seeds) > 1 else None,
            "ci95": bootstrap_interval(outcomes, draws),
            "direct_correct": [s["test"]["direct_correct"] for s in seeds],
            "dq": [s["test"]["dq_mean"] for s in seeds],
            "train_time_s": [s["train"]["train_time_s"] for s in seeds],
            "cell_time_s": [s.get("cell_time_s") for s in seeds],
            "failed": [s["train"]["failed"] for s in seeds if s["train"]["failed"]],
            "skipped": [s["train"].get("skipped", 0) for s in seeds],
            "memory": record.get("memory"),
        }
        if base_correct is not None:
            reference = [base_correct.tolist()] * len(seeds)
            entry["vs_base"] = _paired(outcomes, reference)
        summary["methods"][name] = entry
        if name.startswith("BPTT") and "checkpointed" not in name:
            bptt_outcomes = (name, {s["seed"]: s["test"]["per_start_correct"] for s in seeds})
    if bptt_outcomes is not None:
        bptt_name, by_seed = bptt_outcomes
        for name, entry in summary["methods"].items():
            if name == bptt_name or not entry.get("seeds_done"):
                continue
            record = cells["methods"][name]
            common = [s for s in sorted(record["seeds"]) if s in by_seed]
            if not common:
                continue
            method_rows = [record["seeds"][s]["test"]["per_start_correct"] for s in common]
            entry["vs_bptt"] = _paired(np.array(method_rows, dtype=bool), [by_seed[s] for s in common])
    return summary


def _grid(record: dict) -> list[dict]:
    return [
        {
            "lr": float(lr),
            "val_correct": cell["val"]["correct"] if cell.get("val") else None,
            "val_dq": cell["val"]["dq_mean"] if cell.get("val") else None,
            "test_correct": cell["test"]["correct"],
            "failed": cell["train"]["failed"],
        }
        for lr, cell in sorted(record["grid"].items(), key=lambda item: float(item[0]))
    ]


def _paired(outcomes: np.ndarray, reference) -> dict:
    rows = outcomes.tolist()
    fixed, broken = discordant(rows, reference)
    per_seed = []
    for row, ref in zip(rows, reference, strict=True):
        f, b = discordant([row], [ref])
        per_seed.append({"fixed": f, "broken": b, "p": mcnemar(f, b)})
    return {"fixed": fixed, "broken": broken, "p": mcnemar(fixed, broken), "per_seed": per_seed}


def markdown(summary: dict, machine_label: str) -> str:
    """The study's table: one row per method, with its paired tests (``*``: p < 0.05)."""
    protocol = summary["protocol"]
    n_test = protocol["n_test"]
    header = [
        "method",
        "lr (chosen on val)",
        "seeds",
        "correct /100 (mean ± std)",
        "95 % CI",
        "direct /100",
        "ΔQ (Å·amu½)",
        "vs base: fixed/broken, p",
        "vs BPTT: fixed/broken, p",
        "peak memory",
        "fine-tune time / seed",
    ]
    rows = []
    base = summary.get("base")
    if base:
        rows.append(
            [
                "base (no fine-tuning)",
                "—",
                "—",
                f"{100.0 * base['correct'] / n_test:.0f}",
                f"{base['ci95'][0]:.0f}–{base['ci95'][1]:.0f}",
                f"{100.0 * base['direct_correct'] / n_test:.0f}",
                f"{base['dq_mean']:.3f}",
                "—",
                "—",
                "—",
                "—",
            ]
        )
    for name, entry in summary["methods"].items():
        memory = entry.get("memory") or {}
        peak = f"{memory['peak_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in memory else "—"
        if entry.get("memory_only"):
            note = "— (the same gradient as BPTT, bit for bit: memory only)"
            rows.append([name, note, "—", "—", "—", "—", "—", "—", "—", peak, "—"])
            continue
        if not entry.get("seeds_done"):
            grid = ", ".join(f"{g['lr']:.0e}" for g in entry["grid"])
            rows.append([name, f"grid so far: {grid or '—'}", "0", "—", "—", "—", "—", "—", "—", peak, "—"])
            continue
        scale = 100.0 / n_test
        std = entry["correct_std"]
        direct = np.array(entry["direct_correct"], dtype=float) * scale
        dq = np.array(entry["dq"])
        paired = []
        for key in ("vs_base", "vs_bptt"):
            test = entry.get(key)
            paired.append(f"{test['fixed']}/{test['broken']}, {_fmt_p(test['p'])}" if test else "—")
        failed = f" ({len(entry['failed'])} stopped early)" if entry["failed"] else ""
        rows.append(
            [
                name + failed,
                f"{entry['chosen_lr']:.0e}" if entry.get("chosen_lr") else "—",
                f"{entry['seeds_done']}/{protocol['seeds']}",
                f"{entry['correct_mean']:.1f}" + (f" ± {std:.1f}" if std is not None else ""),
                f"{entry['ci95'][0]:.0f}–{entry['ci95'][1]:.0f}",
                f"{direct.mean():.1f}",
                f"{dq.mean():.3f}" + (f" ± {dq.std(ddof=1):.3f}" if len(dq) > 1 else ""),
                *paired,
                peak,
                f"{np.mean(entry['train_time_s']):.0f} s",
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    heading = (
        f"Silicon point defects: {protocol['n_train']} training / {protocol['n_val']} validation / {n_test} test "
        f"starts in {', '.join(map(str, protocol['sizes']))}-site cells; {protocol['steps']} Adam steps × "
        f"{protocol['batch_size']} starts per method, gradient clip {protocol['clip']}, lr from "
        f"{protocol['lrs']} chosen on the validation starts (seed 0), {protocol['seeds']} seeds, "
        f"{protocol['dtype']}, Newton polish {'on' if protocol['polish'] else 'off'}; {machine_label}. Correct: the "
        "student's FIRE end state, quenched by SW, within 0.1 Å of SW's end state from the same start (largest "
        "per-atom deviation, atoms paired, net translation removed); 'direct': the end state itself within 0.4 Å. "
        "Paired tests: exact McNemar on (seed, start) pairs pooled over seeds; * p < 0.05."
    )
    return heading + "\n\n" + "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """Correct basins (mean, CI) and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_test = summary["protocol"]["n_test"]
    names, means, low, high, memory = [], [], [], [], []
    if summary.get("base"):
        base = summary["base"]
        names.append("base")
        means.append(100.0 * base["correct"] / n_test)
        low.append(base["ci95"][0])
        high.append(base["ci95"][1])
        memory.append(math.nan)
    for name, entry in summary["methods"].items():
        if not entry.get("seeds_done"):
            continue
        names.append(name)
        means.append(entry["correct_mean"])
        low.append(entry["ci95"][0])
        high.append(entry["ci95"][1])
        mem = (entry.get("memory") or {}).get("peak_bytes")
        memory.append(mem / 2**20 if mem else math.nan)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    x = np.arange(len(names))
    err = np.array([np.array(means) - np.array(low), np.array(high) - np.array(means)])
    axes[0].bar(x, means, yerr=np.clip(err, 0, None), color="tab:blue", capsize=3)
    axes[0].set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    axes[0].set_ylabel(f"correct basins per 100 test starts (of {n_test}); 95 % bootstrap CI")
    axes[1].bar(x, memory, color="tab:orange")
    axes[1].set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    axes[1].set_ylabel("peak memory of one training step (MiB)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
