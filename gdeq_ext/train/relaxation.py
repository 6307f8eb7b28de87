"""Training a potential through relaxations: :func:`fit_relaxation`, its metrics, checkpoints and outputs.

One training step takes a global batch of relaxation pairs (start, teacher-relaxed reference), relaxes
every start with the potential in the configured mode (``bptt`` / ``implicit`` / ``hybrid`` with window K,
:mod:`gdeq_ext.relax`), and minimises

    loss = mean over the global batch of ΔQ_s          (ΔQ: :func:`gdeq_ext.delta_q`, Å·amu^½)

Metrics per step (``metrics.csv``, ``learning_curves.png``):

* ΔQ (the loss), and the **correct-basin rate**: the share of structures whose relaxed positions lie within
  ``basin_threshold`` (default 0.1 Å) of the reference by :func:`basin_distance`, the per-atom RMS of the
  minimum-image displacements after pairing atoms (permutation-invariant) and removing the net translation;
* fmax (eV/Å) and the converged share at the end of each relaxation, relaxation steps per structure;
* solver iterations: Hessian-vector products per structure of the implicit backward (implicit and hybrid);
* trust (implicit and hybrid; ``gdeq_ext.relax.validity``): ``skipped`` structures whose gradient contribution was
  zeroed (``relax.on_invalid = "skip"``, the default, or a non-finite/diverged solve), of which ``saddles`` (negative
  curvature at X*), ``inexact`` (the Newton polish missed its tolerance) and ``solve_failed`` (the backward solve
  missed its tolerance); ``fixed_point_error``, the largest estimated distance of a relaxed structure from its exact
  fixed point (Å); ``nonfinite_gradient`` is 1 when the summed gradient was not finite and the optimizer step was
  skipped (it never reaches the optimizer);
* peak memory of the step (MiB): ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the process's peak
  resident memory during the step (VmHWM, reset before it: Python, torch and the data included);
* validation metrics every ``eval_every`` steps, from a fixed protocol for every mode: FIRE (ASE's
  defaults) from the start to ``fmax``, graph-free.

Checkpoints (every ``checkpoint_every`` steps, at the end, and when SIGINT/SIGTERM asks the run to stop)
hold the model, optimizer, scheduler, step, data order, the RNG states (torch, numpy, python, CUDA) and the
metric history, so a resumed run continues exactly where the checkpoint was taken: its parameters equal an
uninterrupted run's bit for bit (on the same hardware, threads and world size).

Data-parallel over ``torch.distributed`` ranks: see :mod:`gdeq_ext.train.distributed`.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from gdeq_ext.data.batch import Batch
from gdeq_ext.data.relaxation_pairs import RelaxationPairs, read_relaxation_pairs
from gdeq_ext.gradients.implicit_function import InvalidGradientError
from gdeq_ext.hardware import describe
from gdeq_ext.loss import delta_q
from gdeq_ext.relax import BPTTRelax, HybridRelax, ImplicitRelax, PolishOptions, fire
from gdeq_ext.relax.checks import NonFiniteError
from gdeq_ext.train.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_resume,
    checkpoint_dir,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    model_signature,
    remove_stale_temporaries,
    write_atomically,
)
from gdeq_ext.train.config import Config, ConfigError, OptimConfig, RelaxConfig
from gdeq_ext.train.data import seed_for
from gdeq_ext.train.distributed import (
    DistributedContext,
    all_reduce_gradients,
    all_reduce_max,
    all_reduce_sum,
    broadcast_module,
    shard,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "COLUMNS",
    "RelaxationFitResult",
    "TrainingStepError",
    "basin_distance",
    "correct_basin",
    "evaluate_relaxation",
    "find_checkpoint",
    "fit_relaxation",
    "load_checkpoint",
    "make_optimizer",
    "make_relaxation",
    "make_scheduler",
    "plot_learning_curves",
]

# metrics.csv columns, in order. Validation columns are empty on steps without an evaluation; step 0 is the
# evaluation before training.
COLUMNS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "train_basin_rate",
    "train_fmax",
    "train_converged",
    "relax_steps",
    "solver_iterations",
    "skipped",
    "saddles",
    "inexact",
    "solve_failed",
    "fixed_point_error",
    "nonfinite_gradient",
    "grad_norm",
    "peak_memory_mib",
    "step_time_s",
    "wall_time_s",
    "val_delta_q",
    "val_basin_rate",
    "val_fmax",
    "val_converged",
    "val_relax_steps",
)


# ---------------------------------------------------------------------------------------------- basins
def basin_distance(positions: torch.Tensor, reference: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-structure RMS distance to the reference, (n_systems,) in Å per atom, detached.

    sqrt(mean_j ||d_j - t_s||²) after pairing atoms of the same species optimally
    (:func:`gdeq_ext.data.basins.structure_distance`: a linear assignment on minimum-image distances, so an
    interstitial that swapped identity with a lattice atom still matches) and removing the net translation t_s
    (and, for clusters with no periodic axis, the best rotation). Unweighted, unlike ΔQ, so the threshold is a
    length. Runs on the CPU in float64 (an assignment per structure; evaluation only, never differentiated).
    """
    from gdeq_ext.data.basins import structure_distance

    moved = positions.detach().to("cpu", torch.float64).numpy()
    target = reference.detach().to("cpu", torch.float64).numpy()
    cells = batch.cell.detach().to("cpu", torch.float64).numpy()
    pbc = batch.pbc.cpu().numpy()
    numbers = batch.numbers.cpu().numpy()
    distances = [
        structure_distance(moved[a:b], target[a:b], cells[s], pbc[s], numbers[a:b]).rmsd if b > a else 0.0
        for s, (a, b) in enumerate(batch.ranges())
    ]
    return torch.tensor(distances, dtype=positions.dtype, device=positions.device)


