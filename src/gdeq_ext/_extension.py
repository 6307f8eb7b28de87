"""Loading the compiled extension ``gdeq_ext._C`` and describing what was built.

Three outcomes at import time:

* the extension was built against the installed torch: its ops are registered under
  ``torch.ops.gdeq_ext`` and :data:`HAVE_EXTENSION` is True;
* it was built against another torch: :class:`ExtensionVersionError` names both versions and the
  command that rebuilds it (a mismatched C++ ABI would otherwise crash or fail with an undefined symbol);
* it was never built (a broken build, or ``src/`` put on the path of a checkout that was never built; the
  src layout keeps the plain checkout off the path, so running commands from the repository root imports the
  installed package): the package still imports, every op runs its pure-PyTorch reference, and one warning
  says so, naming the checkout when that is the case.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from gdeq_ext.compat import dispatch_has_kernel

__all__ = [
    "HAVE_EXTENSION",
    "ExtensionVersionError",
    "build_info",
    "compiled_op",
    "op_defined",
    "warn_fallback",
]

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


def _source_checkout() -> str | None:
    """The repository root when this package is imported straight from a checkout's ``src/`` (not installed)."""
    package = os.path.dirname(os.path.abspath(__file__))
    src = os.path.dirname(package)
    root = os.path.dirname(src)
    if os.path.basename(src) == "src" and os.path.exists(os.path.join(root, "setup.py")):
        return root
    return None


def _checkout_reason(root: str) -> str:
    return (
        f"gdeq_ext is imported from the source checkout {root}/src (sys.path or PYTHONPATH names it), where the "
        f"extension was not built in place, so the compiled kernels gdeq_ext._C are missing; use the installed "
        f"package (cd {root} && pip install --no-build-isolation ., then leave src/ off the path) or build it in "
        f"place (pip install --no-build-isolation -e .)"
    )


def _load() -> tuple[bool, dict, str]:
    config = _load_build_config()
    root = _source_checkout()
    if config is None:
        if root is not None:
            return False, {}, _checkout_reason(root)
        return False, {}, "the compiled extension gdeq_ext._C was not built (no gdeq_ext/_build_config.py)"
    _check_torch_version(config)
    try:
        importlib.import_module("gdeq_ext._C")
    except ImportError as error:  # built config present but the shared library is missing or broken
        if root is not None:  # `pip install .` writes the build record into src/ but the library into site-packages
            return False, config, _checkout_reason(root)
        return False, config, f"the compiled extension gdeq_ext._C failed to load: {error}"
    return True, config, ""


HAVE_EXTENSION, _BUILD_CONFIG, _MISSING_REASON = _load()
_warned = False

if HAVE_EXTENSION and not _BUILD_CONFIG.get("with_cuda") and torch.version.cuda and torch.cuda.is_available():
    # The build's CUDA decision is printed only with `pip install -v`; a user with a GPU must hear of it.
    warnings.warn(
        f"gdeq_ext: a CUDA device is visible but the extension was built without CUDA kernels "
        f"({_BUILD_CONFIG.get('cuda_decision', 'no reason recorded')}); ops on CUDA tensors use the pure-PyTorch "
        f"reference. Rebuild with CUDA_HOME=<toolkit> GDEQ_EXT_WITH_CUDA=1 {REBUILD_COMMAND}",
        RuntimeWarning,
        stacklevel=2,
    )


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


_COMPILED: dict[tuple[str, str], bool] = {}  # (op, device type) -> answer; the dispatcher lookup costs ~7 µs


def op_defined(op_name: str) -> bool:
    """Whether the compiled extension defines the schema ``gdeq_ext::<op_name>`` (fake / autograd registrations
    need it; an extension built before the op existed does not have it)."""
    return HAVE_EXTENSION and hasattr(torch.ops.gdeq_ext, op_name)


def compiled_op(op_name: str, device: torch.device | str) -> bool:
    """Whether ``torch.ops.gdeq_ext.<op_name>`` exists (an extension built before the op existed has no schema)
    and has a compiled kernel for ``device``'s type. The one place that decides between kernel and reference.
    Cached per (op, device type)."""
    device_type = torch.device(device).type
    key = (op_name, device_type)
    if key not in _COMPILED:
        dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        _COMPILED[key] = (
            dispatch_key is not None
            and op_defined(op_name)
            and dispatch_has_kernel(f"gdeq_ext::{op_name}", dispatch_key)
        )
    return _COMPILED[key]


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
