"""Float64 checks of dL/dθ for BPTT, implicit and hybrid relaxations, and their consistency.

L = Σ_s ΔQ_s(X_final, X_ref) throughout. "sw" is Stillinger-Weber's form with learnable ε, λ, A, B (it
equals gdeq_ext.StillingerWeber at the default values, checked below); "mlip" is SW plus a small learnable
gdeq_ext MLIP correction (θ = the MLIP's weights: the fine-tuning setting).
"""

from __future__ import annotations

import pytest
import torch

from gdeq_ext.gradients import LinearSolveWarning, RigidModeProjector, implicit_vjp
from gdeq_ext.loss import delta_q
from gdeq_ext.potentials.base import energy_forces
from gdeq_ext.potentials.mlip import MLIP
from gdeq_ext.potentials.stillinger_weber import StillingerWeber
from gdeq_ext.relax import BPTTRelax, HybridRelax, ImplicitRelax

TIGHT = 1e-10  # eV/Å: "a converged minimum" for the implicit checks

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(params=["sw", "mlip"])
def case(request, kit):
    """(potential, its parameters θ, batch, reference positions) for a sheared 8-atom Si cell."""
    batch = kit.make_batch([kit.diamond(shear=0.06, strain=-0.02)], rattle=0.05, seed=3)
    gen = torch.Generator().manual_seed(0)
    reference = batch.positions + 0.1 * torch.randn(batch.positions.shape, generator=gen, dtype=torch.float64)
    if request.param == "sw":
        potential = kit.SWLike()
        return potential, list(potential.parameters()), batch, reference
    sw = kit.SWLike().requires_grad_(False)
    mlip = MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=8, seed=0).double()
    return kit.Sum(sw, mlip, scale=10.0), list(mlip.parameters()), batch, reference


def _gradient(relax, parameters, batch, reference):
    result = relax(batch)
    loss = delta_q(result.positions, reference, batch).sum()
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters, strict=True)]
    ), result


def _directional_fd(make_relax, parameters, batch, reference, direction, eps):
    def shift(amount):
        offset = 0
        with torch.no_grad():
            for p in parameters:
                p += amount * direction[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    values = []
    for sign in (1, -1):
        shift(sign * eps)
        with torch.no_grad():
            values.append(float(delta_q(make_relax()(batch).positions.detach(), reference, batch).sum()))
        shift(-sign * eps)
    return (values[0] - values[1]) / (2 * eps)


def _direction(parameters, seed=1):
    n = sum(p.numel() for p in parameters)
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sw_like_is_stillinger_weber(kit):
    batch = kit.make_batch([kit.diamond(shear=0.06, strain=-0.02)], rattle=0.1, seed=9)
    e_ref, f_ref = energy_forces(StillingerWeber(), batch)
    e, f = energy_forces(kit.SWLike(), batch)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)


def test_bptt_gradient_is_exact(case):
    potential, parameters, batch, reference = case
    grad, _ = _gradient(BPTTRelax(potential, steps=10), parameters, batch, reference)
    v = _direction(parameters)
    fd = _directional_fd(lambda: BPTTRelax(potential, steps=10), parameters, batch, reference, v, 1e-5)
    assert abs(float(grad @ v) - fd) <= 1e-7 * abs(fd), (float(grad @ v), fd)


def test_implicit_gradient_is_exact_at_a_converged_minimum(case):
    potential, parameters, batch, reference = case
    grad, result = _gradient(ImplicitRelax(potential, fmax=TIGHT, rtol=1e-10), parameters, batch, reference)
    assert bool(result.converged.all())
    v = _direction(parameters)
    fd = _directional_fd(lambda: ImplicitRelax(potential, fmax=TIGHT), parameters, batch, reference, v, 1e-4)
    assert abs(float(grad @ v) - fd) <= 1e-6 * abs(fd), (float(grad @ v), fd)


def _dense_implicit_term(potential, parameters, batch, x_star, g):
    """uᵀ ∂F/∂θ with u = (P H P)⁺ P g from the dense Hessian (the formula, not the Krylov code)."""
    flat = x_star.detach().reshape(-1)
    hessian = torch.autograd.functional.hessian(lambda x: potential(batch.with_positions(x.view(-1, 3))).sum(), flat)
    project = RigidModeProjector(x_star, batch.system, batch.n_systems, batch.pbc)
    basis = torch.stack([project(e.view(-1, 3)).reshape(-1) for e in torch.eye(flat.numel(), dtype=flat.dtype)])
    u = torch.linalg.pinv(basis @ hessian @ basis, hermitian=True) @ project(g).reshape(-1)
    x = x_star.detach().requires_grad_(True)
    _, forces = energy_forces(potential, batch.with_positions(x), create_graph=True)
    grads = torch.autograd.grad(forces, parameters, u.view(-1, 3), allow_unused=True)
    return torch.cat(
        [(d if d is not None else torch.zeros_like(p)).reshape(-1) for d, p in zip(grads, parameters, strict=True)]
    )


