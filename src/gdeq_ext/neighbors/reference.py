"""Brute-force periodic neighbor list in plain PyTorch: the oracle for the cell-list kernels.

Every pair (i, j) of a structure is tested against every periodic image in a box that provably contains all
images within the cutoff; nothing is binned or pruned. O(N^2 x images) per structure (vectorized over images
in chunks), meant for tests and small systems, not for production.

The per-pair test is the one the kernels and the edge-vector op use, term by term in the input dtype:
``v = ((x_j - x_i) + S_0 c_0) + S_1 c_1) + S_2 c_2``, ``|v| = sqrt((v_0² + v_1²) + v_2²) < cutoff``, so a pair
is in the list exactly when the distance a potential will compute for it is below the cutoff.
"""

from __future__ import annotations

import itertools
import math

import torch

__all__ = ["neighbor_list_reference", "complete_cell", "sort_edges", "validate_structures"]

# Same threshold as Batch.validate and the kernels: |a x b| / (|a||b|) or |det| / (|a||b||c|) below this is
# a singular cell.
_DEGENERATE_CELL_RATIO = 1e-8
# Candidate (i, j, image) triples evaluated at once.
_CHUNK = 1 << 18
MAX_CANDIDATES_PER_ATOM = 1e5  # = kMaxCandidatesPerAtom in csrc/include/gdeq_ext/neighbor_list.h


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


def validate_structures(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, counts: list[int]) -> None:
    """Raise ``ValueError`` naming the first structure (and atom) the neighbor list cannot handle.

    Non-finite positions or cell entries, a zero lattice vector on a periodic axis, or linearly dependent
    periodic lattice vectors. The compiled kernels check the same things with the same messages.
    """
    for s, count in enumerate(counts):
        if count < 0:
            raise ValueError(f"gdeq_ext.neighbor_list: structure {s}: n_atoms_per_system is negative ({count})")
    if sum(counts) != positions.shape[0]:
        raise ValueError(
            f"gdeq_ext.neighbor_list: n_atoms_per_system sums to {sum(counts)} but positions has "
            f"{positions.shape[0]} rows"
        )
    start = 0
    for s, count in enumerate(counts):
        where = f"gdeq_ext.neighbor_list: structure {s}: "
        c, p = cell[s].detach().double().cpu(), pbc[s].cpu()
        if not bool(torch.isfinite(c).all()):
            raise ValueError(where + "the cell has non-finite (NaN or inf) entries")
        lengths = c.norm(dim=1)
        for axis in range(3):
            if bool(p[axis]) and float(lengths[axis]) == 0.0:
                raise ValueError(where + f"axis {axis} is periodic but its lattice vector is zero")
        rows = c[p]
        if rows.shape[0] == 2:
            ratio = float(torch.linalg.cross(rows[0], rows[1]).norm() / lengths[p].prod())
        elif rows.shape[0] == 3:
            ratio = float(torch.linalg.det(rows).abs() / lengths.prod())
        else:
            ratio = 1.0
        if not ratio >= _DEGENERATE_CELL_RATIO:
            raise ValueError(
                where + "the periodic lattice vectors are linearly dependent (singular or degenerate cell)"
            )
        bad = (~torch.isfinite(positions[start : start + count])).any(dim=1).nonzero().flatten()
        if bad.numel():
            raise ValueError(where + f"atom {int(bad[0])} has a non-finite (NaN or inf) position")
        start += count


def _empty(device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)


