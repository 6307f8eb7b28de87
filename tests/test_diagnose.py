"""gdeq_ext.diagnose: "no headroom" when the base already lands in the teacher's basins, "headroom" when the
teacher has competing minima and a base with nearly right forces picks a wrong one."""

from __future__ import annotations

import pytest

from gdeq_ext import diagnose, silicon_defects
from gdeq_ext.potentials import StillingerWeber


@pytest.fixture(scope="module")
def breathing():
    # 8 vacancy starts whose neighbours were moved inward by 0.15-0.40 Å: open vs reconstructed under SW
    return silicon_defects(n_train=0, n_val=0, n_test=8, sizes=(64,), cases=("vacancy_breathing",), cache=None).test


def test_base_in_the_right_basin_has_no_headroom(breathing, single_thread):
    # the base is the teacher itself: right forces, competing minima, but nothing lands in a wrong basin
    result = diagnose(StillingerWeber(), breathing, teacher=StillingerWeber(), window=20)
    assert result.verdict == "no headroom" and not result.headroom
    assert result.conditions["forces"].holds and result.conditions["forces"].value < 1e-9
    assert result.conditions["competing_minima"].holds  # open and reconstructed
    assert not result.conditions["wrong_basin"].holds and all(result.base_correct)
    assert "already lands" in result.explanation
    assert "no headroom" in result.report()


def test_competing_minima_and_a_wrong_base_is_headroom(breathing, single_thread):
    # SW with a weaker three-body term (λ 17 instead of 21): forces within ~15% of the teacher's, but its
    # open/reconstructed switch sits at another breathing amplitude, so some starts end in the other basin
    base = StillingerWeber(lam=17.0)
    result = diagnose(base, breathing, teacher=StillingerWeber(), window=20)
    assert result.verdict == "headroom", result.report()
    assert result.conditions["forces"].value < 0.35
    assert result.basins_per_group == {"vacancy_breathing (64)": 2}
    assert 0 < sum(result.base_correct) < len(breathing)
    assert result.to_dict()["base_correct_fraction"] < 1.0
    # a window much shorter than the relaxation fails condition 4
    short = diagnose(base, breathing, teacher=StillingerWeber(), window=1)
    assert short.verdict == "no headroom" and not short.conditions["relaxation_length"].holds