@pytest.mark.parametrize("handoff", [1.0, 0.5])
def test_hybrid_gradient_equals_the_formula(case, handoff):
    potential, parameters, batch, reference = case
    window = 5
    grad, result = _gradient(
        HybridRelax(potential, window=window, fmax=1e-9, handoff=handoff, rtol=1e-11), parameters, batch, reference
    )
    x_star = result.positions.detach()
    x = x_star.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(delta_q(x, reference, batch).sum(), x)
    # Window part by BPTT: β gᵀ dX_K/dθ through an independent K-step unroll.
    x_k = BPTTRelax(potential, steps=window)(batch).positions
    window_part = torch.autograd.grad((x_k * g).sum(), parameters, allow_unused=True)
    window_part = torch.cat(
        [
            (d if d is not None else torch.zeros_like(p)).reshape(-1)
            for d, p in zip(window_part, parameters, strict=True)
        ]
    )
    expected = _dense_implicit_term(potential, parameters, batch, x_star, g) + handoff * window_part
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))


def test_hybrid_with_empty_window_is_implicit(sw_like, si_sheared):
    reference = si_sheared.positions + 0.05
    parameters = list(sw_like.parameters())
    g_hybrid, r_hybrid = _gradient(HybridRelax(sw_like, window=0, fmax=1e-6), parameters, si_sheared, reference)
    g_implicit, r_implicit = _gradient(ImplicitRelax(sw_like, fmax=1e-6), parameters, si_sheared, reference)
    assert torch.equal(g_hybrid, g_implicit)
    assert torch.equal(r_hybrid.positions, r_implicit.positions) and r_hybrid.window == ()


def test_handoff_zero_gives_the_window_no_gradient(sw_like, si_sheared):
    reference = si_sheared.positions + 0.05
    parameters = list(sw_like.parameters())
    result = HybridRelax(sw_like, window=4, fmax=1e-8, handoff=0.0)(si_sheared)
    loss = delta_q(result.positions, reference, si_sheared).sum()
    grads = torch.autograd.grad(loss, [*parameters, *result.window], allow_unused=True, retain_graph=True)
    assert all(d is None for d in grads[len(parameters) :])
    # The parameter gradient is then exactly the implicit term at the same X*.
    x = result.positions.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(delta_q(x, reference, si_sheared).sum(), x)
    implicit, _, _ = implicit_vjp(sw_like, si_sheared, x.detach(), g, parameters, options=None)
    torch.testing.assert_close(torch.stack(grads[: len(parameters)]), torch.stack(implicit), rtol=1e-9, atol=1e-12)
    # With β = 1 the last window state receives exactly g (straight-through), and the earlier states
    # keep their graph for a guidance loss.
    result = HybridRelax(sw_like, window=4, fmax=1e-8, handoff=1.0)(si_sheared)
    (at_k,) = torch.autograd.grad(delta_q(result.positions, reference, si_sheared).sum(), result.window[-1])
    torch.testing.assert_close(at_k, g, rtol=1e-6, atol=1e-9)
    guidance = sum(delta_q(x_t, reference, si_sheared).sum() for x_t in result.window)
    assert all(d is not None for d in torch.autograd.grad(guidance, parameters[1:]))


