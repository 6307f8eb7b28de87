"""The fused edge-moment ops (issue #5): values, first and second derivatives vs the reference, opcheck, edge cases.

The oracle is ``edge_moments_reference`` (plain PyTorch; autograd gives its derivatives). float64 results must agree
to 1e-10 relative (max |difference| / max |reference|), float32 within the tolerance table of gdeq_ext.testing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

import gdeq_ext
from gdeq_ext.neighbors import edge_vectors_reference
from gdeq_ext.potentials.edge_moments_op import edge_moments_fused, has_fused_kernels
from gdeq_ext.potentials.mlip_reference import edge_moments_reference
from gdeq_ext.testing import DTYPES, devices, stable_seed, tol

pytestmark = pytest.mark.skipif(
    not has_fused_kernels(torch.device("cpu")), reason="compiled edge_moments kernels not built"
)

CUTOFF = 4.0
OPS = torch.ops.gdeq_ext if has_fused_kernels(torch.device("cpu")) else None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (0 when both vanish)."""
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_matches(got, want, dtype, kind="exact"):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        if dtype == torch.float64:
            assert relative_error(g, w) <= 1e-10, relative_error(g, w)
        else:
            scale = max(w.abs().max().item(), 1.0) if w.numel() else 1.0
            t = tol(dtype, kind)
            torch.testing.assert_close(g, w, rtol=t["rtol"], atol=t["atol"] * scale)


def periodic_graph(dtype, device, channels=16, n_radial=8, seed=0, list_cutoff=4.6):
    """Edges of three small periodic cells (a cubic Si cell, a 2-atom triclinic cell whose atoms see many of their
    own images, a triclinic 3-atom cell), listed with a Verlet skin (pairs up to 4.6 Å > r_c = 4 Å)."""
    rng = np.random.default_rng(stable_seed("edge_moments", seed))
    cubic = bulk("Si", cubic=True)
    small = bulk("Si")
    small.cell = small.cell.array @ (np.eye(3) + 0.1 * rng.standard_normal((3, 3)))
    tri = bulk("Si")
    tri.append("Si")
    tri.positions[2] = tri.positions[1] + np.array([1.1, 0.9, -0.6])
    tri.cell = tri.cell.array @ (np.eye(3) + 0.15 * rng.standard_normal((3, 3)))
    structures = []
    for atoms in (cubic, small, tri):
        atoms = atoms.copy()
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        structures.append(atoms)
    batch = gdeq_ext.Batch.from_ase(structures, dtype=dtype)
    edge_index, shifts = gdeq_ext.neighbor_list(batch, list_cutoff)
    vectors, distances = edge_vectors_reference(batch.positions, batch.cell, edge_index, shifts, batch.system)
    assert (distances >= CUTOFF).any() and (distances < CUTOFF).any()
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch.n_atoms, channels, dtype=dtype, generator=gen)
    weights = torch.randn(n_radial, channels, dtype=dtype, generator=gen)
    return [t.to(device) for t in (vectors, edge_index, u, weights)]


def tiny_graph(device, channels=3, n_radial=3, seed=0):
    """A hand-made float64 graph for gradcheck: 4 atoms, edges sorted by receiver, one atom seeing several images
    of another and of itself (same (i, j) more than once), and a Verlet-skin edge beyond the cutoff."""
    gen = torch.Generator().manual_seed(seed)
    receivers = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    senders = [1, 1, 0, 0, 2, 3, 3, 1, 2, 3]
    n_edges = len(receivers)
    directions = torch.randn(n_edges, 3, dtype=torch.float64, generator=gen)
    lengths = 1.5 + 2.2 * torch.rand(n_edges, dtype=torch.float64, generator=gen)
    lengths[4] = CUTOFF + 0.3  # skin edge
    vectors = directions / directions.norm(dim=1, keepdim=True) * lengths.unsqueeze(1)
    edge_index = torch.tensor([receivers, senders])
    u = torch.randn(4, channels, dtype=torch.float64, generator=gen)
    weights = torch.randn(n_radial, channels, dtype=torch.float64, generator=gen)
    return [t.to(device) for t in (vectors, edge_index, u, weights)]


