"""``neighbor_list``: the public entry point for pairs within a cutoff, for a Batch or packed tensors.

The work is one call of the compiled op ``gdeq_ext::neighbor_list`` (a cell list, all structures of a batch
at once, C++/OpenMP on CPU and CUDA on GPU); without a kernel for the tensors' device it falls back, with one
warning, to the brute-force reference :func:`neighbor_list_reference`. Input errors (NaN positions, singular
cells, ...) are detected inside the kernels, so on a GPU the only host synchronization of a call is the one
that reads the number of pairs back.
"""

from __future__ import annotations

import math

import torch

from gdeq_ext._extension import compiled_op, op_defined, warn_fallback
from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.edge_vectors import edge_vectors
from gdeq_ext.neighbors.reference import neighbor_list_reference

__all__ = ["neighbor_list", "OP_AVAILABLE"]

# The Python side must match what was compiled: an extension built before the op existed has no schema.
OP_AVAILABLE = op_defined("neighbor_list")


def _tensor(value, device):
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device=device)


def _unpack(batch_or_tensors):
    """(positions, cell (S, 3, 3), pbc (S, 3) bool, n_atoms_per_system (S,) int64, system or None)."""
    if isinstance(batch_or_tensors, Batch):
        b = batch_or_tensors
        return b.positions, b.cell, b.pbc, b.n_atoms_per_system, b.system
    if not isinstance(batch_or_tensors, (tuple, list)) or len(batch_or_tensors) not in (3, 4):
        raise TypeError(
            "neighbor_list expects a Batch or a tuple (positions, cell, pbc[, n_atoms_per_system]), got "
            f"{type(batch_or_tensors).__name__}"
        )
    positions, cell, pbc = batch_or_tensors[:3]
    counts = batch_or_tensors[3] if len(batch_or_tensors) == 4 else None
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    device = positions.device
    if cell is None:
        cell = torch.zeros(3, 3, dtype=positions.dtype, device=device)
    cell = _tensor(cell, device)
    if cell.dim() == 2:  # a single structure
        cell = cell.unsqueeze(0)
    n_systems = cell.shape[0] if cell.dim() == 3 else 1
    # Python values become device tensors by fill kernels where possible: copying a Python list to a GPU
    # synchronizes the host.
    if counts is None:
        if n_systems != 1:
            raise ValueError(f"n_atoms_per_system is required for {n_systems} cells")
        counts = torch.full((1,), positions.shape[0], dtype=torch.int64, device=device)
    counts = _tensor(counts, device)
    if isinstance(pbc, bool):
        pbc = torch.full((n_systems, 3), pbc, dtype=torch.bool, device=device)
    pbc = _tensor(pbc, device)
    if pbc.dim() <= 1:
        pbc = pbc.to(torch.bool).expand(n_systems, 3)
    return positions, cell, pbc, counts, None


def _check(positions, cell, pbc, counts, cutoff) -> float:
    """Checks that need no device data (no host synchronization); the kernels check the values."""
    try:
        cutoff = float(cutoff)
    except (TypeError, ValueError):
        raise TypeError(f"gdeq_ext.neighbor_list: cutoff must be a number, got {cutoff!r}") from None
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"gdeq_ext.neighbor_list: cutoff must be positive and finite, got {cutoff}")
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(
            f"gdeq_ext.neighbor_list: positions must have shape (n_atoms, 3), got {tuple(positions.shape)}"
        )
    if positions.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gdeq_ext.neighbor_list: positions must be float32 or float64, got {positions.dtype}")
    n_systems = counts.shape[0] if counts.dim() == 1 else -1
    expected = {"cell": (cell, (n_systems, 3, 3)), "pbc": (pbc, (n_systems, 3)), "n_atoms_per_system": (counts, None)}
    for name, (value, shape) in expected.items():
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"gdeq_ext.neighbor_list: {name} must have shape {shape} (one row per structure), "
                f"got {tuple(value.shape)}"
            )
        if value.device != positions.device:
            raise ValueError(
                f"gdeq_ext.neighbor_list: {name} is on {value.device} but positions are on {positions.device}; "
                "every tensor of the batch must be on one device"
            )
    if counts.dim() != 1 or counts.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"gdeq_ext.neighbor_list: n_atoms_per_system must be a 1-d integer tensor, got {counts.dtype} "
            f"of shape {tuple(counts.shape)}"
        )
    if cell.dtype != positions.dtype:
        raise TypeError(f"gdeq_ext.neighbor_list: cell has dtype {cell.dtype} but positions have {positions.dtype}")
    if pbc.dtype != torch.bool:
        raise TypeError(f"gdeq_ext.neighbor_list: pbc must be bool, got {pbc.dtype}")
    return cutoff


