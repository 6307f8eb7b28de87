"""Make the tiny example data set: silicon point-defect starts and their Stillinger-Weber relaxed references.

    python examples/make_relaxation_pairs.py            # writes examples/si_defects_{train,val}.extxyz

Twelve 2×2×2 diamond cells (64 sites, a = 5.431 Å, periodic): vacancies (63 atoms) and self-interstitials
(65 atoms) started where the basin depends on the start (METHOD.md §3): vacancy neighbours pulled inwards
(open below about 0.26 Å, reconstructed above), vacancy neighbours kicked 1 Å, tetrahedral interstitials
kicked 1 Å, hexagonal-site interstitials (a saddle: T or dumbbell family) and split-⟨110⟩ dumbbells, each
rattled by 0.05 Å. The reference is the teacher's relaxed structure from the same start under one fixed
protocol: batched FIRE (ASE's defaults) on Stillinger-Weber to fmax < 1e-4 eV/Å in float64. Seeds come from
crc32 of each start's name, so the files are reproducible. Eight pairs go to training, four to validation.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from gdeq_ext import Batch, StillingerWeber
from gdeq_ext.data import RelaxationPair, write_relaxation_pairs
from gdeq_ext.data.structures import SW_LATTICE_CONSTANT, diamond_silicon
from gdeq_ext.relax import fire
from gdeq_ext.seeds import seed_for

A = SW_LATTICE_CONSTANT
RATTLE = 0.05  # Å, Gaussian per component: small enough not to create extra bond-switch defects
KICK = 1.0  # Å


def _vacancy(name: str, inward: float = 0.0, kick: float = 0.0):
    rng = np.random.default_rng(seed_for("example", name))
    atoms = diamond_silicon((2, 2, 2), A)
    site = atoms.positions[0].copy()
    del atoms[0]
    displacement = atoms.positions - site
    displacement -= np.round(displacement @ np.linalg.inv(atoms.cell.array)) @ atoms.cell.array
    distance = np.linalg.norm(displacement, axis=1)
    neighbours = np.argsort(distance)[:4]
    for j in neighbours:
        atoms.positions[j] -= inward * displacement[j] / distance[j]
    if kick:
        j = neighbours[rng.integers(4)]
        direction = rng.normal(size=3)
        atoms.positions[j] += kick * direction / np.linalg.norm(direction)
    atoms.positions += rng.normal(0.0, RATTLE, atoms.positions.shape)
    atoms.info.update(name=name, kind="vacancy")
    return atoms


def _interstitial(name: str, site: str, kick: float = 0.0):
    rng = np.random.default_rng(seed_for("example", name))
    atoms = diamond_silicon((2, 2, 2), A)
    if site == "tetrahedral":
        atoms.append("Si")
        atoms.positions[-1] = np.array([0.5, 0.5, 0.5]) * A
    elif site == "hexagonal":
        atoms.append("Si")
        atoms.positions[-1] = np.array([0.625, 0.625, 0.625]) * A
    elif site == "dumbbell":
        centre = atoms.positions[0].copy()
        axis = np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
        atoms.positions[0] = centre + 1.1 * axis
        atoms.append("Si")
        atoms.positions[-1] = centre - 1.1 * axis
    else:
        raise ValueError(site)
    if kick:
        direction = rng.normal(size=3)
        atoms.positions[-1] += kick * direction / np.linalg.norm(direction)
    atoms.positions += rng.normal(0.0, RATTLE, atoms.positions.shape)
    atoms.wrap()
    atoms.info.update(name=name, kind=f"{site} interstitial")
    return atoms


def starts():
    train = [
        _vacancy("vacancy-inward-0.15", inward=0.15),
        _vacancy("vacancy-inward-0.35", inward=0.35),
        _vacancy("vacancy-kick-a", kick=KICK),
        _vacancy("vacancy-kick-b", kick=KICK),
        _interstitial("tetrahedral-kick-a", "tetrahedral", kick=KICK),
        _interstitial("tetrahedral-kick-b", "tetrahedral", kick=KICK),
        _interstitial("hexagonal-a", "hexagonal"),
        _interstitial("dumbbell-kick-a", "dumbbell", kick=KICK),
    ]
    val = [
        _vacancy("vacancy-inward-0.30", inward=0.30),
        _vacancy("vacancy-kick-c", kick=KICK),
        _interstitial("hexagonal-b", "hexagonal"),
        _interstitial("tetrahedral-kick-c", "tetrahedral", kick=KICK),
    ]
    return train, val


def relax_with_teacher(structures, fmax: float = 1e-4):
    """Relaxation pairs: each start with its SW-relaxed positions (ref_energy in eV, formation-free)."""
    batch = Batch.from_ase(structures, dtype=torch.float64)
    solved = fire(StillingerWeber(), batch, fmax=fmax, max_steps=20000)
    if not bool(solved.converged.all()):
        raise RuntimeError(f"the teacher did not converge: fmax {solved.fmax.tolist()}")
    pairs = []
    for atoms, (lo, hi), energy, steps in zip(
        structures, batch.ranges(), solved.energy.tolist(), solved.steps.tolist(), strict=True
    ):
        info = dict(atoms.info, ref_energy=energy, ref_fire_steps=steps)
        pairs.append(RelaxationPair(atoms, solved.positions[lo:hi].numpy().copy(), info))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, val = starts()
    for split, structures in (("train", train), ("val", val)):
        pairs = relax_with_teacher(structures)
        path = os.path.join(args.out, f"si_defects_{split}.extxyz")
        write_relaxation_pairs(path, pairs)
        e_bulk = -2.0 * 2.1683  # eV/atom: SW's cohesive energy (METHOD.md §3)
        for pair in pairs:
            formation = pair.info["ref_energy"] - e_bulk * pair.n_atoms
            print(
                f"{split:5s} {pair.info['name']:22s} {pair.n_atoms} atoms  E_f {formation:6.3f} eV  "
                f"{pair.info['ref_fire_steps']} FIRE steps"
            )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
