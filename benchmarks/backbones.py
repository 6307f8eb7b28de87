"""The three backbones side by side: parameters, energy + forces time and Hessian-vector-product time.

    python benchmarks/backbones.py                   # CPU, float64, 64 and 512 atoms; one torch thread
    python benchmarks/backbones.py --device cuda     # on a GPU
    python benchmarks/backbones.py --sizes 64 --dtype float32 --threads 2

Backbones (the sizes docs/backbones.md reports):

* ``mlip``: :class:`gdeq_ext.MLIP` at its defaults (13,922 weights, cutoff 4.0 Å, fused kernels when built);
* ``mace``: a random ``ScaleShiftMACE`` from :func:`gdeq_ext.potentials.build_mace` at its defaults (hidden irreps
  16x0e+16x1o, r_max 5.0 Å, 2 interactions, correlation 3: the model of issue #16), through MACEPotential;
* ``transformer``: :class:`gdeq_ext.Transformer` at its defaults (attention over neighbors within 4.0 Å).

Systems: diamond Si n³ supercells (64 atoms: n = 2; 512: n = 4), rattled 0.05 Å. E+F is
``energy_forces(potential, batch, edges)`` (one backward) with the neighbor list built beforehand (the relaxations
reuse a Verlet list, so the list is not part of a force call); H·v is ``hessian_vector_product`` (double backward).
Before timing, each backbone's forces are checked against a central finite difference of its energy and its H·v
against one of its forces (float64 only), so a fast wrong answer cannot enter the table. Timing: two warm-up calls,
then the median of ``--repeats`` calls (synchronised on a GPU).

Writes runs/benchmarks/backbones.{json,md} (untracked) unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUT, machine, machine_label, markdown_table, write_json  # noqa: E402

from gdeq_ext.data.batch import Batch  # noqa: E402
from gdeq_ext.data.structures import diamond_silicon  # noqa: E402
from gdeq_ext.potentials import MLIP, Transformer, build_mace  # noqa: E402
from gdeq_ext.potentials.base import energy_forces, hessian_vector_product  # noqa: E402

BACKBONES = ("mlip", "mace", "transformer")


def make(name: str, dtype: torch.dtype, device: str):
    if name == "mlip":
        return MLIP().to(dtype=dtype, device=device)
    if name == "mace":
        return build_mace(dtype=dtype).to(device)
    return Transformer().to(dtype=dtype, device=device)


def silicon(n_atoms: int, dtype, device) -> Batch:
    repeat = round((n_atoms / 8) ** (1 / 3))
    if 8 * repeat**3 != n_atoms:
        raise SystemExit(f"--sizes: {n_atoms} atoms is not 8 n³ (64, 216, 512, ...)")
    atoms = diamond_silicon((repeat,) * 3)
    atoms.rattle(0.05, seed=0)
    return Batch.from_ase([atoms], dtype=dtype, device=device)


def check(potential, batch, edges) -> dict:
    """Forces vs a central difference of the energy, H·v vs one of the forces, along one random direction."""
    v = torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(0), dtype=batch.dtype)
    v = v.to(batch.device)
    eps = 1e-5

    def at(x):
        return energy_forces(potential, batch.with_positions(x), edges=edges)

    (e_plus, f_plus), (e_minus, f_minus) = at(batch.positions + eps * v), at(batch.positions - eps * v)
    _, forces = at(batch.positions)
    fd_energy = float((e_plus - e_minus).sum()) / (2 * eps)
    force_error = abs(-float((forces * v).sum()) - fd_energy) / max(abs(fd_energy), 1e-300)
    hv = hessian_vector_product(potential, batch, v, edges=edges)
    hv_error = float((hv + (f_plus - f_minus) / (2 * eps)).norm() / hv.norm())
    if batch.dtype == torch.float64 and (force_error > 1e-6 or hv_error > 1e-5):
        raise SystemExit(f"{type(potential).__name__}: force error {force_error:.2e}, H·v error {hv_error:.2e}")
    return {"force_fd_relative_error": force_error, "hv_fd_relative_error": hv_error}


def timed(fn, repeats: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 512], help="atoms per cell (8 n³)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median; default 5)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="folder for backbones.{json,md}")
    parser.add_argument("--note", default="", help="a line written under the table (e.g. how loaded the machine was)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    info = machine(args.device)
    rows, results = [], []
    for name in args.backbones:
        potential = make(name, dtype, args.device)
        n_parameters = sum(p.numel() for p in potential.parameters())
        entry = {"backbone": name, "class": type(potential).__name__, "parameters": n_parameters, "sizes": {}}
        for n_atoms in args.sizes:
            batch = silicon(n_atoms, dtype, args.device)
            edges = potential.neighbors(batch)
            accuracy = check(potential, batch, edges)
            v = torch.randn_like(batch.positions)
            ef = timed(lambda p=potential, b=batch, e=edges: energy_forces(p, b, edges=e), args.repeats, args.device)
            hv = timed(
                lambda p=potential, b=batch, e=edges, w=v: hessian_vector_product(p, b, w, edges=e),
                args.repeats,
                args.device,
            )
            n_edges = 0 if edges is None else int(edges.edge_index.shape[1])
            entry["sizes"][n_atoms] = {"ef_s": ef, "hv_s": hv, "edges": n_edges, **accuracy}
            print(f"{name:12s} {n_atoms:4d} atoms, {n_edges} pairs: E+F {1e3 * ef:8.1f} ms, H·v {1e3 * hv:8.1f} ms")
        results.append(entry)
        cells = []
        for n_atoms in args.sizes:
            s = entry["sizes"][n_atoms]
            cells += [f"{1e3 * s['ef_s']:.1f}", f"{1e3 * s['hv_s']:.1f}"]
        rows.append([name, f"{n_parameters:,}", *cells])
    header = ["backbone", "parameters"]
    for n_atoms in args.sizes:
        header += [f"E+F {n_atoms} atoms (ms)", f"H·v {n_atoms} atoms (ms)"]
    table = markdown_table(header, rows)
    text = (
        f"# Backbones: parameters, E+F and H·v time\n\n{table}\n\n"
        f"{args.dtype}, {args.device}; {machine_label(info)}; median of {args.repeats} calls after 2 warm-up calls; "
        f"neighbor list built beforehand. {args.note}\n"
    )
    write_json(args.output / "backbones.json", {"machine": info, "dtype": args.dtype, "results": results})
    (args.output / "backbones.md").write_text(text)
    print(text)
    print(f"wrote {args.output / 'backbones.json'} and backbones.md")


if __name__ == "__main__":
    main()
