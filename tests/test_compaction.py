"""Compaction in the Hessian solves: sub-batch operators, restricted neighbor lists, released graphs, and the
implicit gradient with and without it (issue #15)."""

from __future__ import annotations

import pytest
import torch

from gdeq_ext.gradients import ImplicitSolveOptions
from gdeq_ext.gradients.hessian import HessianOperator
from gdeq_ext.gradients.implicit_function import implicit_vjp
from gdeq_ext.neighbors import neighbor_list
from gdeq_ext.neighbors.edges import Edges, select_edges
from gdeq_ext.potentials import MLIP
from gdeq_ext.potentials.base import energy_forces
from gdeq_ext.relax import fire

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def cells(kit):
    shapes = ((0.0, 0.0), (0.02, 0.01), (0.05, -0.01), (0.08, 0.02))
    return kit.make_batch([kit.diamond(shear=s, strain=e) for s, e in shapes], rattle=0.08, seed=7)


def _sorted(edges: Edges) -> torch.Tensor:
    rows = torch.cat([edges.edge_index.T, edges.shifts], dim=1)
    return rows[torch.argsort(rows[:, 0] * 10**6 + rows[:, 1] * 10**3 + (rows[:, 2:] + 5) @ torch.tensor([100, 10, 1]))]


def test_selected_edges_are_the_sub_batch_neighbor_list(cells):
    whole = Edges(*neighbor_list(cells, 4.5))
    members = torch.tensor([1, 3])
    sub, atoms = cells.select(members)
    picked = select_edges(whole, atoms, cells.n_atoms)
    fresh = Edges(*neighbor_list(sub, 4.5))
    assert torch.equal(_sorted(picked), _sorted(fresh))
    assert bool((picked.edge_index[0][1:] >= picked.edge_index[0][:-1]).all())  # still sorted by receiver


def test_restricted_operator_products_equal_the_whole_batch_rows_and_release_rebuilds_the_same_graph(cells):
    model = MLIP(seed=1).double()
    edges = Edges(*neighbor_list(cells, model.cutoff + 0.5))
    op = HessianOperator(model, cells, cells.positions, edges, energy_forces)
    v = torch.randn(cells.n_atoms, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = op(v)
    members = torch.tensor([0, 2])
    _, atoms = cells.select(members)
    sub = op.restrict(members)
    torch.testing.assert_close(sub(v[atoms]), whole[atoms], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sub.projector(v[atoms]), op.projector(v)[atoms], rtol=1e-12, atol=1e-12)
    forces = op.forces.detach().clone()
    op.release()
    assert op._forces is None
    assert torch.equal(op(v), whole) and torch.equal(op.forces.detach(), forces)  # rebuilt: the same bits


def test_implicit_gradient_is_the_same_with_and_without_compaction(cells, monkeypatch):
    model = MLIP(seed=2).double()
    relaxed = fire(model, cells, fmax=1e-6, max_steps=3000, warn=False)
    assert bool(relaxed.converged.all())
    edges = Edges(*neighbor_list(cells, model.cutoff + 0.5))
    grad = torch.randn(cells.n_atoms, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    parameters = list(model.parameters())
    restricted = []
    original = HessianOperator.restrict
    monkeypatch.setattr(HessianOperator, "restrict", lambda self, m: restricted.append(len(m)) or original(self, m))
    results = {}
    for compact in (False, True):
        options = ImplicitSolveOptions(rtol=1e-10, compact=compact)
        results[compact] = implicit_vjp(model, cells, relaxed.positions, grad, parameters, edges, options=options)
    (g_off, info_off, u_off), (g_on, info_on, u_on) = results[False], results[True]
    assert info_on.iterations.tolist() == info_off.iterations.tolist() and len(set(info_on.iterations.tolist())) > 1
    assert restricted and restricted[0] <= 3  # the solve went on with the unfinished structures only
    torch.testing.assert_close(u_on, u_off, rtol=1e-9, atol=1e-12)
    for a, b in zip(g_on, g_off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
