"""Shared by the benchmarks: naming the hardware, and writing JSON + markdown results."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from gdeq_ext.hardware import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"  # the committed copies (README tables link to them)
# Where a run writes by default: untracked (runs/ is git-ignored), so running a benchmark leaves `git status` clean.
OUTPUT = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
README = Path(__file__).resolve().parents[1] / "README.md"  # the tables that `--readme` updates


def machine(device: str) -> dict:
    """What the numbers were measured on: CPU model and core count, GPU name, versions, date."""
    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_label(info: dict) -> str:
    if info.get("gpu"):
        return f"{info['gpu']} (torch {info['torch']})"
    threads = info["torch_threads"]
    plural = "s" if threads != 1 else ""
    return f"{info['cpu']}, {info['cpu_cores']} cores, {threads} torch thread{plural} (torch {info['torch']})"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def update_readme_section(readme: Path, name: str, content: str) -> None:
    """Replace the text between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` in README.md."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} section to update")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{content.strip()}\n{end}{after}")


def fit_and_save(model, data, path: Path, **fit_options) -> Path:
    """Force-match ``model`` to ``data`` with :func:`gdeq_ext.train.fit_forces` (no progress bar), print the fit's
    summary, and save the model to ``path`` (the benchmarks' cached base potentials)."""
    from gdeq_ext.train import fit_forces

    result = fit_forces(model, data, progress=False, **fit_options)
    print("  " + result.summary(), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def warm_up_cell():
    """One rattled 8-atom diamond Si cell (ase.Atoms): the workers' warm-up before a CPU memory measurement pages in
    code and libraries without leaving a freed heap the size of the measured step behind."""
    from gdeq_ext.data.structures import diamond_silicon

    atoms = diamond_silicon((1, 1, 1))
    atoms.rattle(0.05, seed=0)
    return atoms
