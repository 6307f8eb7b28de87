"""MLIP: the learned, conservative, many-body potential (design and why it can represent SW: docs/model.md).

    h_i⁰     = embedding[species_i]                                       (n_atoms, F)
    layer t: u = U_t h^t                                                  (n_atoms, C)   node, linear
             A = edge_moments(r_ij, u, W_t)                               (n_atoms, C, 10) the edge op
             B = [A0, |A1|², ‖A2‖²]                                        (n_atoms, 3C)  invariants
             h^{t+1} = h^t + MLP_t(B)                                     (n_atoms, F)
    E_s      = Σ_{i ∈ s} (readout(h_i^T) + e0[species_i])                 (n_systems,)   eV

Only :func:`edge_moments` touches edges; everything else is ordinary dense torch on node tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gdeq_ext._extension import warn_fallback
from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.edge_vectors import edge_vectors
from gdeq_ext.potentials.base import Edges, Potential
from gdeq_ext.potentials.edge_moments_op import edge_moments_fused, has_fused_kernels
from gdeq_ext.potentials.input_checks import check_finite, check_overlaps, check_species, species_index_table
from gdeq_ext.potentials.io import SaveLoadMixin
from gdeq_ext.potentials.mlip_reference import edge_moments_padded, moment_invariants

__all__ = ["BACKENDS", "MLIP", "edge_moments"]

BACKENDS = ("fused", "reference")

# What MLIP.load accepts from a file (inclusive ranges), and the most weights it builds: a corrupted or hostile
# file must not make it allocate gigabytes. Far above any model of this project (the default has 13,922 weights).
LOAD_BOUNDS = {
    "features": (1, 4096),
    "channels": (1, 4096),
    "n_radial": (1, 256),
    "n_layers": (1, 64),
    "hidden": (1, 8192),
}
MAX_LOADED_PARAMETERS = 50_000_000
_DEFAULT_SIZES = {"features": 32, "channels": 16, "n_radial": 8, "n_layers": 2, "hidden": 64}


def edge_moments(
    vectors: torch.Tensor,
    edge_index: torch.Tensor,
    u: torch.Tensor,
    weights: torch.Tensor,
    cutoff: float,
    backend: str = "fused",
) -> torch.Tensor:
    """The MLIP's edge op, (n_atoms, C, 10): the dispatch point for the fused kernels of issue #5.

    Same arguments and result as :func:`gdeq_ext.potentials.mlip_reference.edge_moments_reference`.
    ``backend="fused"`` runs the compiled kernels (:mod:`gdeq_ext.potentials.edge_moments_op`) when they are
    built for the tensors' device, and otherwise falls back, with one warning, to ``"reference"``: the
    plain-PyTorch form of the same sum, :func:`~gdeq_ext.potentials.mlip_reference.edge_moments_padded`.
    """
    if backend == "fused":
        if has_fused_kernels(vectors.device):
            return edge_moments_fused(vectors, edge_index, u, weights, cutoff)
        warn_fallback("edge_moments")
    elif backend != "reference":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return edge_moments_padded(vectors, edge_index, u, weights, cutoff)


class InteractionLayer(nn.Module):
    """One interaction: channels U (F→C, no bias), radial weights W (n_radial, C), MLP (3C→hidden→F)."""

    def __init__(self, features: int, channels: int, n_radial: int, hidden: int):
        super().__init__()
        self.channel_projection = nn.Linear(features, channels, bias=False)
        # Var[R_c] ≈ 1 per neighbour shell with the basis' magnitude (~0.1-0.3) at bonding distances.
        self.radial_weights = nn.Parameter(torch.randn(n_radial, channels) / n_radial**0.5)
        self.update = nn.Sequential(nn.Linear(3 * channels, hidden), nn.SiLU(), nn.Linear(hidden, features))

    def forward(
        self, h: torch.Tensor, vectors: torch.Tensor, edge_index: torch.Tensor, cutoff: float, backend: str = "fused"
    ):
        u = self.channel_projection(h)
        moments = edge_moments(vectors, edge_index, u, self.radial_weights, cutoff, backend)
        return h + self.update(moment_invariants(moments))


class MLIP(SaveLoadMixin, Potential):
    """A learned message-passing potential with rank-0/1/2 angular moments (conservative: F = −dE/dX).

    Args:
        species: atomic numbers it accepts (default silicon only); others raise ValueError.
        cutoff: r_c in Å (default 4.0: SW's 3.7712 Å plus 0.23 Å, so the cutoff taper sits where the
            teacher is already flat, and the second shell of diamond Si, 3.84 Å, is the last one seen).
        features: F, width of the node state h (default 32).
        channels: C, channels per moment (default 16).
        n_radial: Bessel functions in the radial filter (default 8).
        n_layers: interaction layers (default 2).
        hidden: hidden width of each update MLP and of the readout (default 64).
        seed: seed of the initial weights (default 0; None uses the global RNG).
        backend: ``"fused"`` (default: the compiled edge kernels, or the reference with one warning when
            they are not built for the device) or ``"reference"`` (plain PyTorch). Settable later
            (``model.backend = "reference"``); saved with the hyperparameters. Results agree to round-off.

    Parameters are created in torch's default dtype and follow ``.to(dtype)``; :meth:`energy` requires
    the batch in the model's dtype. Energies (n_systems,) in eV, forces in eV/Å (autograd).
    """

    def __init__(
        self,
        species: Sequence[int] = (14,),
        cutoff: float = 4.0,
        features: int = 32,
        channels: int = 16,
        n_radial: int = 8,
        n_layers: int = 2,
        hidden: int = 64,
        seed: int | None = 0,
        backend: str = "fused",
    ):
        super().__init__()
        self.species = tuple(int(z) for z in species)
        self.cutoff = float(cutoff)
        self.config = dict(
            species=list(self.species),
            cutoff=self.cutoff,
            features=int(features),
            channels=int(channels),
            n_radial=int(n_radial),
            n_layers=int(n_layers),
            hidden=int(hidden),
            seed=seed,
        )
        self.backend = backend  # validated, and kept in self.config, by the property below
        self.register_buffer("species_table", species_index_table(self.species), persistent=False)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.embedding = nn.Embedding(len(self.species), features)
            self.layers = nn.ModuleList(InteractionLayer(features, channels, n_radial, hidden) for _ in range(n_layers))
            self.readout = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # Per-species energy offset (eV/atom); fit_forces sets it from the data before training.
        self.reference_energy = nn.Parameter(torch.zeros(len(self.species)))

    def hyperparameters(self) -> dict:
        return dict(self.config)

    @classmethod
    def check_hyperparameters(cls, hyperparameters: dict) -> None:
        """Bounds on a stored MLIP (``MLIP.load``): sizes within :data:`LOAD_BOUNDS`, at most
        :data:`MAX_LOADED_PARAMETERS` weights, a finite cutoff in (0, 20] Å, 1-118 distinct atomic numbers."""
        known = {"species", "cutoff", "features", "channels", "n_radial", "n_layers", "hidden", "seed", "backend"}
        unknown = sorted(set(hyperparameters) - known)
        if unknown:
            raise ValueError(f"unknown MLIP hyperparameters {unknown}")
        sizes = {}
        for name, (low, high) in LOAD_BOUNDS.items():
            value = hyperparameters.get(name, _DEFAULT_SIZES[name])
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"MLIP hyperparameter {name} = {value!r} is outside [{low}, {high}]")
            sizes[name] = value
        species = hyperparameters.get("species", [14])
        if (
            not isinstance(species, (list, tuple))
            or not 1 <= len(species) <= 118
            or not all(isinstance(z, int) and not isinstance(z, bool) and 1 <= z <= 118 for z in species)
            or len(set(species)) != len(species)
        ):
            shown = repr(species) if len(repr(species)) < 200 else repr(species)[:200] + "..."
            raise ValueError(f"MLIP hyperparameter species = {shown} is not a list of distinct atomic numbers 1-118")
        cutoff = hyperparameters.get("cutoff", 4.0)
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0.0 < cutoff <= 20.0:
            raise ValueError(f"MLIP hyperparameter cutoff = {cutoff!r} Å is outside (0, 20]")
        seed = hyperparameters.get("seed", 0)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"MLIP hyperparameter seed = {seed!r} is not an integer or None")
        f, c, r, t, h = (sizes[k] for k in ("features", "channels", "n_radial", "n_layers", "hidden"))
        count = len(species) * (f + 1) + t * (f * c + r * c + 3 * c * h + h + h * f + f) + f * h + h + h + 1
        if count > MAX_LOADED_PARAMETERS:
            raise ValueError(
                f"MLIP hyperparameters {sizes} give {count:.3g} weights, more than {MAX_LOADED_PARAMETERS:.0e}"
            )

    @property
    def backend(self) -> str:
        """Which implementation of the edge op runs: ``"fused"`` or ``"reference"``."""
        return self.config["backend"]

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self.config["backend"] = value

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    @property
    def dtype(self) -> torch.dtype:
        return self.reference_energy.dtype

    def atom_energies(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        """Energy of every atom (n_atoms,) in eV (their per-structure sums are :meth:`energy`)."""
        if batch.dtype != self.dtype:
            raise TypeError(
                f"the batch is {batch.dtype} but the MLIP's parameters are {self.dtype}: "
                f"use batch.to(dtype={self.dtype}) or model.to({batch.dtype})"
            )
        check_finite(batch)
        species = check_species(batch, self.species_table, self.species)
        edge_index, shifts = edges if edges is not None else self.neighbors(batch)
        vectors, distances = edge_vectors(batch.positions, batch.cell, edge_index, shifts, batch.system)
        check_overlaps(batch, edge_index, distances)
        backend = self.backend
        if backend == "fused" and not has_fused_kernels(vectors.device):
            warn_fallback("edge_moments")
            backend = "reference"
        # Pairs beyond r_c contribute exactly zero (f_c ≡ 0 there). The fused kernels skip them at the cost of one
        # distance; for the padded reference, dropping them first saves work (a Verlet list has ~40 % more pairs).
        if backend == "reference":
            keep = (distances.detach() < self.cutoff).nonzero().flatten()
            edge_index, vectors = edge_index[:, keep], vectors[keep]

        h = self.embedding(species)
        for layer in self.layers:
            h = layer(h, vectors, edge_index, self.cutoff, backend)
        return self.readout(h).squeeze(-1) + self.reference_energy[species]

    def energy(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        """Energy per structure (n_systems,) in eV; ``edges`` may come from a larger (Verlet) cutoff.

        Raises ValueError naming the structure and atoms for non-finite positions, unknown species and
        atoms closer than 0.1 Å; TypeError when the batch's dtype differs from the model's.
        """
        per_atom = self.atom_energies(batch, edges)
        return per_atom.new_zeros(batch.n_systems).index_add(0, batch.system, per_atom)
