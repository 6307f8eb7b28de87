"""HybridRelax (G-DEQ): a differentiated window of K steps, a graph-free FIRE solve, the implicit gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.implicit_function import check_positive
from gdeq_ext.potentials.base import PotentialLike
from gdeq_ext.relax.fire import FIREParameters
from gdeq_ext.relax.forces import ForceFn, make_verlet
from gdeq_ext.relax.implicit import ImplicitRelax
from gdeq_ext.relax.polish import PolishOptions
from gdeq_ext.relax.result import RelaxResult
from gdeq_ext.relax.window import run_window

__all__ = ["HybridRelax"]


class HybridRelax(ImplicitRelax):
    """The formulation of docs/method.md:

        X_1..X_K = K differentiated steps X <- X + cap(αF_θ(X)) from X_0   (guidance window, with graph)
        X*       = FIRE from X_K without a graph                             (equilibrium solve)
        dL/dθ    = uᵀ ∂F_θ/∂θ |_{X*}  (H u = g)  +  β · gᵀ dX_K/dθ          (implicit + straight-through)

    The cotangent g = dL/dX* enters the window at X_K scaled by β = ``handoff``; β = 0 or K = 0 gives
    exactly :class:`ImplicitRelax`'s gradient. The window states are returned (``RelaxResult.window``)
    with their graph so a guidance loss can be added on them. Memory: K node-level window states + O(1): by
    default each window step keeps only X_t and rebuilds its graph in backward (one more force evaluation per
    window step, a few percent of a relaxation), so the peak is one step's graph, not K of them.

    Args:
        potential: any module mapping a Batch to energies (n_systems,) eV.
        window: K >= 0 differentiated steps (default 10).
        fmax, max_steps: FIRE tolerance (eV/Å, default 0.01) and step limit after the window (default 1000).
        handoff: β (default 1.0).
        checkpoint: recompute each window step's graph in backward (default True); ``False`` stores the K graphs
            (faster backward, O(K) graphs of memory); the gradients are bit-identical.
        alpha: Å²/eV window step (default 0.01); maxstep: Å per-atom cap (default 0.2).
        the remaining keyword arguments: as :class:`ImplicitRelax` (solver, rtol, atol, max_iter, damping,
            project_rotations, fixed_point_alpha, fire, skin, force_fn, parameters, warn, polish, on_invalid).

    ``RelaxResult.steps`` counts window and FIRE steps together.
    """

    def __init__(
        self,
        potential: PotentialLike,
        window: int = 10,
        *,
        fmax: float = 0.01,
        max_steps: int = 1000,
        handoff: float = 1.0,
        checkpoint: bool = True,
        alpha: float = 0.01,
        maxstep: float = 0.2,
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
        polish: PolishOptions | None = None,
        on_invalid: str = "warn",
    ):
        super().__init__(
            potential,
            fmax=fmax,
            max_steps=max_steps,
            solver=solver,
            rtol=rtol,
            atol=atol,
            max_iter=max_iter,
            damping=damping,
            project_rotations=project_rotations,
            fixed_point_alpha=fixed_point_alpha,
            fire=fire,
            skin=skin,
            force_fn=force_fn,
            parameters=parameters,
            warn=warn,
            polish=polish,
            on_invalid=on_invalid,
        )
        check_positive("window", window, allow_zero=True, integer=True)
        check_positive("alpha", alpha)
        check_positive("maxstep", maxstep)
        if not math.isfinite(handoff):
            raise ValueError(f"handoff must be a finite number, got {handoff!r}")
        self.window = int(window)
        self.handoff = float(handoff)
        self.checkpoint = checkpoint
        self.alpha = float(alpha)
        self.maxstep = float(maxstep)

    def __call__(self, batch: Batch) -> RelaxResult:
        verlet = make_verlet(self.potential, self.skin)
        states = run_window(
            self.potential,
            batch,
            self.window,
            alpha=self.alpha,
            maxstep=self.maxstep,
            verlet=verlet,
            force_fn=self.force_fn,
            checkpoint=self.checkpoint,
            parameters=self.parameters,
        )
        anchor = states[-1] if states else None
        start = batch if anchor is None else batch.with_positions(anchor.detach())
        solved, polished = self._solve(start, verlet, step_offset=self.window)
        positions, record, validity = self._attach(batch, solved, polished, anchor, self.handoff)
        return RelaxResult(
            positions=positions,
            converged=solved.converged,
            fmax=polished.fmax,
            steps=solved.steps + self.window,
            energy=polished.energy,
            batch=batch.with_positions(positions),
            window=tuple(states),
            record=record,
            validity=validity,
        )
