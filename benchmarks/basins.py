"""Basin selection on silicon point defects: fine-tune one base MLIP through relaxations with every gradient.

    python benchmarks/basins.py                       # quick CPU run (~10 min; writes runs/benchmarks/basins)
    python benchmarks/basins.py --backbone mace       # the same with a MACE base (runs/benchmarks/basins_mace)
    python benchmarks/basins.py --full --output benchmarks/results/basins_full --resume --workers 2
    python benchmarks/basins.py --report benchmarks/results/basins_full     # re-render a study's summary

The study is a set of **cells**, each written the moment it finishes and never recomputed (``--resume`` skips it):

* ``cells/base.json``: the base MLIP on the validation and test starts, and the regime diagnosis;
* ``cells/<method>/lr<lr>_seed<s>.json`` + ``.pt``: one fine-tuning run (:func:`gdeq_ext.train.fit_relaxation`,
  the library's own training loop: the same relaxation factory, loss, gradient clipping, checkpoints) and its
  evaluation. A run interrupted mid-way resumes from its last checkpoint (``runs/``, every 10 steps, untracked);
* ``memory/<method>.json``: the peak memory of one training step in a fresh process.

Protocol (the same budget for every method): ``steps`` Adam steps × ``batch_size`` starts, gradient-norm clip,
learning rate chosen from ``lrs`` on the validation starts at seed 0 (the seed-0 test result is that run's), then the
remaining seeds at the chosen rate. Seeds change the data order only (every method sees the same batches per seed),
so comparisons per (seed, start) are paired. Methods:

* BPTT: T differentiated steps of the capped map X <- X + cap(αF), loss ΔQ(X_T, target); "BPTT checkpointed" is the
  same gradient bit for bit (memory only);
* implicit: FIRE to fmax 0.01 eV/Å, Newton polish, the implicit gradient (β = 0);
* hybrid K: K differentiated steps (same map), FIRE, polish, implicit gradient + straight-through hand-off (β = 1);
* hand-off variants at ``variant_window``: guidance loss ΔQ(X_K, target) with β = 0, and with β = 1.

Evaluation: the fine-tuned model relaxes each start with FIRE (fmax 0.01); the end state is quenched by the SW
teacher and is **correct** when its largest per-atom deviation from SW's end state from the same start is below
0.1 Å (:class:`gdeq_ext.datasets.BasinJudge`; atoms paired, net translation removed); the direct criterion (end
state itself within 0.4 Å) is reported beside it. Statistics: benchmarks/basin_report.py.

Backbones (``--backbone``, docs/backbones.md): ``mlip`` (default: gdeq_ext.MLIP, the study as committed), ``mace``
(a small ScaleShiftMACE through gdeq_ext.potentials.MACEPotential: ``build_mace()``'s defaults) or ``transformer``
(gdeq_ext.Transformer at its defaults). Any other backbone is recorded in protocol.json (``"backbone"``) and writes to
its own default folder (``basins_<backbone>``, ``basins_full_<backbone>``), so cells of different backbones never
mix; resuming a folder with another backbone stops with a message. ``--base-rattled``, ``--base-thermal`` and
``--base-epochs`` shrink the base fit (96, 48, 400 by default), e.g. for a slower backbone on a CPU; they too are
recorded in protocol.json only when given, so the MLIP study's protocol.json is unchanged.

Expected run time (AMD EPYC, 1 thread per worker, float64): quick ~10 min; full ~6 to 20 min per cell, 24
learning-rate cells and 36 seed cells: about 12 h with two workers, accumulated over several sessions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import basin_report  # noqa: E402
from common import OUTPUT, RESULTS, machine, machine_label, warm_up_cell, write_json  # noqa: E402

CACHE = RESULTS / "cache"

# The announcement (silicon point defects, five seeds, 100 starts): correct basins, peak memory.
ANCHORS = {
    "base": {"correct": 43},
    "implicit": {"correct": 25},
    "BPTT": {"correct": 79, "memory_mb": 7470},
    "hybrid K=10": {"memory_mb": 1261},
    "hybrid K=20": {"correct": 85, "memory_mb": 2145},
    "hybrid K=30": {"memory_mb": 3230},
}

QUICK = dict(
    n_train=24,
    n_val=8,
    n_test=16,
    sizes=[64],
    seeds=2,
    steps=4,
    batch_size=4,
    lrs=[1e-3],
    clip=1.0,
    alpha=0.03,
    bptt_steps=100,
    windows=[5, 10, 20],
    variant_window=10,
    max_steps=3000,
    dtype="float32",
    polish=False,
    data_seed=0,
)
FULL = dict(
    QUICK,
    n_train=200,
    n_val=50,
    n_test=100,
    seeds=5,
    steps=100,
    batch_size=8,
    lrs=[1e-4, 3e-4, 1e-3],
    windows=[5, 10, 20, 30],
    variant_window=20,
    bptt_steps=200,  # the full relaxation: α = 0.03 reaches fmax 0.01 in a median ~100 steps (window_map.md)
    dtype="float64",
    polish=True,
)


BACKBONES = ("mlip", "mace", "transformer")
# Protocol keys that exist only when set (absent: the MLIP study and its base fit as committed before --backbone).
OPTIONAL_KEYS = {"backbone": "mlip", "base_rattled": 96, "base_thermal": 48, "base_epochs": 400}


def option(protocol: dict, key: str):
    return protocol.get(key, OPTIONAL_KEYS[key])


def backbone_class(protocol: dict):
    """The class whose ``load(path)`` reads this study's base.pt and fine-tuned weights."""
    from gdeq_ext.potentials import MLIP, MACEPotential, Transformer

    return {"mlip": MLIP, "mace": MACEPotential, "transformer": Transformer}[option(protocol, "backbone")]


