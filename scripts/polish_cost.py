"""What the Newton polish and the curvature check cost, on the 64-site silicon defect starts.

The potential is SW plus a small learnable MLIP correction, float64.

For each case of ``gdeq_ext.datasets.silicon_defects`` (two starts each, one batch), ImplicitRelax at the default fmax
0.01 eV/Å with and without the polish; prints FIRE steps, the polish's force evaluations and Hessian-vector products
per batch, the backward's products, the estimated fixed-point error before/after, the validity flags and wall times.
Run: ``python scripts/polish_cost.py`` (about a minute on 2 cores). Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import time
import warnings

import torch

from gdeq_ext import MLIP, Batch, StillingerWeber
from gdeq_ext.datasets.silicon_defects import CASES, make_start
from gdeq_ext.hardware import describe
from gdeq_ext.loss import delta_q
from gdeq_ext.potentials.base import Potential
from gdeq_ext.relax import ImplicitRelax, PolishOptions


class TeacherPlusCorrection(Potential):
    """SW plus a small learnable MLIP correction (the fine-tuning setting): θ = the MLIP's weights."""

    def __init__(self, scale: float = 0.05):
        super().__init__()
        self.teacher = StillingerWeber()
        self.correction = MLIP(features=8, channels=4, n_radial=4, n_layers=1, hidden=8, seed=0).double()
        self.scale = scale
        self.cutoff = max(self.teacher.cutoff, self.correction.cutoff)

    def energy(self, batch, edges=None):
        return self.teacher.energy(batch, edges) + self.scale * self.correction.energy(batch, edges)


def main() -> None:
    torch.set_num_threads(1)
    starts = [make_start(case, 64, seed=0, index=i) for case in CASES for i in range(2)]
    batch = Batch.from_ase(starts, dtype=torch.float64)
    potential = TeacherPlusCorrection()
    reference = batch.positions.detach() + 0.01
    rows = []
    for name, options in [("no polish", PolishOptions(newton_steps=0, curvature_steps=0)), ("default", None)]:
        relax = ImplicitRelax(potential, polish=options, warn=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            result = relax(batch)
            forward = time.perf_counter() - started
            started = time.perf_counter()
            delta_q(result.positions, reference, batch).sum().backward()
            backward = time.perf_counter() - started
        v = result.validity
        rows.append(
            f"| {name} | {int(result.steps.sum())} | {v.force_evaluations} | {v.hvps} | {result.hvps} | "
            f"{float(result.fmax.max()):.2e} | {float(torch.nan_to_num(v.fixed_point_error, nan=-1).max()):.2e} | "
            f"{int(v.valid.sum())}/{len(starts)} | {int((~v.minimum).sum())} | {forward:.2f} s | {backward:.2f} s |"
        )
    print(
        f"{len(starts)} starts (2 per case) in 64-site cells, SW + 0.05 MLIP, float64, one batch, "
        f"{describe(batch.device)}"
    )
    print(
        "| polish | FIRE steps (sum) | polish force evals | polish+check H·v | backward H·v | max fmax (eV/Å) | "
        "max fixed-point error (Å) | valid | saddles | forward | backward |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
