"""Force matching: fit a potential to teacher energies and forces, with a validation split and early stopping.

Loss per minibatch (eV², eV²/Å²):

    force_weight · mean_{atoms, xyz} (F − F_ref)²  +  energy_weight · mean_structures ((E − E_ref) / n_atoms)²

The reported force MAE is the mean absolute error over all Cartesian force components of the validation
structures (eV/Å); the energy MAE is per atom (eV/atom).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.potentials.base import Edges, Potential, energy_forces

__all__ = ["FitResult", "LabelledStructure", "collate", "fit_forces", "prepare", "evaluate"]


@dataclass
class LabelledStructure:
    """One training example: a single-structure Batch, its neighbor list and the teacher's labels."""

    batch: Batch
    edges: Edges | None
    energy: float  # eV
    forces: torch.Tensor  # (n_atoms, 3) eV/Å, the batch's dtype


@dataclass
class FitResult:
    """What :func:`fit_forces` returns. The model itself is trained in place (best weights restored)."""

    val_force_mae: float  # eV/Å, best epoch
    val_energy_mae: float  # eV/atom, best epoch
    best_epoch: int
    epochs_run: int
    train_time_s: float
    n_train: int
    n_val: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_force_mae, ..., lr, time_s

    def summary(self) -> str:
        return (
            f"validation force MAE {self.val_force_mae:.4f} eV/Å, energy MAE "
            f"{1000 * self.val_energy_mae:.2f} meV/atom (best epoch {self.best_epoch} of {self.epochs_run}; "
            f"{self.n_train} train / "
            f"{self.n_val} validation structures; {self.train_time_s:.1f} s)"
        )


def _labels(item, index: int):
    if isinstance(item, tuple | list) and len(item) == 3:
        atoms, energy, forces = item
        return atoms, float(energy), np.asarray(forces, dtype=np.float64)
    atoms = item
    if atoms.calc is None:
        raise ValueError(
            f"structure {index} has no teacher energy/forces: attach a calculator or use "
            f"gdeq_ext.train.data.label(structures)"
        )
    return atoms, float(atoms.get_potential_energy()), np.asarray(atoms.get_forces(), dtype=np.float64)


def prepare(model, structures: Sequence, dtype: torch.dtype, device=None) -> list[LabelledStructure]:
    """Batches, neighbor lists (built once: positions never change) and labels of every structure.

    ``structures``: ase.Atoms carrying energy and forces (e.g. from :func:`gdeq_ext.train.data.label`), or
    ``(atoms, energy eV, forces (n_atoms, 3) eV/Å)`` triples.
    """
    out = []
    for index, item in enumerate(structures):
        atoms, energy, forces = _labels(item, index)
        batch = Batch.from_ase(atoms, device=device, dtype=dtype)
        edges = model.neighbors(batch) if isinstance(model, Potential) else None
        out.append(LabelledStructure(batch, edges, energy, torch.as_tensor(forces, dtype=dtype, device=device)))
    return out


def collate(items: Sequence[LabelledStructure]) -> tuple[Batch, Edges | None, torch.Tensor, torch.Tensor]:
    """One Batch (and its edges, indices offset) with stacked labels: energies (n,), forces (n_atoms, 3)."""
    batches = [item.batch for item in items]
    batch = Batch.from_tensors(
        positions=torch.cat([b.positions for b in batches]),
        numbers=torch.cat([b.numbers for b in batches]),
        cell=torch.cat([b.cell for b in batches]),
        pbc=torch.cat([b.pbc for b in batches]),
        n_atoms_per_system=torch.cat([b.n_atoms_per_system for b in batches]),
        masses=torch.cat([b.masses for b in batches]),
        validate=False,
    )
    edges = None
    if all(item.edges is not None for item in items):
        offsets = np.cumsum([0] + [b.n_atoms for b in batches[:-1]]).tolist()
        edges = Edges(
            torch.cat([item.edges.edge_index + off for item, off in zip(items, offsets, strict=True)], dim=1),
            torch.cat([item.edges.shifts for item in items]),
        )
    energies = torch.tensor([item.energy for item in items], dtype=batch.dtype, device=batch.device)
    forces = torch.cat([item.forces for item in items])
    return batch, edges, energies, forces


def evaluate(model, items: Sequence[LabelledStructure], batch_size: int = 16) -> dict[str, float]:
    """Force MAE (eV/Å, over components), force RMSE (eV/Å) and energy MAE (eV/atom) on ``items``."""
    abs_force, sq_force, abs_energy, n_components, n_structures = 0.0, 0.0, 0.0, 0, 0
    for start in range(0, len(items), batch_size):
        batch, edges, energies, forces = collate(items[start : start + batch_size])
        predicted_energy, predicted_forces = energy_forces(model, batch, edges=edges)
        error = (predicted_forces.detach() - forces).double()
        abs_force += float(error.abs().sum())
        sq_force += float(error.pow(2).sum())
        n_components += error.numel()
        per_atom = (predicted_energy.detach() - energies).double() / batch.n_atoms_per_system
        abs_energy += float(per_atom.abs().sum())
        n_structures += batch.n_systems
    return {
        "force_mae": abs_force / max(n_components, 1),
        "force_rmse": math.sqrt(sq_force / max(n_components, 1)),
        "energy_mae": abs_energy / max(n_structures, 1),
    }


