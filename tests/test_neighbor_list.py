"""The cell-list neighbor list: exact pair sets against the brute-force oracle and ASE, batches, edge cases,
bad inputs, CPU <-> CUDA identity, and the GPU buffer-overflow retry.

The property tests draw 1,300 random batches (strongly skewed triclinic cells, cells thinner than the cutoff,
mixed periodicity, zero cells on open axes, atoms far outside the cell, single atoms, empty structures) and
require the *exact same* (i, j, shift) lists, in the same order, as the brute-force reference, and the same
sets as ``ase.neighborlist.neighbor_list``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gdeq_ext
from gdeq_ext.neighbors.neighbor_list import OP_AVAILABLE
from gdeq_ext.neighbors.reference import neighbor_list_reference
from gdeq_ext.profiling import count_syncs
from gdeq_ext.testing import devices, requires_cuda

requires_kernel = pytest.mark.skipif(not OP_AVAILABLE, reason="compiled neighbor_list op not built")
PROPERTY = settings(
    deadline=None,
    derandomize=True,  # the same cases on every run and machine
    database=None,  # write nothing into the source tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------------ helpers
def run_kernel(positions, cell, pbc, counts, cutoff, full=True, **kwargs):
    return torch.ops.gdeq_ext.neighbor_list(positions, cell, pbc, counts, float(cutoff), full, **kwargs)


def as_set(edge_index, shifts, offset=0):
    rows = torch.cat([edge_index.T - offset, shifts], dim=1).cpu().tolist()
    return {tuple(r) for r in rows}


def random_structure(rng: np.random.Generator, n_atoms: int, kind: str):
    """(positions (n, 3), cell (3, 3), pbc (3,)) float64 numpy; ``kind`` picks the geometry."""
    pbc = rng.random(3) < 0.75 if kind != "open" else np.zeros(3, dtype=bool)
    if kind == "skewed":  # strongly sheared triclinic cell
        length = rng.uniform(2.0, 5.0)
        cell = length * (np.eye(3) + np.triu(rng.uniform(-2.5, 2.5, (3, 3)), k=1))
        cell = cell[rng.permutation(3)] if rng.random() < 0.5 else cell
    elif kind == "thin":  # cells thinner than the cutoff: several images per axis
        cell = np.diag(rng.uniform(1.0, 2.5, 3)) + rng.uniform(-0.4, 0.4, (3, 3))
    else:
        cell = np.diag(rng.uniform(2.5, 7.0, 3)) + rng.uniform(-1.0, 1.0, (3, 3))
    if np.linalg.det(cell) < 0:
        cell[0] = -cell[0]
    if rng.random() < 0.3:  # open axes may carry a zero vector
        cell[~pbc] = 0.0
    fractional = rng.uniform(-0.2, 1.2, (n_atoms, 3))
    positions = fractional @ np.where(pbc[:, None], cell, np.diag(rng.uniform(2.0, 6.0, 3)))
    if kind == "far" and n_atoms:  # far outside the cell along periodic axes (and far away on open ones)
        jumps = rng.integers(-1000, 1000, (n_atoms, 3)) * pbc
        positions = positions + jumps @ cell + rng.uniform(-50, 50, 3) * ~pbc
    return positions, cell, pbc


KINDS = ["box", "skewed", "thin", "far", "open"]


@st.composite
def batches(draw, max_structures=4, max_atoms=10):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_structures = draw(st.integers(1, max_structures))
    structures = []
    for _ in range(n_structures):
        n = draw(st.sampled_from([0, 1, 2, 4, 7, max_atoms]))
        structures.append(random_structure(rng, n, draw(st.sampled_from(KINDS))))
    # Cutoffs up to 3 plane spacings of the thinnest periodic cell: several images, yet a quick oracle.
    cutoff = min(draw(st.floats(0.5, 5.0)), *(3.0 * thinnest_spacing(cell, pbc) for _, cell, pbc in structures))
    return structures, cutoff


def thinnest_spacing(cell, pbc):
    """Smallest distance between lattice planes over the periodic axes (inf when none)."""
    if not pbc.any():
        return np.inf
    completed = cell.copy()  # open rows: unit normals, so that the periodic axes' spacings are exact
    _, _, vh = np.linalg.svd(cell[pbc])
    completed[~pbc] = vh[int(pbc.sum()) :]
    reciprocal = np.linalg.inv(completed)
    return float(1.0 / np.linalg.norm(reciprocal, axis=0)[pbc].max())


def pack(structures, dtype=torch.float64, device="cpu"):
    positions = torch.tensor(np.concatenate([s[0].reshape(-1, 3) for s in structures]), dtype=dtype, device=device)
    cell = torch.tensor(np.stack([s[1] for s in structures]), dtype=dtype, device=device)
    pbc = torch.tensor(np.stack([s[2] for s in structures]), device=device)
    counts = torch.tensor([len(s[0]) for s in structures], device=device)
    return positions, cell, pbc, counts


def assert_same(got, want):
    assert got[0].shape == want[0].shape, f"{got[0].shape[1]} pairs, expected {want[0].shape[1]}"
    assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[1].cpu(), want[1].cpu())


# ---------------------------------------------------------------------------------------- property tests
@requires_kernel
@pytest.mark.slow
@settings(PROPERTY, max_examples=700)
@given(case=batches(), full=st.booleans())
def test_matches_reference_float64(case, full):
    structures, cutoff = case
    tensors = pack(structures)
    assert_same(run_kernel(*tensors, cutoff, full), neighbor_list_reference(*tensors, cutoff, full))


@requires_kernel
@settings(PROPERTY, max_examples=300)
@given(case=batches(max_structures=3), full=st.booleans())
def test_matches_reference_float32(case, full):
    # The exact test runs in the input dtype, term by term like the reference: float32 lists agree exactly too.
    structures, cutoff = case
    tensors = pack(structures, torch.float32)
    assert_same(run_kernel(*tensors, cutoff, full), neighbor_list_reference(*tensors, cutoff, full))


@requires_kernel
@settings(PROPERTY, max_examples=300)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_atoms=st.sampled_from([1, 2, 4, 7]),
    kind=st.sampled_from(KINDS),
    cutoff=st.floats(0.3, 4.5),
)
def test_matches_ase(seed, n_atoms, kind, cutoff):
    positions, cell, pbc = random_structure(np.random.default_rng(seed), n_atoms, kind)
    cutoff = min(cutoff, 3.0 * thinnest_spacing(cell, pbc))
    atoms = Atoms("H" * n_atoms, positions=positions, cell=cell, pbc=pbc)
    i, j, shifts = ase_neighbor_list("ijS", atoms, cutoff)
    want = {(a, b, *s) for a, b, s in zip(i.tolist(), j.tolist(), shifts.tolist(), strict=True)}
    got = as_set(*gdeq_ext.neighbor_list(pack([(positions, cell, pbc)])[:4], cutoff))
    assert got == want


# ----------------------------------------------------------------------------------------- known values
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("build", ["cubic", "primitive", "supercell"])
def test_diamond_silicon_has_28_neighbors_at_5_angstrom(device, build):
    atoms = {
        "cubic": bulk("Si", cubic=True),  # 8 atoms, 5.43 Å: one bin, 27 images
        "primitive": bulk("Si"),  # 2 atoms, plane spacing 3.1 Å < cutoff: many images
        "supercell": bulk("Si", cubic=True) * (3, 3, 3),
    }[build]
    batch = gdeq_ext.Batch.from_ase([atoms, atoms], device=device, dtype=torch.float64)
    edge_index, shifts = gdeq_ext.neighbor_list(batch, 5.0)
    counts = torch.bincount(edge_index[0], minlength=batch.n_atoms)
    assert counts.tolist() == [28] * batch.n_atoms
    half, _ = gdeq_ext.neighbor_list(batch, 5.0, full=False)
    assert half.shape[1] * 2 == edge_index.shape[1]


@pytest.mark.parametrize("device", devices())
def test_single_atom_sees_its_images_not_itself(device):
    cell = torch.eye(3, dtype=torch.float64, device=device) * 2.0
    positions = torch.tensor([[0.3, 0.1, 1.9]], dtype=torch.float64, device=device)
    edge_index, shifts = gdeq_ext.neighbor_list((positions, cell, True), 2.5)
    # 6 face images at 2 Å (the 12 edge images are at 2.83 Å > 2.5 Å)
    assert edge_index.tolist() == [[0] * 6, [0] * 6]
    assert sorted(map(tuple, shifts.tolist())) == sorted(
        [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    )
    edge_index, shifts = gdeq_ext.neighbor_list((positions, cell, True), 2.5, full=False)
    assert sorted(map(tuple, shifts.tolist())) == [(0, 0, 1), (0, 1, 0), (1, 0, 0)]


@pytest.mark.parametrize("device", devices())
def test_empty_structures_inside_a_batch(device):
    rng = np.random.default_rng(7)
    structures = [
        random_structure(rng, 0, "box"),
        random_structure(rng, 5, "skewed"),
        random_structure(rng, 0, "thin"),
        random_structure(rng, 1, "thin"),
        random_structure(rng, 0, "open"),
    ]
    tensors = pack(structures, device=device)
    got = gdeq_ext.neighbor_list(tensors, 3.0)
    assert_same(got, neighbor_list_reference(*[t.cpu() for t in tensors], 3.0))
    # every structure alone gives the same pairs, shifted by its first atom
    start = 0
    for positions, cell, pbc in structures:
        alone = gdeq_ext.neighbor_list(pack([(positions, cell, pbc)], device=device), 3.0)
        mine = (got[0][0] >= start) & (got[0][0] < start + len(positions))
        assert as_set(got[0][:, mine], got[1][mine], start) == as_set(*alone)
        start += len(positions)
    only_empty = pack([random_structure(rng, 0, "box")] * 3, device=device)
    edge_index, shifts = gdeq_ext.neighbor_list(only_empty, 3.0)
    assert edge_index.shape == (2, 0) and shifts.shape == (0, 3)


@pytest.mark.parametrize("device", devices())
def test_non_periodic_cluster_with_no_cell(device):
    rng = np.random.default_rng(3)
    positions = torch.tensor(rng.uniform(0, 8, (30, 3)), device=device)
    edge_index, shifts = gdeq_ext.neighbor_list((positions, None, False), 3.0)
    assert not shifts.any()
    distance = torch.cdist(positions, positions)
    want = ((distance < 3.0) & ~torch.eye(30, dtype=torch.bool, device=device)).nonzero().T
    assert torch.equal(edge_index, want)  # row-major nonzero is sorted by (i, j) too


@pytest.mark.parametrize("device", devices())
def test_far_away_atoms_and_huge_open_extent(device):
    # An atom 10^6 cells away (shifts refer to the original positions) and two clusters 10^7 Å apart
    # along an open axis (the bin grid is capped at 2n + 1 bins).
    cell = torch.tensor([[4.0, 0.0, 0.0], [1.0, 4.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64, device=device)
    positions = torch.tensor(
        [[0.5, 0.5, 0.0], [1.5 + 4e6, 0.5, 0.0], [0.5, 1.0, 1e7], [0.5, 2.0, 1e7]], dtype=torch.float64, device=device
    )
    pbc = torch.tensor([True, True, False], device=device)
    got = gdeq_ext.neighbor_list((positions, cell, pbc), 1.5)
    want = neighbor_list_reference(positions.cpu(), cell.cpu()[None], pbc.cpu()[None], torch.tensor([4]), 1.5)
    assert_same(got, want)
    assert as_set(*got) == {(0, 1, -1000000, 0, 0), (1, 0, 1000000, 0, 0), (2, 3, 0, 0, 0), (3, 2, 0, 0, 0)}


def test_full_and_half_lists_agree():
    rng = np.random.default_rng(11)
    tensors = pack([random_structure(rng, 6, kind) for kind in KINDS])
    full = as_set(*gdeq_ext.neighbor_list(tensors, 3.5))
    half = as_set(*gdeq_ext.neighbor_list(tensors, 3.5, full=False))
    mirrored = {(j, i, -a, -b, -c) for i, j, a, b, c in half}
    assert half | mirrored == full and not (half & mirrored)


def test_return_vectors_is_differentiable_and_within_cutoff():
    rng = np.random.default_rng(5)
    positions, cell, pbc, counts = pack([random_structure(rng, 6, kind) for kind in ("skewed", "thin", "open")])
    positions.requires_grad_(True)
    cell.requires_grad_(True)
    edge_index, shifts, vectors, distances = gdeq_ext.neighbor_list(
        (positions, cell, pbc, counts), 3.0, return_vectors=True
    )
    assert bool((distances < 3.0).all()) and bool((distances > 0).all())
    system = torch.repeat_interleave(torch.arange(3), counts)
    ref_vectors, ref_distances = gdeq_ext.edge_vectors_reference(positions, cell, edge_index, shifts, system)
    assert torch.equal(distances, ref_distances) or torch.allclose(distances, ref_distances, rtol=1e-14, atol=0)
    torch.testing.assert_close(vectors, ref_vectors, rtol=1e-14, atol=1e-14)
    grad_positions, grad_cell = torch.autograd.grad(distances.sum(), (positions, cell))
    ref_grads = torch.autograd.grad(ref_distances.sum(), (positions, cell))
    torch.testing.assert_close(grad_positions, ref_grads[0])
    torch.testing.assert_close(grad_cell, ref_grads[1])


@requires_kernel
def test_threads_do_not_change_the_output():
    rng = np.random.default_rng(2)
    tensors = pack([random_structure(rng, 40, "box") for _ in range(6)] + [random_structure(rng, 300, "skewed")])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel(*tensors, 4.0)
        torch.set_num_threads(2)
        two = run_kernel(*tensors, 4.0)
    finally:
        torch.set_num_threads(previous)
    assert_same(one, two)


# -------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cutoff", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_cutoff(device, cutoff):
    tensors = pack([random_structure(np.random.default_rng(0), 3, "box")], device=device)
    with pytest.raises(ValueError, match="cutoff must be positive and finite"):
        gdeq_ext.neighbor_list(tensors, cutoff)
    with pytest.raises(ValueError, match="cutoff must be positive and finite"):
        neighbor_list_reference(*tensors, cutoff)


def _bad_batch(problem, device):
    rng = np.random.default_rng(1)
    structures = [(rng.uniform(0, 4, (3, 3)), 4.0 * np.eye(3), np.ones(3, dtype=bool)) for _ in range(3)]
    positions, cell, pbc, counts = pack(structures, device=device)
    if problem == "nan position":
        positions[3 + 2, 1] = float("nan")  # structure 1, atom 2
    elif problem == "inf position":
        positions[6, 0] = float("inf")  # structure 2, atom 0
    elif problem == "singular cell":
        cell[2, 2] = cell[2, 0] + cell[2, 1]
    elif problem == "zero lattice vector":
        cell[1, 1] = 0.0
    elif problem == "nan cell":
        cell[2, 0, 0] = float("nan")
    return positions, cell, pbc, counts


BAD = {
    "nan position": "structure 1: atom 2 has a non-finite",
    "inf position": "structure 2: atom 0 has a non-finite",
    "singular cell": "structure 2: the periodic lattice vectors are linearly dependent",
    "zero lattice vector": "structure 1: axis 1 is periodic but its lattice vector is zero",
    "nan cell": "structure 2: the cell has non-finite",
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("problem", list(BAD))
def test_bad_structures_are_named(device, problem):
    tensors = _bad_batch(problem, device)
    with pytest.raises(ValueError, match=BAD[problem]):
        gdeq_ext.neighbor_list(tensors, 2.0)
    with pytest.raises(ValueError, match=BAD[problem]):
        neighbor_list_reference(*[t.cpu() for t in tensors], 2.0)


def test_mismatched_devices_shapes_and_dtypes():
    positions, cell, pbc, counts = pack([random_structure(np.random.default_rng(0), 3, "box")] * 2)
    with pytest.raises(ValueError, match="cell is on meta but positions are on cpu"):
        gdeq_ext.neighbor_list((positions, cell.to("meta"), pbc, counts), 2.0)
    with pytest.raises(ValueError, match="pbc is on meta"):
        gdeq_ext.neighbor_list((positions, cell, pbc.to("meta"), counts), 2.0)
    with pytest.raises(TypeError, match="cell has dtype torch.float32"):
        gdeq_ext.neighbor_list((positions, cell.float(), pbc, counts), 2.0)
    with pytest.raises(ValueError, match=r"cell must have shape \(2, 3, 3\)"):
        gdeq_ext.neighbor_list((positions, cell[:1], pbc, counts), 2.0)
    with pytest.raises(ValueError, match="n_atoms_per_system sums to 5 but positions has 6 rows"):
        gdeq_ext.neighbor_list((positions, cell, pbc, torch.tensor([3, 2])), 2.0)
    with pytest.raises(ValueError, match="structure 1: n_atoms_per_system is negative"):
        gdeq_ext.neighbor_list((positions, cell, pbc, torch.tensor([7, -1])), 2.0)


@pytest.mark.cuda
@requires_cuda()
@requires_kernel
def test_mismatched_devices_cuda():
    positions, cell, pbc, counts = pack([random_structure(np.random.default_rng(0), 3, "box")])
    with pytest.raises(ValueError, match="cell is on cuda:0 but positions are on cpu"):
        gdeq_ext.neighbor_list((positions, cell.cuda(), pbc, counts), 2.0)


def test_fake_tensor_registration():
    if not OP_AVAILABLE:
        pytest.skip("compiled neighbor_list op not built")
    tensors = pack([random_structure(np.random.default_rng(0), 4, "box")] * 2)
    torch.library.opcheck(
        torch.ops.gdeq_ext.neighbor_list.default,
        (*tensors, 3.0),
        test_utils=("test_schema", "test_faketensor"),
    )


# ------------------------------------------------------------------------------------------ CPU <-> CUDA
@pytest.mark.cuda
@requires_cuda()
@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_and_cuda_outputs_are_identical(dtype):
    rng = np.random.default_rng(123)
    for trial in range(40):
        structures = [random_structure(rng, int(rng.integers(0, 30)), KINDS[(trial + k) % 5]) for k in range(4)]
        cutoff = float(rng.uniform(0.5, 4.5))
        for full in (True, False):
            cpu = run_kernel(*pack(structures, dtype), cutoff, full)
            cuda = run_kernel(*pack(structures, dtype, "cuda"), cutoff, full)
            assert_same(cuda, cpu)
    silicon = gdeq_ext.Batch.from_ase([bulk("Si", cubic=True) * (4, 4, 4)] * 3, dtype=dtype)
    assert_same(gdeq_ext.neighbor_list(silicon.to("cuda"), 5.0), gdeq_ext.neighbor_list(silicon, 5.0))


@pytest.mark.cuda
@requires_cuda()
@requires_kernel
def test_cuda_buffer_overflow_grows_and_retries():
    atoms = bulk("Si", cubic=True) * (3, 3, 3)
    atoms.rattle(0.05, seed=1)
    tensors = pack([(atoms.positions, atoms.cell.array, np.ones(3, bool))])
    want = run_kernel(*tensors, 6.0)
    for capacity in (1, 7, 40):  # every atom has 58 neighbors at 6 Å: the first buffer is too small
        assert_same(run_kernel(*[t.cuda() for t in tensors], 6.0, initial_capacity=capacity), want)


@pytest.mark.cuda
@requires_cuda()
@requires_kernel
def test_cuda_errors_name_the_structure():
    for problem, message in BAD.items():
        with pytest.raises(ValueError, match=message):
            run_kernel(*_bad_batch(problem, "cuda"), 2.0)


@pytest.mark.cuda
@requires_cuda()
@requires_kernel
def test_cuda_call_synchronizes_once():
    batch = gdeq_ext.Batch.from_ase([bulk("Si", cubic=True) * (2, 2, 2)] * 4, device="cuda", dtype=torch.float32)
    gdeq_ext.neighbor_list(batch, 5.0)
    assert count_syncs(lambda: gdeq_ext.neighbor_list(batch, 5.0)) == 1
