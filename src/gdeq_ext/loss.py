"""ΔQ: the mass-weighted distance between relaxed and reference structures (the training loss)."""

from __future__ import annotations

import itertools

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.reference import complete_cell

__all__ = ["delta_q", "minimum_image"]


def minimum_image(displacements: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The shortest periodic image of each atom's displacement (n_atoms, 3) Å, along periodic axes only.

    Fractional components are wrapped into [-1/2, 1/2) and then the 27 neighbouring images (restricted to
    periodic axes) are compared, so the result is the true minimum image also in skewed triclinic cells.
    The chosen lattice translation is a constant, so the result is differentiable like ``displacements``.
    """
    cell = batch.cell.detach()
    lattice = torch.stack([complete_cell(cell[s], batch.pbc[s]) for s in range(batch.n_systems)])
    inverse = torch.linalg.inv(lattice)[batch.system]  # (n_atoms, 3, 3)
    lattice = lattice[batch.system]
    periodic = batch.pbc[batch.system].to(displacements.dtype)  # (n_atoms, 3)
    with torch.no_grad():
        frac = torch.einsum("ak,akl->al", displacements.detach(), inverse)
        wrap = torch.round(frac) * periodic
        candidates = torch.tensor(
            list(itertools.product((-1, 0, 1), repeat=3)), dtype=frac.dtype, device=frac.device
        )  # (27, 3)
        shifts = wrap.unsqueeze(1) + candidates.unsqueeze(0) * periodic.unsqueeze(1)  # (n_atoms, 27, 3)
        images = torch.einsum("ack,akl->acl", frac.unsqueeze(1) - shifts, lattice)
        best = torch.linalg.vector_norm(images, dim=2).argmin(dim=1)
        shift = shifts[torch.arange(shifts.shape[0], device=frac.device), best]
    return displacements - torch.einsum("ak,akl->al", shift, lattice)


def delta_q(positions: torch.Tensor, reference: torch.Tensor | Batch, batch: Batch) -> torch.Tensor:
    """ΔQ_s = sqrt(Σ_{j in s} m_j ||d_j - t_s||²) per structure, in Å·sqrt(amu).

    d_j is the minimum-image displacement X_j - X_ref,j (periodic axes only) and t_s = Σ m_j d_j / Σ m_j
    the mass-weighted net translation of structure s, which is also the translation that minimises the
    sum, so ΔQ is the mass-weighted distance after the best rigid translation.

    Args:
        positions: (n_atoms, 3) Å, e.g. ``RelaxResult.positions`` (gradients flow through it).
        reference: (n_atoms, 3) Å or a Batch with the same atoms in the same order.
        batch: supplies masses (amu), cell, pbc and the structure index.

    Returns:
        (n_systems,) ΔQ. Its gradient is 0 (not NaN) where ΔQ = 0.
    """
    if isinstance(reference, Batch):
        reference = reference.positions
    reference = reference.to(dtype=positions.dtype, device=positions.device)
    if reference.shape != positions.shape:
        raise ValueError(f"reference has shape {tuple(reference.shape)} but positions {tuple(positions.shape)}")
    d = minimum_image(positions - reference.detach(), batch)
    masses = batch.masses.to(positions.dtype).unsqueeze(1)
    n = batch.n_systems
    total_mass = masses.new_zeros(n).index_add_(0, batch.system, masses.squeeze(1))
    moment = d.new_zeros(n, 3).index_add_(0, batch.system, masses * d)
    d = d - (moment / total_mass.clamp_min(1e-300).unsqueeze(1))[batch.system]
    squared = d.new_zeros(n).index_add_(0, batch.system, (masses * d * d).sum(dim=1))
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)
