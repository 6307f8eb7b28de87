"""Structures: the packed :class:`Batch` layout and, later, data sets of relaxation pairs."""

from gdeq_ext.data.batch import Batch, BatchValidationError

__all__ = ["Batch", "BatchValidationError"]
