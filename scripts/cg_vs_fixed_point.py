"""Hessian-vector products to solve the implicit backward H u = g: CG (and MINRES) vs the DEQ fixed point.

Si point defects in 64-site cells under the Stillinger-Weber teacher, relaxed with our batched FIRE to
fmax 1e-6 eV/Å; g = dΔQ/dX* against the unrelaxed defect positions. The three solvers run on the same
batch with the same per-structure tolerance ||g - H u|| <= rtol ||g|| (translations projected out), and we
count batched HVPs per structure. The fixed point u <- g + (I - αH) u is run twice: with the window's
α = 0.01 Å²/eV, and with the α that is optimal for it, 2 / (λ_min + λ_max), from the dense Hessian
spectrum (a favour no real DEQ backward gets).

    python scripts/cg_vs_fixed_point.py [--rtol 1e-4 1e-6 1e-8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
from ase import Atoms

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients import ImplicitSolveOptions, RigidModeProjector, fixed_point_solve, solve_hessian
from gdeq_ext.loss import delta_q
from gdeq_ext.neighbors import VerletList
from gdeq_ext.potentials.base import energy_forces
from gdeq_ext.potentials.stillinger_weber import StillingerWeber
from gdeq_ext.relax import fire

A0 = 5.430950  # Å, SW's diamond lattice constant (docs/science.md)
BASIS = np.array([[0, 0, 0], [0, 2, 2], [2, 0, 2], [2, 2, 0], [1, 1, 1], [1, 3, 3], [3, 1, 3], [3, 3, 1]]) / 4


def supercell(repeat: int = 2) -> tuple[np.ndarray, np.ndarray]:
    shifts = np.array([[i, j, k] for i in range(repeat) for j in range(repeat) for k in range(repeat)])
    positions = ((BASIS[None] + shifts[:, None]).reshape(-1, 3)) * A0
    return positions, np.eye(3) * A0 * repeat


def defect_cells(seed: int = 0) -> tuple[list[Atoms], list[str]]:
    """Vacancy (rattled 0.1 Å), vacancy with its 4 neighbours moved 0.3 Å inward (reconstructs), and a
    tetrahedral interstitial (rattled 0.05 Å), all in the 64-site cell."""
    rng = np.random.default_rng(seed)
    positions, cell = supercell()
    vacancy = positions[1:]
    breathing = vacancy.copy()
    length = cell[0, 0]
    offset = breathing - positions[0]
    offset -= length * np.round(offset / length)  # minimum image: 3 of the 4 neighbours are images
    distance = np.linalg.norm(offset, axis=1)
    near = distance < 2.5
    assert near.sum() == 4
    breathing[near] -= 0.3 * offset[near] / distance[near, None]
    interstitial = np.vstack([positions, [[A0 / 2, A0 / 2, A0 / 2]]])
    starts = [
        vacancy + rng.uniform(-0.1, 0.1, vacancy.shape),
        breathing,
        interstitial + rng.uniform(-0.05, 0.05, interstitial.shape),
    ]
    names = ["vacancy (rattled)", "vacancy (breathing 0.3 Å)", "tetrahedral interstitial"]
    atoms = [Atoms(numbers=[14] * len(p), positions=p, cell=cell, pbc=True) for p in starts]
    return atoms, names


def dense_spectrum(hvp, batch: Batch, projector) -> list[tuple[float, float]]:
    """(λ_min, λ_max) of each structure's projected Hessian, excluding the 3 translation zero modes."""
    out = []
    for start, stop in batch.ranges():
        n = 3 * (stop - start)
        columns = []
        for k in range(n):
            e = torch.zeros(batch.n_atoms, 3, dtype=batch.dtype)
            e.view(-1)[3 * start + k] = 1.0
            columns.append(projector(hvp(projector(e)))[start:stop].reshape(-1))
        eigenvalues = torch.linalg.eigvalsh(torch.stack(columns, 1))[3:]
        out.append((float(eigenvalues[0]), float(eigenvalues[-1])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtol", type=float, nargs="+", default=[1e-4, 1e-6, 1e-8])
    parser.add_argument("--max-iter", type=int, default=20000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    # Two shared cores: intra-op threads only contend (torch.repeat_interleave ran 50x slower with 2).
    torch.set_num_threads(1)

    sw = StillingerWeber()
    atoms, names = defect_cells()
    start = Batch.from_ase(atoms, dtype=torch.float64)
    relaxed = fire(sw, start, fmax=1e-6, max_steps=5000, verlet=VerletList(sw.cutoff, 0.5))
    batch = start.with_positions(relaxed.positions)
    x = relaxed.positions.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(delta_q(x, start.positions, batch).sum(), x)

    xg = relaxed.positions.clone().requires_grad_(True)
    _, forces = energy_forces(sw, batch.with_positions(xg), relaxed.edges, create_graph=True)

    def hvp(v):
        return -torch.autograd.grad(forces, xg, v, retain_graph=True)[0]

    projector = RigidModeProjector(relaxed.positions, batch.system, batch.n_systems, batch.pbc)
    spectrum = dense_spectrum(hvp, batch, projector)
    optimal_alpha = torch.tensor([2.0 / (lo + hi) for lo, hi in spectrum], dtype=torch.float64)

    rows = []
    for rtol in args.rtol:
        runs = {
            "cg": ImplicitSolveOptions(solver="cg", rtol=rtol, max_iter=args.max_iter, warn=False),
            "minres": ImplicitSolveOptions(solver="minres", rtol=rtol, max_iter=args.max_iter, warn=False),
            "fixed point α=0.01": ImplicitSolveOptions(
                solver="fixed_point", rtol=rtol, max_iter=args.max_iter, fixed_point_alpha=0.01, warn=False
            ),
        }
        results = {}
        for label, options in runs.items():
            _, info = solve_hessian(hvp, g, batch, projector, options)
            results[label] = info
        # α varies per structure here (a tensor), which ImplicitSolveOptions does not offer.
        _, info = fixed_point_solve(
            hvp,
            g,
            batch.system,
            batch.n_systems,
            alpha=optimal_alpha,
            rtol=rtol,
            max_iter=args.max_iter,
            project=projector,
            warn=False,
        )
        results["fixed point α*=2/(λmin+λmax)"] = info
        for s, name in enumerate(names):
            row = {"structure": name, "rtol": rtol}
            for label, info in results.items():
                row[label] = int(info.iterations[s]) if bool(info.converged[s]) else f">{int(info.iterations[s])}"
            rows.append(row)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, float64, CPU")
    print(f"FIRE to fmax 1e-6 eV/Å: steps {relaxed.steps.tolist()}, fmax {[f'{v:.1e}' for v in relaxed.fmax]}")
    cohesive = -2 * sw.params["epsilon"]  # eV/atom of the perfect crystal
    formation = relaxed.energy - start.n_atoms_per_system.to(torch.float64) * cohesive
    print(
        "formation energies (eV): " + ", ".join(f"{n} {e:.3f}" for n, e in zip(names, formation.tolist(), strict=True))
    )
    for name, (lo, hi) in zip(names, spectrum, strict=True):
        print(f"{name}: Hessian spectrum without translations [{lo:.4f}, {hi:.2f}] eV/Å², κ = {hi / lo:.0f}")
    labels = [k for k in rows[0] if k not in ("structure", "rtol")]
    print()
    print("| structure | rtol | " + " | ".join(labels) + " | fixed point (α=0.01) / CG |")
    print("|---|---|" + "---|" * (len(labels) + 1))
    for row in rows:
        cg, fp = row["cg"], row["fixed point α=0.01"]
        ratio = (f"{fp / cg:.1f}x" if isinstance(fp, int) else f">{int(fp[1:]) / cg:.1f}x") if cg else "-"
        print(
            f"| {row['structure']} | {row['rtol']:.0e} | " + " | ".join(str(row[k]) for k in labels) + f" | {ratio} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "rows": rows,
                    "spectrum": spectrum,
                    "names": names,
                    "formation_energy_eV": formation.tolist(),
                    "fire_steps": relaxed.steps.tolist(),
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
