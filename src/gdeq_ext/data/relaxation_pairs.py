"""Relaxation pairs: start structures with the teacher's relaxed structure, read from and written to extxyz.

One pair = a start structure (what a relaxation begins from) and the reference relaxed structure the
teacher reached from that start, atom for atom in the same order, in the same cell. Training through a
relaxation (:func:`gdeq_ext.train.fit_relaxation`) relaxes each start with the learned potential and
compares the result with the reference (ΔQ, correct basin).

On disk (extended XYZ, through ``ase.io``), one frame per pair::

    64
    Lattice="10.86 0 0 0 10.86 0 0 0 10.86" Properties=species:S:1:pos:R:3:ref_positions:R:3 kind=vacancy pbc="T T T"
    Si   0.01  0.02  -0.01    0.00  0.00  0.00
    ...

``pos`` are the start positions and the per-atom array ``ref_positions`` (Å) the reference positions; the
cell, pbc and species are shared by construction. ``Atoms.info`` (e.g. ``kind``, ``ref_energy`` in eV) is kept.
ASE writes positions with 8 decimals, so a round trip is exact to 1e-8 Å.

A reference that comes as a separate structure (e.g. the end frame of an ASE relaxation) is checked against
its start: same number of atoms, same species in the same order, same cell and pbc. Every error names the
frame at fault (:class:`RelaxationDataError`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from ase import Atoms

from gdeq_ext.data.batch import Batch, BatchValidationError

__all__ = [
    "REFERENCE_ARRAY",
    "RelaxationDataError",
    "RelaxationPair",
    "RelaxationPairs",
    "read_relaxation_pairs",
    "write_relaxation_pairs",
]

# The per-atom extxyz column that holds the reference relaxed positions (Å).
REFERENCE_ARRAY = "ref_positions"

# Start and reference cells may differ by this much (Å per lattice-vector component): ASE's 8-decimal
# extxyz output and float32 round trips stay well below it, a different cell does not.
CELL_TOLERANCE = 1e-6


class RelaxationDataError(ValueError):
    """A relaxation pair (or the file it comes from) is malformed; the message names the frame at fault."""


def _where(frame: int | None, source: str | None) -> str:
    parts = [source] if source else []
    if frame is not None:
        parts.append(f"frame {frame}")
    return ": ".join(parts) if parts else "relaxation pair"


@dataclass
class RelaxationPair:
    """A start structure and the teacher's relaxed structure reached from it.

    Attributes:
        start: ``ase.Atoms`` with the start positions (Å), species, cell (rows = lattice vectors, Å) and pbc.
            Masses are the start's (ASE's defaults unless set).
        reference: (n_atoms, 3) float64 numpy array, the reference relaxed positions in Å, atom for atom in
            the start's order and cell.
        info: free-form metadata (e.g. ``kind``, ``ref_energy`` in eV), written to the extxyz comment line.

    Use :meth:`validate` (or :meth:`from_structures`) to check it; :class:`RelaxationPairs` validates
    every pair it is given.
    """

    start: Atoms
    reference: np.ndarray
    info: dict = field(default_factory=dict)

    @classmethod
    def from_structures(
        cls, start: Atoms, reference: Atoms, info: dict | None = None, frame: int | None = None, source=None
    ) -> RelaxationPair:
        """A pair from two ``ase.Atoms``; checks atom counts, species order, cell and pbc (names ``frame``)."""
        where = _where(frame, source)
        if not isinstance(start, Atoms) or not isinstance(reference, Atoms):
            raise RelaxationDataError(
                f"{where}: expected two ase.Atoms, got {type(start).__name__} and {type(reference).__name__}"
            )
        if len(start) != len(reference):
            raise RelaxationDataError(
                f"{where}: the start has {len(start)} atoms but the reference has {len(reference)}"
            )
        _check_species(start.numbers, reference.numbers, where)
        _check_cell(start, reference.cell.array, reference.pbc, where)
        merged = dict(reference.info)
        merged.update(start.info)
        merged.update(info or {})
        pair = cls(start.copy(), np.array(reference.positions, dtype=np.float64), merged)
        pair.start.calc = None
        pair.validate(frame, source)
        return pair

    @property
    def n_atoms(self) -> int:
        return len(self.start)

    def reference_atoms(self) -> Atoms:
        """The reference relaxed structure as ``ase.Atoms`` (same species, masses, cell and pbc as the start)."""
        atoms = self.start.copy()
        atoms.calc = None
        atoms.positions = self.reference
        return atoms

    def validate(self, frame: int | None = None, source: str | None = None) -> None:
        """Raise :class:`RelaxationDataError` naming ``frame`` if the pair is malformed.

        Checks: at least one atom; ``reference`` of shape (n_atoms, 3) with finite entries; a start that
        :class:`~gdeq_ext.data.batch.Batch` accepts (finite positions, valid right-handed cell where periodic,
        positive masses).
        """
        where = _where(frame, source)
        if not isinstance(self.start, Atoms):
            raise RelaxationDataError(f"{where}: the start must be ase.Atoms, got {type(self.start).__name__}")
        if len(self.start) == 0:
            raise RelaxationDataError(f"{where}: the start structure has no atoms")
        reference = np.asarray(self.reference)
        if reference.shape != (len(self.start), 3):
            n = reference.shape[0] if reference.ndim >= 1 else 0
            raise RelaxationDataError(
                f"{where}: the start has {len(self.start)} atoms but the reference has {n} "
                f"(reference positions of shape {reference.shape}, expected ({len(self.start)}, 3))"
            )
        bad = np.flatnonzero(~np.isfinite(reference).all(axis=1))
        if bad.size:
            raise RelaxationDataError(
                f"{where}: reference position of atom {int(bad[0])} is not finite {reference[bad[0]].tolist()} "
                f"({bad.size} such atoms)"
            )
        try:
            Batch.from_ase(self.start, dtype=torch.float64)
        except BatchValidationError as error:
            raise RelaxationDataError(f"{where}: {str(error).removeprefix('structure 0: ')}") from None


def _check_species(start_numbers, reference_numbers, where: str) -> None:
    from ase.data import chemical_symbols

    differ = np.flatnonzero(np.asarray(start_numbers) != np.asarray(reference_numbers))
    if differ.size:
        i = int(differ[0])
        a, b = int(start_numbers[i]), int(reference_numbers[i])
        raise RelaxationDataError(
            f"{where}: atom {i} is {chemical_symbols[a]} (Z={a}) in the start but {chemical_symbols[b]} (Z={b}) "
            f"in the reference ({differ.size} atoms differ; atoms must be in the same order)"
        )


def _check_cell(start: Atoms, reference_cell, reference_pbc, where: str) -> None:
    difference = float(np.abs(start.cell.array - np.asarray(reference_cell)).max())
    if difference > CELL_TOLERANCE:
        raise RelaxationDataError(
            f"{where}: the start and reference cells differ by up to {difference:.3g} Å "
            f"(start {np.round(start.cell.array, 6).tolist()}, reference {np.round(reference_cell, 6).tolist()}); "
            f"relaxation pairs must share one fixed cell"
        )
    if not np.array_equal(np.asarray(start.pbc, dtype=bool), np.asarray(reference_pbc, dtype=bool)):
        raise RelaxationDataError(
            f"{where}: pbc differ: start {np.asarray(start.pbc).tolist()}, "
            f"reference {np.asarray(reference_pbc).tolist()}"
        )


class RelaxationPairs(Sequence):
    """A validated list of :class:`RelaxationPair` (indexing, ``len``, iteration, slicing).

    Args:
        pairs: the pairs; each is validated and an error names its index as the frame.
        source: where they come from (a path), used in error messages.

    Construct with :meth:`read` (extxyz), :meth:`from_structures` (two lists of ``ase.Atoms``) or directly.
    """

    def __init__(self, pairs: Iterable[RelaxationPair], source: str | None = None):
        self.pairs = list(pairs)
        self.source = source
        for frame, pair in enumerate(self.pairs):
            if not isinstance(pair, RelaxationPair):
                raise RelaxationDataError(
                    f"{_where(frame, source)}: expected a RelaxationPair, got {type(pair).__name__}"
                )
            pair.validate(frame, source)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_structures(
        cls, starts: Sequence[Atoms], references: Sequence[Atoms], source: str | None = None
    ) -> RelaxationPairs:
        """Pairs ``starts[k]`` with ``references[k]``; both lists must have the same length (checked)."""
        starts, references = list(starts), list(references)
        if len(starts) != len(references):
            raise RelaxationDataError(
                f"{source or 'relaxation pairs'}: {len(starts)} start structures but {len(references)} references"
            )
        return cls(
            [
                RelaxationPair.from_structures(s, r, frame=k, source=source)
                for k, (s, r) in enumerate(zip(starts, references, strict=True))
            ],
            source,
        )

    @classmethod
    def read(cls, path: str | os.PathLike, references: str | os.PathLike | None = None) -> RelaxationPairs:
        """See :func:`read_relaxation_pairs`."""
        return read_relaxation_pairs(path, references)

    def write(self, path: str | os.PathLike) -> None:
        """See :func:`write_relaxation_pairs`."""
        write_relaxation_pairs(path, self)

    # ------------------------------------------------------------------ sequence
    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return RelaxationPairs(self.pairs[index], self.source)
        return self.pairs[index]

    def __iter__(self) -> Iterator[RelaxationPair]:
        return iter(self.pairs)

    def __repr__(self) -> str:
        atoms = sorted({p.n_atoms for p in self.pairs})
        return f"RelaxationPairs({len(self)} pairs, atoms per structure {atoms}, source={self.source!r})"

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the pairs in order: species, start and reference positions, cells, pbc, masses.

        Equal for the same data read again (extxyz is written with fixed decimals), different when any
        structure, position, reference or the order changes; ``info`` is not included. Checkpoints store it so
        that a resume on other data with the same number of pairs is refused.
        """
        digest = hashlib.sha256()
        for pair in self.pairs:
            start = pair.start
            for array, dtype in (
                (start.numbers, np.int64),
                (start.positions, np.float64),
                (pair.reference, np.float64),
                (start.cell.array, np.float64),
                (start.pbc, np.bool_),
                (start.get_masses(), np.float64),
            ):
                values = np.ascontiguousarray(np.asarray(array, dtype=dtype))
                digest.update(str(values.shape).encode())
                digest.update(values.tobytes())
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> RelaxationPairs:
        return RelaxationPairs([self.pairs[int(k)] for k in indices], self.source)

    # ------------------------------------------------------------------ tensors
    def batch(
        self,
        indices: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> tuple[Batch, torch.Tensor]:
        """Pack the pairs at ``indices`` (default all, in order).

        Returns:
            ``(batch, reference)``: the start structures as a :class:`Batch` (positions (n_atoms, 3) Å) and
            the reference positions (n_atoms, 3) Å in ``dtype`` on ``device``, atoms in the same order.
        """
        indices = range(len(self)) if indices is None else [int(k) for k in indices]
        chosen = [self.pairs[k] for k in indices]
        if not chosen:
            raise RelaxationDataError("cannot pack an empty selection of relaxation pairs")
        batch = Batch.from_ase([p.start for p in chosen], device=device, dtype=dtype)
        reference = torch.as_tensor(np.concatenate([p.reference for p in chosen]), dtype=dtype, device=device)
        return batch, reference


def _frames(path: str, what: str) -> list[Atoms]:
    import ase.io

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    frames = []
    iterator = ase.io.iread(path, index=":", format="extxyz")
    while True:
        try:
            atoms = next(iterator)
        except StopIteration:
            break
        except Exception as error:  # ASE raises many kinds (ValueError, IndexError, KeyError, ...) on bad input
            raise RelaxationDataError(
                f"{path}: frame {len(frames)} is not valid extended XYZ ({type(error).__name__}: {error})"
            ) from error
        frames.append(atoms)
    if not frames:
        raise RelaxationDataError(f"{path}: no frames (empty or not an extended XYZ file)")
    return frames


def read_relaxation_pairs(path: str | os.PathLike, references: str | os.PathLike | None = None) -> RelaxationPairs:
    """Read relaxation pairs from extended XYZ.

    Args:
        path: extxyz file, one frame per pair: the start positions in ``pos`` and the reference positions
            (Å) in the per-atom array ``ref_positions`` (the layout :func:`write_relaxation_pairs` writes).
        references: optional second extxyz file with the reference structures as frames, in the same order
            (then ``path`` needs no ``ref_positions``): counts, species, cell and pbc are checked per frame.

    Raises:
        FileNotFoundError: a file does not exist.
        RelaxationDataError: a frame cannot be parsed, lacks ``ref_positions``, or does not match its
            reference; the message names the file and the frame index (0-based).
    """
    path = os.fspath(path)
    starts = _frames(path, "relaxation pairs")
    if references is not None:
        references = os.fspath(references)
        refs = _frames(references, "reference structures")
        if len(refs) != len(starts):
            raise RelaxationDataError(
                f"{path} has {len(starts)} start frames but {references} has {len(refs)} reference frames"
            )
        pairs = []
        for k, (start, reference) in enumerate(zip(starts, refs, strict=True)):
            start.arrays.pop(REFERENCE_ARRAY, None)
            pairs.append(RelaxationPair.from_structures(start, reference, frame=k, source=path))
        return RelaxationPairs(pairs, path)
    pairs = []
    for k, atoms in enumerate(starts):
        if REFERENCE_ARRAY not in atoms.arrays:
            columns = ", ".join(name for name in atoms.arrays if name != "numbers")
            raise RelaxationDataError(
                f"{path}: frame {k} has no per-atom '{REFERENCE_ARRAY}' array (columns: {columns}); write pairs "
                f"with gdeq_ext.data.write_relaxation_pairs or pass the references as a second file"
            )
        reference = np.array(atoms.arrays.pop(REFERENCE_ARRAY), dtype=np.float64)
        atoms.calc = None
        pair = RelaxationPair(atoms, reference, dict(atoms.info))
        pair.validate(k, path)
        pairs.append(pair)
    return RelaxationPairs(pairs, path)


def write_relaxation_pairs(path: str | os.PathLike, pairs: Iterable[RelaxationPair]) -> None:
    """Write ``pairs`` as extended XYZ, one frame per pair (start in ``pos``, reference in ``ref_positions``).

    Each pair is validated first (errors name the frame). ``info`` values go to the comment line; the start's
    calculator results are not written.
    """
    import ase.io

    frames = []
    for k, pair in enumerate(pairs):
        pair.validate(k, os.fspath(path))
        atoms = pair.start.copy()
        atoms.calc = None
        atoms.info = dict(pair.info)
        atoms.new_array(REFERENCE_ARRAY, np.asarray(pair.reference, dtype=np.float64))
        frames.append(atoms)
    if not frames:
        raise RelaxationDataError(f"{os.fspath(path)}: no relaxation pairs to write")
    ase.io.write(os.fspath(path), frames, format="extxyz")
