"""One relaxation factory: :class:`RelaxOptions` and :func:`build_relaxation`, shared by training, the benchmarks and
every script, so that "the public API" and "what the benchmark ran" are the same code path.

:class:`RelaxOptions` is the flat, config-shaped view of the option objects of :mod:`gdeq_ext.relax.options`
(window, FIRE, implicit solve, polish); its defaults are theirs (stated once there, with the measurements behind
them), and the training config (``[relax]``) maps onto its fields one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from gdeq_ext.gradients.implicit_function import ImplicitSolveOptions
from gdeq_ext.potentials.base import PotentialLike
from gdeq_ext.relax.bptt import BPTTRelax
from gdeq_ext.relax.fire import FIREParameters
from gdeq_ext.relax.forces import ForceFn
from gdeq_ext.relax.hybrid import HybridRelax
from gdeq_ext.relax.implicit import ImplicitRelax
from gdeq_ext.relax.options import BPTT_STEPS, DEFAULT_ALPHA, HYBRID_WINDOW, FIREOptions, WindowOptions
from gdeq_ext.relax.polish import PolishOptions

__all__ = ["MODES", "RelaxOptions", "build_relaxation"]

MODES = ("bptt", "implicit", "hybrid")


@dataclass(frozen=True)
class RelaxOptions:
    """How a batch is relaxed and differentiated; one set of defaults for every mode.

    Attributes:
        mode: "hybrid" (default: K differentiated steps, then FIRE to the fixed point and its implicit gradient),
            "implicit" (FIRE, implicit gradient) or "bptt" (T differentiated steps).
        window: K of the hybrid mode (default 10). bptt_steps: T of the bptt mode (default 100).
        handoff: β, the weight of the window's hand-off gradient in the hybrid (default 1.0).
        fmax: eV/Å, FIRE's tolerance (default 0.01; for bptt only whether ``converged`` is reported).
        max_steps: FIRE steps per structure at most (default 1000; implicit and hybrid).
        alpha: Å²/eV, step of the differentiated map X + αF (default 0.03); maxstep: Å, its per-atom cap (0.2).
        checkpoint: recompute the differentiated steps in backward (the same gradients, bit for bit for
            a deterministic potential (docs/method.md), less memory); None (default) keeps each mode's own
            default: on for the hybrid, off for bptt.
        solver: "cg" (default), "minres" or "fixed_point"; rtol (1e-6), atol (0), max_iter (None: the solver's
            default), damping (eV/Å², 0), project_rotations (True), fixed_point_alpha (0.01): the implicit solve.
        fire: FIRE's parameters (default ASE's). skin: Å, the Verlet skin (default 0.5).
        polish: the Newton polish and curvature check before the implicit backward (default ``PolishOptions()``).
        on_invalid: "warn" (default), "skip" or "raise": a structure without a trustworthy implicit gradient.
        warn: warn about unconverged relaxations and failed solves (default True).
    """

    mode: str = "hybrid"
    window: int = HYBRID_WINDOW
    bptt_steps: int = BPTT_STEPS
    handoff: float = 1.0
    fmax: float = FIREOptions.fmax
    max_steps: int = FIREOptions.max_steps
    alpha: float = DEFAULT_ALPHA
    maxstep: float = WindowOptions.maxstep
    checkpoint: bool | None = None
    solver: str = "cg"
    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int | None = None
    damping: float = 0.0
    project_rotations: bool = True
    fixed_point_alpha: float = 0.01
    fire: FIREParameters | None = None
    skin: float = FIREOptions.skin
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

    def window_options(self, steps: int, checkpoint: bool) -> WindowOptions:
        """The differentiated map's :class:`WindowOptions` with ``steps`` (K or T) and ``checkpoint``."""
        return WindowOptions(steps=steps, alpha=self.alpha, maxstep=self.maxstep, checkpoint=checkpoint)

    def fire_options(self) -> FIREOptions:
        return FIREOptions(
            fmax=self.fmax, max_steps=self.max_steps, skin=self.skin, parameters=self.fire or FIREParameters()
        )

    def solve_options(self) -> ImplicitSolveOptions:
        return ImplicitSolveOptions(
            solver=self.solver,
            rtol=self.rtol,
            atol=self.atol,
            max_iter=self.max_iter,
            damping=self.damping,
            project_rotations=self.project_rotations,
            fixed_point_alpha=self.fixed_point_alpha,
            warn=self.warn,
            on_invalid=self.on_invalid,
        )


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
    common = dict(force_fn=force_fn, parameters=parameters)
    if options.mode == "bptt":
        window = options.window_options(options.bptt_steps, checkpoint=bool(options.checkpoint))
        return BPTTRelax(potential, window, fmax=options.fmax, skin=options.skin, **common)
    implicit = dict(
        fire=options.fire_options(),
        solve=options.solve_options(),
        polish=options.polish,
        warn=options.warn,
        on_invalid=options.on_invalid,
        **common,
    )
    if options.mode == "implicit":
        return ImplicitRelax(potential, **implicit)
    checkpoint = True if options.checkpoint is None else options.checkpoint
    return HybridRelax(
        potential, options.window_options(options.window, checkpoint), handoff=options.handoff, **implicit
    )
