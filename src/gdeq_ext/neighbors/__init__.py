"""Neighbor lists and the geometry of edges (vectors and distances under periodic boundaries)."""

from gdeq_ext.neighbors.edge_vectors import edge_vectors, edge_vectors_reference
from gdeq_ext.neighbors.neighbor_list import neighbor_list
from gdeq_ext.neighbors.reference import neighbor_list_reference
from gdeq_ext.neighbors.verlet import VerletList

__all__ = ["VerletList", "edge_vectors", "edge_vectors_reference", "neighbor_list", "neighbor_list_reference"]
