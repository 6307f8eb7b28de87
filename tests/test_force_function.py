"""The force node F = force(X, θ): values, its VJP (-H w, (∂F/∂θ)ᵀ w), derivatives, and what it keeps."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk

from gdeq_ext import Batch, BPTTRelax, HybridRelax, StillingerWeber
from gdeq_ext.potentials import MLIP, energy_forces, force, recomputed_forces
from gdeq_ext.relax import PolishOptions
from gdeq_ext.testing import DTYPES, devices, tol

BACKENDS = ["fused", "reference"]


def silicon(dtype, device="cpu", n=2):
    """``n`` rattled 8-atom diamond cells (one sheared: triclinic), a batch of small cells."""
    cells = []
    for index in range(n):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        if index % 2:
            cell = atoms.cell.array.copy()
            cell[1, 0] += 0.3
            atoms.set_cell(cell, scale_atoms=True)
        atoms.rattle(0.1, seed=index + 1)
        cells.append(atoms)
    return Batch.from_ase(cells, dtype=dtype, device=device)


def small_mlip(backend, dtype, device="cpu"):
    return MLIP(features=8, channels=4, n_radial=4, n_layers=2, hidden=8, backend=backend).to(
        dtype=dtype, device=device
    )


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_vjp_match_autograd(backend, dtype, device):
    model = small_mlip(backend, dtype, device)
    batch = silicon(dtype, device)
    x = batch.positions.clone().requires_grad_(True)
    e_ref, f_ref = energy_forces(model, batch.with_positions(x), create_graph=True)
    e, f = force(model, batch.with_positions(x))
    torch.testing.assert_close(e, e_ref, **tol(dtype))
    torch.testing.assert_close(f, f_ref, **tol(dtype))

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(f.shape, generator=generator, dtype=dtype).to(device)
    e_bar = torch.randn(e.shape, generator=generator, dtype=dtype).to(device)
    inputs = [x, *model.parameters()]
    expected = torch.autograd.grad((f_ref * w).sum() + (e_ref * e_bar).sum(), inputs, allow_unused=True)
    got = torch.autograd.grad((f * w).sum() + (e * e_bar).sum(), inputs, allow_unused=True)
    for a, b in zip(got, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol(dtype, "derivative"))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_vector_product_is_the_finite_difference_of_forces(backend):
    model = small_mlip(backend, torch.float64)
    batch = silicon(torch.float64)
    v = torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = batch.positions.clone().requires_grad_(True)
    _, f = force(model, batch.with_positions(x))
    (minus_hv,) = torch.autograd.grad(f, x, v)  # ∂(w·F)/∂X = -H w
    h = 1e-5
    _, f_plus = energy_forces(model, batch.with_positions(batch.positions + h * v))
    _, f_minus = energy_forces(model, batch.with_positions(batch.positions - h * v))
    torch.testing.assert_close(minus_hv, (f_plus - f_minus) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    model = small_mlip(backend, torch.float64)
    batch = silicon(torch.float64, n=1)
    x = batch.positions.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: force(model, batch.with_positions(y)), (x,), atol=1e-7)


@pytest.mark.usefixtures("single_thread")
def test_gradgradcheck_reference_and_third_derivative_error_fused():
    batch = silicon(torch.float64, n=1)
    x = batch.positions.clone().requires_grad_(True)
    model = small_mlip("reference", torch.float64)
    assert torch.autograd.gradgradcheck(lambda y: force(model, batch.with_positions(y))[1], (x,), atol=1e-7)
    # A derivative of the force VJP is a third derivative of E: the fused kernels stop there, clearly.
    fused = small_mlip("fused", torch.float64)
    _, f = force(fused, batch.with_positions(x))
    (g,) = torch.autograd.grad(f.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not three times"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.usefixtures("single_thread")
def test_parameter_gradient_of_parameters_only():
    """(∂F/∂θ)ᵀ w alone (force matching): no gradient is asked of X."""
    model = small_mlip("fused", torch.float64)
    batch = silicon(torch.float64)
    w = torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = list(model.parameters())
    _, f = force(model, batch)
    _, f_ref = energy_forces(model, batch, create_graph=True)
    got = torch.autograd.grad((f * w).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((f_ref * w).sum(), params, allow_unused=True)
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **tol(torch.float64, "derivative"))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("mode", ["bptt", "hybrid-unpolished", "hybrid"])
def test_relaxation_gradients_equal_the_stored_graph(mode, kit):
    """Recomputed forces and the stored graph give the same gradients (to round-off).

    The polished hybrid runs on SW + 0.05·MLIP (the fine-tuning setting): the small random MLIP alone has nearly
    flat minima (Newton converges only linearly, the fixed point is not exact), where two runs that differ by
    round-off end ~1e-5 Å apart and their (flagged) implicit gradients differ accordingly."""
    mlip = small_mlip("fused", torch.float64)
    model = kit.Sum(StillingerWeber().double(), mlip, 0.05) if mode == "hybrid" else mlip
    batch = silicon(torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(force_fn):
        if mode == "bptt":
            relax = BPTTRelax(model, steps=6, fmax=0.0, force_fn=force_fn)
        else:
            polish = PolishOptions(newton_steps=0, curvature_steps=0) if mode == "hybrid-unpolished" else None
            relax = HybridRelax(model, window=4, fmax=1e-3, max_steps=300, force_fn=force_fn, warn=False, polish=polish)
        result = relax(batch)
        if mode == "hybrid":
            assert result.valid.all(), result.validity.describe()
        return torch.autograd.grad(result.positions.pow(2).sum(), params, allow_unused=True)

    for a, b in zip(gradient(recomputed_forces), gradient(None), strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, **tol(torch.float64, "derivative"))


def alive_saved_tensors(run) -> list[torch.Tensor]:
    """The tensors saved for backward during ``run()`` that the graph it returns still holds.

    (Saves inside a node's own forward that are freed before it returns are not counted: they are transient.)"""
    import gc
    import weakref

    saved: list[weakref.ref] = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    gc.collect()
    alive = [r() for r in saved]
    del result
    return [t for t in alive if t is not None]


@pytest.mark.usefixtures("single_thread")
def test_a_graph_through_the_steps_keeps_only_node_level_tensors():
    """What a BPTT graph through the force node holds between forward and backward: floating-point tensors of at
    most (n_atoms, 3) per step (positions, forces, step lengths), the neighbor list by reference, and θ; no
    per-edge or feature-wide activation of the MLIP."""
    model = MLIP(features=16, channels=8, n_layers=2, hidden=16, backend="fused").double()
    batch = silicon(torch.float64)
    parameter_ids = {id(p) for p in model.parameters()}

    def floating(tensors):
        return [t for t in tensors if t.is_floating_point() and id(t) not in parameter_ids]

    kept = floating(alive_saved_tensors(lambda: BPTTRelax(model, steps=5, fmax=0.0, force_fn=recomputed_forces)(batch)))
    assert kept, "nothing saved: the test would prove nothing"
    assert max(t.numel() for t in kept) <= 3 * batch.n_atoms
    # The stored graph, for contrast, holds feature-wide activations.
    stored = floating(alive_saved_tensors(lambda: BPTTRelax(model, steps=5, fmax=0.0)(batch)))
    assert max(t.numel() for t in stored) > 3 * batch.n_atoms


@pytest.mark.usefixtures("single_thread")
def test_an_optimizer_step_between_forward_and_backward_is_caught():
    model = small_mlip("fused", torch.float64)
    batch = silicon(torch.float64)
    _, f = force(model, batch)
    with torch.no_grad():
        model.readout[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        f.sum().backward()