def correct_basin(
    positions: torch.Tensor, reference: torch.Tensor, batch: Batch, threshold: float = 0.1
) -> torch.Tensor:
    """(n_systems,) bool: :func:`basin_distance` < ``threshold`` Å (default 0.1)."""
    return basin_distance(positions, reference, batch) < threshold


# ---------------------------------------------------------------------------------------------- factories
def make_relaxation(model, relax: RelaxConfig, warn: bool = False):
    """The relaxation object of ``relax.mode`` around ``model`` (callable on a Batch -> RelaxResult).

    ``warn`` is off by default in training: unconverged relaxations are counted in the metrics every step
    (``train_converged``) instead of warning once per location.
    """
    # None keeps each mode's own default for recomputing window steps in backward.
    checkpoint = {} if relax.checkpoint_window is None else {"checkpoint": relax.checkpoint_window}
    if relax.mode == "bptt":
        return BPTTRelax(
            model, steps=relax.bptt_steps, alpha=relax.alpha, maxstep=relax.maxstep, fmax=relax.fmax, **checkpoint
        )
    common = dict(
        fmax=relax.fmax,
        max_steps=relax.max_relax_steps,
        solver=relax.solver,
        rtol=relax.rtol,
        max_iter=relax.max_iter,
        damping=relax.damping,
        warn=warn,
        on_invalid=relax.on_invalid,
        polish=PolishOptions(newton_steps=relax.newton_steps),
    )
    if relax.mode == "implicit":
        return ImplicitRelax(model, **common)
    if relax.mode == "hybrid":
        return HybridRelax(
            model,
            window=relax.window,
            handoff=relax.handoff,
            **checkpoint,
            alpha=relax.alpha,
            maxstep=relax.maxstep,
            **common,
        )
    raise ConfigError(f"relax.mode = {relax.mode!r} is not one of ['bptt', 'implicit', 'hybrid']")


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with ``momentum``) over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    raise ConfigError(f"optim.optimizer = {optim.optimizer!r} is not one of ['adam', 'adamw', 'sgd']")


