"""Relaxing many starts with a teacher or a model: batched FIRE for torch potentials, ASE's FIRE for calculators.

One result format for both (a dict per start: positions, energy, steps, refine_steps, converged, fmax), used by the
data sets, the basin judge, the diagnostic and the benchmarks.
"""

from __future__ import annotations

import numpy as np
import torch

from gdeq_ext.datasets.silicon_defects import teacher_relax

__all__ = ["ase_relax", "relax_starts"]


def _is_ase_calculator(obj) -> bool:
    return not isinstance(obj, torch.nn.Module) and hasattr(obj, "get_forces")


def _dtype_of(potential) -> torch.dtype:
    for p in potential.parameters():
        return p.dtype
    return torch.float64


def _device_of(potential) -> torch.device:
    for t in [*potential.parameters(), *potential.buffers()]:
        return t.device
    return torch.device("cpu")


def ase_relax(starts, calculator, fmax: float = 0.01, max_steps: int = 3000, refine_fmax: float | None = 1e-4) -> list:
    """Relax each start with ``ase.optimize.FIRE`` (ASE's defaults) and an ASE ``calculator`` (e.g. EMT, LJ).

    To fmax < ``fmax`` eV/Å, then (when ``refine_fmax``) a fresh FIRE to ``refine_fmax``, each at most
    ``max_steps`` steps. Returns per start a dict: positions, energy, steps, refine_steps, converged, fmax.
    """
    from ase.optimize import FIRE

    out = []
    for start in starts:
        atoms = start.copy()
        atoms.calc = calculator
        first = FIRE(atoms, logfile=None)
        converged = bool(first.run(fmax=fmax, steps=max_steps))
        steps, refine_steps = int(first.nsteps), 0
        if refine_fmax:
            second = FIRE(atoms, logfile=None)
            converged = bool(second.run(fmax=refine_fmax, steps=max_steps)) and converged
            refine_steps = int(second.nsteps)
        forces = atoms.get_forces()
        out.append(
            dict(
                positions=atoms.get_positions(),
                energy=float(atoms.get_potential_energy()),
                steps=steps,
                refine_steps=refine_steps,
                converged=converged,
                fmax=float(np.linalg.norm(forces, axis=1).max()),
            )
        )
    return out


def relax_starts(
    potential, starts, fmax: float = 0.01, max_steps: int = 3000, refine_fmax: float | None = None, batch_size=32
) -> list:
    """Relax ``starts`` with a torch potential (batched FIRE, ASE's defaults) or an ASE calculator.

    Same result format as :func:`ase_relax`. Torch potentials run in their parameters' dtype (float64 if none).
    """
    if _is_ase_calculator(potential):
        return ase_relax(starts, potential, fmax, max_steps, refine_fmax)
    protocol = dict(
        fmax=fmax,
        max_steps=max_steps,
        refine_fmax=refine_fmax if refine_fmax else fmax,
        refine_max_steps=max_steps if refine_fmax else 0,
        dtype=str(_dtype_of(potential)).replace("torch.", ""),
    )
    return teacher_relax(starts, potential, protocol=protocol, batch_size=batch_size)
