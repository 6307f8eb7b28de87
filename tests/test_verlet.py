"""VerletList: reuse while atoms moved less than skin/2, per-structure rebuilds, and a list that always holds
every pair within the cutoff (compared with a fresh neighbor list after every move)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk

import gdeq_ext
from gdeq_ext.neighbors import VerletList, edge_vectors_reference, neighbor_list
from gdeq_ext.testing import devices, requires_cuda

CUTOFF, SKIN = 3.0, 0.6


def make_batch(device, seed=0):
    """Three structures: a rattled Si supercell, a skewed small cell (images) and a non-periodic cluster."""
    rng = np.random.default_rng(seed)
    si = bulk("Si", cubic=True) * (2, 1, 1)
    small = bulk("Si")
    small.cell = small.cell.array @ (np.eye(3) + 0.15 * rng.standard_normal((3, 3)))
    cluster = bulk("Si", cubic=True)
    cluster.pbc = False
    for atoms in (si, small, cluster):
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
    return gdeq_ext.Batch.from_ase([si, small, cluster], device=device, dtype=torch.float64)


def within_cutoff(batch, edges, cutoff=CUTOFF):
    """The (i, j, shift) of ``edges`` closer than ``cutoff``, as a set."""
    edge_index, shifts = edges
    _, distances = edge_vectors_reference(batch.positions, batch.cell, edge_index, shifts, batch.system)
    keep = distances < cutoff
    rows = torch.cat([edge_index[:, keep].T, shifts[keep]], dim=1)
    return {tuple(r) for r in rows.cpu().tolist()}


def fresh(batch, cutoff=CUTOFF):
    return within_cutoff(batch, neighbor_list(batch, cutoff), cutoff)


def assert_sorted(edges):
    keys = torch.cat([edges.edge_index.T, edges.shifts], dim=1).cpu().numpy()
    order = np.lexsort(keys.T[::-1])
    assert (order == np.arange(len(order))).all(), "edges are not sorted by (i, j, shift)"


def move(batch, amplitude, structures=None, seed=0):
    """Displace every atom of the chosen structures by exactly ``amplitude`` Å in a random direction."""
    generator = torch.Generator().manual_seed(seed)
    step = torch.randn(batch.n_atoms, 3, generator=generator, dtype=batch.dtype)
    step = amplitude * step / step.norm(dim=1, keepdim=True)
    if structures is not None:
        step = step * torch.isin(batch.system.cpu(), torch.tensor(structures))[:, None]
    return batch.with_positions(batch.positions + step.to(batch.device))


@pytest.mark.parametrize("device", devices())
def test_reuse_below_half_skin_and_rebuild_only_the_structure_that_moved(device):
    batch = make_batch(device)
    verlet = VerletList(CUTOFF, SKIN)
    first = verlet(batch)
    assert verlet.rebuilds == 1 and verlet.structure_rebuilds.tolist() == [1, 1, 1]
    small = move(batch, 0.45 * SKIN, seed=1)
    assert verlet(small) is first and verlet.rebuilds == 1  # reused, the very same tensors
    assert not verlet.needs_rebuild(small)
    big = move(small, SKIN, structures=[1], seed=2)  # structure 1 now beyond skin/2 from its build
    assert verlet.needs_rebuild(big)
    assert verlet.stale(big).tolist() == [False, True, False]
    edges = verlet(big)
    assert verlet.rebuilds == 2 and verlet.structure_rebuilds.tolist() == [1, 2, 1]
    assert_sorted(edges)
    assert within_cutoff(big, edges) == fresh(big)
    # The rebuilt structure's part equals a fresh cutoff + skin list; the others are untouched.
    full = neighbor_list(big, CUTOFF + SKIN)
    mine = big.system[edges.edge_index[0]] == 1
    theirs = big.system[full[0][0]] == 1
    assert torch.equal(edges.edge_index[:, mine], full[0][:, theirs])
    assert torch.equal(edges.shifts[mine], full[1][theirs])
    assert torch.equal(edges.edge_index[:, ~mine], first.edge_index[:, big.system[first.edge_index[0]] != 1])


@pytest.mark.parametrize("device", devices())
def test_list_holds_every_pair_along_a_random_walk(device):
    batch = make_batch(device, seed=3)
    verlet = VerletList(CUTOFF, SKIN)
    rng = np.random.default_rng(4)
    for step in range(25):
        structures = [s for s in range(3) if rng.random() < 0.6]
        batch = move(batch, float(rng.uniform(0.02, 0.2)), structures=structures, seed=step)
        edges = verlet(batch)
        assert within_cutoff(batch, edges) == fresh(batch), f"step {step}"
    assert 1 < verlet.rebuilds < 25
    assert verlet.structure_rebuilds.min() >= 1 and len(set(verlet.structure_rebuilds.tolist())) > 1


@pytest.mark.parametrize("device", devices())
def test_cell_change_and_layout_change_rebuild(device):
    batch = make_batch(device)
    verlet = VerletList(CUTOFF, SKIN)
    verlet(batch)
    cell = batch.cell.clone()
    cell[2] *= 1.01  # only structure 2's cell changes (a non-periodic one: its list is rebuilt anyway)
    strained = gdeq_ext.Batch.from_tensors(batch.positions, batch.numbers, cell, batch.pbc, batch.n_atoms_per_system)
    verlet(strained)
    assert verlet.structure_rebuilds.tolist() == [1, 1, 2]
    other = gdeq_ext.Batch.from_ase([bulk("Si", cubic=True)], device=device, dtype=torch.float64)
    edges = verlet(other)
    assert verlet.rebuilds == 3 and verlet.structure_rebuilds.tolist() == [1]
    assert within_cutoff(other, edges) == fresh(other)


def test_zero_skin_rebuilds_every_call():
    batch = make_batch("cpu")
    verlet = VerletList(CUTOFF, 0.0)
    for _ in range(3):
        verlet(batch)
    assert verlet.rebuilds == 3
    with pytest.raises(ValueError, match="skin"):
        VerletList(CUTOFF, -0.1)
    with pytest.raises(ValueError, match="max_step"):
        VerletList(CUTOFF, 0.5, max_step=0.25)


@pytest.mark.parametrize("device", devices())
def test_max_step_mode_decides_one_call_ahead(device):
    # With a promised bound on each call's motion, the decision uses the previous call's check.
    batch = make_batch(device, seed=5)
    verlet = VerletList(CUTOFF, 1.0, max_step=0.2)  # rebuild once an atom moved more than 0.5 - 0.2 Å
    verlet(batch)
    for step in range(12):
        batch = move(batch, 0.15, structures=[0, 2] if step % 2 else [1], seed=10 + step)
        edges = verlet(batch)
        assert within_cutoff(batch, edges) == fresh(batch), f"step {step}"
    assert verlet.rebuilds > 1
    # A broken promise is reported one call later, and the structure is rebuilt then.
    verlet(batch)  # no motion: the pending check is clean now
    batch = move(batch, 0.7, structures=[1], seed=99)
    verlet(batch)
    with pytest.warns(RuntimeWarning, match=r"max_step=0.2 Å was exceeded.*structures \[1\]"):
        edges = verlet(batch)
    assert within_cutoff(batch, edges) == fresh(batch)


@pytest.mark.cuda
@requires_cuda()
def test_reused_list_on_gpu_needs_no_host_sync_with_max_step():
    batch = make_batch("cuda", seed=6)
    verlet = VerletList(CUTOFF, 1.0, max_step=0.2)
    verlet(batch)
    verlet(batch)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                edges = verlet(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert verlet.rebuilds == 1
    assert within_cutoff(batch, edges) == fresh(batch)
