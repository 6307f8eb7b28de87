"""Batched FIRE with ASE's defaults, step for step the algorithm of ``ase.optimize.FIRE``.

Every structure has its own state (velocity, dt, a, count of downhill steps) and stops on its own when
fmax = max_i ||F_i|| < ``fmax`` (strict, as ASE); a stopped structure is frozen while the others go on.
ASE's order of operations is kept: forces at X, convergence check, then one step

    if not the first step:
        if F·v > 0:  v <- (1 - a) v + a |v| F/|F|;
                     after Nmin such steps: dt <- min(dt·finc, dtmax), a <- a·fa
        else:        v <- 0;  a <- astart;  dt <- dt·fdec;  count <- 0
    v <- v + dt F;   dr = dt v;   if |dr| > maxstep: dr <- maxstep dr/|dr|   (|·| over the whole structure)

with unit masses (ASE's FIRE ignores masses) and dot products over all atoms of one structure. ASE's
optional ``downhill_check`` (off by default) is not implemented. No autograd graph is kept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.batched import per_atom, structure_dot
from gdeq_ext.neighbors.verlet import VerletList
from gdeq_ext.potentials.base import Edges
from gdeq_ext.relax.checks import RelaxationWarning, check_finite, isolated_atoms, structure_fmax, warn_not_converged
from gdeq_ext.relax.forces import ForceFn, default_force_fn, edges_for

__all__ = ["FIREParameters", "FIREResult", "fire"]


@dataclass(frozen=True)
class FIREParameters:
    """ASE's FIRE defaults. dt, dtmax in ASE's time unit (Å·sqrt(amu/eV) with unit masses); maxstep in Å."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5  # noqa: N815 (ASE's name)
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    a: float = 0.1


@dataclass
class FIREResult:
    """Positions (n_atoms, 3) Å (detached), energies (n_systems,) eV, forces (n_atoms, 3) eV/Å,
    fmax (n_systems,) eV/Å, converged (n_systems,) bool, steps (n_systems,) int64, the neighbor
    list valid at the final positions (None for potentials that build their own), and separated (n_systems,)
    bool: some atom ended with no neighbour within the cutoff (reported as not converged; all False when
    the potential builds its own neighbors and the check cannot be made)."""

    positions: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor
    fmax: torch.Tensor
    converged: torch.Tensor
    steps: torch.Tensor
    edges: Edges | None
    separated: torch.Tensor | None = None


