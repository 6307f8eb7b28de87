"""Loading the compiled extension ``gdeq_ext._C`` and describing what was built.

Three outcomes at import time:

* the extension was built against the installed torch: its ops are registered under
  ``torch.ops.gdeq_ext`` and :data:`HAVE_EXTENSION` is True;
* it was built against another torch: :class:`ExtensionVersionError` names both versions and the
  command that rebuilds it (a mismatched C++ ABI would otherwise crash or fail with an undefined symbol);
* it was never built (running from a source tree, or a broken build): the package still imports,
  every op runs its pure-PyTorch reference, and one warning says so.
"""

from __future__ import annotations

import importlib
import warnings

import torch

__all__ = ["HAVE_EXTENSION", "ExtensionVersionError", "build_info", "has_kernel", "warn_fallback"]

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."


class ExtensionVersionError(ImportError):
    """The compiled extension does not match the installed torch."""


def _load_build_config() -> dict | None:
    try:
        config = importlib.import_module("gdeq_ext._build_config")
    except ImportError:
        return None
    return dict(config.BUILD_CONFIG)


def _check_torch_version(config: dict) -> None:
    built = config["torch_version"]
    installed = torch.__version__
    if built != installed:
        raise ExtensionVersionError(
            f"gdeq_ext was compiled against torch {built} but torch {installed} is installed; "
            f"a C++ extension only runs with the torch it was built with. Rebuild it with:\n"
            f"    {REBUILD_COMMAND}"
        )


def _load() -> tuple[bool, dict, str]:
    config = _load_build_config()
    if config is None:
        return False, {}, "the compiled extension gdeq_ext._C was not built (no gdeq_ext/_build_config.py)"
    _check_torch_version(config)
    try:
        importlib.import_module("gdeq_ext._C")
    except ImportError as error:  # built config present but the shared library is missing or broken
        return False, config, f"the compiled extension gdeq_ext._C failed to load: {error}"
    return True, config, ""


HAVE_EXTENSION, _BUILD_CONFIG, _MISSING_REASON = _load()
_warned = False


def warn_fallback(what: str) -> None:
    """Warn, once per process, that ``what`` runs on the pure-PyTorch reference."""
    global _warned
    if _warned:
        return
    _warned = True
    reason = _MISSING_REASON or "the extension has no kernel for this device"
    warnings.warn(
        f"gdeq_ext: {reason}; {what} and every other op use the pure-PyTorch reference "
        f"(correct but slower and heavier in memory). Build the kernels with: {REBUILD_COMMAND}",
        RuntimeWarning,
        stacklevel=3,
    )


def has_kernel(op_name: str, device: torch.device) -> bool:
    """Whether ``torch.ops.gdeq_ext.<op_name>`` has a compiled kernel for ``device``'s type."""
    if not HAVE_EXTENSION:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gdeq_ext::{op_name}", key)


def build_info() -> dict:
    """What was built: compiled or not, torch/CUDA versions at build time, CUDA architectures, OpenMP.

    Returns a plain dict, e.g. ``{"compiled": True, "with_cuda": True, "torch_version": "2.14.1+cu130",
    "cuda_version": "13.0", "cuda_arch_list": "9.0", "openmp": True, "cuda_device_available": False}``.
    """
    info = {"compiled": HAVE_EXTENSION, "installed_torch": torch.__version__}
    if not HAVE_EXTENSION:
        info["reason"] = _MISSING_REASON
    info.update(_BUILD_CONFIG)
    if HAVE_EXTENSION:
        from gdeq_ext import _C

        info.update(_C.build_info())
    info["cuda_device_available"] = torch.cuda.is_available()
    return info
