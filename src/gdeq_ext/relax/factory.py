"""One relaxation factory: :class:`RelaxOptions` and :func:`build_relaxation`, shared by training, the benchmarks and
every script, so that "the public API" and "what the benchmark ran" are the same code path.

The defaults here are the relaxation classes' own (:class:`BPTTRelax`, :class:`ImplicitRelax`,
:class:`HybridRelax`), stated once; the training config (``[relax]``) maps onto these fields one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from gdeq_ext.potentials.base import PotentialLike
from gdeq_ext.relax.bptt import BPTTRelax
from gdeq_ext.relax.fire import FIREParameters
from gdeq_ext.relax.forces import ForceFn
from gdeq_ext.relax.hybrid import HybridRelax
from gdeq_ext.relax.implicit import ImplicitRelax
from gdeq_ext.relax.polish import PolishOptions

__all__ = ["MODES", "RelaxOptions", "build_relaxation"]

MODES = ("bptt", "implicit", "hybrid")


@dataclass(frozen=True)
class RelaxOptions:
    """How a batch is relaxed and differentiated; one set of defaults for every mode.

    Attributes:
        mode: "hybrid" (default: K differentiated steps, then FIRE to the fixed point and its implicit gradient),
            "implicit" (FIRE, implicit gradient) or "bptt" (T differentiated steps).
        window: K of the hybrid mode (default 10). bptt_steps: T of the bptt mode (default 50).
        handoff: β, the weight of the window's hand-off gradient in the hybrid (default 1.0).
        fmax: eV/Å, FIRE's tolerance (default 0.01; for bptt only whether ``converged`` is reported).
        max_steps: FIRE steps per structure at most (default 1000; implicit and hybrid).
        alpha: Å²/eV, step of the differentiated map X + αF (default 0.01); maxstep: Å, its per-atom cap (0.2).
        checkpoint: recompute the differentiated steps in backward (bit-identical gradients, less memory);
            None (default) keeps each mode's own default: on for the hybrid, off for bptt.
        solver: "cg" (default), "minres" or "fixed_point"; rtol (1e-6), atol (0), max_iter (None: the solver's
            default), damping (eV/Å², 0), project_rotations (True), fixed_point_alpha (0.01): the implicit solve.
        fire: FIRE's parameters (default ASE's). skin: Å, the Verlet skin (default 0.5).
        polish: the Newton polish and curvature check before the implicit backward (default ``PolishOptions()``).
        on_invalid: "warn" (default), "skip" or "raise": a structure without a trustworthy implicit gradient.
        warn: warn about unconverged relaxations and failed solves (default True).
    """

    mode: str = "hybrid"
    window: int = 10
    bptt_steps: int = 50
    handoff: float = 1.0
    fmax: float = 0.01
    max_steps: int = 1000
    alpha: float = 0.01
    maxstep: float = 0.2
    checkpoint: bool | None = None
    solver: str = "cg"
    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int | None = None
    damping: float = 0.0
    project_rotations: bool = True
    fixed_point_alpha: float = 0.01
    fire: FIREParameters | None = None
    skin: float = 0.5
    polish: PolishOptions = field(default_factory=PolishOptions)
    on_invalid: str = "warn"
    warn: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"RelaxOptions: mode must be one of {list(MODES)}, got {self.mode!r}")

    def replace(self, **changes) -> RelaxOptions:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def build_relaxation(
    potential: PotentialLike,
    options: RelaxOptions | None = None,
    *,
    force_fn: ForceFn | None = None,
    parameters: Sequence[torch.Tensor] | None = None,
    **changes,
):
    """The relaxation ``options.mode`` asks for, around ``potential``: a callable ``relax(batch) -> RelaxResult``.

    Args:
        potential: any potential (``energy(batch, edges)`` or ``forward(batch)``, eV).
        options: :class:`RelaxOptions` (default: its defaults); ``changes`` override fields
            (``build_relaxation(model, mode="implicit", fmax=1e-3)``).
        force_fn: how forces are evaluated inside differentiated steps (default the force node ``force(X, θ)``).
        parameters: θ, the tensors that receive gradients (default: the potential's trainable parameters).
    """
    options = (options or RelaxOptions()).replace(**changes) if changes else (options or RelaxOptions())
    checkpoint = {} if options.checkpoint is None else {"checkpoint": options.checkpoint}
    if options.mode == "bptt":
        return BPTTRelax(
            potential,
            steps=options.bptt_steps,
            alpha=options.alpha,
            maxstep=options.maxstep,
            fmax=options.fmax,
            skin=options.skin,
            force_fn=force_fn,
            parameters=parameters,
            **checkpoint,
        )
    common = dict(
        fmax=options.fmax,
        max_steps=options.max_steps,
        solver=options.solver,
        rtol=options.rtol,
        atol=options.atol,
        max_iter=options.max_iter,
        damping=options.damping,
        project_rotations=options.project_rotations,
        fixed_point_alpha=options.fixed_point_alpha,
        fire=options.fire,
        skin=options.skin,
        force_fn=force_fn,
        parameters=parameters,
        warn=options.warn,
        polish=options.polish,
        on_invalid=options.on_invalid,
    )
    if options.mode == "implicit":
        return ImplicitRelax(potential, **common)
    return HybridRelax(
        potential,
        window=options.window,
        handoff=options.handoff,
        alpha=options.alpha,
        maxstep=options.maxstep,
        **checkpoint,
        **common,
    )
