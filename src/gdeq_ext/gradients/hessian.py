"""The Hessian of a batch at fixed positions as a linear operator: forces built once with a graph, each H·v one VJP.

Used by the implicit backward (H u = g), by the Newton polish of a relaxed structure (H δ = F) and by the
lowest-curvature check (Lanczos on H): all three only ever need products with H at one point X, so the forces are
evaluated once with ``create_graph=True`` and every product is a vector-Jacobian product of that same graph. With
the generic path that is a double-backward pass through the potential; a fused force node
(:func:`gdeq_ext.potentials.force`) passed as ``force_fn`` supplies -H·v from its own backward kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.projection import RigidModeProjector
from gdeq_ext.neighbors.edges import select_edges

__all__ = ["HessianOperator"]


class HessianOperator:
    """v ↦ (H + λI) v per structure at positions X, with H = d²E/dX² (eV/Å²), and the rigid-mode projector at X.

    Args:
        potential: any potential (module mapping a Batch to energies (n_systems,) eV).
        batch: the structures (cell, pbc, numbers, system); its positions are replaced by ``positions``.
        positions: (n_atoms, 3) Å, the point X (treated as a constant).
        edges: neighbor list valid at X, or None for potentials that build their own.
        force_fn: (potential, batch, edges, create_graph) -> (energies (n_systems,) eV, forces (n_atoms, 3) eV/Å).
        project_rotations: also project rigid rotations of structures with no periodic axis (default True).
        damping: λ in eV/Å² (default 0).

    Attributes:
        x: (n_atoms, 3) the leaf X of the graph; forces: (n_atoms, 3) eV/Å at X with their graph (to X and to
        the potential's parameters); energy: (n_systems,) eV, detached; projector: :class:`RigidModeProjector`
        at X; products: how many batched products were taken.
    """

    def __init__(
        self,
        potential,
        batch: Batch,
        positions: torch.Tensor,
        edges,
        force_fn: Callable,
        *,
        project_rotations: bool = True,
        damping: float = 0.0,
    ):
        self._setup = (potential, batch, positions.detach(), edges, force_fn)
        self.project_rotations = bool(project_rotations)
        self._build()
        self.energy = self._energy
        self.projector = RigidModeProjector(
            positions.detach(), batch.system, batch.n_systems, batch.pbc, rotations=project_rotations
        )
        self.damping = float(damping)
        self.products = 0

    def _build(self) -> None:
        potential, batch, positions, edges, force_fn = self._setup
        with torch.enable_grad():
            self._x = positions.detach().requires_grad_(True)
            energy, self._forces = force_fn(potential, batch.with_positions(self._x), edges, create_graph=True)
        self._energy = energy.detach()

    @property
    def x(self) -> torch.Tensor:
        if self._forces is None:
            self._build()
        return self._x

    @property
    def forces(self) -> torch.Tensor:
        if self._forces is None:  # released: the same graph again (same inputs, same bits)
            self._build()
        return self._forces

    def release(self) -> None:
        """Free the graph (it is rebuilt, identically, when a product or ``forces`` is asked for again): while a
        :meth:`restrict`-ed operator works on a sub-batch, only one graph is held at a time."""
        self._x = self._forces = None

    def restrict(self, members: torch.Tensor) -> HessianOperator:
        """The operator of the structures ``members`` ((k,) int64, increasing) alone, at the same positions, with
        the neighbor list restricted to their atoms (no new neighbor search). A structure's Hessian does not depend
        on the others in its batch, so its products are the same (to round-off in the summation order)."""
        potential, batch, positions, edges, force_fn = self._setup
        sub, atoms = batch.select(members)
        sub_edges = None if edges is None else select_edges(edges, atoms, batch.n_atoms)
        return HessianOperator(
            potential,
            sub,
            positions[atoms],
            sub_edges,
            force_fn,
            project_rotations=self.project_rotations,
            damping=self.damping,
        )

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """(H + λI) v for v (n_atoms, 3): eV/Å² times the units of v."""
        self.products += 1
        with torch.enable_grad():
            forces = self.forces
            (jvp,) = torch.autograd.grad(forces, self._x, v, retain_graph=True, allow_unused=True)
        hv = torch.zeros_like(v) if jvp is None else -jvp
        return hv + self.damping * v if self.damping else hv
