"""HybridRelax (G-DEQ): a differentiated window of K steps, a graph-free FIRE solve, the implicit gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.implicit_function import ImplicitSolveOptions, check_positive
from gdeq_ext.potentials.base import PotentialLike
from gdeq_ext.relax.fire import FIREParameters
from gdeq_ext.relax.forces import ForceFn, make_verlet
from gdeq_ext.relax.implicit import ImplicitRelax
from gdeq_ext.relax.options import HYBRID_WINDOW, FIREOptions, WindowOptions, route_fields
from gdeq_ext.relax.polish import PolishOptions
from gdeq_ext.relax.result import RelaxResult
from gdeq_ext.relax.window import Unrolled

__all__ = ["HybridRelax"]


class HybridRelax(Unrolled, ImplicitRelax):
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
        window: K >= 0 differentiated steps (default 10), or a :class:`~gdeq_ext.relax.options.WindowOptions`
            (steps K, alpha 0.03 Å²/eV, maxstep 0.2 Å, checkpoint True: each window step's graph is recomputed in
            backward, O(1) graphs of memory; ``checkpoint=False`` stores the K graphs; the gradients are
            the same, bit for bit for a deterministic potential: docs/method.md).
        handoff: β (default 1.0).
        fire, solve, polish, force_fn, parameters, warn, on_invalid: as :class:`ImplicitRelax`.
        **fields: any field of the window (alpha, maxstep, checkpoint), ``fire`` (fmax, max_steps, skin) or
            ``solve`` (solver, rtol, atol, max_iter, damping, project_rotations, fixed_point_alpha) by name.

    ``RelaxResult.steps`` counts window and FIRE steps together.
    """

    def __init__(
        self,
        potential: PotentialLike,
        window: int | WindowOptions = HYBRID_WINDOW,
        *,
        handoff: float = 1.0,
        fire: FIREOptions | FIREParameters | None = None,
        solve: ImplicitSolveOptions | None = None,
        polish: PolishOptions | None = None,
        force_fn: ForceFn | None = None,
        parameters: Sequence[torch.Tensor] | None = None,
        warn: bool = True,
        on_invalid: str = "warn",
        **fields,
    ):
        if not isinstance(window, WindowOptions):
            check_positive("window", window, allow_zero=True, integer=True)
            window = WindowOptions(steps=int(window))
        window_fields = {k: fields.pop(k) for k in list(fields) if k in WindowOptions.__dataclass_fields__}
        window = route_fields(type(self).__name__, {"window": window}, window_fields)["window"]
        super().__init__(
            potential,
            fire=fire,
            solve=solve,
            polish=polish,
            force_fn=force_fn,
            parameters=parameters,
            warn=warn,
            on_invalid=on_invalid,
            **fields,
        )
        if not math.isfinite(handoff):
            raise ValueError(f"handoff must be a finite number, got {handoff!r}")
        self.window_options: WindowOptions = window
        self.handoff = float(handoff)

    window = property(lambda self: self.window_options.steps)  # T (K); alpha, maxstep, checkpoint: Unrolled

    def __call__(self, batch: Batch) -> RelaxResult:
        verlet = make_verlet(self.potential, self.skin)
        states = self.unroll(batch, verlet)
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
