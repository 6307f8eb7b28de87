"""Training structures for force matching, made with ASE (no download): bulk diamond silicon only.

* :func:`rattled_silicon` — diamond cells with Gaussian displacements (and optional small strains);
* :func:`thermal_silicon` — snapshots of Langevin molecular dynamics under the teacher at a few
  temperatures (thermally perturbed cells: correlated displacements a rattle does not produce);
* :func:`label` — attach teacher energies and forces (a ``SinglePointCalculator``) to each structure.

No vacancies or interstitials are generated on purpose: the base model of the science benchmarks must not
be fitted to the defect basins it is later asked to find (docs/science.md). Seeds come from crc32 of the
arguments (:func:`seed_for`), so data sets are reproducible across processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from gdeq_ext.data.batch import Batch
from gdeq_ext.data.structures import SW_LATTICE_CONSTANT, diamond_silicon
from gdeq_ext.potentials.base import energy_forces
from gdeq_ext.seeds import seed_for

__all__ = [
    "SW_LATTICE_CONSTANT",
    "diamond_silicon",
    "label",
    "rattled_silicon",
    "seed_for",
    "silicon_dataset",
    "thermal_silicon",
]


def _strained(atoms: Atoms, rng: np.random.Generator, strain: float) -> Atoms:
    if strain > 0:
        eps = rng.uniform(-strain, strain, (3, 3))
        eps = 0.5 * (eps + eps.T)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return atoms


def rattled_silicon(
    n: int,
    repeat: Sequence[int] = (2, 2, 2),
    amplitudes: Sequence[float] = (0.05, 0.1, 0.15, 0.2),
    strain: float = 0.02,
    seed: int = 0,
    a: float = SW_LATTICE_CONSTANT,
) -> list[Atoms]:
    """``n`` diamond cells, each strained by up to ±``strain`` (symmetric, uniform) and rattled.

    Structure k uses the Gaussian displacement standard deviation ``amplitudes[k % len(amplitudes)]``
    (Å per Cartesian component; docs/science.md: keep ≤ 0.2 Å to avoid bond-switch defects).
    """
    out = []
    for k in range(n):
        rng = np.random.default_rng(seed_for("rattled", seed, k, tuple(repeat)))
        atoms = _strained(diamond_silicon(repeat, a), rng, strain)
        amplitude = float(amplitudes[k % len(amplitudes)])
        atoms.positions += rng.normal(0.0, amplitude, atoms.positions.shape)
        atoms.info.update(kind="rattled", amplitude=amplitude)
        out.append(atoms)
    return out


def thermal_silicon(
    n: int,
    potential=None,
    repeat: Sequence[int] = (2, 2, 2),
    temperatures: Sequence[float] = (300.0, 900.0, 1500.0),
    equilibration_steps: int = 100,
    steps_between: int = 20,
    timestep_fs: float = 2.0,
    strain: float = 0.0,
    seed: int = 0,
    a: float = SW_LATTICE_CONSTANT,
) -> list[Atoms]:
    """``n`` snapshots of Langevin MD under ``potential`` (default: SW), spread over ``temperatures``.

    One trajectory per temperature (K): velocities drawn at 2T (half the kinetic energy flows into
    potential energy), ``equilibration_steps`` discarded, then a snapshot every ``steps_between`` steps of
    ``timestep_fs`` fs. Costs about n·steps_between + len(temperatures)·equilibration_steps force calls.
    """
    from ase import units
    from ase.md.langevin import Langevin

    from gdeq_ext.ase import GDEQCalculator

    if potential is None:
        from gdeq_ext.potentials.stillinger_weber import StillingerWeber

        potential = StillingerWeber()
    counts = [n // len(temperatures) + (1 if k < n % len(temperatures) else 0) for k in range(len(temperatures))]
    out = []
    for temperature, count in zip(temperatures, counts, strict=True):
        if count == 0:
            continue
        rng = np.random.default_rng(seed_for("thermal", seed, temperature, tuple(repeat)))
        atoms = _strained(diamond_silicon(repeat, a), rng, strain)
        atoms.calc = GDEQCalculator(potential)
        # Maxwell-Boltzmann momenta (amu·Å/ASE-time): what ASE's helper draws, without its version churn.
        kinetic_scale = np.sqrt(atoms.get_masses() * units.kB * 2.0 * temperature)[:, None]
        atoms.set_momenta(rng.standard_normal((len(atoms), 3)) * kinetic_scale)
        # fixcm=False: ASE deprecates its centre-of-mass fix (not exact NVT); a drift is harmless here.
        dynamics = Langevin(
            atoms, timestep_fs * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng
        )
        dynamics.run(equilibration_steps)
        for _ in range(count):
            dynamics.run(steps_between)
            snapshot = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
            snapshot.info.update(kind="thermal", temperature=float(temperature))
            out.append(snapshot)
    return out


def label(structures: Sequence[Atoms], potential=None, batch_size: int = 16) -> list[Atoms]:
    """Copies of ``structures`` with the teacher's energy (eV) and forces (eV/Å) in a SinglePointCalculator.

    ``potential`` defaults to Stillinger-Weber; evaluated in float64, ``batch_size`` structures per call.
    """
    if potential is None:
        from gdeq_ext.potentials.stillinger_weber import StillingerWeber

        potential = StillingerWeber()
    labelled = []
    for start in range(0, len(structures), batch_size):
        chunk = [atoms.copy() for atoms in structures[start : start + batch_size]]
        batch = Batch.from_ase(chunk, dtype=torch.float64)
        energies, forces = energy_forces(potential, batch)
        for atoms, energy, (lo, hi) in zip(chunk, energies.tolist(), batch.ranges(), strict=True):
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces[lo:hi].numpy().copy())
            labelled.append(atoms)
    return labelled


def silicon_dataset(
    n_rattled: int,
    n_thermal: int,
    repeat: Sequence[int] = (2, 2, 2),
    potential=None,
    seed: int = 0,
    **kwargs,
) -> list[Atoms]:
    """Rattled plus thermal diamond-Si cells, labelled by ``potential`` (default SW), in that order.

    ``kwargs`` go to :func:`rattled_silicon` (``amplitudes``, ``strain``) and :func:`thermal_silicon`
    (``temperatures``, ``equilibration_steps``, ``steps_between``, ``timestep_fs``) by name.
    """
    rattle_keys = {"amplitudes", "strain", "a"}
    thermal_keys = {"temperatures", "equilibration_steps", "steps_between", "timestep_fs", "a"}
    unknown = set(kwargs) - rattle_keys - thermal_keys
    if unknown:
        raise TypeError(f"silicon_dataset got unexpected arguments {sorted(unknown)}")
    structures = rattled_silicon(n_rattled, repeat, seed=seed, **{k: v for k, v in kwargs.items() if k in rattle_keys})
    structures += thermal_silicon(
        n_thermal, potential, repeat, seed=seed, **{k: v for k, v in kwargs.items() if k in thermal_keys}
    )
    return label(structures, potential)
