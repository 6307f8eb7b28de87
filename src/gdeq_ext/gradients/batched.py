"""Per-structure reductions for vectors packed like positions: (n_atoms, 3) rows grouped by ``system``."""

from __future__ import annotations

import torch

__all__ = ["structure_dot", "structure_norm", "per_atom"]


def structure_dot(a: torch.Tensor, b: torch.Tensor, system: torch.Tensor, n_systems: int) -> torch.Tensor:
    """Σ_{atoms j of s} a_j · b_j for every structure s: (n_systems,), dtype of ``a``.

    ``a``, ``b``: (n_atoms, 3); ``system``: (n_atoms,) int64.
    """
    return a.new_zeros(n_systems).index_add_(0, system, (a * b).sum(dim=1))


def structure_norm(a: torch.Tensor, system: torch.Tensor, n_systems: int) -> torch.Tensor:
    """Euclidean norm of each structure's block of ``a`` (n_atoms, 3): (n_systems,)."""
    return structure_dot(a, a, system, n_systems).sqrt()


def per_atom(values: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
    """Broadcast per-structure scalars (n_systems,) to (n_atoms, 1) so they scale (n_atoms, 3) blocks."""
    return values[system].unsqueeze(1)