class _Schedule:
    """The learning-rate factor after ``k`` updates (a picklable callable, so LambdaLR can be checkpointed)."""

    def __init__(self, optim: OptimConfig, total_steps: int):
        self.kind = optim.schedule
        self.warmup = optim.warmup_steps
        self.total = total_steps
        self.floor = optim.min_lr / optim.lr
        self.decay_steps = max(1, optim.decay_steps)
        self.gamma = optim.gamma

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        k -= self.warmup
        progress = min(1.0, k / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - (1.0 - self.floor) * progress
        if self.kind == "cosine":
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return max(self.floor, self.gamma ** (k // self.decay_steps))
        if self.kind == "exponential":
            return max(self.floor, self.gamma**k)
        return 1.0


def make_scheduler(optimizer, optim: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``optim.schedule`` with ``optim.warmup_steps`` of linear warm-up, stepped once per training step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(optim, total_steps))


# ---------------------------------------------------------------------------------------------- errors
class TrainingStepError(RuntimeError):
    """A training step or an evaluation failed on some structures: the message names the step and the dataset
    frames (indices into the pairs, and their file) of the structures at fault, then the original error.

    Attributes:
        step: the optimizer step being computed (1-based; 0 for the evaluation before training).
        frames: the dataset frames of the batch that failed (all of them; the message marks the ones at fault).
    """

    def __init__(self, message: str, step: int, frames: Sequence[int]):
        super().__init__(message)
        self.step = step
        self.frames = list(frames)


_STRUCTURE = re.compile(r"\bstructure (\d+)\b")

# Failures that name batch structures and that a training step turns into a TrainingStepError.
_STEP_FAILURES = (NonFiniteError, InvalidGradientError, ValueError)


def _step_failure(error: Exception, what: str, step: int, frames: Sequence[int], pairs: RelaxationPairs):
    """The error of a relaxation of the batch ``frames``, with each "structure s" named as its dataset frame.
    ``what``: "training step 3", "evaluation at step 0", ..."""
    frames = [int(k) for k in frames]

    def frame(match: re.Match) -> str:
        s = int(match.group(1))
        return f"dataset frame {frames[s]} (batch structure {s})" if s < len(frames) else match.group(0)

    source = f" of {pairs.source}" if pairs.source else ""
    message = f"{what}, batch of dataset frames{source} {frames}: {type(error).__name__}: " + _STRUCTURE.sub(
        frame, str(error)
    )
    return TrainingStepError(message, step, frames)


# ---------------------------------------------------------------------------------------------- evaluation
_EVAL_FIELDS = ("n", "delta_q", "correct", "fmax", "converged", "relax_steps")


def _relax_and_measure(model, pairs: RelaxationPairs, indices, dtype, device, fmax, max_steps, threshold):
    batch, reference = pairs.batch(indices, dtype=dtype, device=device)
    solved = fire(model, batch, fmax=fmax, max_steps=max_steps, warn=False)
    positions = solved.positions
    return torch.stack(
        [
            torch.tensor(float(batch.n_systems), dtype=torch.float64),
            delta_q(positions, reference, batch).double().sum().cpu(),
            correct_basin(positions, reference, batch, threshold).double().sum().cpu(),
            solved.fmax.double().sum().cpu(),
            solved.converged.double().sum().cpu(),
            solved.steps.double().sum().cpu(),
        ]
    )


def evaluate_relaxation(
    model,
    pairs: RelaxationPairs,
    *,
    fmax: float = 0.01,
    max_steps: int = 1000,
    basin_threshold: float = 0.1,
    batch_size: int = 16,
    context: DistributedContext | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Relax every start with FIRE (graph-free) under ``model``; compare with the references.

    The protocol is the same for every training mode (FIRE with ASE's defaults to ``fmax`` eV/Å, at most
    ``max_steps`` steps), so models trained in different modes are compared on equal terms. With a
    distributed ``context`` the pairs are shared out over the ranks and the sums all-reduced. ``step`` (the
    training step the model is at) only labels errors: a failed relaxation raises :class:`TrainingStepError`
    naming the step and the dataset frames.

    Returns:
        ``n`` structures, ``delta_q`` mean ΔQ (Å·amu^½), ``basin_rate`` share in the correct basin,
        ``correct`` their count, ``fmax`` mean final fmax (eV/Å), ``converged`` share, ``relax_steps``
        mean FIRE steps.
    """
    context = context or DistributedContext()
    parameter = next(iter(model.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float64
    device = parameter.device if parameter is not None else torch.device("cpu")
    mine = shard(range(len(pairs)), context.rank, context.world_size)
    totals = torch.zeros(len(_EVAL_FIELDS), dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        try:
            totals += _relax_and_measure(model, pairs, chunk, dtype, device, fmax, max_steps, basin_threshold)
        except _STEP_FAILURES as error:
            raise _step_failure(error, f"evaluation at step {step}", step, chunk, pairs) from error
    totals = all_reduce_sum(totals, context)
    n = max(float(totals[0]), 1.0)
    out = dict(zip(_EVAL_FIELDS, totals.tolist(), strict=True))
    return {
        "n": int(out["n"]),
        "delta_q": out["delta_q"] / n,
        "basin_rate": out["correct"] / n,
        "correct": int(round(out["correct"])),
        "fmax": out["fmax"] / n,
        "converged": out["converged"] / n,
        "relax_steps": out["relax_steps"] / n,
    }


# ---------------------------------------------------------------------------------------------- state
class _DataOrder:
    """Epoch-wise shuffled order of the training pairs, determined by (seed, epoch) alone.

    A global batch never straddles two epochs (the last batch of an epoch may be smaller), so the state is
    just (epoch, cursor) and a resumed run draws exactly the batches the interrupted one would have.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.n, self.seed, self.epoch, self.cursor = n, seed, epoch, cursor

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed_for("relaxation-order", self.seed, epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def next(self, batch_size: int) -> list[int]:
        if self.cursor >= self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        chosen = self.permutation(self.epoch)[self.cursor : self.cursor + batch_size]
        self.cursor += len(chosen)
        return chosen

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


def _rng_state() -> dict:
    # The legacy global numpy RNG is what user code and libraries draw from: it is saved, not used here.
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed_for("numpy", seed))  # noqa: NPY002 (the global RNG, for user code and libraries)
    random.seed(seed_for("python", seed))


class _PeakMemory:
    """Peak memory of one step in MiB: the CUDA allocator's peak (tensors only), or on Linux CPUs the process's
    peak resident memory during the step (VmHWM, reset through /proc/self/clear_refs before it; this includes
    Python, torch and the data, and memory the allocator keeps from earlier steps)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.available = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.available = False

    def read_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.available:
            return math.nan
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return math.nan


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


def plot_learning_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> bool:
    """A PNG of ΔQ, correct-basin rate, fmax, relaxation steps and solver iterations, memory and lr per step.

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
        ("correct-basin rate", [("train_basin_rate", "train (batch)", "-"), ("val_basin_rate", "validation", "o-")]),
        ("final fmax (eV/Å)", [("train_fmax", "train (batch)", "-"), ("val_fmax", "validation", "o-")]),
        (
            "per structure",
            [("relax_steps", "relaxation steps", "-"), ("solver_iterations", "Hessian-vector products", "-")],
        ),
        ("peak memory per step (MiB)", [("peak_memory_mib", "", "-")]),
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
    axes.flat[0].set_yscale("log") if any(series("loss")[1]) and min(series("loss")[1]) > 0 else None
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


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
            "| pairs | when | ΔQ (Å·amu½) | correct basins | fmax (eV/Å) | converged | FIRE steps |",
            "|---|---|---|---|---|---|---|",
        ]
        for split in ("train", "val"):
            for when, source in (("before", self.initial), ("after", self.final)):
                metrics = source.get(split)
                if not metrics:
                    continue
                lines.append(
                    f"| {split} | {when} | {metrics['delta_q']:.3f} | {metrics['correct']}/{metrics['n']} | "
                    f"{metrics['fmax']:.4f} | {100 * metrics['converged']:.0f} % | {metrics['relax_steps']:.0f} |"
                )
        iterations = [row["solver_iterations"] for row in self.history if row.get("solver_iterations") is not None]
        solver = f", {np.mean(iterations):.1f} Hessian-vector products per structure" if iterations else ""
        lines.append("")
        lines.append(
            f"{self.description}; {self.steps} steps in {self.train_time_s:.1f} s, peak memory per step "
            f"{self.peak_memory_mib:.1f} MiB{solver}."
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- training
def _resolve_config(config, overrides: dict) -> Config:
    if config is None:
        config = Config()
    elif isinstance(config, dict):
        config = Config.from_dict(config)
    elif not isinstance(config, Config):
        raise TypeError(f"config must be a Config, a dict or None, got {type(config).__name__}")
    return config.update(overrides, source="fit_relaxation") if overrides else config.copy()


def _as_pairs(data, what: str) -> RelaxationPairs | None:
    if data is None:
        return None
    if isinstance(data, RelaxationPairs):
        return data
    if isinstance(data, str | os.PathLike):
        return read_relaxation_pairs(data)
    pairs = RelaxationPairs(list(data), source=what)
    if not len(pairs):
        raise ValueError(f"the {what} set is empty")
    return pairs


class _StopRequest:
    """SIGINT/SIGTERM ask the run to stop at the end of the current step (after a checkpoint); a second
    signal interrupts at once. Only installed in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


def _mean(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


def fit_relaxation(
    model: torch.nn.Module,
    train,
    *,
    validation=None,
    config: Config | dict | None = None,
    output_dir: str | os.PathLike | None = None,
    callback: Callable[[int, dict], None] | None = None,
    context: DistributedContext | None = None,
    **overrides,
) -> RelaxationFitResult:
    """Train ``model`` (in place) so that relaxing each start under it lands on the reference structure.

    Args:
        model: the potential (Batch -> energies (n_systems,) eV), e.g. a force-matched
            :class:`~gdeq_ext.MLIP`; trained in its own dtype and on its own device.
        train: training pairs: :class:`~gdeq_ext.data.RelaxationPairs`, a list of
            :class:`~gdeq_ext.data.RelaxationPair`, or an extxyz path.
        validation: validation pairs (same forms), evaluated before training, every ``train.eval_every``
            steps and at the end (default none).
        config: :class:`~gdeq_ext.train.config.Config` or nested dict; only [relax], [optim] and [train] are
            used here (defaults: hybrid K=10, Adam lr 1e-3, 100 steps of 4 structures).
        output_dir: where checkpoints and outputs go (default ``train.output_dir``; None writes nothing and
            cannot resume).
        callback: called as ``callback(step, row)`` after every step (and its checkpoint); ``row`` is the
            metrics.csv row. An exception raised there stops the run like a crash would.
        context: the distributed context (default: the initialised process group, else one process).
        overrides: flat settings of [relax], [optim], [train], e.g. ``mode="implicit"``, ``lr=3e-4``,
            ``steps=20``, or dotted ``**{"relax.window": 5}``.

    Returns:
        :class:`RelaxationFitResult` (history, evaluations before/after, timings, paths).

    Raises:
        ConfigError: an unknown setting or a value out of range; resuming with changed [relax]/[optim]
            settings, batch size or seed.
        NonFiniteError: forces became NaN/inf; names the step and the dataset frames of the batch.
        KeyboardInterrupt: after SIGINT/SIGTERM, once the current step and its checkpoint are written.

    Under ``torchrun`` every rank calls this with the same arguments: each relaxes its shard of every global
    batch and the summed gradient equals the single-process gradient of the mean over the global batch.
    """
    from tqdm.auto import tqdm

    config = _resolve_config(config, overrides)
    relax_config, optim_config, run = config.relax, config.optim, config.train
    output_dir = os.fspath(output_dir) if output_dir is not None else run.output_dir
    run.output_dir = output_dir
    parameter = next(iter(model.parameters()), None)
    if parameter is None:
        raise ValueError("the model has no parameters to train")
    dtype, device = parameter.dtype, parameter.device
    context = context or DistributedContext.current(device)
    train = _as_pairs(train, "training")
    validation = _as_pairs(validation, "validation")
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer = make_optimizer(model, optim_config)
    scheduler = make_scheduler(optimizer, optim_config, run.steps)
    relax = make_relaxation(model, relax_config)
    order = _DataOrder(len(train), run.seed)
    memory = _PeakMemory(device)
    evaluate = dict(
        fmax=relax_config.fmax,
        max_steps=relax_config.max_relax_steps,
        basin_threshold=run.basin_threshold,
        context=context,
    )

    # Rank 0 decides and reads; the other ranks get its checkpoint over the process group, so nodes without a
    # shared file system resume too. The newest checkpoint that loads is used (unreadable newer ones are named
    # in a CheckpointWarning); a folder whose checkpoints all fail to load is an error, not a fresh start.
    if context.is_main and output_dir is not None:
        remove_stale_temporaries(output_dir)
    loaded = None
    if context.is_main and run.resume != "never":
        try:
            loaded = load_latest_checkpoint(output_dir, map_location="cpu")
        except CheckpointError as error:
            if not context.distributed:
                raise
            loaded = error  # every rank raises it below, none waits in a broadcast for rank 0
    if context.distributed:
        shared = [loaded]
        dist.broadcast_object_list(shared, src=0)
        loaded = shared[0]
        if isinstance(loaded, CheckpointError):
            raise CheckpointError(str(loaded))
    if run.resume == "always" and loaded is None:
        raise FileNotFoundError(f"train.resume = 'always' but there is no checkpoint in {output_dir}/checkpoints")
    existing = find_checkpoint(output_dir) if context.is_main else None
    if run.resume == "never" and existing is not None:
        raise FileExistsError(
            f"{output_dir} already holds checkpoints ({existing}) and train.resume = 'never': choose "
            f"another output_dir or resume"
        )
    fingerprint = train.fingerprint()
    history: list[dict] = []
    initial: dict = {}
    step, train_time, resumed_from = 0, 0.0, None
    checkpoint_path = None
    if loaded is not None:
        checkpoint_path, saved = loaded
        check_resume(saved, config.to_dict(), model, len(train), fingerprint, checkpoint_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, train_time, resumed_from = int(saved["step"]), float(saved["train_time_s"]), int(saved["step"])
        order = _DataOrder(len(train), run.seed, **saved["order"])
        history, initial = list(saved["history"]), dict(saved["initial"])
        _set_rng_state(saved["rng"])
    else:
        _seed_everything(run.seed)
        broadcast_module(model, context)
        model.eval()
        if validation is not None:
            initial["val"] = evaluate_relaxation(model, validation, **evaluate)
        if run.eval_train:
            initial["train"] = evaluate_relaxation(model, train, **evaluate)
        history.append(_row(0, 0, None, initial.get("val")))

    description = (
        f"{relax_config.mode}"
        + (f" K={relax_config.window}" if relax_config.mode == "hybrid" else "")
        + (f" T={relax_config.bptt_steps}" if relax_config.mode == "bptt" else "")
        + f", batch {run.batch_size} structures over {context.world_size} process"
        + ("es" if context.world_size > 1 else "")
        + f", {len(train)} training pairs, {str(dtype).removeprefix('torch.')}, {describe(device)}"
    )
    files = _Outputs(output_dir, context) if output_dir else None
    if files is not None:
        files.start(config, history, resumed=resumed_from is not None)

    signature = model_signature(model)

    def save_checkpoint(at_step, order_state, rng_state):
        if files is None:
            return None
        return files.checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "step": at_step,
                "train_time_s": train_time,
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "order": order_state,
                "rng": rng_state,
                "history": history,
                "initial": initial,
                "config": config.to_dict(),
                "world_size": context.world_size,
                "n_train": len(train),
                "data_fingerprint": fingerprint,
                "model_signature": signature,
            },
            at_step,
            run.keep_checkpoints,
        )

    bar = tqdm(
        total=run.steps,
        initial=min(step, run.steps),
        disable=not (run.progress and context.is_main),
        desc=f"fit_relaxation ({relax_config.mode})",
        unit="step",
    )
    last_checkpoint = checkpoint_path
    last_validation = None
    interrupted = False
    with _StopRequest() as stop:
        while step < run.steps:
            model.train()
            started = time.perf_counter()
            global_indices = order.next(run.batch_size)
            local = shard(global_indices, context.rank, context.world_size)
            optimizer.zero_grad(set_to_none=True)
            memory.reset()
            # n, ΔQ, basin, fmax, converged, steps, iterations, skipped, saddles, inexact, solve_failed
            sums = torch.zeros(11, dtype=torch.float64)
            fixed_point_error = -1.0  # "none": a NaN would not survive the all-reduce max
            if local:
                batch, reference = train.batch(local, dtype=dtype, device=device)
                try:
                    result = relax(batch)
                    dq = delta_q(result.positions, reference, batch)
                    # The sum over this rank's structures over the *global* batch size: summed over ranks, the
                    # gradient is the one of the mean over the global batch (distributed.py).
                    (dq.sum() / len(global_indices)).backward()
                except _STEP_FAILURES as error:
                    raise _step_failure(error, f"training step {step + 1}", step + 1, local, train) from error
                iterations = result.iterations
                trust = _trust_counts(result)
                if result.fixed_point_error is not None:
                    fixed_point_error = float(
                        torch.nan_to_num(result.fixed_point_error, nan=0.0, posinf=math.inf).max()
                    )
                sums += torch.stack(
                    [
                        torch.tensor(float(len(local)), dtype=torch.float64),
                        dq.detach().double().sum().cpu(),
                        correct_basin(result.positions, reference, batch, run.basin_threshold).double().sum().cpu(),
                        result.fmax.double().sum().cpu(),
                        result.converged.double().sum().cpu(),
                        result.steps.double().sum().cpu(),
                        iterations.double().sum().cpu() if iterations is not None else torch.tensor(math.nan),
                        *trust,
                    ]
                )
            all_reduce_gradients(params, context)
            grad_norm = _gradient_norm(params)
            # Identical on every rank (the gradients were summed), so every rank skips or steps alike.
            nonfinite = not math.isfinite(grad_norm)
            if nonfinite:
                for p in params:
                    p.grad = None
            elif optim_config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, optim_config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            if not nonfinite:
                optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - started
            peaks = torch.tensor([memory.read_mib(), float(stop.requested), fixed_point_error], dtype=torch.float64)
            sums = all_reduce_sum(sums, context)
            peaks = all_reduce_max(peaks, context)
            train_time += elapsed
            n = float(sums[0])
            row = _row(
                step,
                order.epoch,
                lr,
                None,
                loss=_mean(float(sums[1]), n),
                train_basin_rate=_mean(float(sums[2]), n),
                train_fmax=_mean(float(sums[3]), n),
                train_converged=_mean(float(sums[4]), n),
                relax_steps=_mean(float(sums[5]), n),
                solver_iterations=None if math.isnan(float(sums[6])) else _mean(float(sums[6]), n),
                skipped=int(sums[7]),
                saddles=int(sums[8]),
                inexact=int(sums[9]),
                solve_failed=int(sums[10]),
                fixed_point_error=None if float(peaks[2]) < 0 else float(peaks[2]),
                nonfinite_gradient=int(nonfinite),
                grad_norm=grad_norm,
                peak_memory_mib=float(peaks[0]),
                step_time_s=elapsed,
                wall_time_s=train_time,
            )
            if validation is not None and ((run.eval_every and step % run.eval_every == 0) or step == run.steps):
                model.eval()
                last_validation = (step, evaluate_relaxation(model, validation, step=step, **evaluate))
                row.update(
                    {k: v for k, v in _row(step, order.epoch, lr, last_validation[1]).items() if k.startswith("val_")}
                )
            history.append(row)
            if files is not None:
                files.append(row)
            due = (run.checkpoint_every and step % run.checkpoint_every == 0) or step == run.steps
            if due or bool(peaks[1]):
                last_checkpoint = save_checkpoint(step, order.state(), _rng_state()) or last_checkpoint
            postfix = {"ΔQ": f"{row['loss']:.3f}", "basin": f"{row['train_basin_rate']:.2f}"}
            if row["skipped"] or nonfinite:
                postfix["skipped"] = row["skipped"] + (len(global_indices) if nonfinite else 0)
            if row.get("val_delta_q") is not None:
                postfix["val ΔQ"] = f"{row['val_delta_q']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if callback is not None:
                callback(step, row)
            if bool(peaks[1]):
                interrupted = True
                break
    bar.close()

    model.eval()
    final: dict = {}
    if not interrupted:
        if validation is not None:
            reuse = last_validation is not None and last_validation[0] == step
            final["val"] = (
                last_validation[1] if reuse else evaluate_relaxation(model, validation, step=step, **evaluate)
            )
        if run.eval_train:
            final["train"] = evaluate_relaxation(model, train, step=step, **evaluate)
    steps_with_memory = [r["peak_memory_mib"] for r in history if r.get("peak_memory_mib") is not None]
    steps_with_memory = [m for m in steps_with_memory if not math.isnan(m)]
    result = RelaxationFitResult(
        steps=step,
        history=history,
        initial=initial,
        final=final,
        train_time_s=train_time,
        peak_memory_mib=max(steps_with_memory) if steps_with_memory else math.nan,
        resumed_from=resumed_from,
        interrupted=interrupted,
        output_dir=output_dir,
        checkpoint=last_checkpoint,
        description=description,
    )
    if files is not None and not interrupted:
        files.finish(model, result, run.plot)
    if interrupted:
        raise KeyboardInterrupt(
            f"stopped by a signal after step {step}; checkpoint {last_checkpoint}: run again to resume"
        )
    return result


def _row(step: int, epoch: int, lr, validation: dict | None, **values) -> dict:
    row = {column: None for column in COLUMNS}
    row.update(step=step, epoch=epoch, lr=lr)
    row.update(values)
    if validation is not None:
        row.update(
            val_delta_q=validation["delta_q"],
            val_basin_rate=validation["basin_rate"],
            val_fmax=validation["fmax"],
            val_converged=validation["converged"],
            val_relax_steps=validation["relax_steps"],
        )
    return row


def _trust_counts(result) -> list[torch.Tensor]:
    """[skipped, saddles, inexact, solve_failed] of one relaxation after backward (float64 scalars, CPU)."""
    zero = torch.tensor(0.0, dtype=torch.float64)
    validity, info = result.validity, result.linear_solve
    if validity is None:
        return [zero] * 4
    skipped = result.skipped if result.skipped is not None else ~validity.valid
    failed = (info.rhs_norm > 0) & ~info.converged if info is not None else torch.zeros_like(validity.valid)
    saddles = ~validity.minimum | (info.indefinite if info is not None else torch.zeros_like(validity.minimum))
    return [
        skipped.double().sum().cpu(),
        saddles.double().sum().cpu(),
        (validity.converged & ~validity.exact).double().sum().cpu(),
        failed.double().sum().cpu(),
    ]


def _gradient_norm(params: Sequence[torch.Tensor]) -> float:
    norms = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class _Outputs:
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

    def finish(self, model, result: RelaxationFitResult, plot: bool) -> None:
        if not self.main:
            return
        result.csv_path = self.csv
        model_path = os.path.join(self.dir, "model.pt")
        if hasattr(model, "save"):
            model.save(model_path)
        else:
            torch.save(model.state_dict(), model_path)
        result.model_path = model_path
        png = os.path.join(self.dir, "learning_curves.png")
        if plot and plot_learning_curves(result.history, png, result.description):
            result.png_path = png
        summary = os.path.join(self.dir, "summary.md")
        with open(summary, "w") as handle:
            handle.write(result.table() + "\n")
        result.summary_path = summary
