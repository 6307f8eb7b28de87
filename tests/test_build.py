"""What was built, the import-time torch version check, and the pure-PyTorch fallback without a build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gdeq_ext
from gdeq_ext._extension import compiled_op

PACKAGE = Path(gdeq_ext.__file__).parent


def test_build_info_reports_the_build():
    info = gdeq_ext.build_info()
    assert info["installed_torch"] == torch.__version__
    assert isinstance(info["compiled"], bool)
    if info["compiled"]:
        assert info["torch_version"] == torch.__version__
        assert info["compiled_torch_version"] == torch.__version__
        assert info["with_cuda"] == info["cuda_kernels"]


@pytest.mark.skipif(os.environ.get("GDEQ_EXT_REQUIRE_COMPILED") != "1", reason="GDEQ_EXT_REQUIRE_COMPILED not set")
def test_ci_build_is_compiled_with_the_requested_kernels():
    """CI sets GDEQ_EXT_REQUIRE_COMPILED=1: the tests must run against the compiled kernels, never the fallback."""
    info = gdeq_ext.build_info()
    assert info["compiled"], info.get("reason")
    assert compiled_op("edge_vectors", "cpu")
    if os.environ.get("GDEQ_EXT_WITH_CUDA") == "1":
        assert info["with_cuda"]
        assert compiled_op("edge_vectors", "cuda")


def copy_python_sources(destination: Path) -> Path:
    """The package's Python files without the compiled extension or its build record."""
    target = destination / "gdeq_ext"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("*.so", "_build_config.py", "__pycache__", "*.pyc"))
    return target


SITE_PACKAGES = str(Path(torch.__file__).parents[1])


def run_python(code: str, path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` with ``path`` first on sys.path. ``-S`` skips site.py, so no .pth file runs: an editable install's
    import hook (which would import the checkout whatever the path says) stays out; torch & co. come from
    PYTHONPATH instead."""
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{SITE_PACKAGES}"}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=path, env=env, capture_output=True, text=True, timeout=300
    )


def test_missing_extension_falls_back_with_one_warning(tmp_path):
    copy_python_sources(tmp_path)
    code = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gdeq_ext
    assert not gdeq_ext.HAVE_EXTENSION
    positions = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64, requires_grad=True)
    cell = torch.eye(3, dtype=torch.float64)[None] * 5
    edges = torch.tensor([[0, 1], [1, 0]])
    shifts = torch.tensor([[0, 0, 0], [1, 0, 0]])
    system = torch.zeros(2, dtype=torch.long)
    for _ in range(3):
        vectors, distances = gdeq_ext.edge_vectors(positions, cell, edges, shifts, system)
    assert distances.tolist() == [1.0, 4.0], distances
    distances.sum().backward()
ours = [w for w in caught if "gdeq_ext" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in ours]
print(ours[0].message)
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pure-PyTorch reference" in result.stdout
    assert "pip install --no-build-isolation" in result.stdout


def test_torch_version_mismatch_names_both_versions(tmp_path):
    target = copy_python_sources(tmp_path)
    (target / "_build_config.py").write_text("BUILD_CONFIG = {'torch_version': '1.0.0+fake'}\n")
    result = run_python("import gdeq_ext", tmp_path)
    assert result.returncode != 0
    assert "ExtensionVersionError" in result.stderr
    assert "1.0.0+fake" in result.stderr and torch.__version__ in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_source_checkout_without_a_build_says_so(tmp_path):
    """src/ of a checkout put on the path, never built in place: the one warning names the checkout and the fix."""
    checkout = tmp_path / "checkout"
    (checkout / "src").mkdir(parents=True)
    (checkout / "setup.py").write_text("# a gdeq_ext checkout\n")
    copy_python_sources(checkout / "src")
    code = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gdeq_ext
    assert not gdeq_ext.HAVE_EXTENSION
    x, cell = torch.zeros(2, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[None] * 5
    edges, shifts, system = torch.tensor([[0], [1]]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(2).long()
    gdeq_ext.edge_vectors(x, cell, edges, shifts, system)
print([str(w.message) for w in caught if "gdeq_ext" in str(w.message)][0])
"""
    result = run_python(code, checkout / "src")
    assert result.returncode == 0, result.stderr
    assert f"imported from the source checkout {checkout}/src" in result.stdout, result.stdout
    assert "pip install --no-build-isolation" in result.stdout


@pytest.mark.skipif(os.environ.get("GDEQ_EXT_REQUIRE_COMPILED") != "1", reason="GDEQ_EXT_REQUIRE_COMPILED not set")
def test_commands_run_from_the_repository_root_use_the_compiled_kernels():
    """#14: with the src layout, `python ...` run from the checkout's root imports the installed, compiled package
    (it used to import the uncompiled source tree and fall back to the reference silently)."""
    root = Path(__file__).resolve().parents[1]
    code = "import gdeq_ext, json; print(json.dumps(gdeq_ext.build_info()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '"compiled": true' in result.stdout, result.stdout


def test_cuda_toolkit_search_finds_a_real_toolkit_behind_a_wrapper(tmp_path):
    """#19: CUDA_HOME unset, torch's guess is a wrapper's folder: the real toolkit the wrapper runs is found, and
    every rejected candidate is named with the reason."""
    from gdeq_ext._cuda_toolkit import find_cuda_toolkit, is_toolkit

    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "include" / "cuda_runtime.h").write_text("\n")
    wrappers = tmp_path / "wrappers" / "bin"
    wrappers.mkdir(parents=True)
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert is_toolkit(str(toolkit)) == (True, "") and not is_toolkit(str(wrappers.parent))[0]

    home, notes = find_cuda_toolkit(
        environ={},
        torch_cuda_version="13.0",
        torch_guess=str(wrappers.parent),
        which=lambda _: str(wrapper),
        conventional=(str(tmp_path / "missing-{version}"),),
    )
    assert home == str(toolkit), notes
    assert any("missing-13.0 rejected (no such folder)" in n for n in notes)
    assert any(
        f"nvcc on the PATH ({wrapper}): {wrappers.parent} rejected (no include/cuda_runtime.h" in n for n in notes
    )
    # An explicit CUDA_HOME that is a toolkit wins; a wrong one is named and the search goes on.
    assert find_cuda_toolkit(environ={"CUDA_HOME": str(toolkit)}, which=lambda _: None, conventional=())[0] == str(
        toolkit
    )
    home, notes = find_cuda_toolkit(environ={"CUDA_HOME": str(tmp_path)}, which=lambda _: str(wrapper), conventional=())
    assert home == str(toolkit) and notes[0].startswith(f"CUDA_HOME: {tmp_path} rejected (no bin/nvcc")
    assert find_cuda_toolkit(environ={}, which=lambda _: None, conventional=()) == (None, [])
