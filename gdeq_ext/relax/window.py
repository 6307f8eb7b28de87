"""The differentiated window: K steps of the capped relaxation map X <- X + cap(αF_θ(X)), with their graph.

The cap scales each atom's step to at most ``maxstep`` (ASE's 0.2 Å): step_i <- step_i · min(1, maxstep /
||step_i||). It keeps a bad potential from throwing atoms across the cell, is smooth except where an atom's
step length equals maxstep exactly, and leaves the map untouched near a minimum. Unlike FIRE's
whole-structure cap, it is per atom, so an atom's step is never shrunk because some other atom of its
structure feels a large force. The map has no momentum: its Jacobian is I - αH (times the cap's), the
J_G of METHOD.md §5.

Checkpointing (``checkpoint=True``) makes every step its own ``torch.utils.checkpoint`` segment
(non-reentrant, so the recomputed nodes are the original graph's nodes and the gradients are
bit-identical wherever the potential's kernels are deterministic, e.g. on CPU): only the states X_t,
node-level (n_atoms, 3) tensors that are returned anyway, outlive a step. Longer segments would save
nothing more (a segment boundary is one such state) and cost more: the force is itself a gradient of
the energy, so computing it inside a checkpointed segment unpacks the segment's saved tensors and makes
autograd recompute the segment up to that point during the forward pass too; with one-step segments
that is one extra energy evaluation per step (3 evaluations per step in all, against 1 without
checkpointing).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.verlet import VerletList
from gdeq_ext.relax.checks import check_finite
from gdeq_ext.relax.forces import ForceFn, default_force_fn, edges_for

__all__ = ["capped_step", "run_window"]


def capped_step(forces: torch.Tensor, alpha: float, maxstep: float) -> torch.Tensor:
    """αF (n_atoms, 3) Å with every atom's step scaled to length at most ``maxstep`` Å.

    Args:
        forces: (n_atoms, 3) eV/Å; alpha: Å²/eV; maxstep: Å.
    """
    step = alpha * forces
    length = torch.linalg.vector_norm(step, dim=1, keepdim=True)
    # clamp_min keeps the scale exactly 1 (zero derivative) below the cap and avoids 0/0 at rest.
    return step * (maxstep / length.clamp_min(maxstep))


def run_window(
    potential,
    batch: Batch,
    steps: int,
    *,
    alpha: float = 0.01,
    maxstep: float = 0.2,
    verlet: VerletList | None = None,
    force_fn: ForceFn | None = None,
    checkpoint: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Run ``steps`` differentiated steps from ``batch.positions``; return the states X_1..X_K.

    Args:
        potential: any potential; its parameters receive gradients through the states.
        batch: start X_0 = ``batch.positions`` (n_atoms, 3) Å; if it requires grad, so do the states.
        steps: K >= 0.
        alpha: Å²/eV, step of the map X + αF (default 0.01 = FIRE's first step dt0² from rest).
        maxstep: Å, per-atom cap (default 0.2, ASE's).
        verlet: neighbor list reused across steps, or None.
        force_fn: see :mod:`gdeq_ext.relax.forces`.
        checkpoint: recompute each step's graph in backward instead of storing it (default False).

    Returns:
        K tensors (n_atoms, 3) Å, each with its graph to θ (and to X_0 when it requires grad).

    Raises:
        NonFiniteError: naming the structure and the step at which its forces became non-finite.
    """
    if steps < 0:
        raise ValueError(f"the window length must be non-negative, got {steps}")
    force_fn = default_force_fn(force_fn)

    def advance(x: torch.Tensor, edges, step: int, check: bool) -> torch.Tensor:
        _, forces = force_fn(potential, batch.with_positions(x), edges, create_graph=True)
        if check:
            check_finite(forces, batch, step, where="differentiated window")
        return x + capped_step(forces, alpha, maxstep)

    x = batch.positions
    states: list[torch.Tensor] = []
    for t in range(steps):
        edges = edges_for(verlet, batch.with_positions(x))
        if checkpoint:
            x = torch_checkpoint(_Replay(advance, edges, t), x, use_reentrant=False)
        else:
            x = advance(x, edges, t, True)
        states.append(x)
    return tuple(states)


class _Replay:
    """One checkpointed step with its neighbor list fixed: the recomputation in backward (and the one
    autograd's unpacking triggers during forward, when the force's own gradient reads the energy graph)
    runs the same operations on the same list, so the recomputed graph is the original graph."""

    def __init__(self, advance, edges, step: int):
        self.advance, self.edges, self.step, self.calls = advance, edges, step, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.advance(x, self.edges, self.step, self.calls == 1)
