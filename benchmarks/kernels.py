"""Fused edge kernels vs the plain-PyTorch reference: time and memory of the MLIP's force-field operations.

    python benchmarks/kernels.py --quick                 # CPU: 64, 216, 512 atoms
    python benchmarks/kernels.py                         # CPU: 64 ... 4096 atoms
    python benchmarks/kernels.py --device cuda           # GPU: 64 ... 32768 atoms (--quick: 64 ... 4096)

System: one diamond-silicon supercell (a = 5.431 Å, n³ cubic cells, rattled 0.05 Å), the default MLIP
(F 32, C 16, K 8, 2 layers, r_c 4 Å), float32 unless --dtype float64, neighbor list built once outside the timing.
Backends: ``reference`` (MLIP(backend="reference"): the padded plain-PyTorch edge op, autograd derivatives) and
``fused`` (the compiled edge_moments kernels with closed-form first and second derivatives).

Operations:
  energy+forces   E and F = -dE/dX, no graph kept                       (a relaxation step)
  H·v             Hessian-vector product by double backward              (the implicit solve)
  (dF/dθ)ᵀw       forces with their graph, then the VJP to the parameters (the implicit gradient)
  train step      energy + forces with graph, force-matching MSE, backward to the parameters

Time: warm-up, then the median of repeated calls, the two backends alternating call by call (CUDA: synchronized).
Memory:
  GPU  torch.cuda.max_memory_allocated during the operation minus what was allocated before it (peak);
  CPU  bytes of every tensor autograd saves during the operation (unique storages, counted with
       torch.autograd.graph.saved_tensors_hooks): the memory of the graph, an estimate and not a peak RSS
       (per-operation RSS is noise on a shared machine; benchmarks/memory.py measures subprocess peak RSS).
Bytes per edge = that memory / the number of edges within the cutoff; "per-edge saved" counts only the saved tensors
with one row per edge. Before timing, the fused backend is checked
against the reference (energy, forces, H·v) at every size.

Writes benchmarks/results/kernels.{json,png,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from ase.build import bulk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUT, machine, machine_label, markdown_table, write_json  # noqa: E402

from gdeq_ext import Batch  # noqa: E402
from gdeq_ext.neighbors import neighbor_list  # noqa: E402
from gdeq_ext.potentials import MLIP, Edges, hessian_vector_product  # noqa: E402
from gdeq_ext.potentials.edge_moments_op import has_fused_kernels  # noqa: E402

OPERATIONS = ("energy+forces", "H·v", "(dF/dθ)ᵀw", "train step")
BACKENDS = ("reference", "fused")
SIZES = {  # n for n³ cubic 8-atom cells
    ("cpu", True): (2, 3, 4),
    ("cpu", False): (2, 3, 4, 5, 6, 8),
    ("cuda", True): (2, 4, 8),
    ("cuda", False): (2, 3, 4, 6, 8, 10, 12, 16),
}


@dataclass
class Case:
    model: MLIP
    batch: Batch
    edges: Edges
    vector: torch.Tensor  # v of H·v and the force targets of the train step, (n_atoms, 3)
    weights: torch.Tensor  # w of (dF/dθ)ᵀw, a cotangent of the forces, (n_atoms, 3)
    n_edges: int


def make_case(n: int, dtype: torch.dtype, device: str) -> Case:
    atoms = bulk("Si", "diamond", a=5.431, cubic=True) * (n, n, n)
    atoms.rattle(0.05, seed=n)
    batch = Batch.from_ase([atoms], dtype=dtype, device=device)
    model = MLIP(seed=0).to(device=device, dtype=dtype)
    edges = Edges(*neighbor_list(batch, model.cutoff))
    gen = torch.Generator().manual_seed(n)
    vector = torch.randn(batch.n_atoms, 3, generator=gen, dtype=dtype).to(device)
    weights = torch.randn(batch.n_atoms, 3, generator=gen, dtype=dtype).to(device)
    return Case(model, batch, edges, vector, weights, int(edges.edge_index.shape[1]))


def run_operation(name: str, case: Case):
    model, batch, edges = case.model, case.batch, case.edges
    if name == "energy+forces":
        return model.energy_forces(batch, edges)
    if name == "H·v":
        return hessian_vector_product(model, batch, case.vector, edges)
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "(dF/dθ)ᵀw":
        _, forces = model.energy_forces(batch, edges, create_graph=True)
        return torch.autograd.grad(forces, params, grad_outputs=case.weights, allow_unused=True)
    if name == "train step":
        model.zero_grad(set_to_none=True)
        _, forces = model.energy_forces(batch, edges, create_graph=True)
        loss = (forces - case.vector).pow(2).mean()
        loss.backward()
        return loss.detach()
    raise ValueError(name)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_operation(name: str, case: Case, device: str, budget_s: float) -> tuple[dict, int]:
    """Median wall time (s) per backend, and the number of timed calls of each.

    The backends alternate call by call (after a warm-up of each), so that drifting load on a shared machine
    affects both alike and their ratio stays meaningful.
    """

    def call(backend: str) -> float:
        case.model.backend = backend
        synchronize(device)
        start = time.perf_counter()
        run_operation(name, case)
        synchronize(device)
        return time.perf_counter() - start

    for backend in BACKENDS:
        for _ in range(2):
            call(backend)
    first = sum(call(backend) for backend in BACKENDS)
    repeats = max(3, min(25, int(budget_s / max(first, 1e-6))))
    samples = {backend: [] for backend in BACKENDS}
    for _ in range(repeats):
        for backend in BACKENDS:
            samples[backend].append(call(backend))
    return {backend: statistics.median(values) for backend, values in samples.items()}, repeats


def saved_bytes(name: str, case: Case) -> tuple[int, int]:
    """Bytes of the tensors autograd saves during the operation (unique storages), and the part of it held by
    per-edge tensors (first dimension = the number of edges): what the fused kernels are designed to shrink."""
    storages, per_edge = {}, {}

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        storages[key] = storage.nbytes()
        if t.dim() >= 1 and t.shape[0] == case.n_edges:
            per_edge[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_operation(name, case)
    return int(sum(storages.values())), int(sum(per_edge.values()))


def memory_operation(name: str, case: Case, device: str) -> dict:
    """memory_bytes (GPU: peak allocation above the start; CPU: autograd-saved bytes) and saved per-edge bytes."""
    total, per_edge = saved_bytes(name, case)
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run_operation(name, case)
        synchronize(device)
        total = torch.cuda.max_memory_allocated(device) - before
        del result
    return dict(memory_bytes=int(total), saved_edge_bytes=per_edge)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check(case: Case) -> dict:
    """Fused vs reference: energy, forces and H·v of the same model and structure."""
    out = {}
    for backend in BACKENDS:
        case.model.backend = backend
        energy, forces = case.model.energy_forces(case.batch, case.edges)
        hv = hessian_vector_product(case.model, case.batch, case.vector, case.edges)
        out[backend] = (energy, forces, hv)
    pairs = zip(("energy", "forces", "hv"), out["fused"], out["reference"], strict=True)
    return {key: relative_error(f, r) for key, f, r in pairs}


def benchmark(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not has_fused_kernels(torch.device(device)):
        raise SystemExit(f"no compiled edge_moments kernels for {device}: build them first (see README)")
    tolerance = 1e-9 if dtype == torch.float64 else 1e-3
    records = []
    sizes = args.sizes or SIZES[(device.split(":")[0], args.quick)]
    for n in sizes:
        case = make_case(n, dtype, device)
        errors = check(case)
        worst = max(errors.values())
        print(f"{case.batch.n_atoms} atoms, {case.n_edges} edges: fused vs reference {errors}", flush=True)
        if worst > tolerance:
            raise SystemExit(f"fused differs from reference by {worst:.2e} (> {tolerance}) at {n}³ cells")
        for name in OPERATIONS:
            times, repeats = time_operation(name, case, device, args.budget)
            for backend in BACKENDS:
                case.model.backend = backend
                seconds = times[backend]
                measured = memory_operation(name, case, device)
                memory = measured["memory_bytes"]
                records.append(
                    dict(
                        n_atoms=case.batch.n_atoms,
                        n_edges=case.n_edges,
                        operation=name,
                        backend=backend,
                        time_s=seconds,
                        repeats=repeats,
                        memory_bytes=memory,
                        bytes_per_edge=memory / case.n_edges,
                        saved_edge_bytes_per_edge=measured["saved_edge_bytes"] / case.n_edges,
                        max_rel_error_vs_reference=worst,
                    )
                )
                print(
                    f"  {name:14s} {backend:9s} {seconds * 1e3:9.2f} ms  {memory / 2**20:8.2f} MiB "
                    f"({memory / case.n_edges:7.0f} B/edge, per-edge tensors saved "
                    f"{measured['saved_edge_bytes'] / case.n_edges:5.0f} B/edge)",
                    flush=True,
                )
        del case
    info = machine(device)
    memory_kind = (
        "peak torch.cuda.max_memory_allocated above the allocation before the operation"
        if device.startswith("cuda")
        else "bytes of tensors saved by autograd during the operation (unique storages; estimate, not peak RSS)"
    )
    return dict(machine=info, dtype=args.dtype, quick=args.quick, memory_kind=memory_kind, records=records)


def table(payload: dict) -> str:
    records = payload["records"]
    header = [
        "atoms",
        "edges",
        "operation",
        "reference time",
        "fused time",
        "speed-up",
        "reference memory",
        "fused memory",
        "memory ratio",
        "fused B/edge",
        "per-edge saved B/edge (ref → fused)",
    ]
    rows = []
    keys = dict.fromkeys((r["n_atoms"], r["operation"]) for r in records)
    for n_atoms, name in keys:
        pair = {r["backend"]: r for r in records if r["n_atoms"] == n_atoms and r["operation"] == name}
        ref, fus = pair["reference"], pair["fused"]
        rows.append(
            [
                n_atoms,
                ref["n_edges"],
                name,
                f"{ref['time_s'] * 1e3:.2f} ms",
                f"{fus['time_s'] * 1e3:.2f} ms",
                f"{ref['time_s'] / fus['time_s']:.2f}x",
                f"{ref['memory_bytes'] / 2**20:.2f} MiB",
                f"{fus['memory_bytes'] / 2**20:.2f} MiB",
                f"{ref['memory_bytes'] / max(fus['memory_bytes'], 1):.1f}x",
                f"{fus['bytes_per_edge']:.0f}",
                f"{ref['saved_edge_bytes_per_edge']:.0f} → {fus['saved_edge_bytes_per_edge']:.0f}",
            ]
        )
    info = payload["machine"]
    text = f"Measured on {machine_label(info)}, {info['date']}, {payload['dtype']}.\n"
    text += f"Memory: {payload['memory_kind']}.\n"
    text += (
        "Per-edge saved: bytes per edge of the saved tensors whose first dimension is the number of edges "
        "(edge list, shifts, vectors; the reference adds its (E, C) filters and messages).\n\n"
    )
    return text + markdown_table(header, rows)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = payload["records"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for index, name in enumerate(OPERATIONS):
        color = f"C{index}"
        for backend, style in (("reference", "--"), ("fused", "-")):
            points = sorted(
                (r["n_atoms"], r["time_s"], r["bytes_per_edge"])
                for r in records
                if r["operation"] == name and r["backend"] == backend
            )
            if not points:
                continue
            atoms, seconds, per_edge = zip(*points, strict=True)
            label = f"{name} ({backend})"
            axes[0].plot(atoms, [s * 1e3 for s in seconds], style, color=color, marker="o", label=label)
            axes[1].plot(atoms, per_edge, style, color=color, marker="o", label=label)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("atoms (diamond Si, ~16 edges per atom)")
    axes[0].set_ylabel("time per call (ms, median)")
    axes[1].set_ylabel("memory per edge (bytes)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"fused edge kernels vs reference — {machine_label(payload['machine'])}", fontsize=9)
    fig.text(0.5, 0.01, f"memory: {payload['memory_kind']}", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--sizes", type=int, nargs="*", help="n for n³ cubic cells (8n³ atoms)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per measurement")
    parser.add_argument(
        "--output",
        default=str(OUTPUT / "kernels"),
        help="prefix of .json/.md/.png (default untracked; committed: benchmarks/results/kernels)",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    payload = benchmark(args)
    prefix = Path(args.output)
    write_json(prefix.with_suffix(".json"), payload)
    text = table(payload)
    prefix.with_suffix(".md").write_text(text + "\n")
    plot(payload, prefix.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
