"""Rigid-body zero modes of the Hessian, projected out per structure.

The energy of any translation-invariant potential is unchanged by a rigid translation of one structure,
so its Hessian H (3N x 3N per structure, acting on Cartesian positions) has the three translations in its
null space, periodic or not. A structure with no periodic axis is also invariant under rigid rotations;
at a force-free point (F = 0) the three infinitesimal rotations are null vectors of H as well (away from
F = 0 they are not: H·(ω × x) = -(ω ×) F). Structures with one or two periodic axes keep only the
translations: a rotation about a periodic axis of a wire is also a symmetry, but we do not project it
(use the ``damping`` option of the implicit backward if a wire's solve stalls).

The projector is orthogonal in the plain Euclidean metric (mass-unweighted), because H acts on Cartesian
displacements; ``P`` is applied to the right-hand side and to every Krylov iterate.
"""

from __future__ import annotations

import torch

__all__ = ["RigidModeProjector"]


class RigidModeProjector:
    """v ↦ P v, removing per-structure translations (always) and rotations (non-periodic structures).

    Args:
        positions: (n_atoms, 3) float, Å; the point where the rotations are taken (the relaxed X*).
        system: (n_atoms,) int64 structure index of each atom.
        n_systems: number of structures.
        pbc: (n_systems, 3) bool. Rotations are projected only for structures with no periodic axis.
        rotations: project rotations of non-periodic structures (default True).
        translations: project translations (default True).

    Calling the projector on an (n_atoms, 3) tensor returns the projected (n_atoms, 3) tensor. P is
    symmetric and idempotent, so it commutes with the CG/MINRES recurrences.
    """

    def __init__(
        self,
        positions: torch.Tensor,
        system: torch.Tensor,
        n_systems: int,
        pbc: torch.Tensor,
        rotations: bool = True,
        translations: bool = True,
    ):
        self.system = system
        self.n_systems = n_systems
        self.translations = translations
        counts = torch.zeros(n_systems, dtype=positions.dtype, device=positions.device)
        counts.index_add_(0, system, torch.ones_like(system, dtype=positions.dtype))
        self._inverse_counts = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
        # (structure, atom slice, orthonormal (3 n_s, r) rotation basis) for each non-periodic structure.
        self._rotation_bases: list[tuple[int, int, torch.Tensor]] = []
        if rotations:
            self._build_rotation_bases(positions.detach(), system, pbc)

    def _build_rotation_bases(self, positions: torch.Tensor, system: torch.Tensor, pbc: torch.Tensor) -> None:
        molecular = (~pbc.any(dim=1)).nonzero().flatten().tolist()
        if not molecular:
            return
        ptr = torch.nn.functional.pad(torch.bincount(system, minlength=self.n_systems).cumsum(0), (1, 0))
        eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
        for s in molecular:
            start, stop = int(ptr[s]), int(ptr[s + 1])
            if stop - start < 2:
                continue
            centred = positions[start:stop] - positions[start:stop].mean(dim=0)
            # Generator of a rotation about axis k: x ↦ e_k × x; these have zero mean, so they are
            # already orthogonal to the translations.
            generators = torch.stack([torch.cross(eye[k].expand_as(centred), centred, dim=1) for k in range(3)])
            matrix = generators.reshape(3, -1).T  # (3 n_s, 3)
            u, singular, _ = torch.linalg.svd(matrix, full_matrices=False)
            # A linear molecule has only two independent rotations: drop the null direction.
            keep = singular > singular.max() * 1e-10
            self._rotation_bases.append((start, stop, u[:, keep]))

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        out = vectors
        if self.translations:
            sums = vectors.new_zeros(self.n_systems, 3).index_add_(0, self.system, vectors)
            out = out - (sums * self._inverse_counts.unsqueeze(1))[self.system]
        if self._rotation_bases:
            out = out.clone()
            for start, stop, basis in self._rotation_bases:
                block = out[start:stop].reshape(-1)
                out[start:stop] = (block - basis @ (basis.T @ block)).reshape(-1, 3)
        return out
