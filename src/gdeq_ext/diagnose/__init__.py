"""Does hybrid (G-DEQ) training have leverage on this data set? The four conditions of docs/method.md, measured.

:func:`diagnose` relaxes every start with the base potential (batched FIRE, the teacher's protocol) and
compares with the teacher's end state from the same start, then checks

1. **forces**: the base's forces are right: the median over starts of the per-start force RMSE vs the teacher,
   relative to the start's RMS teacher force, at most ``max_relative_force_error`` (0.35); the absolute force
   MAE on the starts and at the teacher's minima is reported too;
2. **competing minima**: the teacher reaches at least two distinct minima from the perturbed starts of one
   group (a case and cell size): end states clustered by refined energy (:func:`gdeq_ext.datasets.basins.label_basins`),
   or by structure when no energies are known;
3. **wrong basin**: the base sends at least ``min_wrong_fraction`` (0.05) of the starts to another basin than
   the teacher's (:func:`gdeq_ext.datasets.basins.judge_basins`: the base's end state quenched by the teacher lies
   within 0.1 Å per atom of the teacher's end state, after pairing and removing the net translation);
4. **short relaxation**: the window K covers at least ``min_window_fraction`` (0.1) of the median number of FIRE
   steps the base takes, so the few differentiated steps see the part of the path where the basin is picked.

Verdict: "headroom" when all four hold, else "no headroom", with the failing conditions named. Condition 3 is the
one that says there is something to fix; 1 says a fine-tuning signal is not wasted on fixing forces; 2 that the
wrong basins are real competing minima of the teacher; 4 that a short window can reach the decision.
The thresholds are heuristics, stated so that they can be argued with; the measured values are returned too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from gdeq_ext.datasets.basins import judge_basins, label_basins, structure_distance
from gdeq_ext.datasets.relaxations import _device_of, _dtype_of, _is_ase_calculator, relax_starts

__all__ = ["Condition", "Diagnosis", "diagnose", "group_of"]


@dataclass
class Condition:
    """One of the four conditions: its measured ``value``, the ``threshold`` it is compared with, and why."""

    name: str
    holds: bool
    value: float
    threshold: float
    detail: str


@dataclass
class Diagnosis:
    """What :func:`diagnose` measured (per start lists follow the order of the data set)."""

    verdict: str  # "headroom" | "no headroom"
    explanation: str
    conditions: dict[str, Condition]
    n_starts: int
    window: int
    base_correct: list[bool] = field(default_factory=list)
    base_steps: list[int] = field(default_factory=list)
    base_deviation: list[float] = field(default_factory=list)  # Å, largest per-atom deviation (quenched if teacher)
    teacher_basins: list[int] = field(default_factory=list)  # basin index within the start's group
    groups: list[str] = field(default_factory=list)
    basins_per_group: dict[str, int] = field(default_factory=dict)

    @property
    def headroom(self) -> bool:
        return self.verdict == "headroom"

    @property
    def base_correct_fraction(self) -> float:
        return float(np.mean(self.base_correct)) if self.base_correct else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["base_correct_fraction"] = self.base_correct_fraction
        return out

    def report(self) -> str:
        """A markdown summary: one row per condition and the verdict."""
        lines = [
            f"**{self.verdict}** ({self.n_starts} starts, window K = {self.window}): {self.explanation}",
            "",
            "| condition | holds | value | threshold | detail |",
            "|---|---|---|---|---|",
        ]
        for c in self.conditions.values():
            lines.append(
                f"| {c.name} | {'yes' if c.holds else 'no'} | {c.value:.3g} | {c.threshold:.3g} | {c.detail} |"
            )
        return "\n".join(lines)


def group_of(atoms) -> str:
    """The group of a start: ``"case (sites)"`` for :func:`gdeq_ext.datasets.silicon_defects` starts, else
    ``info["group"]``, else the chemical formula."""
    info = atoms.info
    if "case" in info:
        return f"{info['case']} ({info.get('sites', len(atoms))})"
    if "group" in info:
        return str(info["group"])
    return atoms.get_chemical_formula()


def _forces(potential, structures) -> list[np.ndarray]:
    if _is_ase_calculator(potential):
        out = []
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = potential
            out.append(atoms.get_forces())
        return out
    from gdeq_ext.data.batch import Batch
    from gdeq_ext.potentials.base import energy_forces

    dtype = _dtype_of(potential)
    out = []
    for begin in range(0, len(structures), 32):
        chunk = structures[begin : begin + 32]
        batch = Batch.from_ase(chunk, dtype=dtype, device=_device_of(potential))
        _, forces = energy_forces(potential, batch)
        out += [forces[lo:hi].detach().double().cpu().numpy() for lo, hi in batch.ranges()]
    return out


def _energies(potential, structures) -> list[float]:
    if _is_ase_calculator(potential):
        values = []
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = potential
            values.append(float(atoms.get_potential_energy()))
        return values
    from gdeq_ext.data.batch import Batch
    from gdeq_ext.potentials.base import energy_forces

    batch = Batch.from_ase(list(structures), dtype=_dtype_of(potential), device=_device_of(potential))
    energy, _ = energy_forces(potential, batch)
    return energy.detach().double().cpu().tolist()


def _structural_basins(ends, starts, groups, threshold) -> list[int]:
    labels, representatives = [], {}
    for end, start, group in zip(ends, starts, groups, strict=True):
        reps = representatives.setdefault(group, [])
        for index, rep in enumerate(reps):
            match = structure_distance(end, rep, start.cell.array, start.pbc, start.numbers)
            if match.max_deviation < threshold:
                labels.append(index)
                break
        else:
            reps.append(end)
            labels.append(len(reps) - 1)
    return labels


def diagnose(
    base_potential,
    dataset: Sequence,
    teacher=None,
    *,
    window: int = 20,
    fmax: float = 0.01,
    max_steps: int = 3000,
    threshold: float = 0.1,
    direct_threshold: float = 0.4,
    energy_tolerance: float = 0.005,
    max_relative_force_error: float = 0.35,
    min_wrong_fraction: float = 0.05,
    min_window_fraction: float = 0.1,
    base_ends: Sequence | None = None,
) -> Diagnosis:
    """Measure the four conditions of hybrid training's leverage on ``dataset`` and give a verdict.

    Args:
        base_potential: the potential before fine-tuning (a torch module mapping a Batch to energies).
        dataset: perturbed starts (``ase.Atoms``), e.g. :func:`gdeq_ext.datasets.silicon_defects` ``.test``. Starts
            with ``arrays["target"]`` use it as the teacher's end state (and ``info["teacher_energy"]`` when
            present); the others are relaxed with ``teacher``. A
            :class:`~gdeq_ext.datasets.silicon_defects.DefectDataset`
            is accepted too (its test split).
        teacher: the reference potential (torch module or ASE calculator); needed for the force error and for
            starts without targets. Relaxations follow the protocol of :mod:`gdeq_ext.datasets.silicon_defects`
            (FIRE to ``fmax``, teacher refined to 1e-4 eV/Å).
        window: K, the differentiated window hybrid training would use.
        fmax, max_steps: the base's FIRE relaxation (eV/Å; steps).
        threshold, direct_threshold: Å, largest per-atom deviation of "the same basin" after quenching the base's
            end state with the teacher (0.1), or directly when no teacher is given (0.4): see
            :func:`gdeq_ext.datasets.basins.judge_basins`.
        energy_tolerance: eV, teacher end states within it (per group) are one basin.
        max_relative_force_error, min_wrong_fraction, min_window_fraction: the thresholds (module doc).
        base_ends: precomputed base relaxations (:func:`relax_starts` format), to avoid relaxing twice.

    Returns:
        :class:`Diagnosis`.
    """
    starts = list(getattr(dataset, "test", dataset))
    if not starts:
        raise ValueError("diagnose needs at least one start")
    groups = [group_of(atoms) for atoms in starts]

    # The teacher's end states (and energies) from each start.
    have_targets = all("target" in atoms.arrays for atoms in starts)
    if have_targets:
        teacher_ends = [np.asarray(atoms.arrays["target"], dtype=np.float64) for atoms in starts]
        energies = [atoms.info.get("teacher_energy") for atoms in starts]
        if any(e is None for e in energies):
            energies = None
            if teacher is not None:
                ends = [atoms.copy() for atoms in starts]
                for atoms, end in zip(ends, teacher_ends, strict=True):
                    atoms.set_positions(end)
                energies = _energies(teacher, ends)
    else:
        if teacher is None:
            raise ValueError("starts without arrays['target'] need a teacher to relax them")
        relaxed = relax_starts(teacher, starts, fmax=fmax, max_steps=max_steps, refine_fmax=1e-4)
        teacher_ends = [r["positions"] for r in relaxed]
        energies = [r["energy"] for r in relaxed]
    if energies is not None:
        basins = label_basins(energies, groups, tolerance=energy_tolerance)
    else:
        basins = _structural_basins(teacher_ends, starts, groups, threshold)
    basins_per_group = {
        g: len({b for b, h in zip(basins, groups, strict=True) if h == g}) for g in dict.fromkeys(groups)
    }

    # The base's end states.
    if base_ends is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base_ends = relax_starts(base_potential, starts, fmax=fmax, max_steps=max_steps)
    judged = judge_basins(starts, [r["positions"] for r in base_ends], teacher, threshold, direct_threshold)
    deviations = [j.get("quenched", j["direct"]) for j in judged]
    correct = [j["correct"] for j in judged]
    steps = [int(r["steps"]) for r in base_ends]

    conditions: dict[str, Condition] = {}
    # 1. forces
    if teacher is not None:
        ends = []
        for atoms, end in zip(starts, teacher_ends, strict=True):
            copy = atoms.copy()
            copy.set_positions(end)
            ends.append(copy)
        base_f = _forces(base_potential, [*starts, *ends])
        teacher_f = _forces(teacher, [*starts, *ends])
        n = len(starts)
        per_start = [
            float(np.sqrt(np.mean((b - t) ** 2)) / max(np.sqrt(np.mean(t**2)), 1e-12))
            for b, t in zip(base_f[:n], teacher_f[:n], strict=True)
        ]
        relative = float(np.median(per_start))
        errors = [np.abs(b - t).ravel() for b, t in zip(base_f, teacher_f, strict=True)]
        mae_starts = float(np.mean(np.concatenate(errors[:n])))
        mae_minima = float(np.mean(np.concatenate(errors[n:])))
        conditions["forces"] = Condition(
            "1. base forces right",
            relative <= max_relative_force_error,
            relative,
            max_relative_force_error,
            f"median over starts of force RMSE / RMS teacher force = {relative:.3f} (worst {max(per_start):.2f}); "
            f"force MAE {mae_starts:.3f} eV/Å on the starts, {mae_minima:.3f} eV/Å at the teacher's minima",
        )
    else:
        conditions["forces"] = Condition(
            "1. base forces right", True, float("nan"), max_relative_force_error, "not measured (no teacher given)"
        )
    # 2. competing minima
    most = max(basins_per_group.values())
    multi = [g for g, n in basins_per_group.items() if n >= 2]
    in_multi = float(np.mean([g in multi for g in groups]))
    conditions["competing_minima"] = Condition(
        "2. competing minima",
        most >= 2,
        float(most),
        2.0,
        f"teacher minima per group: {', '.join(f'{g}: {n}' for g, n in basins_per_group.items())}; "
        f"{100 * in_multi:.0f}% of starts are in groups with ≥ 2",
    )
    # 3. wrong basin
    wrong = 1.0 - float(np.mean(correct))
    conditions["wrong_basin"] = Condition(
        "3. base lands in a wrong basin",
        wrong >= min_wrong_fraction,
        wrong,
        min_wrong_fraction,
        f"base correct on {sum(correct)}/{len(correct)} starts "
        + (
            f"(teacher-quenched end state within {threshold} Å per atom)"
            if teacher is not None
            else f"(end state within {direct_threshold} Å per atom)"
        ),
    )
    # 4. relaxation length vs window
    median = float(np.median(steps))
    fraction = window / max(median, 1.0)
    conditions["relaxation_length"] = Condition(
        "4. relaxation short enough for the window",
        fraction >= min_window_fraction,
        fraction,
        min_window_fraction,
        f"K = {window} of a median {median:.0f} base FIRE steps (range {min(steps)}–{max(steps)})",
    )

    failed = [c for c in conditions.values() if not c.holds]
    if not failed:
        verdict = "headroom"
        explanation = (
            f"hybrid training should help: the base's forces are close to the teacher's, the teacher has competing "
            f"minima, the base picks a wrong one on {100 * wrong:.0f}% of starts, and a window of {window} steps "
            f"covers {100 * fraction:.0f}% of the median relaxation, where the basin is chosen"
        )
    else:
        verdict = "no headroom"
        reasons = []
        for c in failed:
            if c is conditions["wrong_basin"]:
                reasons.append(
                    f"the base already lands in the teacher's basin on {100 * (1 - wrong):.0f}% of starts: "
                    "nothing for basin selection to fix (implicit fine-tuning of precision suffices)"
                )
            elif c is conditions["competing_minima"]:
                reasons.append("the teacher has a single minimum per group: no basin to select")
            elif c is conditions["forces"]:
                reasons.append(
                    f"the base's forces are off (relative error {c.value:.2f}): fix them by force matching first; "
                    "a wrong basin may just be a wrong landscape"
                )
            else:
                reasons.append(
                    f"relaxations are long (median {median:.0f} steps) for a window of {window}: the window sees only "
                    f"{100 * fraction:.0f}% of the path; raise K or expect BPTT-like memory"
                )
        explanation = "; ".join(reasons)
    return Diagnosis(
        verdict=verdict,
        explanation=explanation,
        conditions=conditions,
        n_starts=len(starts),
        window=int(window),
        base_correct=correct,
        base_steps=steps,
        base_deviation=[float(d) for d in deviations],
        teacher_basins=[int(b) for b in basins],
        groups=groups,
        basins_per_group=basins_per_group,
    )
