"""Relaxation-training throughput: batched FIRE with and without compaction, against torch-sim's batched FIRE with
the same model, seconds per training step, and "2 threads or 2 processes" on this machine.

    python benchmarks/throughput.py             # ~8 min on a 2-core CPU (run it on an otherwise idle machine)
    python benchmarks/throughput.py --quick     # ~1 min: 4 starts, 1 repeat (the plumbing, not a measurement)
    python benchmarks/throughput.py --device cuda   # parts 1-2 on a GPU (the GPU campaign's short form)

Writes runs/benchmarks/throughput.{json,md,png} (untracked) unless ``--output`` says otherwise; ``--readme`` also
replaces the README's ``bench:throughput`` table.

System: ``--starts`` (default 16) silicon-defect starts in 64-site cells from the basin study's validation split
(``benchmarks/basins.py``'s dataset), the study's committed base MLIP (``benchmarks/results/basins_full/base.pt``),
float64 (the study's dtype) unless ``--dtype``, one torch thread unless a row says otherwise.

Parts (each timed as the median of ``--repeats`` runs after a warm-up, the variants of a part alternating run by run):

1. **Batched FIRE** to fmax 0.01 eV/Å (at most 3000 steps), all starts in one batch:
   ``gdeq_ext.relax.fire`` with ``compact=False`` (every structure is evaluated until the slowest converges: the
   behaviour before issue #15) and ``compact=True`` (finished structures leave the evaluated batch), and, when
   torch-sim is importable, ``torch_sim.optimize`` with its ASE-flavoured FIRE (the same parameters as ours:
   ASE's), ``autobatcher=False`` (it still removes converged structures every ``steps_between_swaps`` = 5 steps)
   and a force-convergence criterion of 0.01 eV/Å, around the *same* model: :class:`GdeqTorchSimModel` wraps the MLIP
   as a ``torch_sim.models.interface.ModelInterface`` with its own Verlet list (skin 0.5 Å, as our FIRE uses).
   Checked before timing: the wrapper's energies and forces equal ours on the starts; compaction off/on give the
   same steps and end positions (round-off); torch-sim's end energies are compared structure by structure (a
   different FIRE implementation may stop a few steps later or, rarely, in another minimum: counted, not hidden).
   Reported: wall time, structures per second, and the structure evaluations the run paid for (counted in the
   force function / the wrapper).
2. **Training step** of the basin study's fine-tuning (8 starts, ΔQ loss to the teacher's minima, backward to θ):
   hybrid K=10 (window, FIRE, Newton polish, implicit backward) with compaction off (FIRE, polish and backward CG
   multiply the whole batch until its slowest structure finishes) and on, checked to give the same gradient;
   BPTT T=100 (a fixed number of differentiated steps: compaction does not apply, one row).
3. **Two cores**: the batched FIRE of part 1 (compaction on) as 1 process × 1 thread, 1 process × 2 threads
   (``torch.set_num_threads(2)``) and 2 processes × 1 thread (a spawned pool, warmed up before timing, each process
   relaxing every second start), in structures per second.

torch-sim: ``pip install --no-deps torch-sim-atomistic==0.3.0`` (its newest releases need Python >= 3.12; 0.3.0 runs
on 3.11; ``--no-deps`` keeps it from replacing torch) plus ``h5py tables tqdm vesin vesin-torch``; without it the
torch-sim row says why it is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OUTPUT,
    README,
    RESULTS,
    machine,
    machine_label,
    markdown_table,
    update_readme_section,
    write_json,
)

from gdeq_ext import Batch  # noqa: E402
from gdeq_ext.loss import delta_q  # noqa: E402
from gdeq_ext.neighbors import VerletList, neighbor_list  # noqa: E402
from gdeq_ext.potentials import MLIP  # noqa: E402
from gdeq_ext.potentials.base import Edges, energy_forces  # noqa: E402
from gdeq_ext.relax import fire  # noqa: E402
from gdeq_ext.train.config import RelaxConfig  # noqa: E402
from gdeq_ext.train.factories import make_relaxation  # noqa: E402

FMAX, MAX_STEPS, SKIN = 0.01, 3000, 0.5
BASE = RESULTS / "basins_full" / "base.pt"
DEVICE = torch.device("cpu")  # --device (set once in main; the worker processes of part 3 are CPU-only)
PROTOCOL = "full"  # which of the basin study's data sets: "full" (default) or "quick" (--quick)


def now() -> float:
    """perf_counter after the device has finished what was queued (CUDA kernels run asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


# ------------------------------------------------------------------------------------------------ inputs
def load_starts(split: str, n: int) -> list:
    """The basin study's silicon-defect starts (ase.Atoms with ``arrays["target"]``: the teacher's minimum)."""
    import basins

    data = basins.dataset(basins.QUICK if PROTOCOL == "quick" else basins.FULL)
    starts = getattr(data, split)
    if len(starts) < n:
        raise SystemExit(f"the study's {split} split has {len(starts)} starts, {n} were asked for")
    return starts[:n]


def load_model(path: str, dtype: torch.dtype) -> MLIP:
    return MLIP.load(path).to(device=DEVICE, dtype=dtype)


class CountingForces:
    """The default force function, counting calls and evaluated structures."""

    def __init__(self):
        self.calls = self.structures = 0

    def __call__(self, potential, batch, edges, create_graph=False):
        self.calls += 1
        self.structures += batch.n_systems
        return energy_forces(potential, batch, edges, create_graph=create_graph)


# --------------------------------------------------------------------------------------- part 1: FIRE
def gdeq_fire(model, batch: Batch, compact: bool) -> dict:
    counter = CountingForces()
    started = now()
    out = fire(model, batch, fmax=FMAX, max_steps=MAX_STEPS, verlet=VerletList(model.cutoff, SKIN), force_fn=counter,
               compact=compact, warn=False)  # fmt: skip
    seconds = now() - started
    return dict(seconds=seconds, evaluations=counter.structures, calls=counter.calls, steps=out.steps.tolist(),
                converged=int(out.converged.sum()), energy=out.energy.tolist(), positions=out.positions)  # fmt: skip


def torch_sim_model_class():
    """:class:`GdeqTorchSimModel`, defined only where torch-sim imports (its base class comes from there)."""
    from torch_sim.models.interface import ModelInterface

    class GdeqTorchSimModel(ModelInterface):
        """A gdeq potential as a torch-sim model: ``forward(state) -> {"energy": (n_systems,), "forces":
        (n_atoms, 3)}`` in eV and eV/Å, with a Verlet list (skin 0.5 Å) kept across calls like our FIRE's (torch-sim
        changes the batch when it removes converged structures; the list then rebuilds, as ours does)."""

        def __init__(self, potential, dtype: torch.dtype):
            super().__init__()
            self.potential = potential
            self._device, self._dtype = DEVICE, dtype
            self._compute_forces, self._compute_stress = True, False
            self.verlet = VerletList(potential.cutoff, SKIN)
            self.calls = self.structures = 0

        def forward(self, state, **kwargs):
            counts = torch.bincount(state.system_idx, minlength=state.n_systems)
            pbc = torch.as_tensor(state.pbc, dtype=torch.bool).reshape(-1)
            pbc = pbc.expand(3) if pbc.numel() == 1 else pbc
            batch = Batch.from_tensors(state.positions, state.atomic_numbers, state.row_vector_cell,
                                       pbc.expand(state.n_systems, 3), counts, masses=state.masses,
                                       validate=False)  # fmt: skip
            self.calls += 1
            self.structures += state.n_systems
            energy, forces = energy_forces(self.potential, batch, self.verlet(batch), create_graph=False)
            return {"energy": energy.detach(), "forces": forces.detach()}

    return GdeqTorchSimModel


def torch_sim_available() -> str | None:
    """None when torch-sim imports, else the reason it cannot be compared."""
    try:
        import torch_sim  # noqa: F401
    except Exception as error:  # noqa: BLE001 (any import failure means: no comparison, with the reason)
        return f"torch-sim does not import here ({type(error).__name__}: {error})"
    return None


def torch_sim_fire(model, starts, dtype: torch.dtype) -> dict:
    import torch_sim as ts

    wrapped = torch_sim_model_class()(model, dtype)
    state = ts.initialize_state(starts, DEVICE, dtype)
    converged = ts.runners.generate_force_convergence_fn(force_tol=FMAX, include_cell_forces=False)
    started = now()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = ts.optimize(state, wrapped, optimizer=ts.optimizers.fire, convergence_fn=converged,
                            autobatcher=False, max_steps=MAX_STEPS, steps_between_swaps=5)  # fmt: skip
    seconds = now() - started
    out = wrapped(final)
    fmax = torch.zeros(final.n_systems, dtype=dtype, device=DEVICE).scatter_reduce(
        0, final.system_idx, out["forces"].norm(dim=1), "amax"
    )
    return dict(seconds=seconds, evaluations=wrapped.structures, calls=wrapped.calls,
                converged=int((fmax < FMAX).sum()), energy=out["energy"].tolist(),
                positions=final.positions.detach())  # fmt: skip


def check_wrapper(model, starts, dtype) -> float:
    """Largest |difference| (eV or eV/Å) between the wrapper's energies/forces and ours on the starts."""
    import torch_sim as ts

    wrapped = torch_sim_model_class()(model, dtype)
    theirs = wrapped(ts.initialize_state(starts, DEVICE, dtype))
    batch = Batch.from_ase(starts, dtype=dtype, device=DEVICE)
    energy, forces = energy_forces(model, batch, Edges(*neighbor_list(batch, model.cutoff)))
    return max(float((theirs["energy"] - energy).abs().max()), float((theirs["forces"] - forces).abs().max()))


def part_fire(model, starts, dtype, repeats: int) -> dict:
    batch = Batch.from_ase(starts, dtype=dtype, device=DEVICE)
    reason = torch_sim_available()
    variants = ["gdeq, compaction off", "gdeq, compaction on"] + ([] if reason else ["torch-sim optimize (FIRE)"])

    def run(name):
        if name.startswith("torch-sim"):
            return torch_sim_fire(model, starts, dtype)
        return gdeq_fire(model, batch, compact=name.endswith("on"))

    first = {name: run(name) for name in variants}  # warm-up, and the correctness checks
    off, on = first[variants[0]], first[variants[1]]
    if off["steps"] != on["steps"]:
        raise SystemExit(f"compaction changed a trajectory: steps {off['steps']} vs {on['steps']}")
    position_error = float((off["positions"] - on["positions"]).abs().max())
    if position_error > 1e-8:
        raise SystemExit(f"compaction moved an end state by {position_error:.2e} Å")
    checks = {"compaction_position_difference_A": position_error}
    if not reason:
        checks["wrapper_max_difference"] = check_wrapper(model, starts, dtype)
        if checks["wrapper_max_difference"] > 1e-9:
            raise SystemExit(f"the torch-sim wrapper disagrees with our forces by {checks['wrapper_max_difference']}")
        ts_energy = torch.tensor(first[variants[2]]["energy"])
        difference = (ts_energy - torch.tensor(on["energy"])).abs()
        checks["torch_sim_energy_difference_eV"] = difference.tolist()
        checks["torch_sim_same_minimum"] = int((difference < 1e-3).sum())
    times = {name: [] for name in variants}
    results = {}
    for _ in range(repeats):
        for name in variants:
            results[name] = run(name)
            times[name].append(results[name]["seconds"])
    rows = {}
    for name in variants:
        seconds = statistics.median(times[name])
        rows[name] = dict(seconds=seconds, times=times[name], structures_per_s=len(starts) / seconds,
                          evaluations=results[name]["evaluations"], calls=results[name]["calls"],
                          converged=results[name]["converged"])  # fmt: skip
    return dict(rows=rows, checks=checks, torch_sim=reason or "compared", steps=on["steps"])


# ------------------------------------------------------------------------------------ part 2: training step
def training_step(model, relaxation, batch, targets) -> tuple[float, list[torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    started = now()
    result = relaxation(batch)
    loss = delta_q(result.positions, targets, result.batch).mean()
    loss.backward()
    seconds = now() - started
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return seconds, grads, dict(steps=result.steps.tolist(), converged=int(result.converged.sum()))


def part_training(model_path, starts, dtype, repeats: int) -> dict:
    batch = Batch.from_ase(starts, dtype=dtype, device=DEVICE)
    targets = torch.cat([torch.as_tensor(a.arrays["target"], dtype=dtype) for a in starts]).to(DEVICE)
    model = load_model(model_path, dtype)
    study = dict(fmax=FMAX, alpha=0.03, max_relax_steps=MAX_STEPS, newton_steps=24, on_invalid="skip")
    hybrid = make_relaxation(model, RelaxConfig(mode="hybrid", window=10, **study))
    hybrid_off = make_relaxation(model, RelaxConfig(mode="hybrid", window=10, **study))
    # Off everywhere: FIRE, the Newton polish (both FIREOptions.compact) and the backward CG (ImplicitSolveOptions).
    hybrid_off.fire_options = dataclasses.replace(hybrid_off.fire_options, compact=False)
    hybrid_off.options = dataclasses.replace(hybrid_off.options, compact=False)
    bptt = make_relaxation(model, RelaxConfig(mode="bptt", bptt_steps=100, **study))
    variants = {"hybrid K=10, compaction off": hybrid_off, "hybrid K=10, compaction on": hybrid,
                "BPTT T=100 (compaction n/a)": bptt}  # fmt: skip
    first = {name: training_step(model, relax, batch, targets) for name, relax in variants.items()}
    g_off, g_on = first["hybrid K=10, compaction off"][1], first["hybrid K=10, compaction on"][1]
    norm = torch.sqrt(sum((g * g).sum() for g in g_off))
    gradient_difference = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g_off, g_on, strict=True))) / norm)
    if gradient_difference > 1e-6:
        raise SystemExit(f"compaction changed the hybrid gradient by {gradient_difference:.2e} (relative)")
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, relax in variants.items():
            times[name].append(training_step(model, relax, batch, targets)[0])
    rows = {
        name: dict(seconds=statistics.median(t), times=t, steps=first[name][2]["steps"]) for name, t in times.items()
    }
    return dict(rows=rows, checks={"hybrid_gradient_relative_difference": gradient_difference})


