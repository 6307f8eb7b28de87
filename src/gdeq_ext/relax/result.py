"""RelaxResult: what every relaxation mode returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients.implicit_function import SolveRecord
from gdeq_ext.gradients.krylov import SolveInfo
from gdeq_ext.relax.validity import Validity

__all__ = ["RelaxResult"]


@dataclass
class RelaxResult:
    """The outcome of relaxing a batch.

    Attributes:
        positions: (n_atoms, 3) Å, the final structures. Differentiable as the mode defines: BPTT through
            its T steps; implicit through X* (implicit gradient into the potential's parameters); hybrid
            through X* (implicit term) plus ``handoff`` times the cotangent into the window.
        converged: (n_systems,) bool, fmax < the requested tolerance at the final positions.
        fmax: (n_systems,) eV/Å, max_i ||F_i|| at the final positions.
        steps: (n_systems,) int64, relaxation steps taken (window steps included).
        energy: (n_systems,) eV at the final positions (detached).
        window: hybrid only: the K window states X_1..X_K, each (n_atoms, 3) Å with its graph (to θ and to
            the start), for guidance losses; None for the other modes.
        batch: the input batch with ``positions`` replaced by the differentiable final positions.
        record: filled by the backward pass of implicit/hybrid (see ``linear_solve``).
        validity: implicit/hybrid: the forward pass's per-structure flags (converged, exact fixed point, minimum,
            the estimated fixed-point error): :class:`~gdeq_ext.relax.validity.Validity`; None for BPTT.
    """

    positions: torch.Tensor
    converged: torch.Tensor
    fmax: torch.Tensor
    steps: torch.Tensor
    energy: torch.Tensor
    batch: Batch
    window: tuple[torch.Tensor, ...] | None = None
    record: SolveRecord | None = field(default=None, repr=False)
    validity: Validity | None = None

    @property
    def valid(self) -> torch.Tensor:
        """(n_systems,) bool: the structure's gradient is trustworthy. Forward flags (converged, exact, minimum), and
        after backward also the linear solve (converged on its true residual, no negative curvature, finite).
        BPTT: whether the forces at X_T are finite (it always is, or the relaxation raised)."""
        valid = self.validity.valid.clone() if self.validity is not None else torch.ones_like(self.converged)
        info = self.linear_solve
        if info is not None:
            posed = info.rhs_norm > 0
            valid &= ~posed | (info.converged & ~info.indefinite)
        return valid

    @property
    def skipped(self) -> torch.Tensor | None:
        """(n_systems,) bool after backward: structures whose gradient contribution was zeroed (policy "skip", or
        a non-finite/diverged solve under any policy); None before backward and for BPTT."""
        return None if self.record is None else self.record.dropped

    @property
    def fixed_point_error(self) -> torch.Tensor | None:
        """(n_systems,) Å, estimated distance of X* from the exact fixed point (implicit/hybrid)."""
        return None if self.validity is None else self.validity.fixed_point_error

    @property
    def linear_solve(self) -> SolveInfo | None:
        """Diagnostics of the latest implicit backward (None before backward and for BPTT)."""
        return None if self.record is None else self.record.info

    @property
    def iterations(self) -> torch.Tensor | None:
        """(n_systems,) int64 Hessian-vector products each structure's solve used, after backward."""
        info = self.linear_solve
        return None if info is None else info.iterations

    @property
    def residual(self) -> torch.Tensor | None:
        """(n_systems,) final residual ||g - H u|| per structure, after backward."""
        info = self.linear_solve
        return None if info is None else info.residual

    @property
    def hvps(self) -> int | None:
        """Batched Hessian-vector products used by all backward passes so far."""
        return None if self.record is None else self.record.hvps
