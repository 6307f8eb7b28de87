"""Structures: the packed :class:`Batch` layout and, later, data sets of relaxation pairs."""

from gdeq_ext.data.batch import Batch, BatchValidationError
from gdeq_ext.data.silicon_defects import DefectDataset, silicon_defects

__all__ = ["Batch", "BatchValidationError"]
__all__ += ["DefectDataset", "silicon_defects"]

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
