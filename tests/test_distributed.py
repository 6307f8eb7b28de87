"""Data-parallel training: 2 gloo processes under torchrun give the parameters of one process on the same
global batches (float64, to round-off), including an uneven split and a rank with no structures."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import bulk

import gdeq_ext
from gdeq_ext import MLIP, Batch, StillingerWeber
from gdeq_ext.data import RelaxationPair, RelaxationPairs, write_relaxation_pairs
from gdeq_ext.relax import fire
from gdeq_ext.train import fit_forces, fit_relaxation, label, load_config, rattled_silicon
from gdeq_ext.train.distributed import DistributedContext, all_reduce_gradients, shard

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed gloo backend",
)


def test_shard_is_contiguous_balanced_and_complete():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [shard(list(range(10, 10 + n)), rank, world) for rank in range(world)]
            assert sum(parts, []) == list(range(10, 10 + n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    assert shard([7], 0, 2) == [] and shard([7], 1, 2) == [7]


def test_single_process_helpers_are_no_ops():
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), 2.0)
    all_reduce_gradients([parameter], DistributedContext())
    assert parameter.grad.tolist() == [2.0, 2.0, 2.0]


def _pairs() -> RelaxationPairs:
    rng = np.random.default_rng(11)
    starts = []
    for k in range(5):
        atoms = bulk("Si", "diamond", a=5.431, cubic=True)
        if k == 2:
            del atoms[5]
        atoms.positions += rng.normal(0.0, 0.15, atoms.positions.shape)
        starts.append(atoms)
    batch = Batch.from_ase(starts, dtype=torch.float64)
    solved = fire(StillingerWeber(), batch, fmax=1e-4, max_steps=5000)
    ranges = batch.ranges()
    return RelaxationPairs(
        [RelaxationPair(a, solved.positions[lo:hi].numpy().copy()) for a, (lo, hi) in zip(starts, ranges, strict=True)]
    )


CONFIG = """
[data]
train = "train.extxyz"
val = "val.extxyz"
[model]
init = "base.pt"
[relax]
mode = "hybrid"
window = 2
max_relax_steps = 150
[optim]
optimizer = "adam"
lr = 3e-3
schedule = "cosine"
[train]
steps = 3
batch_size = 2          # 5 pairs: global batches of 2, 2, 1 -> the last leaves rank 0 with no structure
eval_every = 3
eval_train = false
checkpoint_every = 0
plot = false
threads = 1
"""


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    pairs = _pairs()
    write_relaxation_pairs(tmp_path / "train.extxyz", pairs)
    write_relaxation_pairs(tmp_path / "val.extxyz", pairs[:3])
    base = MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=16).double()
    fit_forces(base, label(rattled_silicon(6, repeat=(1, 1, 1), seed=5)), epochs=10, lr=1e-2, progress=False)
    base.save(tmp_path / "base.pt")
    (tmp_path / "run.toml").write_text(CONFIG)

    root = str(pathlib.Path(gdeq_ext.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "gdeq_ext.train", str(tmp_path / "run.toml"), "--output-dir", str(tmp_path / "ddp")]
    command += ["--no-progress"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    log = done.stdout + "\n".join(line for line in done.stderr.splitlines() if not line.startswith("W"))
    assert done.returncode == 0, log[-6000:]
    assert "2 processes (gloo)" in done.stdout

    # The single process reads the same files (extxyz rounds positions to 1e-8 Å).
    config = load_config(tmp_path / "run.toml", {"train.progress": False})
    single = MLIP.load(tmp_path / "base.pt")
    result = fit_relaxation(single, config.data.train, validation=config.data.val, config=config)
    distributed = MLIP.load(tmp_path / "ddp" / "model.pt")
    base_state = MLIP.load(tmp_path / "base.pt").state_dict()
    for key, value in single.state_dict().items():
        torch.testing.assert_close(distributed.state_dict()[key], value, rtol=0, atol=1e-10, msg=key)
    moved = max(float((single.state_dict()[k] - v).abs().max()) for k, v in base_state.items())
    assert moved > 1e-4  # the comparison is not trivial: training changed the parameters

    with open(tmp_path / "ddp" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    for row, expected in zip(rows[1:], result.history[1:], strict=True):
        assert float(row["loss"]) == pytest.approx(expected["loss"], rel=1e-10)
        assert float(row["solver_iterations"]) == expected["solver_iterations"]
    assert float(rows[3]["val_delta_q"]) == pytest.approx(result.final["val"]["delta_q"], rel=1e-10)
