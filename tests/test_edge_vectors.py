"""The edge-vector op: reference parity, opcheck, first and second derivatives, devices, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

import gdeq_ext
from gdeq_ext.neighbors.edge_vectors import edge_vectors_scatter
from gdeq_ext.testing import DTYPES, devices, requires_cuda, stable_seed, tol

requires_extension = pytest.mark.skipif(not gdeq_ext.HAVE_EXTENSION, reason="compiled extension not built")


def random_batch(dtype, device, seed=0):
    """Three structures: a cubic and a small triclinic periodic cell, and a mixed-pbc slab."""
    rng = np.random.default_rng(seed)
    si = bulk("Si", cubic=True)
    small = bulk("Si")  # 2-atom primitive fcc cell: several images within the cutoff
    small.cell = small.cell.array @ (np.eye(3) + 0.1 * rng.standard_normal((3, 3)))
    slab = bulk("Si", cubic=True)
    slab.pbc = (True, False, True)
    structures = []
    for atoms in (si, small, slab):
        atoms = atoms.copy()
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        structures.append(atoms)
    batch = gdeq_ext.Batch.from_ase(structures, device=device, dtype=dtype)
    edge_index, shifts = gdeq_ext.neighbor_list(batch, 4.0)
    return batch, edge_index, shifts


def op_inputs(dtype, device, requires_grad=False):
    batch, edge_index, shifts = random_batch(dtype, device, seed=stable_seed("edge_vectors", dtype))
    positions = batch.positions.clone().requires_grad_(requires_grad)
    cell = batch.cell.clone().requires_grad_(requires_grad)
    return positions, cell, edge_index, shifts, batch.system


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_values_and_gradients(device, dtype):
    positions, cell, edge_index, shifts, system = op_inputs(dtype, device, requires_grad=True)
    vectors, distances = gdeq_ext.edge_vectors(positions, cell, edge_index, shifts, system)
    ref_vectors, ref_distances = gdeq_ext.edge_vectors_reference(positions, cell, edge_index, shifts, system)
    torch.testing.assert_close(vectors, ref_vectors, **tol(dtype))
    torch.testing.assert_close(distances, ref_distances, **tol(dtype))
    # Both outputs feed the loss, as in a potential (direction and length both used).
    weights = torch.randn_like(vectors)
    loss = (vectors * weights).sum() + distances.pow(2).sum() + distances.sin().sum()
    ref_loss = (ref_vectors * weights).sum() + ref_distances.pow(2).sum() + ref_distances.sin().sum()
    grads = torch.autograd.grad(loss, (positions, cell), create_graph=True)
    ref_grads = torch.autograd.grad(ref_loss, (positions, cell), create_graph=True)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol(dtype, "derivative"))
    # Second derivatives: a Hessian-vector product in positions and cell.
    probe = [torch.randn_like(g) for g in grads]
    second = torch.autograd.grad(sum((g * p).sum() for g, p in zip(grads, probe, strict=True)), (positions, cell))
    ref_second = torch.autograd.grad(
        sum((g * p).sum() for g, p in zip(ref_grads, probe, strict=True)), (positions, cell)
    )
    for got, want in zip(second, ref_second, strict=True):
        torch.testing.assert_close(got, want, **tol(dtype, "derivative"))


@pytest.mark.parametrize("device", devices())
def test_gradcheck_and_gradgradcheck(device):
    positions, cell, edge_index, shifts, system = op_inputs(torch.float64, device, requires_grad=True)
    keep = torch.arange(0, edge_index.shape[1], 7, device=device)  # a subset keeps the check quick
    edge_index, shifts = edge_index[:, keep], shifts[keep]

    def fn(p, c):
        return gdeq_ext.edge_vectors(p, c, edge_index, shifts, system)

    assert torch.autograd.gradcheck(fn, (positions, cell))
    assert torch.autograd.gradgradcheck(fn, (positions, cell))


@requires_extension
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    positions, cell, edge_index, shifts, system = op_inputs(dtype, device, requires_grad=True)
    torch.library.opcheck(torch.ops.gdeq_ext.edge_vectors, (positions, cell, edge_index, shifts, system))
    grad = torch.randn(edge_index.shape[1], 3, dtype=dtype, device=device, requires_grad=True)
    args = (grad, edge_index, shifts, system, positions.shape[0], cell.shape[0])
    torch.library.opcheck(torch.ops.gdeq_ext.edge_vectors_backward, args)


@pytest.mark.parametrize("device", devices())
def test_scatter_is_adjoint_of_gather(device):
    positions, cell, edge_index, shifts, system = op_inputs(torch.float64, device)
    grad = torch.randn(edge_index.shape[1], 3, dtype=torch.float64, device=device)
    grad_positions, grad_cell = edge_vectors_scatter(
        grad, edge_index, shifts, system, positions.shape[0], cell.shape[0]
    )
    a, b = torch.randn_like(positions), torch.randn_like(cell)
    vectors, _ = gdeq_ext.edge_vectors(a, b, edge_index, shifts, system)
    lhs = (vectors * grad).sum()
    rhs = (grad_positions * a).sum() + (grad_cell * b).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@requires_cuda()
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    cpu = op_inputs(dtype, "cpu", requires_grad=True)
    cuda = [t.detach().cuda().requires_grad_(t.requires_grad) for t in cpu]
    out_cpu = gdeq_ext.edge_vectors(*cpu)
    out_cuda = gdeq_ext.edge_vectors(*cuda)
    for a, b in zip(out_cpu, out_cuda, strict=True):
        # One formula without FMA contraction on both devices (gdeq_ext/exact_math.h): equal bit for bit.
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
    g_cpu = torch.autograd.grad(out_cpu[0].sum() + out_cpu[1].sum(), cpu[:2])
    g_cuda = torch.autograd.grad(out_cuda[0].sum() + out_cuda[1].sum(), cuda[:2])
    for a, b in zip(g_cpu, g_cuda, strict=True):
        torch.testing.assert_close(b.cpu(), a, **tol(dtype, "derivative"))


@pytest.mark.parametrize("device", devices())
def test_no_edges(device):
    positions, cell, _, _, system = op_inputs(torch.float64, device, requires_grad=True)
    edge_index = torch.zeros(2, 0, dtype=torch.long, device=device)
    shifts = torch.zeros(0, 3, dtype=torch.long, device=device)
    vectors, distances = gdeq_ext.edge_vectors(positions, cell, edge_index, shifts, system)
    assert vectors.shape == (0, 3) and distances.shape == (0,)
    grad_positions, grad_cell = torch.autograd.grad(vectors.sum() + distances.sum(), (positions, cell))
    assert not grad_positions.any() and not grad_cell.any()


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(device):
    positions, cell, edge_index, shifts, system = op_inputs(torch.float64, device)
    positions_t = positions.T.contiguous().T  # same values, transposed strides
    cell_t = cell.transpose(1, 2).contiguous().transpose(1, 2)
    edge_index_nc = torch.stack([edge_index[1], edge_index[0]])[[1, 0]]
    shifts_nc = shifts.T.contiguous().T
    assert not positions_t.is_contiguous() and not shifts_nc.is_contiguous()
    got = gdeq_ext.edge_vectors(positions_t, cell_t, edge_index_nc, shifts_nc, system)
    want = gdeq_ext.edge_vectors_reference(positions, cell, edge_index, shifts, system)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol(torch.float64))


def test_bad_inputs_raise_clear_errors():
    positions, cell, edge_index, shifts, system = op_inputs(torch.float64, "cpu")
    with pytest.raises(TypeError, match="cell has dtype"):
        gdeq_ext.edge_vectors(positions, cell.float(), edge_index, shifts, system)
    with pytest.raises(TypeError, match="shifts must be int64"):
        gdeq_ext.edge_vectors(positions, cell, edge_index, shifts.int(), system)
    with pytest.raises(ValueError, match="positions must have shape"):
        gdeq_ext.edge_vectors(positions[:, :2], cell, edge_index, shifts, system)
    with pytest.raises(ValueError, match="shifts must have shape"):
        gdeq_ext.edge_vectors(positions, cell, edge_index, shifts[:-1], system)
    with pytest.raises(ValueError, match="is on meta"):
        gdeq_ext.edge_vectors(positions, cell, edge_index.to("meta"), shifts, system)


@requires_extension
def test_kernel_rejects_out_of_range_indices():
    positions, cell, edge_index, shifts, system = op_inputs(torch.float64, "cpu")
    bad = edge_index.clone()
    bad[1, 3] = positions.shape[0] + 5
    with pytest.raises(RuntimeError, match="refers to an atom outside"):
        torch.ops.gdeq_ext.edge_vectors(positions, cell, bad, shifts, system)
