"""The relaxation, optimizer and learning-rate schedule a training config asks for."""

from __future__ import annotations

import math

import torch

from gdeq_ext.datasets.basins import BasinJudge
from gdeq_ext.potentials.stillinger_weber import StillingerWeber
from gdeq_ext.relax import MODES, PolishOptions, RelaxOptions, build_relaxation
from gdeq_ext.train.config import ConfigError, OptimConfig, RelaxConfig, TrainConfig

__all__ = [
    "make_judge",
    "relax_options",
    "make_optimizer",
    "make_relaxation",
    "make_scheduler",
]


# ---------------------------------------------------------------------------------------------- factories
def relax_options(relax: RelaxConfig, warn: bool = False) -> RelaxOptions:
    """The :class:`~gdeq_ext.relax.RelaxOptions` of a ``[relax]`` config section (field names map one to one;
    ``max_relax_steps`` is ``max_steps``, ``checkpoint_window`` is ``checkpoint``, ``newton_steps`` the polish's)."""
    if relax.mode not in MODES:
        raise ConfigError(f"relax.mode = {relax.mode!r} is not one of {list(MODES)}")
    return RelaxOptions(
        mode=relax.mode,
        window=relax.window,
        bptt_steps=relax.bptt_steps,
        handoff=relax.handoff,
        fmax=relax.fmax,
        max_steps=relax.max_relax_steps,
        alpha=relax.alpha,
        maxstep=relax.maxstep,
        checkpoint=relax.checkpoint_window,
        solver=relax.solver,
        rtol=relax.rtol,
        atol=relax.atol,
        max_iter=relax.max_iter,
        damping=relax.damping,
        project_rotations=relax.project_rotations,
        skin=relax.skin,
        polish=PolishOptions(newton_steps=relax.newton_steps),
        on_invalid=relax.on_invalid,
        warn=warn,
    )


def make_relaxation(model, relax: RelaxConfig, warn: bool = False):
    """The relaxation object of ``relax.mode`` around ``model`` (callable on a Batch -> RelaxResult), built by
    the one factory :func:`gdeq_ext.relax.build_relaxation`.

    ``warn`` is off by default in training: unconverged relaxations are counted in the metrics every step
    (``train_converged``) instead of warning once per location.
    """
    return build_relaxation(model, relax_options(relax, warn))


def make_judge(run: TrainConfig) -> BasinJudge:
    """The correct-basin judge of ``train.teacher`` / ``basin_threshold`` / ``direct_threshold``."""
    teacher = StillingerWeber() if run.teacher == "sw" else None
    return BasinJudge(teacher, threshold=run.basin_threshold, direct_threshold=run.direct_threshold)


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
