"""Data sets above the relaxations: silicon point defects, the basin judge, and teacher relaxations of many starts.

These need potentials and relaxations (labels are protocol-defined: a start's basin is where the teacher's FIRE
takes it), so they sit above ``relax`` in the layers (docs/architecture.md); ``gdeq_ext.data`` holds what they
are built from (Batch, relaxation pairs, crystal structures).
"""

from gdeq_ext.datasets.basins import (
    DEFAULT_THRESHOLD,
    DIRECT_THRESHOLD,
    BasinJudge,
    BasinVerdict,
    StructureMatch,
    judge_basins,
    label_basins,
    same_basin,
    structure_distance,
)
from gdeq_ext.datasets.relaxations import ase_relax, relax_starts
from gdeq_ext.datasets.silicon_defects import CASES, DefectDataset, make_start, silicon_defects, teacher_relax

__all__ = [
    "CASES",
    "DEFAULT_THRESHOLD",
    "DIRECT_THRESHOLD",
    "BasinJudge",
    "BasinVerdict",
    "DefectDataset",
    "StructureMatch",
    "ase_relax",
    "judge_basins",
    "label_basins",
    "make_start",
    "relax_starts",
    "same_basin",
    "silicon_defects",
    "structure_distance",
    "teacher_relax",
]