def fire(
    potential,
    batch: Batch,
    *,
    fmax: float = 0.05,
    max_steps: int = 1000,
    parameters: FIREParameters | None = None,
    verlet: VerletList | None = None,
    force_fn: ForceFn | None = None,
    step_offset: int = 0,
    warn: bool = True,
) -> FIREResult:
    """Relax every structure of ``batch`` with FIRE until fmax < ``fmax`` eV/Å or ``max_steps`` steps.

    Args:
        potential: any potential (module mapping a Batch to energies).
        batch: start positions ``batch.positions`` (n_atoms, 3) Å (used detached).
        fmax: force tolerance in eV/Å (default 0.05, ASE's).
        max_steps: step limit per structure (default 1000). Structures that hit it are reported in
            ``converged`` and, with ``warn``, by a :class:`~gdeq_ext.relax.checks.RelaxationWarning`.
        parameters: :class:`FIREParameters` (default ASE's).
        verlet: neighbor list reused across steps (rebuilt when an atom moved > skin/2), or None.
        force_fn: see :mod:`gdeq_ext.relax.forces`.
        step_offset: added to step numbers in error messages (e.g. the window length of a hybrid run).

    A structure in which some atom ends with no neighbour within the potential's cutoff (it flew off: its
    force is zero because nothing is near it) is not reported as converged: ``separated`` flags it and, with
    ``warn``, a RelaxationWarning says "atoms separated beyond the cutoff". (Checked when ``verlet`` is given, i.e.
    for potentials with a cutoff; a structure that started with such an atom is flagged the same way.)

    Raises:
        NonFiniteError: forces or the energy of a moving structure became NaN/inf; names the structure and step.
    """
    p = parameters or FIREParameters()
    force_fn = default_force_fn(force_fn)
    system, n_systems = batch.system, batch.n_systems
    x = batch.positions.detach().clone()

    def evaluate(positions):
        current = batch.with_positions(positions)
        edges = edges_for(verlet, current)
        energy, forces = force_fn(potential, current, edges, create_graph=False)
        return energy.detach(), forces.detach(), edges

    energy, forces, edges = evaluate(x)
    steps = torch.zeros(n_systems, dtype=torch.int64, device=x.device)
    check_finite(forces, batch, steps + step_offset, where="FIRE relaxation", energy=energy)
    f_max = structure_fmax(forces, batch)
    converged = f_max < fmax
    active = ~converged & (steps < max_steps)

    velocity = torch.zeros_like(x)
    dt = torch.full((n_systems,), p.dt, dtype=x.dtype, device=x.device)
    a = torch.full((n_systems,), p.a, dtype=x.dtype, device=x.device)
    downhill_count = torch.zeros(n_systems, dtype=torch.int64, device=x.device)
    started = torch.zeros(n_systems, dtype=torch.bool, device=x.device)

    while bool(active.any()):
        vf = structure_dot(forces, velocity, system, n_systems)
        f2 = structure_dot(forces, forces, system, n_systems)
        v2 = structure_dot(velocity, velocity, system, n_systems)
        uphill = started & ~(vf > 0.0)
        downhill = started & (vf > 0.0)
        # vf > 0 implies |F| > 0, so the division is safe where it is used.
        mixed = (1.0 - per_atom(a, system)) * velocity + per_atom(a, system) * forces / per_atom(
            torch.where(downhill, f2, 1.0).sqrt(), system
        ) * per_atom(v2.sqrt(), system)
        velocity = torch.where(per_atom(downhill, system), mixed, velocity)
        velocity = torch.where(per_atom(uphill, system), 0.0, velocity)
        grow = downhill & (downhill_count > p.Nmin)
        dt = torch.where(grow, torch.clamp(dt * p.finc, max=p.dtmax), dt)
        a = torch.where(grow, a * p.fa, a)
        downhill_count = torch.where(downhill, downhill_count + 1, downhill_count)
        a = torch.where(uphill, torch.full_like(a, p.astart), a)
        dt = torch.where(uphill, dt * p.fdec, dt)
        downhill_count = torch.where(uphill, 0, downhill_count)

        velocity = velocity + per_atom(dt, system) * forces
        dr = per_atom(dt, system) * velocity
        norm = structure_dot(dr, dr, system, n_systems).sqrt()
        scale = torch.where(norm > p.maxstep, p.maxstep / torch.where(norm > p.maxstep, norm, 1.0), 1.0)
        dr = torch.where(per_atom(active, system), dr * per_atom(scale, system), 0.0)
        x = x + dr
        started |= active
        steps += active

        energy, forces, edges = evaluate(x)
        check_finite(forces, batch, steps + step_offset, active=active, where="FIRE relaxation", energy=energy)
        f_max = structure_fmax(forces, batch)
        # A frozen structure stays converged even if a rebuilt neighbor list changes its forces by round-off.
        converged = converged | (active & (f_max < fmax))
        active = ~converged & (steps < max_steps)

    separated = torch.zeros_like(converged)
    if edges is not None and verlet is not None:
        lonely = isolated_atoms(batch.with_positions(x), edges, verlet.cutoff)
        separated[system[lonely]] = True
        if warn and bool(separated.any()):
            details = "; ".join(
                f"structure {s}: atoms {(lonely[a:b]).nonzero().flatten().tolist()[:8]}"
                for s, (a, b) in enumerate(batch.ranges())
                if bool(separated[s])
            )
            warnings.warn(
                f"atoms separated beyond the cutoff ({verlet.cutoff:g} Å): no neighbour left, so no force, but not "
                f"a relaxed structure; reported as not converged ({details})",
                RelaxationWarning,
                stacklevel=2,
            )
        converged = converged & ~separated
    if warn:
        warn_not_converged(converged | separated, f_max, steps + step_offset, fmax, "FIRE hit max_steps")
    return FIREResult(
        positions=x,
        energy=energy,
        forces=forces,
        fmax=f_max,
        converged=converged,
        steps=steps,
        edges=edges,
        separated=separated,
    )
