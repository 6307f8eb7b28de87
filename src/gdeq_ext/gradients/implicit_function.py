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
cotangent ``handoff * g`` (docs/method.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.fixed_point import fixed_point_solve
from gdeq_ext.gradients.hessian import HessianOperator
from gdeq_ext.gradients.krylov import Restrict, SolveInfo, conjugate_gradient, minres, warn_unconverged

__all__ = [
    "ON_INVALID",
    "SOLVERS",
    "InvalidGradientError",
    "ImplicitContext",
    "ImplicitSolveOptions",
    "SolveRecord",
    "attach_implicit",
    "implicit_vjp",
    "screen_solution",
    "solve_hessian",
    "compaction_for",
]

SOLVERS = ("cg", "minres", "fixed_point")
# What happens to a structure whose gradient is not trustworthy (unconverged relaxation, saddle, failed solve):
# "raise" an InvalidGradientError, "skip" it (its gradient contribution is zeroed and counted), or "warn" and use it.
# Non-finite or diverged solves are dropped under every policy.
ON_INVALID = ("raise", "skip", "warn")


class InvalidGradientError(RuntimeError):
    """No trustworthy gradient for some structures (the message names each one and why) and ``on_invalid="raise"``."""


def check_positive(name: str, value, *, allow_zero: bool = False, integer: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``); NaN fails."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = (number >= 0 if allow_zero else number > 0) and number != float("inf")
    if not ok or (integer and number != int(number)):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite {kind} {bound}, got {value!r}")


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
        on_invalid: "raise" | "skip" | "warn" (default "warn"): what a structure whose solve failed or met negative
            curvature does to the gradient (see :func:`screen_solution`).
        compact: CG multiplies only the structures still iterating (default True; ``conjugate_gradient``'s
            ``restrict``): structures need 10-45 products each on silicon-defect cells and a batched solve runs until
            the slowest converges. Meanwhile the whole batch's graph is freed (one graph held at a time) and rebuilt
            once for the final residual and parameter product. Each structure's solution is the same to round-off.
    """

    solver: str = "cg"
    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int | None = None
    damping: float = 0.0
    project_rotations: bool = True
    fixed_point_alpha: float = 0.01
    warn: bool = True
    on_invalid: str = "warn"
    compact: bool = True

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {self.on_invalid!r}")
        check_positive("damping", self.damping, allow_zero=True)
        check_positive("fixed_point_alpha", self.fixed_point_alpha)
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                if not bool(((value >= 0) & torch.isfinite(value)).all()):
                    raise ValueError(f"{name} must be finite and >= 0 for every structure, got {value.tolist()}")
            else:
                check_positive(name, value, allow_zero=True)
        if isinstance(self.rtol, (int, float)) and isinstance(self.atol, (int, float)) and self.rtol == self.atol == 0:
            raise ValueError("rtol and atol are both 0: no solve can reach that tolerance; give one of them > 0")
        if self.max_iter is not None and not isinstance(self.max_iter, torch.Tensor):
            check_positive("max_iter", self.max_iter, integer=True)


@dataclass
class SolveRecord:
    """Diagnostics written by the backward pass: the latest :class:`SolveInfo`, running totals, and ``dropped``
    ((n_systems,) bool: structures whose gradient contribution the latest backward zeroed, or None)."""

    info: SolveInfo | None = None
    calls: int = 0
    hvps: int = 0
    dropped: torch.Tensor | None = None


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
        exclude: (n_systems,) bool, structures found invalid in the forward pass whose gradient contribution is
            skipped (zeroed), or None.
    """

    potential: object
    batch: Batch
    edges: object
    force_fn: Callable
    parameters: Sequence[torch.Tensor]
    options: ImplicitSolveOptions = field(default_factory=ImplicitSolveOptions)
    handoff: float = 0.0
    record: SolveRecord = field(default_factory=SolveRecord)
    exclude: torch.Tensor | None = None


def solve_hessian(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor,
    batch: Batch,
    projector: Callable[[torch.Tensor], torch.Tensor],
    options: ImplicitSolveOptions,
    restrict: Restrict | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve (H + λI) u = g per structure with the solver named in ``options``; returns u and diagnostics.

    ``restrict``: the operator of a subset of the structures (see :func:`~gdeq_ext.gradients.krylov.
    conjugate_gradient`), used by CG to skip finished structures; None multiplies the whole batch every time."""
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
        u, info = conjugate_gradient(matvec, g, warn=False, restrict=restrict, **common)
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
                singular=torch.where(pick, info_minres.singular, info.singular),
            )
    if options.warn:
        warn_unconverged(info, stacklevel=4)
    return u, info


def compaction_for(operator: HessianOperator, options: ImplicitSolveOptions) -> Restrict | None:
    """The ``restrict`` of a compacting solve on ``operator`` (None when ``options.compact`` is off): the sub-batch's
    operator and projector, with the whole batch's graph released meanwhile (rebuilt when next used)."""
    if not options.compact:
        return None

    def restrict(members: torch.Tensor):
        operator.release()
        sub = operator.restrict(members)
        return sub, sub.projector

    return restrict


def implicit_vjp(
    potential,
    batch: Batch,
    x_star: torch.Tensor,
    grad: torch.Tensor,
    parameters: Sequence[torch.Tensor],
    edges=None,
    force_fn: Callable | None = None,
    options: ImplicitSolveOptions | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor | None, ...], SolveInfo, torch.Tensor]:
    """dL/dθ = uᵀ ∂F/∂θ at X* with H u = g, never using a solve that failed unless the policy says so.

    Args:
        potential: the potential; batch: the structures (cell, pbc, numbers, system).
        x_star: (n_atoms, 3) Å, the relaxed positions (treated as a constant).
        grad: (n_atoms, 3) g = dL/dX*, units of L per Å.
        parameters: tensors θ (each receives a gradient of its own shape, or None if F does not use it).
        edges: neighbor list valid at X*, or None.
        force_fn: defaults to :func:`gdeq_ext.potentials.base.energy_forces` (generic autograd path).
        options: :class:`ImplicitSolveOptions` (``on_invalid`` decides what a failed solve does).
        exclude: (n_systems,) bool, structures whose contribution is dropped before solving (their g is zeroed).

    Returns:
        (gradients per parameter, :class:`SolveInfo`, u (n_atoms, 3) in Å²/eV per unit of g). ``info.dropped``
        says which structures' u was zeroed (excluded, or their solve failed: see :func:`screen_solution`).

    Raises:
        InvalidGradientError: ``on_invalid="raise"`` and some structure's solve failed or met negative curvature.
    """
    if force_fn is None:
        from gdeq_ext.potentials.base import energy_forces as force_fn
    options = options or ImplicitSolveOptions()
    g = grad.detach()
    if exclude is not None and bool(exclude.any()):
        g = torch.where(exclude[batch.system].unsqueeze(1), 0.0, g)
    operator = HessianOperator(
        potential,
        batch,
        x_star,
        edges,
        force_fn,
        project_rotations=options.project_rotations,
        damping=options.damping,
    )
    u, info = solve_hessian(operator, g, batch, operator.projector, options, restrict=compaction_for(operator, options))
    u, info = screen_solution(u, info, batch, options, exclude)
    wanted = [p for p in parameters if p.requires_grad]
    with torch.enable_grad():
        grads_wanted = (
            torch.autograd.grad(operator.forces, wanted, u, allow_unused=True)
            if wanted and operator.forces.requires_grad
            else [None] * len(wanted)
        )
    by_id = {id(p): g for p, g in zip(wanted, grads_wanted, strict=True)}
    return tuple(by_id.get(id(p)) for p in parameters), info, u


def screen_solution(
    u: torch.Tensor,
    info: SolveInfo,
    batch: Batch,
    options: ImplicitSolveOptions,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Apply the ``on_invalid`` policy to a solve: zero u where it must not be used; fill ``info.dropped``.

    A structure's solve is *unusable* when u or its residual is non-finite or the true residual is not below ||g||
    (a diverged iteration, e.g. the fixed-point backward at a saddle): it is zeroed under every policy, because a
    gradient built from it is noise. A solve that is finite but above tolerance, or met negative curvature (the
    structure is not at a minimum), is *failed*: "raise" raises :class:`InvalidGradientError`, "skip" zeroes it,
    "warn" keeps it (the LinearSolveWarning of ``options.warn`` names it).
    """
    system = batch.system
    finite_u = torch.isfinite(u).all(dim=1).to(torch.int64)
    finite = torch.ones(batch.n_systems, dtype=torch.int64, device=u.device)
    finite = finite.scatter_reduce_(0, system, finite_u, "amin", include_self=True).bool()
    posed = info.rhs_norm > 0
    unusable = posed & (~finite | ~torch.isfinite(info.residual) | ~(info.residual < info.rhs_norm))
    failed = posed & ~unusable & (~info.converged | info.indefinite)
    if exclude is not None:
        unusable, failed = unusable & ~exclude, failed & ~exclude
    if options.on_invalid == "raise" and bool((unusable | failed).any()):
        details = "; ".join(
            f"structure {s}: " + _solve_problem(info, s) for s in (unusable | failed).nonzero().flatten().tolist()
        )
        raise InvalidGradientError(f"implicit backward ({info.method}) failed: {details}")
    drop = unusable | (failed if options.on_invalid == "skip" else torch.zeros_like(failed))
    if exclude is not None:
        drop = drop | exclude
    if bool(drop.any()):
        u = torch.where(drop[system].unsqueeze(1), 0.0, u)
    info.dropped = drop
    info.unusable = unusable
    return u, info


def _solve_problem(info: SolveInfo, s: int) -> str:
    problems = []
    if not bool(torch.isfinite(info.residual[s])):
        problems.append("non-finite solution")
    elif not bool(info.residual[s] < info.rhs_norm[s]):
        problems.append(f"diverged (residual {float(info.residual[s]):.3g} >= |g| {float(info.rhs_norm[s]):.3g})")
    elif not bool(info.converged[s]):
        problems.append(
            f"residual {float(info.residual[s]):.3g} > tolerance {float(info.tolerance[s]):.3g} "
            f"after {int(info.iterations[s])} iterations"
        )
    if bool(info.indefinite[s]):
        problems.append("negative curvature (not a minimum: a saddle?)")
    if bool(info.singular[s]):
        problems.append("singular Hessian (g outside its range)")
    return ", ".join(problems) or "failed"


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
        batch, exclude = context.batch, context.exclude
        needs = ctx.needs_input_grad[3:]
        grad_parameters: tuple = (None,) * len(needs)
        dropped = exclude
        if any(needs):
            wanted = [p for p, n in zip(context.parameters, needs, strict=True) if n]
            grads, info, _ = implicit_vjp(
                context.potential,
                batch,
                x_star,
                grad,
                wanted,
                edges=context.edges,
                force_fn=context.force_fn,
                options=context.options,
                exclude=exclude,
            )
            by_id = {id(p): g for p, g in zip(wanted, grads, strict=True)}
            grad_parameters = tuple(
                by_id.get(id(p)) if n else None for p, n in zip(context.parameters, needs, strict=True)
            )
            context.record.info = info
            context.record.calls += 1
            context.record.hvps += info.matvecs
            dropped = info.dropped
        context.record.dropped = dropped
        grad_anchor = None
        if ctx.has_anchor and ctx.needs_input_grad[2]:
            grad_anchor = context.handoff * grad
            if dropped is not None and bool(dropped.any()):
                # A skipped structure contributes nothing, through the window either.
                grad_anchor = torch.where(dropped[batch.system].unsqueeze(1), 0.0, grad_anchor)
        return (None, None, grad_anchor, *grad_parameters)


def attach_implicit(context: ImplicitContext, x_star: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """X* (n_atoms, 3) as a tensor whose backward is the implicit gradient (plus β g into ``anchor``).

    The value is exactly ``x_star``. Its gradient flows to ``context.parameters`` (implicit term) and,
    when ``anchor`` is given and ``context.handoff != 0``, ``handoff * g`` flows into ``anchor``.
    """
    if anchor is not None and (context.handoff == 0 or not anchor.requires_grad):
        anchor = None
    return _ImplicitGradient.apply(context, x_star.detach(), anchor, *context.parameters)
