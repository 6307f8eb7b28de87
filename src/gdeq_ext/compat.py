"""The private torch APIs gdeq_ext relies on, in one place, each with a public-API fallback.

Supported torch: ``SUPPORTED_TORCH`` (pyproject's ``torch>=2.6``; tested up to the version CI installs).
``tests/test_compat.py`` checks that each private call still exists and behaves on the installed torch, so a
torch upgrade that removes one fails there, by name, instead of deep inside a kernel dispatch or a backward.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_TORCH", "dispatch_has_kernel", "will_engine_execute_node"]

SUPPORTED_TORCH = ((2, 6), (2, 99))  # inclusive (major, minor) range


def dispatch_has_kernel(qualified_name: str, dispatch_key: str) -> bool:
    """Whether the dispatcher has a kernel registered for ``"namespace::op"`` under ``dispatch_key`` ("CPU",
    "CUDA"). ``torch._C._dispatch_has_kernel_for_dispatch_key``: the only way to ask without calling the op."""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, dispatch_key))


def will_engine_execute_node(grad_fn) -> bool:
    """Inside a backward pass: whether the autograd engine will run ``grad_fn`` (so its input's gradient is used).

    ``torch._C._will_engine_execute_node``; raises RuntimeError outside the engine (callers assume "used").
    """
    return bool(torch._C._will_engine_execute_node(grad_fn))