def _structure_pairs(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float, full: bool, structure: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    n = positions.shape[0]
    where = f"gdeq_ext.neighbor_list: structure {structure}: "
    device = positions.device
    if n == 0:
        return _empty(device)
    # Wrapping only bounds the images to try: with fractional coordinates f = o + fw (o integer on periodic
    # axes, fw in [0, 1)), the pair (i, j, S) has fractional separation fw_j - fw_i + n with n = S - o_i + o_j,
    # and |separation_k| <= |r| |b_k| (b_k: reciprocal vector k) for |r| < cutoff, so |n_k| <= cutoff |b_k| + 1.
    lattice = complete_cell(cell.double(), pbc)
    inverse = torch.linalg.inv(lattice)
    fractional = positions.double() @ inverse
    offset = torch.where(pbc, torch.floor(fractional), torch.zeros_like(fractional)).long()
    reach = [int(math.ceil(cutoff * float(inverse[:, k].norm()))) + 1 if bool(pbc[k]) else 0 for k in range(3)]
    # The kernels' pair budget (csrc/include/gdeq_ext/neighbor_list.h, kMaxCandidatesPerAtom), checked before
    # anything is allocated: each atom meets ~n (2 cutoff |b_k| + 1) images per periodic axis.
    per_atom = float(n)
    for k in range(3):
        if bool(pbc[k]):
            per_atom *= 2.0 * cutoff * float(inverse[:, k].norm()) + 1.0
    if per_atom > MAX_CANDIDATES_PER_ATOM:
        raise ValueError(
            f"{where}cell far thinner than the cutoff: up to {per_atom * n:.3g} pairs would be built (more than "
            "1e5 per atom; no physical structure needs that many), so nothing was "
            "allocated; check the cell (Å) and the cutoff"
        )
    images = torch.tensor(
        list(itertools.product(*[range(-r, r + 1) for r in reach])), dtype=torch.long, device=device
    )  # (M, 3)

    ii, jj = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
    ii, jj = ii.flatten(), jj.flatten()
    pair_offset = offset[ii] - offset[jj]  # S = n + o_i - o_j
    dx = positions[jj] - positions[ii]  # (P, 3), input dtype
    cutoff_t = torch.tensor(cutoff, dtype=positions.dtype, device=device)
    per_chunk = max(1, _CHUNK // ii.numel())
    i_all, j_all, s_all = [], [], []
    for first in range(0, images.shape[0], per_chunk):
        shift = pair_offset[:, None, :] + images[None, first : first + per_chunk, :]  # (P, m, 3)
        s = shift.to(positions.dtype)
        # The exact test, one rounding per operation in the input dtype (no fused multiply-add).
        v = dx[:, None, :] + s[..., 0:1] * cell[0]
        v = v + s[..., 1:2] * cell[1]
        v = v + s[..., 2:3] * cell[2]
        norm2 = v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1]
        norm2 = norm2 + v[..., 2] * v[..., 2]
        keep = torch.sqrt(norm2) < cutoff_t
        keep &= ~((ii == jj)[:, None] & (shift == 0).all(dim=-1))  # the atom itself
        pair, image = keep.nonzero(as_tuple=True)
        i_all.append(ii[pair])
        j_all.append(jj[pair])
        s_all.append(shift[pair, image])
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
        positions: (n_atoms, 3) float32/float64, Å; atoms may lie anywhere (outside the cell too).
        cell: (n_systems, 3, 3), same dtype, rows are lattice vectors in Å (any rows, zero included, on
            non-periodic axes).
        pbc: (n_systems, 3) bool.
        n_atoms_per_system: (n_systems,) int64.
        cutoff: Å, finite and > 0.
        full: both (i, j) and (j, i) when True; each unordered pair once (i < j, and for self-images
            (i, i, S) the S whose first non-zero component is positive) when False.

    Returns:
        edge_index: (2, E) int64, global atom indices (i, j), sorted by i, then j, then shift.
        shifts: (E, 3) int64 so that r_ij = x_j - x_i + shifts @ cell[system[i]]. Self pairs (i, i, 0) are
        excluded, self-images (i, i, S != 0) included.

    Raises:
        ValueError: bad cutoff, or a structure with non-finite positions, a non-finite or singular cell, or a
        cell so much thinner than the cutoff that more than 1e5 pairs per atom would be built; the message
        names the structure (and atom).
    """
    cutoff = float(cutoff)
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"gdeq_ext.neighbor_list: cutoff must be positive and finite, got {cutoff}")
    counts = [int(c) for c in n_atoms_per_system.tolist()]
    validate_structures(positions, cell, pbc, counts)
    edges, shifts = [], []
    start = 0
    for s, count in enumerate(counts):
        e, sh = _structure_pairs(positions[start : start + count], cell[s], pbc[s], cutoff, full, s)
        edges.append(e + start)
        shifts.append(sh)
        start += count
    if not edges:
        return _empty(positions.device)
    return sort_edges(torch.cat(edges, dim=1), torch.cat(shifts))
