"""Test utilities shared by the test suite: the tolerance table, devices, and reproducible seeds."""

from __future__ import annotations

import zlib

import pytest
import torch

# One table, keyed by dtype. ``exact`` is for kernels that must reproduce the reference to round-off
# (same mathematics, different summation order); ``derivative`` for results that go through one more
# layer of floating-point arithmetic (double backward, Hessian-vector products).
TOLERANCES: dict[torch.dtype, dict[str, dict[str, float]]] = {
    torch.float64: {
        "exact": {"rtol": 1e-12, "atol": 1e-12},
        "derivative": {"rtol": 1e-10, "atol": 1e-10},
    },
    torch.float32: {
        "exact": {"rtol": 1e-5, "atol": 1e-5},
        "derivative": {"rtol": 1e-4, "atol": 1e-4},
    },
}

DTYPES = [torch.float64, torch.float32]


def tol(dtype: torch.dtype, kind: str = "exact") -> dict[str, float]:
    """``rtol``/``atol`` keyword arguments for ``torch.testing.assert_close``."""
    return TOLERANCES[dtype][kind]


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def devices() -> list:
    """``["cpu", "cuda"]`` for ``pytest.mark.parametrize``; the CUDA entry is skipped, with a reason, without a GPU."""
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda()])]


def stable_seed(*parts) -> int:
    """A seed derived from ``parts`` with crc32 (stable across processes, unlike ``hash()``)."""
    return zlib.crc32("/".join(map(str, parts)).encode())