def new_backbone(protocol: dict):
    """A fresh base potential of the study's backbone (its library defaults)."""
    from gdeq_ext.potentials import MLIP, Transformer, build_mace

    name = option(protocol, "backbone")
    return MLIP() if name == "mlip" else build_mace() if name == "mace" else Transformer()


def load_backbone(protocol: dict, path: str, device: str):
    return backbone_class(protocol).load(path).to(dtype=getattr(torch, protocol["dtype"]), device=device)


@dataclass(frozen=True)
class Method:
    name: str
    mode: str  # bptt | implicit | hybrid
    window: int = 0  # K (hybrid) or T (bptt)
    handoff: float = 1.0
    guidance: float = 0.0  # weight of ΔQ(X_K, target)
    checkpoint: bool | None = None
    memory_only: bool = False  # same gradients as another method: only its memory is measured

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def methods(protocol: dict, only: list[str] | None = None) -> list[Method]:
    t, k = protocol["bptt_steps"], protocol["variant_window"]
    out = [
        Method(f"BPTT (T={t})", "bptt", t, checkpoint=False),
        Method(f"BPTT checkpointed (T={t})", "bptt", t, checkpoint=True, memory_only=True),
        Method("implicit", "implicit", 0, 0.0),
    ]
    out += [Method(f"hybrid K={w}", "hybrid", w) for w in protocol["windows"]]
    out.append(Method(f"hybrid K={k}, guidance, β=0", "hybrid", k, 0.0, 1.0))
    out.append(Method(f"hybrid K={k}, guidance, β=1", "hybrid", k, 1.0, 1.0))
    if only:
        out = [m for m in out if any(m.name.startswith(prefix) for prefix in only)]
    return out


def training_config(method: Method, protocol: dict, lr: float, seed: int, device: str) -> dict:
    """The fit_relaxation config of one cell: everything the protocol fixes, nothing left to a default."""
    relax = {
        "mode": method.mode,
        "handoff": method.handoff,
        "guidance": method.guidance,
        "alpha": protocol["alpha"],
        "fmax": 0.01,
        "max_relax_steps": protocol["max_steps"],
        "newton_steps": 24 if protocol["polish"] else 0,
        "on_invalid": "skip",
        "checkpoint_window": method.checkpoint,
    }
    if method.mode == "hybrid":
        relax["window"] = method.window
    if method.mode == "bptt":
        relax["bptt_steps"] = method.window
    return {
        "relax": relax,
        "optim": {"optimizer": "adam", "lr": lr, "grad_clip": protocol["clip"]},
        "train": {
            "steps": protocol["steps"],
            "batch_size": protocol["batch_size"],
            "seed": seed,
            "checkpoint_every": 10,
            "keep_checkpoints": 1,
            "eval_every": 0,
            "eval_train": False,
            "progress": False,
            "plot": False,
            "teacher": "none",
            "device": "cuda" if device.startswith("cuda") else "cpu",
        },
    }


# ----------------------------------------------------------------------------------------------- data
def dataset(protocol: dict):
    from gdeq_ext.datasets.silicon_defects import silicon_defects

    return silicon_defects(
        n_train=protocol["n_train"],
        n_val=protocol["n_val"],
        n_test=protocol["n_test"],
        sizes=tuple(protocol["sizes"]),
        seed=protocol["data_seed"],
        cache=os.environ.get("GDEQ_EXT_CACHE", str(CACHE)),
    )


def pairs_of(starts, source: str):
    from gdeq_ext.data import RelaxationPair, RelaxationPairs

    pairs = []
    for k, atoms in enumerate(starts):
        reference = atoms.copy()
        reference.set_positions(atoms.arrays["target"])
        pairs.append(RelaxationPair.from_structures(atoms, reference, frame=k, source=source))
    return RelaxationPairs(pairs, source=source)


