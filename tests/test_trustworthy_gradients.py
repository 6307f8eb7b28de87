"""No silent wrong gradient (issue #13): exact fixed points, saddles, failed solves and bad input, each flagged or
raised per structure, never handed on as if it were a gradient."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from ase import Atoms

import gdeq_ext
from gdeq_ext.data.batch import Batch, BatchValidationError
from gdeq_ext.gradients import (
    ImplicitSolveOptions,
    InvalidGradientError,
    LinearSolveWarning,
    conjugate_gradient,
    minres,
)
from gdeq_ext.loss import delta_q
from gdeq_ext.potentials.base import Potential
from gdeq_ext.relax import BPTTRelax, HybridRelax, ImplicitRelax, NonFiniteError, PolishOptions, fire
from gdeq_ext.relax.checks import RelaxationWarning

pytestmark = pytest.mark.usefixtures("single_thread")


def _flat(grads, parameters):
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters, strict=True)]
    )


def _loss(result, reference, batch):
    return delta_q(result.positions, reference, batch).sum()


def _trimer(spacing=(2.7, 2.6)):
    """A linear Ar trimer (no periodic axis): by symmetry its relaxed line is a stationary point, and a saddle."""
    x = [0.0, spacing[0], spacing[0] + spacing[1]]
    atoms = Atoms("Ar3", positions=[[p, 0.0, 0.0] for p in x], cell=[20.0] * 3, pbc=False)
    return Batch.from_ase([atoms], dtype=torch.float64)


# ------------------------------------------------------------------------------------- loose fixed point
def test_soft_potential_implicit_gradient_matches_finite_differences_at_default_settings(kit):
    """A soft Morse cell (softest curvature ~0.03 eV/Å²): at FIRE's default fmax the un-polished implicit gradient
    is wrong by more than its own size; with the default Newton polish it matches a central finite difference of
    the exact fixed point to < 1e-3."""
    potential = kit.MorsePair(D=0.1)
    batch = kit.make_batch([kit.random_cluster_cell(8, 6.0, seed=3)], numbers=18)
    parameters = list(potential.parameters())
    reference = batch.positions + 0.1 * torch.randn(
        batch.positions.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )

    def gradient(relax):
        result = relax(batch)
        return _flat(torch.autograd.grad(_loss(result, reference, batch), parameters), parameters), result

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelaxationWarning)
        polished, result = gradient(ImplicitRelax(potential))
        raw, raw_result = gradient(ImplicitRelax(potential, polish=PolishOptions(newton_steps=0)))
    fd = []
    eps = 1e-5
    for p in parameters:
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                p += sign * eps
                exact = ImplicitRelax(potential, fmax=1e-10, max_steps=20000)(batch)
                values.append(float(_loss(exact, reference, batch)))
                p -= sign * eps
        fd.append((values[0] - values[1]) / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    assert float((raw - fd).norm() / fd.norm()) > 1.0  # the failure the polish exists for
    assert float((polished - fd).norm() / fd.norm()) < 1e-3, (polished, fd)
    assert bool(result.validity.exact.all()) and bool(result.valid.all())
    assert float(result.fixed_point_error.max()) <= 1e-5
    assert int(result.validity.newton_steps.sum()) > 0 and result.validity.hvps > 0
    assert float(result.fmax.max()) < float(raw_result.fmax.max())


def test_polish_leaves_an_exact_minimum_alone(morse, morse_cells):
    result = ImplicitRelax(morse, fmax=1e-9)(morse_cells)
    assert bool(result.validity.valid.all())
    assert int(result.validity.newton_steps.sum()) == 0
    assert bool((result.validity.lowest_curvature > 0.1).all())  # 0.2 and 0.14 eV/Å² (conftest)


# ------------------------------------------------------------------------------------------------ saddles
def test_damped_newton_recovers_when_lanczos_overestimates_the_lowest_curvature(morse, monkeypatch):
    """A dimer stretched past the Morse inflection point (r0 + ln 2 / a = 3.03 Å; here 3.3 Å) has negative curvature
    along the bond, so CG meets it and the step is damped. If the short Lanczos run overestimates λ_min (here forced:
    it reports |λ_min|, the wrong sign), the first shift leaves H + μI indefinite; the shift must grow until the
    damped solve is positive definite, and the polish must still end at the exact minimum (it used to give a zero
    step and leave the structure where it was, "not exact")."""
    import importlib

    polish_module = importlib.import_module("gdeq_ext.relax.polish")
    from gdeq_ext.gradients.implicit_function import ImplicitSolveOptions
    from gdeq_ext.relax.forces import default_force_fn

    real = polish_module.extreme_curvatures
    calls = []

    def overestimating(*args, **kwargs):
        lowest, highest, products = real(*args, **kwargs)
        calls.append(float(lowest[0]))
        return lowest.abs(), highest, products

    monkeypatch.setattr(polish_module, "extreme_curvatures", overestimating)
    atoms = Atoms("Ar2", positions=[[5.0, 5.0, 5.0], [8.3, 5.0, 5.0]], cell=[12.0] * 3, pbc=False)
    batch = Batch.from_ase(atoms, dtype=torch.float64)
    result = polish_module.polish(
        morse,
        batch,
        batch.positions,
        torch.tensor([True]),
        options=PolishOptions(),
        solve=ImplicitSolveOptions(),
        force_fn=default_force_fn(None),
    )
    assert calls[0] < -0.05  # the real lowest curvature at the start: negative, along the bond
    assert bool(result.exact[0]) and float(result.fixed_point_error[0]) <= 1e-5
    distance = float((result.positions[1] - result.positions[0]).norm())
    assert distance < 3.0 and float(result.fmax[0]) < 1e-6, distance  # the minimum (2.43 Å with the cutoff taper)


@pytest.mark.parametrize("on_invalid", ["raise", "skip", "warn"])
def test_saddle_is_flagged_and_the_policy_applies(kit, on_invalid):
    morse = kit.MorsePair(cutoff=6.0)  # the end atoms interact: bending lowers the energy
    batch = _trimer()
    reference = batch.positions + 0.05
    relax = ImplicitRelax(morse, fmax=1e-4, on_invalid=on_invalid)
    if on_invalid == "raise":
        with pytest.raises(InvalidGradientError, match=r"structure 0: saddle point \(lowest curvature -"):
            relax(batch)
        return
    with pytest.warns(RelaxationWarning, match=r"structure 0: saddle point"):
        result = relax(batch)
    assert bool(result.converged.all()) and not bool(result.validity.minimum.any())
    assert float(result.validity.lowest_curvature[0]) < 0 and not bool(result.valid.any())
    grads = torch.autograd.grad(_loss(result, reference, batch), list(morse.parameters()), allow_unused=True)
    flat = _flat(grads, list(morse.parameters()))
    if on_invalid == "skip":
        assert bool(result.skipped.all()) and float(flat.abs().max()) == 0.0
    else:
        assert not bool(result.skipped.any()) and float(flat.abs().max()) > 0


def test_diverging_fixed_point_backward_never_reaches_the_optimizer(morse, morse_cells):
    """solver="fixed_point" with a step beyond 2/λ_max diverges; with warn=False and on_invalid="warn" the huge u is
    still zeroed (a diverged solve is dropped under every policy), and "raise" names the structure."""
    reference = morse_cells.positions + 0.05
    parameters = list(morse.parameters())
    options = dict(fmax=1e-6, solver="fixed_point", fixed_point_alpha=5.0, max_iter=400, warn=False)
    result = ImplicitRelax(morse, **options)(morse_cells)
    flat = _flat(torch.autograd.grad(_loss(result, reference, morse_cells), parameters), parameters)
    assert bool(torch.isfinite(flat).all()) and float(flat.abs().max()) == 0.0
    assert bool(result.skipped.all()) and bool(result.linear_solve.unusable.all())
    assert not bool(result.valid.any())
    raising = ImplicitRelax(morse, on_invalid="raise", **options)(morse_cells)
    with pytest.raises(InvalidGradientError, match=r"structure 0: (diverged|non-finite)"):
        _loss(raising, reference, morse_cells).backward()


# --------------------------------------------------------------------------------------- Krylov residuals
@pytest.mark.parametrize("solver", [minres, conjugate_gradient])
def test_singular_system_is_not_reported_converged(solver):
    system = torch.tensor([0, 0, 1, 1])
    b = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def matvec(v):  # structure 0: H = 0 (non-interacting atoms); structure 1: H = 2 I
        return torch.where((system == 0).unsqueeze(1), 0.0, 2.0 * v)

    with pytest.warns(LinearSolveWarning, match=r"structure 0: residual .*singular"):
        x, info = solver(matvec, b, system, 2)
    assert info.converged.tolist() == [False, True]
    assert info.singular.tolist() == [True, False]
    torch.testing.assert_close(info.residual[0], info.rhs_norm[0])  # the true residual: u = 0 solves nothing
    torch.testing.assert_close(x[2:], b[2:] / 2)


def test_solve_options_reject_nan_and_bad_values():
    for kwargs, pattern in [
        (dict(rtol=math.nan), "rtol"),
        (dict(atol=-1.0), "atol"),
        (dict(max_iter=0), "max_iter"),
        (dict(damping=math.nan), "damping"),
        (dict(fixed_point_alpha=0.0), "fixed_point_alpha"),
        (dict(on_invalid="ignore"), "on_invalid"),
        (dict(rtol=0.0, atol=0.0), "both 0"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            ImplicitSolveOptions(**kwargs)


# ------------------------------------------------------------------------------- unconverged relaxations
def test_unconverged_structure_is_skipped_and_the_rest_keeps_its_gradient(morse, morse_cells, kit):
    parameters = list(morse.parameters())
    reference = morse_cells.positions + 0.05
    relaxed = ImplicitRelax(morse, fmax=1e-8)(morse_cells).positions.detach()
    # structure 0 starts relaxed, structure 1 from its rattled start: 5 FIRE steps leave it unconverged.
    hot = morse_cells.with_positions(
        torch.where((morse_cells.system == 0).unsqueeze(1), relaxed, morse_cells.positions)
    )
    relax = ImplicitRelax(morse, fmax=1e-6, max_steps=5, on_invalid="skip", warn=False)
    result = relax(hot)
    assert result.converged.tolist() == [True, False]
    grads = _flat(torch.autograd.grad(_loss(result, reference, hot), parameters), parameters)
    assert result.skipped.tolist() == [False, True]
    # Structure 0 alone: the same gradient (its contribution), structure 1 added nothing.
    alone = Batch.from_ase(hot.to_ase()[:1], dtype=torch.float64)
    single = relax(alone)
    expected = _flat(torch.autograd.grad(_loss(single, reference[:8], alone), parameters), parameters)
    torch.testing.assert_close(grads, expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(InvalidGradientError, match=r"structure 1: relaxation did not converge"):
        ImplicitRelax(morse, fmax=1e-6, max_steps=5, on_invalid="raise", warn=False)(hot)


def test_hybrid_skip_also_zeroes_the_window_hand_off(morse, morse_cells):
    reference = morse_cells.positions + 0.05
    relax = HybridRelax(morse, window=3, fmax=1e-6, max_steps=5, on_invalid="skip", warn=False)
    result = relax(morse_cells)
    assert not bool(result.converged.any())
    grads = torch.autograd.grad(_loss(result, reference, morse_cells), list(morse.parameters()))
    assert all(float(g.abs().max()) == 0.0 for g in grads)


# ------------------------------------------------------------------------------------------------- FIRE
class _NaNEnergy(Potential):
    """Finite forces, NaN energy: a broken potential, not a converged structure."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cutoff = inner, inner.cutoff

    def energy(self, batch, edges=None):
        return self.inner.energy(batch, edges) + torch.tensor(float("nan"), dtype=batch.positions.dtype)


