"""The packed batch layout shared by every op, potential and relaxation in gdeq_ext."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

__all__ = ["Batch", "BatchValidationError"]

# Below this |det| / (|a||b||c|) the periodic lattice vectors are treated as linearly dependent.
_DEGENERATE_CELL_RATIO = 1e-8


class BatchValidationError(ValueError):
    """A structure in a batch is malformed; the message names the structure index and the offending value."""


@dataclass(frozen=True)
class Batch:
    """Several atomic structures packed into flat tensors (docs/architecture.md).

    Attributes:
        positions: (n_atoms, 3) float, Cartesian positions in Å.
        numbers: (n_atoms,) int64, atomic numbers.
        masses: (n_atoms,) float (same dtype as positions), atomic masses in amu.
        system: (n_atoms,) int64, index of the structure each atom belongs to; non-decreasing
            (atoms of one structure are contiguous).
        cell: (n_systems, 3, 3) float, rows are the lattice vectors in Å (ASE's convention). A
            non-periodic axis may have a zero vector.
        pbc: (n_systems, 3) bool, periodicity of each axis.
        n_atoms_per_system: (n_systems,) int64, atoms in each structure (zero is allowed).

    All tensors live on one device; positions, masses and cell share one floating dtype.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    masses: torch.Tensor
    system: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    n_atoms_per_system: torch.Tensor

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tensors(
        cls,
        positions: torch.Tensor,
        numbers: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        n_atoms_per_system: torch.Tensor | Sequence[int],
        masses: torch.Tensor | None = None,
        validate: bool = True,
    ) -> Batch:
        """Build a batch from packed tensors; ``masses`` default to ASE's atomic masses (amu)."""
        device = positions.device
        counts = torch.as_tensor(n_atoms_per_system, device=device)
        # Checked before repeat_interleave, whose own errors ("repeats can not be negative") name nothing.
        if counts.dim() != 1:
            raise BatchValidationError(
                f"n_atoms_per_system must be 1-D (one count per structure), got shape {tuple(counts.shape)}"
            )
        if counts.is_floating_point() and not bool((counts == counts.round()).all()):
            raise BatchValidationError(f"n_atoms_per_system must be integers, got {counts.tolist()}")
        n_atoms_per_system = counts.to(torch.int64)
        _check_nonnegative(n_atoms_per_system)
        # Tensors keep their device (validate() then names a mismatch); sequences go to positions' device.
        numbers = torch.as_tensor(numbers, device=numbers.device if isinstance(numbers, torch.Tensor) else device)
        if numbers.is_floating_point():
            fractional = (numbers != numbers.round()).nonzero().flatten()
            if fractional.numel():
                raise BatchValidationError(
                    f"atom {int(fractional[0])}: atomic number {float(numbers[fractional[0]])} is not an integer"
                )
        numbers = numbers.to(torch.int64)
        if masses is None:
            from ase.data import atomic_masses

            table = torch.as_tensor(atomic_masses, dtype=positions.dtype, device=device)
            if numbers.numel() and (int(numbers.min()) < 0 or int(numbers.max()) >= len(table)):
                raise BatchValidationError(f"atomic numbers must lie in [0, {len(table) - 1}]")
            masses = table[numbers]
        system = torch.repeat_interleave(torch.arange(len(n_atoms_per_system), device=device), n_atoms_per_system)
        batch = cls(
            positions=positions,
            numbers=numbers,
            masses=masses,
            system=system,
            cell=cell if isinstance(cell, torch.Tensor) else torch.as_tensor(cell, device=device),
            pbc=torch.as_tensor(pbc, dtype=torch.bool, device=pbc.device if isinstance(pbc, torch.Tensor) else device),
            n_atoms_per_system=n_atoms_per_system,
        )
        if validate:
            batch.validate()
        return batch

    @classmethod
    def from_ase(
        cls,
        atoms_list,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Batch:
        """Pack a list of ``ase.Atoms`` (or a single one). ``dtype`` defaults to ``torch.get_default_dtype()``.

        Masses come from each ``Atoms.get_masses()`` (so custom masses survive the round trip).
        """
        from ase import Atoms

        if isinstance(atoms_list, Atoms):
            atoms_list = [atoms_list]
        atoms_list = list(atoms_list)
        if not atoms_list:
            raise BatchValidationError("cannot build a Batch from an empty list of structures")
        for index, atoms in enumerate(atoms_list):
            if not isinstance(atoms, Atoms):
                raise BatchValidationError(f"structure {index}: expected ase.Atoms, got {type(atoms).__name__}")
        dtype = dtype or torch.get_default_dtype()

        def cat(arrays, shape_tail):
            arrays = [np.asarray(a, dtype=np.float64).reshape(-1, *shape_tail) for a in arrays]
            return np.concatenate(arrays) if arrays else np.zeros((0, *shape_tail))

        positions = cat([a.get_positions() for a in atoms_list], (3,))
        masses = cat([a.get_masses() for a in atoms_list], ())
        numbers = np.concatenate([a.get_atomic_numbers() for a in atoms_list]).astype(np.int64)
        cell = np.stack([np.asarray(a.get_cell()) for a in atoms_list])
        pbc = np.stack([np.asarray(a.get_pbc(), dtype=bool) for a in atoms_list])
        batch = cls.from_tensors(
            positions=torch.tensor(positions, dtype=dtype, device=device),
            numbers=torch.tensor(numbers, device=device),
            cell=torch.tensor(cell, dtype=dtype, device=device),
            pbc=torch.tensor(pbc, device=device),
            n_atoms_per_system=[len(a) for a in atoms_list],
            masses=torch.tensor(masses, dtype=dtype, device=device),
            validate=False,
        )
        batch.validate()
        return batch

    def to_ase(self) -> list:
        """Unpack into a list of ``ase.Atoms`` (positions in Å, masses in amu, cell and pbc)."""
        from ase import Atoms

        positions = self.positions.detach().cpu().double().numpy()
        numbers = self.numbers.cpu().numpy()
        masses = self.masses.detach().cpu().double().numpy()
        cell = self.cell.detach().cpu().double().numpy()
        pbc = self.pbc.cpu().numpy()
        out = []
        for s, (start, stop) in enumerate(self.ranges()):
            atoms = Atoms(numbers=numbers[start:stop], positions=positions[start:stop], cell=cell[s], pbc=pbc[s])
            atoms.set_masses(masses[start:stop])
            out.append(atoms)
        return out

    # ------------------------------------------------------------------ properties
    @property
    def n_systems(self) -> int:
        return int(self.n_atoms_per_system.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def ptr(self) -> torch.Tensor:
        """(n_systems + 1,) int64 offsets: atoms of structure s are ``ptr[s]:ptr[s + 1]``."""
        return torch.nn.functional.pad(torch.cumsum(self.n_atoms_per_system, 0), (1, 0))

    def ranges(self) -> list[tuple[int, int]]:
        ptr = self.ptr.tolist()
        return list(zip(ptr[:-1], ptr[1:], strict=True))

    # ------------------------------------------------------------------ conversion
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Move to ``device`` and/or cast the floating tensors (positions, masses, cell) to ``dtype``."""
        changes = {}
        for field in fields(self):
            value = getattr(self, field.name)
            cast = dtype if (dtype is not None and value.is_floating_point()) else None
            changes[field.name] = value.to(device=device, dtype=cast)
        return replace(self, **changes)

    def with_positions(self, positions: torch.Tensor) -> Batch:
        """The same structures with new positions (n_atoms, 3) (e.g. a relaxation step); no copy of the rest."""
        if positions.shape != self.positions.shape:
            raise BatchValidationError(
                f"positions must have shape {tuple(self.positions.shape)}, got {tuple(positions.shape)}"
            )
        return replace(self, positions=positions)

    def select(self, systems: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """The structures ``systems`` ((k,) int64, increasing) as a new batch, and the (n_atoms of those,) int64
        indices of their atoms in this batch (``positions[atoms]`` are the new batch's positions). Not validated
        again: the structures were valid here."""
        keep = torch.zeros(self.n_systems, dtype=torch.bool, device=self.device)
        keep[systems] = True
        atoms = keep[self.system].nonzero().flatten()
        counts = self.n_atoms_per_system[systems]
        system = torch.repeat_interleave(torch.arange(len(systems), device=self.device), counts)
        selected = Batch(
            positions=self.positions[atoms],
            numbers=self.numbers[atoms],
            masses=self.masses[atoms],
            system=system,
            cell=self.cell[systems],
            pbc=self.pbc[systems],
            n_atoms_per_system=counts,
        )
        return selected, atoms

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`BatchValidationError` naming the structure (and atom) at fault.

        Checks shapes, dtypes and devices; finite positions and cells; for each periodic axis a non-zero
        lattice vector; linearly independent periodic lattice vectors; a right-handed cell when all three
        vectors are given (a left-handed cell is almost always a transcription error).
        """
        n_atoms, n_systems = self.positions.shape[0], self.n_atoms_per_system.shape[0]
        if n_systems == 0:
            raise BatchValidationError("a Batch needs at least one structure")
        if self.positions.dim() != 2 or self.positions.shape[1] != 3:
            raise BatchValidationError(f"positions must have shape (n_atoms, 3), got {tuple(self.positions.shape)}")
        if not self.positions.is_floating_point():
            raise BatchValidationError(f"positions must be floating point, got {self.positions.dtype}")
        _check_nonnegative(self.n_atoms_per_system)
        if int(self.n_atoms_per_system.sum()) != n_atoms:
            raise BatchValidationError(
                f"n_atoms_per_system sums to {int(self.n_atoms_per_system.sum())} but there are {n_atoms} atoms"
            )
        expected = {
            "numbers": (n_atoms,),
            "masses": (n_atoms,),
            "system": (n_atoms,),
            "cell": (n_systems, 3, 3),
            "pbc": (n_systems, 3),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape:
                raise BatchValidationError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
            if value.device != self.positions.device:
                raise BatchValidationError(f"{name} is on {value.device} but positions are on {self.positions.device}")
        for name in ("masses", "cell"):
            if getattr(self, name).dtype != self.positions.dtype:
                raise BatchValidationError(
                    f"{name} has dtype {getattr(self, name).dtype} but positions have {self.positions.dtype}"
                )

        bad_atoms = (~torch.isfinite(self.positions)).any(dim=1).nonzero().flatten()
        if bad_atoms.numel():
            atom = int(bad_atoms[0])
            s = int(self.system[atom])
            local = atom - int(self.ptr[s])
            raise BatchValidationError(
                f"structure {s}: atom {local} has a non-finite position {self.positions[atom].tolist()} "
                f"({bad_atoms.numel()} non-finite atoms in the batch)"
            )
        # `not mass > 0` so that NaN is caught too; infinite masses would freeze the atom silently.
        bad_mass = (~((self.masses > 0) & torch.isfinite(self.masses))).nonzero().flatten()
        if bad_mass.numel():
            atom = int(bad_mass[0])
            s = int(self.system[atom])
            raise BatchValidationError(
                f"structure {s}: atom {atom - int(self.ptr[s])} has mass {float(self.masses[atom])} "
                f"(masses must be positive and finite, amu)"
            )
        self._validate_cells()

    def _validate_cells(self) -> None:
        cell = self.cell.detach().cpu().double()
        pbc = self.pbc.cpu()
        for s in range(cell.shape[0]):
            if not bool(torch.isfinite(cell[s]).all()):
                raise BatchValidationError(f"structure {s}: the cell has non-finite entries {cell[s].tolist()}")
            lengths = cell[s].norm(dim=1)
            for axis in range(3):
                if bool(pbc[s, axis]) and float(lengths[axis]) == 0.0:
                    raise BatchValidationError(f"structure {s}: axis {axis} is periodic but its lattice vector is zero")
            periodic = cell[s][pbc[s]]
            if periodic.shape[0] >= 2:
                gram = periodic @ periodic.T
                ratio = float(torch.linalg.det(gram).clamp(min=0).sqrt() / periodic.norm(dim=1).prod())
                if ratio < _DEGENERATE_CELL_RATIO:
                    raise BatchValidationError(
                        f"structure {s}: the periodic lattice vectors are linearly dependent "
                        f"(singular or degenerate cell {cell[s].tolist()})"
                    )
            if bool((lengths > 0).all()):
                det = float(torch.linalg.det(cell[s]))
                ratio = abs(det) / float(lengths.prod())
                if ratio < _DEGENERATE_CELL_RATIO and bool(pbc[s].any()):
                    raise BatchValidationError(
                        f"structure {s}: singular cell (volume {det:.3g} Å^3) {cell[s].tolist()}"
                    )
                if det < 0 and bool(pbc[s].any()):
                    raise BatchValidationError(
                        f"structure {s}: left-handed cell (determinant {det:.6g} Å^3); swapping two lattice "
                        f"vectors describes the same crystal with a right-handed cell"
                    )


def _check_nonnegative(n_atoms_per_system: torch.Tensor) -> None:
    """Name the first structure with a negative atom count (from_tensors checks before repeat_interleave)."""
    negative = (n_atoms_per_system < 0).nonzero().flatten()
    if negative.numel():
        s = int(negative[0])
        raise BatchValidationError(
            f"structure {s}: negative atom count {int(n_atoms_per_system[s])} in n_atoms_per_system"
        )