def test_bptt_approaches_implicit_as_the_horizon_grows(sw_like, si_sheared):
    # α = 0.03 Å²/eV: |1 - αλ| <= 0.86 over the Hessian's spectrum (4.6 to 40.6 eV/Å²), a contraction.
    reference = si_sheared.positions + 0.05 * torch.randn(
        si_sheared.positions.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    parameters = list(sw_like.parameters())
    target, _ = _gradient(ImplicitRelax(sw_like, fmax=TIGHT, rtol=1e-12), parameters, si_sheared, reference)
    errors = []
    for steps in (10, 40, 160):
        grad, _ = _gradient(BPTTRelax(sw_like, steps=steps, alpha=0.03), parameters, si_sheared, reference)
        errors.append(float((grad - target).norm() / target.norm()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-6, errors


@pytest.mark.parametrize("mode", ["bptt", "hybrid"])
def test_checkpointed_window_gives_bit_identical_gradients(sw_like, si_sheared, mode):
    reference = si_sheared.positions + 0.05
    parameters = list(sw_like.parameters())
    start = si_sheared.positions.clone().requires_grad_(True)
    batch = si_sheared.with_positions(start)
    grads = []
    for checkpoint in (False, True):
        relax = (
            BPTTRelax(sw_like, steps=8, checkpoint=checkpoint)
            if mode == "bptt"
            else HybridRelax(sw_like, window=6, fmax=1e-6, checkpoint=checkpoint)
        )
        loss = delta_q(relax(batch).positions, reference, batch).sum()
        grads.append(torch.autograd.grad(loss, [*parameters, start]))
    for plain, checkpointed in zip(*grads, strict=True):
        assert torch.equal(plain, checkpointed)


def test_solve_diagnostics_are_recorded_and_unconverged_solves_warn(morse, morse_cells):
    reference = morse_cells.positions + 0.05
    result = ImplicitRelax(morse, fmax=1e-6)(morse_cells)
    assert result.linear_solve is None and result.iterations is None
    delta_q(result.positions, reference, morse_cells).sum().backward()
    assert result.iterations.shape == (2,) and bool((result.iterations > 0).all())
    assert bool((result.residual <= 1e-6 * result.linear_solve.rhs_norm).all())
    # the solver's iterations plus the one product that measures the true residual
    assert result.hvps == int(result.iterations.max()) + 1
    result = ImplicitRelax(morse, fmax=1e-6, max_iter=3)(morse_cells)
    with pytest.warns(LinearSolveWarning, match=r"cg did not converge for 2 of 2 .*structure 1: residual"):
        delta_q(result.positions, reference, morse_cells).sum().backward()
    assert result.iterations.tolist() == [3, 3]


def test_batched_gradient_is_the_sum_of_per_structure_gradients(kit, morse, morse_cells):
    reference = morse_cells.positions + 0.05
    parameters = list(morse.parameters())
    together, _ = _gradient(ImplicitRelax(morse, fmax=1e-9, rtol=1e-10), parameters, morse_cells, reference)
    separate = 0
    for s, (start, stop) in enumerate(morse_cells.ranges()):
        single = type(morse_cells).from_ase([morse_cells.to_ase()[s]], dtype=torch.float64)
        grad, _ = _gradient(ImplicitRelax(morse, fmax=1e-9, rtol=1e-10), parameters, single, reference[start:stop])
        separate = separate + grad
    torch.testing.assert_close(together, separate, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("solver", ["minres", "fixed_point"])
def test_solvers_agree(sw_like, si_sheared, solver):
    reference = si_sheared.positions + 0.05
    parameters = list(sw_like.parameters())
    cg, _ = _gradient(ImplicitRelax(sw_like, fmax=1e-8, rtol=1e-10), parameters, si_sheared, reference)
    # α = 0.04 < 2/λ_max = 0.049: the fixed-point iteration converges (slowly).
    other, result = _gradient(
        ImplicitRelax(sw_like, fmax=1e-8, rtol=1e-10, solver=solver, fixed_point_alpha=0.04, max_iter=2000),
        parameters,
        si_sheared,
        reference,
    )
    torch.testing.assert_close(other, cg, rtol=1e-7, atol=1e-12)
    assert result.linear_solve.method == solver


def test_non_periodic_cluster_projects_rotations(kit, morse):
    import numpy as np
    from ase import Atoms

    # A 6-atom Morse cluster (octahedron-like minimum: exactly 6 zero modes, then 0.55 eV/Å²).
    positions, _ = kit.random_cluster_cell(6, 4.5, seed=1)
    batch = type(kit.make_batch([kit.diamond()])).from_ase(
        [Atoms("Ar6", positions=positions, pbc=False)], dtype=torch.float64
    )
    i, j = np.triu_indices(6, 1)

    def loss_of(x):  # rotation- and translation-invariant: squared error of all pair distances
        return ((x[i] - x[j]).norm(dim=1) - 2.7).square().sum()

    parameters = list(morse.parameters())
    result = ImplicitRelax(morse, fmax=TIGHT, rtol=1e-10)(batch)
    grads = torch.cat([d.reshape(-1) for d in torch.autograd.grad(loss_of(result.positions), parameters)])
    v = _direction(parameters, seed=4)
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(parameters, v, strict=True):
                p += sign * 1e-5 * d
            values.append(float(loss_of(ImplicitRelax(morse, fmax=TIGHT)(batch).positions.detach())))
            for p, d in zip(parameters, v, strict=True):
                p -= sign * 1e-5 * d
    fd = (values[0] - values[1]) / 2e-5
    assert abs(float(grads @ v) - fd) <= 1e-5 * abs(fd), (float(grads @ v), fd)


def test_second_backward_through_a_window_says_how(sw_like, si_sheared):
    reference = si_sheared.positions + 0.05
    loss = delta_q(BPTTRelax(sw_like, steps=2)(si_sheared).positions, reference, si_sheared).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()
    checkpointed = BPTTRelax(sw_like, steps=2, checkpoint=True)(si_sheared).positions
    loss = delta_q(checkpointed, reference, si_sheared).sum()
    first = torch.autograd.grad(loss, list(sw_like.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(sw_like.parameters()))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