def bulk_silicon_data(rattled: int, thermal: int) -> list:
    """The base potential's force-matching data: ``rattled`` rattled (0.05-0.3 Å) and strained (±4 %) 64-atom
    diamond cells and ``thermal`` Langevin-MD snapshots at 600-2500 K, labelled by SW (call after seeding)."""
    from gdeq_ext.potentials import StillingerWeber
    from gdeq_ext.train import silicon_dataset

    return silicon_dataset(
        rattled,
        thermal,
        repeat=(2, 2, 2),
        potential=StillingerWeber(),
        amplitudes=(0.05, 0.1, 0.2, 0.3),
        strain=0.04,
        temperatures=(600.0, 1500.0, 2500.0),
    )


def base_model(protocol: dict, folder: Path, model: str | None) -> str:
    """The base MLIP: force matching on bulk diamond cells only (rattled up to 0.3 Å, ±4 % strain, Langevin MD at
    600-2500 K), labelled by SW, a fixed number of epochs with early stopping on a fixed validation split (no
    wall-time stop, so the same file comes out every time). No defect is in the data: the defect basins are not
    pinned down ("weak and narrow", docs/science.md). Written to ``folder/base.pt`` (committed with the study)."""
    if model:
        return model
    path = folder / "base.pt"
    if path.exists():
        return str(path)
    from gdeq_ext.train import fit_forces
    from gdeq_ext.train.state import seed_everything

    rattled, thermal, epochs = (option(protocol, k) for k in ("base_rattled", "base_thermal", "base_epochs"))
    name = {"mlip": "MLIP", "mace": "MACE", "transformer": "Transformer"}[option(protocol, "backbone")]
    print(f"fitting the base {name} ({rattled} rattled + {thermal} thermal bulk cells, {epochs} epochs) -> {path} ...",
          flush=True)  # fmt: skip
    seed_everything(0)
    data = bulk_silicon_data(rattled, thermal)
    base = new_backbone(protocol).to(getattr(torch, protocol["dtype"]))
    result = fit_forces(base, data, epochs=epochs, patience=60, progress=False, seed=0)
    print("  " + result.summary(), flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    base.save(path)
    return str(path)


# ----------------------------------------------------------------------------------------------- cells
def evaluate(model, starts, protocol: dict, ends=None, teacher=None) -> dict:
    """Relax ``starts`` with ``model`` (FIRE, fmax 0.01 eV/Å) and judge each end state by the teacher-quench criterion
    (``teacher`` default SW)."""
    from gdeq_ext import Batch, delta_q
    from gdeq_ext.datasets.basins import judge_basins
    from gdeq_ext.datasets.relaxations import relax_starts
    from gdeq_ext.potentials import StillingerWeber

    model = model.eval()
    if ends is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ends = relax_starts(model, starts, fmax=0.01, max_steps=protocol["max_steps"])
    teacher = teacher if teacher is not None else StillingerWeber()
    judged = judge_basins(starts, [e["positions"] for e in ends], teacher)
    batch = Batch.from_ase(starts, dtype=torch.float64)
    target = torch.as_tensor(np.concatenate([a.arrays["target"] for a in starts]), dtype=torch.float64)
    positions = torch.as_tensor(np.concatenate([e["positions"] for e in ends]), dtype=torch.float64)
    dq = delta_q(positions, target, batch)
    return {
        "n": len(starts),
        "correct": int(sum(j["correct"] for j in judged)),
        "direct_correct": int(sum(j["direct_correct"] for j in judged)),
        "dq_mean": float(dq.mean()),
        "converged": int(sum(e["converged"] for e in ends)),
        "median_steps": float(np.median([e["steps"] for e in ends])),
        "per_start_correct": [bool(j["correct"]) for j in judged],
        "per_start_direct_correct": [bool(j["direct_correct"]) for j in judged],
        "per_start_quenched": [float(j["quenched"]) for j in judged],
        "per_start_dq": [float(x) for x in dq],
    }


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write_json(tmp, payload)
    os.replace(tmp, path)


def _worker_setup() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


def run_base_cell(spec: dict) -> str:
    """Evaluate the base model on validation and test starts, and diagnose the regime."""
    from gdeq_ext.datasets.relaxations import relax_starts
    from gdeq_ext.diagnose import diagnose
    from gdeq_ext.potentials import StillingerWeber

    started = time.perf_counter()
    protocol = spec["protocol"]
    data = dataset(protocol)
    model = load_backbone(protocol, spec["base"], spec["device"])
    ends = relax_starts(model, data.test, fmax=0.01, max_steps=protocol["max_steps"])
    test = evaluate(model, data.test, protocol, ends=ends)
    val = evaluate(model, data.val, protocol) if len(data.val) else None
    diagnosis = diagnose(
        model,
        data.test,
        teacher=StillingerWeber(),
        window=protocol["variant_window"],
        max_steps=protocol["max_steps"],
        base_ends=ends,
    )
    payload = {
        "cell": "base",
        "test": test,
        "val": val,
        "diagnosis": diagnosis.to_dict(),
        "diagnosis_report": diagnosis.report(),
        "data": {"path": str(data.path), "basins": data.basin_counts(), "protocol": data.protocol},
        "cell_time_s": time.perf_counter() - started,
        "machine": machine(spec["device"]),
        "commit": _git_commit(),
    }
    _write_atomic(Path(spec["path"]), payload)
    return spec["path"]


DECIDED_STEPS = (0, 5, 10, 20, 30, 50, 100, 200)


def run_decided_cell(spec: dict) -> str:
    """Where is the basin decided? For each test start, the base's window map (the differentiated map, no graph)
    runs K steps; SW quenches X_K (FIRE to 0.01, refined to 1e-4 eV/Å); "decided by K": that quench lands where SW's
    quench of the base's relaxed end state lands (largest per-atom deviation < 0.1 Å); "teacher-correct from X_K":
    it lands on the target (SW's end from the start). A window of K steps can only move a start across a basin
    boundary if the basin is not yet decided by K."""
    from window_map import trajectory

    from gdeq_ext import Batch
    from gdeq_ext.datasets.basins import structure_distance
    from gdeq_ext.datasets.relaxations import relax_starts
    from gdeq_ext.potentials import StillingerWeber

    started = time.perf_counter()
    protocol = spec["protocol"]
    dtype = getattr(torch, protocol["dtype"])
    starts = dataset(protocol).test
    model = load_backbone(protocol, spec["base"], spec["device"])
    teacher = StillingerWeber()
    ends = relax_starts(model, starts, fmax=0.01, max_steps=protocol["max_steps"])

    def quench(positions):
        moved = []
        for atoms, x in zip(starts, positions, strict=True):
            copy = atoms.copy()
            copy.set_positions(np.asarray(x, dtype=np.float64))
            moved.append(copy)
        return [r["positions"] for r in relax_starts(teacher, moved, fmax=0.01, max_steps=3000, refine_fmax=1e-4)]

    def same(first, second) -> list[bool]:
        return [
            bool(structure_distance(a, b, s.cell.array, s.pbc, s.numbers).max_deviation < 0.1)
            for a, b, s in zip(first, second, starts, strict=True)
        ]

    final = quench([e["positions"] for e in ends])
    targets = [s.arrays["target"] for s in starts]
    batch = Batch.from_ase(starts, dtype=dtype, device=spec["device"])
    states, _, _ = trajectory(model, batch, protocol["alpha"], max(DECIDED_STEPS), DECIDED_STEPS)
    ranges = batch.ranges()
    rows = []
    for k in DECIDED_STEPS:
        at_k = quench([states[k][lo:hi] for lo, hi in ranges])
        decided, correct = same(at_k, final), same(at_k, targets)
        rows.append({"K": k, "decided": decided, "teacher_correct_from_x_k": correct})
    payload = {
        "cell": "decided",
        "alpha": protocol["alpha"],
        "base_correct": same(final, targets),
        "rows": rows,
        "cell_time_s": time.perf_counter() - started,
        "machine": machine(spec["device"]),
        "commit": _git_commit(),
    }
    _write_atomic(Path(spec["path"]), payload)
    return spec["path"]


def decided_table(cell: dict) -> str:
    n = len(cell["base_correct"])
    lines = [
        f"| K (map steps, α = {cell['alpha']:g}) | decided: SW from X_K lands where the base's relaxation does "
        "| SW from X_K lands on the target |",
        "|---|---|---|",
    ]
    for row in cell["rows"]:
        lines.append(f"| {row['K']} | {sum(row['decided'])}/{n} | {sum(row['teacher_correct_from_x_k'])}/{n} |")
    return (
        "Where the basin is decided (test starts, the base's window map; the base's own relaxation is correct on "
        f"{sum(cell['base_correct'])}/{n}):\n\n" + "\n".join(lines) + "\n"
    )


def run_training_cell(spec: dict) -> str:
    """Fine-tune the base with one method, learning rate and seed (resuming its checkpoints), then evaluate."""
    started = time.perf_counter()
    protocol, method = spec["protocol"], Method(**spec["method"])
    data = dataset(protocol)
    model, train = fine_tune(
        method, spec["base"], data.train, protocol, spec["lr"], spec["seed"], spec["device"], spec["run"]
    )
    weights = Path(spec["path"]).with_suffix(".pt")
    model.save(weights)
    payload = {
        "cell": spec["name"],
        "method": asdict(method),
        "lr": spec["lr"],
        "seed": spec["seed"],
        "train": train,
        "config": training_config(method, protocol, spec["lr"], spec["seed"], spec["device"]),
        "weights": weights.name,
    }
    payload["val"] = evaluate(model, data.val, protocol) if spec["validate"] and len(data.val) else None
    payload["test"] = evaluate(model, data.test, protocol)
    payload.update(cell_time_s=time.perf_counter() - started, machine=machine(spec["device"]), commit=_git_commit())
    _write_atomic(Path(spec["path"]), payload)
    return spec["path"]


def fine_tune(method: Method, base: str, starts, protocol: dict, lr: float, seed: int, device: str, run_dir=None):
    """Fine-tune a copy of the base MLIP through relaxations of ``starts`` (ase.Atoms with ``arrays["target"]``)
    with :func:`gdeq_ext.train.fit_relaxation`; returns (model, training record). A run that diverges is reported
    (``failed``) and its last good weights returned. ``run_dir``: checkpoints, so an interrupted run resumes."""
    from gdeq_ext.train import fit_relaxation
    from gdeq_ext.train.metrics import TrainingStepError

    model = load_backbone(protocol, base, device)
    config = training_config(method, protocol, lr, seed, device)
    failed, history, train_time = None, [], 0.0
    try:
        result = fit_relaxation(model, pairs_of(starts, "fine-tuning starts"), config=config, output_dir=run_dir)
        history, train_time = result.history, result.train_time_s
    except TrainingStepError as error:  # a diverging model: reported, its last good weights evaluated
        failed = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        history = _history_of(run_dir) if run_dir else []
        train_time = sum(row.get("step_time_s") or 0.0 for row in history)
    rows = [row for row in history if row.get("step")]
    return model, {
        "failed": failed,
        "steps_done": len(rows),
        "train_time_s": train_time,
        "losses": [row.get("loss") for row in rows],
        "grad_norms": [row.get("grad_norm") for row in rows],
        "skipped": int(sum(row.get("skipped") or 0 for row in rows)),
        "saddles": int(sum(row.get("saddles") or 0 for row in rows)),
        "inexact": int(sum(row.get("inexact") or 0 for row in rows)),
        "solve_failed": int(sum(row.get("solve_failed") or 0 for row in rows)),
        "nonfinite_gradient": int(sum(row.get("nonfinite_gradient") or 0 for row in rows)),
        "peak_memory_mib": max((row.get("peak_memory_mib") or 0.0 for row in rows), default=None),
    }


def _history_of(run_dir: str) -> list[dict]:
    import csv

    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        rows = list(csv.DictReader(handle))

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    return [{k: number(v) for k, v in row.items()} for row in rows]


# ----------------------------------------------------------------------------------------------- memory
def memory_worker(spec: dict) -> dict:
    """Peak memory of one training step of ``spec["method"]`` (run in a fresh process on a CPU)."""
    from gdeq_ext import delta_q
    from gdeq_ext.profiling import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from gdeq_ext.train.config import Config
    from gdeq_ext.train.factories import make_relaxation

    protocol, method, device = spec["protocol"], Method(**spec["method"]), spec["device"]
    dtype = getattr(torch, protocol["dtype"])
    model = load_backbone(protocol, spec["base"], device)
    config = Config.from_dict(training_config(method, protocol, protocol["lrs"][0], 0, device))
    relax = make_relaxation(model, config.relax)
    pairs = pairs_of(dataset(protocol).train[: protocol["batch_size"]], "memory")

    def step(pairs_) -> None:
        batch, reference = pairs_.batch(list(range(len(pairs_))), dtype=dtype, device=device)
        result = relax(batch)
        loss = delta_q(result.positions, reference, batch).mean()
        if method.guidance:
            loss = loss + method.guidance * delta_q(result.window[-1], reference, batch).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    warnings.simplefilter("ignore")
    if device.startswith("cuda"):
        step(pairs)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step(pairs)
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - baseline, "device": device}
    # As in memory.py: a tiny warm-up (one rattled 8-atom cell) pages in code and libraries first, so the peak
    # below is the training step's own; a same-size warm-up would leave a resident heap that the step reuses.
    tiny = warm_up_cell()
    tiny.arrays["target"] = tiny.get_positions()
    step(pairs_of([tiny], "warm-up"))
    gc.collect()
    reset_peak_rss()
    baseline = current_rss_bytes()
    step(pairs)
    return {"peak_bytes": max(peak_rss_bytes() - baseline, 0), "device": device}


