"""The three backbones through the same relaxation wrappers (issue #16): our MLIP, MACE (mace-torch, through
MACEPotential) and the cell-blind Transformer.

For each, on a sheared 8-atom periodic Si cell in float64: BPTT, implicit (at an exact fixed point) and hybrid
gradients against central finite differences, energies equal to the backbone's own forward, the Verlet list
changing nothing, checkpointed windows equal to stored ones, and a force-matching smoke test. The potential
relaxed is SW + scale · backbone (θ = the backbone's weights; the fine-tuning setting of test_relax_gradients.py),
so every backbone, even a random one, has a well-defined minimum near SW's. The models are tiny (a few hundred to
a thousand weights) to keep the file near a minute on two cores.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from ase.build import bulk

from gdeq_ext.data.batch import Batch
from gdeq_ext.loss import delta_q
from gdeq_ext.neighbors import VerletList
from gdeq_ext.potentials import MLIP, MACEPotential, Transformer, build_mace
from gdeq_ext.potentials.base import energy_forces, hessian_vector_product
from gdeq_ext.relax import BPTTRelax, HybridRelax, ImplicitRelax
from gdeq_ext.testing import DTYPES, tol

HAVE_MACE = importlib.util.find_spec("mace") is not None and importlib.util.find_spec("e3nn") is not None
needs_mace = pytest.mark.skipif(not HAVE_MACE, reason='mace-torch is not installed (pip install "gdeq_ext[mace]")')
BACKBONES = ["mlip", pytest.param("mace", marks=needs_mace), "transformer"]
# scale: the backbone's random forces are 1e-3-1e-2 eV/Å; scaled, they move SW's minimum by a few 0.01 Å.
SCALES = {"mlip": 300.0, "mace": 100.0, "transformer": 30.0}

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(name: str, dtype=torch.float64):
    """A tiny backbone (CPU test sizes) in ``dtype``."""
    if name == "mlip":
        return MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=8, seed=0).to(dtype)
    if name == "mace":
        return build_mace(
            r_max=4.0,
            hidden_irreps="4x0e+4x1o",
            num_interactions=2,
            max_ell=1,
            correlation=2,
            mlp_irreps="4x0e",
            num_bessel=4,
            radial_mlp=(8,),
            avg_num_neighbors=16.0,
            dtype=dtype,
        )
    return Transformer(d_model=8, heads=2, layers=1, ffn=16, n_gaussians=8, seed=0).to(dtype)


@pytest.fixture(params=BACKBONES)
def case(request, kit):
    """(name, backbone, potential SW + scale · backbone, θ, batch, reference positions)."""
    backbone = tiny(request.param)
    potential = kit.Sum(kit.SWLike().requires_grad_(False), backbone, scale=SCALES[request.param])
    batch = kit.make_batch([kit.diamond(shear=0.06, strain=-0.02)], rattle=0.05, seed=3)
    reference = batch.positions + 0.1 * torch.randn(
        batch.positions.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    return request.param, backbone, potential, list(backbone.parameters()), batch, reference


def _flat(grads, parameters):
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters, strict=True)]
    )


def _gradient(relax, parameters, batch, reference):
    result = relax(batch)
    loss = delta_q(result.positions, reference, batch).sum()
    return _flat(torch.autograd.grad(loss, parameters, allow_unused=True), parameters), result


def _directional_fd(make_relax, parameters, batch, reference, direction, eps):
    """(L(θ + εv) − L(θ − εv)) / 2ε with L = ΣΔQ of the relaxation's final positions."""

    def shift(amount):
        offset = 0
        with torch.no_grad():
            for p in parameters:
                p += amount * direction[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    values = []
    for sign in (1, -1):
        shift(sign * eps)
        with torch.no_grad():
            values.append(float(delta_q(make_relax()(batch).positions.detach(), reference, batch).sum()))
        shift(-sign * eps)
    return (values[0] - values[1]) / (2 * eps)


def _direction(parameters, seed=1):
    v = torch.randn(sum(p.numel() for p in parameters), generator=torch.Generator().manual_seed(seed))
    return (v / v.norm()).to(torch.float64)


# ------------------------------------------------------------------------------------------------ gradients
def test_bptt_gradient_matches_finite_differences(case):
    _, _, potential, parameters, batch, reference = case
    grad, _ = _gradient(BPTTRelax(potential, steps=8), parameters, batch, reference)
    v = _direction(parameters)
    fd = _directional_fd(lambda: BPTTRelax(potential, steps=8), parameters, batch, reference, v, 1e-5)
    assert abs(float(grad @ v) - fd) <= 1e-6 * abs(fd), (float(grad @ v), fd)


def test_implicit_gradient_matches_finite_differences_at_an_exact_fixed_point(case):
    _, _, potential, parameters, batch, reference = case
    grad, result = _gradient(ImplicitRelax(potential, fmax=1e-10, rtol=1e-10), parameters, batch, reference)
    assert bool(result.converged.all()) and bool(result.valid.all())
    v = _direction(parameters)
    fd = _directional_fd(lambda: ImplicitRelax(potential, fmax=1e-10), parameters, batch, reference, v, 1e-4)
    assert abs(float(grad @ v) - fd) <= 1e-5 * abs(fd), (float(grad @ v), fd)


def test_hybrid_gradient_is_implicit_plus_the_window(case):
    """β = 0: the hybrid gradient is dX*/dθ, checked against finite differences; β = 1 adds exactly the window's
    straight-through term gᵀ dX_K/dθ (an independent K-step BPTT unroll)."""
    _, _, potential, parameters, batch, reference = case
    window, v = 4, _direction(parameters)
    implicit, result = _gradient(
        HybridRelax(potential, window=window, fmax=1e-10, handoff=0.0, rtol=1e-10), parameters, batch, reference
    )
    assert bool(result.valid.all())
    fd = _directional_fd(lambda: ImplicitRelax(potential, fmax=1e-10), parameters, batch, reference, v, 1e-4)
    assert abs(float(implicit @ v) - fd) <= 1e-5 * abs(fd), (float(implicit @ v), fd)
    full, result = _gradient(
        HybridRelax(potential, window=window, fmax=1e-10, handoff=1.0, rtol=1e-10), parameters, batch, reference
    )
    x = result.positions.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(delta_q(x, reference, batch).sum(), x)
    x_k = BPTTRelax(potential, steps=window)(batch).positions
    window_part = _flat(torch.autograd.grad((x_k * g).sum(), parameters, allow_unused=True), parameters)
    expected = implicit + window_part
    torch.testing.assert_close(full, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))


