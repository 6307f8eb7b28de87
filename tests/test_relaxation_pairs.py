"""Relaxation pairs: extxyz round trip, validation errors that name the frame, packing, the example files."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from ase.build import bulk

from gdeq_ext.data import (
    Batch,
    RelaxationDataError,
    RelaxationPair,
    RelaxationPairs,
    read_relaxation_pairs,
    write_relaxation_pairs,
)
from gdeq_ext.data.relaxation_pairs import REFERENCE_ARRAY

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _pair(seed: int, n_repeat: int = 1) -> RelaxationPair:
    rng = np.random.default_rng(seed)
    start = bulk("Si", "diamond", a=5.431, cubic=True) * (n_repeat, n_repeat, n_repeat)
    reference = start.positions.copy() + 0.3
    start.positions += rng.normal(0.0, 0.1, start.positions.shape)
    return RelaxationPair(start, reference, {"kind": f"test-{seed}", "ref_energy": -34.5 + seed})


def test_round_trip_keeps_positions_references_and_info(tmp_path):
    pairs = RelaxationPairs([_pair(0), _pair(1), _pair(2, n_repeat=2)])
    path = tmp_path / "pairs.extxyz"
    write_relaxation_pairs(path, pairs)
    back = read_relaxation_pairs(path)
    assert len(back) == 3 and [p.n_atoms for p in back] == [8, 8, 64]
    for original, read in zip(pairs, back, strict=True):
        np.testing.assert_allclose(read.start.positions, original.start.positions, atol=1e-8, rtol=0)
        np.testing.assert_allclose(read.reference, original.reference, atol=1e-8, rtol=0)
        np.testing.assert_array_equal(read.start.numbers, original.start.numbers)
        np.testing.assert_allclose(read.start.cell.array, original.start.cell.array, atol=1e-8)
        assert read.info["kind"] == original.info["kind"]
        assert read.info["ref_energy"] == pytest.approx(original.info["ref_energy"])
        assert REFERENCE_ARRAY not in read.start.arrays
    # The file is ordinary extxyz: ASE alone reads the reference column.
    import ase.io

    frames = ase.io.read(path, index=":")
    np.testing.assert_allclose(frames[2].arrays[REFERENCE_ARRAY], pairs[2].reference, atol=1e-8)


def test_batch_packs_starts_and_references():
    pairs = RelaxationPairs([_pair(0), _pair(1, n_repeat=2), _pair(2)])
    batch, reference = pairs.batch([2, 1], dtype=torch.float32)
    assert isinstance(batch, Batch) and batch.n_systems == 2
    assert batch.n_atoms_per_system.tolist() == [8, 64]
    assert reference.shape == (72, 3) and reference.dtype == torch.float32
    np.testing.assert_allclose(reference[:8].numpy(), pairs[2].reference, atol=1e-6)
    np.testing.assert_allclose(batch.positions[8:].numpy(), pairs[1].start.positions, atol=1e-5)
    assert isinstance(pairs[1:], RelaxationPairs) and len(pairs[1:]) == 2


def test_mismatched_atom_counts_name_the_frame():
    starts = [bulk("Si", "diamond", a=5.431, cubic=True) for _ in range(3)]
    references = [atoms.copy() for atoms in starts]
    del references[2][3]
    with pytest.raises(RelaxationDataError, match=r"frame 2: the start has 8 atoms but the reference has 7"):
        RelaxationPairs.from_structures(starts, references)
    with pytest.raises(RelaxationDataError, match=r"3 start structures but 2 references"):
        RelaxationPairs.from_structures(starts, references[:2])
    with pytest.raises(RelaxationDataError, match=r"frame 1: the start has 8 atoms but the reference has 5"):
        RelaxationPairs([_pair(0), RelaxationPair(starts[0], np.zeros((5, 3)))])


def test_species_cell_and_pbc_mismatches_name_the_frame():
    start = bulk("Si", "diamond", a=5.431, cubic=True)
    other = start.copy()
    other.numbers[5] = 6
    with pytest.raises(RelaxationDataError, match=r"frame 0: atom 5 is Si \(Z=14\) in the start but C \(Z=6\)"):
        RelaxationPairs.from_structures([start], [other])
    strained = start.copy()
    strained.set_cell(start.cell.array * 1.01, scale_atoms=True)
    with pytest.raises(RelaxationDataError, match=r"frame 1: the start and reference cells differ by up to 0.0543"):
        RelaxationPairs.from_structures([start, start], [start.copy(), strained])
    slab = start.copy()
    slab.pbc = (True, True, False)
    with pytest.raises(RelaxationDataError, match=r"frame 0: pbc differ"):
        RelaxationPairs.from_structures([start], [slab])


def test_non_finite_and_bad_cells_name_the_frame():
    pair = _pair(0)
    pair.reference[4, 1] = np.nan
    with pytest.raises(RelaxationDataError, match=r"frame 1: reference position of atom 4 is not finite"):
        RelaxationPairs([_pair(1), pair])
    flat = _pair(2)
    flat.start.set_cell(np.diag([5.431, 5.431, 0.0]))
    with pytest.raises(RelaxationDataError, match=r"frame 0: axis 2 is periodic but its lattice vector is zero"):
        RelaxationPairs([flat])


def test_malformed_extxyz_names_the_frame(tmp_path):
    good = tmp_path / "good.extxyz"
    write_relaxation_pairs(good, [_pair(0), _pair(1), _pair(2)])
    lines = good.read_text().splitlines()
    truncated = tmp_path / "truncated.extxyz"
    truncated.write_text("\n".join(lines[: 2 * 10 + 5]) + "\n")  # frames 0 and 1 whole, frame 2 cut off
    with pytest.raises(RelaxationDataError, match=r"truncated.extxyz: frame 2 is not valid extended XYZ"):
        read_relaxation_pairs(truncated)
    garbled = tmp_path / "garbled.extxyz"
    bad = list(lines)
    bad[10 + 2 + 3] = "Si  1.0  not-a-number  2.0  0.0 0.0 0.0"  # frame 1, atom 3
    garbled.write_text("\n".join(bad) + "\n")
    with pytest.raises(RelaxationDataError, match=r"garbled.extxyz: frame 1 is not valid extended XYZ"):
        read_relaxation_pairs(garbled)
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(RelaxationDataError, match=r"no frames"):
        read_relaxation_pairs(empty)
    with pytest.raises(FileNotFoundError, match=r"missing.extxyz"):
        read_relaxation_pairs(tmp_path / "missing.extxyz")


def test_frames_without_references_and_the_two_file_layout(tmp_path):
    import ase.io

    starts = [_pair(k).start for k in range(3)]
    plain = tmp_path / "starts.extxyz"
    ase.io.write(plain, starts, format="extxyz")
    with pytest.raises(RelaxationDataError, match=r"starts.extxyz: frame 0 has no per-atom 'ref_positions' array"):
        read_relaxation_pairs(plain)
    references = [atoms.copy() for atoms in starts]
    for atoms in references:
        atoms.positions += 0.05
    refs = tmp_path / "refs.extxyz"
    ase.io.write(refs, references, format="extxyz")
    pairs = read_relaxation_pairs(plain, references=refs)
    np.testing.assert_allclose(pairs[1].reference, references[1].positions, atol=1e-8)
    references[1] = references[1][:-1]
    ase.io.write(refs, references, format="extxyz")
    mismatch = r"starts.extxyz: frame 1: the start has 8 atoms but the reference has 7"
    with pytest.raises(RelaxationDataError, match=mismatch):
        read_relaxation_pairs(plain, references=refs)


def test_example_data_set_is_valid():
    train = read_relaxation_pairs(EXAMPLES / "si_defects_train.extxyz")
    val = read_relaxation_pairs(EXAMPLES / "si_defects_val.extxyz")
    assert len(train) == 8 and len(val) == 4
    assert {p.n_atoms for p in (*train, *val)} == {63, 65}
    assert all(set(p.start.numbers) == {14} for p in train)
    # The references are the teacher's minima: Stillinger-Weber forces vanish there (8 decimals on disk).
    from gdeq_ext import StillingerWeber

    batch, reference = val.batch()
    _, forces = StillingerWeber().energy_forces(batch.with_positions(reference))
    assert float(forces.norm(dim=1).max()) < 1e-3
