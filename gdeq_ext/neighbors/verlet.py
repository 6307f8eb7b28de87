"""Verlet-skin neighbor lists for relaxations: build with cutoff + skin, reuse until an atom moved skin/2."""

from __future__ import annotations

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.neighbor_list import neighbor_list
from gdeq_ext.potentials.base import Edges

__all__ = ["VerletList"]


class VerletList:
    """A neighbor list with a skin, rebuilt only when needed.

    Built with ``cutoff + skin``; while no atom of a structure has moved more than ``skin / 2`` since the
    last build, every pair closer than ``cutoff`` is still in the list (two atoms approach each other by
    at most ``skin``), so the list is reused. Pairs between ``cutoff`` and ``cutoff + skin`` stay in the
    list; potentials give them exactly zero contribution.

    Args:
        cutoff: Å, the potential's cutoff.
        skin: Å, extra distance (default 0.5 Å). ``skin=0`` rebuilds at every call.

    Attributes:
        rebuilds: how many times the list was (re)built.
    """

    def __init__(self, cutoff: float, skin: float = 0.5):
        if not skin >= 0:
            raise ValueError(f"skin must be non-negative, got {skin}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.rebuilds = 0
        self._reference: torch.Tensor | None = None
        self._cell: torch.Tensor | None = None
        self._edges: Edges | None = None

    def reset(self) -> None:
        self._reference = self._cell = self._edges = None

    def needs_rebuild(self, batch: Batch) -> bool:
        if self._edges is None or self._reference is None or self.skin == 0:
            return True
        if self._reference.shape != batch.positions.shape or self._reference.device != batch.device:
            return True
        if not torch.equal(self._cell, batch.cell.detach()):
            return True
        moved = torch.linalg.vector_norm(batch.positions.detach() - self._reference, dim=1)
        return bool((moved > 0.5 * self.skin).any())

    def __call__(self, batch: Batch) -> Edges:
        """The current list (2, n_edges) + (n_edges, 3), rebuilt if some atom moved more than skin/2."""
        if self.needs_rebuild(batch):
            self._edges = Edges(*neighbor_list(batch, self.cutoff + self.skin, full=True))
            self._reference = batch.positions.detach().clone()
            self._cell = batch.cell.detach().clone()
            self.rebuilds += 1
        return self._edges
