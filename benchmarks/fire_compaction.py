"""Batched FIRE with and without compaction (finished structures leave the evaluated batch), side by side.

    python benchmarks/fire_compaction.py            # ~2 min on one CPU core; writes runs/benchmarks/fire_compaction.*

The basin study's base MLIP relaxes ``--starts`` silicon-defect starts (64-site cells, validation split) to fmax
0.01 eV/Å in one batch, once with ``compact=False`` and once with ``compact=True``, alternating, ``--repeats``
times after a warm-up. Before timing, the two end states are checked to agree (steps equal, positions within
1e-8 Å). Reported: wall time (median), force evaluations and evaluated structures per relaxation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUT, RESULTS, machine, machine_label, markdown_table, write_json  # noqa: E402

from gdeq_ext import Batch  # noqa: E402
from gdeq_ext.neighbors import VerletList  # noqa: E402
from gdeq_ext.potentials import MLIP  # noqa: E402
from gdeq_ext.relax import fire  # noqa: E402
from gdeq_ext.relax.forces import default_force_fn  # noqa: E402


class Counter:
    def __init__(self):
        self.inner, self.calls, self.structures = default_force_fn(None), 0, 0

    def __call__(self, potential, batch, edges, create_graph=False):
        self.calls += 1
        self.structures += batch.n_systems
        return self.inner(potential, batch, edges, create_graph=create_graph)


def relax(model, batch, compact: bool):
    counter = Counter()
    started = time.perf_counter()
    out = fire(model, batch, fmax=0.01, max_steps=3000, verlet=VerletList(model.cutoff, 0.5), force_fn=counter,
               compact=compact, warn=False)  # fmt: skip
    return out, time.perf_counter() - started, counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=str(RESULTS / "basins_full" / "base.pt"))
    parser.add_argument("--output", default=str(OUTPUT / "fire_compaction"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import basins

    starts = basins.dataset(basins.FULL).val[: args.starts]
    model = MLIP.load(args.model).to(torch.float64)
    batch = Batch.from_ase(starts, dtype=torch.float64)
    info = machine("cpu")
    relax(model, batch, True)  # warm-up
    plain, _, _ = relax(model, batch, False)
    packed, _, _ = relax(model, batch, True)
    assert plain.steps.tolist() == packed.steps.tolist(), "compaction changed a trajectory"
    error = float((plain.positions - packed.positions).abs().max())
    assert error < 1e-8, f"end states differ by {error} Å"
    times = {False: [], True: []}
    counts = {}
    for _ in range(args.repeats):
        for compact in (False, True):
            _, seconds, counter = relax(model, batch, compact)
            times[compact].append(seconds)
            counts[compact] = (counter.calls, counter.structures)
    rows = []
    for compact in (False, True):
        calls, structures = counts[compact]
        rows.append(["on" if compact else "off", f"{statistics.median(times[compact]):.2f} s", calls, structures])
    speedup = statistics.median(times[False]) / statistics.median(times[True])
    steps = plain.steps.tolist()
    text = (
        f"Batched FIRE (fmax 0.01 eV/Å) of {len(starts)} silicon-defect starts (64-site cells) under the basin study's "
        f"base MLIP, float64, compaction off and on, median of {args.repeats} alternating runs after a warm-up; steps "
        f"per structure {min(steps)}–{max(steps)} (median {statistics.median(steps):.0f}); end states equal to "
        f"{error:.1e} Å. {machine_label(info)}, {info['date']}.\n\n"
        + markdown_table(["compaction", "wall time", "force evaluations", "structures evaluated"], rows)
        + f"\n\nSpeed-up from compaction: {speedup:.2f}x.\n"
    )
    output = Path(args.output)
    write_json(
        output.with_suffix(".json"),
        {"machine": info, "arguments": vars(args), "times": {str(k): v for k, v in times.items()},
         "counts": {str(k): v for k, v in counts.items()}, "steps": steps, "max_position_difference": error},
    )  # fmt: skip
    output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
