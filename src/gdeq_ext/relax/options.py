"""The option objects shared by the relaxation modes, and the one place their defaults are stated.

* :class:`WindowOptions`: the differentiated steps X <- X + cap(αF_θ(X)), BPTT's unroll (T) and the hybrid's window
  (K);
* :class:`FIREOptions`: the graph-free FIRE solve of the implicit and hybrid modes;
* :class:`~gdeq_ext.gradients.implicit_function.ImplicitSolveOptions`: the Hessian solve of the implicit backward;
* :class:`~gdeq_ext.relax.polish.PolishOptions`: the Newton polish and curvature check before it.

:class:`~gdeq_ext.relax.BPTTRelax`, :class:`~gdeq_ext.relax.ImplicitRelax` and :class:`~gdeq_ext.relax.HybridRelax`
take these objects; a flat keyword argument (``fmax=1e-3``, ``rtol=1e-8``, ``alpha=0.02``) sets the field of that
name in the object that owns it (:func:`route_fields`), so no class repeats another's arguments.

Why these defaults (``python benchmarks/window_map.py``, benchmarks/results/window_map.md: 20 silicon-defect starts
in 64-site cells, the basin study's base MLIP and SW): the map is stable near a minimum for α < 2/λ_max, and the
measured median 2/λ_max is 0.042 (MLIP) and 0.046 Å²/eV (SW). At α = 0.05 and 0.08 the map never reaches
fmax 0.01 on 13 and 20 of 20 starts. α = 0.03, the largest stable value of the grid, reaches fmax 0.01 in a median
of 95–108 steps and FIRE's end basin on 80–85 % of the starts by T = 100 (no more by T = 400); α = 0.01 (the
previous default, FIRE's first step dt0² from rest) needs 205–250 steps and is in FIRE's basin on 45–60 % at
T = 100. Hence α = 0.03 Å²/eV and T = 100 for BPTT: the unrolled map has relaxed the structure by its last step.
FIRE keeps ASE's parameters and fmax 0.01 eV/Å, the tolerance the science protocol judges basins at; the
implicit solve and polish keep the tolerances their gradient checks were measured with (docs/method.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gdeq_ext.gradients.implicit_function import ImplicitSolveOptions, check_positive
from gdeq_ext.relax.fire import FIREParameters

__all__ = [
    "BPTT_STEPS",
    "DEFAULT_ALPHA",
    "HYBRID_WINDOW",
    "FIREOptions",
    "WindowOptions",
    "route_fields",
]

DEFAULT_ALPHA = 0.03  # Å²/eV, the differentiated map's step (see the module docstring)
BPTT_STEPS = 100  # T of BPTT
HYBRID_WINDOW = 10  # K of the hybrid


@dataclass(frozen=True)
class WindowOptions:
    """The differentiated steps X_{t+1} = X_t + cap(αF_θ(X_t)).

    Attributes:
        steps: K (hybrid window) or T (BPTT unroll), >= 0 (default 10).
        alpha: Å²/eV, the step (default 0.03).
        maxstep: Å, the per-atom cap of one step (default 0.2, ASE's FIRE maxstep).
        checkpoint: recompute each step's graph in backward instead of storing it (default True: O(1) graphs;
            gradients the same either way, bit for bit for a deterministic potential: docs/method.md). BPTT's
            default is False (the memory-hungry baseline, as measured).
    """

    steps: int = HYBRID_WINDOW
    alpha: float = DEFAULT_ALPHA
    maxstep: float = 0.2
    checkpoint: bool = True

    def __post_init__(self):
        check_positive("steps", self.steps, allow_zero=True, integer=True)
        check_positive("alpha", self.alpha)
        check_positive("maxstep", self.maxstep)
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"checkpoint must be True or False, got {self.checkpoint!r}")


@dataclass(frozen=True)
class FIREOptions:
    """The graph-free FIRE solve to the relaxed structure.

    Attributes:
        fmax: eV/Å, stop when every atom's force is below this (default 0.01; 0: never stop early).
        max_steps: FIRE steps per structure at most (default 1000); structures that hit it are reported.
        skin: Å, the Verlet skin of our own potentials (default 0.5; 0 rebuilds the list every step).
        parameters: :class:`FIREParameters` (default ASE's dt, dtmax, maxstep, ...).
        compact: finished structures leave the evaluated batch at the step after they finish (default True;
            :func:`~gdeq_ext.relax.fire`), and each round of the Newton polish evaluates and solves only the
            structures it still works on (:func:`~gdeq_ext.relax.polish.polish`). Results are the same either way.
    """

    fmax: float = 0.01
    max_steps: int = 1000
    skin: float = 0.5
    parameters: FIREParameters = field(default_factory=FIREParameters)
    compact: bool = True

    def __post_init__(self):
        check_positive("fmax", self.fmax, allow_zero=True)
        check_positive("max_steps", self.max_steps, allow_zero=True, integer=True)
        check_positive("skin", self.skin, allow_zero=True)
        if not isinstance(self.parameters, FIREParameters):
            raise TypeError(f"FIREOptions.parameters must be FIREParameters, got {type(self.parameters).__name__}")


def route_fields(owner: str, options: dict[str, object], fields: dict) -> dict[str, object]:
    """Apply flat keyword arguments to the option objects that own a field of that name.

    Args:
        owner: the class being built (named in errors).
        options: {argument name: option object}, e.g. ``{"fire": FIREOptions(), "solve": ImplicitSolveOptions()}``;
            the first object with a field of a given name takes it.
        fields: the flat keyword arguments, e.g. ``{"fmax": 1e-3, "rtol": 1e-8}``.

    Returns:
        the same mapping with updated copies (the given objects are not modified).

    Raises:
        TypeError: a keyword no option object has, naming the valid ones.
    """
    owned = {name: {f.name for f in dataclasses.fields(obj)} for name, obj in options.items()}
    changes: dict[str, dict] = {name: {} for name in options}
    for key, value in fields.items():
        target = next((name for name, names in owned.items() if key in names), None)
        if target is None:
            valid = sorted(set().union(*owned.values()))
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}; option fields are {valid}")
        changes[target][key] = value
    return {name: dataclasses.replace(obj, **changes[name]) if changes[name] else obj for name, obj in options.items()}


def as_fire_options(fire) -> FIREOptions:
    """``fire`` as :class:`FIREOptions`: None gives the defaults; a :class:`FIREParameters` (the argument's earlier
    form) becomes ``FIREOptions(parameters=fire)``."""
    if fire is None:
        return FIREOptions()
    if isinstance(fire, FIREParameters):
        return FIREOptions(parameters=fire)
    if isinstance(fire, FIREOptions):
        return fire
    raise TypeError(f"fire must be FIREOptions or FIREParameters, got {type(fire).__name__}")


def solve_options(solve: ImplicitSolveOptions | None, warn: bool, on_invalid: str) -> ImplicitSolveOptions:
    """``solve`` (default the defaults) with the relaxation's ``warn`` and ``on_invalid``: one policy per relaxation."""
    if solve is not None and not isinstance(solve, ImplicitSolveOptions):
        raise TypeError(f"solve must be ImplicitSolveOptions, got {type(solve).__name__}")
    return dataclasses.replace(solve or ImplicitSolveOptions(), warn=warn, on_invalid=on_invalid)
