"""Silicon point defects whose basin depends on the start: the data set of the basin-selection benchmark.

Vacancies and self-interstitials in diamond cells of 64 or 216 sites (SW lattice constant, fixed cell), each
start perturbed so that the minimum the Stillinger-Weber teacher relaxes it to depends on the perturbation
(docs/science.md). The cases (``CASES``):

============================  ============================================================================
``vacancy_breathing``         vacancy; its 4 neighbours moved inward by U(0.15, 0.40) Å (open ↔ reconstructed
                              switch at ~0.265 Å) and every atom rattled by N(0, 0.02 Å)
``vacancy_kick``              vacancy; one neighbour kicked 1 Å in a random direction (redrawn until it is
                              ≥ 1.8 Å from every atom, as for every kick), rattle 0.05 Å
``tetrahedral_kick``          interstitial at the T site (½,½,½)a kicked 1 Å, rattle 0.05 Å
``hexagonal``                 interstitial at the hexagonal site (⅝,⅝,⅝)a (a saddle), rattle 0.1 Å
``split110_kick``             ⟨110⟩ dumbbell (±1.2 Å about a lattice site); one of its atoms kicked
                              U(1.0, 1.5) Å, rattle 0.05 Å
============================  ============================================================================

Every start is relaxed by the teacher under one fixed **protocol** (:data:`PROTOCOL`): batched FIRE with ASE's
defaults (:func:`gdeq_ext.relax.fire`) in float64 to fmax < 0.01 eV/Å (at most 3000 steps), then refined by a
fresh FIRE run to fmax < 1e-4 eV/Å (at most 20000 steps). The refined structure is the target; its formation
energy E_f = E + 2εN (bulk SW energy −2ε per atom at a0) names its basin (:data:`KNOWN_MINIMA`).

Each start is an ``ase.Atoms`` with ``arrays["target"]`` (the teacher's end positions, same atom order) and
``info``: case, defect, sites, index, seed, split, basin (name), basin_energy (E_f, eV), energy (eV),
steps (FIRE steps to 0.01), refine_steps, converged. Seeds come from crc32 (stable across processes).
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from gdeq_ext.data.structures import diamond_silicon
from gdeq_ext.seeds import seed_for

__all__ = [
    "CASES",
    "KNOWN_MINIMA",
    "PROTOCOL",
    "DefectDataset",
    "basin_name",
    "make_start",
    "silicon_defects",
    "teacher_relax",
]

CASES = ("vacancy_breathing", "vacancy_kick", "tetrahedral_kick", "hexagonal", "split110_kick")
DEFECT_OF_CASE = {
    "vacancy_breathing": "vacancy",
    "vacancy_kick": "vacancy",
    "tetrahedral_kick": "interstitial",
    "hexagonal": "interstitial",
    "split110_kick": "interstitial",
}

# The relaxation protocol that defines a start's end state (docs/science.md: labels are protocol-defined).
PROTOCOL = dict(
    optimizer="FIRE (ASE defaults, gdeq_ext.relax.fire, batched, unit masses)",
    dtype="float64",
    fmax=0.01,
    max_steps=3000,
    refine_fmax=1e-4,
    refine_max_steps=20000,
    cell="fixed, SW lattice constant a0 = 5.430950 Å",
)

# SW formation energies (eV) of the minima (docs/science.md), per cell size (sites).
KNOWN_MINIMA = {
    "vacancy": {
        64: {"open": 4.337, "dimer": 4.264, "reconstructed": 2.835},
        216: {"open": 4.337, "dimer": 4.216, "reconstructed": 2.694},
    },
    "interstitial": {
        64: {"tetrahedral": 5.189, "dumbbell": 4.615, "extended": 3.859},
        216: {"tetrahedral": 5.001, "dumbbell": 4.468, "extended": 3.709},
    },
}
SW_EPSILON = 2.1683
MIN_DISTANCE = 1.8  # Å, a kicked atom from every other atom


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(seed_for(*parts))


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _cell(sites: int) -> Atoms:
    repeat = round((sites / 8) ** (1 / 3))
    if 8 * repeat**3 != sites:
        raise ValueError(f"sites must be 8·n³ (64, 216, ...), got {sites}")
    return diamond_silicon((repeat, repeat, repeat))


def _neighbours(atoms: Atoms, site: np.ndarray, count: int = 4) -> np.ndarray:
    d = atoms.get_positions() - site
    d -= np.round(d @ np.linalg.inv(atoms.cell.array)) @ atoms.cell.array
    return np.argsort(np.linalg.norm(d, axis=1))[:count]


def _kicked(rng, origin: np.ndarray, length: float, others: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """``origin`` moved by ``length`` Å in a random direction that keeps it ≥ MIN_DISTANCE from ``others``."""
    inverse = np.linalg.inv(cell)
    for _ in range(200):
        candidate = origin + length * _unit(rng)
        d = others - candidate
        d -= np.round(d @ inverse) @ cell
        if len(d) == 0 or np.linalg.norm(d, axis=1).min() >= MIN_DISTANCE:
            return candidate
    raise RuntimeError("no kick direction keeps the kicked atom clear of the others")


def make_start(case: str, sites: int = 64, seed: int = 0, index: int = 0) -> Atoms:
    """One perturbed start of ``case`` (see :data:`CASES`) in a cell of ``sites`` lattice sites.

    Deterministic in (case, sites, seed, index). The defect sits at the centre of the cell. A kick direction
    is redrawn until the kicked atom is at least ``MIN_DISTANCE`` (1.8 Å) from every other atom: kicks into
    an atom make 1.1 Å contacts that no bulk-trained potential has seen, and test the repulsive wall rather than
    basin selection.
    """
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    rng = _rng("silicon_defects", case, sites, seed, index)
    atoms = _cell(sites)
    a = atoms.cell.lengths()[0] / round((sites / 8) ** (1 / 3))
    centre = 0.5 * atoms.cell.lengths()  # a lattice site (A sublattice) of every even supercell
    positions = atoms.get_positions()
    origin = int(np.argmin(np.linalg.norm(positions - centre, axis=1)))
    site = positions[origin]
    info = {}
    if DEFECT_OF_CASE[case] == "vacancy":
        neighbours = _neighbours(atoms, site, 5)[1:]  # [0] is the site itself
        positions = atoms.get_positions()
        if case == "vacancy_breathing":
            inward = float(rng.uniform(0.15, 0.40))
            for j in neighbours:
                direction = site - positions[j]
                positions[j] += inward * direction / np.linalg.norm(direction)
            rattle, info["breathing"] = 0.02, inward
        else:
            j = neighbours[int(rng.integers(4))]
            others = np.delete(positions, [j, origin], axis=0)
            positions[j] = _kicked(rng, positions[j], 1.0, others, atoms.cell.array)
            rattle, info["kick"] = 0.05, 1.0
        atoms.set_positions(positions)
        del atoms[origin]
    else:
        if case == "tetrahedral_kick":
            extra = _kicked(rng, site + a * np.array([0.5, 0.5, 0.5]), 1.0, positions, atoms.cell.array)
            rattle, info["kick"] = 0.05, 1.0
        elif case == "hexagonal":
            extra = site + a * np.array([0.625, 0.625, 0.625])
            rattle = 0.1
        else:  # split110_kick: replace the site by a [110] dumbbell, kick one of its atoms
            axis = np.array([1.0, 1.0, 0.0]) / math.sqrt(2.0)
            kick = float(rng.uniform(1.0, 1.5))
            extra = site + 1.2 * axis
            others = np.vstack([np.delete(positions, origin, axis=0), extra])
            positions[origin] = _kicked(rng, site - 1.2 * axis, kick, others, atoms.cell.array)
            atoms.set_positions(positions)
            rattle, info["kick"] = 0.05, kick
        atoms += Atoms("Si", positions=[extra])
        atoms.wrap()
    atoms.set_positions(atoms.get_positions() + rng.normal(0.0, rattle, (len(atoms), 3)))
    atoms.info.update(case=case, defect=DEFECT_OF_CASE[case], sites=int(sites), seed=int(seed), index=int(index))
    atoms.info["rattle"] = rattle
    atoms.info.update(info)
    return atoms


def basin_name(defect: str, sites: int, formation_energy: float, tolerance: float = 0.03) -> str:
    """The name of the known SW minimum within ``tolerance`` eV of ``formation_energy``, else ``E_f=x.xxx``."""
    known = KNOWN_MINIMA.get(defect, {}).get(int(sites), {})
    if known:
        name, value = min(known.items(), key=lambda item: abs(item[1] - formation_energy))
        if abs(value - formation_energy) < tolerance:
            return name
    return f"E_f={formation_energy:.3f}"


def teacher_relax(
    starts: Sequence[Atoms], teacher=None, protocol: dict | None = None, batch_size: int = 32
) -> list[dict]:
    """Relax ``starts`` under ``protocol`` (default :data:`PROTOCOL`) with ``teacher`` (default SW).

    Runs on the device of the teacher's parameters or buffers (CPU if it has none). Returns one dict per start:
    positions (n, 3) Å (refined, float64 numpy), energy (eV), steps (to fmax), refine_steps, converged (both
    stages), fmax (eV/Å at the end).
    """
    from gdeq_ext.data.batch import Batch
    from gdeq_ext.relax.fire import fire

    if teacher is None:
        from gdeq_ext.potentials.stillinger_weber import StillingerWeber

        teacher = StillingerWeber()
    protocol = {**PROTOCOL, **(protocol or {})}
    dtype = getattr(torch, protocol["dtype"])
    tensors = [*teacher.parameters(), *teacher.buffers()] if isinstance(teacher, torch.nn.Module) else []
    device = tensors[0].device if tensors else torch.device("cpu")
    out = []
    # Same-sized structures together: FIRE's batch runs until its slowest member stops.
    order = sorted(range(len(starts)), key=lambda k: len(starts[k]))
    results: dict[int, dict] = {}
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        batch = Batch.from_ase([starts[k] for k in chunk], dtype=dtype, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = fire(teacher, batch, fmax=protocol["fmax"], max_steps=protocol["max_steps"], warn=False)
            second = fire(
                teacher,
                batch.with_positions(first.positions),
                fmax=protocol["refine_fmax"],
                max_steps=protocol["refine_max_steps"],
                warn=False,
            )
        for position, (k, (lo, hi)) in enumerate(zip(chunk, batch.ranges(), strict=True)):
            results[k] = dict(
                positions=second.positions[lo:hi].double().cpu().numpy().copy(),
                energy=float(second.energy[position]),
                steps=int(first.steps[position]),
                refine_steps=int(second.steps[position]),
                converged=bool(first.converged[position] and second.converged[position]),
                fmax=float(second.fmax[position]),
            )
    out = [results[k] for k in range(len(starts))]
    return out


@dataclass
class DefectDataset:
    """Train / validation / test starts (ase.Atoms with ``arrays["target"]`` and ``info``, module doc)."""

    train: list[Atoms]
    val: list[Atoms]
    test: list[Atoms]
    protocol: dict = field(default_factory=lambda: dict(PROTOCOL))
    path: Path | None = None

    @property
    def all(self) -> list[Atoms]:
        return [*self.train, *self.val, *self.test]

    def basin_counts(self, split: str | None = None) -> dict[str, dict[str, int]]:
        """{"case (sites)": {basin: count}} over ``split`` ("train", "val", "test") or all starts."""
        starts = self.all if split is None else getattr(self, split)
        counts: dict[str, Counter] = {}
        for atoms in starts:
            key = f"{atoms.info['case']} ({atoms.info['sites']})"
            counts.setdefault(key, Counter())[atoms.info["basin"]] += 1
        return {key: dict(sorted(value.items())) for key, value in sorted(counts.items())}

    def summary(self) -> str:
        """A markdown table: the distinct basins per case and cell size and how often each is reached."""
        lines = ["| case (sites) | starts | basins reached (count) |", "|---|---|---|"]
        for key, basins in self.basin_counts().items():
            total = sum(basins.values())
            text = ", ".join(f"{name} {count}" for name, count in sorted(basins.items(), key=lambda x: -x[1]))
            lines.append(f"| {key} | {total} | {text} |")
        return "\n".join(lines)


def _default_cache() -> Path:
    return Path(os.environ.get("GDEQ_EXT_CACHE", Path.home() / ".cache" / "gdeq_ext"))


def silicon_defects(
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 100,
    sizes: Sequence[int] = (64, 216),
    cases: Sequence[str] = CASES,
    seed: int = 0,
    cache: str | os.PathLike | bool | None = True,
    teacher=None,
    batch_size: int = 32,
) -> DefectDataset:
    """Perturbed silicon point-defect starts with teacher-relaxed targets, split into train / val / test.

    Start k (k = 0 .. n_train + n_val + n_test − 1) is case ``cases[k % len(cases)]`` in a cell of
    ``sizes[(k // len(cases)) % len(sizes)]`` sites, perturbed by a crc32-derived stream of (case, sites, seed,
    k) (:func:`make_start`). The starts are then shuffled by a seeded permutation and cut into test (the first
    ``n_test``), validation and training sets, so every split holds every case and size in about equal shares.

    Args:
        n_train, n_val, n_test: split sizes (defaults 200 / 50 / 100: the issue's held-out 100 test starts).
        sizes: cell sizes in lattice sites (default 64 and 216).
        cases: a subset of :data:`CASES` (default all five).
        seed: the data seed (different seeds give different starts).
        cache: a folder for the extxyz cache (True: ``$GDEQ_EXT_CACHE`` or ``~/.cache/gdeq_ext``; None/False: no
            cache). The file name is a crc32 of every argument and of the protocol.
        teacher: the relaxing potential (default Stillinger-Weber); a custom teacher disables the cache.
        batch_size: starts relaxed together.

    Returns:
        :class:`DefectDataset`.
    """
    import ase.io

    cases = tuple(cases)
    sizes = tuple(int(s) for s in sizes)
    for case in cases:
        if case not in CASES:
            raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    total = n_train + n_val + n_test
    key = f"{n_train}/{n_val}/{n_test}/{sizes}/{cases}/{seed}/{sorted(PROTOCOL.items())}/v1"
    path = None
    if cache and teacher is None:
        folder = _default_cache() if cache is True else Path(cache)
        path = folder / f"silicon_defects_{zlib.crc32(key.encode()):08x}.extxyz"
        if path.exists():
            structures = ase.io.read(path, index=":", format="extxyz")
            return _split(structures, path)

    starts = [
        make_start(cases[k % len(cases)], sizes[(k // len(cases)) % len(sizes)], seed=seed, index=k)
        for k in range(total)
    ]
    relaxed = teacher_relax(starts, teacher, batch_size=batch_size)
    permutation = _rng("silicon_defects/split", seed, total).permutation(total)
    split_of = {}
    for rank, k in enumerate(permutation):
        split_of[int(k)] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    out = []
    for k in permutation:
        atoms, result = starts[int(k)], relaxed[int(k)]
        atoms.arrays["target"] = result["positions"]
        formation = result["energy"] + 2.0 * SW_EPSILON * len(atoms) if teacher is None else float("nan")
        atoms.info.update(
            split=split_of[int(k)],
            teacher_energy=result["energy"],
            basin_energy=formation,
            basin=basin_name(atoms.info["defect"], atoms.info["sites"], formation) if teacher is None else "",
            steps=result["steps"],
            refine_steps=result["refine_steps"],
            converged=result["converged"],
            final_fmax=result["fmax"],
        )
        out.append(atoms)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        ase.io.write(tmp, out, format="extxyz")
        tmp.replace(path)
    return _split(out, path)


def _split(structures: list[Atoms], path: Path | None) -> DefectDataset:
    parts = {"train": [], "val": [], "test": []}
    for atoms in structures:
        atoms.calc = None
        parts[atoms.info["split"]].append(atoms)
    return DefectDataset(parts["train"], parts["val"], parts["test"], dict(PROTOCOL), path)
