"""The interface every potential shares: energies of a Batch, forces, and Hessian-vector products.

Any ``torch.nn.Module`` whose ``forward(batch)`` returns per-structure energies (n_systems,) in eV,
differentiable in ``batch.positions``, can be relaxed and trained through (the generic path: forces and
Hessian-vector products by double backward through autograd). :class:`Potential` adds the conveniences
our own potentials share: a cutoff, precomputed neighbor lists, ``energy_forces`` and save/load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.edges import Edges

__all__ = [
    "Edges",
    "Potential",
    "PotentialLike",
    "call_energy",
    "energy_forces",
    "hessian_vector_product",
    "trainable_parameters",
]


@runtime_checkable
class PotentialLike(Protocol):
    """What every relaxation, gradient and training function accepts as a potential: a callable (usually a
    ``torch.nn.Module``) mapping a :class:`~gdeq_ext.data.Batch` to per-structure energies (n_systems,) in eV,
    differentiable in ``batch.positions`` (and in its parameters, for training). Forces and Hessian-vector
    products come from autograd. A :class:`Potential` (with ``cutoff`` and ``energy(batch, edges)``) additionally
    gets the relaxations' shared Verlet list; see docs/architecture.md, "A new potential"."""

    def __call__(self, batch: Batch) -> torch.Tensor: ...


class Potential(torch.nn.Module):
    """Base class of gdeq_ext's potentials.

    Subclasses set ``self.cutoff`` (Å) and implement :meth:`energy`.
    """

    cutoff: float

    def energy(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        """Per-structure energy (n_systems,) in eV; ``edges`` defaults to a fresh full neighbor list."""
        raise NotImplementedError

    def forward(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        return self.energy(batch, edges)

    def neighbors(self, batch: Batch) -> Edges:
        from gdeq_ext.neighbors import neighbor_list

        return Edges(*neighbor_list(batch, self.cutoff, full=True))

    def energy_forces(
        self, batch: Batch, edges: Edges | None = None, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (n_systems,) in eV and forces F = -dE/dX (n_atoms, 3) in eV/Å."""
        return energy_forces(self, batch, edges=edges, create_graph=create_graph)


def call_energy(potential, batch: Batch, edges: Edges | None) -> torch.Tensor:
    """Per-structure energies (n_systems,) eV: ``potential.energy(batch, edges)`` for our potentials when a
    neighbor list is given, else ``potential(batch)``."""
    if edges is not None and isinstance(potential, Potential):
        return potential.energy(batch, edges)
    return potential(batch)


def trainable_parameters(potential, parameters: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """θ: the given tensors, or every parameter of ``potential`` (an nn.Module) that requires grad."""
    if parameters is not None:
        return tuple(parameters)
    if isinstance(potential, torch.nn.Module):
        return tuple(p for p in potential.parameters() if p.requires_grad)
    return ()


def energy_forces(
    potential, batch: Batch, edges: Edges | None = None, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (n_systems,) eV and forces (n_atoms, 3) eV/Å of any potential, by autograd.

    ``create_graph=True`` keeps the graph so the forces can be differentiated again (training on forces,
    Hessian-vector products, unrolled relaxations).
    """
    positions = batch.positions
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
        batch = batch.with_positions(positions)
    with torch.enable_grad():
        energy = call_energy(potential, batch, edges)
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
    return (energy if create_graph else energy.detach()), -grad


def hessian_vector_product(
    potential, batch: Batch, vector: torch.Tensor, edges: Edges | None = None, create_graph: bool = False
) -> torch.Tensor:
    """H·v (n_atoms, 3) in eV/Å² per Å of v, with H = d²E/dX² at ``batch.positions`` (double backward)."""
    positions = batch.positions.detach().requires_grad_(True)
    batch = batch.with_positions(positions)
    with torch.enable_grad():
        energy = call_energy(potential, batch, edges)
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=True)
        (hv,) = torch.autograd.grad(grad, positions, grad_outputs=vector, create_graph=create_graph)
    return hv
