"""Per-structure reports of a relaxation: fmax, non-finite forces, NaN (an error), unconverged (a warning)."""

from __future__ import annotations

import warnings

import torch

from gdeq_ext.data.batch import Batch

__all__ = [
    "NonFiniteError",
    "RelaxationWarning",
    "check_finite",
    "isolated_atoms",
    "structure_fmax",
    "warn_not_converged",
]


class NonFiniteError(FloatingPointError):
    """Forces (or energies) became NaN/inf during a relaxation; the message names the structure and step."""


class RelaxationWarning(RuntimeWarning):
    """Some structures stopped at the step limit without reaching the force tolerance."""


def structure_fmax(forces: torch.Tensor, batch: Batch) -> torch.Tensor:
    """fmax = max_i ||F_i|| per structure: (n_systems,) eV/Å, 0 for a structure without atoms."""
    norms = torch.linalg.vector_norm(forces.detach(), dim=1)
    out = norms.new_zeros(batch.n_systems)
    return out.scatter_reduce_(0, batch.system, norms, "amax", include_self=True)


def check_finite(
    forces: torch.Tensor,
    batch: Batch,
    step: int | torch.Tensor,
    active: torch.Tensor | None = None,
    where: str = "relaxation",
    energy: torch.Tensor | None = None,
) -> None:
    """Raise :class:`NonFiniteError` naming every structure (among ``active``) with a non-finite force or energy.

    Args:
        forces: (n_atoms, 3) eV/Å.
        step: the step at which the forces were evaluated (int, or (n_systems,) int64 per structure).
        active: (n_systems,) bool, structures to check (default all).
        energy: (n_systems,) eV, checked too when given: a NaN energy with finite forces is a broken potential,
            not a converged structure.
    """
    bad_atoms = ~torch.isfinite(forces.detach()).all(dim=1)
    bad = torch.zeros(batch.n_systems, dtype=torch.bool, device=forces.device)
    bad[batch.system[bad_atoms]] = True
    bad_energy = torch.zeros_like(bad) if energy is None else ~torch.isfinite(energy.detach())
    bad |= bad_energy
    if active is not None:
        bad &= active
    if not bool(bad.any()):
        return
    ptr = batch.ptr
    details = []
    for s in bad.nonzero().flatten().tolist():
        atoms = (bad_atoms[ptr[s] : ptr[s + 1]]).nonzero().flatten().tolist()
        at = int(step[s]) if isinstance(step, torch.Tensor) and step.dim() > 0 else int(step)
        text = f"structure {s} at step {at}"
        if atoms:
            text += f" (atoms {atoms[:8]}{'...' if len(atoms) > 8 else ''})"
        if bool(bad_energy[s]):
            text += f" (energy {float(energy[s])})"
        details.append(text)
    raise NonFiniteError(f"non-finite forces or energy in the {where}: " + "; ".join(details))


def isolated_atoms(batch: Batch, edges, cutoff: float) -> torch.Tensor:
    """(n_atoms,) bool: atoms with no neighbour closer than ``cutoff`` Å in ``edges`` (which may hold pairs up to a
    Verlet skin beyond it). Such an atom feels no force at all: a structure whose atoms flew apart is force-free
    without being relaxed."""
    i, j = edges.edge_index
    if i.numel() == 0:
        return torch.ones(batch.n_atoms, dtype=torch.bool, device=batch.device)
    x = batch.positions.detach()
    vectors = x[j] - x[i] + torch.einsum("ek,ekl->el", edges.shifts.to(x.dtype), batch.cell.detach()[batch.system[i]])
    close = torch.linalg.vector_norm(vectors, dim=1) < cutoff
    close = close.to(torch.int64)
    # Count both ends, so half lists (each pair once) are judged like full ones.
    counts = torch.zeros(batch.n_atoms, dtype=torch.int64, device=x.device)
    counts.index_add_(0, i, close).index_add_(0, j, close)
    return counts == 0


def warn_not_converged(
    converged: torch.Tensor, fmax: torch.Tensor, steps: torch.Tensor, threshold: float, what: str
) -> None:
    """Warn, naming each structure that stopped unconverged with its fmax and step count."""
    failed = (~converged).nonzero().flatten().tolist()
    if not failed:
        return
    details = ", ".join(f"structure {s}: fmax {float(fmax[s]):.4g} eV/Å after {int(steps[s])} steps" for s in failed)
    warnings.warn(
        f"{what}: {len(failed)} of {converged.numel()} structures did not reach fmax < {threshold:g} eV/Å ({details})",
        RelaxationWarning,
        stacklevel=3,
    )
