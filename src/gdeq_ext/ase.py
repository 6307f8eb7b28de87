"""GDEQCalculator: any gdeq_ext potential as an ASE calculator (energy, free_energy, forces).

Import it as ``from gdeq_ext.ase import GDEQCalculator``; inside this module every ``ase`` import is
absolute, so the package name is never shadowed.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from gdeq_ext.data.batch import Batch
from gdeq_ext.potentials.base import energy_forces

__all__ = ["GDEQCalculator"]


class GDEQCalculator(Calculator):
    """An ASE calculator around a potential (``StillingerWeber``, ``MLIP`` or any Batch -> energies module).

    Args:
        potential: maps a :class:`~gdeq_ext.data.batch.Batch` to energies (n_systems,) in eV.
        dtype: computation dtype; default the potential's parameter dtype, or float64 if it has none.
        device: default the potential's parameter device, or CPU.

    ``atoms.get_potential_energy()`` (eV) and ``atoms.get_forces()`` ((n_atoms, 3) eV/Å, float64 numpy)
    equal ``energy_forces(potential, Batch.from_ase(atoms))``; ``free_energy`` equals ``energy`` (no
    electronic entropy). Works with ``ase.optimize`` (FIRE, BFGS, ...).
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(
        self,
        potential: torch.nn.Module,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.potential = potential
        tensors = [*potential.parameters(), *potential.buffers()] if isinstance(potential, torch.nn.Module) else []
        floating = [t for t in tensors if t.is_floating_point()]
        self.dtype = dtype or (floating[0].dtype if floating else torch.float64)
        if device is None:
            device = tensors[0].device if tensors else "cpu"
        self.device = torch.device(device)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        batch = Batch.from_ase(self.atoms, device=self.device, dtype=self.dtype)
        energy, forces = energy_forces(self.potential, batch)
        value = float(energy[0])
        self.results = {
            "energy": value,
            "free_energy": value,
            "forces": forces.detach().cpu().numpy().astype(np.float64),
        }
