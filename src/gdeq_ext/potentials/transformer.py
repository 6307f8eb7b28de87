"""A cell-blind Transformer potential: atoms are tokens, distances are attention biases, F = −∇E by autograd.

    h_i⁰      = embedding[species_i]                                            (n_atoms, d)
    layer:    q, k, v = split(W_qkv LN(h))                                      (n_atoms, H, d/H) each
              s_ij    = q_i·k_j / sqrt(d/H) + b(r_ij)        b: Gaussians(r) → MLP → H     (n_pairs, H)
              s_ii    = q_i·k_i / sqrt(d/H) + b_self                            (the token attends to itself)
              a_ij    = w_ij e^{s_ij} / (e^{s_ii} + Σ_k w_ik e^{s_ik}),   w_ij = f_c(r_ij / r_c)
              h      += W_o (a_ii v_i + Σ_j a_ij (v_j + W_e g(r_ij)));   h += FFN(LN(h))
    E_s       = Σ_{i ∈ s} (readout(LN(h_i)) + e0[species_i])                   (n_systems,) eV

"Cell-blind": the model never sees the cell or fractional coordinates, only the pair distances r_ij it attends
over, so it knows nothing about periodicity or symmetry beyond what those distances carry (unlike the MLIP's
angular moments or MACE's equivariant features). The distances enter twice: as the attention bias b(r_ij) and as
an additive value term W_e g(r_ij) (g: the same Gaussians). The value term is needed: with one species every token
starts equal, so a bias alone would only reweight identical values and the energy could not depend on the geometry.
Two attention ranges:

* ``attention="neighbors"`` (default): pairs of the periodic neighbor list within ``cutoff``, images included; the
  weight w_ij = f_c(r_ij / r_c) (the MLIP's C² quintic cutoff) takes a pair smoothly out of the softmax, so E, F
  and H·v are continuous when an atom crosses the cutoff, and pairs of a Verlet list beyond r_c change nothing
  (they are dropped first). The self term keeps the denominator positive for an isolated atom.
* ``attention="all"``: every other atom of the same structure, at its plain distance |x_j − x_i| (no periodic
  images: truly cell-blind), with w_ij = 1. Right for molecules and clusters; for a periodic cell the energy is
  then *not* invariant under wrapping an atom into the cell. No neighbor list is used (``cutoff`` is None); the
  Gaussians of the bias span [0, ``bias_range``].

Conservative by construction (one energy, autograd forces); every op is twice differentiable (LayerNorm, SiLU,
softmax), so Hessian-vector products and the relaxation gradients are double-backward passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.edge_vectors import edge_vectors
from gdeq_ext.potentials.base import Edges, Potential
from gdeq_ext.potentials.input_checks import check_finite, check_overlaps, check_species, species_index_table
from gdeq_ext.potentials.io import SaveLoadMixin
from gdeq_ext.potentials.radial import smoothstep_cutoff

__all__ = ["ATTENTION", "Transformer"]

ATTENTION = ("neighbors", "all")

LOAD_BOUNDS = {"d_model": (1, 4096), "heads": (1, 256), "layers": (1, 64), "ffn": (1, 16384), "n_gaussians": (1, 512)}
_DEFAULTS = {"d_model": 32, "heads": 4, "layers": 2, "ffn": 64, "n_gaussians": 16}
MAX_LOADED_PARAMETERS = 50_000_000


def gaussian_basis(distances: torch.Tensor, n: int, span: float) -> torch.Tensor:
    """(n_pairs, n) Gaussians exp(−((r − μ_k)/σ)²), μ_k evenly spaced on [0, span] Å, σ = span / n."""
    centers = torch.linspace(0.0, span, n, dtype=distances.dtype, device=distances.device)
    return torch.exp(-(((distances.unsqueeze(-1) - centers) * (n / span)) ** 2))


class AttentionBlock(nn.Module):
    """One pre-LayerNorm Transformer block whose attention runs over a pair list with a distance bias."""

    def __init__(self, d_model: int, heads: int, ffn: int, n_gaussians: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model = {d_model} must be a multiple of heads = {heads}")
        self.heads, self.head_dim = heads, d_model // heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.bias = nn.Sequential(nn.Linear(n_gaussians, 16), nn.SiLU(), nn.Linear(16, heads))
        self.self_bias = nn.Parameter(torch.zeros(heads))
        self.edge_value = nn.Linear(n_gaussians, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.SiLU(), nn.Linear(ffn, d_model))

    def forward(
        self, h: torch.Tensor, pairs: torch.Tensor, basis: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        """h (n_atoms, d); pairs (2, P) int64 (i attends to j); basis (P, n_gaussians); weight (P,) or None (= 1)."""
        n, H, dh = h.shape[0], self.heads, self.head_dim
        q, k, v = self.qkv(self.norm1(h)).view(n, 3, H, dh).unbind(1)
        i, j = pairs[0], pairs[1]
        scale = 1.0 / math.sqrt(dh)
        scores = (q[i] * k[j]).sum(-1) * scale + self.bias(basis)  # (P, H)
        own = (q * k).sum(-1) * scale + self.self_bias  # (n, H)
        # Softmax stabiliser: any per-atom constant cancels exactly in the ratio, so it is taken without a graph.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "index_reduce() is in beta": the max is all we use
            top = own.clone().index_reduce_(0, i, scores, "amax", include_self=True)
        e_pair = torch.exp(scores - top[i])
        if weight is not None:
            e_pair = e_pair * weight.unsqueeze(-1)
        e_own = torch.exp(own - top)
        denominator = e_own.index_add(0, i, e_pair)  # (n, H), >= e_own > 0
        values = v[j] + self.edge_value(basis).view(-1, H, dh)  # (P, H, dh): what j tells i, at distance r_ij
        numerator = (e_own.unsqueeze(-1) * v).index_add(0, i, e_pair.unsqueeze(-1) * values)  # (n, H, dh)
        h = h + self.out((numerator / denominator.unsqueeze(-1)).reshape(n, H * dh))
        return h + self.ffn(self.norm2(h))


class Transformer(SaveLoadMixin, Potential):
    """The cell-blind Transformer potential (module docstring): small enough to train on a CPU.

    Args:
        species: atomic numbers it accepts (default silicon only); others raise ValueError naming the atoms.
        cutoff: r_c in Å of ``attention="neighbors"`` (default 4.0, the MLIP's: diamond Si's first two shells).
        d_model: token width d (default 32). heads: attention heads H (default 4; d must be a multiple).
        layers: Transformer blocks (default 2). ffn: hidden width of each block's feed-forward (default 64).
        n_gaussians: Gaussians of the distance bias (default 16), on [0, cutoff] (or [0, ``bias_range``]).
        attention: "neighbors" (default) or "all" (every atom of the structure, no periodic images).
        bias_range: Å, span of the bias Gaussians with ``attention="all"`` (default 8.0).
        seed: initial weights (default 0; None uses the global RNG).

    Parameters follow ``.to(dtype)``; the batch must have the model's dtype. Energies (n_systems,) eV, forces eV/Å.
    """

    def __init__(
        self,
        species: Sequence[int] = (14,),
        cutoff: float = 4.0,
        d_model: int = 32,
        heads: int = 4,
        layers: int = 2,
        ffn: int = 64,
        n_gaussians: int = 16,
        attention: str = "neighbors",
        bias_range: float = 8.0,
        seed: int | None = 0,
    ):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.species = tuple(int(z) for z in species)
        self.attention = attention
        self.range = float(cutoff) if attention == "neighbors" else float(bias_range)
        # No neighbor list for "all": cutoff None also keeps the relaxations from building a Verlet list for it.
        self.cutoff = float(cutoff) if attention == "neighbors" else None
        self.config = dict(
            species=list(self.species),
            cutoff=float(cutoff),
            d_model=int(d_model),
            heads=int(heads),
            layers=int(layers),
            ffn=int(ffn),
            n_gaussians=int(n_gaussians),
            attention=attention,
            bias_range=float(bias_range),
            seed=seed,
        )
        self.n_gaussians = int(n_gaussians)
        self.register_buffer("species_table", species_index_table(self.species), persistent=False)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.embedding = nn.Embedding(len(self.species), d_model)
            self.blocks = nn.ModuleList(AttentionBlock(d_model, heads, ffn, n_gaussians) for _ in range(layers))
            self.norm = nn.LayerNorm(d_model)
            self.readout = nn.Sequential(nn.Linear(d_model, ffn), nn.SiLU(), nn.Linear(ffn, 1))
        # Per-species energy offset (eV/atom); fit_forces sets it from the data before training.
        self.reference_energy = nn.Parameter(torch.zeros(len(self.species)))

    def hyperparameters(self) -> dict:
        return dict(self.config)

    @classmethod
    def check_hyperparameters(cls, hyperparameters: dict) -> None:
        """Bounds on a stored Transformer (``Transformer.load``): sizes within :data:`LOAD_BOUNDS`, at most
        :data:`MAX_LOADED_PARAMETERS` weights, cutoff and bias_range in (0, 50] Å, a known attention."""
        known = set(_DEFAULTS) | {"species", "cutoff", "attention", "bias_range", "seed"}
        unknown = sorted(set(hyperparameters) - known)
        if unknown:
            raise ValueError(f"unknown Transformer hyperparameters {unknown}")
        sizes = {}
        for name, (low, high) in LOAD_BOUNDS.items():
            value = hyperparameters.get(name, _DEFAULTS[name])
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"Transformer hyperparameter {name} = {value!r} is outside [{low}, {high}]")
            sizes[name] = value
        for name in ("cutoff", "bias_range"):
            value = hyperparameters.get(name, 4.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 50.0:
                raise ValueError(f"Transformer hyperparameter {name} = {value!r} Å is outside (0, 50]")
        if hyperparameters.get("attention", "neighbors") not in ATTENTION:
            raise ValueError(f"Transformer hyperparameter attention = {hyperparameters['attention']!r}")
        d, f, layers = sizes["d_model"], sizes["ffn"], sizes["layers"]
        g = sizes["n_gaussians"]
        count = layers * (4 * d * d + 2 * d * f + 8 * d + g * d + 16 * (g + 1 + sizes["heads"]))
        if count > MAX_LOADED_PARAMETERS:
            raise ValueError(f"Transformer hyperparameters {sizes} give {count:.3g} weights, too many")

    @property
    def dtype(self) -> torch.dtype:
        return self.reference_energy.dtype

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    def neighbors(self, batch: Batch) -> Edges | None:
        """The full neighbor list at ``cutoff`` (``attention="neighbors"``); None with ``attention="all"``."""
        return None if self.cutoff is None else super().neighbors(batch)

    def _all_pairs(self, batch: Batch) -> torch.Tensor:
        """(2, Σ n_s (n_s − 1)) int64: every ordered pair of distinct atoms inside each structure."""
        device = batch.positions.device
        parts = []
        for start, stop in batch.ranges():
            index = torch.arange(start, stop, device=device)
            i, j = torch.meshgrid(index, index, indexing="ij")
            keep = i != j
            parts.append(torch.stack([i[keep], j[keep]]))
        return torch.cat(parts, dim=1) if parts else torch.zeros(2, 0, dtype=torch.int64, device=device)

    def atom_energies(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        """Energy of every atom (n_atoms,) in eV (their per-structure sums are :meth:`energy`)."""
        if batch.dtype != self.dtype:
            raise TypeError(
                f"the batch is {batch.dtype} but the Transformer's parameters are {self.dtype}: "
                f"use batch.to(dtype={self.dtype}) or model.to({batch.dtype})"
            )
        check_finite(batch)
        species = check_species(batch, self.species_table, self.species)
        if self.attention == "neighbors":
            edge_index, shifts = edges if edges is not None else self.neighbors(batch)
            _, distances = edge_vectors(batch.positions, batch.cell, edge_index, shifts, batch.system)
            check_overlaps(batch, edge_index, distances)
            # A Verlet list's pairs beyond r_c have weight exactly 0; dropping them keeps the softmax stabiliser (a
            # per-atom max) and the sums the same as with a fresh list, so the energy is bit-identical.
            keep = (distances.detach() < self.cutoff).nonzero().flatten()
            pairs, distances = edge_index[:, keep], distances[keep]
            weight = smoothstep_cutoff(distances / self.cutoff)
        else:
            pairs = self._all_pairs(batch)
            distances = torch.linalg.vector_norm(batch.positions[pairs[1]] - batch.positions[pairs[0]], dim=1)
            check_overlaps(batch, pairs, distances)
            weight = None
        basis = gaussian_basis(distances, self.n_gaussians, self.range)
        h = self.embedding(species)
        for block in self.blocks:
            h = block(h, pairs, basis, weight)
        return self.readout(self.norm(h)).squeeze(-1) + self.reference_energy[species]

    def energy(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        """Energy per structure (n_systems,) in eV; ``edges`` may come from a larger (Verlet) cutoff and is ignored
        with ``attention="all"``.

        Raises ValueError naming the structure and atoms for non-finite positions, unknown species and atoms closer
        than 0.1 Å; TypeError when the batch's dtype differs from the model's.
        """
        per_atom = self.atom_energies(batch, edges)
        return per_atom.new_zeros(batch.n_systems).index_add(0, batch.system, per_atom)