# ------------------------------------------------------------------------------------- part 3: two cores
_WORKER: dict = {}


def _worker_setup(model_path: str, dtype_name: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    _WORKER["model"] = load_model(model_path, getattr(torch, dtype_name))


def _worker_relax(starts) -> float:
    model = _WORKER["model"]
    batch = Batch.from_ase(starts, dtype=next(model.parameters()).dtype)
    return gdeq_fire(model, batch, compact=True)["seconds"]


def part_cores(model_path, starts, dtype, repeats: int) -> dict:
    if DEVICE.type != "cpu":
        return dict(rows={}, skipped="a CPU question (processes and threads of one machine): not run on a GPU")
    model = load_model(model_path, dtype)
    batch = Batch.from_ase(starts, dtype=dtype)
    halves = [starts[0::2], starts[1::2]]
    rows = {}
    with ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=_worker_setup,
                             initargs=(model_path, str(dtype).removeprefix("torch."))) as pool:  # fmt: skip
        list(pool.map(_worker_relax, halves))  # warm-up: imports, kernels, allocator

        def two_processes():
            started = time.perf_counter()
            list(pool.map(_worker_relax, halves))
            return time.perf_counter() - started

        def threads(n):
            def run():
                torch.set_num_threads(n)
                try:
                    return gdeq_fire(model, batch, compact=True)["seconds"]
                finally:
                    torch.set_num_threads(1)

            return run

        variants = {"1 process × 1 thread": threads(1), "1 process × 2 threads": threads(2),
                    "2 processes × 1 thread": two_processes}  # fmt: skip
        for run in variants.values():
            run()  # warm-up (the pool is warm already; a second one costs nothing)
        times = {name: [] for name in variants}
        for _ in range(repeats):
            for name, run in variants.items():
                times[name].append(run())
    for name, t in times.items():
        seconds = statistics.median(t)
        rows[name] = dict(seconds=seconds, times=t, structures_per_s=len(starts) / seconds)
    return dict(rows=rows)


