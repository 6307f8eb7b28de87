"""Potentials: the common interface, the Stillinger-Weber teacher, and the backbones: the learned MLIP, MACE (an
adapter for mace-torch models, imported on first use) and a cell-blind Transformer (docs/backbones.md)."""

from gdeq_ext.potentials.base import Edges, Potential, PotentialLike, energy_forces, hessian_vector_product
from gdeq_ext.potentials.force_function import force, recomputed_forces
from gdeq_ext.potentials.io import PotentialFileError
from gdeq_ext.potentials.mace import MACEPotential, build_mace
from gdeq_ext.potentials.mlip import MLIP, edge_moments
from gdeq_ext.potentials.mlip_reference import edge_moments_padded, edge_moments_reference
from gdeq_ext.potentials.stillinger_weber import SW_SILICON, StillingerWeber
from gdeq_ext.potentials.transformer import Transformer

__all__ = [
    "MLIP",
    "MACEPotential",
    "SW_SILICON",
    "Edges",
    "Potential",
    "PotentialFileError",
    "PotentialLike",
    "StillingerWeber",
    "Transformer",
    "build_mace",
    "edge_moments",
    "edge_moments_padded",
    "edge_moments_reference",
    "energy_forces",
    "force",
    "hessian_vector_product",
    "recomputed_forces",
]
