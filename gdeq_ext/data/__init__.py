"""Structures: the packed :class:`Batch` layout and, later, data sets of relaxation pairs."""

from gdeq_ext.data.batch import Batch, BatchValidationError
from gdeq_ext.data.silicon_defects import DefectDataset, silicon_defects

__all__ = ["Batch", "BatchValidationError"]
__all__ += ["DefectDataset", "silicon_defects"]
