"""delta_q: mass-weighted ΔQ per structure, minimum image on periodic axes, net translation removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.geometry import find_mic

from gdeq_ext.data.batch import Batch
from gdeq_ext.loss import delta_q, minimum_image

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    triclinic = np.array([[5.0, 0.0, 0.0], [2.4, 4.6, 0.0], [1.1, -1.7, 4.4]])
    slab = np.array([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    structures = [
        Atoms("SiSiCO", positions=rng.uniform(0, 4, (4, 3)), cell=triclinic, pbc=True),
        Atoms("HHe", positions=rng.uniform(0, 4, (2, 3)), cell=slab, pbc=[True, True, False]),
        Atoms("ArAr", positions=rng.uniform(0, 4, (2, 3)), pbc=False),
    ]
    return Batch.from_ase(structures, dtype=torch.float64)


def _reference(batch, positions, reference):
    """ΔQ by ASE's find_mic and numpy, structure by structure."""
    out = []
    for s, (start, stop) in enumerate(batch.ranges()):
        d, _ = find_mic(
            (positions[start:stop] - reference[start:stop]).numpy(),
            batch.cell[s].numpy(),
            batch.pbc[s].numpy(),
        )
        m = batch.masses[start:stop].numpy()
        d = d - (m[:, None] * d).sum(0) / m.sum()
        out.append(np.sqrt((m[:, None] * d**2).sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_matches_ase_minimum_image_and_mass_weighting():
    batch = _batch()
    gen = torch.Generator().manual_seed(1)
    reference = batch.positions + 0.3 * torch.randn(batch.positions.shape, generator=gen, dtype=torch.float64)
    # Move atoms by whole lattice vectors along periodic axes: ΔQ must not see it.
    jumped = batch.positions.clone()
    jumped[0] += batch.cell[0, 0] - 2 * batch.cell[0, 2]
    jumped[4] += 3 * batch.cell[1, 1]
    value = delta_q(jumped, reference, batch)
    torch.testing.assert_close(value, _reference(batch, batch.positions, reference), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value, delta_q(batch.positions, reference, batch), rtol=1e-12, atol=1e-12)


def test_non_periodic_axis_is_not_wrapped():
    batch = _batch()
    moved = batch.positions.clone()
    moved[6] += torch.tensor([0.0, 0.0, 7.0], dtype=torch.float64)  # non-periodic cluster: a real move
    d = minimum_image(moved - batch.positions, batch)
    assert float(d[6, 2]) == 7.0
    value = delta_q(moved, batch.positions, batch)
    # Two equal masses, one moved by 7 Å: after removing the mean, each is 3.5 Å from the reference.
    m = float(batch.masses[6])
    torch.testing.assert_close(value[2], torch.tensor((2 * m * 3.5**2) ** 0.5, dtype=torch.float64))
    assert float(value[0]) == 0.0 and float(value[1]) == 0.0


def test_rigid_translation_is_removed_and_gradient_is_finite_at_zero():
    batch = _batch()
    shift = torch.tensor([[0.7, -0.2, 1.3]], dtype=torch.float64)
    value = delta_q(batch.positions + shift, batch.positions, batch)
    assert float(value.abs().max()) < 1e-12
    # At ΔQ = 0 exactly (a norm's kink) the gradient is 0, not NaN.
    positions = batch.positions.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(delta_q(positions, batch.positions, batch).sum(), positions)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0


def test_gradient_matches_finite_differences():
    batch = _batch(2)
    gen = torch.Generator().manual_seed(3)
    reference = batch.positions + 0.2 * torch.randn(batch.positions.shape, generator=gen, dtype=torch.float64)
    positions = batch.positions.clone().requires_grad_(True)
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (delta_q(x, reference, batch) * weights).sum(), (positions,))
    # The gradient is mass-weighted and has no net force per structure (translation invariance).
    (grad,) = torch.autograd.grad(delta_q(positions, reference, batch).sum(), positions)
    net = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, batch.system, grad)
    assert float(net.abs().max()) < 1e-12


def test_accepts_a_reference_batch():
    batch = _batch()
    other = batch.with_positions(batch.positions + 0.1)
    torch.testing.assert_close(delta_q(batch.positions, other, batch), delta_q(batch.positions, other.positions, batch))
