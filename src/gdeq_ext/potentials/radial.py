"""Radial basis of the MLIP: Bessel functions times a C² cutoff, exactly zero at and beyond the cutoff.

    φ_k(r) = sqrt(2 / r_c) · sin(k π r / r_c) / r · f_c(r / r_c),        k = 1 .. n_radial
    f_c(x) = 1 − 10 x³ + 15 x⁴ − 6 x⁵  (0 ≤ x < 1),   0  (x ≥ 1)

f_c (the quintic smoothstep) has f_c(1) = f_c'(1) = f_c''(1) = 0, so energies, forces and Hessians of the
model are continuous when an atom crosses r_c. The closed forms of the first and second derivatives are
given too: the fused kernels (issue #5) evaluate them per edge instead of differentiating through autograd.
"""

from __future__ import annotations

import math

import torch

__all__ = ["bessel_basis", "smoothstep_cutoff"]


def smoothstep_cutoff(x: torch.Tensor) -> torch.Tensor:
    """f_c(x) = 1 − 10x³ + 15x⁴ − 6x⁵ for x < 1, exactly 0 for x ≥ 1 (x = r / r_c, dimensionless)."""
    inside = x < 1.0
    xs = torch.where(inside, x, torch.zeros_like(x))  # keeps the discarded branch's gradient finite
    value = 1.0 + xs**3 * (-10.0 + xs * (15.0 - 6.0 * xs))
    return torch.where(inside, value, torch.zeros_like(x))


def bessel_basis(distances: torch.Tensor, n_radial: int, cutoff: float) -> torch.Tensor:
    """The radial basis φ_k(r) f_c(r / r_c), (n_edges, n_radial), in 1/Å^(3/2); zero for r ≥ cutoff.

    Args:
        distances: (n_edges,) float32/float64, Å, > 0 (overlapping atoms are rejected upstream).
        n_radial: number of basis functions k = 1 .. n_radial.
        cutoff: r_c in Å.
    """
    k = torch.arange(1, n_radial + 1, dtype=distances.dtype, device=distances.device)
    r = distances.unsqueeze(-1)
    bessel = math.sqrt(2.0 / cutoff) * torch.sin(k * (math.pi / cutoff) * r) / r
    return bessel * smoothstep_cutoff(r / cutoff)
