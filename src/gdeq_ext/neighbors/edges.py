"""The neighbor-list type every potential and relaxation passes around."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Edges", "select_edges"]


class Edges(NamedTuple):
    """A neighbor list: ``edge_index`` (2, n_edges) int64 and ``shifts`` (n_edges, 3) int64.

    It may have been built with a cutoff larger than the potential's (a Verlet skin); potentials must
    give exactly zero contribution for pairs beyond their own cutoff.
    """

    edge_index: torch.Tensor
    shifts: torch.Tensor


def select_edges(edges: Edges, atoms: torch.Tensor, n_atoms: int) -> Edges:
    """The pairs of ``edges`` among ``atoms`` ((k,) int64, increasing indices into a batch of ``n_atoms`` atoms:
    whole structures, as :meth:`gdeq_ext.Batch.select` returns them), renumbered 0..k-1 in that order. The order
    of the kept pairs is unchanged (a list sorted by receiver stays sorted); shifts are kept as they are."""
    new_index = torch.full((n_atoms,), -1, dtype=torch.int64, device=atoms.device)
    new_index[atoms] = torch.arange(len(atoms), dtype=torch.int64, device=atoms.device)
    receiver = new_index[edges.edge_index[0]]
    keep = receiver >= 0
    sender = new_index[edges.edge_index[1][keep]]
    return Edges(torch.stack([receiver[keep], sender]), edges.shifts[keep])