def test_fire_with_a_nan_energy_fails_by_name(morse, morse_cells):
    with pytest.raises(NonFiniteError, match=r"structure 0 at step 0 \(energy nan\)"):
        fire(_NaNEnergy(morse), morse_cells, fmax=0.01)


def test_atoms_flying_apart_are_not_converged(kit):
    """A purely repulsive cluster: the atoms fly beyond the cutoff, where the force is zero."""
    repulsive = kit.MorsePair(D=0.5, a=1.6, r0=5.0, cutoff=3.0)  # r < r0 everywhere inside the cutoff: repulsive
    atoms = Atoms("Ar3", positions=[[0, 0, 0], [1.5, 0, 0], [0, 1.5, 0.2]], cell=[40.0] * 3, pbc=False)
    batch = Batch.from_ase([atoms], dtype=torch.float64)
    from gdeq_ext.neighbors.verlet import VerletList

    with pytest.warns(RelaxationWarning, match="atoms separated beyond the cutoff"):
        out = fire(repulsive, batch, fmax=0.01, max_steps=2000, verlet=VerletList(repulsive.cutoff, 0.5))
    assert float(out.fmax[0]) < 0.01 and not bool(out.converged[0]) and bool(out.separated[0])
    result = ImplicitRelax(repulsive, on_invalid="skip", warn=False)(batch)
    assert bool(result.validity.separated[0]) and not bool(result.valid[0])
    assert "atoms separated beyond the cutoff" in result.validity.describe()


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: ImplicitRelax(p, fmax=math.nan), "fmax"),
        (lambda p: ImplicitRelax(p, max_steps=-1), "max_steps"),
        (lambda p: ImplicitRelax(p, max_steps=2.5), "max_steps"),
        (lambda p: ImplicitRelax(p, rtol=math.nan), "rtol"),
        (lambda p: ImplicitRelax(p, on_invalid="sometimes"), "on_invalid"),
        (lambda p: HybridRelax(p, alpha=math.nan), "alpha"),
        (lambda p: HybridRelax(p, window=-1), "window"),
        (lambda p: HybridRelax(p, handoff=math.inf), "handoff"),
        (lambda p: BPTTRelax(p, steps=10, maxstep=0.0), "maxstep"),
        (lambda p: BPTTRelax(p, steps=10, alpha=math.nan), "alpha"),
        (lambda p: PolishOptions(newton_tol=math.nan), "newton_tol"),
        (lambda p: PolishOptions(newton_steps=-1), "newton_steps"),
    ],
)
def test_relaxation_arguments_are_validated(morse, make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(morse)


# ---------------------------------------------------------------------------------------------- input validation
def _two_atoms(**overrides):
    positions = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    arguments = dict(
        positions=positions,
        numbers=[14, 14],
        cell=torch.eye(3, dtype=torch.float64)[None] * 5.0,
        pbc=torch.ones(1, 3, dtype=torch.bool),
        n_atoms_per_system=[2],
    )
    arguments.update(overrides)
    return arguments


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(masses=torch.tensor([28.0, float("nan")], dtype=torch.float64)), "structure 0: atom 1 has mass nan"),
        (dict(masses=torch.tensor([float("inf"), 28.0], dtype=torch.float64)), "structure 0: atom 0 has mass inf"),
        (dict(pbc=torch.ones(2, dtype=torch.bool)), r"pbc must have shape \(1, 3\), got \(2,\)"),
        (
            dict(
                n_atoms_per_system=[3, -1],
                cell=torch.eye(3, dtype=torch.float64).repeat(2, 1, 1) * 5.0,
                pbc=torch.ones(2, 3, dtype=torch.bool),
            ),
            "structure 1: negative atom count -1",
        ),
        (dict(n_atoms_per_system=[[2]]), "n_atoms_per_system must be 1-D"),
        (dict(numbers=torch.tensor([14.5, 14.0])), "atom 0: atomic number 14.5 is not an integer"),
    ],
)
def test_bad_batches_are_named(overrides, message):
    with pytest.raises(BatchValidationError, match=message):
        Batch.from_tensors(**_two_atoms(**overrides))


