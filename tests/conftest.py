"""Shared fixtures for the relaxation tests: two small differentiable float64 potentials and test cells.

``MorsePair`` (pair, learnable D, a, r0, C² polynomial cutoff) and ``SWLike`` (Stillinger-Weber's
functional form with learnable ε, λ, A, B) are deliberately independent of gdeq_ext's own potentials,
so the relaxation code is tested against the plain interface: ``energy(batch, edges)``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors import edge_vectors_reference
from gdeq_ext.potentials.base import Potential


def _pairs(potential, batch, edges):
    edge_index, shifts = edges if edges is not None else potential.neighbors(batch)
    _, r = edge_vectors_reference(batch.positions, batch.cell, edge_index, shifts, batch.system)
    return edge_index, shifts, r


class MorsePair(Potential):
    """E = ½ Σ_ij D[(1 - e^{-a(r - r0)})² - 1] (1 - (r/rc)²)³ for r < rc; eV, Å."""

    def __init__(self, D=0.5, a=1.6, r0=2.6, cutoff=4.0):  # noqa: N803
        super().__init__()
        self.cutoff = cutoff
        self.D = torch.nn.Parameter(torch.tensor(D, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.r0 = torch.nn.Parameter(torch.tensor(r0, dtype=torch.float64))

    def energy(self, batch, edges=None):
        edge_index, _, r = _pairs(self, batch, edges)
        inside = r < self.cutoff
        x = torch.where(inside, r / self.cutoff, 0.0)
        pair = self.D * ((1 - torch.exp(-self.a * (r - self.r0))) ** 2 - 1) * (1 - x**2) ** 3
        pair = torch.where(inside, pair, 0.0)
        out = pair.new_zeros(batch.n_systems)
        return 0.5 * out.index_add(0, batch.system[edge_index[0]], pair)


class SWLike(Potential):
    """Stillinger-Weber's form (Si values by default) with learnable ε, λ, A, B; σ, a, γ fixed."""

    def __init__(self, epsilon=2.1683, lam=21.0, A=7.049556277, B=0.6022245584):  # noqa: N803
        super().__init__()
        self.sigma, self.a_cut, self.gamma = 2.0951, 1.80, 1.20
        self.cutoff = self.sigma * self.a_cut
        for name, value in dict(epsilon=epsilon, lam=lam, A=A, B=B).items():
            setattr(self, name, torch.nn.Parameter(torch.tensor(value, dtype=torch.float64)))

    def energy(self, batch, edges=None):
        edge_index, shifts = edges if edges is not None else self.neighbors(batch)
        vec, r = edge_vectors_reference(batch.positions, batch.cell, edge_index, shifts, batch.system)
        inside = r < self.cutoff
        s, rc = self.sigma, self.cutoff
        rs = torch.where(inside, r, 0.5 * rc)  # any value inside keeps the masked branch finite
        decay = torch.where(inside, torch.exp(s / (rs - rc)), 0.0)
        pair = self.A * self.epsilon * (self.B * (s / rs) ** 4 - 1) * decay
        energy = pair.new_zeros(batch.n_systems).index_add(0, batch.system[edge_index[0]], 0.5 * pair)
        # Triplets j-i-k: ordered pairs of distinct edges with the same centre i (each angle twice).
        centre = edge_index[0]
        e1, e2 = torch.nonzero((centre[:, None] == centre[None, :]) & inside[:, None] & inside[None, :], as_tuple=True)
        keep = e1 < e2
        e1, e2 = e1[keep], e2[keep]
        cos = (vec[e1] * vec[e2]).sum(1) / (rs[e1] * rs[e2])
        g = torch.where(inside, torch.exp(self.gamma * s / (rs - rc)), 0.0)
        three = self.lam * self.epsilon * (cos + 1 / 3) ** 2 * g[e1] * g[e2]
        return energy.index_add(0, batch.system[centre[e1]], three)


class Sum(Potential):
    """E = base + scale · correction (e.g. SW + a learnable MLIP: Δ-learning, the fine-tuning setting)."""

    def __init__(self, base, correction, scale=1.0):
        super().__init__()
        self.base, self.correction, self.scale = base, correction, scale
        self.cutoff = max(base.cutoff, correction.cutoff)

    def energy(self, batch, edges=None):
        return self.base.energy(batch, edges) + self.scale * self.correction.energy(batch, edges)


def diamond(a=5.431, shear=0.0, strain=0.0):
    """8-atom cubic diamond cell (Å), optionally sheared/strained so the internal relaxation is non-trivial."""
    basis = np.array([[0, 0, 0], [0, 2, 2], [2, 0, 2], [2, 2, 0], [1, 1, 1], [1, 3, 3], [3, 1, 3], [3, 3, 1]])
    cell = a * (1 + strain) * np.eye(3)
    cell[1, 0] += a * shear
    return basis / 4.0 @ cell, cell


def make_batch(structures, rattle=0.0, seed=0, numbers=14):
    """A float64 Batch from [(positions, cell), ...] (all periodic), rattled by ``rattle`` Å (uniform)."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    atoms = []
    for positions, cell in structures:
        positions = positions + rng.uniform(-rattle, rattle, positions.shape)
        atoms.append(Atoms(numbers=[numbers] * len(positions), positions=positions, cell=cell, pbc=True))
    return Batch.from_ase(atoms, dtype=torch.float64)


def random_cluster_cell(n=6, box=7.0, seed=1):
    """``n`` atoms at random (min distance 2.2 Å) in a periodic cubic box: many competing minima."""
    rng = np.random.default_rng(seed)
    points = []
    while len(points) < n:
        p = rng.uniform(0, box, 3)
        if all(np.linalg.norm(p - q) > 2.2 for q in points):
            points.append(p)
    return np.array(points), box * np.eye(3)


def si_vacancy(repeat=2, rattle=0.0, seed=0):
    """Diamond Si supercell (repeat³ 8-atom cells, 64 atoms for repeat=2) minus atom 0, rattled."""
    positions, cell = diamond()
    shifts = np.array([[i, j, k] for i in range(repeat) for j in range(repeat) for k in range(repeat)])
    big = (positions[None, :, :] + (shifts @ cell)[:, None, :]).reshape(-1, 3)[1:]
    return make_batch([(big, cell * repeat)], rattle=rattle, seed=seed)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (restored after): on a small shared CPU, torch's thread pool
    contends with other processes and made the MLIP's reference ops ~40x slower (56 ms vs 1.5 ms per
    force call on 8 atoms, two cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def kit():
    """The constructors above (with --import-mode=importlib test files cannot import conftest)."""
    return SimpleNamespace(
        MorsePair=MorsePair,
        SWLike=SWLike,
        Sum=Sum,
        diamond=diamond,
        make_batch=make_batch,
        random_cluster_cell=random_cluster_cell,
        si_vacancy=si_vacancy,
    )


@pytest.fixture
def morse():
    return MorsePair()


@pytest.fixture
def sw_like():
    return SWLike()


@pytest.fixture
def si_sheared():
    """One sheared + compressed 8-atom Si cell, rattled: X* depends smoothly on the SW parameters."""
    return make_batch([diamond(shear=0.06, strain=-0.02)], rattle=0.05, seed=3)


@pytest.fixture
def morse_cells():
    """Two periodic random 8-atom cells (Morse, argon masses): different, non-symmetric minima whose
    Hessians are positive definite apart from translations (softest mode 0.2 and 0.14 eV/Å²)."""
    return make_batch([random_cluster_cell(8, 6.0, seed=2), random_cluster_cell(8, 6.0, seed=3)], numbers=18)