def measure_memory(spec: dict) -> dict:
    if spec["device"].startswith("cuda"):
        return memory_worker(spec)
    command = [sys.executable, __file__, "--memory-worker", json.dumps(spec, default=str)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory_cell(spec: dict) -> str:
    record = measure_memory(spec)
    record.update(method=spec["method"]["name"], machine=machine(spec["device"]), commit=_git_commit())
    _write_atomic(Path(spec["path"]), record)
    return spec["path"]


# ----------------------------------------------------------------------------------------------- study
def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("+", "").replace("-0", "-")


class Study:
    """The cells of one study folder: what is done, what to run next, and the summary of what is done."""

    def __init__(self, folder: Path, protocol: dict, base: str, device: str, only=None, memory=True):
        self.folder, self.protocol, self.base, self.device = folder, protocol, base, device
        self.methods = methods(protocol, only)
        self.memory = memory

    def cell_path(self, method: Method, lr: float, seed: int) -> Path:
        return self.folder / "cells" / method.slug / f"lr{_lr_tag(lr)}_seed{seed}.json"

    def spec(self, method: Method, lr: float, seed: int, validate: bool) -> dict:
        path = self.cell_path(method, lr, seed)
        return {
            "kind": "train",
            "name": f"{method.name} lr {lr:.0e} seed {seed}",
            "protocol": self.protocol,
            "method": asdict(method),
            "lr": lr,
            "seed": seed,
            "validate": validate,
            "base": self.base,
            "device": self.device,
            "path": str(path),
            "run": str(self.folder / "runs" / method.slug / path.stem),
        }

    def read(self, path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.exists() else None

    def chosen_lr(self, method: Method) -> float | None:
        """The grid's best learning rate on validation (seed 0), or None while the grid is unfinished."""
        lrs = self.protocol["lrs"]
        if len(lrs) == 1 or not self.protocol["n_val"]:
            return lrs[0]
        cells = [self.read(self.cell_path(method, lr, 0)) for lr in lrs]
        if any(c is None for c in cells):
            return None
        key = lambda c: (c["val"]["correct"], c["train"]["failed"] is None, -c["val"]["dq_mean"])  # noqa: E731
        return max(cells, key=key)["lr"]

    def pending(self) -> list[dict]:
        """Cells that can run now (their inputs are done) and are not done yet, in a useful order: the base and
        memory first, then per method its learning-rate grid, then its seeds."""
        todo = []
        base_path = self.folder / "cells" / "base.json"
        if not base_path.exists():
            todo.append({"kind": "base", "name": "base", "protocol": self.protocol, "base": self.base,
                         "device": self.device, "path": str(base_path)})  # fmt: skip
        decided = self.folder / "cells" / "decided.json"
        if not decided.exists():
            todo.append({"kind": "decided", "name": "where the basin is decided", "protocol": self.protocol,
                         "base": self.base, "device": self.device, "path": str(decided)})  # fmt: skip
        if self.memory:
            for method in self.methods:
                path = self.folder / "memory" / f"{method.slug}.json"
                if not path.exists():
                    todo.append({"kind": "memory", "name": f"memory {method.name}", "protocol": self.protocol,
                                 "method": asdict(method), "base": self.base, "device": self.device,
                                 "path": str(path)})  # fmt: skip
        grid_search = len(self.protocol["lrs"]) > 1 and self.protocol["n_val"] > 0
        for method in self.methods:
            if method.memory_only:
                continue
            for lr in self.protocol["lrs"] if grid_search else self.protocol["lrs"][:1]:
                if not self.cell_path(method, lr, 0).exists():
                    todo.append(self.spec(method, lr, 0, validate=grid_search))
            chosen = self.chosen_lr(method)
            if chosen is None:
                continue
            for seed in range(1, self.protocol["seeds"]):
                if not self.cell_path(method, chosen, seed).exists():
                    todo.append(self.spec(method, chosen, seed, validate=False))
        return todo

    def collect(self) -> dict:
        cells = {"base": self.read(self.folder / "cells" / "base.json"), "methods": {}}
        for method in self.methods:
            record = {"grid": {}, "seeds": {}, "memory": self.read(self.folder / "memory" / f"{method.slug}.json")}
            record["memory_only"] = method.memory_only
            if not method.memory_only:
                for lr in self.protocol["lrs"]:
                    cell = self.read(self.cell_path(method, lr, 0))
                    if cell is not None:
                        record["grid"][lr] = cell
                chosen = self.chosen_lr(method)
                record["chosen_lr"] = chosen
                if chosen is not None:
                    for seed in range(self.protocol["seeds"]):
                        cell = self.read(self.cell_path(method, chosen, seed))
                        if cell is not None:
                            record["seeds"][seed] = cell
            cells["methods"][method.name] = record
        return cells

    def report(self, info: dict) -> str:
        summary = basin_report.aggregate(self.collect(), self.protocol)
        summary["anchors"] = ANCHORS
        summary["machine"] = info
        label = machine_label(info)
        text = basin_report.markdown(summary, label)
        if option(self.protocol, "backbone") != "mlip":  # the MLIP study's summary stays as it was
            summary["backbone"] = option(self.protocol, "backbone")
            text = f"Backbone: **{summary['backbone']}** (docs/backbones.md).\n\n{text}"
        base = summary.get("base") or {}
        if base.get("diagnosis"):
            text += "\n" + (self.read(self.folder / "cells" / "base.json") or {}).get("diagnosis_report", "") + "\n"
        decided = self.read(self.folder / "cells" / "decided.json")
        if decided:
            text += "\n" + decided_table(decided)
            summary["decided"] = decided
        write_json(self.folder / "summary.json", summary)
        (self.folder / "summary.md").write_text(text)
        basin_report.plot(summary, self.folder / "summary.png", f"Basin selection, silicon defects — {label}")
        return text


def lock_path(path: str | Path) -> Path:
    return Path(str(path) + ".running")


def locked(path: str | Path) -> bool:
    """Whether a live process (on this machine) is running the cell whose result goes to ``path``: several study
    processes may share a folder (``--methods`` splits, a second machine with its own folder) without running a
    cell twice. A lock left by a dead process is ignored (and replaced)."""
    lock = lock_path(path)
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_cell(spec: dict) -> str | None:
    """Run one cell under its lock; None when another live process holds it."""
    path = Path(spec["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or locked(path):
        return None
    lock_path(path).write_text(f"{os.getpid()} {spec['name']}\n")
    try:
        if spec["kind"] == "base":
            return run_base_cell(spec)
        if spec["kind"] == "memory":
            return run_memory_cell(spec)
        if spec["kind"] == "decided":
            return run_decided_cell(spec)
        return run_training_cell(spec)
    finally:
        lock_path(path).unlink(missing_ok=True)


def default_workers(device: str) -> int:
    """Cells run at once by default: one per available core on a CPU (at most 4), one on a GPU."""
    if str(device).startswith("cuda"):
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def run_study(study: Study, workers: int, max_cells: int | None, info: dict) -> int:
    """Run pending cells on ``workers`` processes until none is left (or ``max_cells`` finished); returns the
    number of cells run. The summary is re-written after every finished cell."""
    done, running = 0, {}
    started = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_setup) as pool:
        while True:
            queued = {spec["path"] for spec in running.values()}
            budget = None if max_cells is None else max_cells - done - len(running)
            for spec in study.pending():
                if len(running) >= workers or (budget is not None and budget <= 0):
                    break
                if spec["path"] in queued or locked(spec["path"]):
                    continue
                print(f"[{time.perf_counter() - started:7.0f} s] start  {spec['name']}", flush=True)
                running[pool.submit(run_cell, spec)] = spec
                budget = None if budget is None else budget - 1
            if not running:
                if any(locked(spec["path"]) for spec in study.pending()):
                    time.sleep(60)  # another process holds the remaining cells; theirs may unlock more (seeds)
                    continue
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                spec = running.pop(future)
                if future.result() is None:  # an exception in a cell stops the study (its inputs are kept)
                    print(f"[{time.perf_counter() - started:7.0f} s] skip   {spec['name']} (another process runs it)")
                    continue
                cell = study.read(Path(spec["path"])) or {}
                summary = ""
                if "test" in cell:
                    summary = f": test {cell['test']['correct']}/{cell['test']['n']} correct"
                    if cell.get("val"):
                        summary += f", val {cell['val']['correct']}/{cell['val']['n']}"
                    if cell.get("train", {}).get("failed"):
                        summary += f" (stopped: {cell['train']['failed']})"
                if "cell_time_s" in cell:
                    summary += f", {cell['cell_time_s']:.0f} s"
                print(f"[{time.perf_counter() - started:7.0f} s] done   {spec['name']}{summary}", flush=True)
                done += 1
                study.report(info)
    return done


# ----------------------------------------------------------------------------------------------- main
def _relative(folder: Path, path: str) -> str:
    """``path`` relative to the study folder when it lies inside it (a committed study moves with its clone)."""
    try:
        return str(Path(path).resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _resolve(folder: Path, path: str) -> str:
    return str(path if Path(path).is_absolute() else folder / path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small run (default on a CPU)")
    mode.add_argument("--full", action="store_true", help="the issue's protocol (default on a GPU)")
    parser.add_argument("--output", help="the study folder (default runs/benchmarks/basins[_full], untracked)")
    parser.add_argument("--resume", action="store_true", help="continue a study: skip its finished cells")
    parser.add_argument(
        "--workers",
        type=int,
        help="cells run at once, one process with one torch thread each (default: on a CPU the available cores, at "
        "most 4: two processes relax 1.95x as many structures per second as one on a 2-core machine, two threads "
        "1.5x, benchmarks/throughput.py; on a GPU 1)",
    )
    parser.add_argument("--max-cells", type=int, help="stop after this many cells")
    parser.add_argument("--report", help="re-write the summary of this study folder from its cells (no run)")
    parser.add_argument("--model", help="a saved base potential of the backbone (default: base.pt, fitted if missing)")
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="mlip",
        help="the potential fine-tuned: mlip (default), mace or transformer (docs/backbones.md)",
    )
    parser.add_argument("--base-rattled", type=int, help="protocol: rattled cells of the base fit (96)")
    parser.add_argument("--base-thermal", type=int, help="protocol: thermal cells of the base fit (48)")
    parser.add_argument("--base-epochs", type=int, help="protocol: epochs of the base fit (400)")
    parser.add_argument("--methods", nargs="+", help="only methods whose names start with these")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory cells")
    # Spelled out one by one (scripts/gpu_campaign.sh checks the flags it passes by name).
    parser.add_argument("--seeds", type=int, help="protocol: seeds (quick 2, full 5)")
    parser.add_argument("--steps", type=int, help="protocol: Adam steps per run (quick 4, full 100)")
    parser.add_argument("--batch-size", type=int, help="protocol: starts per step (quick 4, full 8)")
    parser.add_argument("--bptt-steps", type=int, help="protocol: T of BPTT (quick 100, full 200)")
    parser.add_argument("--variant-window", type=int, help="protocol: K of the hand-off variants (quick 10, full 20)")
    parser.add_argument("--max-steps", type=int, help="protocol: FIRE step limit (3000)")
    parser.add_argument("--n-train", type=int, help="protocol: training starts (quick 24, full 200)")
    parser.add_argument("--n-val", type=int, help="protocol: validation starts (quick 8, full 50)")
    parser.add_argument("--n-test", type=int, help="protocol: test starts (quick 16, full 100)")
    parser.add_argument("--data-seed", type=int, help="protocol: the data set's seed (0)")
    parser.add_argument("--alpha", type=float, help="protocol: Å²/eV, step of the differentiated map (0.03)")
    parser.add_argument("--clip", type=float, help="protocol: gradient-norm clip (1.0)")
    parser.add_argument("--lrs", type=float, nargs="+", help="protocol: learning-rate grid")
    parser.add_argument("--windows", type=int, nargs="+", help="protocol: hybrid K")
    parser.add_argument("--sizes", type=int, nargs="+", help="protocol: cell sizes (sites)")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="protocol: dtype")
    parser.add_argument("--polish", action=argparse.BooleanOptionalAction, help="protocol: Newton polish")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1) if not args.device.startswith("cuda") else None
    if args.memory_worker:
        warnings.simplefilter("ignore")
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return

    if args.report:
        folder = Path(args.report)
        saved = json.loads((folder / "protocol.json").read_text())
        base = _resolve(folder, saved["base"])
        study = Study(folder, saved["protocol"], base, saved["device"], only=saved.get("methods"))
        print(study.report(saved["machine"]))
        return

    full = args.full or (not args.quick and args.device.startswith("cuda"))
    protocol = dict(FULL if full else QUICK)
    for key in list(protocol):
        value = getattr(args, key, None)
        if value is not None:
            protocol[key] = value
    if args.backbone != "mlip":
        protocol["backbone"] = args.backbone
    for key in ("base_rattled", "base_thermal", "base_epochs"):
        if getattr(args, key) is not None:
            protocol[key] = getattr(args, key)
    suffix = "" if args.backbone == "mlip" else f"_{args.backbone}"
    folder = Path(args.output or OUTPUT / (("basins_full" if full else "basins") + suffix))
    info = machine(args.device)
    print(f"basin-selection study in {folder} on {machine_label(info)}", flush=True)
    stored = folder / "protocol.json"
    if stored.exists():
        saved = json.loads(stored.read_text())
        if not args.resume:
            raise SystemExit(f"{folder} already holds a study: pass --resume to continue it, or another --output")
        changed = {k: (saved["protocol"].get(k), v) for k, v in protocol.items() if saved["protocol"].get(k) != v}
        # The optional keys in both directions: an MLIP run must not resume a MACE study either.
        changed.update(
            {k: (saved["protocol"].get(k), protocol.get(k)) for k in OPTIONAL_KEYS
             if saved["protocol"].get(k) != protocol.get(k)}
        )  # fmt: skip
        if changed:
            raise SystemExit(f"{folder}: the protocol differs from the study's ({changed}); use another --output")
        base = _resolve(folder, saved["base"])
    else:
        base = base_model(protocol, folder, args.model)
        write_json(stored, {"protocol": protocol, "base": _relative(folder, base), "device": args.device,
                            "machine": info, "methods": args.methods})  # fmt: skip
    study = Study(folder, protocol, base, args.device, only=args.methods, memory=not args.no_memory)
    workers = args.workers or default_workers(args.device)
    print(f"{workers} worker process{'es' if workers > 1 else ''}, 1 torch thread each", flush=True)
    n = run_study(study, workers, args.max_cells, info)
    print(study.report(info))
    left = len(study.pending())
    print(f"ran {n} cells; {left} can run next" + (" (the study is complete)" if not left else ""))


if __name__ == "__main__":
    main()
