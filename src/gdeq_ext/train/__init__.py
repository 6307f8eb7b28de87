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

from gdeq_ext.train.config import Config, ConfigError, load_config  # noqa: E402 (issue #9: training through relaxations)
from gdeq_ext.train.relaxation import (  # noqa: E402
    RelaxationFitResult,
    basin_distance,
    correct_basin,
    evaluate_relaxation,
    fit_relaxation,
)

__all__ += [
    "Config",
    "ConfigError",
    "RelaxationFitResult",
    "basin_distance",
    "correct_basin",
    "evaluate_relaxation",
    "fit_relaxation",
    "load_config",
]
