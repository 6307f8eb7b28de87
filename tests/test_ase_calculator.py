"""GDEQCalculator: same numbers as energy_forces, and ASE's optimizers relax with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.optimize import BFGS, FIRE

from gdeq_ext.ase import GDEQCalculator
from gdeq_ext.data import Batch
from gdeq_ext.potentials import MLIP, StillingerWeber, energy_forces
from gdeq_ext.testing import DTYPES, stable_seed

A0 = 5.430950


def rattled_si(amplitude=0.1, seed="calc"):
    atoms = bulk("Si", "diamond", a=A0, cubic=True)
    atoms.rattle(amplitude, seed=stable_seed(seed))
    return atoms


def test_properties():
    assert set(GDEQCalculator.implemented_properties) >= {"energy", "forces", "free_energy"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sw", "mlip"])
def test_results_equal_energy_forces(kind, dtype):
    potential = StillingerWeber() if kind == "sw" else MLIP().to(dtype)
    atoms = rattled_si()
    atoms.calc = GDEQCalculator(potential, dtype=dtype)
    energy, forces = energy_forces(potential, Batch.from_ase(atoms, dtype=dtype))
    assert atoms.get_potential_energy() == float(energy[0])
    assert atoms.get_potential_energy(force_consistent=True) == float(energy[0])
    np.testing.assert_array_equal(atoms.get_forces(), forces.numpy().astype(np.float64))
    assert atoms.get_forces().dtype == np.float64


def test_dtype_defaults_to_the_potentials():
    assert GDEQCalculator(StillingerWeber()).dtype == torch.float64
    assert GDEQCalculator(MLIP().double()).dtype == torch.float64
    assert GDEQCalculator(MLIP().float()).dtype == torch.float32


def test_fire_relaxes_rattled_silicon_under_sw():
    atoms = rattled_si(0.1, "fire")
    atoms.calc = GDEQCalculator(StillingerWeber())
    start = atoms.get_potential_energy()
    assert FIRE(atoms, logfile=None).run(fmax=1e-3, steps=500)
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 1e-3
    # A 0.1 Å rattle falls back into the perfect crystal: E = −2ε per atom.
    assert start > atoms.get_potential_energy()
    assert abs(atoms.get_potential_energy() / len(atoms) - (-2 * 2.1683)) < 1e-6


def test_recalculates_after_a_change_and_bfgs_runs_with_mlip():
    atoms = rattled_si(0.05, "bfgs")
    atoms.calc = GDEQCalculator(MLIP().double())
    before = atoms.get_potential_energy()
    atoms.positions[0] += [0.05, 0.0, 0.0]
    assert atoms.get_potential_energy() != before
    optimizer = BFGS(atoms, logfile=None)
    optimizer.run(fmax=1e-2, steps=5)
    assert np.isfinite(atoms.get_potential_energy())
