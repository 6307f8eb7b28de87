"""What training through relaxations measures: the metrics.csv columns, the correct-basin test, the
evaluation protocol shared by every mode, and the error that names a failed step's dataset frames."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.data.relaxation_pairs import RelaxationPairs
from gdeq_ext.datasets.basins import BasinJudge, structure_distance
from gdeq_ext.gradients.implicit_function import InvalidGradientError
from gdeq_ext.loss import delta_q
from gdeq_ext.relax import fire
from gdeq_ext.relax.checks import NonFiniteError
from gdeq_ext.train.distributed import (
    DistributedContext,
    all_reduce_sum,
    shard,
)

__all__ = [
    "COLUMNS",
    "STEP_FAILURES",
    "TrainingStepError",
    "basin_distance",
    "correct_basin",
    "evaluate_relaxation",
    "gradient_norm",
    "make_row",
    "mean_or_none",
    "step_failure",
    "trust_counts",
]

# metrics.csv columns, in order. Validation columns are empty on steps without an evaluation; step 0 is the
# evaluation before training.
COLUMNS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "train_basin_rate",
    "train_basin_rate_direct",
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
    "val_basin_rate_direct",
    "val_fmax",
    "val_converged",
    "val_relax_steps",
)


# ---------------------------------------------------------------------------------------------- basins
def basin_distance(positions: torch.Tensor, reference: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-structure RMS distance to the reference, (n_systems,) in Å per atom, detached (reported; the
    correct-basin verdict is :class:`gdeq_ext.datasets.BasinJudge`'s, on the largest per-atom deviation).

    sqrt(mean_j ||d_j - t_s||²) after pairing atoms of the same species optimally
    (:func:`gdeq_ext.datasets.basins.structure_distance`: a linear assignment on minimum-image distances, so an
    interstitial that swapped identity with a lattice atom still matches) and removing the net translation t_s
    (and, for clusters with no periodic axis, the best rotation). Unweighted, unlike ΔQ, so the threshold is a
    length. Runs on the CPU in float64 (an assignment per structure; evaluation only, never differentiated).
    """
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
    positions: torch.Tensor, reference: torch.Tensor, batch: Batch, judge: BasinJudge | None = None
) -> torch.Tensor:
    """(n_systems,) bool: the verdict of ``judge`` (default ``BasinJudge()``: no teacher, the largest per-atom
    deviation of the relaxed structure itself below 0.4 Å). The project's one correct-basin test is
    :class:`gdeq_ext.datasets.BasinJudge`; this is a shorthand for ``judge(positions, reference, batch).correct``.
    """
    return (judge or BasinJudge())(positions, reference, batch).correct


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
STEP_FAILURES = (NonFiniteError, InvalidGradientError, ValueError)


def step_failure(error: Exception, what: str, step: int, frames: Sequence[int], pairs: RelaxationPairs):
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
_EVAL_FIELDS = ("n", "delta_q", "correct", "correct_direct", "fmax", "converged", "relax_steps")


def _relax_and_measure(model, pairs: RelaxationPairs, indices, dtype, device, fmax, max_steps, judge: BasinJudge):
    batch, reference = pairs.batch(indices, dtype=dtype, device=device)
    solved = fire(model, batch, fmax=fmax, max_steps=max_steps, warn=False)
    positions = solved.positions
    verdict = judge(positions, reference, batch)
    return torch.stack(
        [
            torch.tensor(float(batch.n_systems), dtype=torch.float64),
            delta_q(positions, reference, batch).double().sum().cpu(),
            verdict.correct.double().sum(),
            verdict.direct_correct.double().sum(),
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
    judge: BasinJudge | None = None,
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
    judge = judge or BasinJudge()
    parameter = next(iter(model.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float64
    device = parameter.device if parameter is not None else torch.device("cpu")
    mine = shard(range(len(pairs)), context.rank, context.world_size)
    totals = torch.zeros(len(_EVAL_FIELDS), dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        try:
            totals += _relax_and_measure(model, pairs, chunk, dtype, device, fmax, max_steps, judge)
        except STEP_FAILURES as error:
            raise step_failure(error, f"evaluation at step {step}", step, chunk, pairs) from error
    totals = all_reduce_sum(totals, context)
    n = max(float(totals[0]), 1.0)
    out = dict(zip(_EVAL_FIELDS, totals.tolist(), strict=True))
    return {
        "n": int(out["n"]),
        "delta_q": out["delta_q"] / n,
        "basin_rate": out["correct"] / n,
        "correct": int(round(out["correct"])),
        "basin_rate_direct": out["correct_direct"] / n,
        "correct_direct": int(round(out["correct_direct"])),
        "fmax": out["fmax"] / n,
        "converged": out["converged"] / n,
        "relax_steps": out["relax_steps"] / n,
    }


def make_row(step: int, epoch: int, lr, validation: dict | None, **values) -> dict:
    row = {column: None for column in COLUMNS}
    row.update(step=step, epoch=epoch, lr=lr)
    row.update(values)
    if validation is not None:
        row.update(
            val_delta_q=validation["delta_q"],
            val_basin_rate=validation["basin_rate"],
            val_basin_rate_direct=validation.get("basin_rate_direct"),
            val_fmax=validation["fmax"],
            val_converged=validation["converged"],
            val_relax_steps=validation["relax_steps"],
        )
    return row


def trust_counts(result) -> list[torch.Tensor]:
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


def gradient_norm(params: Sequence[torch.Tensor]) -> float:
    norms = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def mean_or_none(total: float, count: float) -> float | None:
    return total / count if count > 0 else None
