"""Edge vectors and distances under periodic boundaries: ``r_ij = x_j - x_i + S_ij · cell[system(i)]``.

The compiled op ``gdeq_ext::edge_vectors`` is a gather; its adjoint ``gdeq_ext::edge_vectors_backward``
is the matching scatter (into positions and into each structure's cell). Each is the other's
derivative, so derivatives of every order are again these two ops plus per-edge 3-vector arithmetic.
"""

from __future__ import annotations

import torch

from gdeq_ext._extension import HAVE_EXTENSION, compiled_op, warn_fallback

__all__ = ["edge_vectors", "edge_vectors_reference", "edge_vectors_scatter"]


def edge_vectors_reference(
    positions: torch.Tensor,
    cell: torch.Tensor,
    edge_index: torch.Tensor,
    shifts: torch.Tensor,
    system: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch edge vectors and distances (the oracle; autograd gives its derivatives)."""
    i, j = edge_index[0], edge_index[1]
    image = torch.einsum("ek,ekl->el", shifts.to(cell.dtype), cell[system[i]])
    vectors = positions[j] - positions[i] + image
    return vectors, torch.linalg.vector_norm(vectors, dim=1)


def _scatter_reference(grad_vectors, edge_index, shifts, system, n_atoms, n_systems):
    i, j = edge_index[0], edge_index[1]
    grad_positions = grad_vectors.new_zeros(n_atoms, 3)
    grad_positions.index_add_(0, j, grad_vectors).index_add_(0, i, -grad_vectors)
    per_edge = shifts.to(grad_vectors.dtype).unsqueeze(2) * grad_vectors.unsqueeze(1)  # (E, 3, 3)
    grad_cell = grad_vectors.new_zeros(n_systems, 3, 3).index_add_(0, system[i], per_edge)
    return grad_positions, grad_cell


def _check_inputs(positions, cell, edge_index, shifts, system):
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (n_atoms, 3), got {tuple(positions.shape)}")
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"cell must have shape (n_systems, 3, 3), got {tuple(cell.shape)}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, n_edges), got {tuple(edge_index.shape)}")
    if shifts.shape != (edge_index.shape[1], 3):
        raise ValueError(f"shifts must have shape ({edge_index.shape[1]}, 3), got {tuple(shifts.shape)}")
    if system.shape != (positions.shape[0],):
        raise ValueError(f"system must have shape ({positions.shape[0]},), got {tuple(system.shape)}")
    if cell.dtype != positions.dtype:
        raise TypeError(f"cell has dtype {cell.dtype} but positions have {positions.dtype}")
    for name, value in (("edge_index", edge_index), ("shifts", shifts), ("system", system)):
        if value.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {value.dtype}")
    for name, value in (("cell", cell), ("edge_index", edge_index), ("shifts", shifts), ("system", system)):
        if value.device != positions.device:
            raise ValueError(f"{name} is on {value.device} but positions are on {positions.device}")


def edge_vectors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    edge_index: torch.Tensor,
    shifts: torch.Tensor,
    system: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge vectors and their lengths, differentiable to any order in ``positions`` and ``cell``.

    Args:
        positions: (n_atoms, 3) float32/float64, Å.
        cell: (n_systems, 3, 3), same dtype, rows are lattice vectors in Å.
        edge_index: (2, n_edges) int64, (i, j) global atom indices.
        shifts: (n_edges, 3) int64, integer lattice shifts S_ij.
        system: (n_atoms,) int64, structure index of each atom (the cell of edge (i, j) is cell[system[i]]).

    Returns:
        vectors: (n_edges, 3), r_ij = x_j - x_i + S_ij · cell, Å.
        distances: (n_edges,), |r_ij|, Å. Zero-length edges (overlapping atoms) have undefined gradients;
        callers reject them before differentiating.

    Uses the compiled kernel of the tensors' device when built, else the reference with one warning.
    """
    _check_inputs(positions, cell, edge_index, shifts, system)
    if compiled_op("edge_vectors", positions.device):
        return torch.ops.gdeq_ext.edge_vectors(positions, cell, edge_index, shifts, system)
    warn_fallback("edge_vectors")
    return edge_vectors_reference(positions, cell, edge_index, shifts, system)


def edge_vectors_scatter(
    grad_vectors: torch.Tensor,
    edge_index: torch.Tensor,
    shifts: torch.Tensor,
    system: torch.Tensor,
    n_atoms: int,
    n_systems: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adjoint of the edge-vector gather: per-edge vectors (n_edges, 3) summed into atoms and cells.

    Returns ``grad_positions`` (n_atoms, 3) with ``+g`` at j and ``-g`` at i, and ``grad_cell``
    (n_systems, 3, 3) with ``S_ij ⊗ g`` summed over the edges of each structure.
    """
    if compiled_op("edge_vectors_backward", grad_vectors.device):
        return torch.ops.gdeq_ext.edge_vectors_backward(grad_vectors, edge_index, shifts, system, n_atoms, n_systems)
    warn_fallback("edge_vectors_backward")
    return _scatter_reference(grad_vectors, edge_index, shifts, system, n_atoms, n_systems)


# ---------------------------------------------------------------------------------------------- registration
if HAVE_EXTENSION:

    @torch.library.register_fake("gdeq_ext::edge_vectors")
    def _edge_vectors_fake(positions, cell, edge_index, shifts, system):
        n_edges = edge_index.shape[1]
        return positions.new_empty(n_edges, 3), positions.new_empty(n_edges)

    @torch.library.register_fake("gdeq_ext::edge_vectors_backward")
    def _edge_vectors_backward_fake(grad_vectors, edge_index, shifts, system, n_atoms, n_systems):
        return grad_vectors.new_empty(n_atoms, 3), grad_vectors.new_empty(n_systems, 3, 3)

    def _edge_vectors_setup_context(ctx, inputs, output):
        positions, cell, edge_index, shifts, system = inputs
        vectors, distances = output
        # Only integer index tensors and the (E, 3) + (E,) outputs are kept: nothing wider than 3 per edge.
        ctx.save_for_backward(edge_index, shifts, system, vectors, distances)
        ctx.sizes = (positions.shape[0], cell.shape[0])

    def _edge_vectors_backward(ctx, grad_vectors, grad_distances):
        edge_index, shifts, system, vectors, distances = ctx.saved_tensors
        n_atoms, n_systems = ctx.sizes
        total = grad_vectors if grad_vectors is not None else torch.zeros_like(vectors)
        if grad_distances is not None:
            total = total + (grad_distances / distances).unsqueeze(1) * vectors
        grad_positions, grad_cell = torch.ops.gdeq_ext.edge_vectors_backward(
            total, edge_index, shifts, system, n_atoms, n_systems
        )
        return grad_positions, grad_cell, None, None, None

    torch.library.register_autograd(
        "gdeq_ext::edge_vectors", _edge_vectors_backward, setup_context=_edge_vectors_setup_context
    )

    def _scatter_setup_context(ctx, inputs, output):
        _, edge_index, shifts, system, n_atoms, n_systems = inputs
        ctx.save_for_backward(edge_index, shifts, system)
        ctx.sizes = (n_atoms, n_systems)

    def _scatter_backward(ctx, grad_positions, grad_cell):
        # The adjoint of the scatter is the gather: a cotangent on (positions, cell) maps to edges.
        edge_index, shifts, system = ctx.saved_tensors
        if grad_positions is None and grad_cell is None:
            return None, None, None, None, None, None
        n_atoms, n_systems = ctx.sizes
        if grad_positions is None:
            grad_positions = grad_cell.new_zeros(n_atoms, 3)
        if grad_cell is None:
            grad_cell = grad_positions.new_zeros(n_systems, 3, 3)
        vectors, _ = torch.ops.gdeq_ext.edge_vectors(grad_positions, grad_cell, edge_index, shifts, system)
        return vectors, None, None, None, None, None

    torch.library.register_autograd(
        "gdeq_ext::edge_vectors_backward", _scatter_backward, setup_context=_scatter_setup_context
    )
