"""Brute-force periodic neighbor list in plain PyTorch: the oracle for the cell-list kernels.

O(N^2 x images) per structure; meant for tests and small systems, not for production.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["neighbor_list_reference", "complete_cell", "sort_edges"]


def complete_cell(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """A full-rank (3, 3) matrix whose periodic rows are ``cell``'s and whose other rows span the rest.

    Non-periodic axes may carry a zero (or any) vector; they are replaced by an orthonormal completion so
    that fractional coordinates along the periodic axes are well defined.
    """
    cell = cell.clone()
    periodic = cell[pbc]
    if periodic.shape[0] == 3:
        return cell
    if periodic.shape[0] == 0:
        return torch.eye(3, dtype=cell.dtype, device=cell.device)
    # Orthonormal basis of the complement of the periodic span (via SVD of the periodic rows).
    _, _, vh = torch.linalg.svd(periodic, full_matrices=True)
    complement = vh[periodic.shape[0] :]
    for row, axis in zip(complement, (~pbc).nonzero().flatten().tolist(), strict=True):
        cell[axis] = row
    if torch.linalg.det(cell) < 0:  # keep the completion right-handed; the sign does not matter otherwise
        axis = int((~pbc).nonzero()[0])
        cell[axis] = -cell[axis]
    return cell


def sort_edges(edge_index: torch.Tensor, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort edges by (i, j, shift_x, shift_y, shift_z): the deterministic order of every neighbor list."""
    if edge_index.shape[1] == 0:
        return edge_index, shifts
    keys = torch.cat([edge_index.T, shifts], dim=1).cpu()
    order = torch.arange(keys.shape[0])
    for column in reversed(range(keys.shape[1])):  # stable lexicographic sort, last key first
        order = order[torch.sort(keys[order, column], stable=True).indices]
    order = order.to(edge_index.device)
    return edge_index[:, order], shifts[order]


def _structure_pairs(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float, full: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n = positions.shape[0]
    device = positions.device
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    lattice = complete_cell(cell, pbc)
    inverse = torch.linalg.inv(lattice)
    fractional = positions @ inverse
    offset = torch.where(pbc, torch.floor(fractional), torch.zeros_like(fractional))
    wrapped = positions - offset @ lattice
    # |f_k| of any vector r is at most |r| |b_k| (b_k: k-th reciprocal vector); wrapped fractional
    # differences add at most one more cell.
    reach = torch.ceil(cutoff * inverse.norm(dim=0)).long() + 1
    ranges = [range(-int(reach[k]), int(reach[k]) + 1) if bool(pbc[k]) else range(0, 1) for k in range(3)]

    i_all, j_all, s_all = [], [], []
    ii, jj = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
    ii, jj = ii.flatten(), jj.flatten()
    base = wrapped[jj] - wrapped[ii]
    for shift in itertools.product(*ranges):
        shift_t = torch.tensor(shift, dtype=positions.dtype, device=device)
        r = base + shift_t @ lattice
        keep = r.norm(dim=1) < cutoff
        if all(s == 0 for s in shift):
            keep &= ii != jj
        if not keep.any():
            continue
        i_sel, j_sel = ii[keep], jj[keep]
        true_shift = torch.tensor(shift, device=device).long() + offset[i_sel].long() - offset[j_sel].long()
        i_all.append(i_sel)
        j_all.append(j_sel)
        s_all.append(true_shift)
    if not i_all:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    i_cat, j_cat, s_cat = torch.cat(i_all), torch.cat(j_all), torch.cat(s_all)
    if not full:
        # A self-image pair (i, i, S) is the same pair as (i, i, -S): keep the one whose first
        # non-zero shift component is positive.
        first_nonzero = s_cat.gather(1, (s_cat != 0).long().argmax(dim=1, keepdim=True)).flatten()
        keep = (i_cat < j_cat) | ((i_cat == j_cat) & (first_nonzero > 0))
        i_cat, j_cat, s_cat = i_cat[keep], j_cat[keep], s_cat[keep]
    return torch.stack([i_cat, j_cat]), s_cat


def neighbor_list_reference(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    n_atoms_per_system: torch.Tensor,
    cutoff: float,
    full: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs closer than ``cutoff`` (strictly), by brute force over every needed periodic image.

    Args:
        positions: (n_atoms, 3) float, Å; atoms may lie outside the cell.
        cell: (n_systems, 3, 3) float, rows are lattice vectors in Å (zero rows allowed on non-periodic axes).
        pbc: (n_systems, 3) bool.
        n_atoms_per_system: (n_systems,) int64.
        cutoff: Å, > 0.
        full: both (i, j) and (j, i) when True; each unordered pair once when False.

    Returns:
        edge_index: (2, E) int64, global atom indices (i, j), sorted by i, then j, then shift.
        shifts: (E, 3) int64 so that r_ij = x_j - x_i + shifts @ cell[system[i]].
    """
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive and finite, got {cutoff}")
    edges, shifts = [], []
    start = 0
    for s, count in enumerate(n_atoms_per_system.tolist()):
        e, sh = _structure_pairs(positions[start : start + count], cell[s], pbc[s], float(cutoff), full)
        edges.append(e + start)
        shifts.append(sh)
        start += count
    return sort_edges(torch.cat(edges, dim=1), torch.cat(shifts))
