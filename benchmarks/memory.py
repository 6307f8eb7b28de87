"""Peak memory and time of one training step through a relaxation: BPTT vs checkpointed BPTT vs implicit vs hybrid.

    python benchmarks/memory.py              # --quick on a CPU, the full sweep on a GPU
    python benchmarks/memory.py --full --device cuda --update-readme

One training step = relax a batch of silicon defect cells with the mode, ΔQ loss against the teacher-relaxed
targets, backward to the potential's parameters. For every relaxation length T (a fixed step count, so BPTT's
length is controlled; implicit and hybrid run T steps with fmax = 0) and the converged case, it records:

* peak memory above the state before the step (GPU: ``torch.cuda.max_memory_allocated`` after a warm-up step and
  a reset; CPU: the peak resident set size (VmHWM, reset just before the step) of a fresh subprocess per
  configuration, minus its resident size before the step, after a short warm-up of the same mode on one 8-atom
  cell that pages in code and libraries);
* wall time of the forward (relaxation) and backward (gradient) parts;
* the cosine between the mode's gradient dL/dθ and naive BPTT's at the same T.

A "force-matching step" row (energy + forces of the same batch, MSE on forces, backward) gives the physical floor.
Writes benchmarks/results/memory.{json,png,md}; ``--update-readme`` copies the table into README.md.
The potential is a base MLIP fitted to Stillinger-Weber forces on bulk cells (fitted once, cached).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OUTPUT,
    README,
    RESULTS,
    fit_and_save,
    machine,
    machine_label,
    markdown_table,
    update_readme_section,
    warm_up_cell,
    write_json,
)

import gdeq_ext  # noqa: E402
from gdeq_ext import Batch, delta_q  # noqa: E402
from gdeq_ext.potentials import MLIP, StillingerWeber, recomputed_forces  # noqa: E402
from gdeq_ext.profiling import current_rss_bytes, peak_rss_bytes, reset_peak_rss  # noqa: E402
from gdeq_ext.relax import PolishOptions, RelaxOptions, build_relaxation  # noqa: E402

CACHE = RESULTS / "cache"
# Wall time of one 64-site configuration (fresh process: import, warm-up, measured step), AMD EPYC, 2 cores,
# 2026-12-03 (CI log of the quick sweep: 6.2-7.0 s). For the duration printed up front.
SECONDS_PER_CONFIGURATION = 6.5


@dataclass(frozen=True)
class Config:
    mode: str  # bptt, bptt-force, bptt-checkpoint, implicit, hybrid, force-step
    backend: str  # reference | fused: the MLIP's edge kernels
    steps: int  # T (0 for the converged case of implicit/hybrid, unused by force-step)
    window: int = 0  # K for hybrid

    @property
    def label(self) -> str:
        name = {
            "bptt": "BPTT",
            "bptt-force": "BPTT force Function",
            "bptt-checkpoint": "BPTT checkpointed",
            "implicit": "implicit",
            "hybrid": f"hybrid K={self.window}",
            "force-step": "force-matching step",
        }[self.mode]
        return f"{name} ({self.backend})"


# ----------------------------------------------------------------------------------------------- setup
def silicon_defect_cells(n_structures: int, repeat: int, seed: int = 0) -> list:
    """Vacancy and tetrahedral-interstitial cells of diamond Si (SW lattice constant), rattled 0.1 Å."""
    from ase import Atoms

    from gdeq_ext.data.structures import diamond_silicon

    cells = []
    rng = np.random.default_rng(seed)
    for index in range(n_structures):
        atoms = diamond_silicon((repeat, repeat, repeat))
        if index % 2 == 0:
            del atoms[int(rng.integers(len(atoms)))]
        else:
            a = atoms.cell.lengths()[0] / repeat
            atoms += Atoms("Si", positions=[[0.5 * a, 0.5 * a, 0.5 * a]])
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        cells.append(atoms)
    return cells


def base_model(path: Path, dtype: torch.dtype, quick: bool) -> Path:
    """A base MLIP fitted to SW forces on bulk cells; cached at ``path`` (fitting takes a minute or two)."""
    if path.exists():
        return path
    from gdeq_ext.train import silicon_dataset

    print(f"fitting a base MLIP to Stillinger-Weber forces (cached at {path}) ...", flush=True)
    data = silicon_dataset(24 if quick else 96, 8 if quick else 32, repeat=(2, 2, 2), potential=StillingerWeber())
    return fit_and_save(MLIP().to(dtype), data, path, epochs=60 if quick else 300, max_time_s=90 if quick else 900)


def prepare_setup(args, repeat: int) -> Path:
    """Model, starts and teacher-relaxed targets, written once for all worker processes."""
    dtype = getattr(torch, args.dtype)
    model_path = base_model(Path(args.model) if args.model else CACHE / f"base_mlip_{args.dtype}.pt", dtype, args.quick)
    starts = silicon_defect_cells(args.structures, repeat)
    batch = Batch.from_ase(starts, dtype=torch.float64)
    teacher = StillingerWeber()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        targets = gdeq_ext.relax.fire(teacher, batch, fmax=1e-3, max_steps=3000, warn=False).positions.detach()
    setup = {"model": str(model_path), "atoms": starts, "targets": targets, "dtype": args.dtype}
    path = CACHE / f"setup_{args.dtype}_{args.structures}x{repeat}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(setup, path)
    return path


def load_model(path: str, backend: str, dtype: torch.dtype, device: str):
    model = MLIP.load(path).to(dtype=dtype, device=device)
    if backend == "fused":
        if not hasattr(model, "backend") or not gdeq_ext._extension.compiled_op("edge_moments", device):
            return None
        model.backend = "fused"
    elif hasattr(model, "backend"):
        model.backend = "reference"
    return model


# ----------------------------------------------------------------------------------------------- one step
def relaxer(config: Config, model):
    # The Newton polish and curvature check (#13) are off here for now: on the generic path they quadruple the
    # forward time (docs/method.md, "What the polish costs") and the committed results were measured without them.
    options = RelaxOptions(warn=False, polish=PolishOptions(newton_steps=0, curvature_steps=0))
    if config.mode in ("bptt", "bptt-force", "bptt-checkpoint"):
        return build_relaxation(
            model,
            options,
            mode="bptt",
            bptt_steps=config.steps,
            fmax=0.0,
            checkpoint=config.mode == "bptt-checkpoint",
            force_fn=recomputed_forces if config.mode == "bptt-force" else None,
        )
    fmax, max_steps = (0.01, 3000) if config.steps == 0 else (0.0, config.steps)
    if config.mode == "implicit":
        return build_relaxation(model, options, mode="implicit", fmax=fmax, max_steps=max_steps)
    if config.mode == "hybrid":
        return build_relaxation(
            model,
            options,
            mode="hybrid",
            window=config.window,
            fmax=fmax,
            max_steps=max_steps - config.window if config.steps else max_steps,
        )
    raise ValueError(config.mode)


def training_step(config: Config, model, batch: Batch, targets: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    if config.mode == "force-step":
        energy, forces = gdeq_ext.potentials.energy_forces(model, batch, create_graph=True)
        loss = (forces - targets).pow(2).mean()
        steps = 0
    else:
        result = relaxer(config, model)(batch)
        loss = delta_q(result.positions, targets, batch).sum()
        steps = int(result.steps.max())
    synchronize(batch.device)
    middle = time.perf_counter()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    synchronize(batch.device)
    end = time.perf_counter()
    flat = torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )
    return {"loss": float(loss), "forward_s": middle - start, "backward_s": end - middle, "steps": steps}, flat


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_config(config: Config) -> Config:
    steps = 0 if config.mode == "force-step" else min(config.steps or 5, 5)
    return replace(config, steps=steps, window=min(config.window, 2))


def warm_up_batch(config: Config, dtype: torch.dtype) -> tuple[Batch, torch.Tensor]:
    batch = Batch.from_ase([warm_up_cell()], dtype=dtype)
    targets = torch.zeros_like(batch.positions) if config.mode == "force-step" else batch.positions.clone()
    return batch, targets


def run_worker(config: Config, setup_path: str, device: str, grad_path: str | None) -> dict:
    """One configuration in this process: returns the measurements (and saves the gradient)."""
    setup = torch.load(setup_path, weights_only=False)
    dtype = getattr(torch, setup["dtype"])
    model = load_model(setup["model"], config.backend, dtype, device)
    if model is None:
        return {"skipped": "no compiled fused kernel for this device"}
    batch = Batch.from_ase(setup["atoms"], dtype=dtype, device=device)
    targets = setup["targets"].to(dtype=dtype, device=device)
    if config.mode == "force-step":
        _, targets = gdeq_ext.potentials.energy_forces(StillingerWeber().to(dtype), batch.to("cpu"))
        targets = targets.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device.startswith("cuda"):
            training_step(config, model, batch, targets)  # warm-up: kernels, allocator
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            measured, grad = training_step(config, model, batch, targets)
            measured["peak_bytes"] = torch.cuda.max_memory_allocated() - baseline
        else:
            # Warm up on one 8-atom cell with a short run of the same mode: the first step of a process pages in
            # code and libraries (~40-90 MiB of resident memory on this path) that belong to no training step. The
            # warm-up is tiny on purpose: a same-size warm-up would leave its freed heap resident, and the step
            # measured after it would reuse that heap and look almost free.
            warm_batch, warm_targets = warm_up_batch(config, dtype)
            training_step(warm_up_config(config), model, warm_batch, warm_targets)
            gc.collect()
            reset_peak_rss()
            baseline = current_rss_bytes()
            measured, grad = training_step(config, model, batch, targets)
            measured["peak_bytes"] = max(peak_rss_bytes() - baseline, 0)
    if grad_path:
        torch.save(grad.detach().cpu().double(), grad_path)
    measured["n_atoms"] = batch.n_atoms
    return measured


def run_in_subprocess(config: Config, setup_path: Path, device: str, grad_path: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(asdict(config)),
        "--setup",
        str(setup_path),
        "--device",
        device,
        "--grad",
        str(grad_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- sweep
def configurations(args) -> list[Config]:
    backends = ["reference", "fused"]
    configs = [Config("force-step", b, 0) for b in backends]
    lengths = [*args.lengths, 0]  # 0: the converged case (implicit and hybrid only)
    for steps in lengths:
        for backend in backends:
            if steps:
                configs.append(Config("bptt", backend, steps))
                configs.append(Config("bptt-force", backend, steps))
                configs.append(Config("bptt-checkpoint", backend, steps))
            configs.append(Config("implicit", backend, steps))
            configs += [Config("hybrid", backend, steps, k) for k in args.windows if not steps or k < steps]
    return configs


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def summarize(records: list[dict]) -> str:
    relaxations = [r for r in records if r["mode"] != "force-step"]
    lengths = sorted({r["steps_T"] for r in relaxations}, key=lambda t: (t == 0, t))
    header = ["mode"] + [f"T={t}" if t else "converged" for t in lengths]
    header += ["fwd+bwd time (largest T)", "cos(∇θ, BPTT ∇θ)"]
    rows = []
    for label in dict.fromkeys(r["label"] for r in relaxations):
        mine = [r for r in relaxations if r["label"] == label]
        if all("peak_bytes" not in r for r in mine):
            continue  # not measured at all (the reasons are listed under the table)
        cells = [label]
        for t in lengths:
            hit = [r for r in mine if r["steps_T"] == t and "peak_bytes" in r]
            cells.append(format_bytes(hit[0]["peak_bytes"]) if hit else "—")
        timed = [r for r in mine if "forward_s" in r]
        last = max(timed, key=lambda r: (r["steps_T"] != 0, r["steps_T"])) if timed else None
        cells.append(f"{last['forward_s'] + last['backward_s']:.2f} s" if last else "—")
        cosines = [r["cosine_vs_bptt"] for r in mine if r.get("cosine_vs_bptt") is not None]
        cells.append(f"{min(cosines):.3f} to {max(cosines):.3f}" if cosines else "—")
        rows.append(cells)
    floor = [
        f"{r['backend']}: {format_bytes(r['peak_bytes'])}"
        for r in records
        if r["mode"] == "force-step" and "peak_bytes" in r
    ]
    text = markdown_table(header, rows)
    if floor:
        text += "\n\nOne force-matching training step on the same batch (the floor): " + ", ".join(floor) + "."
    return text


def goals(records: list[dict], dtype: str) -> list[str]:
    """The issue's four memory goals, evaluated on this run's numbers (each line says which rows it compares and
    whether the goal is met)."""

    def peak(mode: str, backend: str, steps: int, window: int = 0):
        for r in records:
            if (r["mode"], r["backend"], r["steps_T"], r["window"]) == (mode, backend, steps, window):
                return r.get("peak_bytes")
        return None

    def verdict(ok: bool) -> str:
        return " — met" if ok else " — **missed**"

    lengths = sorted({r["steps_T"] for r in records if r["mode"] == "bptt"})
    windows = sorted({r["window"] for r in records if r["mode"] == "hybrid"})
    if not lengths or not windows:
        return []
    t = 200 if 200 in lengths else lengths[-1]
    k = 20 if 20 in windows else max(w for w in windows if w < t)
    lines = []
    naive, hybrid = peak("bptt", "reference", t), peak("hybrid", "fused", t, k)
    if naive and hybrid:
        ratio = naive / hybrid
        lines.append(
            f"hybrid K={k} (fused) at T={t}: {ratio:.0f}x less than naive BPTT (goal >= 10x){verdict(ratio >= 10)}"
        )
    longer = [x for x in lengths if x >= 100] or lengths
    for mode, window in (("implicit", 0), ("hybrid", k)):
        values = [peak(mode, "fused", x, window) for x in longer]
        if len(longer) > 1 and all(values):
            spread = max(values) / min(values) - 1
            lines.append(
                f"{mode}{f' K={window}' if window else ''} (fused), T={longer[0]} to {longer[-1]}: "
                f"peak varies by {100 * spread:.1f}% (goal within 5%){verdict(spread <= 0.05)}"
            )
    fused = peak("bptt-force", "fused", lengths[-1])
    naive_long = peak("bptt", "reference", lengths[-1])
    if fused and naive_long:
        lines.append(
            f"BPTT with the fused force Function at T={lengths[-1]}: {naive_long / fused:.0f}x below naive BPTT "
            f"(goal >= 5x){verdict(naive_long / fused >= 5)}"
        )
    floor = peak("force-step", "fused", 0)
    n_atoms = next((r["n_atoms"] for r in records if "n_atoms" in r), None)
    if floor and hybrid and n_atoms:
        states = k * n_atoms * 3 * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        ratio = hybrid / (floor + states)
        lines.append(
            f"hybrid K={k} (fused) at T={t}: {ratio:.1f}x one force-matching step plus the K window states "
            f"({format_bytes(floor)} + {format_bytes(states)}; goal <= 1.5x){verdict(ratio <= 1.5)}"
        )
    return lines


def format_bytes(value) -> str:
    if value is None:
        return "—"
    if value < 2**20:
        return f"{value / 2**10:.1f} KiB"
    return f"{value / 2**20:.1f} MiB"


def measured_what(device: str, dtype: str, structures: int) -> str:
    where = (
        "torch.cuda.max_memory_allocated above the step's start"
        if device.startswith("cuda")
        else "peak RSS (VmHWM) above the step's start, one fresh process per configuration"
    )
    return f"peak memory of one training step of {structures} structures, {dtype}: {where}"


def plot(records: list[dict], info: dict, path: Path, what: str = "") -> None:
    """One panel per backend (reference, fused) and cell size: peak memory against T on a plain axis, one colour
    per mode; the converged case (no T) as a dotted line in the mode's colour, the force-matching floor in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.get("sites", 0) for r in records})
    backends = [b for b in ("reference", "fused") if any(r["backend"] == b for r in records)]
    modes = list(dict.fromkeys(r["label"].rsplit(" (", 1)[0] for r in records if r["mode"] != "force-step"))
    colours = plt.get_cmap("tab10")
    lengths = sorted({r["steps_T"] for r in records if r["steps_T"]})
    fig, axes = plt.subplots(
        len(sizes), len(backends), figsize=(6.5 * len(backends) + 2.5, 4.5 * len(sizes)), squeeze=False
    )
    for row, sites in enumerate(sizes):
        for col, backend in enumerate(backends):
            ax = axes[row][col]
            mine = [r for r in records if r.get("sites", 0) == sites and r["backend"] == backend and "peak_bytes" in r]
            for mode in modes:
                colour = colours(modes.index(mode) % 10)
                runs = [r for r in mine if r["label"].rsplit(" (", 1)[0] == mode]
                points = sorted((r["steps_T"], r["peak_bytes"] / 2**20) for r in runs if r["steps_T"])
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, "-", marker="o", color=colour, label=mode)
                converged = [r["peak_bytes"] / 2**20 for r in runs if not r["steps_T"]]
                if converged:
                    ax.axhline(converged[0], color=colour, linestyle=":", label=f"{mode}, converged")
            floor = [r["peak_bytes"] / 2**20 for r in mine if r["mode"] == "force-step"]
            if floor:
                ax.axhline(floor[0], color="grey", linewidth=2, alpha=0.6, label="force-matching step (floor)")
            ax.set_yscale("log")
            ax.set_xticks(lengths)
            ax.set_xlabel("relaxation length T (steps)")
            ax.set_ylabel("peak memory (MiB)")
            ax.set_title(f"{backend} kernels, {sites}±1-site cells", fontsize=9)
            ax.grid(alpha=0.3)
            if col == len(backends) - 1:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{what}\n{machine_label(info)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_size(args, repeat: int, info: dict) -> tuple[list[dict], str]:
    """Every configuration on cells of 8·repeat³ ± 1 sites: the records and their markdown section."""
    setup_path = prepare_setup(args, repeat)
    from tqdm.auto import tqdm

    records = []
    grads = {}
    sites = 8 * repeat**3
    for config in tqdm(configurations(args), desc=f"configurations, {sites} sites"):
        grad_path = CACHE / f"grad_{config.mode}_{config.backend}_{config.steps}_{config.window}_{repeat}.pt"
        grad_path.unlink(missing_ok=True)
        if args.device.startswith("cuda"):
            try:
                measured = run_worker(config, str(setup_path), args.device, str(grad_path))
            except Exception as error:  # a failing configuration is reported, not hidden
                measured = {"error": f"{type(error).__name__}: {error}"}
        else:
            measured = run_in_subprocess(config, setup_path, args.device, grad_path)
        if grad_path.exists():
            grads[config] = torch.load(grad_path)
        records.append({**asdict(config), "label": config.label, "steps_T": config.steps, "sites": sites, **measured})

    for record, config in zip(records, configurations(args), strict=True):
        reference = grads.get(Config("bptt", "reference", config.steps))
        mine = grads.get(config)
        record["cosine_vs_bptt"] = None if reference is None or mine is None else cosine(mine, reference)

    return records, size_markdown(records, args, sites, info)


def size_markdown(records: list[dict], args, sites: int, info: dict) -> str:
    """The markdown section of one cell size: the table, the goals (met or missed) and what was not measured."""
    table = summarize(records)
    problems: dict[str, list[str]] = {}
    for r in records:
        if "error" in r or "skipped" in r:
            where = r["label"] + (f" T={r['steps_T']}" if r["mode"] != "force-step" else "")
            problems.setdefault(r.get("error") or r["skipped"], []).append(where)
    heading = (
        f"Peak memory of one training step (relax + ΔQ + backward), {args.structures} Si defect cells of "
        f"{sites}±1 atoms, {args.dtype}, measured {info['date']} on {machine_label(info)}."
    )
    markdown = f"{heading}\n\n{table}\n"
    reached = goals(records, args.dtype)
    if reached:
        markdown += "\nGoals of the benchmark, on these numbers:\n\n" + "".join(f"- {line}\n" for line in reached)
    for reason, where in problems.items():
        shown = ", ".join(where) if len(where) <= 4 else f"{len(where)} configurations ({where[0]}, ...)"
        markdown += f"\nNot measured ({reason}): {shown}.\n"
    return markdown + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="the CPU sweep: T = 50, 100, 200 and K = 5, 10, 20 (52 configurations)"
    )
    mode.add_argument("--full", action="store_true", help="the full sweep (default on a GPU)")
    parser.add_argument("--lengths", type=int, nargs="+", help="relaxation lengths T")
    parser.add_argument("--windows", type=int, nargs="+", help="hybrid windows K")
    parser.add_argument("--structures", type=int, help="structures per batch")
    parser.add_argument(
        "--repeat", type=int, nargs="+", help="diamond supercell repeats, one table each (2: 64 sites, 3: 216 sites)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--model", help="a saved MLIP (default: fit one to SW and cache it)")
    parser.add_argument(
        "--output",
        default=str(OUTPUT / "memory"),
        help="prefix of the .json/.png/.md outputs (default runs/benchmarks/memory, untracked)",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also write the committed copies benchmarks/results/memory.{json,md,png} and the README table",
    )
    parser.add_argument("--render", help="re-write the .md and .png of --output from this results JSON (no run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--grad", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_worker(Config(**json.loads(args.worker)), args.setup, args.device, args.grad)))
        return

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        stored, info, records = argparse.Namespace(**saved["arguments"]), saved["machine"], saved["records"]
        sizes = sorted({r["sites"] for r in records})
        markdown = "".join(size_markdown([r for r in records if r["sites"] == n], stored, n, info) for n in sizes)
        output = Path(args.output)
        output.with_suffix(".md").write_text(markdown)
        plot(records, info, output.with_suffix(".png"), measured_what(stored.device, stored.dtype, stored.structures))
        print(markdown)
        return

    # No flag on a CPU: a representative subset (T = 50, 200; K = 5, 20: 32 configurations, a few minutes), so the
    # main job is quick; --quick is the CPU sweep of the committed table, --full the GPU sweep.
    subset = not args.quick and not args.full and not args.device.startswith("cuda")
    args.quick = args.quick or subset
    args.lengths = args.lengths or ([50, 200] if subset else [50, 100, 200] if args.quick else [50, 100, 200, 400, 800])
    args.windows = args.windows or ([5, 20] if subset else [5, 10, 20] if args.quick else [5, 10, 20, 30])
    args.structures = args.structures or (2 if args.quick else 4)
    args.repeat = args.repeat or ([2] if args.quick else [2, 3])
    info = machine(args.device)
    print(f"gdeq_ext {gdeq_ext.__version__}: memory benchmark on {machine_label(info)}")
    print(
        f"  build: compiled={gdeq_ext.build_info()['compiled']}, lengths {args.lengths}, windows {args.windows}, "
        f"{args.structures} structures of {' and '.join(str(8 * r**3) for r in args.repeat)} sites ±1, {args.dtype}",
        flush=True,
    )

    count = len(configurations(args)) * len(args.repeat)
    kind = "subset (the default on a CPU; --quick or --full for the sweeps)" if subset else "sweep"
    print(
        f"  {kind}: {count} configurations, each in a fresh process; expect about "
        f"{count * SECONDS_PER_CONFIGURATION / 60:.0f} min on 2 CPU cores (~{SECONDS_PER_CONFIGURATION:.1f} s each, "
        f"measured), plus fitting the base MLIP once on a first run (then cached)",
        flush=True,
    )
    records, markdown = [], ""
    for repeat in args.repeat:
        size_records, section = run_size(args, repeat, info)
        records += size_records
        markdown += section
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output.with_suffix(".json"), {"machine": info, "arguments": vars(args), "records": records})
    output.with_suffix(".md").write_text(markdown)
    plot(records, info, output.with_suffix(".png"), measured_what(args.device, args.dtype, args.structures))
    print(markdown)
    print(f"wrote {output}.json, .md, .png")
    if args.update_readme:
        committed = RESULTS / "memory"
        for suffix in (".json", ".md", ".png"):
            if output.with_suffix(suffix).resolve() != committed.with_suffix(suffix).resolve():
                shutil.copyfile(output.with_suffix(suffix), committed.with_suffix(suffix))
        update_readme_section(README, "memory", markdown)
        print(f"updated {committed}.json, .md, .png and the README table")


if __name__ == "__main__":
    main()
