"""The implicit backward at a relaxed structure X*, as an autograd Function.

X*(θ) is defined by F_θ(X*) = 0, so dX*/dθ = H⁻¹ ∂F/∂θ (H = d²E/dX² = -∂F/∂X at X*), and for a loss
cotangent g = dL/dX* (n_atoms, 3):

    H u = g   (batched Krylov solve, rigid modes projected out),    dL/dθ = uᵀ ∂F_θ/∂θ |_{X*}.

Forward stores only X* (n_atoms, 3), the neighbor list at X* and the parameters: memory does not depend
on how many steps the relaxation took. Backward rebuilds F(X*) once with a graph (through the pluggable
``force_fn``), then every Hessian-vector product is one vector-Jacobian product of that same F with
respect to X, and the parameter term is one more with respect to θ. With the generic path these are
double-backward passes through the potential; a fused force op (issue #5) whose backward returns
(-H w, (∂F/∂θ)ᵀ w) plugs in unchanged through ``force_fn``.

An optional ``anchor`` (the last window state X_K of the hybrid relaxation) receives the straight-through
cotangent ``handoff * g`` (METHOD.md §1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.fixed_point import fixed_point_solve
from gdeq_ext.gradients.krylov import SolveInfo, conjugate_gradient, minres, warn_unconverged
from gdeq_ext.gradients.projection import RigidModeProjector

__all__ = [
    "SOLVERS",
    "ImplicitContext",
    "ImplicitSolveOptions",
    "SolveRecord",
    "attach_implicit",
    "implicit_vjp",
    "solve_hessian",
]

SOLVERS = ("cg", "minres", "fixed_point")


@dataclass(frozen=True)
class ImplicitSolveOptions:
    """How the implicit backward solves H u = g.

    Attributes:
        solver: "cg" (default; structures where CG meets non-positive curvature are retried with MINRES),
            "minres" (symmetric indefinite H, e.g. at a saddle) or "fixed_point" (the DEQ-style
            iteration u <- g + (I - αH) u, for comparison).
        rtol: relative tolerance on ||g - H u|| per structure (default 1e-6).
        atol: absolute tolerance in the units of g (default 0).
        max_iter: Hessian-vector products per structure at most (default 30 * n_atoms + 10).
        (rtol, atol and max_iter may also be (n_systems,) tensors: one value per structure.)
        damping: λ in eV/Å², solves (H + λI) u = g for near-singular H (default 0).
        project_rotations: also project rigid rotations of structures with no periodic axis (default True;
            translations are always projected).
        fixed_point_alpha: α in Å²/eV for solver="fixed_point" (default 0.01).
        warn: warn (LinearSolveWarning) naming structures that did not reach tolerance (default True).
    """

    solver: str = "cg"
    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int | None = None
    damping: float = 0.0
    project_rotations: bool = True
    fixed_point_alpha: float = 0.01
    warn: bool = True

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not self.damping >= 0:
            raise ValueError(f"damping must be non-negative, got {self.damping}")


@dataclass
class SolveRecord:
    """Diagnostics written by the backward pass: the latest :class:`SolveInfo` and running totals."""

    info: SolveInfo | None = None
    calls: int = 0
    hvps: int = 0


@dataclass
class ImplicitContext:
    """Everything the backward needs besides X* and θ (kept on the autograd node, not copied).

    Attributes:
        potential: the potential (any module mapping a Batch to energies).
        batch: the batch (its positions are ignored; X* is passed separately).
        edges: neighbor list valid at X* (or None for potentials that build their own).
        force_fn: (potential, batch, edges, create_graph) -> (energies (n_systems,), forces (n_atoms, 3)).
        parameters: the tensors θ that receive implicit gradients.
        options: :class:`ImplicitSolveOptions`.
        handoff: β, scale of the straight-through cotangent passed to the anchor.
        record: where the backward writes its diagnostics.
    """

    potential: object
    batch: Batch
    edges: object
    force_fn: Callable
    parameters: Sequence[torch.Tensor]
    options: ImplicitSolveOptions = field(default_factory=ImplicitSolveOptions)
    handoff: float = 0.0
    record: SolveRecord = field(default_factory=SolveRecord)


def solve_hessian(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor,
    batch: Batch,
    projector: Callable[[torch.Tensor], torch.Tensor],
    options: ImplicitSolveOptions,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve (H + λI) u = g per structure with the solver named in ``options``; returns u and diagnostics."""
    common = dict(
        system=batch.system,
        n_systems=batch.n_systems,
        rtol=options.rtol,
        atol=options.atol,
        max_iter=options.max_iter,
        project=projector,
    )
    if options.solver == "minres":
        u, info = minres(matvec, g, warn=False, **common)
    elif options.solver == "fixed_point":
        u, info = fixed_point_solve(matvec, g, alpha=options.fixed_point_alpha, warn=False, **common)
    else:
        u, info = conjugate_gradient(matvec, g, warn=False, **common)
        if bool(info.indefinite.any()):
            # Restart only the structures where CG met negative curvature; the others have b = 0 there
            # and cost nothing beyond the shared batched products.
            retry = info.indefinite[batch.system].unsqueeze(1)
            u_minres, info_minres = minres(matvec, torch.where(retry, g, 0.0), warn=False, **common)
            u = torch.where(retry, u_minres, u)
            pick = info.indefinite
            info = SolveInfo(
                method="cg+minres",
                iterations=info.iterations + torch.where(pick, info_minres.iterations, 0),
                residual=torch.where(pick, info_minres.residual, info.residual),
                rhs_norm=info.rhs_norm,
                tolerance=info.tolerance,
                converged=torch.where(pick, info_minres.converged, info.converged),
                indefinite=info.indefinite,
                matvecs=info.matvecs + info_minres.matvecs,
            )
    if options.warn:
        warn_unconverged(info, stacklevel=4)
    return u, info