@pytest.mark.parametrize("mode", ["bptt", "hybrid"])
def test_checkpointed_window_is_bit_identical(case, mode):
    """The condition of docs/method.md: the backbone computes the same function, with the same kernels, at every
    call (all three do on a CPU), so recomputing a step in backward reproduces the stored graph bit for bit."""
    _, _, potential, parameters, batch, reference = case
    grads = []
    for checkpoint in (False, True):
        relax = (
            BPTTRelax(potential, steps=4, checkpoint=checkpoint)
            if mode == "bptt"
            else HybridRelax(potential, window=3, fmax=1e-6, checkpoint=checkpoint)
        )
        grads.append(_gradient(relax, parameters, batch, reference)[0])
    assert torch.equal(grads[0], grads[1]), float((grads[0] - grads[1]).abs().max())


@needs_mace
def test_checkpointed_window_of_a_torchscript_mace_equals_the_stored_one_to_rounding(kit):
    """A TorchScript model (e3nn's ``jit.compile``, as mace-torch's ``*_compiled.model`` files) is re-optimised by the
    profiling executor during its first calls, so the same input can give results an ulp apart from one call to the
    next: checkpointed and stored windows then agree to rounding, not bit for bit (docs/method.md states this)."""
    from e3nn.util import jit

    potential = MACEPotential(jit.compile(tiny("mace").model))
    batch = kit.make_batch([kit.diamond(shear=0.06, strain=-0.02)], rattle=0.05, seed=3)
    reference = batch.positions + 0.05
    parameters = list(potential.parameters())
    grads = [
        _gradient(BPTTRelax(potential, steps=4, checkpoint=c), parameters, batch, reference)[0] for c in (False, True)
    ]
    torch.testing.assert_close(grads[1], grads[0], **tol(torch.float64, "exact"))


