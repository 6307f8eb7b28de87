#!/usr/bin/env python
"""Fail when a module of gdeq_ext imports upward, or when two subpackages import each other.

The layers, lowest first (docs/architecture.md)::

    core       _extension, _version, _build_config, hardware, seeds, profiling (build, the machine, seeds, memory)
    data       Batch, relaxation pairs (extxyz I/O), reference crystals
    neighbors  neighbor lists (Edges), Verlet lists, edge vectors; loss (ΔQ needs the minimum image)
    potentials the potential interface, SW, the MLIP, the force node
    gradients  Hessian operators, Krylov and fixed-point solves, the implicit function
    relax      FIRE, the window, BPTT / implicit / hybrid, polish, validity
    apps       datasets (defect sets, basin judging), diagnose, train, ase, testing
    (benchmarks/ and scripts/ sit above the package and are not checked)

A module may import its own layer and those below. Every import counts: module level, inside functions, under
``if TYPE_CHECKING``. ``gdeq_ext/__init__.py`` (the public facade) may import anything. Cycles between
subpackages of one layer are reported too. Run: ``python scripts/check_layers.py [--graph]``; exit status 1 on a
violation, each printed as ``file:line: module (layer) imports target (layer)``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "gdeq_ext"

LAYERS = ["core", "data", "neighbors", "potentials", "gradients", "relax", "apps"]

# Longest prefix wins. Module names are relative to gdeq_ext.
ASSIGNMENT = {
    "_extension": "core",
    "_version": "core",
    "_build_config": "core",
    "_C": "core",
    "_cuda_toolkit": "core",
    "hardware": "core",
    "compat": "core",
    "seeds": "core",
    "profiling": "core",
    "data": "data",
    "data.batch": "data",
    "data.relaxation_pairs": "data",
    "loss": "neighbors",
    "neighbors": "neighbors",
    "potentials": "potentials",
    "gradients": "gradients",
    "relax": "relax",
    "datasets": "apps",
    "diagnose": "apps",
    "train": "apps",
    "ase": "apps",
    "testing": "apps",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    best = None
    for prefix, layer in ASSIGNMENT.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported gdeq_ext module relative to the package) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "gdeq_ext" or alias.name.startswith("gdeq_ext."):
                    found.append((node.lineno, alias.name.removeprefix("gdeq_ext").removeprefix(".")))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and (node.module == "gdeq_ext" or node.module.startswith("gdeq_ext.")):
                target = node.module.removeprefix("gdeq_ext").removeprefix(".")
            else:
                continue
            if target == "":  # from gdeq_ext import X: X may be a submodule or a name of the facade
                for alias in node.names:
                    found.append((node.lineno, alias.name if layer_of(alias.name) else ""))
            else:
                found.append((node.lineno, target))
    return found


def subpackage(module: str) -> str:
    return module.split(".")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", action="store_true", help="print the subpackage import graph")
    args = parser.parse_args()
    rank = {layer: k for k, layer in enumerate(LAYERS)}
    problems = []
    edges: dict[str, set[str]] = {}
    files = sorted(PACKAGE.rglob("*.py"))
    for path in files:
        module = module_name(path)
        if module == "":  # the facade
            continue
        own = layer_of(module)
        where = path.relative_to(ROOT)
        if own is None:
            problems.append(f"{where}:1: module {module} has no layer (add it to ASSIGNMENT in {Path(__file__).name})")
            continue
        for line, target in imports_of(path, module):
            if target == "":
                problems.append(f"{where}:{line}: {module} ({own}) imports the gdeq_ext facade (import the module)")
                continue
            theirs = layer_of(target)
            if theirs is None:
                problems.append(f"{where}:{line}: {module} imports {target}, which has no layer")
                continue
            if rank[theirs] > rank[own]:
                problems.append(f"{where}:{line}: {module} ({own}) imports {target} ({theirs}): upward")
            if subpackage(target) != subpackage(module):
                edges.setdefault(subpackage(module), set()).add(subpackage(target))
    # Cycles between subpackages (within a layer; upward edges are reported above).
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            if a < b and a in edges.get(b, set()):
                problems.append(f"src/gdeq_ext: subpackages {a} and {b} import each other")
    if args.graph:
        for a, targets in sorted(edges.items()):
            print(f"{a} ({layer_of(a)}) -> {', '.join(f'{b} ({layer_of(b)})' for b in sorted(targets))}")
    if problems:
        print("\n".join(problems))
        print(f"\n{len(problems)} layer violation(s) in {len(files)} files (layers: {' < '.join(LAYERS)})")
        return 1
    print(f"layers ok: {len(files)} files, {' < '.join(LAYERS)}; no upward import, no cycle between subpackages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
