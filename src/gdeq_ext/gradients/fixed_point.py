"""The DEQ-library default backward, for comparison: the fixed-point iteration u <- g + J_G^T u.

For the relaxation map G(X) = X + αF(X) the Jacobian at X* is J_G = I - αH, so the backward fixed point
u = g + (I - αH) u is αH u = g. Each iteration costs one Hessian-vector product and contracts the error by
max |1 - αλ| over the non-zero eigenvalues λ of H: slow for soft modes (small λ) and divergent when
α > 2 / λ_max. Conjugate gradients on H u = g converge in O(sqrt(λ_max / λ_min)) products instead.

To compare like with like, :func:`fixed_point_solve` returns x = αu, the solution of H x = g, and
measures the same residual ||g - H x|| = ||g - αH u|| against the same tolerance as the Krylov solvers.
"""

from __future__ import annotations

import torch

from gdeq_ext.gradients.batched import per_atom, structure_norm
from gdeq_ext.gradients.krylov import MatVec, Projector, SolveInfo, _setup, warn_unconverged

__all__ = ["fixed_point_solve"]


def fixed_point_solve(
    matvec: MatVec,
    b: torch.Tensor,
    system: torch.Tensor,
    n_systems: int,
    *,
    alpha: float | torch.Tensor = 0.01,
    rtol: float | torch.Tensor = 1e-6,
    atol: float | torch.Tensor = 0.0,
    max_iter: int | torch.Tensor | None = None,
    project: Projector | None = None,
    warn: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve A x = b through the iteration u_{k+1} = b + (I - αA) u_k (Richardson / DEQ backward).

    Args:
        matvec: (n_atoms, 3) -> (n_atoms, 3), applies A (the Hessian, eV/Å²) to the whole batch.
        b: (n_atoms, 3) right-hand side (the loss cotangent g = dL/dX*).
        alpha: Å²/eV, the step of the relaxation map X + αF(X); float or (n_systems,). Converges only
            for 0 < α < 2 / λ_max(A).
        rtol, atol, max_iter, project, warn: as in :func:`~gdeq_ext.gradients.krylov.conjugate_gradient`.

    Returns:
        x = αu (n_atoms, 3), the solution of A x = b, and :class:`SolveInfo` (``iterations`` counts the
        Hessian-vector products each structure used; the first iterate u_1 = b costs none).
    """
    project, b, rhs_norm, tolerance, cap = _setup(b, system, n_systems, rtol, atol, max_iter, project)
    alpha = torch.as_tensor(alpha, dtype=b.dtype, device=b.device).expand(n_systems)
    iterations = torch.zeros(n_systems, dtype=torch.int64, device=b.device)
    residual = rhs_norm.clone()
    done = residual <= tolerance
    u = torch.where(per_atom(done, system), 0.0, b)  # u_1 = b + (I - αA)·0
    matvecs = 0
    while True:
        active = ~done & (iterations < cap)
        if not bool(active.any()):
            break
        r = b - per_atom(alpha, system) * project(matvec(u))
        matvecs += 1
        iterations += active
        residual = torch.where(active, structure_norm(r, system, n_systems), residual)
        # Non-finite residuals (a divergent iteration) stop the structure, reported as unconverged.
        converged_now = active & (residual <= tolerance)
        diverged = active & ~torch.isfinite(residual)
        done = done | converged_now | diverged
        # At the cap, keep the u whose residual was just measured, so ``residual`` describes the result.
        u = torch.where(per_atom(active & ~done & (iterations < cap), system), u + r, u)
    info = SolveInfo(
        method="fixed_point",
        iterations=iterations,
        residual=residual,
        rhs_norm=rhs_norm,
        tolerance=tolerance,
        converged=residual <= tolerance,
        indefinite=torch.zeros_like(done),
        matvecs=matvecs,
    )
    if warn:
        warn_unconverged(info)
    return per_atom(alpha, system) * u, info
