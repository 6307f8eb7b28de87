"""The packed Batch layout: round trips through ASE, device/dtype moves, and validation errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from gdeq_ext import Batch, BatchValidationError
from gdeq_ext.testing import devices


def structures():
    si = bulk("Si", cubic=True)
    si.rattle(0.05, seed=1)
    water = molecule("H2O")  # non-periodic, zero cell
    slab = bulk("Si", cubic=True).repeat((1, 1, 2))
    slab.pbc = (True, True, False)
    custom = bulk("Si")
    custom.set_masses([30.0, 31.0])
    return [si, water, slab, custom]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_through_ase(device, dtype):
    atoms_list = structures()
    batch = Batch.from_ase(atoms_list, device=device, dtype=dtype)
    assert batch.n_systems == 4 and batch.n_atoms == sum(len(a) for a in atoms_list)
    assert batch.positions.dtype == dtype and batch.cell.dtype == dtype and batch.masses.dtype == dtype
    assert batch.numbers.dtype == torch.int64 and batch.system.dtype == torch.int64
    assert batch.system.tolist() == sum(([s] * len(a) for s, a in enumerate(atoms_list)), [])
    assert batch.ptr.tolist() == [0, 8, 11, 27, 29]
    back = batch.to_ase()
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for original, restored in zip(atoms_list, back, strict=True):
        np.testing.assert_allclose(restored.positions, original.positions, atol=atol)
        np.testing.assert_allclose(restored.cell.array, original.cell.array, atol=atol)
        np.testing.assert_array_equal(restored.numbers, original.numbers)
        np.testing.assert_array_equal(restored.pbc, original.pbc)
        np.testing.assert_allclose(restored.get_masses(), original.get_masses(), rtol=1e-6)


def test_to_moves_and_casts_only_floating_tensors():
    batch = Batch.from_ase(structures(), dtype=torch.float64)
    single = batch.to(dtype=torch.float32)
    assert single.positions.dtype == torch.float32 and single.masses.dtype == torch.float32
    assert single.numbers.dtype == torch.int64 and single.pbc.dtype == torch.bool
    assert batch.positions.dtype == torch.float64  # the original is untouched
    meta = batch.to("meta")
    assert meta.positions.device.type == "meta" and meta.pbc.device.type == "meta"


def test_single_atoms_object_and_empty_structure_are_allowed():
    batch = Batch.from_ase(bulk("Si"))
    assert batch.n_systems == 1
    empty = Atoms(cell=np.eye(3) * 5, pbc=True)
    batch = Batch.from_ase([bulk("Si"), empty, bulk("Si")])
    assert batch.n_atoms_per_system.tolist() == [2, 0, 2]
    assert batch.system.tolist() == [0, 0, 2, 2]


def test_with_positions_checks_shape():
    batch = Batch.from_ase(structures())
    moved = batch.with_positions(batch.positions + 1)
    assert moved.cell is batch.cell
    with pytest.raises(BatchValidationError, match="positions must have shape"):
        batch.with_positions(batch.positions[:3])


def test_empty_list():
    with pytest.raises(BatchValidationError, match="empty list"):
        Batch.from_ase([])


def test_not_atoms():
    with pytest.raises(BatchValidationError, match="structure 1: expected ase.Atoms"):
        Batch.from_ase([bulk("Si"), "Si"])


def test_nan_position_names_structure_and_atom():
    atoms_list = structures()
    atoms_list[2].positions[5, 1] = np.nan
    with pytest.raises(BatchValidationError, match=r"structure 2: atom 5 has a non-finite position"):
        Batch.from_ase(atoms_list)
    atoms_list = structures()
    atoms_list[0].positions[0, 0] = np.inf
    with pytest.raises(BatchValidationError, match=r"structure 0: atom 0"):
        Batch.from_ase(atoms_list)


def test_singular_cell():
    atoms = bulk("Si", cubic=True)
    atoms.cell = [[5.4, 0, 0], [10.8, 0, 0], [0, 0, 5.4]]
    with pytest.raises(BatchValidationError, match="structure 1: the periodic lattice vectors are linearly dependent"):
        Batch.from_ase([bulk("Si"), atoms])


def test_periodic_axis_with_zero_vector():
    atoms = bulk("Si", cubic=True)
    atoms.cell = [[5.4, 0, 0], [0, 0, 0], [0, 0, 5.4]]
    with pytest.raises(BatchValidationError, match="structure 0: axis 1 is periodic but its lattice vector is zero"):
        Batch.from_ase([atoms])
    atoms.pbc = (True, False, True)  # fine once the axis is not periodic
    Batch.from_ase([atoms])


def test_left_handed_cell():
    atoms = bulk("Si", cubic=True)
    atoms.cell = -atoms.cell.array
    with pytest.raises(BatchValidationError, match="structure 0: left-handed cell"):
        Batch.from_ase([atoms])


def test_mismatched_lengths_and_dtypes():
    batch = Batch.from_ase(structures(), dtype=torch.float64)
    with pytest.raises(BatchValidationError, match="sums to"):
        Batch.from_tensors(batch.positions, batch.numbers, batch.cell, batch.pbc, [8, 3, 16, 3])
    with pytest.raises(BatchValidationError, match="numbers must have shape"):
        Batch.from_tensors(batch.positions, batch.numbers[:-1], batch.cell, batch.pbc, batch.n_atoms_per_system)
    with pytest.raises(BatchValidationError, match="cell has dtype"):
        Batch.from_tensors(batch.positions, batch.numbers, batch.cell.float(), batch.pbc, batch.n_atoms_per_system)
    with pytest.raises(BatchValidationError, match="cell is on meta"):
        Batch.from_tensors(batch.positions, batch.numbers, batch.cell.to("meta"), batch.pbc, batch.n_atoms_per_system)


def test_from_tensors_default_masses():
    batch = Batch.from_tensors(
        torch.zeros(2, 3, dtype=torch.float64).index_fill_(0, torch.tensor([1]), 1.0),
        torch.tensor([14, 1]),
        torch.zeros(1, 3, 3, dtype=torch.float64),
        torch.zeros(1, 3, dtype=torch.bool),
        [2],
    )
    torch.testing.assert_close(batch.masses, torch.tensor([28.085, 1.008], dtype=torch.float64), atol=1e-3, rtol=0)
