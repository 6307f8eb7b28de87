"""Finding a real CUDA toolkit at build time (no torch, no GPU needed; setup.py loads this file by path).

A toolkit is a folder with ``bin/nvcc`` and ``include/cuda_runtime.h``. An ``nvcc`` on the PATH may be a wrapper
script or a symlink; torch's own guess (``torch.utils.cpp_extension.CUDA_HOME``) is the parent of that ``nvcc``'s
folder, which for a wrapper is not a toolkit at all. So the candidates are tried in this order, and the first real
toolkit wins:

1. ``CUDA_HOME``, then ``CUDA_PATH`` (what the user said);
2. the conventional folders: ``/usr/local/cuda-<torch's CUDA version>``, then ``/usr/local/cuda``;
3. the folder the real ``nvcc`` lives in: the PATH's ``nvcc`` with symlinks resolved, or the target of a wrapper
   script's ``exec /path/bin/nvcc`` line;
4. torch's guess.

Every rejected candidate is reported with the reason, so the build log says why a toolkit was or was not used.
"""

from __future__ import annotations

import os
import re
import shutil

__all__ = ["find_cuda_toolkit", "is_toolkit"]


def is_toolkit(path: str | None) -> tuple[bool, str]:
    """(whether ``path`` is a CUDA toolkit folder, why not)."""
    if not path:
        return False, "not set"
    if not os.path.isdir(path):
        return False, "no such folder"
    missing = [p for p in ("bin/nvcc", "include/cuda_runtime.h") if not os.path.exists(os.path.join(path, p))]
    if missing:
        return False, f"no {' or '.join(missing)} there"
    return True, ""


def _wrapper_target(nvcc: str) -> str | None:
    """The toolkit a wrapper script points at (``exec /x/bin/nvcc ...``), or None."""
    try:
        with open(nvcc, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"exec\s+['\"]?(/[^\s'\"]+)/bin/nvcc\b", head)
    return match.group(1).decode() if match else None


def find_cuda_toolkit(
    environ: dict | None = None,
    torch_cuda_version: str | None = None,
    torch_guess: str | None = None,
    which=shutil.which,
    conventional: tuple[str, ...] = ("/usr/local/cuda-{version}", "/usr/local/cuda"),
) -> tuple[str | None, list[str]]:
    """The first real toolkit among the candidates (module docstring), and one note per candidate tried.

    Args:
        environ: the environment (default ``os.environ``).
        torch_cuda_version: e.g. "13.0" (``torch.version.cuda``), for ``/usr/local/cuda-13.0``.
        torch_guess: ``torch.utils.cpp_extension.CUDA_HOME``.
        which: how to find ``nvcc`` on the PATH (``shutil.which``).
        conventional: the conventional folders, ``{version}`` filled with ``torch_cuda_version`` (skipped without).
    """
    environ = os.environ if environ is None else environ
    candidates: list[tuple[str, str | None]] = [
        ("CUDA_HOME", environ.get("CUDA_HOME")),
        ("CUDA_PATH", environ.get("CUDA_PATH")),
    ]
    for folder in conventional:
        if "{version}" in folder and not torch_cuda_version:
            continue
        candidates.append(("conventional folder", folder.format(version=torch_cuda_version)))
    nvcc = which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append((f"nvcc on the PATH ({nvcc})", os.path.dirname(os.path.dirname(real))))
        target = _wrapper_target(real)
        if target:
            candidates.append((f"the toolkit the wrapper {nvcc} runs", target))
    candidates.append(("torch's guess", torch_guess))
    notes, seen = [], set()
    for source, path in candidates:
        if not path or path in seen:
            continue
        seen.add(path)
        ok, why = is_toolkit(path)
        if ok:
            notes.append(f"{source}: {path} is a CUDA toolkit")
            return path, notes
        notes.append(f"{source}: {path} rejected ({why})")
    return None, notes
