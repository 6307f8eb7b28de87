"""Build gdeq_ext's kernels: C++ (CPU, OpenMP) always, CUDA when GDEQ_EXT_WITH_CUDA says so.

Switches (environment variables), each printed with the decision it led to:

  GDEQ_EXT_WITH_CUDA    auto (default) | 0 | 1. ``auto`` builds the CUDA kernels when torch is a CUDA build and
                        a CUDA toolkit is found at CUDA_HOME; it never asks whether a GPU is visible.
  CUDA_HOME             the toolkit folder (the one with bin/nvcc and include/cuda_runtime.h).
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default below); e.g. "9.0" for H100 only.
  MAX_JOBS              parallel compile jobs for ninja.
  GDEQ_EXT_DEBUG        1 compiles with -O0 -g (and -G for device code).

The extension must be compiled against the torch it runs with, so install without build isolation:

    pip install --no-build-isolation .
"""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_TORCH_MESSAGE = """
gdeq_ext: torch is not importable in this build environment.

gdeq_ext is a C++/CUDA extension and must be compiled against the torch it will run with, so it is built
without pip's build isolation (an isolated build would compile against some other torch). Run:

    pip install torch numpy ninja setuptools wheel     # or your own torch build
    pip install --no-build-isolation .
"""

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pip's isolated build environment, or no torch at all
    sys.stderr.write(NO_TORCH_MESSAGE)
    raise SystemExit(1) from None

from setuptools import setup  # noqa: E402

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def log(message: str) -> None:
    # stderr: visible in `pip install -v` and in any failure log
    print(f"[gdeq_ext build] {message}", file=sys.stderr, flush=True)


def _load_toolkit_finder():
    # By path: importing the package here would import torch's extension and the not-yet-built _C.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_gdeq_cuda_toolkit", os.path.join(ROOT, "src", "gdeq_ext", "_cuda_toolkit.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_toolkit


def cuda_toolkit() -> tuple[str | None, str]:
    """A real CUDA toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda-<version>, /usr/local/cuda, the real nvcc's
    folder, torch's guess: src/gdeq_ext/_cuda_toolkit.py), and why it was (not) found. Every candidate is logged."""
    find = _load_toolkit_finder()
    home, notes = find(torch_cuda_version=torch.version.cuda, torch_guess=cpp_extension.CUDA_HOME)
    for note in notes:
        log(f"  CUDA toolkit search: {note}")
    if home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc and include/cuda_runtime.h)"
    return home, f"CUDA toolkit at {home}"


def decide_cuda() -> tuple[bool, str]:
    switch = os.environ.get("GDEQ_EXT_WITH_CUDA", "auto").strip().lower()
    if switch not in {"auto", "0", "1"}:
        raise SystemExit(f"GDEQ_EXT_WITH_CUDA must be auto, 0 or 1, got {switch!r}")
    if switch == "0":
        return False, "GDEQ_EXT_WITH_CUDA=0"
    home, why = cuda_toolkit()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if home is None:
        problems.append(why)
    if problems:
        if switch == "1":
            raise SystemExit("GDEQ_EXT_WITH_CUDA=1 but " + "; ".join(problems))
        return False, "GDEQ_EXT_WITH_CUDA=auto and " + "; ".join(problems)
    # torch.utils.cpp_extension read CUDA_HOME at import; make sure it uses the folder we checked.
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    return True, f"GDEQ_EXT_WITH_CUDA={switch}, torch CUDA {torch.version.cuda}, {why}"


def sources(with_cuda: bool) -> list[str]:
    found = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        found += sorted(glob.glob("csrc/cuda/*.cu"))
    return found


def write_build_config(config: dict) -> None:
    path = os.path.join(ROOT, "src", "gdeq_ext", "_build_config.py")
    with open(path, "w") as handle:
        handle.write("# Written by setup.py at build time; describes the compiled extension gdeq_ext._C.\n")
        handle.write(f"BUILD_CONFIG = {config!r}\n")


def extension():
    with_cuda, reason = decide_cuda()
    debug = os.environ.get("GDEQ_EXT_DEBUG", "0") == "1"
    arch_list = None
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # explicit: torch would otherwise probe for a GPU
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}")
    log(f"CUDA kernels: {'ON' if with_cuda else 'OFF'} ({reason})")
    if with_cuda:
        log(f"TORCH_CUDA_ARCH_LIST={arch_list}")
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}, debug={debug}")

    defines = [f'-DGDEQ_EXT_TORCH_VERSION="{torch.__version__}"']
    if with_cuda:
        defines.append("-DGDEQ_EXT_WITH_CUDA")
    optimization = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*optimization, "-fopenmp", *defines]
    nvcc = [*optimization, "-lineinfo", *defines]
    if debug:
        nvcc.append("-G")
    kwargs = dict(
        name="gdeq_ext._C",
        sources=sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    ext = cpp_extension.CUDAExtension(**kwargs) if with_cuda else cpp_extension.CppExtension(**kwargs)
    write_build_config(
        {
            "torch_version": torch.__version__,
            "torch_cuda_version": torch.version.cuda,
            "with_cuda": with_cuda,
            "cuda_decision": reason,
            "cuda_home": os.environ.get("CUDA_HOME") if with_cuda else None,
            "cuda_arch_list": arch_list,
            "debug": debug,
        }
    )
    return ext


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
