"""The silicon point-defect data set: deterministic for a seed, cached, split, basins that depend on the start."""

from __future__ import annotations

import numpy as np
import pytest

from gdeq_ext.datasets import silicon_defects
from gdeq_ext.datasets.silicon_defects import CASES, KNOWN_MINIMA, make_start

TINY = dict(n_train=3, n_val=1, n_test=4, sizes=(64,), cases=("vacancy_breathing", "vacancy_kick"))


def _same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a.get_positions(), b.get_positions(), atol=1e-8)
        np.testing.assert_allclose(a.arrays["target"], b.arrays["target"], atol=1e-8)
        assert a.info["basin"] == b.info["basin"] and a.info["case"] == b.info["case"]


@pytest.mark.parametrize("case", CASES)
def test_make_start_is_deterministic_for_a_seed(case):
    first, again, other = make_start(case, 64, seed=5, index=3), make_start(case, 64, 5, 3), make_start(case, 64, 6, 3)
    np.testing.assert_array_equal(first.get_positions(), again.get_positions())
    assert not np.allclose(first.get_positions(), other.get_positions())
    assert len(first) == (63 if "vacancy" in case else 65)
    # no two atoms closer than 1.4 Å (kicks are redrawn until the kicked atom is ≥ 1.8 Å from the rest; the
    # unrelaxed dumbbell sits 1.54 Å from a neighbour)
    d = first.get_all_distances(mic=True) + 10 * np.eye(len(first))
    assert d.min() > 1.4


def test_generator_is_deterministic_and_cached(tmp_path, single_thread):
    data = silicon_defects(**TINY, seed=1, cache=tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (3, 1, 4)
    assert data.path is not None and data.path.exists()
    again = silicon_defects(**TINY, seed=1, cache=None)  # regenerated from scratch
    cached = silicon_defects(**TINY, seed=1, cache=tmp_path)  # read back from extxyz
    for split in ("train", "val", "test"):
        _same(getattr(data, split), getattr(again, split))
        _same(getattr(data, split), getattr(cached, split))
    other = silicon_defects(**TINY, seed=2, cache=None)
    assert not np.allclose(other.test[0].get_positions()[:5], data.test[0].get_positions()[:5])
    for atoms in data.all:
        assert atoms.info["converged"] and atoms.info["final_fmax"] < 1e-4
        assert atoms.info["basin"] in KNOWN_MINIMA["vacancy"][64]
    assert "vacancy_kick (64)" in data.summary()


def test_vacancy_breathing_basin_depends_on_the_start(single_thread):
    data = silicon_defects(n_train=0, n_val=0, n_test=10, sizes=(64,), cases=("vacancy_breathing",), cache=None)
    for atoms in data.test:  # docs/science.md: inward ≤ 0.26 Å -> open, ≥ 0.27 Å -> reconstructed
        if atoms.info["breathing"] < 0.25:
            assert atoms.info["basin"] == "open"
        elif atoms.info["breathing"] > 0.28:
            assert atoms.info["basin"] == "reconstructed"
    assert len({atoms.info["basin"] for atoms in data.test}) == 2
    formation = sorted(atoms.info["basin_energy"] for atoms in data.test)
    assert formation[0] == pytest.approx(2.835, abs=2e-3) and formation[-1] == pytest.approx(4.337, abs=2e-3)
