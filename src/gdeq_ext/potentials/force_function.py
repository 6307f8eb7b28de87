"""F = force(X, θ) as one autograd node that keeps only the positions: the relaxation steps' force op.

    forward:   E(X, θ) (n_systems,) eV and F = -∂E/∂X (n_atoms, 3) eV/Å, computed without keeping a graph;
    backward:  for cotangents (ē, w) of (E, F):
               ∂L/∂X = ē_s (-F) - H w              (n_atoms, 3),   H = ∂²E/∂X² (eV/Å²)
               ∂L/∂θ = ē ᵀ ∂E/∂θ + (∂F/∂θ)ᵀ w,

both from one recomputation of E and ∂E/∂X at the saved X followed by one double-backward pass. With the MLIP's
fused backend that pass runs the edge-moment kernels (``edge_moments_backward`` / ``_double_backward``), so
neither the forward nor the backward ever holds a tensor with one row per edge and many feature columns, and
between forward and backward the node keeps only X (n_atoms, 3) and the neighbor list (shared by every step
that reuses the same Verlet list), plus references to θ. A graph through T relaxation steps then costs
O(T · n_atoms) instead of T copies of the potential's intermediate activations: this is the "fused force
Function" row of ``benchmarks/memory.py``.

The price is one more energy + forces evaluation in backward per node (the window or BPTT backward then costs
about 2x a stored graph's). For the implicit solve, whose backward takes many Hessian-vector products at the
same X*, a graph built once and reused (the default ``force_fn``) is faster; this node works there too, at one
recomputation per product.

The backward is itself differentiable (``create_graph=True`` builds the recomputation's graph from the saved X
and θ), so force-matching losses, Hessian-vector products of the relaxation map and gradient penalties work
through it; derivatives beyond the potential's own order raise in the potential (the fused MLIP is twice
differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.potentials.base import Edges, Potential, call_energy, energy_forces, trainable_parameters

__all__ = ["force", "recomputed_forces"]


class _Force(torch.autograd.Function):
    """``apply(potential, batch, edges, positions, *parameters) -> (energies, forces)``."""

    @staticmethod
    def forward(ctx, potential, batch: Batch, edges, positions: torch.Tensor, *parameters):
        with torch.enable_grad():
            x = positions.detach().requires_grad_(True)
            energy = call_energy(potential, batch.with_positions(x), edges)
            (grad,) = torch.autograd.grad(energy.sum(), x)
        ctx.potential, ctx.batch, ctx.edges = potential, batch, edges
        # θ is saved (not only referenced) so that autograd's version counter catches an optimizer step taken
        # between forward and backward: the recomputation would otherwise silently use the new θ.
        ctx.save_for_backward(positions, *parameters)
        ctx.set_materialize_grads(False)
        return energy.detach(), -grad

    @staticmethod
    def backward(ctx, grad_energy, grad_forces):
        positions, *parameters = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[3]
        wanted = [p for p, need in zip(parameters, ctx.needs_input_grad[4:], strict=True) if need]
        create_graph = torch.is_grad_enabled()
        if (grad_energy is None and grad_forces is None) or not (needs_x or wanted):
            return (None,) * len(ctx.needs_input_grad)
        with torch.enable_grad():
            # Under create_graph the recomputation hangs off the saved X itself, so that second derivatives
            # reach whatever X came from; otherwise a fresh leaf keeps the backward graph local.
            x = positions if create_graph and positions.requires_grad else positions.detach().requires_grad_(True)
            energy = call_energy(ctx.potential, ctx.batch.with_positions(x), ctx.edges)
            (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
            # One scalar whose gradient is the whole VJP: ē·E - w·∂E/∂X  (F = -∂E/∂X).
            scalar = energy.new_zeros(())
            if grad_energy is not None:
                scalar = scalar + (energy * grad_energy).sum()
            if grad_forces is not None:
                scalar = scalar - (grad * grad_forces).sum()
            inputs = ([x] if needs_x else []) + wanted
            grads = torch.autograd.grad(scalar, inputs, allow_unused=True, create_graph=create_graph)
        grads = list(grads)
        grad_x = grads.pop(0) if needs_x else None
        if needs_x and grad_x is None:
            grad_x = torch.zeros_like(positions)
        rest = iter(grads)
        grad_parameters = [next(rest) if need else None for need in ctx.needs_input_grad[4:]]
        return (None, None, None, grad_x, *grad_parameters)


def force(
    potential,
    batch: Batch,
    edges: Edges | None = None,
    parameters: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies and forces as one autograd node that saves only X (and the neighbor list) for backward.

    Args:
        potential: any module mapping a Batch to energies (our :class:`~gdeq_ext.potentials.base.Potential`
            subclasses also take ``edges``).
        batch: the structures; ``batch.positions`` X (n_atoms, 3) Å, float32/float64, may require grad.
        edges: a neighbor list valid at X (e.g. a Verlet list, cutoff + skin) or None. When None and the
            potential is a :class:`Potential`, the list is built here once and reused by the backward, so the
            recomputation sees exactly the same pairs.
        parameters: θ, the tensors that receive gradients (default: the potential's parameters that require
            grad). Gradients reach only X and these.

    Returns:
        energies (n_systems,) eV and forces (n_atoms, 3) eV/Å, the same values as
        :func:`~gdeq_ext.potentials.base.energy_forces`, differentiable in X and θ (backward: module docstring).
    """
    if edges is None and isinstance(potential, Potential) and getattr(potential, "cutoff", None) is not None:
        edges = potential.neighbors(batch.with_positions(batch.positions.detach()))
    parameters = trainable_parameters(potential, parameters)
    return _Force.apply(potential, batch, edges, batch.positions, *parameters)


def recomputed_forces(
    potential, batch: Batch, edges: Edges | None = None, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The relaxations' ``force_fn`` backed by :func:`force` (see :mod:`gdeq_ext.relax.forces`).

    ``create_graph=False`` (graph-free relaxation steps) is plain :func:`energy_forces`; ``create_graph=True``
    returns :func:`force`'s node, so ``BPTTRelax(model, force_fn=recomputed_forces)`` and the hybrid window keep
    only positions and neighbor lists per step. Energies (n_systems,) eV, forces (n_atoms, 3) eV/Å.
    """
    if not create_graph:
        return energy_forces(potential, batch, edges=edges, create_graph=False)
    return force(potential, batch, edges)
