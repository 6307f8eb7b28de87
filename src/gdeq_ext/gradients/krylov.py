"""Batched Krylov solvers for block-diagonal symmetric systems A x = b, one block per structure.

A is applied to the whole batch at once (one batched Hessian-vector product per iteration), but every
scalar of the recurrences (step lengths, Lanczos coefficients, Givens rotations) is per structure, so
each structure converges, stops and is reported on its own. Vectors are packed like positions:
(n_atoms, 3), grouped by ``system``.

A structure has converged when ||b_s - A x_s|| <= max(rtol_s ||b_s||, atol_s). The recurrences carry a residual
estimate (CG: ||r_k||; MINRES: phibar_k) that decides when to stop; before anything is reported, one more batched
product measures the *true* residual ||b - A x|| of the returned x, and ``converged`` is judged on that. (The
estimate can be wrong: on a singular block, MINRES's phibar drops to 0 when the Krylov space is exhausted although
b is not in the range of A; in finite precision both estimates drift from the truth on ill-conditioned blocks.)
Such blocks are flagged ``singular``; blocks where CG met non-positive curvature are flagged ``indefinite``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gdeq_ext.gradients.batched import per_atom, structure_dot, structure_norm

__all__ = [
    "LinearSolveWarning",
    "SolveInfo",
    "conjugate_gradient",
    "minres",
    "true_residual",
    "warn_unconverged",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]
Projector = Callable[[torch.Tensor], torch.Tensor]


class LinearSolveWarning(RuntimeWarning):
    """A batched linear solve left some structures above their tolerance (or met negative curvature)."""


@dataclass
class SolveInfo:
    """Per-structure diagnostics of a batched solve.

    Attributes:
        method: "cg", "minres", "fixed_point" or "cg+minres" (CG with a MINRES retry).
        iterations: (n_systems,) int64, operator applications that structure used.
        residual: (n_systems,) float, the true residual norm ||b - A x|| of the returned x (units of b),
            measured by one extra product after the recurrence stopped.
        rhs_norm: (n_systems,) float, ||b|| after projection.
        tolerance: (n_systems,) float, the residual each structure had to reach.
        converged: (n_systems,) bool.
        indefinite: (n_systems,) bool, CG met p·Ap <= 0 (A not positive definite there).
        matvecs: batched operator applications in total (= Hessian-vector products of the batch), the one that
            measures the true residual included.
        singular: (n_systems,) bool, the Krylov space was exhausted (MINRES: beta = 0; CG: p·Ap = 0) while the true
            residual stayed above tolerance: b is not in the range of A (A singular on that block).
        dropped, unusable: filled by the implicit backward's screening (``gradients.implicit_function``):
            (n_systems,) bool, structures whose solution was zeroed, and those whose solve was non-finite or
            diverged (zeroed under every policy); None for a bare solve.
    """

    method: str
    iterations: torch.Tensor
    residual: torch.Tensor
    rhs_norm: torch.Tensor
    tolerance: torch.Tensor
    converged: torch.Tensor
    indefinite: torch.Tensor
    matvecs: int
    singular: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    unusable: torch.Tensor | None = None

    def __post_init__(self):
        if self.singular is None:
            self.singular = torch.zeros_like(self.converged)

    @property
    def relative_residual(self) -> torch.Tensor:
        """(n_systems,) residual / ||b|| (0 where b = 0)."""
        return torch.where(self.rhs_norm > 0, self.residual / self.rhs_norm.clamp_min(1e-300), 0.0)


# restrict(members) -> (matvec, projector) of the structures ``members`` alone (conjugate_gradient's compaction).
Restrict = Callable[[torch.Tensor], tuple[MatVec, Projector]]


def _per_structure(value, n_systems: int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(n_systems).clone()


def _setup(b, system, n_systems, rtol, atol, max_iter, project):
    project = project if project is not None else (lambda v: v)
    b = project(b)
    rhs_norm = structure_norm(b, system, n_systems)
    tolerance = torch.maximum(_per_structure(rtol, n_systems, b) * rhs_norm, _per_structure(atol, n_systems, b))
    if max_iter is None:
        # Per structure (its own 3·n_atoms unknowns), so a structure's cap does not depend on what else is in the
        # batch: data-parallel shards and the single-process run then stop every solve at the same iteration.
        max_iter = 30 * torch.bincount(system, minlength=n_systems) + 10
    cap = torch.as_tensor(max_iter, dtype=torch.int64, device=b.device).expand(n_systems).clone()
    return project, b, rhs_norm, tolerance, cap


def true_residual(
    matvec: MatVec, project: Projector, b: torch.Tensor, x: torch.Tensor, system: torch.Tensor, n_systems: int
) -> torch.Tensor:
    """||b - P A x|| per structure (n_systems,): one batched product (``b`` already projected)."""
    return structure_norm(b - project(matvec(x)), system, n_systems)


def conjugate_gradient(
    matvec: MatVec,
    b: torch.Tensor,
    system: torch.Tensor,
    n_systems: int,
    *,
    rtol: float | torch.Tensor = 1e-6,
    atol: float | torch.Tensor = 0.0,
    max_iter: int | torch.Tensor | None = None,
    project: Projector | None = None,
    warn: bool = True,
    restrict: Restrict | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve A x = b for symmetric positive definite A (block-diagonal over structures) by CG.

    Args:
        matvec: (n_atoms, 3) -> (n_atoms, 3), applies A to the whole batch (one call = one HVP).
        b: (n_atoms, 3) right-hand side.
        system: (n_atoms,) int64; n_systems: number of structures.
        rtol, atol: float or (n_systems,) tolerances (default 1e-6 relative).
        max_iter: int or (n_systems,) iteration cap (default 30 * n_atoms + 10).
        project: symmetric projector applied to b and to every A·p (removes null modes), or None.
        warn: issue a :class:`LinearSolveWarning` naming unconverged structures.
        restrict: ``restrict(members) -> (matvec, project)`` of the structures ``members`` ((k,) int64 indices
            into the batch, increasing) alone, or None. Given, the products skip finished structures: whenever at
            most 3/4 of the structures being multiplied still iterate, the next products are those of the
            unfinished ones only (A is block-diagonal, so each structure's iterates are its own; a finished
            structure's direction is 0, so nothing else changes). The final true residual uses ``matvec``.

    Returns:
        x (n_atoms, 3) and :class:`SolveInfo`. A structure where p·Ap <= 0 stops at once and is flagged
        ``indefinite`` (retry it with :func:`minres`).
    """
    project, b, rhs_norm, tolerance, cap = _setup(b, system, n_systems, rtol, atol, max_iter, project)
    x = torch.zeros_like(b)
    r = b.clone()
    rs = rhs_norm.square()
    done = rhs_norm <= tolerance
    indefinite = torch.zeros_like(done)
    exhausted = torch.zeros_like(done)
    iterations = torch.zeros(n_systems, dtype=torch.int64, device=b.device)
    p = torch.where(per_atom(done, system), 0.0, r)
    matvecs = 0
    n_work, atoms, w_matvec, w_project = n_systems, None, matvec, project  # the structures multiplied: all
    while True:
        active = ~done & (iterations < cap)
        n_active = int(active.sum())
        if n_active == 0:
            break
        if restrict is not None and n_active < n_work and 4 * n_active <= 3 * n_work:
            members = active.nonzero().flatten()
            w_matvec, w_project = restrict(members)
            atoms = active[system].nonzero().flatten()
            n_work = n_active
        if atoms is None:
            ap = project(matvec(p))
        else:  # the others' p is 0 and so is their A p
            ap = torch.zeros_like(p)
            ap[atoms] = w_project(w_matvec(p[atoms]))
        matvecs += 1
        iterations += active
        p_ap = structure_dot(p, ap, system, n_systems)
        negative = active & ~(p_ap > 0)  # also catches NaN curvature
        exhausted |= active & (p_ap == 0)  # A p = 0 on this block: a null direction, not negative curvature
        indefinite |= negative & ~(p_ap == 0)
        step = active & ~negative
        alpha = torch.where(step, rs / torch.where(step, p_ap, 1.0), 0.0)
        x = x + per_atom(alpha, system) * p
        r = r - per_atom(alpha, system) * ap
        rs_new = torch.where(step, structure_dot(r, r, system, n_systems), rs)
        done = done | negative | (step & (rs_new.sqrt() <= tolerance))
        beta = torch.where(step, rs_new / torch.where(step, rs, 1.0), 0.0)
        rs = rs_new
        p = torch.where(per_atom(step & ~done, system), r + per_atom(beta, system) * p, 0.0)
    w_matvec = w_project = None  # a sub-batch operator's graph goes before the whole batch's is used again
    residual = true_residual(matvec, project, b, x, system, n_systems)
    matvecs += 1
    # NaN residuals compare False: a non-finite solve is never "converged".
    converged = (residual <= tolerance) & ~indefinite
    info = SolveInfo(
        method="cg",
        iterations=iterations,
        residual=residual,
        rhs_norm=rhs_norm,
        tolerance=tolerance,
        converged=converged,
        indefinite=indefinite,
        matvecs=matvecs,
        singular=exhausted & ~converged,
    )
    if warn:
        warn_unconverged(info)
    return x, info