# ------------------------------------------------------------------------------------------------ report
def render(results: dict, info: dict, args) -> tuple[str, str]:
    """(the full markdown, the README's table)."""
    fire_rows = results["fire"]["rows"]
    base = fire_rows["gdeq, compaction off"]["seconds"]
    on = fire_rows["gdeq, compaction on"]["seconds"]
    table = []
    for name, row in fire_rows.items():
        table.append([f"batched FIRE, {len(results['fire']['steps'])} cells: {name}", f"{row['seconds']:.2f} s",
                      f"{row['structures_per_s']:.2f} structures/s", row["evaluations"],
                      f"{base / row['seconds']:.2f}x"])  # fmt: skip
    train = results["training"]["rows"]
    off = train["hybrid K=10, compaction off"]["seconds"]
    for name, row in train.items():
        ratio = f"{off / row['seconds']:.2f}x" if name.startswith("hybrid") else "—"
        table.append([f"training step, {args.train_starts} starts: {name}", f"{row['seconds']:.2f} s", "—", "—", ratio])
    cores = results["cores"]["rows"]
    single = cores["1 process × 1 thread"]["seconds"] if cores else None
    for name, row in cores.items():
        rate, ratio = f"{row['structures_per_s']:.2f} structures/s", f"{single / row['seconds']:.2f}x"
        table.append([f"batched FIRE (compaction on): {name}", f"{row['seconds']:.2f} s", rate, "—", ratio])
    header = ["what", "wall time (median)", "throughput", "structure evaluations", "speed-up vs its reference"]
    steps = results["fire"]["steps"]
    checks = results["fire"]["checks"]
    ts_line = ""
    if "torch_sim_same_minimum" in checks:
        ts = fire_rows["torch-sim optimize (FIRE)"]["seconds"]
        ts_line = (
            f" torch-sim ({results['fire']['torch_sim']}, the same model through a wrapper whose energies and forces "
            f"equal ours to {checks['wrapper_max_difference']:.1e}) ended in the same minimum (|ΔE| < 1 meV) on "
            f"{checks['torch_sim_same_minimum']}/{len(steps)} structures; our compacted FIRE's throughput is "
            f"{ts / on:.2f}x torch-sim's."
        )
    else:
        ts_line = f" torch-sim: not compared ({results['fire']['torch_sim']})."
    summary = (
        f"{machine_label(info)}, {info['date']}; {args.dtype}; the basin study's base MLIP on its silicon-defect "
        f"starts (64-site cells); medians of {args.repeats} alternating runs after a warm-up. FIRE to fmax "
        f"{FMAX} eV/Å: steps per structure {min(steps)}–{max(steps)} (median {statistics.median(steps):.0f}); "
        f"compaction changes no end state (max {checks['compaction_position_difference_A']:.1e} Å) and the hybrid "
        f"gradient by {results['training']['checks']['hybrid_gradient_relative_difference']:.1e} (relative). "
        f"Speed-ups: FIRE and the hybrid step against compaction off (the code before issue #15), the two-core rows "
        f"against 1 process × 1 thread.{ts_line}"
    )
    if results["cores"].get("skipped"):
        summary += f" Two cores: {results['cores']['skipped']}."
    readme = summary + "\n\n" + markdown_table(header, table)
    return (
        "# Relaxation throughput (`benchmarks/throughput.py`)\n\n"
        + readme
        + "\n\nRaw times per run are in the JSON beside this file.\n",
        readme,
    )


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("fire", "batched FIRE (s)"), ("training", "training step (s)"), ("cores", "two cores: FIRE (s)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (key, title) in zip(axes, parts, strict=True):
        rows = results[key]["rows"]
        names = list(rows)
        ax.barh(range(len(names)), [rows[n]["seconds"] for n in names], color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("wall time, median (s)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="4 starts of the quick study's data set, 1 repeat: the plumbing only"
    )
    parser.add_argument("--starts", type=int, default=16, help="structures in the batched FIRE (default 16)")
    parser.add_argument("--train-starts", type=int, default=8, help="starts per training step (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: part 3 (two cores) runs on a CPU only")
    parser.add_argument("--model", default=str(BASE))
    parser.add_argument("--output", default=str(OUTPUT / "throughput"), help="path stem of the .json/.md/.png")
    parser.add_argument("--readme", action="store_true", help="replace the README's bench:throughput table")
    args = parser.parse_args()
    if args.quick:
        args.starts, args.train_starts, args.repeats = 4, 2, 1
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dtype = getattr(torch, args.dtype)
    global DEVICE, PROTOCOL
    DEVICE, PROTOCOL = torch.device(args.device), "quick" if args.quick else "full"
    info = machine(args.device)
    model = load_model(args.model, dtype)
    started = time.perf_counter()
    results = {"fire": part_fire(model, load_starts("val", args.starts), dtype, args.repeats)}
    print(f"[{time.perf_counter() - started:5.0f} s] FIRE done", flush=True)
    results["training"] = part_training(args.model, load_starts("train", args.train_starts), dtype, args.repeats)
    print(f"[{time.perf_counter() - started:5.0f} s] training steps done", flush=True)
    results["cores"] = part_cores(args.model, load_starts("val", args.starts), dtype, args.repeats)
    print(f"[{time.perf_counter() - started:5.0f} s] two cores done", flush=True)
    markdown, readme = render(results, info, args)
    output = Path(args.output)
    write_json(output.with_suffix(".json"), {"machine": info, "arguments": vars(args), "results": results,
                                             "wall_time_s": time.perf_counter() - started})  # fmt: skip
    output.with_suffix(".md").write_text(markdown)
    plot(results, output.with_suffix(".png"), f"{machine_label(info)}, {info['date']}, {args.dtype}")
    if args.readme:
        update_readme_section(README, "throughput", readme)
    print(markdown)


if __name__ == "__main__":
    main()
