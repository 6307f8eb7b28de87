"""The one pluggable force evaluation every relaxation mode goes through, and the neighbor-list policy.

``force_fn(potential, batch, edges, create_graph) -> (energies (n_systems,) eV, forces (n_atoms, 3) eV/Å)``.
The default, :func:`gdeq_ext.potentials.base.energy_forces`, is the generic path: F = -dE/dX by autograd,
so the window's backward and the implicit solve's Hessian-vector products are double-backward passes
through the potential. A fused force op (issue #5: ``F = force(X, θ)`` whose backward returns
(-H w, (∂F/∂θ)ᵀ w) from kernels) is passed as ``force_fn`` and nothing else changes: every mode only
ever calls ``force_fn`` and differentiates its output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.verlet import VerletList
from gdeq_ext.potentials.base import Edges, Potential, energy_forces, trainable_parameters

__all__ = ["ForceFn", "default_force_fn", "edges_for", "make_verlet", "trainable_parameters"]

ForceFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def default_force_fn(force_fn: ForceFn | None) -> ForceFn:
    return energy_forces if force_fn is None else force_fn


def make_verlet(potential, skin: float) -> VerletList | None:
    """A Verlet list for our own potentials (they accept precomputed edges); None for any other module,
    which builds its own neighbors inside ``forward(batch)``."""
    if isinstance(potential, Potential) and getattr(potential, "cutoff", None) is not None:
        return VerletList(potential.cutoff, skin)
    return None


def edges_for(verlet: VerletList | None, batch: Batch) -> Edges | None:
    return None if verlet is None else verlet(batch)