@pytest.mark.parametrize("kernel", [True, False])
def test_thin_cell_is_refused_before_allocating(kernel):
    """A 0.01 Å periodic cell with a 3.77 Å cutoff (~2e8 pairs, ~10 GB; the bound says 4.3e8): refused."""
    from gdeq_ext.neighbors.reference import neighbor_list_reference

    positions = torch.zeros(1, 3, dtype=torch.float64)
    cell = torch.eye(3, dtype=torch.float64)[None] * 0.01
    pbc = torch.ones(1, 3, dtype=torch.bool)
    counts = torch.tensor([1])
    with pytest.raises(ValueError, match=r"structure 0: cell far thinner than the cutoff: up to .* pairs would be"):
        if kernel:
            if not gdeq_ext.HAVE_EXTENSION:
                pytest.skip("compiled extension not built")
            gdeq_ext.neighbor_list((positions, cell, pbc, counts), 3.77)
        else:
            neighbor_list_reference(positions, cell, pbc, counts, 3.77, True)
    # A physical small cell with a cutoff larger than the cell is fine (8 atoms, 10 Å: ~1e3 candidates per atom).
    cell = torch.eye(3, dtype=torch.float64)[None] * 5.43
    positions = torch.rand(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5.43
    edge_index, _ = gdeq_ext.neighbor_list((positions, cell, pbc, torch.tensor([8])), 10.0)
    assert edge_index.shape[1] > 0
