"""The extreme curvatures of the Hessian per structure, by a short batched Lanczos run (stationary-point check).

A relaxation that stops where the forces vanish has found a stationary point, not necessarily a minimum: the
hexagonal Si interstitial is a saddle of Stillinger-Weber (Hessian eigenvalues -9.2, -2.75, -2.75 eV/Å²) and FIRE
stops there. An implicit gradient taken at a saddle is not the gradient of a relaxed structure, so the relaxations
check the lowest curvature before differentiating. ``steps`` Lanczos iterations from a fixed start vector (with full
reorthogonalisation: the basis is ``steps`` node-level vectors) give Ritz values whose extremes converge to the
extreme eigenvalues of the projected Hessian from inside: the lowest Ritz value is an upper bound of λ_min, so a
negative one proves negative curvature, while a positive one can miss a negative mode the start vector barely
touches (its component is tiny only for an adversarially chosen start; ours is a fixed pseudo-random pattern).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gdeq_ext.gradients.batched import per_atom, structure_dot, structure_norm

__all__ = ["extreme_curvatures", "start_vector"]


def start_vector(system: torch.Tensor, n_systems: int, dtype: torch.dtype) -> torch.Tensor:
    """(n_atoms, 3) fixed pseudo-random pattern, a function of each atom's index *within its structure*, so a
    structure's check does not depend on what else is in the batch (data-parallel shards agree)."""
    counts = torch.bincount(system, minlength=n_systems)
    first = torch.nn.functional.pad(counts.cumsum(0), (1, 0))[:-1]
    local = torch.arange(system.numel(), device=system.device) - first[system]
    index = (3 * local.unsqueeze(1) + torch.arange(3, device=system.device)).to(torch.float64)
    # A low-discrepancy sequence mapped to [-1, 1): no structure with symmetry to make it vanish in exact arithmetic.
    return (2.0 * torch.frac(index * 0.6180339887498949 + 0.5 * torch.frac(index * 0.7548776662466927)) - 1.0).to(dtype)


def extreme_curvatures(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    system: torch.Tensor,
    n_systems: int,
    dtype: torch.dtype,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    steps: int = 20,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lowest and highest Ritz values of the (projected) Hessian per structure.

    Args:
        matvec: (n_atoms, 3) -> (n_atoms, 3), H·v for the whole batch (eV/Å²).
        system: (n_atoms,) int64; n_systems: number of structures; dtype: of the vectors.
        project: symmetric projector removing null modes (rigid translations/rotations), or None.
        steps: Lanczos iterations (batched H·v products), default 20; a structure with fewer degrees of
            freedom stops when its Krylov space is exhausted (its Ritz values are then exact).
        start: (n_atoms, 3) start vector (default :func:`start_vector`).

    Returns:
        (lowest (n_systems,), highest (n_systems,)) in eV/Å², NaN for structures without degrees of freedom, and
        the number of batched products used.
    """
    project = project if project is not None else (lambda v: v)
    v = project(start if start is not None else start_vector(system, n_systems, dtype))
    norm = structure_norm(v, system, n_systems)
    active = norm > 0
    v = torch.where(per_atom(active, system), v / per_atom(torch.where(active, norm, 1.0), system), 0.0)
    basis: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    lengths = torch.zeros(n_systems, dtype=torch.int64, device=system.device)
    products = 0
    for _ in range(steps):
        if not bool(active.any()):
            break
        basis.append(v)
        w = project(matvec(v))
        products += 1
        alpha = structure_dot(v, w, system, n_systems)
        # Full reorthogonalisation against the stored basis (twice is enough: "twice is enough", Kahan/Parlett).
        for _ in range(2):
            for q in basis:
                w = w - per_atom(structure_dot(q, w, system, n_systems), system) * q
        beta = structure_norm(w, system, n_systems)
        alphas.append(torch.where(active, alpha, 0.0))
        lengths += active
        scale = torch.where(active, alpha.abs(), 0.0).amax().clamp_min(torch.finfo(w.dtype).tiny)
        going = active & (beta > 1e3 * torch.finfo(w.dtype).eps * scale)
        betas.append(torch.where(going, beta, 0.0))
        v = torch.where(per_atom(going, system), w / per_atom(torch.where(going, beta, 1.0), system), 0.0)
        active = going
    lowest = torch.full((n_systems,), float("nan"), dtype=v.dtype, device=v.device)
    highest = lowest.clone()
    if not alphas:
        return lowest, highest, products
    diagonal = torch.stack(alphas, dim=1).cpu()  # (n_systems, m): a few dozen scalars per structure
    off = torch.stack(betas, dim=1).cpu()
    for s, m in enumerate(lengths.tolist()):
        if m == 0:
            continue
        tridiagonal = torch.diag(diagonal[s, :m])
        if m > 1:
            tridiagonal += torch.diag(off[s, : m - 1], 1) + torch.diag(off[s, : m - 1], -1)
        ritz = torch.linalg.eigvalsh(tridiagonal)
        lowest[s], highest[s] = ritz[0], ritz[-1]
    return lowest, highest, products
