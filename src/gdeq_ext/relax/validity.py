"""Per-structure validity of an implicit or hybrid relaxation's gradient, and the ``on_invalid`` policy.

A structure's implicit gradient is trustworthy when (1) the forward solve converged (fmax below the tolerance, no
atom separated beyond the cutoff), (2) the fixed point is exact (the Newton polish reached its tolerance), (3) the
stationary point is a minimum (no negative curvature found by the Lanczos check or by the backward's CG), and
(4) the backward solve converged, judged on its true residual. (1)-(3) are known after the forward pass,
(4) after backward. The policy decides what an invalid structure does:

* ``"raise"``: :class:`~gdeq_ext.gradients.InvalidGradientError` naming each structure and why (at the forward
  pass for (1)-(3), in backward for (4));
* ``"skip"``: the structure's gradient contribution is zeroed (implicit term and hand-off alike) and counted
  (``RelaxResult.skipped``); the training loop's default;
* ``"warn"``: a RelaxationWarning / LinearSolveWarning names it and its gradient is used (the API default, so that
  a plain relaxation without training still returns its result).

Under every policy a non-finite or diverged backward solve is zeroed: it never reaches an optimizer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from gdeq_ext.gradients.implicit_function import ON_INVALID, InvalidGradientError
from gdeq_ext.relax.checks import RelaxationWarning

__all__ = ["Validity", "apply_policy"]


@dataclass
class Validity:
    """What is known after the forward pass about each structure's gradient. All tensors (n_systems,).

    Attributes:
        converged: bool, the forward solve reached fmax < the tolerance (False where atoms separated).
        separated: bool, some atom ended with no neighbour within the cutoff.
        exact: bool, the Newton polish brought the estimated distance to the fixed point below ``newton_tol``.
        minimum: bool, no negative curvature was found (Lanczos check at X*).
        fixed_point_error: Å, estimated distance of X* from the exact fixed point (||H⁻¹F||).
        lowest_curvature: eV/Å², lowest Ritz value of the projected Hessian at X* (NaN: not checked).
        newton_steps: int64, Newton steps accepted.
        hvps: batched Hessian-vector products the polish and the check used.
        force_evaluations: batched force evaluations of the polish and the check.
    """

    converged: torch.Tensor
    separated: torch.Tensor
    exact: torch.Tensor
    minimum: torch.Tensor
    fixed_point_error: torch.Tensor
    lowest_curvature: torch.Tensor
    newton_steps: torch.Tensor
    hvps: int = 0
    force_evaluations: int = 0

    @property
    def valid(self) -> torch.Tensor:
        """(n_systems,) bool: converged, exact and a minimum."""
        return self.converged & self.exact & self.minimum

    def reasons(self, s: int) -> list[str]:
        """Why structure ``s`` is invalid (empty when it is valid)."""
        out = []
        if bool(self.separated[s]):
            out.append("atoms separated beyond the cutoff")
        elif not bool(self.converged[s]):
            out.append("relaxation did not converge")
        if bool(self.converged[s]) and not bool(self.exact[s]):
            out.append(f"fixed point not exact (estimated distance {float(self.fixed_point_error[s]):.3g} Å)")
        if not bool(self.minimum[s]):
            out.append(f"saddle point (lowest curvature {float(self.lowest_curvature[s]):.3g} eV/Å²)")
        return out

    def describe(self) -> str:
        """One line naming every invalid structure and its reasons."""
        return "; ".join(
            f"structure {s}: " + ", ".join(self.reasons(s)) for s in (~self.valid).nonzero().flatten().tolist()
        )


def apply_policy(validity: Validity, on_invalid: str, warn: bool, what: str) -> torch.Tensor | None:
    """Act on the forward-pass validity: raise, or return the structures to exclude from the gradient (skip), or
    warn. Returns the (n_systems,) exclusion mask for "skip" (None when nothing is excluded)."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    invalid = ~validity.valid
    if not bool(invalid.any()):
        return None
    message = f"{what}: no trustworthy implicit gradient for {int(invalid.sum())} of {invalid.numel()} structures ("
    if on_invalid == "raise":
        raise InvalidGradientError(message + validity.describe() + ")")
    if warn:
        action = "their gradient is skipped" if on_invalid == "skip" else "their gradient is used anyway"
        warnings.warn(message + validity.describe() + f"); {action}", RelaxationWarning, stacklevel=3)
    return invalid if on_invalid == "skip" else None
