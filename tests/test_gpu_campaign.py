"""The GPU campaign's plumbing on a CPU: the goal evaluation on synthetic GPU results, and the --dry-run end to end
(status lines, the one archive, collect into a scratch folder) — so no lent GPU minute is spent on a broken script."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
STATUS = re.compile(r"^\[campaign\] step (\w+): (ok|FAILED \d+|TIMEOUT|SKIPPED .+) \((\d+) s\)$")
STEPS = (
    "env wheels build pytest memcheck racecheck kernels neighbors memory nccl throughput memory_t800 basins goals "
    "collect"
)


def gpu_goals():
    spec = importlib.util.spec_from_file_location("gpu_goals", SCRIPTS / "gpu_goals.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_goals"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def kernel_records(speedup: float, bytes_per_edge: float) -> list[dict]:
    records = []
    for n_atoms in (512, 4096):
        for operation, fused_s in (("energy+forces", 1e-3), ("H·v", 2e-3), ("(dF/dθ)ᵀw", 2e-3), ("train step", 3e-3)):
            for backend, seconds in (("reference", fused_s * speedup), ("fused", fused_s)):
                records.append(
                    dict(
                        n_atoms=n_atoms,
                        n_edges=16 * n_atoms,
                        operation=operation,
                        backend=backend,
                        time_s=seconds,
                        bytes_per_edge=bytes_per_edge if backend == "fused" else 4 * bytes_per_edge,
                    )
                )
    return records


def memory_records(lengths, peak) -> list[dict]:
    return [
        dict(mode="hybrid", backend="fused", steps_T=t, window=20, sites=64, peak_bytes=peak(t)) for t in lengths
    ] + [dict(mode="bptt", backend="reference", steps_T=t, window=0, sites=64, peak_bytes=t * 2**20) for t in lengths]


def write(folder: Path, name: str, payload: dict) -> None:
    (folder / name).write_text(json.dumps(payload))


def test_goals_read_from_the_jsons(tmp_path):
    module = gpu_goals()
    cuda = {"device": "cuda", "gpu": "NVIDIA H200"}
    write(tmp_path, "kernels_gpu.json", {"machine": cuda, "records": kernel_records(5.0, 300.0)})
    rows = {
        "supercells": [
            {"atoms": a, "pairs": 28 * a, "ours_f32_ms": ms, "ours_f64_ms": ms} for a, ms in ((64, 0.05), (4096, 0.09))
        ],
        "batches": [{"size": 512, "pairs": 512 * 64 * 28, "ours_f32_ms": 0.5}],
    }
    write(tmp_path, "neighbors_gpu.json", {"machine": {"device": "cpu"}, "gpu": rows})
    # Two runs merged: T = 100, 200 and a separate T = 800 run; 2 % apart.
    write(tmp_path, "memory_gpu.json", {"machine": cuda, "records": memory_records((100, 200), lambda t: 100e6)})
    write(tmp_path, "memory_gpu_t800.json", {"machine": cuda, "records": memory_records((800,), lambda t: 102e6)})
    status = {g.name: g.status for g in module.evaluate(tmp_path)}
    assert list(status.values()) == ["MET", "MET", "MET", "MET", "MISSED", "MET"], status

    write(tmp_path, "kernels_gpu.json", {"machine": cuda, "records": kernel_records(3.0, 600.0)})
    write(tmp_path, "memory_gpu_t800.json", {"machine": cuda, "records": memory_records((800,), lambda t: 120e6)})
    goals = module.evaluate(tmp_path)
    assert [g.status for g in goals] == ["MISSED", "MISSED", "MET", "MET", "MISSED", "MISSED"]
    assert "3.00x at 4096 atoms" in goals[1].figure and "K=20, 64 sites: 20.0%" in goals[5].figure

    (tmp_path / "memory_gpu_t800.json").unlink()
    (tmp_path / "kernels_gpu.json").write_text(
        json.dumps({"machine": {"device": "cpu"}, "records": kernel_records(5, 1)})
    )
    goals = module.evaluate(tmp_path)
    assert goals[0].status == "CPU ONLY" and goals[5].status == "NOT MEASURED"
    assert "need 800" in goals[5].figure

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:gpu:start -->\nold\n<!-- bench:gpu:end -->\nafter\n")
    assert module.main([str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "before" in text and "after" in text and "| fused kernels <= 0.5 kB/edge" in text


@pytest.mark.slow
@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "tar", "timeout")), reason="needs bash, tar, timeout")
def test_dry_run_leaves_one_archive_and_a_status_line_per_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_campaign.sh"), "--dry-run", "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[campaign] step ")]
    for line in lines:
        assert STATUS.match(line), line
    status = {STATUS.match(line)[1]: STATUS.match(line)[2] for line in lines}
    assert list(status) == STEPS.split()
    for step in ("env", "pytest", "kernels", "neighbors", "nccl", "throughput", "goals", "collect"):
        assert status[step] == "ok", (step, status[step])
    for step in ("build", "memcheck", "racecheck", "memory", "memory_t800", "basins"):
        assert status[step].startswith("SKIPPED dry run"), (step, status[step])

    assert sorted(p.name for p in out.iterdir()) == ["gpu_campaign.tar.gz", "gpu_campaign_summary.txt"]
    with tarfile.open(out / "gpu_campaign.tar.gz") as archive:
        names = set(archive.getnames())
    for name in (
        "status.tsv",
        "summary.txt",
        "DRY_RUN",
        "kernels_gpu.json",
        "neighbors_gpu.json",
        "throughput_gpu.json",
        "goals.md",
        "junit/pytest_cuda.xml",
        "nccl/collectives.json",
        "logs/collect.log",
    ):
        assert f"gpu_campaign/{name}" in names, name
    summary = (out / "gpu_campaign_summary.txt").read_text()
    assert "DRY RUN" in summary and "[goal] fused kernels" in summary and "pytest (CUDA tests):" in summary

    collected = work / "collected"
    assert (collected / "kernels_gpu.json").exists() and (collected / "gpu_campaign" / "status.tsv").exists()
    assert "<!-- bench:gpu:start -->" in (collected / "README.md").read_text()
    # A dry-run archive is never collected into the committed results by default.
    refused = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_collect.sh"), str(out / "gpu_campaign.tar.gz")], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "dry run" in refused.stderr
