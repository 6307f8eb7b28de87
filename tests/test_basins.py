"""End-structure matching: invariant to atom order, net translation (and rotation for clusters); separates basins."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gdeq_ext.data.structures import diamond_silicon
from gdeq_ext.datasets.basins import label_basins, minimum_image_vectors, same_basin, structure_distance


def test_permuted_translated_copy_is_the_same_structure():
    atoms = diamond_silicon((2, 2, 2))
    rng = np.random.default_rng(0)
    first = atoms.get_positions() + rng.normal(0, 0.05, (len(atoms), 3))
    order = rng.permutation(len(atoms))
    # a small net translation plus whole lattice vectors (wrapped away by the minimum image)
    second = first[order] + np.array([0.3, -0.2, 0.15]) + atoms.cell.array[0] - 2 * atoms.cell.array[2]
    match = structure_distance(first, second, atoms.cell.array, True)
    assert match.max_deviation < 1e-9
    np.testing.assert_array_equal(order[match.permutation], np.arange(len(atoms)))
    assert same_basin(first, second, atoms.cell.array, True)


def test_distinct_vacancy_basins_are_far_apart_and_identity_swap_is_ignored():
    from gdeq_ext.datasets.silicon_defects import make_start, teacher_relax

    # inward breathing 0.20 Å relaxes to the open vacancy, 0.35 Å to the reconstructed one (docs/science.md)
    starts = []
    for inward in (0.20, 0.35):
        atoms = diamond_silicon((2, 2, 2))
        site = atoms.get_positions()[0].copy()
        d = atoms.get_positions() - site
        d -= np.round(d / atoms.cell.lengths()) * atoms.cell.lengths()
        neighbours = np.argsort(np.linalg.norm(d, axis=1))[1:5]
        positions = atoms.get_positions()
        positions[neighbours] -= inward * d[neighbours] / np.linalg.norm(d[neighbours], axis=1, keepdims=True)
        atoms.set_positions(positions)
        del atoms[0]
        starts.append(atoms)
    ends = teacher_relax(starts)
    cell = starts[0].cell.array
    match = structure_distance(ends[0]["positions"], ends[1]["positions"], cell, True)
    assert match.max_deviation > 0.4  # measured 0.56 Å on the four neighbours
    assert not same_basin(ends[0]["positions"], ends[1]["positions"], cell, True)
    # an interstitial end state with two atoms' labels swapped is the same structure
    start = make_start("tetrahedral_kick", 64, seed=0, index=0)
    (end,) = teacher_relax([start])
    swapped = end["positions"].copy()
    swapped[[0, -1]] = swapped[[-1, 0]]
    assert structure_distance(end["positions"], swapped, start.cell.array, True).max_deviation < 1e-9


def test_cluster_rotation_is_removed_when_no_axis_is_periodic():
    rng = np.random.default_rng(1)
    cluster = rng.normal(0, 2.0, (13, 3))
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    order = rng.permutation(13)
    moved = (cluster @ rotation.T + 5.0)[order]
    match = structure_distance(cluster, moved, None, False)
    assert match.max_deviation < 1e-8
    # without rotation removal the same pair differs
    assert structure_distance(cluster, moved, None, False, rotate=False).max_deviation > 0.1


def test_minimum_image_in_a_skewed_cell_matches_brute_force():
    cell = np.array([[4.0, 0, 0], [3.6, 2.0, 0], [0, 0, 5.0]])  # strongly sheared
    rng = np.random.default_rng(2)
    vectors = rng.uniform(-8, 8, (50, 3))
    ours = minimum_image_vectors(vectors, cell, [True, True, False])
    shifts = np.array([[i, j, 0] for i in range(-6, 7) for j in range(-6, 7)]) @ cell
    brute = vectors[:, None, :] + shifts[None]
    best = brute[np.arange(50), np.argmin(np.linalg.norm(brute, axis=2), axis=1)]
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(best, axis=1), atol=1e-12)


def test_label_basins_clusters_energies_per_group():
    energies = [4.337, 2.835, 4.3372, 4.264, 5.189, 4.615]
    groups = ["v", "v", "v", "v", "i", "i"]
    assert label_basins(energies, groups) == [2, 0, 2, 1, 1, 0]
    with pytest.raises(KeyError):
        same_basin(np.zeros((1, 3)), np.zeros((1, 3)), None, False, metric="nope")


@pytest.mark.slow
def test_basins_benchmark_tiny_end_to_end(tmp_path):
    """benchmarks/basins.py with two seeds and one step per method writes every cell, the summary JSON, markdown and
    plot; a second run with --resume runs nothing, and a changed protocol is refused (~45 s)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from gdeq_ext.potentials import MLIP

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "basins.py"
    model = tmp_path / "mlip.pt"
    MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=8).to(torch.float32).save(model)
    output = tmp_path / "basins"
    command = [sys.executable, str(script), "--quick", "--model", str(model), "--n-train", "4", "--n-val", "0",
               "--n-test", "3", "--seeds", "2", "--steps", "1", "--batch-size", "2", "--windows", "2",
               "--variant-window", "2", "--bptt-steps", "3", "--max-steps", "30", "--output", str(output),
               "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GDEQ_EXT_CACHE": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "summary.json").read_text())
    assert report["protocol"]["n_test"] == 3 and report["machine"]["cpu"]
    names = {"BPTT (T=3)", "BPTT checkpointed (T=3)", "implicit", "hybrid K=2", "hybrid K=2, guidance, β=0",
             "hybrid K=2, guidance, β=1"}  # fmt: skip
    assert set(report["methods"]) == names
    for name, record in report["methods"].items():
        assert "peak_bytes" in record["memory"] or "error" in record["memory"]
        if record.get("memory_only"):
            continue
        assert record["seeds"] == [0, 1], name
        assert all(0 <= c <= 3 for c in record["correct"])
        assert record["vs_base"]["fixed"] + record["vs_base"]["broken"] <= 6
        assert 0.0 <= record["vs_base"]["p"] <= 1.0
    cell_files = sorted((output / "cells").rglob("lr*_seed*.json"))
    assert len(cell_files) == 2 * 5 and all(p.with_suffix(".pt").exists() for p in cell_files)
    cell = json.loads(cell_files[0].read_text())
    assert cell["train"]["steps_done"] == 1 and len(cell["test"]["per_start_correct"]) == 3
    assert report["base"]["diagnosis"]["verdict"] in {"headroom", "no headroom"}
    assert "vs BPTT" in (output / "summary.md").read_text()
    decided = json.loads((output / "cells" / "decided.json").read_text())
    assert [row["K"] for row in decided["rows"]][:3] == [0, 5, 10] and len(decided["base_correct"]) == 3
    assert "Where the basin is decided" in (output / "summary.md").read_text()
    assert (output / "summary.png").stat().st_size > 0

    before = {p: p.stat().st_mtime_ns for p in cell_files}
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ran 0 cells" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in cell_files} == before
    other = subprocess.run([*command, "--resume", "--steps", "2"], capture_output=True, text=True, env=env)
    assert other.returncode != 0 and "protocol differs" in other.stderr
    fresh = subprocess.run(command, capture_output=True, text=True, env=env)
    assert fresh.returncode != 0 and "--resume" in fresh.stderr

    analysis = subprocess.run([sys.executable, str(script.with_name("basin_analysis.py")), "--study", str(output)],
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    text = (output / "analysis.md").read_text()
    assert all(f"## {k}." in text for k in range(1, 6)) and "implicit" in text
    assert json.loads((output / "analysis.json").read_text())["seeds"]["implicit"] == [0, 1]


def test_basins_cell_locks_ignore_dead_processes(tmp_path):
    """A cell being run by a live process is skipped by another study process; a dead process's lock is not."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import basins

    cell = tmp_path / "cells" / "implicit" / "lr1e-3_seed0.json"
    cell.parent.mkdir(parents=True)
    assert not basins.locked(cell)
    basins.lock_path(cell).write_text(f"{os.getpid()} implicit lr 1e-03 seed 0\n")
    assert basins.locked(cell)
    assert basins.run_cell({"path": str(cell), "kind": "train", "name": "x"}) is None  # held: not run
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    basins.lock_path(cell).write_text(f"{done.stdout.strip()} implicit\n")  # that process has exited
    assert not basins.locked(cell)
