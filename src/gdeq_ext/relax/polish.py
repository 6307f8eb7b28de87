"""Exact fixed points before the implicit backward: Newton–Krylov polish and the lowest-curvature check.

The implicit gradient is taken at the structure where the forward solver stopped. Its error is not "of order fmax":
the distance from that point to the exact fixed point is about ||H⁻¹F||, i.e. up to fmax / λ_min(H), so on a soft
potential (small λ_min) FIRE's default fmax = 0.01 eV/Å can leave X tenths of an Å from X* and give an implicit
gradient of the wrong sign. The polish removes the dependence on the user's fmax: from FIRE's end point it takes
Newton steps on F(X) = 0,

    H(X_k) δ_k = F(X_k)   (the same batched CG/MINRES as the backward, rigid modes projected),   X_{k+1} = X_k + δ_k,

per structure, until the Newton step itself is short: ||δ_k|| <= ``newton_tol`` (Å). ||δ_k|| = ||H⁻¹F(X_k)|| is the
a-posteriori estimate of the distance from X_k to the exact fixed point, and is reported per structure
(``fixed_point_error``) for the structure that is returned. Newton converges quadratically near a non-degenerate
stationary point, so from FIRE's end point one or two steps usually suffice. Safeguards: a step is scaled so no atom
moves more than ``newton_maxstep`` (ASE's maxstep, 0.2 Å), and it is kept only if it lowers the energy or both ||F||
and fmax (otherwise it is halved, up to four times); a structure that cannot reach the tolerance keeps its best
point and is flagged not ``exact``. The Newton solves use CG. Where CG meets negative curvature (FIRE on a soft
potential can stop outside the convex region around the minimum) H⁻¹F could point uphill, towards a saddle; there
the step is damped, δ = (H + μI)⁻¹F with μ above -λ_min from a Lanczos estimate (Levenberg–Marquardt), and is kept
only if it lowers the energy, until the structure reaches the convex region and plain Newton takes over. At a true
saddle F is tiny, so the damped steps barely move it, and the curvature check flags it.

Newton converges to any stationary point, a saddle included: whether the point is a minimum is decided separately,
by a short Lanczos run on H at the returned point (:func:`gdeq_ext.gradients.extreme_curvatures`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.batched import per_atom, structure_norm
from gdeq_ext.gradients.hessian import HessianOperator
from gdeq_ext.gradients.implicit_function import (
    ImplicitSolveOptions,
    check_positive,
    compaction_for,
    solve_hessian,
)
from gdeq_ext.gradients.lanczos import extreme_curvatures
from gdeq_ext.neighbors.verlet import VerletList
from gdeq_ext.potentials.base import Edges
from gdeq_ext.relax.checks import check_finite, structure_fmax
from gdeq_ext.relax.forces import ForceFn, edges_for

__all__ = ["PolishOptions", "PolishResult", "polish"]

_MAX_HALVINGS = 4
# Fourfold increases of the Levenberg-Marquardt shift when H + μI is still indefinite (4^6: 1e-3 → 4 λ_max).
_MAX_DAMPING_RETRIES = 6


@dataclass(frozen=True)
class PolishOptions:
    """How the relaxed structure is made exact and checked before it is differentiated implicitly.

    Attributes:
        newton_steps: force evaluations of the Newton polish per relaxation at most (default 24; 0 turns it off).
        newton_tol: Å, target of the estimated distance to the exact fixed point, ||H⁻¹F|| per structure
            (default 1e-5 Å). The implicit gradient's relative error is about this distance over the length on which
            the Hessian changes (tenths of an Å for bonds), so 1e-5 Å keeps it near 1e-4.
        newton_rtol: relative tolerance of each Newton solve (default 1e-3: an inexact Newton step still converges
            fast, and the distance estimate is good to 0.1 %).
        newton_maxstep: Å, largest per-atom displacement of one Newton step (default 0.2, ASE's maxstep).
        curvature_steps: Lanczos iterations (batched H·v products) of the lowest-curvature check (default 20;
            0 turns it off).
        negative_curvature: eV/Å², a lowest curvature below ``-negative_curvature`` marks a saddle (default 1e-3).
    """

    newton_steps: int = 24
    newton_tol: float = 1e-5
    newton_rtol: float = 1e-3
    newton_maxstep: float = 0.2
    curvature_steps: int = 20
    negative_curvature: float = 1e-3

    def __post_init__(self):
        check_positive("newton_steps", self.newton_steps, allow_zero=True, integer=True)
        check_positive("curvature_steps", self.curvature_steps, allow_zero=True, integer=True)
        for name in ("newton_tol", "newton_rtol", "newton_maxstep", "negative_curvature"):
            check_positive(name, getattr(self, name))


@dataclass
class PolishResult:
    """The polished structures. All per-structure tensors are (n_systems,).

    Attributes:
        positions: (n_atoms, 3) Å, detached; energy: eV; forces: (n_atoms, 3) eV/Å; fmax: eV/Å at ``positions``.
        edges: neighbor list valid at ``positions`` (None for potentials that build their own).
        fixed_point_error: Å, estimated distance to the exact fixed point, ||H⁻¹F|| from a solve at ``positions``
            (with the polish off: ||F|| / λ_min from the curvature check; NaN when neither ran or λ_min <= 0).
        exact: bool, ``fixed_point_error <= newton_tol`` (with the polish off and no estimate: True, not checked).
        newton_steps: int64, Newton steps accepted per structure.
        lowest_curvature, highest_curvature: eV/Å², extreme Ritz values of the projected Hessian (NaN: not checked).
        minimum: bool, no curvature below ``-negative_curvature`` (or sqrt(eps) of the largest curvature) was found,
            by the Lanczos check or by a Newton solve's CG.
        hvps: batched Hessian-vector products used (Newton solves and the curvature check).
        force_evaluations: batched force evaluations (each with a graph for the products).
    """

    positions: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor
    fmax: torch.Tensor
    edges: Edges | None
    fixed_point_error: torch.Tensor
    exact: torch.Tensor
    newton_steps: torch.Tensor
    lowest_curvature: torch.Tensor
    highest_curvature: torch.Tensor
    minimum: torch.Tensor
    hvps: int
    force_evaluations: int

    @classmethod
    def unpolished(cls, solved) -> PolishResult:
        """The forward solver's result as it is (polish and check both off): nothing estimated or checked."""
        nan = torch.full_like(solved.fmax, float("nan"))
        return cls(
            positions=solved.positions,
            energy=solved.energy,
            forces=solved.forces,
            fmax=solved.fmax,
            edges=solved.edges,
            fixed_point_error=nan,
            exact=torch.ones_like(solved.converged),
            newton_steps=torch.zeros_like(solved.steps),
            lowest_curvature=nan,
            highest_curvature=nan.clone(),
            minimum=torch.ones_like(solved.converged),
            hvps=0,
            force_evaluations=0,
        )


def polish(
    potential,
    batch: Batch,
    positions: torch.Tensor,
    eligible: torch.Tensor,
    *,
    options: PolishOptions,
    solve: ImplicitSolveOptions,
    force_fn: ForceFn,
    verlet: VerletList | None = None,
    step_offset: torch.Tensor | int = 0,
    compact: bool = True,
) -> PolishResult:
    """Newton-polish the ``eligible`` structures of ``batch`` at ``positions`` and check their curvature.

    Args:
        potential: the potential; batch: the structures; positions: (n_atoms, 3) Å, the forward solver's end points.
        eligible: (n_systems,) bool, structures to polish (the converged ones); the others are only measured.
        options: :class:`PolishOptions`.
        solve: the backward's :class:`ImplicitSolveOptions` (its rigid-mode projection); each Newton solve is CG
            with ``options.newton_rtol``, the default iteration cap and no damping.
        force_fn: the force evaluation; verlet: the relaxation's neighbor list (or None).
        step_offset: relaxation steps taken before (for error messages).
        compact: evaluate and solve only the structures a Newton round still works on (default True; the
            relaxation's ``FIREOptions.compact``). Structures need 1-5 Newton steps and each step's CG runs until
            the slowest structure of its batch converges, so without compaction the finished ones are carried
            through every later product. Each structure's result is the same either way (a structure's forces,
            products and solve do not depend on the others in its batch); the curvature check and the returned
            forces and neighbor list are always the whole batch's.

    Raises:
        NonFiniteError: forces became non-finite at a polished point (names the structure).
    """
    system, n_systems = batch.system, batch.n_systems
    newton = ImplicitSolveOptions(
        solver="cg",
        rtol=options.newton_rtol,
        # The default per-structure cap, not the backward's max_iter: a cap meant for the backward solve must not
        # stop the polish.
        project_rotations=solve.project_rotations,
        warn=False,
        compact=compact,
    )
    hvps = 0
    evaluations = 0

    def working_set(which: torch.Tensor) -> tuple[Batch, torch.Tensor | None, torch.Tensor | None]:
        """The batch a Newton round evaluates: the structures ``which`` (their atoms' and their own indices in
        the whole batch), or the whole batch (indices None) without compaction or when all are in it."""
        if not compact or bool(which.all()):
            return batch, None, None
        members = which.nonzero().flatten()
        work, atoms = batch.select(members)
        return work, atoms, members

    def operator_at(work: Batch, x_work: torch.Tensor, whole: bool) -> tuple[HessianOperator, Edges | None]:
        nonlocal evaluations
        evaluations += 1
        # A smaller batch gets a list of its own; the relaxation's list stays the whole batch's.
        neighbors = verlet if whole or verlet is None else VerletList(verlet.cutoff, verlet.skin, verlet.max_step)
        edges = edges_for(neighbors, work.with_positions(x_work))
        op = HessianOperator(potential, work, x_work, edges, force_fn, project_rotations=solve.project_rotations)
        return op, edges

    def newton_step(op: HessianOperator, work: Batch, forces: torch.Tensor, which: torch.Tensor):
        """δ = H⁻¹F, or (H + μI)⁻¹F with μ > -λ_min where CG meets negative curvature (Levenberg–Marquardt: a
        descent step towards the minimum, not the saddle), for the structures ``which`` of ``work`` (all tensors
        are ``work``'s). Returns δ, the distance estimate (inf when damped or the solve failed) and which
        structures were damped."""
        nonlocal hvps
        w_system, w_n = work.system, work.n_systems
        rhs = torch.where(per_atom(which, w_system), forces, 0.0)
        delta, info = solve_hessian(op, rhs, work, op.projector, newton, restrict=compaction_for(op, newton))
        hvps += info.matvecs
        stalled = ~(info.residual <= 0.5 * info.rhs_norm)
        damped = which & (info.indefinite | stalled)
        if bool(damped.any()):
            lowest, highest, products = extreme_curvatures(
                op, w_system, w_n, forces.dtype, project=op.projector, steps=max(options.curvature_steps, 20)
            )
            hvps += products
            shift = 2.0 * torch.nan_to_num(-lowest).clamp_min(0.0) + 1e-3 * torch.nan_to_num(highest).abs()
            mu = torch.where(damped, shift + options.negative_curvature, 0.0)
            # A short Lanczos run overestimates λ_min (Ritz values lie inside the spectrum), so H + μI can still be
            # indefinite: then μ grows fourfold and the solve is redone for those structures, up to
            # 2·λ_max (|λ_min| <= λ_max bounds it), where H + μI is positive definite.
            ceiling = 2.0 * torch.nan_to_num(highest).abs() + options.negative_curvature
            pending = damped.clone()
            usable = torch.zeros_like(damped)
            damped_delta = torch.zeros_like(delta)
            for _ in range(_MAX_DAMPING_RETRIES):

                def damped_product(v, mu=mu):
                    return op(v) + per_atom(mu, w_system) * v

                rhs_damped = torch.where(per_atom(pending, w_system), forces, 0.0)
                step, info_damped = solve_hessian(damped_product, rhs_damped, work, op.projector, newton)
                hvps += info_damped.matvecs
                done = pending & ~info_damped.indefinite & torch.isfinite(info_damped.residual)
                damped_delta = torch.where(per_atom(done, w_system), step, damped_delta)
                usable |= done
                pending = pending & ~done & (mu < ceiling)
                if not bool(pending.any()):
                    break
                mu = torch.where(pending, torch.minimum(4.0 * mu, ceiling), mu)
            delta = torch.where(per_atom(damped, w_system), damped_delta, delta)
        length = structure_norm(delta, w_system, w_n)
        trusted = torch.isfinite(length) & ~stalled & ~info.indefinite
        delta = torch.where(per_atom(which & torch.isfinite(length), w_system), delta, 0.0)
        return delta, torch.where(trusted, length, torch.inf), damped

    def solve_for(which: torch.Tensor, x_now: torch.Tensor, forces_now: torch.Tensor, built=None):
        """Newton steps of the structures ``which`` at ``x_now`` (whole-batch tensors in and out). ``built``: an
        operator already at ``x_now`` for (work, atoms, members), reused when it holds exactly ``which``."""
        work, atoms, members = working_set(which)
        if built is not None and _same_members(built[2], members, built[0].n_systems, work.n_systems):
            op = built[3]
        else:
            op, _ = operator_at(work, x_now if atoms is None else x_now[atoms], atoms is None)
        w_forces = forces_now if atoms is None else forces_now[atoms]
        w_which = which if members is None else torch.ones_like(which[members])
        w_delta, w_length, w_damped = newton_step(op, work, w_forces, w_which)
        if members is None:
            return w_delta, w_length, w_damped
        delta = torch.zeros_like(x_now)
        delta[atoms] = w_delta
        length = torch.full((n_systems,), torch.inf, dtype=x_now.dtype, device=x_now.device)
        length[members] = w_length
        damped = torch.zeros_like(which)
        damped[members] = w_damped
        return delta, length, damped

    x = positions.detach()
    op, edges = operator_at(batch, x, True)
    forces = op.forces.detach()
    energy = op.energy
    check_finite(forces, batch, step_offset, where="Newton polish")
    force_norm = structure_norm(forces, system, n_systems)
    force_max = structure_fmax(forces, batch)
    error = torch.full((n_systems,), float("nan"), dtype=x.dtype, device=x.device)
    accepted = torch.zeros(n_systems, dtype=torch.int64, device=x.device)
    eligible = eligible & (force_norm > 0)  # F = 0 exactly: already the fixed point
    error = torch.where(force_norm == 0, 0.0, error)
    op_matches_x = True  # the last operator built is the whole batch's at x

    if options.newton_steps > 0 and bool(eligible.any()):
        delta, length, damped = solve_for(eligible, x, forces, built=(batch, None, None, op))
        error = torch.where(eligible, length, error)
        scale = torch.ones_like(error)
        active = eligible & ~(error <= options.newton_tol)
        for _ in range(options.newton_steps):
            if not bool(active.any()):
                break
            # Scale the whole step (keeping its direction) so that no atom moves more than newton_maxstep.
            largest = torch.zeros_like(error).scatter_reduce_(
                0, system, torch.linalg.vector_norm(delta, dim=1), "amax", include_self=True
            )
            cap = torch.clamp(options.newton_maxstep / largest.clamp_min(1e-300), max=1.0)
            candidate = torch.where(per_atom(active, system), x + per_atom(scale * cap, system) * delta, x)
            work, atoms, members = working_set(active)
            op, w_edges = operator_at(work, candidate if atoms is None else candidate[atoms], atoms is None)
            if atoms is None:
                new_forces, new_energy, edges = op.forces.detach(), op.energy, w_edges
                new_norm = structure_norm(new_forces, system, n_systems)
                new_fmax = structure_fmax(new_forces, batch)
            else:  # only the active structures were evaluated: the others keep their values (never selected)
                new_forces = forces.clone()
                new_forces[atoms] = op.forces.detach()
                new_energy, new_norm, new_fmax = energy.clone(), force_norm.clone(), force_max.clone()
                new_energy[members] = op.energy
                new_norm[members] = structure_norm(op.forces.detach(), work.system, work.n_systems)
                new_fmax[members] = structure_fmax(op.forces.detach(), work)
            # Keep a Newton step if it lowers the energy (H positive definite there, so δ = H⁻¹F is a descent
            # direction: the line-search criterion) or lowers both ||F|| and fmax (near the minimum, where energy
            # differences drown in round-off); a damped step only if it lowers the energy (it heads downhill, where
            # the force may first grow); otherwise halve it. (Force-only acceptance rejected most steps along soft,
            # anharmonic modes: four defect starts of the worked example, λ_min ≈ 0.05 eV/Å², stopped 0.1-0.2 Å
            # short after 24 evaluations; with the energy criterion they reach 1e-5 Å in 7-8 steps.)
            lowers_force = (new_norm < force_norm) & (new_fmax < force_max)
            lowers_energy = new_energy < energy
            better = active & torch.isfinite(new_norm) & (lowers_energy | (~damped & lowers_force))
            worse = active & ~better
            x = torch.where(per_atom(better, system), candidate, x)
            forces = torch.where(per_atom(better, system), new_forces, forces)
            energy = torch.where(better, new_energy, energy)
            force_norm = torch.where(better, new_norm, force_norm)
            force_max = torch.where(better, new_fmax, force_max)
            accepted += better
            op_matches_x = atoms is None and not bool(worse.any())
            scale = torch.where(worse, 0.5 * scale, 1.0)
            if bool(better.any()):
                step, length, damped_now = solve_for(better, x, forces, built=(work, atoms, members, op))
                delta = torch.where(per_atom(better, system), step, delta)
                error = torch.where(better, length, error)
                damped = torch.where(better, damped_now, damped)
            active = eligible & ~(error <= options.newton_tol) & (scale >= 0.5**_MAX_HALVINGS)

    lowest = torch.full((n_systems,), float("nan"), dtype=x.dtype, device=x.device)
    highest = lowest.clone()
    if options.curvature_steps > 0 or not op_matches_x:
        if not op_matches_x:  # the last operator was built at a rejected candidate, or for part of the batch
            op, edges = operator_at(batch, x, True)
            forces, energy = op.forces.detach(), op.energy
        if options.curvature_steps > 0:
            lowest, highest, products = extreme_curvatures(
                op, system, n_systems, x.dtype, project=op.projector, steps=options.curvature_steps
            )
            hvps += products
    if options.newton_steps == 0:
        # No solve ran: estimate the distance from the force and the lowest curvature instead.
        estimate = torch.where(lowest > 0, force_norm / lowest.clamp_min(1e-300), torch.nan)
        error = torch.where(force_norm == 0, 0.0, estimate)
        exact = ~(error > options.newton_tol)  # NaN (not estimated) counts as not checked
    else:
        exact = error <= options.newton_tol
    # Negative curvature beyond round-off: the threshold also scales with the largest curvature, because the
    # products themselves carry a relative error of about sqrt(eps) (float32: 3e-4) of it.
    noise = torch.finfo(x.dtype).eps ** 0.5 * highest.abs()
    threshold = torch.maximum(torch.full_like(lowest, options.negative_curvature), torch.nan_to_num(noise))
    minimum = ~(lowest < -threshold)
    check_finite(forces, batch, step_offset, where="Newton polish")
    return PolishResult(
        positions=x,
        energy=energy,
        forces=forces,
        fmax=structure_fmax(forces, batch),
        edges=edges,
        fixed_point_error=error,
        exact=exact,
        newton_steps=accepted,
        lowest_curvature=lowest,
        highest_curvature=highest,
        minimum=minimum,
        hvps=hvps,
        force_evaluations=evaluations,
    )


def _same_members(built: torch.Tensor | None, wanted: torch.Tensor | None, n_built: int, n_wanted: int) -> bool:
    """Whether two working sets (member indices, None = the whole batch) hold the same structures."""
    if built is None or wanted is None:
        return built is None and wanted is None
    return n_built == n_wanted and bool(torch.equal(built, wanted))
