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


def test_diagnose_command_on_relaxation_pairs(breathing, single_thread, tmp_path, capsys):
    """#19: python -m gdeq_ext.diagnose PAIRS --model base.pt --teacher sw prints the conditions and writes JSON."""
    import json

    import torch

    from gdeq_ext.data import RelaxationPair, write_relaxation_pairs
    from gdeq_ext.diagnose.__main__ import main
    from gdeq_ext.potentials import MLIP

    pairs = [RelaxationPair(atoms.copy(), atoms.arrays["target"].copy()) for atoms in breathing[:4]]
    for pair in pairs:
        pair.start.arrays.pop("target", None)
    write_relaxation_pairs(tmp_path / "pairs.extxyz", pairs)
    MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=8).to(torch.float64).save(tmp_path / "base.pt")
    output = tmp_path / "diagnosis.json"
    argv = [str(tmp_path / "pairs.extxyz"), "--model", str(tmp_path / "base.pt"), "--teacher", "sw"]
    assert main([*argv, "--window", "5", "--max-steps", "200", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "4 starts from" in printed and "| 3. base lands in a wrong basin |" in printed, printed
    assert ("**headroom**" in printed) or ("**no headroom**" in printed)
    saved = json.loads(output.read_text())
    assert saved["n_starts"] == 4 and set(saved["conditions"]) >= {"forces", "competing_minima", "wrong_basin"}
    assert main([str(tmp_path / "missing.extxyz"), "--model", str(tmp_path / "base.pt")]) == 2
    assert "relaxation pairs file not found" in capsys.readouterr().err