def minres(
    matvec: MatVec,
    b: torch.Tensor,
    system: torch.Tensor,
    n_systems: int,
    *,
    rtol: float | torch.Tensor = 1e-6,
    atol: float | torch.Tensor = 0.0,
    max_iter: int | torch.Tensor | None = None,
    project: Projector | None = None,
    warn: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve A x = b for symmetric, possibly indefinite A by MINRES (Paige & Saunders 1975).

    Same arguments and return as :func:`conjugate_gradient`; the recurrence follows scipy's ``minres``
    (no preconditioner), with every scalar a (n_systems,) tensor. Suitable at a saddle point, where the
    Hessian has negative eigenvalues and CG breaks down.
    """
    project, b, rhs_norm, tolerance, cap = _setup(b, system, n_systems, rtol, atol, max_iter, project)
    tiny = torch.finfo(b.dtype).eps
    zeros = torch.zeros_like(rhs_norm)
    x = torch.zeros_like(b)
    iterations = torch.zeros(n_systems, dtype=torch.int64, device=b.device)
    done = rhs_norm <= tolerance
    r1 = b
    r2 = b
    y = b
    beta, oldb = rhs_norm.clone(), zeros.clone()
    dbar, epsln, phibar = zeros.clone(), zeros.clone(), rhs_norm.clone()
    cs, sn = -torch.ones_like(rhs_norm), zeros.clone()
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    exhausted = torch.zeros_like(done)
    matvecs = 0
    k = 0
    while True:
        active = ~done & (iterations < cap)
        if not bool(active.any()):
            break
        mask = per_atom(active, system)
        safe_beta = torch.where(active, beta, 1.0)
        v = torch.where(mask, y / per_atom(safe_beta, system), 0.0)
        y = project(matvec(v))
        matvecs += 1
        iterations += active
        if k > 0:
            y = y - per_atom(torch.where(active, beta / torch.where(active, oldb, 1.0), 0.0), system) * r1
        alfa = structure_dot(v, y, system, n_systems)
        y = y - per_atom(torch.where(active, alfa / safe_beta, 0.0), system) * r2
        r1, r2 = r2, y
        oldb = beta
        beta = structure_norm(r2, system, n_systems)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = torch.where(active, sn * phibar, phibar)
        w1, w2 = w2, w
        w = torch.where(
            mask,
            (v - per_atom(oldeps, system) * w1 - per_atom(delta, system) * w2) / per_atom(gamma, system),
            0.0,
        )
        x = torch.where(mask, x + per_atom(phi, system) * w, x)
        # beta == 0: the Krylov space is exhausted. For a nonsingular block that means solved exactly; for a
        # singular one (b not in the range of A, e.g. A = 0) phibar is 0 too although x is not a solution: only
        # the true residual below tells the two apart.
        exhausted |= active & (beta == 0)
        done = done | (active & ((phibar <= tolerance) | (beta == 0)))
        k += 1
    residual = true_residual(matvec, project, b, x, system, n_systems)
    matvecs += 1
    converged = residual <= tolerance
    info = SolveInfo(
        method="minres",
        iterations=iterations,
        residual=residual,
        rhs_norm=rhs_norm,
        tolerance=tolerance,
        converged=converged,
        indefinite=torch.zeros_like(done),
        matvecs=matvecs,
        singular=exhausted & ~converged,
    )
    if warn:
        warn_unconverged(info)
    return x, info


def warn_unconverged(info: SolveInfo, stacklevel: int = 3) -> None:
    """Warn, naming each structure whose solve did not reach tolerance and by how much it missed."""
    failed = (~info.converged).nonzero().flatten().tolist()
    if not failed:
        return
    details = []
    for s in failed:
        text = (
            f"structure {s}: residual {float(info.residual[s]):.3g} > "
            f"tolerance {float(info.tolerance[s]):.3g} "
            f"(relative {float(info.relative_residual[s]):.3g}) after {int(info.iterations[s])} iterations"
        )
        if bool(info.indefinite[s]):
            text += ", indefinite: non-positive curvature (the Hessian is not positive definite: a saddle?)"
        if bool(info.singular[s]):
            text += ", singular: the Krylov space was exhausted with b outside the range of the Hessian"
        if not bool(torch.isfinite(info.residual[s])):
            text += ", non-finite"
        details.append(text)
    warnings.warn(
        f"{info.method} did not converge for {len(failed)} of {info.converged.numel()} structures: "
        + "; ".join(details),
        LinearSolveWarning,
        stacklevel=stacklevel,
    )
