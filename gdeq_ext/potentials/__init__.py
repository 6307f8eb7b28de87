"""Potentials: the common interface (and, as they land, Stillinger-Weber and the learned MLIP)."""

from gdeq_ext.potentials.base import Edges, Potential, energy_forces, hessian_vector_product

__all__ = ["Edges", "Potential", "energy_forces", "hessian_vector_product"]
