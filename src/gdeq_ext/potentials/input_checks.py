"""Checks every potential runs on its input: finite positions, known species, no overlapping atoms.

Each check costs one reduction and one host synchronisation when the input is good; the slow path that
names the structure and atoms only runs when something is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch

__all__ = ["MIN_DISTANCE", "check_finite", "check_overlaps", "check_species", "species_index_table"]

# Below this separation (Å) two atoms are a transcription error, not physics: every potential rejects it.
MIN_DISTANCE = 0.1


def _locate(batch: Batch, atom: int) -> tuple[int, int]:
    """(structure index, atom index inside that structure) of global atom ``atom``."""
    structure = int(batch.system[atom])
    return structure, atom - int(batch.ptr[structure])


def check_finite(batch: Batch) -> None:
    """Raise ValueError naming the structure and atom when a position is NaN or infinite."""
    finite = torch.isfinite(batch.positions).all(dim=1)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten()
    structure, local = _locate(batch, int(bad[0]))
    raise ValueError(
        f"structure {structure}: atom {local} has a non-finite position "
        f"{batch.positions[int(bad[0])].tolist()} ({bad.numel()} non-finite atoms in the batch)"
    )


def species_index_table(species: Sequence[int], device=None) -> torch.Tensor:
    """(119,) int64 lookup: atomic number -> index into ``species``, -1 for an unsupported element."""
    table = torch.full((119,), -1, dtype=torch.int64, device=device)
    for index, number in enumerate(species):
        if not 0 < int(number) < 119:
            raise ValueError(f"species must be atomic numbers in 1..118, got {number}")
        table[int(number)] = index
    return table


def check_species(batch: Batch, table: torch.Tensor, species: Sequence[int]) -> torch.Tensor:
    """Species index (n_atoms,) int64 of every atom; ValueError naming the structure and atoms if unknown."""
    numbers = batch.numbers
    table = table.to(numbers.device)  # SW has no parameters: it may stay on the CPU for a GPU batch
    in_range = (numbers >= 0) & (numbers < table.shape[0])
    index = torch.where(in_range, table[numbers.clamp(0, table.shape[0] - 1)], -1)
    unknown = index < 0
    if bool(unknown.any()):
        bad = unknown.nonzero().flatten()
        structure, local = _locate(batch, int(bad[0]))
        same = bad[batch.system[bad] == structure]
        locals_ = (same - int(batch.ptr[structure])).tolist()
        raise ValueError(
            f"structure {structure}: atoms {locals_[:10]}{' ...' if len(locals_) > 10 else ''} have atomic "
            f"number(s) {sorted(set(numbers[same].tolist()))} but this potential only supports "
            f"{list(species)}"
        )
    return index


def check_overlaps(batch: Batch, edge_index: torch.Tensor, distances: torch.Tensor) -> None:
    """ValueError naming the structure and atom pair when two atoms are closer than :data:`MIN_DISTANCE`."""
    if distances.numel() == 0:
        return
    close = distances.detach() < MIN_DISTANCE
    if not bool(close.any()):
        return
    edge = int(close.nonzero()[0])
    i, j = int(edge_index[0, edge]), int(edge_index[1, edge])
    structure, local_i = _locate(batch, i)
    _, local_j = _locate(batch, j)
    what = "an image of itself" if i == j else f"atom {local_j}"
    raise ValueError(
        f"structure {structure}: atom {local_i} overlaps {what} (distance {float(distances.detach()[edge]):.4g} Å "
        f"< {MIN_DISTANCE} Å); overlapping atoms are not a physical configuration"
    )
