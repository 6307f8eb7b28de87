"""``neighbor_list``: the public entry point for pairs within a cutoff, for a Batch or packed tensors."""

from __future__ import annotations

import math

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.edge_vectors import edge_vectors
from gdeq_ext.neighbors.reference import neighbor_list_reference

__all__ = ["neighbor_list"]


def neighbor_list(
    batch_or_tensors,
    cutoff: float,
    *,
    full: bool = True,
    return_vectors: bool = False,
):
    """All pairs (i, j, S) with |x_j - x_i + S · cell| < cutoff, for every structure of a batch.

    Args:
        batch_or_tensors: a :class:`Batch`, or a tuple ``(positions (n_atoms, 3), cell (n_systems, 3, 3),
            pbc (n_systems, 3) bool, n_atoms_per_system (n_systems,) int64)``.
        cutoff: Å, finite and > 0.
        full: both directions of every pair (default) or each unordered pair once.
        return_vectors: also return vectors (n_edges, 3) and distances (n_edges,) through the
            differentiable :func:`edge_vectors` op.

    Returns:
        ``(edge_index (2, n_edges) int64, shifts (n_edges, 3) int64)`` sorted by i, then j, then shift, or
        ``(edge_index, shifts, vectors, distances)`` when ``return_vectors``.
    """
    if isinstance(batch_or_tensors, Batch):
        batch = batch_or_tensors
        positions, cell, pbc, counts = batch.positions, batch.cell, batch.pbc, batch.n_atoms_per_system
        system = batch.system
    else:
        positions, cell, pbc, counts = batch_or_tensors
        counts = torch.as_tensor(counts, dtype=torch.int64, device=positions.device)
        system = torch.repeat_interleave(torch.arange(len(counts), device=positions.device), counts)
    cutoff = float(cutoff)
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be positive and finite, got {cutoff}")
    with torch.no_grad():
        edge_index, shifts = neighbor_list_reference(positions.detach(), cell.detach(), pbc, counts, cutoff, full)
    if not return_vectors:
        return edge_index, shifts
    vectors, distances = edge_vectors(positions, cell, edge_index, shifts, system)
    return edge_index, shifts, vectors, distances
