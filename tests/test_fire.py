"""Batched FIRE against ase.optimize.FIRE, per-structure freezing and reports, the capped window map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.optimize import FIRE as AseFIRE

from gdeq_ext.ase import GDEQCalculator
from gdeq_ext.neighbors import VerletList
from gdeq_ext.potentials.base import Potential
from gdeq_ext.potentials.stillinger_weber import StillingerWeber
from gdeq_ext.relax import NonFiniteError, RelaxationWarning, capped_step, fire, run_window
from gdeq_ext.testing import devices

pytestmark = pytest.mark.usefixtures("single_thread")


class NaNAfter(Potential):
    """``base`` until ``calls`` energy evaluations have happened, then NaN forces on one structure."""

    def __init__(self, base, calls, structure):
        super().__init__()
        self.base, self.calls, self.structure, self.count = base, calls, structure, 0
        self.cutoff = base.cutoff

    def energy(self, batch, edges=None):
        energy = self.base.energy(batch, edges)
        self.count += 1
        if self.count > self.calls:
            mine = (batch.system == self.structure).unsqueeze(1)
            poison = (torch.where(mine, batch.positions, 0.0).sum() * float("nan")).expand(batch.n_systems)
            energy = energy + torch.where(torch.arange(batch.n_systems) == self.structure, poison, 0.0)
        return energy


def _ase_fire(potential, atoms, fmax, steps):
    atoms = atoms.copy()
    atoms.calc = GDEQCalculator(potential)
    optimizer = AseFIRE(atoms, logfile=None)
    optimizer.run(fmax=fmax, steps=steps)
    return atoms.get_positions(), optimizer.nsteps


def test_matches_ase_fire_structure_by_structure(kit):
    sw = StillingerWeber()
    sheared = kit.make_batch([kit.diamond(shear=0.06, strain=-0.02)], rattle=0.1, seed=5)
    vacancy = kit.si_vacancy(rattle=0.1, seed=6)
    perfect = kit.make_batch([kit.diamond()])  # force-free at the start: 0 steps
    starts = [sheared.to_ase()[0], vacancy.to_ase()[0], perfect.to_ase()[0]]
    batch = type(sheared).from_ase(starts, dtype=torch.float64)

    out = fire(sw, batch, fmax=0.01, max_steps=500, verlet=VerletList(sw.cutoff, 0.5))
    assert out.converged.tolist() == [True, True, True]
    assert int(out.steps[2]) == 0
    for s, (start, stop) in enumerate(batch.ranges()):
        positions, steps = _ase_fire(sw, starts[s], 0.01, 500)
        moved = np.abs(out.positions[start:stop].numpy() - positions).max()
        assert moved < 1e-3, f"structure {s}: {moved:.2e} Å from ASE's FIRE"
        assert abs(int(out.steps[s]) - steps) <= 0.1 * steps, f"structure {s}: {int(out.steps[s])} vs {steps}"


def test_structures_relax_independently_and_converged_ones_freeze(kit, sw_like):
    a = kit.make_batch([kit.diamond(shear=0.03)], rattle=0.05, seed=1)
    b = kit.make_batch([kit.diamond(shear=0.08, strain=0.02)], rattle=0.15, seed=2)
    both = type(a).from_ase(a.to_ase() + b.to_ase(), dtype=torch.float64)
    together = fire(sw_like, both, fmax=1e-4, max_steps=2000, verlet=VerletList(sw_like.cutoff, 0.5))
    for s, single in enumerate((a, b)):
        alone = fire(sw_like, single, fmax=1e-4, max_steps=2000, verlet=VerletList(sw_like.cutoff, 0.5))
        start, stop = both.ranges()[s]
        assert int(together.steps[s]) == int(alone.steps[0])
        torch.testing.assert_close(together.positions[start:stop], alone.positions, rtol=0, atol=1e-12)
    assert int(together.steps[0]) != int(together.steps[1])  # one froze while the other moved on


def test_verlet_list_is_reused(kit, sw_like):
    batch = kit.make_batch([kit.diamond(shear=0.06)], rattle=0.1, seed=4)
    verlet = VerletList(sw_like.cutoff, 0.5)
    out = fire(sw_like, batch, fmax=1e-3, max_steps=1000, verlet=verlet)
    assert bool(out.converged.all()) and int(out.steps[0]) > 20
    assert verlet.rebuilds <= 3


def test_max_steps_is_reported_never_silently_converged(kit, sw_like):
    perfect = kit.make_batch([kit.diamond()])
    rattled = kit.make_batch([kit.diamond(shear=0.05)] * 2, rattle=0.1, seed=7)
    batch = type(perfect).from_ase(perfect.to_ase() + rattled.to_ase(), dtype=torch.float64)
    with pytest.warns(RelaxationWarning, match=r"2 of 3 structures .*structure 1: fmax [0-9.e-]+ eV/Å after 5 steps"):
        out = fire(sw_like, batch, fmax=1e-3, max_steps=5)
    assert out.converged.tolist() == [True, False, False]
    assert out.steps.tolist() == [0, 5, 5]
    assert bool((out.fmax[1:] >= 1e-3).all())


def test_nan_mid_relaxation_names_structure_and_step(kit, sw_like):
    batch = kit.make_batch([kit.diamond(shear=0.05)] * 3, rattle=0.1, seed=8)
    poisoned = NaNAfter(sw_like, calls=3, structure=1)
    with pytest.raises(NonFiniteError, match=r"structure 1 at step 3 \(atoms \[0, 1, 2"):
        fire(poisoned, batch, fmax=1e-3, max_steps=100)
    with pytest.raises(NonFiniteError, match=r"window.*structure 2 at step 4"):
        run_window(NaNAfter(sw_like, calls=4, structure=2), batch, 10)


def test_capped_step_limits_each_atom_separately():
    forces = torch.tensor([[100.0, 0.0, 0.0], [0.0, 3.0, 4.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    step = capped_step(forces, alpha=0.01, maxstep=0.2)
    torch.testing.assert_close(step[0], torch.tensor([0.2, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(step[1], 0.01 * forces[1])  # 0.05 Å: under the cap, untouched
    assert float(step[2].abs().max()) == 0.0
    forces.requires_grad_(True)
    (grad,) = torch.autograd.grad(capped_step(forces, 0.01, 0.2).sum(), forces)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad[1], torch.full((3,), 0.01, dtype=torch.float64))
    # Capped atom: d(maxstep F/|F|)/dF = maxstep (I - u uᵀ)/|F|, summed over components.
    torch.testing.assert_close(grad[0], torch.tensor([0.0, 0.002, 0.002], dtype=torch.float64))


class CountingForces:
    """The default force evaluation, counting the structures (and calls) it evaluates."""

    def __init__(self):
        from gdeq_ext.relax.forces import default_force_fn

        self.inner, self.structures, self.calls = default_force_fn(None), 0, 0

    def __call__(self, potential, batch, edges, create_graph=False):
        self.structures += batch.n_systems
        self.calls += 1
        return self.inner(potential, batch, edges, create_graph=create_graph)


def test_compaction_drops_finished_structures_and_changes_no_trajectory(kit, sw_like):
    """compact=True evaluates only the structures still moving (from the step after one finishes); every
    structure's steps and end state equal the uncompacted run's (to round-off); the whole batch's forces come back."""
    cells = [kit.diamond(shear=s, strain=e) for s, e in ((0.0, 0.0), (0.02, 0.0), (0.03, 0.01), (0.08, 0.02))]
    batch = kit.make_batch(cells, rattle=0.1, seed=11)
    runs = {}
    for compact in (False, True):
        counter = CountingForces()
        verlet = VerletList(sw_like.cutoff, 0.5)
        out = fire(sw_like, batch, fmax=1e-4, max_steps=2000, verlet=verlet, force_fn=counter, compact=compact)
        runs[compact] = (out, counter)
    (plain, plain_count), (packed, packed_count) = runs[False], runs[True]
    assert len(set(plain.steps.tolist())) > 2  # the structures finish at different steps
    assert packed.steps.tolist() == plain.steps.tolist() and packed.converged.tolist() == plain.converged.tolist()
    torch.testing.assert_close(packed.positions, plain.positions, rtol=0, atol=1e-10)
    torch.testing.assert_close(packed.forces, plain.forces, rtol=0, atol=1e-10)
    torch.testing.assert_close(packed.energy, plain.energy, rtol=0, atol=1e-10)
    assert packed.edges is not None and int(packed.edges.edge_index.max()) >= batch.n_atoms - 8  # the whole batch's
    # one evaluation per step either way (+1 at the end when compacted), but of fewer structures
    assert packed_count.calls == plain_count.calls + 1
    # the working set is, at every step, exactly the structures still moving
    steps, expected = plain.steps.tolist(), 2 * batch.n_systems  # first and final calls
    for t in range(1, max(steps) + 1):
        expected += sum(s >= t for s in steps)
    assert packed_count.structures == expected < plain_count.structures == batch.n_systems * (max(steps) + 1)


