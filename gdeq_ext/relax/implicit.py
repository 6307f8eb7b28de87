"""ImplicitRelax: FIRE to X* without a graph, then the implicit (Hessian-solve) gradient at X*."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.implicit_function import (
    ImplicitContext,
    ImplicitSolveOptions,
    SolveRecord,
    attach_implicit,
)
from gdeq_ext.relax.fire import FIREParameters, FIREResult, fire
from gdeq_ext.relax.forces import ForceFn, default_force_fn, make_verlet, trainable_parameters
from gdeq_ext.relax.result import RelaxResult

__all__ = ["ImplicitRelax"]


class ImplicitRelax:
    """Relax with batched FIRE (no graph) and differentiate the relaxed structure implicitly.

    Backward solves H u = g per structure (g = dL/dX*, H the Hessian at X*, rigid modes projected out)
    and returns dL/dθ = uᵀ ∂F_θ/∂θ. Memory is O(1) in the relaxation length: only X*, the neighbor list
    at X* and θ are kept. The gradient is exact at a force-free X*; at fmax > 0 it carries an error of
    order fmax (so the default fmax is tighter than ASE's 0.05).

    Args:
        potential: any module mapping a Batch to energies (n_systems,) eV.
        fmax: eV/Å force tolerance per structure (default 0.01).
        max_steps: FIRE steps per structure at most (default 1000); structures that hit it are reported
            (``converged`` False and a RelaxationWarning naming them), never silently accepted.
        solver: "cg" (default, MINRES retry where H is not positive definite), "minres" or "fixed_point".
        rtol, atol: tolerance of the Hessian solve per structure (default 1e-6 relative to ||g||).
        max_iter: Hessian-vector products per structure at most (default 30 n_atoms + 10).
        damping: eV/Å², solve (H + λI) u = g (default 0).
        project_rotations: project rigid rotations of non-periodic structures too (default True).
        fixed_point_alpha: Å²/eV, α of solver="fixed_point" (default 0.01).
        fire: :class:`FIREParameters` (default ASE's).
        skin: Å, Verlet skin for our own potentials (default 0.5).
        force_fn: the force evaluation (see relax/forces.py).
        parameters: tensors θ that get implicit gradients (default: the potential's parameters that
            require grad).
        warn: warn about unconverged relaxations and linear solves (default True).
    """

    def __init__(
        self,
        potential,
        *,
        fmax: float = 0.01,
        max_steps: int = 1000,
        solver: str = "cg",
        rtol: float = 1e-6,
        atol: float = 0.0,
        max_iter: int | None = None,
        damping: float = 0.0,
        project_rotations: bool = True,
        fixed_point_alpha: float = 0.01,
        fire: FIREParameters | None = None,
        skin: float = 0.5,
        force_fn: ForceFn | None = None,
        parameters: Sequence[torch.Tensor] | None = None,
        warn: bool = True,
    ):
        self.potential = potential
        self.fmax = float(fmax)
        self.max_steps = int(max_steps)
        self.options = ImplicitSolveOptions(
            solver=solver,
            rtol=rtol,
            atol=atol,
            max_iter=max_iter,
            damping=damping,
            project_rotations=project_rotations,
            fixed_point_alpha=fixed_point_alpha,
            warn=warn,
        )
        self.fire_parameters = fire or FIREParameters()
        self.skin = float(skin)
        self.force_fn = default_force_fn(force_fn)
        self.parameters = parameters
        self.warn = warn

    def _solve(self, batch: Batch, verlet, step_offset: int = 0) -> FIREResult:
        return fire(
            self.potential,
            batch,
            fmax=self.fmax,
            max_steps=self.max_steps,
            parameters=self.fire_parameters,
            verlet=verlet,
            force_fn=self.force_fn,
            step_offset=step_offset,
            warn=self.warn,
        )

    def _attach(self, batch: Batch, solved: FIREResult, anchor, handoff: float) -> tuple[torch.Tensor, SolveRecord]:
        record = SolveRecord()
        context = ImplicitContext(
            potential=self.potential,
            batch=batch,
            edges=solved.edges,
            force_fn=self.force_fn,
            parameters=trainable_parameters(self.potential, self.parameters),
            options=self.options,
            handoff=handoff,
            record=record,
        )
        return attach_implicit(context, solved.positions, anchor=anchor), record

    def __call__(self, batch: Batch) -> RelaxResult:
        solved = self._solve(batch, make_verlet(self.potential, self.skin))
        positions, record = self._attach(batch, solved, None, 0.0)
        return RelaxResult(
            positions=positions,
            converged=solved.converged,
            fmax=solved.fmax,
            steps=solved.steps,
            energy=solved.energy,
            batch=batch.with_positions(positions),
            record=record,
        )