def first_and_second(fn, vectors, edge_index, u, weights, seed=1):
    """A, the VJP (grad_vectors, grad_u, grad_W) for a random cotangent G, and an HVP-like second-order contraction:
    the gradient of Σ (VJP · probes) with respect to (G, vectors, u, W)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [t.detach().clone().requires_grad_(True) for t in (vectors, u, weights)]
    v, uu, w = inputs
    moments = fn(v, edge_index, uu, w, CUTOFF)
    G = torch.randn(moments.shape, dtype=moments.dtype, generator=gen).to(moments.device).requires_grad_(True)
    vjp = torch.autograd.grad(moments, inputs, grad_outputs=G, create_graph=True)
    probes = [torch.randn(t.shape, dtype=t.dtype, generator=gen).to(t.device) for t in vjp]
    contraction = sum((g * p).sum() for g, p in zip(vjp, probes, strict=True))
    second = torch.autograd.grad(contraction, [G, *inputs])
    return moments.detach(), [g.detach() for g in vjp], list(second)


# ---------------------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_derivatives_match_reference(device, dtype):
    vectors, edge_index, u, weights = periodic_graph(dtype, device)
    got = first_and_second(edge_moments_fused, vectors, edge_index, u, weights)
    want = first_and_second(edge_moments_reference, vectors, edge_index, u, weights)
    assert_matches([got[0]], [want[0]], dtype)
    assert_matches(got[1], want[1], dtype)
    assert_matches(got[2], want[2], dtype, "derivative")


def test_several_threads_split_the_atoms_into_chunks_and_agree_with_one():
    """With 2 threads and 64 atoms the CPU kernels split the atoms into 2 chunks (per-chunk partial sums of grad_W,
    dW and the sender-indexed du of the one-pass double backward, summed in chunk order); the results match the
    reference and the single-thread run to round-off, and repeat bit for bit."""
    atoms = bulk("Si", cubic=True) * (2, 2, 2)
    atoms.rattle(0.1, seed=5)
    batch = gdeq_ext.Batch.from_ase([atoms], dtype=torch.float64)
    edge_index, shifts = gdeq_ext.neighbor_list(batch, 4.6)
    vectors, _ = edge_vectors_reference(batch.positions, batch.cell, edge_index, shifts, batch.system)
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(batch.n_atoms, 16, dtype=torch.float64, generator=gen)
    weights = torch.randn(8, 16, dtype=torch.float64, generator=gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = first_and_second(edge_moments_fused, vectors, edge_index, u, weights)
        torch.set_num_threads(2)
        two = first_and_second(edge_moments_fused, vectors, edge_index, u, weights)
        again = first_and_second(edge_moments_fused, vectors, edge_index, u, weights)
    finally:
        torch.set_num_threads(previous)
    want = first_and_second(edge_moments_reference, vectors, edge_index, u, weights)
    flat = [[got[0], *got[1], *got[2]] for got in (one, two, again, want)]
    assert_matches(flat[1], flat[3], torch.float64)
    assert_matches(flat[1], flat[0], torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(flat[1], flat[2], strict=True))


@pytest.mark.parametrize("device", devices())
def test_edge_order_does_not_matter(device):
    """Edges in random order (the CPU kernel then counting-sorts them; the GPU kernel just flushes more often)."""
    vectors, edge_index, u, weights = periodic_graph(torch.float64, device, channels=5, n_radial=4, seed=2)
    perm = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(0)).to(device)

    def shuffled(v, ei, uu, w, cutoff):
        return edge_moments_fused(v[perm], ei[:, perm], uu, w, cutoff)

    assert not bool((edge_index[0, perm][1:] >= edge_index[0, perm][:-1]).all())
    got = first_and_second(shuffled, vectors, edge_index, u, weights)
    want = first_and_second(edge_moments_reference, vectors, edge_index, u, weights)
    assert_matches([got[0]], [want[0]], torch.float64)
    assert_matches(got[1], want[1], torch.float64)
    assert_matches(got[2], want[2], torch.float64)


@pytest.mark.parametrize("device", devices())
def test_many_channels_and_radial_functions(device):
    """C = 40 > 32 (several channel tiles on the GPU), K = 12."""
    vectors, edge_index, u, weights = periodic_graph(torch.float64, device, channels=40, n_radial=12, seed=3)
    got = first_and_second(edge_moments_fused, vectors, edge_index, u, weights)
    want = first_and_second(edge_moments_reference, vectors, edge_index, u, weights)
    assert_matches([got[0]], [want[0]], torch.float64)
    assert_matches(got[1], want[1], torch.float64)
    assert_matches(got[2], want[2], torch.float64)


@pytest.mark.parametrize("device", devices())
def test_gradients_that_skip_the_vectors(device):
    """When a backward pass never reaches the positions (e.g. the parameter VJP (dF/dθ)ᵀw), the kernels skip the
    per-edge vector output (compute_vectors=False); what is computed must not change."""
    vectors, edge_index, u, weights = periodic_graph(torch.float64, device, channels=6, n_radial=5, seed=9)
    results = []
    for fn in (edge_moments_fused, edge_moments_reference):
        gen = torch.Generator().manual_seed(3)
        leaf = vectors.clone().requires_grad_(True)
        v = leaf * 1.0  # not a leaf: autograd knows whether its gradient is used
        uu, w = u.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        moments = fn(v, edge_index, uu, w, CUTOFF)
        G = torch.randn(moments.shape, dtype=moments.dtype, generator=gen).to(device).requires_grad_(True)
        first = torch.autograd.grad(moments, (v, uu, w), G, create_graph=True)
        probe = [torch.randn(t.shape, dtype=t.dtype, generator=gen).to(device) for t in first]
        contraction = sum((g * p).sum() for g, p in zip(first, probe, strict=True))
        second = torch.autograd.grad(contraction, (G, uu, w))  # not the vectors
        # And a first derivative to (u, W) only.
        again = torch.autograd.grad(fn(v, edge_index, uu, w, CUTOFF), (uu, w), G.detach())
        results.append([*second, *again])
    assert_matches(results[0], results[1], torch.float64)


# ---------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("device", devices())
def test_gradcheck_and_gradgradcheck(device):
    vectors, edge_index, u, weights = tiny_graph(device)
    inputs = tuple(t.clone().requires_grad_(True) for t in (vectors, u, weights))

    def fn(v, uu, w):
        return edge_moments_fused(v, edge_index, uu, w, CUTOFF)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", devices())
def test_gradcheck_of_the_backward_op(device):
    """The backward op as a function of (G, vectors, u, W): its derivative is the double-backward kernel."""
    vectors, edge_index, u, weights = tiny_graph(device, seed=4)
    G = torch.randn(u.shape[0], u.shape[1], 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    inputs = tuple(t.clone().to(device).requires_grad_(True) for t in (G, vectors, u, weights))

    def fn(g, v, uu, w):
        return OPS.edge_moments_backward(g, v, edge_index, uu, w, CUTOFF)

    assert torch.autograd.gradcheck(fn, inputs)


def test_third_derivative_raises():
    vectors, edge_index, u, weights = tiny_graph("cpu")
    v = vectors.clone().requires_grad_(True)
    moments = edge_moments_fused(v, edge_index, u, weights, CUTOFF)
    (g,) = torch.autograd.grad(moments.pow(2).sum(), v, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice"):
        torch.autograd.grad(h.sum(), v)


# ---------------------------------------------------------------------------------------------- opcheck
def _op_samples(device):
    vectors, edge_index, u, weights = tiny_graph(device, seed=6)
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(u.shape[0], u.shape[1], 10, dtype=torch.float64, generator=gen).to(device)
    cot = [torch.randn(t.shape, dtype=t.dtype, generator=gen).to(device) for t in (vectors, u, weights)]
    return vectors, edge_index, u, weights, G, cot


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    vectors, edge_index, u, weights, G, cot = _op_samples(device)

    def rg(t):
        return t.clone().requires_grad_(requires_grad)

    torch.library.opcheck(OPS.edge_moments.default, (rg(vectors), edge_index, rg(u), rg(weights), CUTOFF))
    for compute_vectors in (True, False):
        torch.library.opcheck(
            OPS.edge_moments_backward.default,
            (rg(G), rg(vectors), edge_index, rg(u), rg(weights), CUTOFF, compute_vectors),
        )
    # The third op is once-differentiable by design (its backward raises), so with inputs that require grad only
    # the schema, fake and autograd-registration checks run.
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    if not requires_grad:
        utils = (*utils, "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        OPS.edge_moments_double_backward.default,
        (*(rg(c) for c in cot), rg(G), rg(vectors), edge_index, rg(u), rg(weights), CUTOFF),
        test_utils=utils,
    )


# ---------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("device", devices())
def test_skin_edges_contribute_exactly_zero(device):
    vectors, edge_index, u, weights = tiny_graph(device)
    beyond = vectors.norm(dim=1) >= CUTOFF
    assert beyond.sum() == 1
    outside = [t.clone().requires_grad_(True) for t in (vectors[beyond], u, weights)]
    moments = edge_moments_fused(outside[0], edge_index[:, beyond], outside[1], outside[2], CUTOFF)
    assert torch.equal(moments, torch.zeros_like(moments))
    grads = torch.autograd.grad(moments, outside, torch.ones_like(moments), create_graph=True)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    second = torch.autograd.grad(sum(g.sum() for g in grads), outside, allow_unused=True, materialize_grads=True)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in second)
    # With and without the skin edge: bit-identical.
    inside = ~beyond
    full = edge_moments_fused(vectors, edge_index, u, weights, CUTOFF)
    assert torch.equal(full, edge_moments_fused(vectors[inside], edge_index[:, inside], u, weights, CUTOFF))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_edge_list(device, dtype):
    u = torch.randn(3, 4, dtype=dtype, device=device, requires_grad=True)
    weights = torch.randn(5, 4, dtype=dtype, device=device, requires_grad=True)
    vectors = torch.zeros(0, 3, dtype=dtype, device=device, requires_grad=True)
    edge_index = torch.zeros(2, 0, dtype=torch.int64, device=device)
    moments = edge_moments_fused(vectors, edge_index, u, weights, CUTOFF)
    assert moments.shape == (3, 4, 10) and not moments.any()
    grads = torch.autograd.grad(moments.sum(), (vectors, u, weights), create_graph=True)
    assert grads[0].shape == (0, 3) and not grads[1].any() and not grads[2].any()
    second = torch.autograd.grad(
        grads[1].sum() + grads[2].sum(), (u, weights), allow_unused=True, materialize_grads=True
    )
    assert not any(g.any() for g in second)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(device):
    vectors, edge_index, u, weights = periodic_graph(torch.float64, device, channels=6, n_radial=5, seed=8)
    # Transposed / strided views of the same values.
    nc_vectors = vectors.t().contiguous().t()
    nc_edges = edge_index.t().contiguous().t()
    nc_u = torch.stack([u, u], dim=2)[..., 0]
    nc_weights = weights.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (nc_vectors, nc_edges, nc_u, nc_weights))
    got = first_and_second(edge_moments_fused, nc_vectors, nc_edges, nc_u, nc_weights)
    want = first_and_second(edge_moments_reference, vectors, edge_index, u, weights)
    assert_matches([got[0]], [want[0]], torch.float64)
    assert_matches(got[1], want[1], torch.float64)
    assert_matches(got[2], want[2], torch.float64)


def test_bad_inputs_raise():
    vectors, edge_index, u, weights = tiny_graph("cpu")
    with pytest.raises(RuntimeError, match="outside"):
        edge_moments_fused(vectors, edge_index.clone().fill_(7), u, weights, CUTOFF)
    with pytest.raises(RuntimeError, match="weights must be"):
        edge_moments_fused(vectors, edge_index, u, weights.float(), CUTOFF)
    with pytest.raises(RuntimeError, match="cutoff"):
        edge_moments_fused(vectors, edge_index, u, weights, -1.0)
    with pytest.raises(RuntimeError, match="size 3"):
        edge_moments_fused(vectors[:, :2], edge_index, u, weights, CUTOFF)
