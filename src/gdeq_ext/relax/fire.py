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
    compact: bool = True,
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
        compact: drop finished structures from the batch that is evaluated (default True): at the first step
            after a structure converged (or hit ``max_steps``) it leaves the evaluated batch, so the slowest
            structure no longer makes every finished one pay a force evaluation per step (a compaction costs one
            index selection and a neighbor list for the smaller batch; at most one per finished structure). Each
            structure's trajectory is its own either way (FIRE's state is per structure); only the summation
            order of forces can change, by round-off. One evaluation of the whole batch at the end gives the
            returned energies, forces and neighbor list.

    A structure in which some atom ends with no neighbour within the potential's cutoff (it flew off: its
    force is zero because nothing is near it) is not reported as converged: ``separated`` flags it and, with
    ``warn``, a RelaxationWarning says "atoms separated beyond the cutoff". (Checked when ``verlet`` is given, i.e.
    for potentials with a cutoff; a structure that started with such an atom is flagged the same way.)

    Raises:
        NonFiniteError: forces or the energy of a moving structure became NaN/inf; names the structure and step.
    """
    p = parameters or FIREParameters()
    force_fn = default_force_fn(force_fn)
    n_systems = batch.n_systems
    x = batch.positions.detach().clone()

    def evaluate(structures: Batch, positions, neighbors):
        current = structures.with_positions(positions)
        edges = edges_for(neighbors, current)
        energy, forces = force_fn(potential, current, edges, create_graph=False)
        return energy.detach(), forces.detach(), edges

    energy, forces, edges = evaluate(batch, x, verlet)
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

    # The working set: the structures still evaluated (all, until compaction), their atoms in the whole batch, and
    # the working copies of the per-structure state. The whole-batch tensors above are kept up to date.
    work, members, atoms = batch, None, None  # members / atoms None: the working set is the whole batch
    w_x, w_forces, w_velocity = x, forces, velocity
    w_dt, w_a, w_downhill, w_started, w_steps = dt, a, downhill_count, started, steps
    w_converged, w_active, w_neighbors = converged, active, verlet
    while True:
        n_active = int(w_active.sum())  # the loop's one host sync per step, as before
        if n_active == 0:
            break
        if compact and n_active < work.n_systems:
            if members is None:  # private whole-batch copies, written in place from now on (one clone, not per step)
                x, energy, forces, steps = x.clone(), energy.clone(), forces.clone(), steps.clone()
                f_max, converged = f_max.clone(), converged.clone()
            keep = w_active.nonzero().flatten()
            work, local_atoms = work.select(keep)
            members = keep if members is None else members[keep]
            atoms = local_atoms if atoms is None else atoms[local_atoms]
            w_x, w_forces, w_velocity = w_x[local_atoms], w_forces[local_atoms], w_velocity[local_atoms]
            w_dt, w_a, w_downhill, w_started = w_dt[keep], w_a[keep], w_downhill[keep], w_started[keep]
            w_steps, w_converged, w_active = w_steps[keep], w_converged[keep], w_active[keep]
            # A list of its own for the smaller batch: the caller's list stays the whole batch's.
            w_neighbors = None if verlet is None else VerletList(verlet.cutoff, verlet.skin, verlet.max_step)
        system, n_work = work.system, work.n_systems
        vf = structure_dot(w_forces, w_velocity, system, n_work)
        f2 = structure_dot(w_forces, w_forces, system, n_work)
        v2 = structure_dot(w_velocity, w_velocity, system, n_work)
        uphill = w_started & ~(vf > 0.0)
        downhill = w_started & (vf > 0.0)
        # vf > 0 implies |F| > 0, so the division is safe where it is used.
        mixed = (1.0 - per_atom(w_a, system)) * w_velocity + per_atom(w_a, system) * w_forces / per_atom(
            torch.where(downhill, f2, 1.0).sqrt(), system
        ) * per_atom(v2.sqrt(), system)
        w_velocity = torch.where(per_atom(downhill, system), mixed, w_velocity)
        w_velocity = torch.where(per_atom(uphill, system), 0.0, w_velocity)
        grow = downhill & (w_downhill > p.Nmin)
        w_dt = torch.where(grow, torch.clamp(w_dt * p.finc, max=p.dtmax), w_dt)
        w_a = torch.where(grow, w_a * p.fa, w_a)
        w_downhill = torch.where(downhill, w_downhill + 1, w_downhill)
        w_a = torch.where(uphill, torch.full_like(w_a, p.astart), w_a)
        w_dt = torch.where(uphill, w_dt * p.fdec, w_dt)
        w_downhill = torch.where(uphill, 0, w_downhill)

        w_velocity = w_velocity + per_atom(w_dt, system) * w_forces
        dr = per_atom(w_dt, system) * w_velocity
        norm = structure_dot(dr, dr, system, n_work).sqrt()
        scale = torch.where(norm > p.maxstep, p.maxstep / torch.where(norm > p.maxstep, norm, 1.0), 1.0)
        dr = torch.where(per_atom(w_active, system), dr * per_atom(scale, system), 0.0)
        w_x = w_x + dr
        w_started |= w_active
        w_steps = w_steps + w_active

        w_energy, w_forces, edges = evaluate(work, w_x, w_neighbors)
        if members is None:
            x, energy, forces, steps, moving = w_x, w_energy, w_forces, w_steps, w_active
        else:
            x[atoms], energy[members], forces[atoms], steps[members] = w_x, w_energy, w_forces, w_steps
            moving = torch.zeros_like(active)
            moving[members] = w_active
        check_finite(forces, batch, steps + step_offset, active=moving, where="FIRE relaxation", energy=energy)
        w_fmax = structure_fmax(w_forces, work)
        # A frozen structure stays converged even if a rebuilt neighbor list changes its forces by round-off.
        w_converged = w_converged | (w_active & (w_fmax < fmax))
        w_active = ~w_converged & (w_steps < max_steps)
        if members is None:
            f_max, converged = w_fmax, w_converged
        else:
            f_max[members], converged[members] = w_fmax, w_converged

    if members is not None:  # the returned energies, forces and neighbor list are the whole batch's
        energy, forces, edges = evaluate(batch, x, verlet)
        f_max = structure_fmax(forces, batch)
    separated = torch.zeros_like(converged)
    if edges is not None and verlet is not None:
        lonely = isolated_atoms(batch.with_positions(x), edges, verlet.cutoff)
        separated[batch.system[lonely]] = True
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
