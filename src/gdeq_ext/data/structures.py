"""Reference crystal structures built with ASE: diamond silicon at the Stillinger-Weber lattice constant."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ase import Atoms
from ase.build import bulk

__all__ = ["SW_LATTICE_CONSTANT", "diamond_silicon"]

# Ideal diamond lattice constant of SW silicon: first neighbours at 2^(1/6) σ (docs/science.md), Å.
SW_LATTICE_CONSTANT = 4.0 * 2.0 ** (1.0 / 6.0) * 2.0951 / math.sqrt(3.0)


def diamond_silicon(repeat: Sequence[int] = (2, 2, 2), a: float = SW_LATTICE_CONSTANT) -> Atoms:
    """Cubic diamond Si, 8·prod(repeat) atoms, lattice constant ``a`` in Å, periodic."""
    return bulk("Si", "diamond", a=a, cubic=True) * tuple(repeat)
