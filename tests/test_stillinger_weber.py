"""Stillinger-Weber: against matscipy (independent implementation), exact facts, batching, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.build import bulk

from gdeq_ext.data import Batch
from gdeq_ext.potentials import StillingerWeber, hessian_vector_product
from gdeq_ext.potentials.stillinger_weber import SW_SILICON, edge_pairs
from gdeq_ext.testing import DTYPES, stable_seed

A0 = 4 * 2 ** (1 / 6) * SW_SILICON["sigma"] / math.sqrt(3)
EPSILON = SW_SILICON["epsilon"]


def matscipy_sw():
    manybody = pytest.importorskip("matscipy.calculators.manybody")
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
        Stillinger_Weber_PRB_31_5262_Si,
    )
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
        StillingerWeber as SWForm,
    )

    # matscipy's form is (cos θ + costheta0)²; it stores 1/3 to 12 digits, we pass it exactly.
    parameters = dict(Stillinger_Weber_PRB_31_5262_Si, costheta0=1.0 / 3.0)
    return manybody.Manybody(**SWForm(parameters))


def rattled(repeat, amplitude, seed, cubic=True):
    atoms = bulk("Si", "diamond", a=A0, cubic=cubic) * repeat
    atoms.rattle(amplitude, seed=stable_seed("sw", seed))
    return atoms


@pytest.fixture(scope="module")
def sw():
    return StillingerWeber()


@pytest.mark.parametrize("repeat", [(2, 2, 2), (3, 3, 3)], ids=["64", "216"])
def test_matches_matscipy_float64(sw, repeat):
    atoms = rattled(repeat, 0.15, repeat)
    atoms.calc = matscipy_sw()
    energy, forces = sw.energy_forces(Batch.from_ase(atoms, dtype=torch.float64))
    assert abs(float(energy[0]) - atoms.get_potential_energy()) < 1e-8
    assert np.abs(forces.numpy() - atoms.get_forces()).max() < 1e-7


@pytest.mark.parametrize("case", ["primitive", "sheared"])
def test_matches_matscipy_in_small_cells(sw, case):
    # Cells whose lattice vectors are barely longer than the cutoff: several images of one atom are
    # neighbours, which a minimum-image shortcut gets wrong by eV.
    rng = np.random.default_rng(stable_seed("small", case))
    atoms = bulk("Si", "diamond", a=A0) if case == "primitive" else bulk("Si", "diamond", a=A0, cubic=True)
    if case == "sheared":
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.05 * rng.standard_normal((3, 3))), scale_atoms=True)
    atoms.positions += 0.1 * rng.standard_normal(atoms.positions.shape)
    atoms.calc = matscipy_sw()
    energy, forces = sw.energy_forces(Batch.from_ase(atoms, dtype=torch.float64))
    assert abs(float(energy[0]) - atoms.get_potential_energy()) < 1e-8
    assert np.abs(forces.numpy() - atoms.get_forces()).max() < 1e-7


def test_float32_close_to_float64(sw):
    atoms = rattled((2, 2, 2), 0.1, "f32")
    e64, f64 = sw.energy_forces(Batch.from_ase(atoms, dtype=torch.float64))
    e32, f32 = sw.energy_forces(Batch.from_ase(atoms, dtype=torch.float32))
    assert e32.dtype == f32.dtype == torch.float32
    assert abs(float(e32[0]) - float(e64[0])) < 1e-5 * abs(float(e64[0]))
    assert float((f32.double() - f64).abs().max()) < 1e-4


def test_lattice_constant_and_cohesive_energy(sw):
    assert abs(A0 - 5.430950) < 1e-6
    for atoms in (bulk("Si", "diamond", a=A0), bulk("Si", "diamond", a=A0, cubic=True) * (2, 2, 2)):
        energy, forces = sw.energy_forces(Batch.from_ase(atoms, dtype=torch.float64))
        assert abs(float(energy[0]) / len(atoms) - (-2 * EPSILON)) < 1e-9
        assert round(float(energy[0]) / len(atoms), 4) == -4.3366
        assert float(forces.abs().max()) < 1e-10
    # a0 is the minimum of E(a) along the diamond path.
    energies = [
        float(sw.energy(Batch.from_ase(bulk("Si", "diamond", a=a), dtype=torch.float64))[0])
        for a in (A0 - 0.01, A0, A0 + 0.01)
    ]
    assert energies[1] < energies[0] and energies[1] < energies[2]


def test_unrelaxed_vacancy(sw):
    perfect = bulk("Si", "diamond", a=A0, cubic=True) * (2, 2, 2)
    vacancy = perfect.copy()
    del vacancy[0]
    batch = Batch.from_ase([perfect, vacancy], dtype=torch.float64)
    energy, forces = sw.energy_forces(batch)
    formation = float(energy[1]) - 63 / 64 * float(energy[0])
    assert abs(formation - 2 * EPSILON) < 1e-9
    # Second neighbours (3.840 Å) lie outside the 3.771 Å cutoff: the vacancy's neighbours feel nothing
    # but φ2'(2^(1/6) σ), which is zero only to the 10 digits A and B are given to (~1e-10 eV/Å).
    assert float(forces.abs().max()) < 1e-9


def test_batch_equals_separate_and_verlet_edges(sw):
    structures = [
        rattled((1, 1, 1), 0.1, 1),
        rattled((2, 1, 1), 0.05, 2),
        rattled((1, 1, 1), 0.1, 3, cubic=False),
    ]
    batch = Batch.from_ase(structures, dtype=torch.float64)
    energy, forces = sw.energy_forces(batch)
    for s, (atoms, (lo, hi)) in enumerate(zip(structures, batch.ranges(), strict=True)):
        e, f = sw.energy_forces(Batch.from_ase(atoms, dtype=torch.float64))
        torch.testing.assert_close(energy[s : s + 1], e, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(forces[lo:hi], f, rtol=1e-12, atol=1e-12)
    # A list with a 1 Å skin: the extra pairs contribute exactly nothing.
    from gdeq_ext.neighbors import neighbor_list
    from gdeq_ext.potentials import Edges

    skin = Edges(*neighbor_list(batch, sw.cutoff + 1.0))
    e_skin, f_skin = sw.energy_forces(batch, edges=skin)
    torch.testing.assert_close(e_skin, energy, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(f_skin, forces, rtol=1e-13, atol=1e-12)


def test_hessian_vector_product_matches_force_differences(sw):
    batch = Batch.from_ase(rattled((1, 1, 1), 0.1, "hvp"), dtype=torch.float64)
    v = torch.randn(batch.n_atoms, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = hessian_vector_product(sw, batch, v)
    h = 1e-5
    _, f_plus = sw.energy_forces(batch.with_positions(batch.positions + h * v))
    _, f_minus = sw.energy_forces(batch.with_positions(batch.positions - h * v))
    torch.testing.assert_close(hv, -(f_plus - f_minus) / (2 * h), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_follows_batch(sw, dtype):
    energy, forces = sw.energy_forces(Batch.from_ase(rattled((1, 1, 1), 0.05, "dtype"), dtype=dtype))
    assert energy.dtype == forces.dtype == dtype and forces.shape == (8, 3)


def test_edge_pairs_enumerates_each_angle_once():
    centers = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    first, second = edge_pairs(centers, 4)
    got = {tuple(sorted(pair)) for pair in zip(first.tolist(), second.tolist(), strict=True)}
    want = {(a, b) for a in range(7) for b in range(a + 1, 7) if centers[a] == centers[b]}
    assert got == want and len(first) == len(want)
    empty = edge_pairs(torch.zeros(0, dtype=torch.long), 3)
    assert empty[0].numel() == 0


def test_save_load_roundtrip(tmp_path):
    custom = StillingerWeber(lam=31.5, epsilon=1.64833)
    custom.save(tmp_path / "sw.pt")
    loaded = StillingerWeber.load(tmp_path / "sw.pt")
    assert loaded.hyperparameters() == custom.hyperparameters()
    batch = Batch.from_ase(rattled((1, 1, 1), 0.1, "save"), dtype=torch.float64)
    torch.testing.assert_close(loaded.energy(batch), custom.energy(batch), rtol=0, atol=0)


def test_bad_input_is_named(sw):
    good, other = rattled((1, 1, 1), 0.05, "bad1"), rattled((1, 1, 1), 0.05, "bad2")
    nan = other.copy()
    nan.positions[3, 1] = np.nan
    batch = Batch.from_ase([good, other], dtype=torch.float64)
    positions = batch.positions.clone()
    positions[8 + 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"structure 1: atom 3 has a non-finite position"):
        sw.energy(batch.with_positions(positions))

    overlap = other.copy()
    overlap.positions[5] = overlap.positions[2] + [0.05, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"structure 1: atom (2 overlaps atom 5|5 overlaps atom 2) \(distance 0\.05"):
        sw.energy(Batch.from_ase([good, overlap], dtype=torch.float64))

    germanium = other.copy()
    germanium.numbers[[4, 6]] = 32
    with pytest.raises(ValueError, match=r"structure 1: atoms \[4, 6\] have atomic number\(s\) \[32\]"):
        sw.energy(Batch.from_ase([good, germanium], dtype=torch.float64))
