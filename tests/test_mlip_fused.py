"""The MLIP with backend="fused" (compiled edge kernels) against backend="reference" (plain PyTorch): energies,
forces, Hessian-vector products and force-matching parameter gradients to 1e-10 in float64; what autograd saves;
the backend argument (save/load, validation, fallback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from gdeq_ext.data import Batch
from gdeq_ext.neighbors import neighbor_list
from gdeq_ext.potentials import MLIP, Edges, hessian_vector_product
from gdeq_ext.potentials.edge_moments_op import has_fused_kernels
from gdeq_ext.testing import devices, stable_seed

fused_built = pytest.mark.skipif(
    not has_fused_kernels(torch.device("cpu")), reason="compiled edge_moments kernels not built"
)


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def small_periodic_batch(device="cpu"):
    """Three small triclinic/periodic silicon cells, rattled: a sheared 2-atom primitive cell (atoms see many of their
    own images), a 3-atom triclinic cell and a cubic 8-atom cell."""
    rng = np.random.default_rng(stable_seed("mlip_fused"))
    primitive = bulk("Si", a=5.3)
    primitive.cell = primitive.cell.array @ (np.eye(3) + 0.08 * rng.standard_normal((3, 3)))
    three = bulk("Si", a=5.6)
    three.append("Si")
    three.positions[2] = three.positions[1] + np.array([1.3, 1.0, -0.9])
    three.cell = three.cell.array @ (np.eye(3) + 0.1 * rng.standard_normal((3, 3)))
    cubic = bulk("Si", cubic=True)
    structures = []
    for atoms in (primitive, three, cubic):
        atoms = atoms.copy()
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        structures.append(atoms)
    return Batch.from_ase(structures, dtype=torch.float64, device=device)


def model64(device="cpu", backend="fused"):
    model = MLIP(seed=stable_seed("mlip_fused_model"), backend=backend).double().to(device)
    with torch.no_grad():  # perturb everything a little so that no term is accidentally trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p))
    return model


def quantities(model, batch, edges, vector, targets):
    """Energy, forces, H·v and the force-matching parameter gradient, all in float64."""
    energy, forces = model.energy_forces(batch, edges, create_graph=True)
    loss = (forces - targets).pow(2).sum() + 0.1 * energy.pow(2).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    hv = hessian_vector_product(model, batch, vector, edges)
    return {
        "energy": energy.detach(),
        "forces": forces.detach(),
        "hv": hv,
        "params": torch.cat([g.flatten() for g in grads]),
    }


@fused_built
@pytest.mark.parametrize("device", devices())
def test_fused_equals_reference(device, single_thread):
    batch = small_periodic_batch(device)
    edges = Edges(*neighbor_list(batch, 4.5))  # a Verlet skin: pairs beyond r_c = 4 Å must add exactly 0
    gen = torch.Generator().manual_seed(1)
    vector = torch.randn(batch.n_atoms, 3, dtype=torch.float64, generator=gen).to(device)
    targets = torch.randn(batch.n_atoms, 3, dtype=torch.float64, generator=gen).to(device)
    model = model64(device)
    fused = quantities(model, batch, edges, vector, targets)
    model.backend = "reference"
    reference = quantities(model, batch, edges, vector, targets)
    for name in fused:
        assert relative_error(fused[name], reference[name]) <= 1e-10, (
            name,
            relative_error(fused[name], reference[name]),
        )


def _saved_shapes(model, batch):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        energy, forces = model.energy_forces(batch, create_graph=True)
        loss = forces.pow(2).sum() + energy.sum()
    return shapes, loss


@fused_built
def test_saved_tensors_have_no_edge_by_channel_tensor(single_thread):
    """The force graph of the fused MLIP (what force training keeps) holds nothing with E rows and >= C columns."""
    batch = small_periodic_batch()
    model = model64()
    edge_index, _ = neighbor_list(batch, model.cutoff)
    n_edges, channels = edge_index.shape[1], model.config["channels"]
    assert n_edges > 4 * batch.n_atoms

    def wide(shapes):
        return [s for s in shapes if len(s) >= 2 and s[0] == n_edges and int(np.prod(s[1:])) >= channels]

    shapes, loss = _saved_shapes(model, batch)
    assert shapes and not wide(shapes), wide(shapes)
    loss.backward()  # the graph is usable
    model.backend = "reference"
    shapes, _ = _saved_shapes(model, batch)
    assert wide(shapes), "the check must be able to see the reference's (E, C) tensors"


def test_backend_argument_is_saved_and_validated(tmp_path):
    model = MLIP(channels=4, features=8, hidden=8, backend="reference")
    assert model.backend == "reference" and model.hyperparameters()["backend"] == "reference"
    model.save(tmp_path / "m.pt")
    assert MLIP.load(tmp_path / "m.pt").backend == "reference"
    model.backend = "fused"
    assert model.hyperparameters()["backend"] == "fused"
    assert MLIP().backend == "fused"
    with pytest.raises(ValueError, match="backend"):
        MLIP(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        model.backend = "magic"


def test_fused_without_kernel_falls_back_with_a_warning(monkeypatch, single_thread):
    import gdeq_ext._extension as extension
    import gdeq_ext.potentials.mlip as mlip_module

    batch = small_periodic_batch()
    model = model64(backend="reference")
    want = model.energy(batch)
    monkeypatch.setattr(mlip_module, "has_fused_kernels", lambda device: False)
    monkeypatch.setattr(extension, "_warned", False)
    model.backend = "fused"
    with pytest.warns(RuntimeWarning, match="edge_moments"):
        got = model.energy(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
