"""fit_relaxation and the training command on tiny data: config errors, metrics and files, exact resume,
export to ASE. 8-atom silicon cells and a tiny MLIP keep every test to seconds on one core."""

from __future__ import annotations

import csv
import math
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import bulk

from gdeq_ext import MLIP, Batch, StillingerWeber
from gdeq_ext.data import RelaxationPair, RelaxationPairs, write_relaxation_pairs
from gdeq_ext.datasets import BasinJudge
from gdeq_ext.relax import fire
from gdeq_ext.train import (
    Config,
    ConfigError,
    basin_distance,
    correct_basin,
    evaluate_relaxation,
    fit_forces,
    fit_relaxation,
    label,
    load_config,
    rattled_silicon,
)
from gdeq_ext.train.__main__ import main
from gdeq_ext.train.checkpoints import CheckpointError, CheckpointWarning, write_atomically
from gdeq_ext.train.config import parse_override
from gdeq_ext.train.relaxation import COLUMNS, find_checkpoint, load_checkpoint

TIMING = {"step_time_s", "wall_time_s", "peak_memory_mib"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pairs(n: int = 5, seed: int = 0) -> RelaxationPairs:
    """Rattled 8-atom diamond cells (0.15 Å) and a 7-atom vacancy cell, with their SW-relaxed references."""
    rng = np.random.default_rng(seed)
    starts = []
    for k in range(n):
        atoms = bulk("Si", "diamond", a=5.431, cubic=True)
        if k == n - 1:
            del atoms[0]
        atoms.positions += rng.normal(0.0, 0.15, atoms.positions.shape)
        starts.append(atoms)
    batch = Batch.from_ase(starts, dtype=torch.float64)
    solved = fire(StillingerWeber(), batch, fmax=1e-4, max_steps=5000)
    assert bool(solved.converged.all())
    ranges = batch.ranges()
    return RelaxationPairs(
        [RelaxationPair(a, solved.positions[lo:hi].numpy().copy()) for a, (lo, hi) in zip(starts, ranges, strict=True)]
    )


@pytest.fixture(scope="module")
def pairs():
    return tiny_pairs()


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    """A tiny MLIP force-matched to SW for a few epochs (so relaxations under it converge), saved once."""
    torch.set_num_threads(1)
    model = MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=16).double()
    fit_forces(model, label(rattled_silicon(8, repeat=(1, 1, 1), seed=3)), epochs=15, lr=1e-2, progress=False)
    path = tmp_path_factory.mktemp("base") / "base.pt"
    model.save(path)
    return path


SETTINGS = dict(steps=4, batch_size=3, window=3, max_relax_steps=200, lr=2e-3, eval_every=2, progress=False)


def parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_rows(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------- config
def test_config_files_and_unknown_keys(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\ntrain = "pairs.extxyz"\n[relax]\nmode = "implicit"\n[optim]\nlr = 1\n')
    config = load_config(toml)
    assert config.relax.mode == "implicit" and config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.data.train == str(tmp_path / "pairs.extxyz")  # relative to the config file

    toml.write_text("[relax]\nwindw = 5\n")
    unknown = r"unknown key relax.windw; did you mean 'window'\? \(\[relax\] keys: mode, window, bptt_steps"
    with pytest.raises(ConfigError, match=unknown):
        load_config(toml)
    toml.write_text("[relaxation]\nwindow = 5\n")
    with pytest.raises(ConfigError, match=r"unknown section 'relaxation'; did you mean 'relax'"):
        load_config(toml)
    toml.write_text('[train]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"run.toml: train.steps must be an integer, got 'ten'"):
        load_config(toml)
    toml.write_text('[relax]\nmode = "unrolled"\n')
    with pytest.raises(ConfigError, match=r"relax.mode = 'unrolled' is not one of \['bptt', 'implicit', 'hybrid'\]"):
        load_config(toml)
    toml.write_text("[optim]\nlr = -1.0\n")
    with pytest.raises(ConfigError, match=r"optim.lr = -1.0 must be > 0"):
        load_config(toml)
    toml.write_text("[relax]\nfmax = nan\n")  # NaN <= 0 is False: a "value <= 0" check let it through
    with pytest.raises(ConfigError, match=r"relax.fmax = nan must be > 0"):
        load_config(toml)
    toml.write_text('[relax]\non_invalid = "ignore"\n')
    with pytest.raises(ConfigError, match=r"relax.on_invalid = 'ignore' is not one of \['raise', 'skip', 'warn'\]"):
        load_config(toml)
    toml.write_text("[optim\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(toml)
    with pytest.raises(ConfigError, match=r"unknown setting 'windw'; did you mean 'window'"):
        Config().update({"windw": 3})
    assert Config().update({"window": 3, "optim.lr": 0.5}).relax.window == 3
    assert parse_override("relax.mode=hybrid") == ("relax.mode", "hybrid")
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_override("train.output_dir=runs/x") == ("train.output_dir", "runs/x")
    assert parse_override("relax.max_iter=none") == ("relax.max_iter", None)


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml", reason="YAML configs need pyyaml (TOML works without it)")
    yaml = tmp_path / "run.yaml"
    yaml.write_text("relax:\n  mode: bptt\n  bptt_steps: 7\ntrain:\n  steps: 3\n")
    config = load_config(yaml)
    assert (config.relax.mode, config.relax.bptt_steps, config.train.steps) == ("bptt", 7, 3)
    yaml.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key train.stpes; did you mean 'steps'"):
        load_config(yaml)


def test_command_reports_bad_input_clearly(tmp_path, pairs, capsys):
    data = tmp_path / "pairs.extxyz"
    write_relaxation_pairs(data, pairs)
    config = tmp_path / "run.toml"
    config.write_text('[data]\ntrain = "pairs.extxyz"\n[train]\nbatch_sise = 2\n')
    assert main([str(config)]) == 2
    assert "unknown key train.batch_sise; did you mean 'batch_size'?" in capsys.readouterr().err
    config.write_text('[data]\ntrain = "nothing.extxyz"\n')
    assert main([str(config)]) == 2
    assert "relaxation pairs file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.extxyz"
    broken.write_text(data.read_text().replace("Si ", "Si x", 1))
    config.write_text('[data]\ntrain = "broken.extxyz"\n')
    assert main([str(config)]) == 2
    assert "broken.extxyz: frame 0 is not valid extended XYZ" in capsys.readouterr().err
    assert main([str(config), "--set", "relax.mode=unrolled"]) == 2
    assert "relax.mode = 'unrolled' is not one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- basins
def test_basin_distance_ignores_translation_and_periodic_images():
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    batch = Batch.from_ase([atoms, atoms], dtype=torch.float64)
    reference = batch.positions.clone()
    moved = reference.clone()
    moved[:8] += torch.tensor([0.7, -0.2, 3.0], dtype=torch.float64)  # a rigid shift of structure 0
    moved[3] += torch.tensor([5.431, 0.0, -5.431], dtype=torch.float64)  # an atom wrapped into another image
    moved[8 + 2, 0] += 0.4  # structure 1: one atom off by 0.4 Å
    distance = basin_distance(moved, reference, batch)
    expected = math.sqrt(((0.4 - 0.05) ** 2 + 7 * 0.05**2) / 8)  # the mean shift 0.4/8 Å is removed
    np.testing.assert_allclose(distance.numpy(), [0.0, expected], atol=1e-12)
    # The judge: the largest per-atom deviation, 0.35 Å here (0.4 Å minus the removed mean shift 0.05 Å).
    assert correct_basin(moved, reference, batch).tolist() == [True, True]  # no teacher: direct, 0.4 Å
    strict = BasinJudge(direct_threshold=0.3)
    verdict = strict(moved, reference, batch)
    assert verdict.correct.tolist() == [True, False] and verdict.quenched is None
    np.testing.assert_allclose(verdict.direct.numpy(), [0.0, 0.35], atol=1e-12)
    assert correct_basin(moved, reference, batch, strict).tolist() == [True, False]
    swapped = reference.clone()
    swapped[[1, 6]] = reference[[6, 1]]  # two atoms trade places: the same structure
    np.testing.assert_allclose(basin_distance(swapped, reference, batch).numpy(), [0.0, 0.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["bptt", "implicit", "hybrid"])
def test_each_mode_trains_and_reports(mode, pairs, base_path):
    model = MLIP.load(base_path)
    before = parameters(model)
    result = fit_relaxation(model, pairs, mode=mode, bptt_steps=20, **{**SETTINGS, "steps": 2, "eval_every": 0})
    assert result.steps == 2 and len(result.history) == 3  # step 0 (evaluation) + 2 steps
    assert any(not torch.equal(before[k], v) for k, v in parameters(model).items())
    row = result.history[-1]
    assert row["loss"] > 0 and 0 <= row["train_basin_rate"] <= 1 and row["train_fmax"] >= 0
    assert (row["solver_iterations"] is None) == (mode == "bptt")
    assert row["relax_steps"] == (20 if mode == "bptt" else row["relax_steps"]) and row["relax_steps"] > 0
    assert set(result.initial) == {"train"} and result.final["train"]["n"] == len(pairs)


def test_outputs_and_export_to_ase(tmp_path, pairs, base_path):
    from gdeq_ext.ase import GDEQCalculator

    model = MLIP.load(base_path)
    settings = dict(SETTINGS, checkpoint_every=2)
    result = fit_relaxation(model, pairs[:3], validation=pairs[3:], output_dir=tmp_path / "run", **settings)
    rows = read_rows(result.csv_path)
    assert list(rows[0]) == list(COLUMNS) and [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [bool(r["val_delta_q"]) for r in rows] == [True, False, True, False, True]
    assert float(rows[4]["val_delta_q"]) == pytest.approx(result.final["val"]["delta_q"])
    try:
        import matplotlib  # noqa: F401

        assert os.path.getsize(result.png_path) > 10_000
    except ModuleNotFoundError:
        assert result.png_path is None  # no matplotlib: no PNG (with a warning), everything else written
    table = open(result.summary_path).read()
    assert "| val | after |" in table and "| train | before |" in table and "hybrid K=3" in table
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [f"step_{k:08d}.pt" for k in (2, 4)]

    loaded = MLIP.load(result.model_path)
    last = tmp_path / "run" / "model_last.pt"
    final = MLIP.load(last) if last.exists() else loaded  # the trained model in memory keeps the last weights
    atoms = pairs[0].start.copy()
    atoms.calc = GDEQCalculator(final)
    energy, forces = model.energy_forces(Batch.from_ase(atoms, dtype=torch.float64))
    assert atoms.get_potential_energy() == pytest.approx(float(energy[0]), abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces.numpy(), atol=1e-12)
    # model.pt holds the best validation's weights (step 0 counts), model_last.pt the last step's when they differ
    scored = [(r["val_basin_rate"], -r["val_delta_q"], -r["step"]) for r in result.history if r.get("val_delta_q")]
    assert result.best_step == -max(scored)[2]
    best_row = next(r for r in result.history if r["step"] == result.best_step)
    evaluated = evaluate_relaxation(loaded, pairs[3:], fmax=0.01, max_steps=200)
    assert evaluated["delta_q"] == pytest.approx(best_row["val_delta_q"], rel=1e-12)
    assert last.exists() == (result.best_step != result.steps)
    assert evaluate_relaxation(final, pairs[3:], fmax=0.01, max_steps=200) == result.final["val"]
    assert f"model.pt: the weights of step {result.best_step}, the best validation" in table
    assert "compiled kernels" in result.description or "fallback" in result.description


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_crash_mid_run_resumes_bit_for_bit(tmp_path, pairs, base_path):
    settings = dict(SETTINGS, steps=5, checkpoint_every=2, schedule="cosine", warmup_steps=1)
    reference = MLIP.load(base_path)
    uninterrupted = fit_relaxation(reference, pairs, validation=pairs[:2], output_dir=tmp_path / "a", **settings)

    def crash_at_3(step, row):
        if step == 3:
            raise Crash("injected failure after step 3")

    model = MLIP.load(base_path)
    with pytest.raises(Crash):
        fit_relaxation(model, pairs, validation=pairs[:2], output_dir=tmp_path / "b", callback=crash_at_3, **settings)
    assert find_checkpoint(tmp_path / "b").endswith("step_00000002.pt")  # step 3 was lost with the crash
    model = MLIP.load(base_path)  # a fresh process would start from the base again
    resumed = fit_relaxation(model, pairs, validation=pairs[:2], output_dir=tmp_path / "b", **settings)
    assert resumed.resumed_from == 2 and resumed.steps == 5
    for key, value in parameters(reference).items():
        assert torch.equal(value, model.state_dict()[key]), key
    a, b = read_rows(uninterrupted.csv_path), read_rows(resumed.csv_path)
    assert len(a) == len(b) == 6
    for row_a, row_b in zip(a, b, strict=True):
        for key in set(COLUMNS) - TIMING:
            assert row_a[key] == row_b[key], (row_a["step"], key)
    assert resumed.final == uninterrupted.final and resumed.initial == uninterrupted.initial

    saved = load_checkpoint(find_checkpoint(tmp_path / "b"))
    assert {"model", "optimizer", "scheduler", "rng", "order", "history", "config"} <= set(saved)
    with pytest.raises(ConfigError, match=r"cannot resume from .*: relax.window was 3 and is now 4"):
        fit_relaxation(MLIP.load(base_path), pairs, output_dir=tmp_path / "b", **{**settings, "window": 4})
    with pytest.raises(FileExistsError, match=r"already holds checkpoints"):
        fit_relaxation(MLIP.load(base_path), pairs, output_dir=tmp_path / "b", **{**settings, "resume": "never"})


def test_sigint_stops_after_a_checkpoint_and_resumes_exactly(tmp_path, pairs, base_path):
    settings = dict(SETTINGS, steps=3, checkpoint_every=0, eval_every=0, eval_train=False)
    reference = MLIP.load(base_path)
    fit_relaxation(reference, pairs, **settings)

    def interrupt_during_step_2(step, row):
        if step == 1:  # the signal arrives while step 2 runs: the run finishes step 2, checkpoints, stops
            os.kill(os.getpid(), signal.SIGINT)

    model = MLIP.load(base_path)
    with pytest.raises(KeyboardInterrupt, match=r"stopped by a signal after step 2"):
        fit_relaxation(model, pairs, output_dir=tmp_path / "c", callback=interrupt_during_step_2, **settings)
    assert find_checkpoint(tmp_path / "c").endswith("step_00000002.pt")
    model = MLIP.load(base_path)
    result = fit_relaxation(model, pairs, output_dir=tmp_path / "c", **settings)
    assert result.resumed_from == 2 and result.resumes == [2]
    assert "Resumed from checkpoints at step 2." in open(result.summary_path).read()
    for key, value in parameters(reference).items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_command_trains_resumes_and_extends(tmp_path, pairs, base_path, capsys):
    write_relaxation_pairs(tmp_path / "pairs.extxyz", pairs)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[data]\ntrain = "pairs.extxyz"\n[model]\ninit = "{base_path}"\n'
        "[relax]\nwindow = 2\nmax_relax_steps = 200\n[train]\nsteps = 2\nbatch_size = 5\neval_every = 0\n"
    )
    out = tmp_path / "out"
    assert main([str(config), "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| train | after |" in printed and "GDEQCalculator(MLIP.load(" in printed
    assert (out / "model.pt").exists() and (out / "summary.md").exists()
    # The same command with more steps continues from the last checkpoint.
    assert main([str(config), "--output-dir", str(out), "--no-progress", "--set", "train.steps=3"]) == 0
    assert "resuming from its latest checkpoint" in capsys.readouterr().out
    assert [int(r["step"]) for r in read_rows(out / "metrics.csv")] == [0, 1, 2, 3]


def test_example_config_runs_one_short_step(tmp_path, capsys):
    """examples/hybrid.toml as shipped (minus pretraining, one step, short relaxations): keys, paths and data."""
    example = pathlib.Path(__file__).resolve().parents[1] / "examples" / "hybrid.toml"
    config = load_config(example)
    assert config.relax.mode == "hybrid" and config.relax.window == 5 and os.path.exists(config.data.train)
    settings = [
        "train.steps=1",
        "pretrain.rattled=0",
        "pretrain.thermal=0",
        "relax.max_relax_steps=10",
        "relax.max_iter=10",
    ]
    settings += ["train.eval_train=false", "train.plot=false"]
    argv = [str(example), "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(argv + [item for setting in settings for item in ("--set", setting)]) == 0
    assert "| val | after | " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- trust
def test_untrustworthy_structures_are_skipped_and_counted(pairs, base_path, tmp_path):
    """Relaxations cut off after 2 FIRE steps cannot converge: under the default on_invalid = "skip" every structure's
    gradient is zeroed and counted, so the parameters do not move, and metrics.csv says why."""
    model = MLIP.load(base_path)
    before = parameters(model)
    settings = dict(SETTINGS, mode="implicit", fmax=1e-9, max_relax_steps=2, steps=2, eval_every=0, eval_train=False)
    fit_relaxation(model, pairs, output_dir=tmp_path / "run", **settings)
    rows = read_rows(tmp_path / "run" / "metrics.csv")[1:]
    assert [int(r["skipped"]) for r in rows] == [3, 2]  # every structure of each batch (5 pairs: batches of 3, 2)
    assert all(r["nonfinite_gradient"] == "0" and float(r["train_converged"]) == 0.0 for r in rows)
    for key, value in parameters(model).items():
        assert torch.equal(value, before[key]), key


def test_trust_columns_are_zero_on_converged_relaxations(pairs, base_path, tmp_path):
    model = MLIP.load(base_path)
    fit_relaxation(model, pairs, output_dir=tmp_path / "run", **dict(SETTINGS, steps=2, eval_every=0))
    rows = read_rows(tmp_path / "run" / "metrics.csv")[1:]
    for row in rows:
        assert int(row["skipped"]) + int(row["solve_failed"]) + int(row["nonfinite_gradient"]) == 0, row
        assert 0.0 <= float(row["fixed_point_error"]) <= 1e-5


# ---------------------------------------------------------------------------------------------- checkpoints (#13)
def test_resume_falls_back_past_unreadable_checkpoints_and_cleans_up(tmp_path, pairs, base_path):
    """The newest checkpoint truncated, the one before empty, a killed writer's temporary left behind: the resume
    names both skipped files, renames them out of the rotation, deletes the temporary and continues from the
    newest that loads, to the same parameters as an uninterrupted run."""
    settings = dict(SETTINGS, steps=4, checkpoint_every=1, keep_checkpoints=5, eval_every=0, eval_train=False)
    reference = MLIP.load(base_path)
    fit_relaxation(reference, pairs, **settings)
    out = tmp_path / "run"
    fit_relaxation(MLIP.load(base_path), pairs, output_dir=out, **dict(settings, steps=3))
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [f"step_0000000{k}.pt" for k in (1, 2, 3)]
    newest = (folder / "step_00000003.pt").read_bytes()
    (folder / "step_00000003.pt").write_bytes(newest[: len(newest) // 2])
    (folder / "step_00000002.pt").write_bytes(b"")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (folder / f"step_00000004.pt.tmp{gone.pid}").write_bytes(b"partial")
    alive = folder / f"step_00000004.pt.tmp{os.getppid()}"  # a live process's temporary is not touched
    alive.write_bytes(b"in progress")

    model = MLIP.load(base_path)
    with pytest.warns(CheckpointWarning) as caught:
        result = fit_relaxation(model, pairs, output_dir=out, **settings)
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 2, messages
    assert "step_00000003.pt: unreadable" in messages[0] and "step_00000002.pt: empty file (0 bytes)" in messages[1]
    assert all("resuming from" in m and m.endswith("step_00000001.pt") for m in messages)
    assert result.resumed_from == 1 and result.steps == 4
    names = sorted(p.name for p in folder.iterdir())
    assert "step_00000003.pt.unreadable" in names and "step_00000002.pt.unreadable" in names
    assert f"step_00000004.pt.tmp{gone.pid}" not in names and alive.name in names
    assert {f"step_0000000{k}.pt" for k in (1, 2, 3, 4)} <= set(names)
    for key, value in parameters(reference).items():
        assert torch.equal(value, model.state_dict()[key]), key

    # Nothing loads: an error naming each file, not a silent fresh start over the old run.
    bad = tmp_path / "bad" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "step_00000007.pt").write_bytes(b"")
    torch.save({"format": "something else"}, bad / "step_00000003.pt")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints in .* loads: .*step_00000007.pt: empty"):
        fit_relaxation(MLIP.load(base_path), pairs, output_dir=tmp_path / "bad", **settings)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "step_00000001.pt"
    write_atomically({"a": torch.ones(2)}, path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomically({"a": torch.zeros(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left, the old file intact
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_resume_refuses_other_data_or_another_model(tmp_path, pairs, base_path):
    out = tmp_path / "run"
    settings = dict(SETTINGS, steps=1, eval_every=0, eval_train=False)
    fit_relaxation(MLIP.load(base_path), pairs, output_dir=out, **settings)
    longer = dict(settings, steps=2)
    moved = RelaxationPairs(
        [
            RelaxationPair(p.start.copy(), p.reference + (1e-3 if k == 2 else 0.0), dict(p.info))
            for k, p in enumerate(pairs)
        ]
    )
    with pytest.raises(ConfigError, match=r"the training pairs changed \(same count, 5, but fingerprint"):
        fit_relaxation(MLIP.load(base_path), moved, output_dir=out, **longer)
    with pytest.raises(ConfigError, match=r"the training pairs changed"):  # same pairs, another order
        fit_relaxation(MLIP.load(base_path), pairs.subset([1, 0, 2, 3, 4]), output_dir=out, **longer)
    wider = MLIP(features=9, channels=4, n_radial=4, n_layers=1, hidden=16).double()
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000001.pt: model features was 8 and is now 9"):
        fit_relaxation(wider, pairs, output_dir=out, **longer)
    with pytest.raises(ConfigError, match=r"model dtype was float64 and is now float32"):
        fit_relaxation(MLIP.load(base_path).float(), pairs, output_dir=out, **longer)
    reread = RelaxationPairs([RelaxationPair(p.start.copy(), p.reference.copy(), {}) for p in pairs])
    assert reread.fingerprint() == pairs.fingerprint()  # info is not part of it; the same data resumes
    assert fit_relaxation(MLIP.load(base_path), reread, output_dir=out, **longer).resumed_from == 1


def test_command_names_the_step_and_dataset_frame_of_a_failure(tmp_path, pairs, base_path, capsys):
    """A start whose atoms overlap passes the data checks but not the potential's: the command exits 2 and the
    message names the training step and the dataset frame (not the index inside the batch)."""
    broken = [RelaxationPair(p.start.copy(), p.reference.copy(), dict(p.info)) for p in pairs]
    broken[3].start.positions[1] = broken[3].start.positions[0] + 0.05
    write_relaxation_pairs(tmp_path / "pairs.extxyz", broken)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[data]\ntrain = "pairs.extxyz"\n[model]\ninit = "{base_path}"\n'
        "[relax]\nwindow = 2\nmax_relax_steps = 50\n[train]\nsteps = 1\nbatch_size = 5\neval_every = 0\n"
        "eval_train = false\n"
    )
    assert main([str(config), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "error: training step 1, batch of dataset frames of " in error and "pairs.extxyz" in error, error
    assert "dataset frame 3 (batch structure " in error and "overlaps atom" in error, error
    assert "Traceback" not in error

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.pt").write_bytes(b"")
    config.write_text(config.read_text().replace(str(base_path), str(tmp_path / "empty" / "model.pt")))
    assert main([str(config), "--output-dir", str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "model.pt: empty file (0 bytes)" in capsys.readouterr().err


def test_the_judge_quenches_with_the_teacher_and_reports_the_direct_test(tmp_path, pairs, base_path):
    """#14: one correct-basin test. With train.teacher = "sw" a relaxed structure counts when the SW quench of it
    lands within 0.1 Å (largest per-atom deviation) of the reference; the direct test is reported beside it."""
    reference_batch, reference = pairs.batch(dtype=torch.float64)
    # One atom of structure 0 pushed 0.3 Å off its reference (direct deviation 0.26 Å once the mean shift is
    # removed): SW relaxes it back, so the quenched deviation is ~0.
    moved = reference.clone()
    moved[1, 1] += 0.3
    teacher = BasinJudge(StillingerWeber())
    verdict = teacher(moved, reference, reference_batch)
    assert verdict.correct.all() and verdict.direct_correct.all()
    assert float(verdict.direct[0]) > 0.25 and float(verdict.quenched.max()) < 1e-3
    with pytest.raises(ValueError, match=r"BasinJudge: threshold must be a finite number > 0 Å, got nan"):
        BasinJudge(threshold=float("nan"))

    settings = dict(SETTINGS, steps=1, eval_every=0)
    result = fit_relaxation(MLIP.load(base_path), pairs, output_dir=tmp_path / "sw", teacher="sw", **settings)
    rows = read_rows(tmp_path / "sw" / "metrics.csv")
    assert rows[1]["train_basin_rate"] != "" and rows[1]["train_basin_rate_direct"] != ""
    assert "| correct basins | direct |" in result.table()
    assert {"correct", "correct_direct", "basin_rate_direct"} <= set(result.final["train"])
    with pytest.raises(ConfigError, match=r"train.teacher = 'dft' is not one of \['none', 'sw'\]"):
        Config().update({"train.teacher": "dft"})


def test_resume_from_a_checkpoint_written_before_a_setting_existed(tmp_path, pairs, base_path):
    """A key added to [relax] or [train] later (skin, atol, teacher, ...) held its default in the old run: resuming
    compares with that default instead of refusing every earlier run."""
    out = tmp_path / "run"
    settings = dict(SETTINGS, steps=1, eval_every=0, eval_train=False)
    fit_relaxation(MLIP.load(base_path), pairs, output_dir=out, **settings)
    path = find_checkpoint(out)
    saved = torch.load(path, weights_only=True)
    for section, key in (("relax", "skin"), ("relax", "atol"), ("train", "teacher"), ("train", "direct_threshold")):
        del saved["config"][section][key]
    torch.save(saved, path)
    assert fit_relaxation(MLIP.load(base_path), pairs, output_dir=out, **dict(settings, steps=2)).resumed_from == 1
    with pytest.raises(ConfigError, match=r"relax.skin was 0.5 and is now 0.3"):
        fit_relaxation(MLIP.load(base_path), pairs, output_dir=out, **dict(settings, steps=3, skin=0.3))


def test_guidance_loss_adds_the_window_term_and_needs_a_window(pairs, base_path):
    """relax.guidance w: the hybrid's objective is ΔQ(X*) + w ΔQ(X_K); the reported loss stays ΔQ(X*)."""
    settings = {**SETTINGS, "steps": 1, "eval_every": 0, "eval_train": False, "mode": "hybrid", "handoff": 0.0}
    plain, guided = MLIP.load(base_path), MLIP.load(base_path)
    first = fit_relaxation(plain, pairs, **settings)
    second = fit_relaxation(guided, pairs, guidance=1.0, **settings)
    assert first.history[-1]["loss"] == pytest.approx(second.history[-1]["loss"], rel=1e-12)  # same X*, same ΔQ
    assert first.history[-1]["grad_norm"] != second.history[-1]["grad_norm"]  # the window term adds a gradient
    with pytest.raises(ConfigError, match=r"relax.guidance = 1.0 needs a window: mode 'hybrid'.*got mode 'implicit'"):
        fit_relaxation(MLIP.load(base_path), pairs, guidance=1.0, **{**settings, "mode": "implicit"})
    with pytest.raises(ConfigError, match=r"relax.guidance = -1.0 must be >= 0"):
        fit_relaxation(MLIP.load(base_path), pairs, guidance=-1.0, **settings)


def test_gradient_clip_is_on_by_default_and_zero_turns_it_off():
    from gdeq_ext.train.config import Config

    assert Config().optim.grad_clip == 1.0
    assert Config.from_dict({"optim": {"grad_clip": 0}}).optim.grad_clip == 0
    with pytest.raises(ConfigError, match=r"optim.grad_clip = -1.0 must be >= 0"):
        Config.from_dict({"optim": {"grad_clip": -1.0}})
