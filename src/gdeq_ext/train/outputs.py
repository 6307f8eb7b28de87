"""The files of a training run: metrics.csv, learning_curves.png, summary.md, model.pt and the checkpoints."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gdeq_ext.potentials.edge_moments_op import has_fused_kernels
from gdeq_ext.train.checkpoints import (
    checkpoint_dir,
    list_checkpoints,
    write_atomically,
)
from gdeq_ext.train.config import Config
from gdeq_ext.train.distributed import DistributedContext
from gdeq_ext.train.metrics import COLUMNS

__all__ = [
    "BestValidation",
    "Outputs",
    "RelaxationFitResult",
    "describe_backend",
    "plot_learning_curves",
]


def describe_backend(model, device) -> str:
    """Which kernels the model's forces run on, for the run's description (learning curves, summary.md)."""
    backend = getattr(model, "backend", None)
    if backend is None:
        return "the model's own kernels"
    if backend != "fused":
        return f"backend {backend!r} (plain PyTorch)"
    if has_fused_kernels(device):
        return "fused backend, compiled kernels"
    return "fused backend requested, but the pure-PyTorch fallback ran (no compiled kernel for this device)"


# ---------------------------------------------------------------------------------------------- result
@dataclass
class RelaxationFitResult:
    """What :func:`fit_relaxation` returns (the model itself is trained in place).

    Attributes:
        steps: optimizer steps done in total (including those before a resume).
        history: one dict per metrics.csv row (keys :data:`COLUMNS`; step 0 = before training).
        initial, final: :func:`evaluate_relaxation` results before and after training, keyed "train" and
            "val" (where evaluated).
        train_time_s: wall time of the training steps in seconds, summed over resumed segments.
        peak_memory_mib: the largest per-step peak (see the module doc).
        resumed_from: the step of the checkpoint this call resumed from, or None.
        resumes: every step a run of this output folder was resumed at, in order (marked on the learning curves).
        best_step: the step whose weights are ``model.pt`` (the best validation, :class:`BestValidation`), or None
            without validation (``model.pt`` is then the last step's).
        interrupted: the run stopped early on SIGINT/SIGTERM (after writing a checkpoint).
        output_dir, checkpoint, model_path, csv_path, png_path, summary_path: files written (None if not).
        description: mode, batch, processes and hardware, for tables.
    """

    steps: int
    history: list[dict]
    initial: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    train_time_s: float = 0.0
    peak_memory_mib: float = math.nan
    resumed_from: int | None = None
    resumes: list[int] = field(default_factory=list)
    best_step: int | None = None
    interrupted: bool = False
    output_dir: str | None = None
    checkpoint: str | None = None
    model_path: str | None = None
    csv_path: str | None = None
    png_path: str | None = None
    summary_path: str | None = None
    description: str = ""

    def table(self) -> str:
        """A markdown table of the evaluations before and after training, with a line on the run."""
        lines = [
            "| pairs | when | ΔQ (Å·amu½) | correct basins | direct | fmax (eV/Å) | converged | FIRE steps |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for split in ("train", "val"):
            for when, source in (("before", self.initial), ("after", self.final)):
                metrics = source.get(split)
                if not metrics:
                    continue
                lines.append(
                    f"| {split} | {when} | {metrics['delta_q']:.3f} | {metrics['correct']}/{metrics['n']} | "
                    f"{metrics.get('correct_direct', '-')}/{metrics['n']} | {metrics['fmax']:.4f} | "
                    f"{100 * metrics['converged']:.0f} % | {metrics['relax_steps']:.0f} |"
                )
        iterations = [row["solver_iterations"] for row in self.history if row.get("solver_iterations") is not None]
        solver = f", {np.mean(iterations):.1f} Hessian-vector products per structure" if iterations else ""
        lines.append("")
        lines.append(
            f"{self.description}; {self.steps} steps in {self.train_time_s:.1f} s, peak memory per step "
            f"{self.peak_memory_mib:.1f} MiB (whole-process peak RSS on a CPU){solver}."
        )
        if self.resumes:
            lines.append(f"Resumed from checkpoints at step {', '.join(map(str, self.resumes))}.")
        if self.best_step is not None:
            last = " (the last step)" if self.best_step == self.steps else "; model_last.pt: the last step's"
            lines.append(f"model.pt: the weights of step {self.best_step}, the best validation{last}.")
        elif self.history:
            lines.append("model.pt: the last step's weights (no validation pairs to choose by).")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- outputs
def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.12g}"  # 12 digits: the loss is compared across runs (DDP vs one process) to 1e-10
    return str(value)


def _write_csv(rows: Sequence[dict], path: str, append: bool = False) -> None:
    exists = append and os.path.exists(path)
    with open(path, "a" if append else "w", newline="") as handle:
        writer = csv.writer(handle)
        if not exists:
            writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_format(row.get(column)) for column in COLUMNS])


@dataclass
class BestValidation:
    """The weights of the best validation so far: the highest correct-basin rate, ties broken by the lower ΔQ.

    ``model.pt`` holds them at the end of a run (``model_last.pt`` the last step's when they differ); step 0, the
    model before training, counts, so a run that only made validation worse says so by saving the start.
    """

    step: int
    key: tuple[float, float]
    model: dict

    @classmethod
    def consider(cls, best: BestValidation | None, step: int, metrics: dict, model) -> BestValidation:
        key = (metrics["correct"] / max(1, metrics["n"]), -float(metrics["delta_q"]))
        if best is not None and not key > best.key:
            return best
        return cls(step, key, {k: v.detach().clone() for k, v in model.state_dict().items()})

    def state(self) -> dict:
        return {"step": self.step, "key": list(self.key), "model": self.model}

    @classmethod
    def from_state(cls, state: dict | None) -> BestValidation | None:
        return None if not state else cls(int(state["step"]), tuple(state["key"]), state["model"])


def plot_learning_curves(
    history: Sequence[dict], path: str | os.PathLike, title: str = "", resumes: Sequence[int] = ()
) -> bool:
    """A PNG of ΔQ, correct-basin rate, fmax, relaxation steps and solver iterations, memory and lr per step;
    a dotted vertical line at every step the run was resumed at.

    Returns False (and warns) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        warnings.warn("matplotlib is not installed: no learning_curves.png (pip install matplotlib)", stacklevel=2)
        return False

    def series(key):
        points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        points = [(s, v) for s, v in points if not (isinstance(v, float) and math.isnan(v))]
        return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])

    panels = [
        ("ΔQ (Å·amu$^{1/2}$)", [("loss", "train (batch)", "-"), ("val_delta_q", "validation", "o-")]),
        (
            "correct-basin rate",
            [
                ("train_basin_rate", "train (batch)", "-"),
                ("val_basin_rate", "validation", "o-"),
                ("val_basin_rate_direct", "validation, direct", "x:"),
            ],
        ),
        ("final fmax (eV/Å)", [("train_fmax", "train (batch)", "-"), ("val_fmax", "validation", "o-")]),
        (
            "per structure",
            [("relax_steps", "relaxation steps", "-"), ("solver_iterations", "Hessian-vector products", "-")],
        ),
        ("peak memory per step (MiB)", [("peak_memory_mib", "", "-")]),  # note below
        ("learning rate", [("lr", "", "-")]),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (label, curves) in zip(axes.flat, panels, strict=True):
        for key, name, style in curves:
            x, y = series(key)
            if x:
                axis.plot(x, y, style, label=name or None, markersize=4)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        if any(name for _, name, _ in curves):
            axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        for k, at in enumerate(resumes):
            axis.axvline(at, color="grey", linestyle=":", linewidth=1, label="resumed" if k == 0 else None)
    if resumes:
        axes.flat[0].legend(fontsize=8)
    # On a CPU this is the whole process's peak resident memory (Python, torch, data, ~hundreds of MiB), not the
    # step's own allocation that benchmarks/memory.py reports above the step start: the two differ by the baseline.
    memory_note = "whole-process peak RSS on a CPU;\nbenchmarks/memory.py: above the step start"
    axes.flat[4].text(0.02, 0.02, memory_note, transform=axes.flat[4].transAxes, fontsize=7, color="dimgrey")
    axes.flat[0].set_yscale("log") if any(series("loss")[1]) and min(series("loss")[1]) > 0 else None
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


class Outputs:
    """Files of a run in ``output_dir`` (rank 0 writes; the other ranks only take part in nothing here)."""

    def __init__(self, output_dir: str, context: DistributedContext):
        self.dir = output_dir
        self.main = context.is_main
        self.csv = os.path.join(output_dir, "metrics.csv")
        if self.main:
            os.makedirs(checkpoint_dir(output_dir), exist_ok=True)

    def start(self, config: Config, history: list[dict], resumed: bool) -> None:
        if not self.main:
            return
        import json

        with open(os.path.join(self.dir, "config.json"), "w") as handle:
            json.dump(config.to_dict(), handle, indent=2)
        # On resume the file is rewritten from the checkpoint's history: rows of steps after the checkpoint
        # (done by the interrupted run, redone now) must not appear twice.
        _write_csv(history, self.csv)

    def append(self, row: dict) -> None:
        if self.main:
            _write_csv([row], self.csv, append=True)

    def checkpoint(self, data: dict, step: int, keep: int) -> str | None:
        if not self.main:
            return None
        folder = checkpoint_dir(self.dir)
        path = os.path.join(folder, f"step_{step:08d}.pt")
        write_atomically(data, path)
        # The newest `keep` by step number (unreadable ones were renamed out of the rotation when skipped).
        for _, old in list_checkpoints(self.dir)[max(1, keep) :]:
            os.remove(old)
        return path

    def finish(self, model, result: RelaxationFitResult, plot: bool, best: BestValidation | None = None) -> None:
        """Write model.pt (the best validation's weights; the last step's without validation), model_last.pt
        (the last step's, when they differ), learning_curves.png and summary.md. ``model`` keeps the last weights."""
        if not self.main:
            return
        result.csv_path = self.csv
        model_path = os.path.join(self.dir, "model.pt")
        last_path = os.path.join(self.dir, "model_last.pt")
        if best is not None and best.step != result.steps:
            _save(model, last_path)
            last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best.model)
            _save(model, model_path)
            model.load_state_dict(last)
        else:
            _save(model, model_path)
            if os.path.exists(last_path):
                os.remove(last_path)
        result.model_path = model_path
        png = os.path.join(self.dir, "learning_curves.png")
        if plot and plot_learning_curves(result.history, png, result.description, result.resumes):
            result.png_path = png
        summary = os.path.join(self.dir, "summary.md")
        with open(summary, "w") as handle:
            handle.write(result.table() + "\n")
        result.summary_path = summary


def _save(model, path: str) -> None:
    if hasattr(model, "save"):
        model.save(path)
    else:
        torch.save(model.state_dict(), path)