def neighbor_list(
    batch_or_tensors,
    cutoff: float,
    *,
    full: bool = True,
    return_vectors: bool = False,
):
    """All pairs (i, j, S) with |x_j - x_i + S · cell| < cutoff, for every structure of a batch, in one call.

    Periodic, triclinic and mixed-periodicity cells; atoms anywhere (outside the cell too); cutoffs larger
    than the cell (every needed image); non-periodic structures with a zero cell; empty structures.

    Args:
        batch_or_tensors: a :class:`Batch`, or a tuple ``(positions (n_atoms, 3) float, cell (n_systems, 3, 3)
            same dtype (rows = lattice vectors, Å), pbc (n_systems, 3) bool, n_atoms_per_system (n_systems,)
            int)``; for one structure ``(positions, cell (3, 3) or None, pbc (3,) or bool)`` also works.
        cutoff: Å, finite and > 0; pairs at distance exactly ``cutoff`` are excluded.
        full: both (i, j) and (j, i) for every pair (default), or each unordered pair once (i < j; for a
            self-image (i, i, S) the S whose first non-zero component is positive).
        return_vectors: also return vectors (n_edges, 3) and distances (n_edges,) from the differentiable
            :func:`edge_vectors` op (differentiable in positions and cell).

    Returns:
        ``(edge_index (2, n_edges) int64, shifts (n_edges, 3) int64)`` with r_ij = x_j - x_i + shifts @
        cell[system[i]], sorted by i, then j, then shift (identical on CPU and CUDA), or ``(edge_index,
        shifts, vectors, distances)`` with ``return_vectors``. Self pairs (i, i, 0) are never included.

    Raises:
        ValueError: cutoff <= 0 or not finite, NaN/inf positions, a non-finite or singular periodic cell,
            tensors on different devices; the message names the structure (and atom).
    """
    positions, cell, pbc, counts, system = _unpack(batch_or_tensors)
    cutoff = _check(positions, cell, pbc, counts, cutoff)
    counts = counts.to(torch.int64)
    if compiled_op("neighbor_list", positions.device):
        edge_index, shifts = torch.ops.gdeq_ext.neighbor_list(
            positions.detach(), cell.detach(), pbc, counts, cutoff, bool(full)
        )
    else:
        warn_fallback("neighbor_list")
        with torch.no_grad():
            edge_index, shifts = neighbor_list_reference(
                positions.detach(), cell.detach(), pbc, counts, cutoff, bool(full)
            )
    if not return_vectors:
        return edge_index, shifts
    if system is None:
        system = torch.repeat_interleave(
            torch.arange(counts.shape[0], device=positions.device), counts, output_size=positions.shape[0]
        )
    vectors, distances = edge_vectors(positions, cell, edge_index, shifts, system)
    return edge_index, shifts, vectors, distances


# ---------------------------------------------------------------------------------------------- registration
if OP_AVAILABLE:

    @torch.library.register_fake("gdeq_ext::neighbor_list")
    def _neighbor_list_fake(positions, cell, pbc, n_atoms_per_system, cutoff, full=True, initial_capacity=0):
        n_edges = torch.library.get_ctx().new_dynamic_size()  # data-dependent: pairs found
        return (
            positions.new_empty((2, n_edges), dtype=torch.int64),
            positions.new_empty((n_edges, 3), dtype=torch.int64),
        )
