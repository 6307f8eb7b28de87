"""Structures: the packed :class:`Batch` layout, relaxation pairs (extxyz I/O) and reference crystals.

The data sets built by relaxing with a teacher (silicon point defects, basin judging) are in
:mod:`gdeq_ext.datasets`, above the relaxations.
"""

from gdeq_ext.data.batch import Batch, BatchValidationError
from gdeq_ext.data.structures import SW_LATTICE_CONSTANT, diamond_silicon

__all__ = ["SW_LATTICE_CONSTANT", "Batch", "BatchValidationError", "diamond_silicon"]

from gdeq_ext.data.relaxation_pairs import (  # noqa: E402 (issue #9: relaxation pairs)
    RelaxationDataError,
    RelaxationPair,
    RelaxationPairs,
    read_relaxation_pairs,
    write_relaxation_pairs,
)

__all__ += [
    "RelaxationDataError",
    "RelaxationPair",
    "RelaxationPairs",
    "read_relaxation_pairs",
    "write_relaxation_pairs",
]