def test_compaction_names_the_original_structure_of_a_nan(kit, sw_like):
    """A NaN in a structure after the batch was compacted is reported with its index in the caller's batch."""
    cells = [kit.diamond(), kit.diamond(), kit.diamond(shear=0.06), kit.diamond(shear=0.08)]
    batch = kit.make_batch(cells, rattle=0.0, seed=3)
    rattled = kit.make_batch(cells[2:], rattle=0.1, seed=4)
    positions = torch.cat([batch.positions[: 2 * 8], rattled.positions])
    batch = batch.with_positions(positions)  # structures 0, 1 are at rest (converged at step 0)
    poisoned = NaNAfter(sw_like, calls=5, structure=1)  # structure 1 of the *compacted* batch is the caller's 3
    with pytest.raises(NonFiniteError, match=r"structure 3 at step 5"):
        fire(poisoned, batch, fmax=1e-4, max_steps=200, verlet=VerletList(sw_like.cutoff, 0.5))


def test_polish_compaction_solves_only_unfinished_structures_and_changes_no_result(kit, sw_like, monkeypatch):
    """The Newton polish with compact=True evaluates each round only the structures it still works on (they need
    different numbers of Newton steps from a loose FIRE end point); every structure's polished point, error
    estimate, flags and curvature equal the uncompacted polish's to round-off, and the returned forces and
    neighbor list are the whole batch's."""
    import importlib

    from gdeq_ext.gradients.implicit_function import ImplicitSolveOptions
    from gdeq_ext.relax.polish import PolishOptions, polish

    polish_module = importlib.import_module("gdeq_ext.relax.polish")
    products = []  # structures in each Hessian-vector product

    class CountingOperator(polish_module.HessianOperator):
        def __init__(self, potential, batch, *args, **kwargs):
            self.n_work = batch.n_systems
            super().__init__(potential, batch, *args, **kwargs)

        def __call__(self, v):
            products.append(self.n_work)
            return super().__call__(v)

    monkeypatch.setattr(polish_module, "HessianOperator", CountingOperator)
    cells = [kit.diamond(shear=s, strain=e) for s, e in ((0.0, 0.0), (0.02, 0.0), (0.03, 0.01), (0.08, 0.02))]
    batch = kit.make_batch(cells, rattle=0.1, seed=11)
    fmaxes = torch.tensor([1.0, 0.3, 0.01, 1e-4], dtype=torch.float64)  # loose to tight: different Newton steps
    start = batch.positions.clone()
    for k in range(batch.n_systems):  # each structure relaxed to its own fmax
        sub, atoms = batch.select(torch.tensor([k]))
        start[atoms] = fire(sw_like, sub, fmax=float(fmaxes[k]), max_steps=2000).positions
    runs = {}
    for compact in (False, True):
        counter = CountingForces()
        products.clear()
        result = polish(
            sw_like,
            batch,
            start,
            torch.ones(batch.n_systems, dtype=torch.bool),
            options=PolishOptions(),
            solve=ImplicitSolveOptions(),
            force_fn=counter,
            verlet=VerletList(sw_like.cutoff, 0.5),
            compact=compact,
        )
        runs[compact] = (counter, sum(products)), result
    ((plain_count, plain_products), plain), ((packed_count, packed_products), packed) = runs[False], runs[True]
    assert len(set(plain.newton_steps.tolist())) > 1  # the structures need different numbers of Newton steps
    assert bool(plain.exact.all()) and bool(plain.minimum.all())
    for name in ("newton_steps", "exact", "minimum"):
        assert getattr(packed, name).tolist() == getattr(plain, name).tolist(), name
    for name in ("positions", "forces", "energy", "fmax", "lowest_curvature"):
        torch.testing.assert_close(getattr(packed, name), getattr(plain, name), rtol=1e-9, atol=1e-10, msg=name)
    # the error estimates are the lengths of last Newton steps (~1e-6 Å and below): equal up to round-off in them
    torch.testing.assert_close(packed.fixed_point_error, plain.fixed_point_error, rtol=1e-4, atol=1e-12)
    assert packed.edges is not None and int(packed.edges.edge_index.max()) >= batch.n_atoms - 8  # the whole batch's
    # the products (the polish's cost) run over fewer structures; an operator of its own for a smaller working set
    # can cost a force evaluation more
    assert packed_products < plain_products, (packed_products, plain_products)
    assert packed.hvps == plain.hvps  # as many batched products, each over fewer structures
    assert packed_count.calls >= plain_count.calls


