"""ImplicitRelax: FIRE to X* without a graph, then the implicit (Hessian-solve) gradient at X*."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.implicit_function import ImplicitContext, ImplicitSolveOptions, SolveRecord, attach_implicit
from gdeq_ext.potentials.base import PotentialLike
from gdeq_ext.relax.fire import FIREParameters, FIREResult, fire
from gdeq_ext.relax.forces import ForceFn, default_force_fn, make_verlet, trainable_parameters
from gdeq_ext.relax.options import FIREOptions, as_fire_options, route_fields, solve_options
from gdeq_ext.relax.polish import PolishOptions, PolishResult, polish
from gdeq_ext.relax.result import RelaxResult
from gdeq_ext.relax.validity import Validity, apply_policy

__all__ = ["ImplicitRelax"]


class ImplicitRelax:
    """Relax with batched FIRE (no graph) and differentiate the relaxed structure implicitly.

    Backward solves H u = g per structure (g = dL/dX*, H the Hessian at X*, rigid modes projected out)
    and returns dL/dθ = uᵀ ∂F_θ/∂θ. Memory is O(1) in the relaxation length: only X*, the neighbor list
    at X* and θ are kept. The gradient is exact at a force-free X*; at the point where FIRE stops its error is
    about ||H⁻¹F|| ~ fmax / λ_min(H), which on a soft potential can flip its sign. So before differentiating, the
    end point is polished by Newton–Krylov steps to an estimated distance from the exact fixed point below
    ``polish.newton_tol`` (1e-5 Å), and a Lanczos check of the lowest curvature tells minima from saddles
    (:mod:`gdeq_ext.relax.polish`). Each structure's flags and error estimate are in ``RelaxResult.validity``;
    ``on_invalid`` decides what an invalid structure does to the gradient (:mod:`gdeq_ext.relax.validity`).

    Args:
        potential: any module mapping a Batch to energies (n_systems,) eV.
        fire: :class:`~gdeq_ext.relax.options.FIREOptions` (default: fmax 0.01 eV/Å, max_steps 1000, skin 0.5 Å,
            ASE's FIRE parameters; a :class:`FIREParameters` is accepted as ``FIREOptions(parameters=...)``).
            Structures that hit ``max_steps`` are reported (``converged`` False and a RelaxationWarning naming
            them), never silently accepted.
        solve: :class:`~gdeq_ext.gradients.implicit_function.ImplicitSolveOptions` (default: "cg" with a MINRES
            retry where H is not positive definite, rtol 1e-6, atol 0, max_iter 30 n_atoms + 10, damping 0,
            rigid rotations of non-periodic structures projected out).
        polish: :class:`~gdeq_ext.relax.polish.PolishOptions` (default: Newton polish to 1e-5 Å and a 20-step
            lowest-curvature check); ``PolishOptions(newton_steps=0, curvature_steps=0)`` turns both off.
        force_fn: the force evaluation (see relax/forces.py).
        parameters: tensors θ that get implicit gradients (default: the potential's parameters that
            require grad).
        warn: warn about unconverged relaxations, invalid structures and linear solves (default True).
        on_invalid: "raise" | "skip" | "warn" (default "warn"): what a structure that did not converge, is not at an
            exact fixed point, is a saddle, or whose backward solve failed does to the gradient.
        **fields: any field of ``fire`` (fmax, max_steps, skin) or ``solve`` (solver, rtol, atol, max_iter,
            damping, project_rotations, fixed_point_alpha) by name: ``ImplicitRelax(model, fmax=1e-3, rtol=1e-8)``.
    """

    def __init__(
        self,
        potential: PotentialLike,
        *,
        fire: FIREOptions | FIREParameters | None = None,
        solve: ImplicitSolveOptions | None = None,
        polish: PolishOptions | None = None,
        force_fn: ForceFn | None = None,
        parameters: Sequence[torch.Tensor] | None = None,
        warn: bool = True,
        on_invalid: str = "warn",
        **fields,
    ):
        options = route_fields(
            type(self).__name__,
            {"fire": as_fire_options(fire), "solve": solve_options(solve, warn, on_invalid)},
            fields,
        )
        self.potential = potential
        self.fire_options: FIREOptions = options["fire"]
        self.options: ImplicitSolveOptions = options["solve"]
        self.polish = polish or PolishOptions()
        self.on_invalid = on_invalid
        self.force_fn = default_force_fn(force_fn)
        self.parameters = parameters
        self.warn = warn

    # The FIRE settings by name (read-only views of ``fire_options``).
    fmax = property(lambda self: self.fire_options.fmax)
    max_steps = property(lambda self: self.fire_options.max_steps)
    skin = property(lambda self: self.fire_options.skin)
    fire_parameters = property(lambda self: self.fire_options.parameters)

    def _solve(self, batch: Batch, verlet, step_offset: int = 0) -> tuple[FIREResult, PolishResult]:
        """FIRE to fmax, then the Newton polish and curvature check of the converged structures."""
        solved = fire(
            self.potential,
            batch,
            fmax=self.fmax,
            max_steps=self.max_steps,
            parameters=self.fire_parameters,
            verlet=verlet,
            force_fn=self.force_fn,
            step_offset=step_offset,
            warn=self.warn,
            compact=self.fire_options.compact,
        )
        if self.polish.newton_steps == 0 and self.polish.curvature_steps == 0:
            return solved, PolishResult.unpolished(solved)
        polished = polish(
            self.potential,
            batch,
            solved.positions,
            solved.converged,
            options=self.polish,
            solve=self.options,
            force_fn=self.force_fn,
            verlet=verlet,
            step_offset=solved.steps + step_offset,
            compact=self.fire_options.compact,
        )
        return solved, polished

    def _attach(
        self, batch: Batch, solved: FIREResult, polished: PolishResult, anchor, handoff: float
    ) -> tuple[torch.Tensor, SolveRecord, Validity]:
        validity = Validity(
            converged=solved.converged,
            separated=solved.separated,
            exact=polished.exact,
            minimum=polished.minimum,
            fixed_point_error=polished.fixed_point_error,
            lowest_curvature=polished.lowest_curvature,
            newton_steps=polished.newton_steps,
            hvps=polished.hvps,
            force_evaluations=polished.force_evaluations,
        )
        exclude = apply_policy(validity, self.on_invalid, self.warn, type(self).__name__)
        record = SolveRecord()
        context = ImplicitContext(
            potential=self.potential,
            batch=batch,
            edges=polished.edges,
            force_fn=self.force_fn,
            parameters=trainable_parameters(self.potential, self.parameters),
            options=self.options,
            handoff=handoff,
            record=record,
            exclude=exclude,
        )
        return attach_implicit(context, polished.positions, anchor=anchor), record, validity

    def __call__(self, batch: Batch) -> RelaxResult:
        solved, polished = self._solve(batch, make_verlet(self.potential, self.skin))
        positions, record, validity = self._attach(batch, solved, polished, None, 0.0)
        return RelaxResult(
            positions=positions,
            converged=solved.converged,
            fmax=polished.fmax,
            steps=solved.steps,
            energy=polished.energy,
            batch=batch.with_positions(positions),
            record=record,
            validity=validity,
        )
