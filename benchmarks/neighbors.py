"""Neighbor lists: gdeq_ext's cell list against vesin, matscipy and ASE (each measured when installed).

    python benchmarks/neighbors.py --quick            # CPU, CI scale: 64 ... 4096 atoms, 1 ... 64 structures
    python benchmarks/neighbors.py                    # CPU: 64 ... 32,768 atoms, 1 ... 512 structures
    python benchmarks/neighbors.py --device cuda      # GPU too (kernel, vesin's GPU path, Verlet reuse)

Systems: diamond silicon (a = 5.431 Å) n³ cubic supercells, 64 ... 32,768 atoms, rattled 0.02 Å; and batches of
1 ... 512 different rattles of the 64-atom cell. Cutoff 5.0 Å, full list (28 neighbors per atom).

CPU: one thread for every code (torch.set_num_threads(1) for ours, vesin's n_threads=1; matscipy and ASE are
single-threaded); ours with every core as an extra column. gdeq_ext is called through the public
``gdeq_ext.neighbor_list`` (Python checks included) on packed tensors; a batch is one call, while vesin,
matscipy and ASE (which have no batching) loop over its structures. GPU: per-call wall time including the call's
synchronization (our kernel reads the pair count back; vesin's GPU path syncs too), and the number of host
synchronizations per call counted with torch.cuda.set_sync_debug_mode.

Timing: two warm-up calls, then repeated samples of >= 2 ms each (several calls per sample for fast codes); the
median per-call time. Before timing, every code's pair count is checked against ours (and the full (i, j, shift)
sets for vesin), so a fast wrong answer cannot enter the table.

Writes benchmarks/results/neighbors.{json,png,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUT, machine, machine_label, markdown_table, write_json  # noqa: E402

import gdeq_ext  # noqa: E402
from gdeq_ext.neighbors import VerletList  # noqa: E402
from gdeq_ext.neighbors.neighbor_list import OP_AVAILABLE  # noqa: E402
from gdeq_ext.profiling import count_syncs  # noqa: E402

CUTOFF = 5.0
REPEATS = {True: (2, 3, 4, 6, 8), False: (2, 3, 4, 6, 8, 12, 16)}  # n for n³ 8-atom cells
BATCHES = {True: (1, 8, 64), False: (1, 8, 64, 512)}
ASE_MAX_ATOMS = {True: 512, False: 4096}  # ASE takes 0.3-0.6 s at 4096 atoms; beyond that it only costs time
ASE_MAX_STRUCTURES = {True: 8, False: 64}
# The figures the issue names (2-core AMD EPYC, one thread; H100).
TARGETS = {
    "cpu_vesin_ms": {64: 0.12, 512: 0.74, 4096: 6.1},
    "cpu_matscipy_ms": {64: 0.28, 512: 2.2, 4096: 18.9},
    "gpu_ms_up_to_4k_atoms": 0.1,
    "gpu_512x64_ms": 0.39,
}


# ------------------------------------------------------------------------------------------------ systems
def silicon(repeat: int, seed: int = 0):
    atoms = bulk("Si", "diamond", a=5.431, cubic=True) * (repeat, repeat, repeat)
    atoms.rattle(0.02, seed=seed)
    return atoms


def packed(structures, device="cpu", dtype=torch.float64):
    """(positions, cell, pbc, n_atoms_per_system) for gdeq_ext.neighbor_list."""
    positions = torch.tensor(np.concatenate([a.positions for a in structures]), dtype=dtype, device=device)
    cell = torch.tensor(np.stack([a.cell.array for a in structures]), dtype=dtype, device=device)
    pbc = torch.tensor(np.stack([a.pbc for a in structures]), device=device)
    counts = torch.tensor([len(a) for a in structures], device=device)
    return positions, cell, pbc, counts


# --------------------------------------------------------------------------------------------- competitors
def competitors():
    """name -> function(list of ase.Atoms) -> (i, j, S) concatenated over structures, for what is installed."""
    found = {}
    try:
        import vesin

        calculator = vesin.NeighborList(cutoff=CUTOFF, full_list=True, n_threads=1)

        def run_vesin(structures):
            return [calculator.compute(a.positions, a.cell.array, True, "ijS") for a in structures]

        found["vesin"] = run_vesin
    except ImportError:
        pass
    try:
        from matscipy.neighbours import neighbour_list

        found["matscipy"] = lambda structures: [neighbour_list("ijS", a, CUTOFF) for a in structures]
    except ImportError:
        pass
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    found["ase"] = lambda structures: [ase_neighbor_list("ijS", a, CUTOFF) for a in structures]
    return found


def version(name: str) -> str:
    try:
        return __import__(name).__version__
    except (ImportError, AttributeError):
        return "not installed"


# ------------------------------------------------------------------------------------------------- timing
def median_ms(fns: dict, min_time: float, sync=lambda: None) -> dict:
    """Median ms per call of each function, sampled round-robin so that all of them see the same machine
    load (a shared 2-core machine drifts by 1.5x between minutes)."""
    inner = {}
    for name, fn in fns.items():
        fn()
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, int(0.002 / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in fns}
    deadline = time.perf_counter() + min_time * len(fns)
    while len(samples[next(iter(fns))]) < 5 or (time.perf_counter() < deadline and len(samples[next(iter(fns))]) < 200):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def check_against(name, ours, theirs, structures):
    """Same pair count as ours; for vesin the same (i, j, shift) sets."""
    edge_index, shifts = ours
    count = sum(len(result[0]) for result in theirs)
    if count != edge_index.shape[1]:
        raise SystemExit(f"{name} finds {count} pairs but gdeq_ext finds {edge_index.shape[1]}: not timing a mismatch")
    if name != "vesin":
        return
    start, want = 0, set()
    for atoms, (i, j, s) in zip(structures, theirs, strict=True):
        want |= {
            (a + start, b + start, *c) for a, b, c in zip(i.tolist(), j.tolist(), np.asarray(s).tolist(), strict=True)
        }
        start += len(atoms)
    got = {tuple(r) for r in torch.cat([edge_index.T, shifts], 1).cpu().tolist()}
    if got != want:
        raise SystemExit("vesin and gdeq_ext disagree on the (i, j, shift) sets")


# -------------------------------------------------------------------------------------------------- CPU
def bench_cpu(quick: bool, min_time: float) -> dict:
    others = competitors()
    rows = {"supercells": [], "batches": []}
    cases = [("supercells", [silicon(r)], len(silicon(r))) for r in REPEATS[quick]]
    cases += [("batches", [silicon(2, seed=s) for s in range(b)], b) for b in BATCHES[quick]]
    for kind, structures, size in cases:
        n_atoms = sum(len(a) for a in structures)
        tensors = packed(structures)
        torch.set_num_threads(os.cpu_count())
        ours = gdeq_ext.neighbor_list(tensors, CUTOFF)
        row = {"size": size, "atoms": n_atoms, "pairs": int(ours[0].shape[1])}
        row["ours_all_threads_ms"] = median_ms({"ours": lambda t=tensors: gdeq_ext.neighbor_list(t, CUTOFF)}, min_time)[
            "ours"
        ]
        torch.set_num_threads(1)
        timed = {"ours": lambda t=tensors: gdeq_ext.neighbor_list(t, CUTOFF)}
        for name, fn in others.items():
            too_big = name == "ase" and (
                n_atoms > ASE_MAX_ATOMS[quick] if kind == "supercells" else size > ASE_MAX_STRUCTURES[quick]
            )
            row[f"{name}_ms"] = None
            if not too_big:
                check_against(name, ours, fn(structures), structures)
                if name != "ase":  # ASE is 50-100x slower: timed on its own, briefly
                    timed[name] = lambda s=structures, f=fn: f(s)
        for name, ms in median_ms(timed, min_time).items():
            row[f"{name}_ms"] = ms
        if (
            "ase" in others
            and row["ase_ms"] is None
            and not (n_atoms > ASE_MAX_ATOMS[quick] if kind == "supercells" else size > ASE_MAX_STRUCTURES[quick])
        ):
            row["ase_ms"] = median_ms({"ase": lambda s=structures: others["ase"](s)}, 0.0)["ase"]
        rows[kind].append(row)
        timings = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms") and v)
        print(f"cpu {kind:10s} {size:6d}: {timings}")
    return rows


# -------------------------------------------------------------------------------------------------- GPU
def bench_gpu(quick: bool, min_time: float) -> dict:
    device = "cuda"
    sync = torch.cuda.synchronize
    vesin = None
    try:
        import vesin as _vesin

        vesin = _vesin.NeighborList(cutoff=CUTOFF, full_list=True)
    except ImportError:
        pass
    rows = {"supercells": [], "batches": [], "verlet": []}
    cases = [("supercells", [silicon(r)], len(silicon(r))) for r in REPEATS[quick]]
    cases += [("batches", [silicon(2, seed=s) for s in range(b)], b) for b in BATCHES[quick]]
    for kind, structures, size in cases:
        row = {"size": size, "atoms": sum(len(a) for a in structures)}
        for dtype in (torch.float64, torch.float32):
            tensors = packed(structures, device, dtype)
            ours = gdeq_ext.neighbor_list(tensors, CUTOFF)
            want = gdeq_ext.neighbor_list(packed(structures, "cpu", dtype), CUTOFF)
            if not (torch.equal(ours[0].cpu(), want[0]) and torch.equal(ours[1].cpu(), want[1])):
                raise SystemExit(f"CUDA and CPU lists differ ({kind} {size}, {dtype})")
            tag = "f64" if dtype == torch.float64 else "f32"
            row["pairs"] = int(ours[0].shape[1])
            call = {"ours": lambda t=tensors: gdeq_ext.neighbor_list(t, CUTOFF)}
            row[f"ours_{tag}_ms"] = median_ms(call, min_time, sync)["ours"]
            row[f"ours_{tag}_syncs"] = count_syncs(lambda t=tensors: gdeq_ext.neighbor_list(t, CUTOFF))
        if vesin is not None:
            inputs = [
                (torch.tensor(a.positions, device=device), torch.tensor(a.cell.array, device=device))
                for a in structures
            ]

            def run_vesin(inputs=inputs):
                return [vesin.compute(p, c, True, "ijS") for p, c in inputs]

            try:
                count = sum(len(r[0]) for r in run_vesin())
                if count != row["pairs"]:
                    raise SystemExit(f"vesin (GPU) finds {count} pairs, gdeq_ext {row['pairs']}")
                row["vesin_ms"] = median_ms({"vesin": run_vesin}, min_time, sync)["vesin"]
            except (RuntimeError, ValueError) as error:  # a vesin build without its CUDA path
                row["vesin_ms"] = None
                row["vesin_error"] = str(error)[:200]
        rows[kind].append(row)
        print(f"gpu {kind:10s} {size:6d}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("size",)))

    # A reused Verlet list: the exact per-call check (one small sync) and the max_step mode (none).
    for kind, structures in (("4096 atoms", [silicon(8)]), ("512 x 64 atoms", [silicon(2, s) for s in range(512)])):
        batch = gdeq_ext.Batch.from_ase(structures, device=device, dtype=torch.float32)
        for mode, max_step in (("exact check", None), ("max_step=0.2", 0.2)):
            verlet = VerletList(CUTOFF, skin=1.0, max_step=max_step)
            verlet(batch)
            verlet(batch)
            ms = median_ms({"verlet": lambda v=verlet, b=batch: v(b)}, min_time, sync)["verlet"]
            waits = verlet.host_waits
            syncs = count_syncs(lambda v=verlet, b=batch: v(b))
            rows["verlet"].append(
                {
                    "system": kind,
                    "mode": mode,
                    "ms": ms,
                    "syncs": syncs,
                    "host_waits": waits,
                    "rebuilds": verlet.rebuilds,
                }
            )
            print(f"gpu verlet {kind} {mode}: {ms:.3f} ms, {syncs} syncs, rebuilds {verlet.rebuilds}")
    return rows


# ------------------------------------------------------------------------------------------------ output
LABELS = {
    "ours_ms": "gdeq_ext (1 thread)",
    "ours_all_threads_ms": "gdeq_ext (all cores)",
    "ours_f64_ms": "gdeq_ext float64",
    "ours_f32_ms": "gdeq_ext float32",
    "vesin_ms": "vesin (1 thread)",
}


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def label_of(where: str, key: str) -> str:
    if where == "gpu" and key == "vesin_ms":
        return "vesin (GPU)"
    return LABELS.get(key, key.removesuffix("_ms"))


def markdown(results: dict) -> str:
    cpu = results.get("cpu")
    info = results["machine"]
    lines = [
        f"Neighbor lists, diamond Si, cutoff {CUTOFF} Å, full list (28 neighbors per atom). "
        f"CPU: {info['cpu']} ({info['cpu_cores']} cores), one thread per code; median ms per call "
        f"(gdeq_ext {results['versions']['gdeq_ext']}, vesin {results['versions']['vesin']}, "
        f"matscipy {results['versions']['matscipy']}, ASE {results['versions']['ase']}; {info['date']}). "
        "Codes are sampled round-robin, so ratios compare like with like even on a loaded machine.",
        "",
    ]
    header = [
        "atoms",
        "pairs",
        "gdeq_ext",
        f"gdeq_ext ({info['cpu_cores']} thr.)",
        "vesin",
        "matscipy",
        "ASE",
        "vesin / gdeq_ext",
    ]

    def table(rows, first):
        body = []
        for r in rows:
            ratio = r["vesin_ms"] / r["ours_ms"] if r.get("vesin_ms") else None
            body.append(
                [
                    r["size"] if first != "atoms" else r["atoms"],
                    r["pairs"],
                    fmt(r["ours_ms"]),
                    fmt(r["ours_all_threads_ms"]),
                    fmt(r.get("vesin_ms")),
                    fmt(r.get("matscipy_ms")),
                    fmt(r.get("ase_ms"), 1),
                    fmt(ratio, 2) + "×" if ratio else "—",
                ]
            )
        return markdown_table([first, *header[1:]], body)

    if "cpu" in results:
        lines += ["**One structure (Si supercell)**", "", table(cpu["supercells"], "atoms"), ""]
        lines += [
            "**Batches of 64-atom cells** (gdeq_ext: one call; others: a loop over the structures)",
            "",
            table(cpu["batches"], "structures"),
            "",
        ]
    gpu = results.get("gpu")
    if gpu:
        lines += [f"**GPU: {results['gpu_machine']['gpu']}** (per call, including its host synchronization)", ""]
        body = []
        for kind in ("supercells", "batches"):
            for r in gpu[kind]:
                label = f"{r['atoms']} atoms" if kind == "supercells" else f"{r['size']} × 64 atoms"
                body.append(
                    [
                        label,
                        r["pairs"],
                        fmt(r["ours_f64_ms"]),
                        fmt(r["ours_f32_ms"]),
                        r["ours_f32_syncs"],
                        fmt(r.get("vesin_ms")),
                    ]
                )
        lines += [
            markdown_table(["system", "pairs", "gdeq_ext f64", "gdeq_ext f32", "host syncs", "vesin (GPU)"], body),
            "",
        ]
        body = [[r["system"], r["mode"], fmt(r["ms"]), r["syncs"], r["host_waits"]] for r in gpu["verlet"]]
        lines += [
            "**Reused Verlet list on GPU** (skin 1 Å, no atom moved)",
            "",
            markdown_table(["system", "reuse check", "ms per call", "host syncs", "waits on the previous check"], body),
            "",
        ]
    else:
        lines += ["GPU: not measured on this machine (no CUDA device visible).", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cpu", "supercells", "atoms"), ("cpu", "batches", "size")] if results.get("cpu") else []
    if results.get("gpu"):
        panels += [("gpu", "supercells", "atoms"), ("gpu", "batches", "size")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (where, kind, x_key) in zip(axes[0], panels, strict=True):
        rows = results[where][kind]
        keys = [k for k in rows[0] if k.endswith("_ms")]
        for key in keys:
            points = [(r[x_key], r[key]) for r in rows if r.get(key)]
            if points:
                ax.loglog(*zip(*points, strict=True), "o-", label=label_of(where, key))
        ax.set_xlabel("atoms" if x_key == "atoms" else "structures of 64 atoms")
        ax.set_ylabel("ms per call")
        ax.set_title(f"{where.upper()}: {kind}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    label = machine_label(results["machine"])
    if results.get("gpu"):
        label += " | " + results["gpu_machine"]["gpu"]
    fig.suptitle(f"Neighbor lists, diamond Si, cutoff {CUTOFF} Å — {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI scale: fewer sizes, shorter timing")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "all"),
        default="all",
        help="all (default): CPU, and GPU when one is visible",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=OUTPUT / "neighbors",
        help="prefix of the outputs (default untracked; committed: benchmarks/results/neighbors)",
    )
    parser.add_argument("--repeats", type=int, nargs="+", help="n of the n³-cell supercells (default: by --quick)")
    parser.add_argument("--batches", type=int, nargs="+", help="structures per batch (default: by --quick)")
    args = parser.parse_args()
    REPEATS[args.quick] = tuple(args.repeats or REPEATS[args.quick])
    BATCHES[args.quick] = tuple(args.batches or BATCHES[args.quick])
    if not OP_AVAILABLE:
        raise SystemExit("gdeq_ext's neighbor_list kernel is not built: pip install --no-build-isolation .")
    min_time = 0.1 if args.quick else 0.5
    threads = torch.get_num_threads()
    results = {
        "machine": {**machine("cpu"), "torch_threads": 1},
        "cutoff": CUTOFF,
        "quick": args.quick,
        "versions": {name: version(name) for name in ("gdeq_ext", "vesin", "matscipy", "ase")},
        "targets": TARGETS,
    }
    if args.device in ("cpu", "all"):
        results["cpu"] = bench_cpu(args.quick, min_time)
    torch.set_num_threads(threads)
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no CUDA device is visible")
        results["gpu_machine"] = machine("cuda")
        results["gpu"] = bench_gpu(args.quick, min_time)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output.with_suffix(".json"), results)
    args.output.with_suffix(".md").write_text(markdown(results) + "\n")
    plot(results, args.output.with_suffix(".png"))
    print(f"wrote {args.output.with_suffix('.json')}, .md, .png")


if __name__ == "__main__":
    main()
