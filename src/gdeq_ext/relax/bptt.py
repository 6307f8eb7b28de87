"""BPTTRelax: backpropagation through T steps of the capped relaxation map (the memory-hungry baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.implicit_function import check_positive
from gdeq_ext.potentials.base import PotentialLike
from gdeq_ext.relax.checks import check_finite, structure_fmax
from gdeq_ext.relax.forces import ForceFn, default_force_fn, edges_for, make_verlet
from gdeq_ext.relax.options import BPTT_STEPS, FIREOptions, WindowOptions, route_fields
from gdeq_ext.relax.result import RelaxResult
from gdeq_ext.relax.window import Unrolled

__all__ = ["BPTTRelax"]


class BPTTRelax(Unrolled):
    """Relax with T differentiated steps X <- X + cap(αF_θ(X)); dL/dθ by autograd through all of them.

    We unroll the window map, not FIRE: the map is the fixed-point iteration of docs/method.md, smooth
    almost everywhere, and the same map the hybrid window uses, so BPTT is hybrid with K = T and no
    implicit phase. (Unrolling FIRE would add its velocity state and its branchy dt/a logic to the graph.)
    T is fixed, not a convergence loop, so memory is known in advance: O(T) steps of graph, or O(T)
    node-level states plus one step of graph with ``checkpoint`` (segments of one step: see window.py).

    Args:
        potential: any module mapping a Batch to energies (n_systems,) eV.
        steps: T >= 0 (default 100), or a :class:`~gdeq_ext.relax.options.WindowOptions` (steps T, alpha 0.03
            Å²/eV, maxstep 0.2 Å; checkpoint False here: all T graphs are stored, the baseline's memory; True
            recomputes each step's graph in backward: the same gradients, bit for bit for a deterministic
            potential, docs/method.md).
        fmax: eV/Å, only for the ``converged`` report at X_T (default 0.01, FIRE's).
        skin: Å, Verlet skin for our own potentials (default 0.5).
        force_fn: the force evaluation (default autograd through the potential; see relax/forces.py).
        parameters: θ, the tensors that receive gradients (default: the potential's trainable parameters), as in
            :class:`ImplicitRelax` and :class:`HybridRelax`; no other tensor the potential captures gets one.
        **fields: any field of the window (alpha, maxstep, checkpoint) by name.

    Calling it on a Batch returns :class:`RelaxResult` whose ``positions`` X_T carry the full graph;
    ``steps`` is T for every structure, ``converged`` says whether fmax(X_T) < ``fmax`` (no warning:
    T is a horizon, not a limit that was hit).
    """

    def __init__(
        self,
        potential: PotentialLike,
        steps: int | WindowOptions = BPTT_STEPS,
        *,
        fmax: float = FIREOptions.fmax,
        skin: float = FIREOptions.skin,
        force_fn: ForceFn | None = None,
        parameters: Sequence[torch.Tensor] | None = None,
        **fields,
    ):
        if not isinstance(steps, WindowOptions):
            check_positive("steps", steps, allow_zero=True, integer=True)
            steps = WindowOptions(steps=int(steps), checkpoint=False)
        check_positive("fmax", fmax, allow_zero=True)  # 0: never stop early
        check_positive("skin", skin, allow_zero=True)
        self.window_options: WindowOptions = route_fields(type(self).__name__, {"window": steps}, fields)["window"]
        self.potential = potential
        self.fmax = float(fmax)
        self.skin = float(skin)
        self.force_fn = default_force_fn(force_fn)
        self.parameters = None if parameters is None else list(parameters)

    steps = property(lambda self: self.window_options.steps)  # T (K); alpha, maxstep, checkpoint: Unrolled

    def __call__(self, batch: Batch) -> RelaxResult:
        verlet = make_verlet(self.potential, self.skin)
        states = self.unroll(batch, verlet)
        final = states[-1] if states else batch.positions
        report = batch.with_positions(final.detach())
        energy, forces = self.force_fn(self.potential, report, edges_for(verlet, report), create_graph=False)
        check_finite(forces, batch, self.steps, where="BPTT relaxation")
        fmax = structure_fmax(forces, batch)
        return RelaxResult(
            positions=final,
            converged=fmax < self.fmax,
            fmax=fmax,
            steps=torch.full((batch.n_systems,), self.steps, dtype=torch.int64, device=batch.device),
            energy=energy.detach(),
            batch=batch.with_positions(final),
        )
