"""Force matching on tiny data (seconds): the loop, validation split, early stopping, data generators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gdeq_ext.data import Batch
from gdeq_ext.data.structures import SW_LATTICE_CONSTANT
from gdeq_ext.potentials import MLIP, StillingerWeber
from gdeq_ext.seeds import seed_for
from gdeq_ext.train import FitResult, evaluate, fit_forces, label, rattled_silicon, thermal_silicon
from gdeq_ext.train.forces import collate, prepare


def tiny_model():
    return MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=16).double()


@pytest.fixture(scope="module")
def tiny_data():
    return label(rattled_silicon(10, repeat=(1, 1, 1), amplitudes=(0.05, 0.1), seed=7))


def test_rattled_data_is_reproducible_and_varied():
    a = rattled_silicon(3, repeat=(1, 1, 1), seed=5)
    b = rattled_silicon(3, repeat=(1, 1, 1), seed=5)
    c = rattled_silicon(3, repeat=(1, 1, 1), seed=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.cell.array, y.cell.array)
    assert not np.allclose(a[0].positions, c[0].positions)
    assert [atoms.info["amplitude"] for atoms in a] == [0.05, 0.1, 0.15]
    assert seed_for("x", 1) == seed_for("x", 1) != seed_for("x", 2)
    assert abs(SW_LATTICE_CONSTANT - 5.430950) < 1e-6


def test_labels_are_the_teachers(tiny_data):
    sw = StillingerWeber()
    energy, forces = sw.energy_forces(Batch.from_ase(tiny_data[:3], dtype=torch.float64))
    np.testing.assert_allclose([a.get_potential_energy() for a in tiny_data[:3]], energy.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(np.concatenate([a.get_forces() for a in tiny_data[:3]]), forces.numpy())


def test_thermal_snapshots():
    snapshots = thermal_silicon(
        4, repeat=(1, 1, 1), temperatures=(300.0, 1200.0), equilibration_steps=5, steps_between=3, seed=1
    )
    assert len(snapshots) == 4 and [s.info["temperature"] for s in snapshots] == [
        300.0,
        300.0,
        1200.0,
        1200.0,
    ]
    assert not np.allclose(snapshots[0].positions, snapshots[1].positions)
    again = thermal_silicon(
        4, repeat=(1, 1, 1), temperatures=(300.0, 1200.0), equilibration_steps=5, steps_between=3, seed=1
    )
    np.testing.assert_allclose(snapshots[3].positions, again[3].positions)


def test_collate_matches_a_fresh_batch(tiny_data):
    model = tiny_model()
    items = prepare(model, tiny_data[:3], torch.float64)
    batch, edges, energies, forces = collate(items)
    fresh = Batch.from_ase(tiny_data[:3], dtype=torch.float64)
    torch.testing.assert_close(model.energy(batch, edges), model.energy(fresh), rtol=1e-13, atol=1e-12)
    assert energies.shape == (3,) and forces.shape == (24, 3)


def test_fit_reduces_the_error(tiny_data):
    model = tiny_model()
    items = prepare(model, tiny_data, torch.float64)
    before = evaluate(model, items)["force_mae"]
    result = fit_forces(model, tiny_data, val_fraction=0.2, epochs=6, lr=1e-2, batch_size=4, progress=False)
    assert isinstance(result, FitResult)
    assert (result.n_train, result.n_val) == (8, 2)
    assert len(result.history) == result.epochs_run == 6
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert math.isfinite(result.val_force_mae) and result.val_force_mae == min(
        h["val_force_mae"] for h in result.history
    )
    assert evaluate(model, items)["force_mae"] < before
    # The per-species reference energy was fitted (mean energy per atom), not left at zero.
    assert float(model.reference_energy.detach()[0]) < -3.0
    assert "eV/Å" in result.summary()


def test_early_stopping_and_progress_bar(tiny_data, capsys):
    model = tiny_model()
    result = fit_forces(model, tiny_data, epochs=50, lr=0.0, patience=2, batch_size=5, progress=True)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 0
    assert "fit_forces" in capsys.readouterr().err


def test_triples_explicit_validation_and_teacher(tiny_data):
    model = tiny_model()
    triples = [(a, a.get_potential_energy(), a.get_forces()) for a in tiny_data[:6]]
    result = fit_forces(model, triples, validation=tiny_data[6:], epochs=1, progress=False)
    assert (result.n_train, result.n_val) == (6, 4)
    unlabelled = rattled_silicon(3, repeat=(1, 1, 1), seed=9)
    with pytest.raises(ValueError, match="structure 0 has no teacher energy/forces"):
        fit_forces(model, unlabelled, epochs=1, progress=False)
    result = fit_forces(model, unlabelled, teacher=StillingerWeber(), epochs=1, progress=False)
    assert result.n_train == 2 and result.n_val == 1