# --------------------------------------------------------------------------- energies: the backbone's own forward
def _si_cells(n=2, dtype=torch.float64):
    cells = []
    for k in range(n):
        atoms = bulk("Si", cubic=True)
        atoms.rattle(0.1, seed=k)
        atoms.set_cell(atoms.cell * [1.0, 1.0 + 0.02 * k, 1.0 - 0.01 * k], scale_atoms=True)
        cells.append(atoms)
    return cells, Batch.from_ase(cells, dtype=dtype)


@needs_mace
@pytest.mark.parametrize("dtype", DTYPES)
def test_mace_energy_and_forces_equal_mace_own_pipeline(dtype):
    """MACE's own data pipeline (its matscipy neighbor list, AtomicData, its own autograd forces) against the adapter
    (gdeq's neighbor list, our edge convention, our autograd): the same energies and forces."""
    from mace import data as mace_data
    from mace.tools import AtomicNumberTable, torch_geometric

    potential = tiny("mace", dtype)
    atoms, batch = _si_cells(dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # AtomicData builds its tensors in the default dtype
    try:
        table = AtomicNumberTable([14])
        items = [
            mace_data.AtomicData.from_config(mace_data.config_from_atoms(a), z_table=table, cutoff=potential.cutoff)
            for a in atoms
        ]
        own = potential.model(torch_geometric.Batch.from_data_list(items).to_dict(), compute_force=True)
    finally:
        torch.set_default_dtype(previous)
    energy, forces = energy_forces(potential, batch)
    torch.testing.assert_close(energy, own["energy"].detach(), **tol(dtype, "exact"))
    torch.testing.assert_close(forces, own["forces"].detach(), **tol(dtype, "exact"))


@pytest.mark.parametrize("name", BACKBONES)
def test_verlet_list_gives_bit_identical_energies_and_forces(name):
    """Pairs of a Verlet list (skin 0.5 Å) beyond the cutoff change nothing; energy() equals forward()."""
    potential = tiny(name)
    _, batch = _si_cells()
    energy, forces = energy_forces(potential, batch)
    edges = VerletList(potential.cutoff, 0.5)(batch)
    assert edges.edge_index.shape[1] > potential.neighbors(batch).edge_index.shape[1]
    energy_v, forces_v = energy_forces(potential, batch, edges=edges)
    assert torch.equal(energy, energy_v) and torch.equal(forces, forces_v)
    assert torch.equal(potential(batch).detach(), energy)


@pytest.mark.parametrize("name", BACKBONES)
def test_forces_and_hessian_vector_products_match_finite_differences(name):
    potential = tiny(name)
    _, batch = _si_cells(1)
    v = torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = 1e-5

    def at(x):
        return energy_forces(potential, batch.with_positions(x))

    (e_plus, f_plus), (e_minus, f_minus) = at(batch.positions + eps * v), at(batch.positions - eps * v)
    _, forces = at(batch.positions)
    torch.testing.assert_close(
        -(forces * v).sum(), ((e_plus - e_minus) / (2 * eps)).sum(), rtol=1e-7, atol=1e-9 * float(forces.abs().max())
    )
    hv = hessian_vector_product(potential, batch, v)
    torch.testing.assert_close(hv, -(f_plus - f_minus) / (2 * eps), rtol=1e-6, atol=1e-7 * float(hv.abs().max()))


# ------------------------------------------------------------------------------------------------ force matching
@pytest.mark.parametrize("name", BACKBONES)
def test_force_matching_smoke(name):
    """fit_forces accepts every backbone: a few epochs on SW-labelled cells lower the validation force error, and
    the per-species energy (MACE: its E0) is fitted first."""
    from gdeq_ext.potentials import StillingerWeber
    from gdeq_ext.train import fit_forces, rattled_silicon
    from gdeq_ext.train.forces import evaluate, prepare

    potential = tiny(name)
    structures = rattled_silicon(6, repeat=(1, 1, 1), seed=0)
    teacher = StillingerWeber()
    from gdeq_ext.train.data import label

    labelled = label(structures, teacher)
    before = evaluate(potential, prepare(potential, labelled[:1], torch.float64))
    initial = float(potential.reference_energy.detach()[0])
    result = fit_forces(
        potential, labelled[1:], validation=labelled[:1], epochs=6, lr=1e-2, batch_size=5, progress=False
    )
    assert result.epochs_run == 6 and result.val_force_mae < before["force_mae"], (result.summary(), before)
    fitted = float(potential.reference_energy.detach()[0])
    assert fitted != initial and abs(fitted - (-4.3)) < 1.0, fitted  # SW's diamond Si: -4.34 eV/atom


# ------------------------------------------------------------------------------------------------ MACE adapter
@needs_mace
def test_mace_names_the_element_it_has_no_embedding_for():
    potential = tiny("mace")
    atoms, _ = _si_cells(1)
    atoms[0].numbers[3] = 6
    with pytest.raises(ValueError, match=r"atom 3 .*atomic number 6, for which the MACE model has no embedding"):
        potential.energy(Batch.from_ase(atoms, dtype=torch.float64))


@needs_mace
def test_mace_leaves_the_callers_positions_alone_and_checks_dtype():
    potential = tiny("mace")
    _, batch = _si_cells(1)
    potential.energy(batch)
    assert not batch.positions.requires_grad  # MACE calls requires_grad_() on its input: an alias got it
    with pytest.raises(TypeError, match="float32 but the MACE model's parameters are torch.float64"):
        potential.energy(batch.to(dtype=torch.float32))


@needs_mace
def test_mace_save_load_and_a_model_file(tmp_path):
    potential = tiny("mace")
    _, batch = _si_cells(1)
    path = tmp_path / "si.model"
    potential.save(path)
    for loaded in (MACEPotential(path), MACEPotential.load(str(path))):
        assert torch.equal(loaded.energy(batch).detach(), potential.energy(batch).detach())
    with pytest.raises(FileNotFoundError, match="no such MACE model file"):
        MACEPotential(tmp_path / "missing.model")
    with pytest.raises(TypeError, match="not a mace-torch model"):
        MACEPotential(torch.nn.Linear(2, 2))


@needs_mace
def test_mace_import_does_not_leak_torch_load_settings():
    """mace/__init__ sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for the whole process; the adapter restores it."""
    from gdeq_ext.potentials.mace import import_mace

    for name in [m for m in sys.modules if m == "mace" or m.startswith("mace.")]:
        del sys.modules[name]
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    import_mace()
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    assert slice in torch.serialization.get_safe_globals()


def test_missing_mace_says_how_to_install(monkeypatch):
    from gdeq_ext.potentials.mace import import_mace

    monkeypatch.setitem(sys.modules, "mace", None)  # "import mace" now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "gdeq_ext\[mace\]"'):
        import_mace()
    with pytest.raises(ImportError, match=r'pip install "gdeq_ext\[mace\]"'):
        MACEPotential(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ Transformer
def test_transformer_invariances_and_save_load(tmp_path):
    potential = tiny("transformer")
    _, batch = _si_cells(1)
    energy, forces = energy_forces(potential, batch)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rotated = Batch.from_tensors(
        positions=batch.positions @ rotation.T + 0.3,
        numbers=batch.numbers,
        cell=batch.cell @ rotation.T,
        pbc=batch.pbc,
        n_atoms_per_system=batch.n_atoms_per_system,
    )
    energy_r, forces_r = energy_forces(potential, rotated)
    torch.testing.assert_close(energy_r, energy, **tol(torch.float64, "exact"))
    torch.testing.assert_close(forces_r, forces @ rotation.T, **tol(torch.float64, "exact"))
    permutation = torch.randperm(batch.n_atoms, generator=torch.Generator().manual_seed(1))
    permuted = batch.with_positions(batch.positions[permutation])
    torch.testing.assert_close(energy_forces(potential, permuted)[0], energy, **tol(torch.float64, "exact"))
    potential.save(tmp_path / "t.pt")
    loaded = Transformer.load(tmp_path / "t.pt")
    assert torch.equal(loaded.energy(batch).detach(), energy)
    assert loaded.hyperparameters() == potential.hyperparameters()


def test_transformer_all_atoms_attention_is_conservative_and_cell_blind():
    potential = Transformer(d_model=8, heads=2, layers=1, ffn=16, n_gaussians=8, attention="all").double()
    assert potential.cutoff is None  # no neighbor list, so no Verlet list in the relaxations either
    _, batch = _si_cells(1)
    v = torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-5
    e_plus = potential(batch.with_positions(batch.positions + eps * v))
    e_minus = potential(batch.with_positions(batch.positions - eps * v))
    _, forces = energy_forces(potential, batch)
    torch.testing.assert_close(-(forces * v).sum(), ((e_plus - e_minus) / (2 * eps)).sum(), rtol=1e-7, atol=1e-12)
    # Cell-blind: a different cell with the same Cartesian positions gives the same energy.
    other = Batch.from_tensors(
        positions=batch.positions,
        numbers=batch.numbers,
        cell=batch.cell * 1.5,
        pbc=batch.pbc,
        n_atoms_per_system=batch.n_atoms_per_system,
    )
    assert torch.equal(potential(other), potential(batch))


def test_transformer_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="d_model = 10 must be a multiple of heads = 4"):
        Transformer(d_model=10, heads=4)
    with pytest.raises(ValueError, match="attention must be one of"):
        Transformer(attention="global")
    atoms, _ = _si_cells(1)
    atoms[0].numbers[5] = 6
    with pytest.raises(ValueError, match=r"structure 0: atoms \[5\] have atomic number\(s\) \[6\]"):
        tiny("transformer").energy(Batch.from_ase(atoms, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ training config
def test_config_backbone_key_is_checked():
    from gdeq_ext.train.config import Config, ConfigError

    assert Config().model.backbone == "mlip"
    assert Config.from_dict({"model": {"backbone": "transformer"}}).model.backbone == "transformer"
    with pytest.raises(ConfigError, match=r"model.backbone = 'nequip' is not one of \['mlip', 'mace', 'transformer'\]"):
        Config.from_dict({"model": {"backbone": "nequip"}})


@pytest.mark.parametrize("name", ["transformer", pytest.param("mace", marks=needs_mace)])
def test_command_trains_another_backbone(tmp_path, capsys, name):
    """``python -m gdeq_ext.train`` with ``model.backbone``: one hybrid step on two SW-relaxed 8-atom starts; the
    trained model.pt loads with the backbone's class."""
    from gdeq_ext.data import RelaxationPair, write_relaxation_pairs
    from gdeq_ext.potentials import StillingerWeber
    from gdeq_ext.relax import fire
    from gdeq_ext.train.__main__ import main

    pairs = []
    for k in range(2):
        start = bulk("Si", cubic=True)
        start.rattle(0.1, seed=k)
        relaxed = fire(StillingerWeber(), Batch.from_ase([start], dtype=torch.float64), fmax=1e-3).positions
        reference = start.copy()
        reference.set_positions(relaxed.numpy())
        pairs.append(RelaxationPair.from_structures(start, reference, frame=k, source="test"))
    write_relaxation_pairs(tmp_path / "pairs.extxyz", pairs)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[data]\ntrain = "pairs.extxyz"\n[model]\nbackbone = "{name}"\n'
        "[relax]\nwindow = 2\nmax_relax_steps = 100\n[train]\nsteps = 1\nbatch_size = 2\neval_every = 0\n"
        "eval_train = false\nplot = false\n"
    )
    out = tmp_path / "out"
    assert main([str(config), "--output-dir", str(out), "--no-progress"]) == 0
    kind = {"transformer": Transformer, "mace": MACEPotential}[name]
    assert f"GDEQCalculator({kind.__name__}.load(" in capsys.readouterr().out
    _, batch = _si_cells(1)
    assert torch.isfinite(kind.load(out / "model.pt").energy(batch)).all()
