"""The README's example runs as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from gdeq_ext.relax import RelaxationWarning

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    return re.findall(r"<!-- example -->\s*```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_an_example():
    assert examples(), "README.md has no python block marked <!-- example -->"


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs(index, capsys):
    """As written and without a relaxation warning: the first thing a user runs must not end in an untrusted
    gradient."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RelaxationWarning)
        exec(compile(examples()[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert printed.strip()
    if index == 0:  # the first example labels what it prints (issue #19) and ends with a trustworthy gradient
        assert "converged [True], FIRE steps [" in printed and "ΔQ " in printed, printed
        assert "trustworthy gradient [True]" in printed, printed
