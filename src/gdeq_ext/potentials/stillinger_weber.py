"""Stillinger-Weber: the silicon teacher (docs/science.md), batched, exact with the full periodic neighbor list.

    E = Σ_{i<j} φ2(r_ij) + Σ_i Σ_{j<k; j,k≠i} φ3(r_ij, r_ik, θ_jik)
    φ2(r)  = A ε [B (σ/r)^p − (σ/r)^q] exp(σ / (r − aσ))                        (r < aσ, else 0)
    φ3     = λ ε (cos θ_jik − cos θ0)² exp(γσ / (r_ij − aσ)) exp(γσ / (r_ik − aσ))

j and k run over neighbours *with their periodic image*: in a small cell two images of one atom are two
distinct neighbours, which is why the full periodic neighbor list (not a minimum-image shortcut) is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.edge_vectors import edge_vectors
from gdeq_ext.potentials.base import Edges, Potential
from gdeq_ext.potentials.input_checks import check_finite, check_overlaps, check_species, species_index_table
from gdeq_ext.potentials.io import SaveLoadMixin

__all__ = ["SW_SILICON", "StillingerWeber", "edge_pairs"]

# Stillinger & Weber, PRB 31, 5262 (1985); ε pinned to LAMMPS' / matscipy's 2.1683 eV (docs/science.md).
SW_SILICON = dict(
    epsilon=2.1683,
    sigma=2.0951,
    a=1.80,
    lam=21.0,
    gamma=1.20,
    A=7.049556277,
    B=0.6022245584,
    p=4.0,
    q=0.0,
    cos_theta0=-1.0 / 3.0,
)


def edge_pairs(centers: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered pair of distinct edges that share their centre atom, without a loop over atoms.

    Args:
        centers: (n_edges,) int64, the centre atom i of each edge (i, j); any order.
        n_atoms: number of atoms (bins of ``centers``).

    Returns:
        ``(first, second)``: (n_pairs,) int64 edge indices with ``centers[first] == centers[second]`` and
        each unordered pair once; n_pairs = Σ_i d_i (d_i − 1) / 2 for d_i edges at atom i.
    """
    n_edges = centers.shape[0]
    device = centers.device
    order = torch.argsort(centers, stable=True)
    degree = torch.bincount(centers, minlength=n_atoms)
    start = torch.cumsum(degree, 0) - degree
    sorted_centers = centers[order]
    rank = torch.arange(n_edges, device=device) - start[sorted_centers]
    # The edge of rank r at a centre of degree d pairs with the d − r − 1 edges ranked after it.
    partners = degree[sorted_centers] - rank - 1
    first = torch.repeat_interleave(torch.arange(n_edges, device=device), partners)
    offset = torch.arange(first.shape[0], device=device) - torch.repeat_interleave(
        torch.cumsum(partners, 0) - partners, partners
    )
    second = first + 1 + offset
    return order[first], order[second]


class StillingerWeber(SaveLoadMixin, Potential):
    """The Stillinger-Weber potential (silicon parameters by default), for any batch of structures.

    Args (defaults: :data:`SW_SILICON`): ``epsilon`` (eV), ``sigma`` (Å), ``a`` (cutoff aσ = 3.77118 Å),
    ``lam``, ``gamma``, ``A``, ``B``, ``p``, ``q`` (dimensionless), ``cos_theta0`` (−1/3: the tetrahedral
    angle), ``species`` (atomic numbers it accepts; default silicon only).

    Has no trainable parameters; it computes in the batch's dtype (float32 or float64) and device.
    :meth:`energy` returns (n_systems,) eV; forces and Hessian-vector products come from autograd
    (:meth:`energy_forces`, :func:`gdeq_ext.potentials.hessian_vector_product`).
    """

    def __init__(
        self,
        epsilon: float = SW_SILICON["epsilon"],
        sigma: float = SW_SILICON["sigma"],
        a: float = SW_SILICON["a"],
        lam: float = SW_SILICON["lam"],
        gamma: float = SW_SILICON["gamma"],
        A: float = SW_SILICON["A"],  # noqa: N803 (the literature's symbol)
        B: float = SW_SILICON["B"],  # noqa: N803
        p: float = SW_SILICON["p"],
        q: float = SW_SILICON["q"],
        cos_theta0: float = SW_SILICON["cos_theta0"],
        species: Sequence[int] = (14,),
    ):
        super().__init__()
        self.params = dict(
            epsilon=float(epsilon),
            sigma=float(sigma),
            a=float(a),
            lam=float(lam),
            gamma=float(gamma),
            A=float(A),
            B=float(B),
            p=float(p),
            q=float(q),
            cos_theta0=float(cos_theta0),
        )
        self.species = tuple(int(z) for z in species)
        self.cutoff = self.params["a"] * self.params["sigma"]
        self.register_buffer("species_table", species_index_table(self.species), persistent=False)

    def hyperparameters(self) -> dict:
        return {**self.params, "species": list(self.species)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.params.items()) + f", species={self.species}"

    def energy(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        """Energy per structure (n_systems,) in eV, in the batch's dtype.

        ``edges`` (optional) may come from a list with a larger cutoff (Verlet skin): pairs beyond aσ
        contribute exactly zero. Raises ValueError naming the structure and atoms for non-finite
        positions, atoms other than ``species`` and atoms closer than 0.1 Å.
        """
        check_finite(batch)
        check_species(batch, self.species_table, self.species)
        edge_index, shifts = edges if edges is not None else self.neighbors(batch)
        vectors, distances = edge_vectors(batch.positions, batch.cell, edge_index, shifts, batch.system)
        check_overlaps(batch, edge_index, distances)

        # Both terms and every derivative vanish at aσ (exp(−∞)), so dropping the pairs beyond it is exact.
        keep = (distances.detach() < self.cutoff).nonzero().flatten()
        centers = edge_index[0, keep]
        vectors, r = vectors[keep], distances[keep]
        prm = self.params
        sigma, rc = prm["sigma"], self.cutoff
        inv = 1.0 / (r - rc)  # < 0 for every kept pair

        s_over_r = sigma / r
        pair = prm["A"] * prm["epsilon"] * (prm["B"] * s_over_r ** prm["p"] - s_over_r ** prm["q"])
        pair = pair * torch.exp(sigma * inv)
        system_of_edge = batch.system[centers]
        energy = pair.new_zeros(batch.n_systems).index_add(0, system_of_edge, 0.5 * pair)

        first, second = edge_pairs(centers, batch.n_atoms)
        radial = torch.exp(prm["gamma"] * sigma * inv)
        unit = vectors / r.unsqueeze(1)
        cos = (unit[first] * unit[second]).sum(dim=1)
        three = (prm["lam"] * prm["epsilon"]) * (cos - prm["cos_theta0"]) ** 2 * radial[first] * radial[second]
        return energy.index_add(0, system_of_edge[first], three)
