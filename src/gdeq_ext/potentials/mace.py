"""MACEPotential: a mace-torch model (an object or a saved file) as a gdeq_ext potential.

The adapter is the glue a user otherwise writes by hand (docs/backbones.md): it builds MACE's input dictionary
from a :class:`~gdeq_ext.data.Batch` and a gdeq_ext neighbor list, and returns MACE's per-structure energy, so
forces, Hessian-vector products and every relaxation gradient come from autograd through MACE (double backward),
and the relaxations share one Verlet list (this is a :class:`~gdeq_ext.potentials.base.Potential`).

Conventions, checked by ``tests/test_backbones.py``:

* gdeq_ext's edge (i, j) with integer shift S has r_ij = x_j - x_i + S · cell[system[i]]; MACE's edge is
  (sender, receiver) = (edge_index[0], edge_index[1]) with vector x_receiver - x_sender + shifts. So gdeq's i is
  MACE's sender, j its receiver, and MACE's ``shifts`` are the Cartesian S · cell[system[i]] (Å), its
  ``unit_shifts`` the integer S. The full list holds both directions, as MACE expects.
* Pairs of a Verlet list beyond MACE's r_max are dropped before the call (MACE's polynomial envelope is exactly
  zero there, so the energy is the same; dropping them saves the edge work).
* MACE calls ``data["positions"].requires_grad_()`` on its input; the adapter hands it a fresh alias of the
  positions when they do not require grad, so the caller's tensor is never modified.

mace-torch is an optional dependency (``pip install "gdeq_ext[mace]"``), imported on first use only.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.potentials.base import Edges, Potential
from gdeq_ext.potentials.input_checks import check_finite, check_overlaps, species_index_table

__all__ = ["MACEPotential", "build_mace", "import_mace"]

INSTALL_HINT = 'pip install "gdeq_ext[mace]"'


def import_mace():
    """Import and return ``mace.modules``, with the fixes mace-torch 0.3.x needs under torch >= 2.6.

    * e3nn 0.4.4 (which mace-torch 0.3.x pins) runs ``torch.load`` on a constants file holding ``slice`` objects
      at import time; since torch 2.6 made ``weights_only=True`` the default, that import fails unless ``slice`` is
      an allowed global. Allowing it (``torch.serialization.add_safe_globals([slice])``) is harmless: a slice
      executes no code.
    * ``mace/__init__.py`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in ``os.environ``, which silently turns every
      later ``torch.load`` of the whole process that does not pass ``weights_only`` into full unpickling. The
      variable is restored to what it was before the import.

    Raises:
        ImportError: mace-torch (or e3nn) is not installed; the message says how to install it.
    """
    torch.serialization.add_safe_globals([slice])
    previous = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    try:
        with warnings.catch_warnings():
            # e3nn and mace emit FutureWarnings about torch.jit.script / torch.load at import: noise for our users.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            with contextlib.redirect_stdout(None):  # mace prints a cuequivariance notice at import
                from mace import modules
    except ImportError as error:
        raise ImportError(
            f"gdeq_ext.potentials.MACEPotential needs mace-torch (and e3nn): {INSTALL_HINT} ({error})"
        ) from error
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = previous
    return modules


@contextlib.contextmanager
def _quiet_torchscript():
    """e3nn builds its modules with torch.jit.script, which warns (FutureWarning, TorchScript UserWarnings) once per
    module: hundreds of lines that say nothing to our users. Only those two messages are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+. is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"The TorchScript type system", category=UserWarning)
        yield


def _load_model_file(path: str, map_location) -> torch.nn.Module:
    """A MACE model saved with ``torch.save(model, path)`` (mace-torch's ``*.model`` files, MACEPotential.save)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such MACE model file")
    import_mace()  # the pickled classes live in mace.modules and e3nn
    # A MACE model file is a pickled nn.Module, which only full unpickling reads: load only files you trust.
    with _quiet_torchscript():
        model = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{path} holds a {type(model).__name__}, not a MACE model (torch.nn.Module)")
    return model


class MACEPotential(Potential):
    """A mace-torch model as a gdeq_ext potential: energies (n_systems,) eV of a Batch, forces by autograd.

    Args:
        model: a mace-torch model (``mace.modules.MACE``, ``ScaleShiftMACE``, ...: any module taking MACE's input
            dictionary and returning ``{"energy": (n_graphs,) eV, ...}``, with buffers ``r_max`` (Å) and
            ``atomic_numbers``), or the path of a file saved with ``torch.save(model, path)`` (mace-torch's
            ``*.model`` files; read with full unpickling, so only trusted files).
        head: the head of a multi-head model, by name (default: the first, ``model.heads[0]``).
        map_location: where a model read from a file goes (default "cpu").

    The wrapped model is ``self.model``; its parameters are this potential's parameters (trainable through
    relaxations and by :func:`gdeq_ext.train.fit_forces`). It follows ``.to(dtype)`` and ``.to(device)``; the batch
    must have the model's dtype. ``cutoff`` is the model's r_max (Å). ``species`` are its atomic numbers and
    ``reference_energy`` (n_species,) eV/atom a view of its per-element energies E0 of ``head`` (so ``fit_forces``
    fits them by least squares, like mace-torch's ``E0s="average"``).

    Raises (from :meth:`energy`): ValueError naming the atom and its atomic number when the model has no embedding
    for an element, naming the structure and atoms for non-finite positions and atoms closer than 0.1 Å;
    TypeError when the batch's dtype differs from the model's.
    """

    def __init__(
        self,
        model: torch.nn.Module | str | os.PathLike,
        *,
        head: str | None = None,
        map_location: str | torch.device = "cpu",
    ):
        super().__init__()
        if isinstance(model, (str, os.PathLike)):
            model = _load_model_file(os.fspath(model), map_location)
        else:
            import_mace()  # a clear error when mace-torch is missing, before anything else fails
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a mace-torch model (torch.nn.Module) or a file path, got {type(model)}")
        for name in ("r_max", "atomic_numbers"):
            if not hasattr(model, name):
                raise TypeError(f"{type(model).__name__} has no {name!r}: not a mace-torch model")
        self.model = model
        self.cutoff = float(model.r_max)
        self.species = tuple(int(z) for z in model.atomic_numbers.tolist())
        heads = list(getattr(model, "heads", None) or ["Default"])
        head = heads[0] if head is None else head
        if head not in heads:
            raise ValueError(f"head {head!r} is not one of the model's heads {heads}")
        self.head, self.head_index = head, heads.index(head)
        self.register_buffer("species_table", species_index_table(self.species), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def reference_energy(self) -> torch.Tensor:
        """(n_species,) eV/atom: a view of the model's E0 of ``head`` (writing into it changes the model)."""
        energies = self.model.atomic_energies_fn.atomic_energies
        return energies if energies.dim() == 1 else energies[self.head_index]

    def _species(self, batch: Batch) -> torch.Tensor:
        numbers = batch.numbers
        table = self.species_table.to(numbers.device)
        index = torch.where((numbers > 0) & (numbers < table.shape[0]), table[numbers.clamp(0, table.shape[0] - 1)], -1)
        if bool((index < 0).any()):
            bad = (index < 0).nonzero().flatten()
            atom = int(bad[0])
            structure = int(batch.system[atom])
            raise ValueError(
                f"atom {atom} (structure {structure}, atom {atom - int(batch.ptr[structure])} inside it) has atomic "
                f"number {int(numbers[atom])}, for which the MACE model has no embedding (its atomic_numbers are "
                f"{list(self.species)}; {bad.numel()} such atoms in the batch)"
            )
        return index

    def inputs(self, batch: Batch, edges: Edges | None = None) -> dict[str, torch.Tensor]:
        """MACE's input dictionary for ``batch`` (the glue, also useful to call the model yourself).

        Keys: positions (n_atoms, 3) Å; node_attrs (n_atoms, n_species) one-hot, the batch's dtype; edge_index
        (2, n_edges) int64 (sender = gdeq's i, receiver = j); shifts (n_edges, 3) Å = S · cell[system[i]];
        unit_shifts (n_edges, 3) float; cell (n_systems, 3, 3) Å; batch (n_atoms,) int64; ptr (n_systems + 1,)
        int64; head (n_systems,) int64. Pairs of ``edges`` beyond r_max are dropped.
        """
        if batch.dtype != self.dtype:
            raise TypeError(
                f"the batch is {batch.dtype} but the MACE model's parameters are {self.dtype}: "
                f"use batch.to(dtype={self.dtype}) or potential.to({batch.dtype})"
            )
        check_finite(batch)
        species = self._species(batch)
        edge_index, shifts = edges if edges is not None else self.neighbors(batch)
        positions = batch.positions
        unit_shifts = shifts.to(positions.dtype)
        cartesian = torch.einsum("ek,ekl->el", unit_shifts, batch.cell[batch.system[edge_index[0]]])
        with torch.no_grad():
            distances = torch.linalg.vector_norm(positions[edge_index[1]] - positions[edge_index[0]] + cartesian, dim=1)
        check_overlaps(batch, edge_index, distances)
        keep = (distances < self.cutoff).nonzero().flatten()
        if keep.numel() < distances.numel():
            edge_index, unit_shifts, cartesian = edge_index[:, keep], unit_shifts[keep], cartesian[keep]
        if not positions.requires_grad:
            # MACE calls requires_grad_() on data["positions"]: give it an alias, never the caller's tensor.
            positions = positions.detach()
        n_species = len(self.species)
        return {
            "positions": positions,
            "node_attrs": torch.nn.functional.one_hot(species, n_species).to(positions.dtype),
            "edge_index": edge_index,
            "shifts": cartesian,
            "unit_shifts": unit_shifts,
            "cell": batch.cell,
            "batch": batch.system,
            "ptr": batch.ptr,
            "head": torch.full((batch.n_systems,), self.head_index, dtype=torch.int64, device=positions.device),
        }

    def energy(self, batch: Batch, edges: Edges | None = None) -> torch.Tensor:
        """Energy per structure (n_systems,) in eV (MACE's ``"energy"``, E0s included); ``edges`` may come from a
        Verlet list with a skin (default: a fresh full list at r_max)."""
        out = self.model(self.inputs(batch, edges), training=self.training, compute_force=False)
        return out["energy"]

    def save(self, path: str | os.PathLike) -> None:
        """``torch.save(self.model, path)``: mace-torch's own format, readable by ``MACEPotential(path)`` and by
        mace-torch's tools."""
        with _quiet_torchscript():
            torch.save(self.model, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu", **kwargs) -> MACEPotential:
        """``MACEPotential(path, map_location=...)``."""
        return cls(path, map_location=map_location, **kwargs)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, species={list(self.species)}, head={self.head!r}"


def build_mace(
    species: Sequence[int] = (14,),
    *,
    r_max: float = 5.0,
    hidden_irreps: str = "16x0e+16x1o",
    num_interactions: int = 2,
    max_ell: int = 2,
    correlation: int = 3,
    num_bessel: int = 8,
    num_polynomial_cutoff: int = 5,
    mlp_irreps: str = "16x0e",
    avg_num_neighbors: float = 28.0,
    radial_mlp: Sequence[int] = (64, 64, 64),
    atomic_energies: Sequence[float] | None = None,
    scale: float = 1.0,
    shift: float = 0.0,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
) -> MACEPotential:
    """A fresh, small ``ScaleShiftMACE`` (mace-torch) wrapped as a :class:`MACEPotential`.

    Args:
        species: atomic numbers with an embedding (default silicon only).
        r_max: cutoff in Å (default 5.0: diamond Si's first three shells, 2.35, 3.84 and 4.50 Å).
        hidden_irreps: e3nn irreps of the node features (default "16x0e+16x1o": small, for CPUs).
        num_interactions, max_ell, correlation: MACE's layers, spherical-harmonic order and body order
            (defaults 2, 2, 3: mace-torch's usual model, only narrower).
        num_bessel, num_polynomial_cutoff: radial basis size and envelope order p (defaults 8 and 5).
        mlp_irreps: readout MLP of the last layer (default "16x0e").
        avg_num_neighbors: MACE's message normalisation (default 28: neighbors of diamond Si within 5 Å).
        radial_mlp: hidden widths of the MLP from the radial basis to the tensor-product weights (default
            (64, 64, 64), mace-torch's; most of a small model's parameters sit here).
        atomic_energies: E0 per species in eV/atom (default zeros; ``fit_forces`` fits them).
        scale, shift: ScaleShiftMACE's per-atom interaction-energy scale (eV) and shift (default 1 and 0).
        seed: initial weights (default 0; None uses the global RNG).
        dtype: parameter dtype (default torch's default dtype).
    """
    modules = import_mace()
    import numpy as np
    from e3nn import o3

    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    species = [int(z) for z in species]
    energies = np.zeros(len(species)) if atomic_energies is None else np.asarray(atomic_energies, dtype=float)
    if energies.shape != (len(species),):
        raise ValueError(f"atomic_energies must have one entry per species {species}, got shape {energies.shape}")
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[], enabled=seed is not None), _quiet_torchscript():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            # MACE creates its buffers (r_max, E0s, the Bessel frequencies) in the default dtype.
            torch.set_default_dtype(dtype or previous)
            model = modules.ScaleShiftMACE(
                r_max=float(r_max),
                num_bessel=int(num_bessel),
                num_polynomial_cutoff=int(num_polynomial_cutoff),
                max_ell=int(max_ell),
                interaction_cls=interaction,
                interaction_cls_first=interaction,
                num_interactions=int(num_interactions),
                num_elements=len(species),
                hidden_irreps=o3.Irreps(hidden_irreps),
                MLP_irreps=o3.Irreps(mlp_irreps),
                atomic_energies=energies,
                avg_num_neighbors=float(avg_num_neighbors),
                radial_MLP=[int(w) for w in radial_mlp],
                atomic_numbers=species,
                correlation=int(correlation),
                gate=torch.nn.functional.silu,
                atomic_inter_scale=float(scale),
                atomic_inter_shift=float(shift),
            )
        finally:
            torch.set_default_dtype(previous)
    return MACEPotential(model)
