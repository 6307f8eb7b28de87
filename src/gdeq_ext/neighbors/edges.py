"""The neighbor-list type every potential and relaxation passes around."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Edges"]


class Edges(NamedTuple):
    """A neighbor list: ``edge_index`` (2, n_edges) int64 and ``shifts`` (n_edges, 3) int64.

    It may have been built with a cutoff larger than the potential's (a Verlet skin); potentials must
    give exactly zero contribution for pairs beyond their own cutoff.
    """

    edge_index: torch.Tensor
    shifts: torch.Tensor