def implicit_vjp(
    potential,
    batch: Batch,
    x_star: torch.Tensor,
    grad: torch.Tensor,
    parameters: Sequence[torch.Tensor],
    edges=None,
    force_fn: Callable | None = None,
    options: ImplicitSolveOptions | None = None,
) -> tuple[tuple[torch.Tensor | None, ...], SolveInfo, torch.Tensor]:
    """dL/dθ = uᵀ ∂F/∂θ at X* with H u = g.

    Args:
        potential: the potential; batch: the structures (cell, pbc, numbers, system).
        x_star: (n_atoms, 3) Å, the relaxed positions (treated as a constant).
        grad: (n_atoms, 3) g = dL/dX*, units of L per Å.
        parameters: tensors θ (each receives a gradient of its own shape, or None if F does not use it).
        edges: neighbor list valid at X*, or None.
        force_fn: defaults to :func:`gdeq_ext.potentials.base.energy_forces` (generic autograd path).
        options: :class:`ImplicitSolveOptions`.

    Returns:
        (gradients per parameter, :class:`SolveInfo`, u (n_atoms, 3) in Å²/eV per unit of g).
    """
    if force_fn is None:
        from gdeq_ext.potentials.base import energy_forces as force_fn
    options = options or ImplicitSolveOptions()
    with torch.enable_grad():
        x = x_star.detach().requires_grad_(True)
        _, forces = force_fn(potential, batch.with_positions(x), edges, create_graph=True)
        projector = RigidModeProjector(
            x_star.detach(), batch.system, batch.n_systems, batch.pbc, rotations=options.project_rotations
        )
        damping = options.damping

        def hessian_product(v: torch.Tensor) -> torch.Tensor:
            (jvp,) = torch.autograd.grad(forces, x, v, retain_graph=True, allow_unused=True)
            hv = torch.zeros_like(v) if jvp is None else -jvp
            return hv + damping * v if damping else hv

        u, info = solve_hessian(hessian_product, grad.detach(), batch, projector, options)
        wanted = [p for p in parameters if p.requires_grad]
        grads_wanted = (
            torch.autograd.grad(forces, wanted, u, allow_unused=True)
            if wanted and forces.requires_grad
            else [None] * len(wanted)
        )
    by_id = {id(p): g for p, g in zip(wanted, grads_wanted, strict=True)}
    return tuple(by_id.get(id(p)) for p in parameters), info, u


class _ImplicitGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context: ImplicitContext, x_star: torch.Tensor, anchor, *parameters):
        ctx.context = context
        ctx.has_anchor = anchor is not None
        # Parameters are saved only so that autograd's version counter catches an optimizer step taken
        # between forward and backward (the gradient would otherwise be evaluated at the new θ).
        ctx.save_for_backward(x_star, *parameters)
        return x_star.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        context: ImplicitContext = ctx.context
        x_star, *_ = ctx.saved_tensors
        grad_anchor = None
        if ctx.has_anchor and ctx.needs_input_grad[2]:
            grad_anchor = context.handoff * grad
        needs = ctx.needs_input_grad[3:]
        grad_parameters: tuple = (None,) * len(needs)
        if any(needs):
            wanted = [p for p, n in zip(context.parameters, needs, strict=True) if n]
            grads, info, _ = implicit_vjp(
                context.potential,
                context.batch,
                x_star,
                grad,
                wanted,
                edges=context.edges,
                force_fn=context.force_fn,
                options=context.options,
            )
            by_id = {id(p): g for p, g in zip(wanted, grads, strict=True)}
            grad_parameters = tuple(
                by_id.get(id(p)) if n else None for p, n in zip(context.parameters, needs, strict=True)
            )
            context.record.info = info
            context.record.calls += 1
            context.record.hvps += info.matvecs
        return (None, None, grad_anchor, *grad_parameters)


def attach_implicit(context: ImplicitContext, x_star: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """X* (n_atoms, 3) as a tensor whose backward is the implicit gradient (plus β g into ``anchor``).

    The value is exactly ``x_star``. Its gradient flows to ``context.parameters`` (implicit term) and,
    when ``anchor`` is given and ``context.handoff != 0``, ``handoff * g`` flows into ``anchor``.
    """
    if anchor is not None and (context.handoff == 0 or not anchor.requires_grad):
        anchor = None
    return _ImplicitGradient.apply(context, x_star.detach(), anchor, *context.parameters)
