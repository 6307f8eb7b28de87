"""``python -m gdeq_ext.diagnose PAIRS.extxyz --model base.pt``: would hybrid training help on these data?

Reads relaxation pairs (extxyz with ``ref_positions``, the layout of ``gdeq_ext.data.write_relaxation_pairs``):
each start, and the teacher's relaxed structure from it. Relaxes every start with the base potential and measures
the four conditions of :func:`gdeq_ext.diagnose.diagnose` (forces right, competing minima, base in the wrong basin,
a short relaxation), prints them with the verdict, and writes them as JSON (``--output``, default
``diagnosis.json``). Exit status: 0 done (whatever the verdict), 2 bad input.

    python -m gdeq_ext.diagnose examples/si_defects_train.extxyz --model runs/hybrid/base.pt --teacher sw
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

__all__ = ["main"]

TEACHERS = ("sw", "emt", "lj", "none")


def _teacher(name: str):
    if name == "sw":
        from gdeq_ext.potentials.stillinger_weber import StillingerWeber

        return StillingerWeber()
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "lj":
        from ase.calculators.lj import LennardJones

        return LennardJones()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gdeq_ext.diagnose",
        description="Would hybrid (G-DEQ) training help on these relaxation pairs? The four conditions and a verdict.",
    )
    parser.add_argument("pairs", help="extxyz of relaxation pairs (start positions + ref_positions)")
    parser.add_argument("--model", required=True, help="the base potential (a file written by MLIP.save)")
    parser.add_argument(
        "--teacher", choices=TEACHERS, default="none", help="who labelled the data (default none: no quench)"
    )
    parser.add_argument("--window", type=int, default=20, help="K, the hybrid window training would use (20)")
    parser.add_argument("--fmax", type=float, default=0.01, help="eV/Å, the base's FIRE tolerance (0.01)")
    parser.add_argument("--max-steps", type=int, default=3000, help="FIRE steps per start at most (3000)")
    parser.add_argument("--output", default="diagnosis.json", help="JSON file of the result (diagnosis.json)")
    args = parser.parse_args(argv)

    from gdeq_ext.data.relaxation_pairs import read_relaxation_pairs
    from gdeq_ext.diagnose import diagnose
    from gdeq_ext.potentials.mlip import MLIP

    try:
        pairs = read_relaxation_pairs(args.pairs)
        model = MLIP.load(args.model)
        if not args.window >= 0:
            raise ValueError(f"--window must be >= 0, got {args.window}")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    starts = []
    for pair in pairs:
        atoms = pair.start.copy()
        atoms.arrays["target"] = np.asarray(pair.reference, dtype=np.float64)
        starts.append(atoms)
    result = diagnose(
        model,
        starts,
        teacher=_teacher(args.teacher),
        window=args.window,
        fmax=args.fmax,
        max_steps=args.max_steps,
    )
    print(
        f"{len(starts)} starts from {args.pairs}; base {args.model}; teacher {args.teacher}; window K = {args.window}"
    )
    print()
    print(result.report())
    print()
    correct = sum(result.base_correct)
    print(
        f"base in the teacher's basin: {correct}/{len(starts)}; median FIRE steps of the base "
        f"{float(np.median(result.base_steps)):.0f}; basins per group: "
        + ", ".join(f"{g} {n}" for g, n in result.basins_per_group.items())
    )
    with open(args.output, "w") as handle:
        json.dump(result.to_dict(), handle, indent=1, default=float)
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