@pytest.mark.parametrize("device", devices())
def test_compacted_batch_gives_each_structure_its_solo_relaxation(kit, sw_like, device):
    """Per structure, a compacted batched FIRE equals relaxing that structure alone: the same steps, converged
    flags and end state (bit for bit on the CPU; CUDA sums with atomics, so to round-off there), in a batch whose
    structures finish at different steps (72-91) and one stops at max_steps (93)."""
    cells = [kit.diamond(shear=s, strain=e) for s, e in ((0.0, 0.0), (0.02, 0.0), (0.03, 0.01), (0.08, 0.02))]
    batch = kit.make_batch(cells, rattle=0.1, seed=11).to(device)
    sw_like = sw_like.to(device)
    out = fire(sw_like, batch, fmax=1e-4, max_steps=93, verlet=VerletList(sw_like.cutoff, 0.5), warn=False)
    assert out.steps.tolist() == [93, 91, 76, 72] and out.converged.tolist() == [False, True, True, True]
    for s, (lo, hi) in enumerate(batch.ranges()):
        alone, _ = batch.select(torch.tensor([s], device=batch.device))
        solo = fire(sw_like, alone, fmax=1e-4, max_steps=93, verlet=VerletList(sw_like.cutoff, 0.5), warn=False)
        assert int(solo.steps[0]) == int(out.steps[s]) and bool(solo.converged[0]) == bool(out.converged[s])
        if batch.device.type == "cpu":  # each structure's force sums run over its own edges in the same order
            assert torch.equal(out.positions[lo:hi], solo.positions)
            assert torch.equal(out.energy[s : s + 1], solo.energy)
        else:
            torch.testing.assert_close(out.positions[lo:hi], solo.positions, rtol=0, atol=1e-9)
            torch.testing.assert_close(out.energy[s : s + 1], solo.energy, rtol=1e-12, atol=1e-10)
