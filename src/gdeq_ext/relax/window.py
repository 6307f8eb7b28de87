"""The differentiated window: K steps of the capped relaxation map X <- X + cap(αF_θ(X)), with their graph.

The cap scales each atom's step to at most ``maxstep`` (ASE's 0.2 Å): step_i <- step_i · min(1, maxstep /
||step_i||). It keeps a bad potential from throwing atoms across the cell, is smooth except where an atom's
step length equals maxstep exactly, and leaves the map untouched near a minimum. Unlike FIRE's
whole-structure cap, it is per atom, so an atom's step is never shrunk because some other atom of its
structure feels a large force. The map has no momentum: its Jacobian is I - αH (times the cap's), the
J_G of docs/method.md, Words.

Every step is one autograd node (:class:`_WindowStep`) whose backward differentiates the step's own graph
with respect to X_t and θ at once. With ``checkpoint=False`` that graph is built in forward and kept; with
``checkpoint=True`` only X_t (a node-level (n_atoms, 3) tensor) is kept and the graph is rebuilt in backward,
so peak memory is the K states plus one step's graph. Both paths run the same operations and sum the same
partial gradients in the same order, so the gradients are bit-identical when the potential returns the same bits at
every call on the same input (SW, the MLIP, the Transformer and eager MACE on a CPU); with a TorchScript model (its
profiling executor re-optimises during the first calls) or non-deterministic kernels (CUDA atomics) they agree to
rounding only (docs/method.md). ``torch.utils.checkpoint`` is not used: the force is itself a gradient of the
energy, so computing it inside a non-reentrant checkpoint unpacks the segment's saved tensors during the
forward pass, which recomputes the segment and keeps the recomputed tensors alive until backward (it measured
more memory than no checkpointing at all). The window is differentiable once (no double backward through the
steps); gradients reach X_0 and the tensors θ listed in ``parameters`` (default: the potential's trainable
parameters), and no other tensor the potential may capture.
"""

from __future__ import annotations

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.verlet import VerletList
from gdeq_ext.relax.checks import check_finite
from gdeq_ext.relax.forces import ForceFn, default_force_fn, edges_for, trainable_parameters
from gdeq_ext.relax.options import DEFAULT_ALPHA, WindowOptions

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
    alpha: float = DEFAULT_ALPHA,
    maxstep: float = 0.2,
    verlet: VerletList | None = None,
    force_fn: ForceFn | None = None,
    checkpoint: bool = False,
    parameters=None,
) -> tuple[torch.Tensor, ...]:
    """Run ``steps`` differentiated steps from ``batch.positions``; return the states X_1..X_K.

    Args:
        potential: any potential; its parameters receive gradients through the states.
        batch: start X_0 = ``batch.positions`` (n_atoms, 3) Å; if it requires grad, so do the states.
        steps: K >= 0.
        alpha: Å²/eV, step of the map X + αF (default 0.03: :mod:`gdeq_ext.relax.options`).
        maxstep: Å, per-atom cap (default 0.2, ASE's).
        verlet: neighbor list reused across steps, or None.
        force_fn: see :mod:`gdeq_ext.relax.forces`.
        checkpoint: recompute each step's graph in backward instead of storing it (default False).
        parameters: θ, the tensors that receive gradients (default: the potential's trainable parameters).

    Returns:
        K tensors (n_atoms, 3) Å, each with its graph to θ (and to X_0 when it requires grad).

    Raises:
        NonFiniteError: naming the structure and the step at which its forces became non-finite.
    """
    if steps < 0:
        raise ValueError(f"the window length must be non-negative, got {steps}")
    force_fn = default_force_fn(force_fn)

    def advance(x: torch.Tensor, edges, step: int, check: bool) -> torch.Tensor:
        # check: only when the step is first taken; a backward-time recomputation repeats the same numbers
        _, forces = force_fn(potential, batch.with_positions(x), edges, create_graph=True)
        if check:
            check_finite(forces, batch, step, where="differentiated window")
        return x + capped_step(forces, alpha, maxstep)

    x = batch.positions
    parameters = trainable_parameters(potential, parameters)
    states: list[torch.Tensor] = []
    for t in range(steps):
        edges = edges_for(verlet, batch.with_positions(x))
        x = _WindowStep.apply(lambda y, check, e=edges, s=t: advance(y, e, s, check), checkpoint, x, *parameters)
        states.append(x)
    return tuple(states)


class _WindowStep(torch.autograd.Function):
    """X_{t+1} = step(X_t) as one autograd node: ``apply(step, recompute, x, *parameters)``.

    ``step(x, check)`` computes X_{t+1} with its graph to ``x`` and to ``parameters`` (listed so that autograd routes
    their gradients through this node). ``recompute=False`` keeps that graph from forward; ``recompute=True``
    keeps only X_t and rebuilds the graph in backward.
    """

    @staticmethod
    def forward(ctx, step, recompute, x, *parameters):
        ctx.step, ctx.parameters, ctx.recompute = step, parameters, recompute  # parameters: references to leaves
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = step(leaf, True)
        if recompute:
            ctx.save_for_backward(x)
            ctx.graph = None
        else:
            ctx.graph = (leaf, out)
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        needed = ctx.needs_input_grad[3:]
        parameters = [p for p, need in zip(ctx.parameters, needed, strict=True) if need]
        with torch.enable_grad():
            if ctx.recompute:
                (x,) = ctx.saved_tensors
                leaf = x.detach().requires_grad_(True)
                out = ctx.step(leaf, False)
            elif ctx.graph is None:
                raise RuntimeError(
                    "backward through a window step a second time: its graph is freed after the first backward "
                    "(use checkpoint=True with retain_graph=True to differentiate the window twice)"
                )
            else:
                leaf, out = ctx.graph
            grads = torch.autograd.grad(out, (leaf, *parameters), grad_output, allow_unused=True)
        ctx.graph = None  # the step's graph is used once; free it now rather than with the whole graph
        rest = iter(grads[1:])
        grad_parameters = [next(rest) if need else None for need in needed]
        return (None, None, grads[0] if ctx.needs_input_grad[2] else None, *grad_parameters)


def unroll(
    potential, batch: Batch, options: WindowOptions, *, verlet=None, force_fn=None, parameters=None
) -> tuple[torch.Tensor, ...]:
    """:func:`run_window` with the steps, α, cap and checkpointing of a :class:`WindowOptions` (BPTT's T or the
    hybrid's K)."""
    return run_window(
        potential,
        batch,
        options.steps,
        alpha=options.alpha,
        maxstep=options.maxstep,
        verlet=verlet,
        force_fn=force_fn,
        checkpoint=options.checkpoint,
        parameters=parameters,
    )


class Unrolled:
    """Mixin of the relaxations with a differentiated window (BPTT, hybrid): the window's settings by name
    (read-only views of ``self.window_options``) and the unrolled states from a batch."""

    alpha = property(lambda self: self.window_options.alpha)
    maxstep = property(lambda self: self.window_options.maxstep)
    checkpoint = property(lambda self: self.window_options.checkpoint)

    def unroll(self, batch: Batch, verlet) -> tuple[torch.Tensor, ...]:
        return unroll(
            self.potential,
            batch,
            self.window_options,
            verlet=verlet,
            force_fn=self.force_fn,
            parameters=self.parameters,
        )
