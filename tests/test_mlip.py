"""MLIP: conservative forces, invariances, smoothness at the cutoff, the edge op, save/load, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from gdeq_ext.data import Batch
from gdeq_ext.neighbors import edge_vectors_reference, neighbor_list
from gdeq_ext.potentials import MLIP, Edges, hessian_vector_product
from gdeq_ext.potentials.mlip_reference import (
    edge_moments_padded,
    edge_moments_reference,
    moment_invariants,
)
from gdeq_ext.potentials.radial import bessel_basis, smoothstep_cutoff
from gdeq_ext.testing import DTYPES, stable_seed, tol

A0 = 5.430950


def silicon(repeat=(1, 1, 1), rattle=0.1, seed=0, cubic=True):
    atoms = bulk("Si", "diamond", a=A0, cubic=cubic) * repeat
    atoms.rattle(rattle, seed=stable_seed("mlip", seed))
    return atoms


def model64(**kwargs):
    return MLIP(**kwargs).double()


@pytest.fixture(scope="module")
def model():
    # Non-zero reference energy and a perturbed readout so that nothing is accidentally trivial.
    m = model64(seed=stable_seed("mlip-model"))
    with torch.no_grad():
        m.reference_energy.fill_(-4.3)
    return m


def test_default_size():
    n = sum(p.numel() for p in MLIP().parameters())
    assert 10_000 <= n <= 100_000, n
    assert MLIP().cutoff >= 3.7712  # sees every pair the SW teacher sees


@pytest.mark.parametrize("case", ["cubic", "primitive"])
def test_forces_are_minus_energy_gradient(model, case):
    atoms = silicon(rattle=0.1, seed=case, cubic=case == "cubic")
    batch = Batch.from_ase(atoms, dtype=torch.float64)
    _, forces = model.energy_forces(batch)
    h = 1e-5
    numeric = torch.zeros_like(forces)
    for atom in range(min(batch.n_atoms, 4)):
        for axis in range(3):
            step = torch.zeros_like(batch.positions)
            step[atom, axis] = h
            plus = model.energy(batch.with_positions(batch.positions + step))
            minus = model.energy(batch.with_positions(batch.positions - step))
            numeric[atom, axis] = -(plus - minus).item() / (2 * h)
    torch.testing.assert_close(forces[:4], numeric[:4], rtol=1e-6, atol=1e-8)


def test_hessian_vector_product_matches_force_differences(model):
    batch = Batch.from_ase(silicon(rattle=0.1, seed="hvp"), dtype=torch.float64)
    v = torch.randn(batch.n_atoms, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hv = hessian_vector_product(model, batch, v)
    h = 1e-5
    _, f_plus = model.energy_forces(batch.with_positions(batch.positions + h * v))
    _, f_minus = model.energy_forces(batch.with_positions(batch.positions - h * v))
    torch.testing.assert_close(hv, -(f_plus - f_minus) / (2 * h), rtol=1e-6, atol=1e-7)


def _rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_invariant_to_rotation_translation_permutation(model):
    atoms = silicon(rattle=0.15, seed="inv")
    reference = Batch.from_ase(atoms, dtype=torch.float64)
    energy, forces = model.energy_forces(reference)

    rotation = _rotation(stable_seed("rotation"))
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T)
    rotated.positions = atoms.positions @ rotation.T
    e_rot, f_rot = model.energy_forces(Batch.from_ase(rotated, dtype=torch.float64))
    torch.testing.assert_close(e_rot, energy, **tol(torch.float64))
    torch.testing.assert_close(f_rot, forces @ torch.tensor(rotation.T), **tol(torch.float64))

    translated = atoms.copy()
    translated.positions += [0.3, -1.7, 2.9]
    e_tr, f_tr = model.energy_forces(Batch.from_ase(translated, dtype=torch.float64))
    torch.testing.assert_close(e_tr, energy, **tol(torch.float64))
    torch.testing.assert_close(f_tr, forces, **tol(torch.float64))

    order = np.random.default_rng(3).permutation(len(atoms))
    e_perm, f_perm = model.energy_forces(Batch.from_ase(atoms[order], dtype=torch.float64))
    torch.testing.assert_close(e_perm, energy, **tol(torch.float64))
    torch.testing.assert_close(f_perm, forces[torch.as_tensor(order)], **tol(torch.float64))


def test_invariant_to_periodic_images(model):
    atoms = silicon(rattle=0.1, seed="images")
    energy, forces = model.energy_forces(Batch.from_ase(atoms, dtype=torch.float64))
    # Moving atoms by lattice vectors changes nothing.
    wrapped = atoms.copy()
    wrapped.positions[[0, 3, 5]] += atoms.cell.array[[0, 1, 2]] * np.array([[1], [-2], [1]])
    e_wrap, f_wrap = model.energy_forces(Batch.from_ase(wrapped, dtype=torch.float64))
    torch.testing.assert_close(e_wrap, energy, **tol(torch.float64))
    torch.testing.assert_close(f_wrap, forces, **tol(torch.float64))
    # A 2x1x1 supercell is the same crystal: twice the energy, the same forces on each copy.
    e_super, f_super = model.energy_forces(Batch.from_ase(atoms * (2, 1, 1), dtype=torch.float64))
    torch.testing.assert_close(e_super, 2 * energy, **tol(torch.float64))
    torch.testing.assert_close(f_super, torch.cat([forces, forces]), **tol(torch.float64))


def _cluster(distance, n_atoms):
    # Atom 1 at ``distance`` from atom 0 (crossing r_c); with three atoms, atom 2 stays bonded to both,
    # so three-body (angular) terms change as well.
    positions = [[0.0, 0.0, 0.0], [distance * 0.6, distance * 0.8, 0.0], [1.2, 1.6, 1.66]][:n_atoms]
    return Batch.from_ase(
        Atoms(numbers=[14] * n_atoms, positions=positions, cell=np.zeros((3, 3)), pbc=False),
        dtype=torch.float64,
    )


@pytest.fixture(scope="module")
def strong_model():
    """Radial weights scaled up so the pair crossing r_c changes E, F and H·v by O(0.01-0.1)."""
    model = model64(seed=stable_seed("mlip-strong"))
    with torch.no_grad():
        for layer in model.layers:
            layer.radial_weights.mul_(3.0)
    return model


def _state(model, batch, v):
    energy, forces = model.energy_forces(batch)
    return energy, forces, hessian_vector_product(model, batch, v)


@pytest.mark.parametrize("n_atoms", [2, 3])
def test_smooth_when_an_atom_crosses_the_cutoff(strong_model, n_atoms):
    model, rc = strong_model, strong_model.cutoff
    v = torch.tensor([[0.3, -0.2, 0.1], [0.7, 0.1, 0.2], [0.0, 0.4, -0.5]], dtype=torch.float64)[:n_atoms]

    def jumps(delta):
        """|Δ| of energy, forces and H·v between r_c − delta and r_c + delta."""
        inside = _state(model, _cluster(rc - delta, n_atoms), v)
        outside = _state(model, _cluster(rc + delta, n_atoms), v)
        return [float((a - b).abs().max()) for a, b in zip(inside, outside, strict=True)]

    coarse, fine = jumps(1e-2), jumps(1e-3)
    # A jump in E, F or H·v would not shrink with delta; continuous ones shrink at least linearly.
    for c, f in zip(coarse, fine, strict=True):
        assert f < 0.2 * c + 1e-13, (c, f)
    if n_atoms == 2:
        far = _state(model, _cluster(rc + 0.5, 2), v)
        bonded = _state(model, _cluster(2.4, 2), v)
        # The crossing pair matters (the test is not vacuous) ...
        assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(bonded, far, strict=True))
        # ... contributes exactly nothing at and beyond r_c, and vanishes there as (r_c − r)^k with
        # k ≥ 3, 2, 1 for E, F, H·v: a C² energy (here even one order more: sin(kπr/r_c) vanishes too).
        at_rc, beyond = _state(model, _cluster(rc, 2), v), _state(model, _cluster(rc + 1e-3, 2), v)
        for a, b, c in zip(at_rc, beyond, far, strict=True):
            assert torch.equal(a, c) and torch.equal(b, c)
        for c, f, k in zip(coarse, fine, [3, 2, 1], strict=True):
            assert f < 2 * 10.0 ** (-k) * c, (c, f, k)
    # Beyond r_c the pair contributes exactly nothing: same result as an edge list without it.
    batch = _cluster(rc + 1e-3, n_atoms)
    skin = Edges(*neighbor_list(batch, rc + 1.0))
    torch.testing.assert_close(model.energy(batch, skin), model.energy(batch), rtol=0, atol=0)


def test_cutoff_function_is_c2():
    x = torch.tensor([1.0 - 1e-7, 1.0, 1.0 + 1e-7, 2.0], dtype=torch.float64, requires_grad=True)
    f = smoothstep_cutoff(x)
    (d1,) = torch.autograd.grad(f.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    f, d1 = f.detach(), d1.detach()
    assert float(f[1:].abs().max()) == 0.0 and float(f[0]) < 1e-18
    assert float(d1.abs().max()) < 1e-12 and float(d2.abs().max()) < 1e-5
    assert float(smoothstep_cutoff(torch.tensor(0.0))) == 1.0
    r = torch.tensor([3.99, 4.0, 4.5], dtype=torch.float64)
    assert float(bessel_basis(r, 8, 4.0)[1:].abs().max()) == 0.0


def _edge_inputs(dtype, seed="edge"):
    batch = Batch.from_ase([silicon(rattle=0.1, seed=seed), silicon(rattle=0.1, seed=seed, cubic=False)], dtype=dtype)
    edge_index, shifts = neighbor_list(batch, 4.6)  # a skin beyond the 4.0 Å cutoff on purpose
    generator = torch.Generator().manual_seed(stable_seed(seed))
    positions = batch.positions.clone().requires_grad_(True)
    vectors, _ = edge_vectors_reference(positions, batch.cell, edge_index, shifts, batch.system)
    u = torch.randn(batch.n_atoms, 5, dtype=dtype, generator=generator).requires_grad_(True)
    weights = torch.randn(8, 5, dtype=dtype, generator=generator).requires_grad_(True)
    return positions, vectors, edge_index, u, weights


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_edge_op_equals_reference_with_derivatives(dtype):
    positions, vectors, edge_index, u, weights = _edge_inputs(dtype)
    got = edge_moments_padded(vectors, edge_index, u, weights, 4.0)
    want = edge_moments_reference(vectors, edge_index, u, weights, 4.0)
    torch.testing.assert_close(got, want, **tol(dtype))
    probe = torch.randn_like(want)
    inputs = (positions, u, weights)
    g_got = torch.autograd.grad((got * probe).sum(), inputs, create_graph=True)
    g_want = torch.autograd.grad((want * probe).sum(), inputs, create_graph=True)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, **tol(dtype, "derivative"))
    # Second derivatives (what force training and Hessian-vector products need).
    s_got = torch.autograd.grad(sum((g * g).sum() for g in g_got), inputs, retain_graph=True)
    s_want = torch.autograd.grad(sum((g * g).sum() for g in g_want), inputs)
    for a, b in zip(s_got, s_want, strict=True):
        torch.testing.assert_close(a, b, **tol(dtype, "derivative"))


def test_moments_represent_the_sw_three_body_sum():
    """Σ_{j≠k} R_j R_k (cos θ_jik + 1/3)² = ‖A2‖² + ⅔|A1|² + 4/9 A0² − 16/9 Σ_j R_j² (docs/model.md)."""
    positions, vectors, edge_index, _, weights = _edge_inputs(torch.float64, seed="three-body")
    vectors = vectors.detach()
    keep = vectors.norm(dim=1) < 4.0
    vectors, edge_index = vectors[keep], edge_index[:, keep]
    u = torch.ones(positions.shape[0], 1, dtype=torch.float64)
    w = weights.detach()[:, :1]
    invariants = moment_invariants(edge_moments_reference(vectors, edge_index, u, w, 4.0))
    a0, a1_sq, a2_sq = invariants.unbind(-1)
    radial = (bessel_basis(vectors.norm(dim=1), 8, 4.0) @ w).squeeze(1)
    self_terms = torch.zeros_like(a0).index_add(0, edge_index[0], radial**2)
    via_moments = a2_sq + 2 / 3 * a1_sq + 4 / 9 * a0**2 - 16 / 9 * self_terms

    centre = edge_index[0]
    same = (centre[:, None] == centre[None, :]) & ~torch.eye(len(centre), dtype=torch.bool)
    e1, e2 = same.nonzero(as_tuple=True)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cos = (unit[e1] * unit[e2]).sum(1)
    brute = torch.zeros_like(a0).index_add(0, centre[e1], radial[e1] * radial[e2] * (cos + 1 / 3) ** 2)
    torch.testing.assert_close(via_moments, brute, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_verlet_edges(dtype):
    model = MLIP().to(dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    batch = Batch.from_ase([silicon(seed=1), silicon((2, 1, 1), seed=2)], dtype=dtype)
    energy, forces = model.energy_forces(batch)
    assert energy.shape == (2,) and forces.shape == (24, 3) and energy.dtype == forces.dtype == dtype
    skin = Edges(*neighbor_list(batch, model.cutoff + 0.8))
    e_skin, f_skin = model.energy_forces(batch, edges=skin)
    torch.testing.assert_close(e_skin, energy, **tol(dtype))
    torch.testing.assert_close(f_skin, forces, **tol(dtype))
    e64, f64 = model.double().energy_forces(batch.to(dtype=torch.float64))
    torch.testing.assert_close(energy.double(), e64, **tol(dtype, "derivative"))
    torch.testing.assert_close(forces.double(), f64, **tol(dtype, "derivative"))
    with pytest.raises(TypeError, match="float64.*float32|float32.*float64"):
        model.energy(batch.to(dtype=torch.float32))


def test_save_load_roundtrip(tmp_path):
    model = model64(features=8, channels=4, n_radial=5, n_layers=3, hidden=16, cutoff=4.5, species=(14, 32))
    with torch.no_grad():
        model.reference_energy.copy_(torch.tensor([-4.3, -3.9]))
    model.save(tmp_path / "mlip.pt")
    loaded = MLIP.load(tmp_path / "mlip.pt")
    assert loaded.hyperparameters() == model.hyperparameters() and loaded.dtype == torch.float64
    atoms = silicon(seed="save")
    atoms.numbers[[1, 4]] = 32
    batch = Batch.from_ase(atoms, dtype=torch.float64)
    torch.testing.assert_close(loaded.energy(batch), model.energy(batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a MLIP|holds a StillingerWeber"):
        from gdeq_ext.potentials import StillingerWeber

        StillingerWeber().save(tmp_path / "sw.pt")
        MLIP.load(tmp_path / "sw.pt")


def test_load_refuses_bad_files_and_names_them(tmp_path):
    """#13: every load error names the file; a hostile file cannot make MLIP.load allocate gigabytes."""
    from gdeq_ext.potentials import PotentialFileError

    model = model64(features=4, channels=2, n_radial=3, n_layers=1, hidden=4)
    good = tmp_path / "good.pt"
    model.save(good)
    data = torch.load(good, weights_only=True)

    def write(name, content):
        path = tmp_path / name
        torch.save(content, path)
        return str(path)

    with pytest.raises(FileNotFoundError, match=r"missing.pt: no such potential file"):
        MLIP.load(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(PotentialFileError, match=r"empty.pt: empty file \(0 bytes\)"):
        MLIP.load(tmp_path / "empty.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(PotentialFileError, match=r"cut.pt: unreadable \(200 bytes"):
        MLIP.load(tmp_path / "cut.pt")
    cases = {
        "huge.pt": ({"features": 10**7}, r"huge.pt: MLIP hyperparameter features = 10000000 is outside \[1, 4096\]"),
        "many.pt": (
            {"features": 4096, "channels": 4096, "hidden": 8192, "n_layers": 64},
            r"many.pt: MLIP hyperparameters .* give .* weights, more than 5e\+07",
        ),
        "cutoff.pt": ({"cutoff": float("nan")}, r"cutoff.pt: MLIP hyperparameter cutoff = nan Å is outside"),
        "species.pt": ({"species": [14, 14]}, r"species.pt: MLIP hyperparameter species = \[14, 14\] is not"),
        "typo.pt": ({"featurs": 4}, r"typo.pt: unknown MLIP hyperparameters \['featurs'\]"),
    }
    for name, (change, message) in cases.items():
        path = write(name, {**data, "hyperparameters": {**data["hyperparameters"], **change}})
        with pytest.raises(PotentialFileError, match=message):
            MLIP.load(path)
    nan_weights = {k: v.clone() for k, v in data["state_dict"].items()}
    nan_weights["readout.0.weight"][0, 0] = math.nan
    with pytest.raises(PotentialFileError, match=r"nan.pt: weight 'readout.0.weight' holds NaN or inf"):
        MLIP.load(write("nan.pt", {**data, "state_dict": nan_weights}))
    wider = {**data, "hyperparameters": {**data["hyperparameters"], "features": 5}}
    with pytest.raises(PotentialFileError, match=r"wider.pt: the stored weights do not fit the stored hyperpar"):
        MLIP.load(write("wider.pt", wider))
    with pytest.raises(PotentialFileError, match=r"dtype.pt: dtype 'int8' is not one of"):
        MLIP.load(write("dtype.pt", {**data, "dtype": "int8"}))
    with pytest.raises(PotentialFileError, match=r"list.pt: not a gdeq_ext potential file"):
        MLIP.load(write("list.pt", [1, 2, 3]))
    loaded = MLIP.load(good)  # float64 weights survive exactly (the dtype is set before they are loaded)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bad_input_is_named(model):
    good, other = silicon(seed="bad1"), silicon(seed="bad2")
    batch = Batch.from_ase([good, other], dtype=torch.float64)
    positions = batch.positions.clone()
    positions[8 + 6, 0] = float("inf")
    with pytest.raises(ValueError, match=r"structure 1: atom 6 has a non-finite position"):
        model.energy(batch.with_positions(positions))
    overlap = other.copy()
    overlap.positions[7] = overlap.positions[1] + [0.0, 0.06, 0.0]
    with pytest.raises(ValueError, match=r"structure 1: atom (1 overlaps atom 7|7 overlaps atom 1)"):
        model.energy(Batch.from_ase([good, overlap], dtype=torch.float64))
    carbon = good.copy()
    carbon.numbers[2] = 6
    with pytest.raises(ValueError, match=r"structure 0: atoms \[2\] have atomic number\(s\) \[6\]"):
        model.energy(Batch.from_ase([carbon, other], dtype=torch.float64))
