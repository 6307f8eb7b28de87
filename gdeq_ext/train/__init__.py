"""Training: force matching to a teacher (the base potential) and the data it is fitted on."""

from gdeq_ext.train.data import (
    SW_LATTICE_CONSTANT,
    diamond_silicon,
    label,
    rattled_silicon,
    silicon_dataset,
    thermal_silicon,
)
from gdeq_ext.train.forces import FitResult, evaluate, fit_forces

__all__ = [
    "SW_LATTICE_CONSTANT",
    "FitResult",
    "diamond_silicon",
    "evaluate",
    "fit_forces",
    "label",
    "rattled_silicon",
    "silicon_dataset",
    "thermal_silicon",
]
