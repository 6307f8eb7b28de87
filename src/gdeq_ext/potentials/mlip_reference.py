"""The MLIP's one geometry-dependent edge operation, in plain PyTorch: the oracle for the fused kernel.

Per layer, every atom i collects rank-0, rank-1 and rank-2 moments of its neighbours' channel values:

    R_c(r)   = Σ_k φ_k(r) W[k, c]                          radial filter (radial.bessel_basis)
    m_ijc    = R_c(r_ij) u_jc                              message
    A_ic0    = Σ_j m_ijc                                   rank 0
    A_ic1..3 = Σ_j m_ijc r̂_ij                              rank 1 (x, y, z)
    A_ic4..9 = Σ_j m_ijc (r̂_ij r̂_ijᵀ − I/3)                 rank 2, symmetric traceless:
                                                           (xx, yy, zz, xy, xz, yz)

Two plain-PyTorch implementations of the same mathematics:

* :func:`edge_moments_reference`, the definition and test oracle: gather, multiply, ``index_add``. It
  materialises the (n_edges, C, 10) products (and autograd keeps them for backward).
* :func:`edge_moments_padded`, what the MLIP runs without compiled kernels: the edges of each atom are
  laid out in (n_atoms, max_degree) slots and the sum over neighbours is one batched matmul
  (C x K) @ (K x 10), so no (n_edges, C, 10) tensor exists in the forward or in any derivative. About
  5x faster for force training on a CPU; equal to the reference up to summation order.

Issue #5 replaces these with a C++/CUDA kernel that must match them to 1e-10 in float64.
"""

from __future__ import annotations

import torch

from gdeq_ext.potentials.radial import bessel_basis

__all__ = [
    "N_MOMENTS",
    "angular_basis",
    "edge_messages",
    "edge_moments_padded",
    "edge_moments_reference",
    "moment_invariants",
]

N_MOMENTS = 10

# ‖A2‖_F² = xx² + yy² + zz² + 2 (xy² + xz² + yz²): off-diagonal entries appear twice in the 3x3 tensor.
_RANK2_WEIGHTS = (1.0, 1.0, 1.0, 2.0, 2.0, 2.0)


def angular_basis(unit: torch.Tensor) -> torch.Tensor:
    """Y(r̂) (n_edges, 10): [1, x, y, z, x²−⅓, y²−⅓, z²−⅓, xy, xz, yz] of unit vectors (n_edges, 3)."""
    x, y, z = unit.unbind(-1)
    third = 1.0 / 3.0
    return torch.stack(
        [torch.ones_like(x), x, y, z, x * x - third, y * y - third, z * z - third, x * y, x * z, y * z],
        dim=-1,
    )


def edge_messages(
    vectors: torch.Tensor, edge_index: torch.Tensor, u: torch.Tensor, weights: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Messages m_ijc = R_c(r_ij) u_jc (n_edges, C) and angular factors Y(r̂_ij) (n_edges, 10)."""
    distances = torch.linalg.vector_norm(vectors, dim=-1)
    filters = bessel_basis(distances, weights.shape[0], cutoff) @ weights  # (E, C)
    messages = filters * u[edge_index[1]]
    return messages, angular_basis(vectors / distances.unsqueeze(-1))


def edge_moments_reference(
    vectors: torch.Tensor,
    edge_index: torch.Tensor,
    u: torch.Tensor,
    weights: torch.Tensor,
    cutoff: float,
) -> torch.Tensor:
    """Moments A (n_atoms, C, 10) of one interaction layer; differentiable in vectors, u and weights.

    Args:
        vectors: (n_edges, 3) float32/float64, r_ij = x_j − x_i + S·cell in Å, |r_ij| > 0. Edges with
            |r_ij| ≥ ``cutoff`` (e.g. from a Verlet skin) contribute exactly zero.
        edge_index: (2, n_edges) int64, row 0 the receiving atom i, row 1 the sending atom j.
        u: (n_atoms, C), channel values u_jc of every atom (same dtype as vectors).
        weights: (n_radial, C), radial filter coefficients W[k, c].
        cutoff: r_c in Å.

    Returns:
        (n_atoms, C, 10) in the units of u times 1/Å^(3/2); index 0 is A0, 1-3 A1, 4-9 A2 (see module doc).
    """
    messages, angular = edge_messages(vectors, edge_index, u, weights, cutoff)
    products = messages.unsqueeze(-1) * angular.unsqueeze(-2)  # (E, C, 10)
    out = products.new_zeros(u.shape[0], u.shape[1], N_MOMENTS)
    return out.index_add(0, edge_index[0], products)


def edge_moments_padded(
    vectors: torch.Tensor,
    edge_index: torch.Tensor,
    u: torch.Tensor,
    weights: torch.Tensor,
    cutoff: float,
) -> torch.Tensor:
    """Same arguments and result as :func:`edge_moments_reference`, as one batched matmul over atoms.

    Edge e of atom i goes to slot (i, rank of e among i's edges) of (n_atoms, K) arrays, K the largest
    degree; empty slots hold zeros. Peak extra memory is n_atoms·K·(C + 10) numbers.
    """
    n_atoms, channels = u.shape
    centers = edge_index[0]
    messages, angular = edge_messages(vectors, edge_index, u, weights, cutoff)
    degree = torch.bincount(centers, minlength=n_atoms)
    order = torch.argsort(centers, stable=True)
    start = torch.cumsum(degree, 0) - degree
    slot = torch.empty_like(centers)
    slot[order] = torch.arange(centers.shape[0], device=centers.device) - start[centers[order]]
    width = int(degree.max()) if centers.numel() else 0
    padded_messages = messages.new_zeros(n_atoms, width, channels).index_put((centers, slot), messages)
    padded_angular = angular.new_zeros(n_atoms, width, N_MOMENTS).index_put((centers, slot), angular)
    return padded_messages.transpose(1, 2) @ padded_angular


def moment_invariants(moments: torch.Tensor) -> torch.Tensor:
    """Rotation-invariant features (n_atoms, 3C): [A0_c, |A1_c|², ‖A2_c‖_F²] from moments (n_atoms, C, 10)."""
    rank2 = moments[..., 4:10].pow(2) * moments.new_tensor(_RANK2_WEIGHTS)
    return torch.cat(
        [moments[..., 0], moments[..., 1:4].pow(2).sum(-1), rank2.sum(-1)],
        dim=-1,
    )
