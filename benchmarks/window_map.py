"""How fast the differentiated map X <- X + cap(αF) reaches the relaxed structure, per α: the measurement behind the
defaults of :mod:`gdeq_ext.relax.options` (α, BPTT's T).

    python benchmarks/window_map.py                 # ~3 min on one CPU core; writes runs/benchmarks/window_map.*

On the silicon-defect starts (64-site cells, the basin study's data) with a potential (default: the basin study's
committed base MLIP, and SW, the teacher), for every α in the grid the map runs from each start for up to
``--max-steps`` steps (no graph: the map's trajectory, not its gradient). Reported per α:

* steps until fmax < 0.05 and < 0.01 eV/Å (median over starts; starts that never get there are counted apart);
* the share of starts whose X_T, for T in 50, 100, 200, 400, lies in the basin FIRE reaches from the same start
  (largest per-atom deviation of the two end states < 0.1 Å, atoms paired; the same-basin test of the study);
* the highest curvature λ_max of the Hessian at FIRE's end states (Lanczos, 30 products): the map is stable near
  a minimum only for α < 2/λ_max.

Writes JSON + markdown + PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUT, RESULTS, machine, machine_label, markdown_table, write_json  # noqa: E402

from gdeq_ext import Batch  # noqa: E402
from gdeq_ext.datasets.basins import structure_distance  # noqa: E402
from gdeq_ext.datasets.relaxations import relax_starts  # noqa: E402
from gdeq_ext.potentials import MLIP, StillingerWeber  # noqa: E402
from gdeq_ext.relax import ImplicitRelax, PolishOptions, capped_step, structure_fmax  # noqa: E402
from gdeq_ext.relax.forces import default_force_fn, edges_for, make_verlet  # noqa: E402

HORIZONS = (50, 100, 200, 400)


def trajectory(potential, batch: Batch, alpha: float, steps: int, horizons) -> tuple[dict, np.ndarray, np.ndarray]:
    """Run the map; return {T: positions at T}, and per structure the first step with fmax < 0.05 and < 0.01
    (-1: never)."""
    force_fn = default_force_fn(None)
    verlet = make_verlet(potential, 0.5)
    positions = batch.positions.detach()
    first = {0.05: np.full(batch.n_systems, -1), 0.01: np.full(batch.n_systems, -1)}
    states = {}
    for t in range(steps + 1):
        current = batch.with_positions(positions)
        _, forces = force_fn(potential, current, edges_for(verlet, current), create_graph=False)
        fmax = structure_fmax(forces, batch).cpu().numpy()
        for tol, record in first.items():
            record[(record < 0) & (fmax < tol)] = t
        if t in horizons:
            states[t] = positions.cpu().numpy().copy()
        if t == steps:
            break
        positions = (positions + capped_step(forces.detach(), alpha, 0.2)).detach()
    return states, first[0.05], first[0.01]


def measure(name: str, potential, starts, alphas, max_steps: int, dtype) -> dict:
    batch = Batch.from_ase(starts, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ends = relax_starts(potential, starts, fmax=0.01, max_steps=3000)
        end_batch = batch.with_positions(torch.as_tensor(np.concatenate([e["positions"] for e in ends]), dtype=dtype))
        relax = ImplicitRelax(potential, polish=PolishOptions(newton_steps=0, curvature_steps=30), warn=False)
        _, checked = relax._solve(end_batch, make_verlet(potential, 0.5))
    lam_max = checked.highest_curvature.cpu().numpy()
    ranges = batch.ranges()
    out = {"potential": name, "n_starts": len(starts), "lambda_max": lam_max.tolist(), "alphas": {}}
    horizons = [t for t in HORIZONS if t <= max_steps]
    for alpha in alphas:
        started = time.perf_counter()
        states, first_05, first_01 = trajectory(potential, batch, alpha, max_steps, horizons)
        same = {}
        for t, positions in states.items():
            hits = []
            for atoms, end, (lo, hi) in zip(starts, ends, ranges, strict=True):
                match = structure_distance(
                    positions[lo:hi], end["positions"], atoms.cell.array, atoms.pbc, atoms.numbers
                )
                hits.append(bool(match.max_deviation < 0.1))
            same[t] = float(np.mean(hits))
        reached_05, reached_01 = first_05[first_05 >= 0], first_01[first_01 >= 0]
        out["alphas"][alpha] = {
            "median_steps_fmax_0.05": float(np.median(reached_05)) if len(reached_05) else None,
            "median_steps_fmax_0.01": float(np.median(reached_01)) if len(reached_01) else None,
            "never_fmax_0.01": int((first_01 < 0).sum()),
            "same_basin_as_fire": same,
            "time_s": time.perf_counter() - started,
        }
        print(f"{name} α={alpha}: {out['alphas'][alpha]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.08])
    parser.add_argument("--starts", type=int, default=20, help="validation starts of the basin study used")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--model", default=str(RESULTS / "basins_full" / "base.pt"))
    parser.add_argument("--output", default=str(OUTPUT / "window_map"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import basins

    data = basins.dataset(basins.FULL)
    starts = data.val[: args.starts]
    dtype = torch.float64
    info = machine("cpu")
    print(f"window map on {len(starts)} defect starts, {machine_label(info)}", flush=True)
    results = [
        measure("base MLIP", MLIP.load(args.model).to(dtype), starts, args.alphas, args.max_steps, dtype),
        measure("SW (teacher)", StillingerWeber().to(dtype), starts, args.alphas, args.max_steps, dtype),
    ]
    header = ["potential", "α (Å²/eV)", "2/λ_max (median)", "steps to fmax 0.05", "steps to fmax 0.01", "never 0.01"]
    header += [f"same basin as FIRE at T={t}" for t in HORIZONS if t <= args.max_steps]
    rows = []
    for result in results:
        stable = 2.0 / np.nanmedian(result["lambda_max"])
        for alpha, r in result["alphas"].items():
            rows.append(
                [
                    result["potential"],
                    alpha,
                    f"{stable:.3f}",
                    r["median_steps_fmax_0.05"],
                    r["median_steps_fmax_0.01"],
                    f"{r['never_fmax_0.01']}/{result['n_starts']}",
                ]  # fmt: skip
                + [f"{100 * v:.0f} %" for v in r["same_basin_as_fire"].values()]
            )
    text = (
        f"The differentiated map X <- X + cap(αF) (cap 0.2 Å) from {len(starts)} silicon-defect starts (64 sites), "
        f"up to {args.max_steps} steps; FIRE end states from the same starts (fmax 0.01). {machine_label(info)}, "
        f"{info['date']}.\n\n" + markdown_table(header, rows) + "\n"
    )
    output = Path(args.output)
    write_json(output.with_suffix(".json"), {"machine": info, "arguments": vars(args), "results": results})
    output.with_suffix(".md").write_text(text)
    plot(results, output.with_suffix(".png"))
    print(text)
    print(f"wrote {output}.json, .md, .png")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for alpha, r in result["alphas"].items():
            horizons = [int(t) for t in r["same_basin_as_fire"]]
            ax.plot(horizons, [100 * v for v in r["same_basin_as_fire"].values()], marker="o", label=f"α = {alpha}")
        ax.set_xlabel("T (map steps)")
        ax.set_ylabel("starts in FIRE's basin at X_T (%)")
        ax.set_title(result["potential"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
