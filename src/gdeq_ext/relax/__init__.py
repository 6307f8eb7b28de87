"""Batched relaxations and their three gradients: BPTT, implicit, and the hybrid (G-DEQ) formulation."""

from gdeq_ext.relax.bptt import BPTTRelax
from gdeq_ext.relax.checks import NonFiniteError, RelaxationWarning, structure_fmax
from gdeq_ext.relax.factory import MODES, RelaxOptions, build_relaxation
from gdeq_ext.relax.fire import FIREParameters, FIREResult, fire
from gdeq_ext.relax.hybrid import HybridRelax
from gdeq_ext.relax.implicit import ImplicitRelax
from gdeq_ext.relax.options import FIREOptions, WindowOptions
from gdeq_ext.relax.polish import PolishOptions, PolishResult, polish
from gdeq_ext.relax.result import RelaxResult
from gdeq_ext.relax.validity import Validity, apply_policy
from gdeq_ext.relax.window import capped_step, run_window

__all__ = [
    "MODES",
    "BPTTRelax",
    "FIREOptions",
    "FIREParameters",
    "FIREResult",
    "HybridRelax",
    "ImplicitRelax",
    "NonFiniteError",
    "PolishOptions",
    "PolishResult",
    "RelaxOptions",
    "RelaxResult",
    "RelaxationWarning",
    "Validity",
    "WindowOptions",
    "apply_policy",
    "build_relaxation",
    "capped_step",
    "fire",
    "polish",
    "run_window",
    "structure_fmax",
]