def _fit_reference_energy(model, items: Sequence[LabelledStructure]) -> None:
    """Least-squares per-species energies (eV/atom) so the network only learns what composition does not."""
    species = list(model.species)
    counts = np.zeros((len(items), len(species)))
    for row, item in enumerate(items):
        numbers = item.batch.numbers.cpu().numpy()
        for col, z in enumerate(species):
            counts[row, col] = np.count_nonzero(numbers == z)
    energies = np.array([item.energy for item in items])
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    with torch.no_grad():
        model.reference_energy.copy_(torch.as_tensor(solution, dtype=model.reference_energy.dtype))


def fit_forces(
    model: torch.nn.Module,
    structures: Sequence,
    *,
    teacher=None,
    val_fraction: float = 0.1,
    validation: Sequence | None = None,
    epochs: int = 200,
    lr: float = 3e-3,
    batch_size: int = 8,
    patience: int = 30,
    energy_weight: float = 0.1,
    force_weight: float = 1.0,
    lr_patience: int = 10,
    lr_factor: float = 0.5,
    min_lr: float = 1e-5,
    max_time_s: float | None = None,
    fit_reference_energy: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Fit ``model`` (in place) to teacher energies and forces; return validation MAEs and the history.

    Args:
        model: any potential (Batch -> energies (n_systems,) eV); trained in its own dtype and device.
        structures: labelled ase.Atoms or ``(atoms, energy, forces)`` triples (see :func:`prepare`).
        teacher: when given, ``structures`` are (re)labelled with it first (e.g. StillingerWeber()).
        val_fraction: share of ``structures`` held out for validation (default 0.1; at least one), unless
            ``validation`` gives the validation structures explicitly.
        epochs, lr, batch_size: Adam optimisation (defaults 200, 3e-3, 8 structures per step).
        patience: stop when the validation force MAE has not improved for this many epochs (default 30).
        energy_weight, force_weight: loss weights (module doc; defaults 0.1 and 1).
        lr_patience, lr_factor, min_lr: the learning rate is multiplied by ``lr_factor`` after
            ``lr_patience`` epochs without improvement, down to ``min_lr``.
        max_time_s: stop after this much wall time (checked after each epoch).
        fit_reference_energy: set the model's per-species ``reference_energy`` by least squares first.
        seed: split and shuffling (crc32-derived, reproducible).
        progress: show a tqdm progress bar over epochs with the current validation force MAE.

    The weights of the best validation epoch are restored before returning.
    """
    from tqdm.auto import tqdm

    if teacher is not None:
        from gdeq_ext.train.data import label

        structures = label([s[0] if isinstance(s, tuple | list) else s for s in structures], teacher)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    items = prepare(model, structures, dtype, device)
    generator = torch.Generator().manual_seed(seed)
    if validation is not None:
        train_items, val_items = items, prepare(model, validation, dtype, device)
    else:
        if len(items) < 2:
            raise ValueError("fit_forces needs at least two structures (one for validation)")
        order = torch.randperm(len(items), generator=generator).tolist()
        n_val = min(max(1, round(val_fraction * len(items))), len(items) - 1)
        val_items = [items[k] for k in order[:n_val]]
        train_items = [items[k] for k in order[n_val:]]
    if fit_reference_energy and hasattr(model, "reference_energy") and hasattr(model, "species"):
        _fit_reference_energy(model, train_items)

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=lr_factor, patience=lr_patience, min_lr=min_lr
    )
    best = {"force_mae": math.inf, "energy_mae": math.inf}
    best_state, best_epoch, since_best, history = None, -1, 0, []
    start_time = time.perf_counter()
    bar = tqdm(range(epochs), disable=not progress, desc="fit_forces", unit="epoch")
    epoch = -1
    for epoch in bar:
        model.train()
        permutation = torch.randperm(len(train_items), generator=generator).tolist()
        total, n_steps = 0.0, 0
        for start in range(0, len(permutation), batch_size):
            batch, edges, energies, forces = collate([train_items[k] for k in permutation[start : start + batch_size]])
            predicted_energy, predicted_forces = energy_forces(model, batch, edges=edges, create_graph=True)
            loss = force_weight * (predicted_forces - forces).pow(2).mean()
            loss = loss + energy_weight * ((predicted_energy - energies) / batch.n_atoms_per_system).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            n_steps += 1
        model.eval()
        metrics = evaluate(model, val_items)
        scheduler.step(metrics["force_mae"])
        elapsed = time.perf_counter() - start_time
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(n_steps, 1),
                **{f"val_{k}": v for k, v in metrics.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "time_s": elapsed,
            }
        )
        if metrics["force_mae"] < best["force_mae"]:
            best, best_epoch, since_best = metrics, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        bar.set_postfix(val_force_mae=f"{metrics['force_mae']:.4f}", best=f"{best['force_mae']:.4f}")
        if since_best >= patience or (max_time_s is not None and elapsed > max_time_s):
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(
        val_force_mae=best["force_mae"],
        val_energy_mae=best["energy_mae"],
        best_epoch=best_epoch,
        epochs_run=epoch + 1,
        train_time_s=time.perf_counter() - start_time,
        n_train=len(train_items),
        n_val=len(val_items),
        stopped_early=since_best >= patience,
        history=history,
    )
