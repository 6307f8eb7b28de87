"""The regime map: the four conditions of hybrid training's leverage on three materials systems.

    python benchmarks/regime.py              # --quick on a CPU (a few minutes)
    python benchmarks/regime.py --full --device cuda

Systems (teacher → student):

* **silicon defects** — Stillinger-Weber → the basin study's committed bulk-fitted base MLIP (64-site cells);
* **silicon defects, in-domain base** — the same starts, a base fitted to the bulk data *and* to defect
  configurations along SW's relaxation paths of other starts (the announcement's "strong, in-domain base" row:
  condition 3 should fail);
* **silicon defects, 216-site cells** — the bulk-fitted base on 216-site cells (the "long relaxation" row:
  condition 4 should fail when K = 10 is under a tenth of the relaxation);
* **Cu (EMT)** — ASE's EMT → an MLIP(species=(29,)) fitted by force matching to EMT on rattled bulk fcc cells and
  rattled clean fcc(111) slabs (no adatom, no vacancy). Starts: a Cu adatom dropped 2 Å above a 3×3×3 fcc(111)
  slab at a random lateral position (fcc vs hcp hollow), and a vacancy in a 32-atom fcc cell with its 12 neighbours
  rattled by 0.15 Å (one minimum: the control where condition 2 fails);
* **Lennard-Jones clusters** — ASE's LennardJones (σ = 2 Å, ε = 1 eV, rc = 3σ, smooth) → an MLIP(species=(18,),
  cutoff 6 Å) fitted to LJ forces on rattled global minima only (rattles 0.05-0.4 Å). Starts: LJ13 (icosahedron)
  rattled 0.6 Å and LJ38 (truncated octahedron) rattled 0.4 Å, no periodic axis; each atom's rattle is redrawn (up
  to 100 times, else it stays) while it is closer than 0.8 r_min = 1.8 Å to another atom (the r^-12 wall).

For each: :func:`gdeq_ext.diagnose` on the test starts (the four conditions and the verdict), the base's
correct-basin rate, and the rate after hybrid fine-tuning (K = 10, ``fit_relaxation`` as in benchmarks/basins.py).
Teachers given as ASE calculators relax with ``ase.optimize.FIRE`` (fmax 0.01, refined to 1e-4); students with our
batched FIRE (same algorithm). Writes benchmarks/results/regime.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from basins import QUICK, Method, bulk_silicon_data, evaluate, fine_tune  # noqa: E402
from common import OUTPUT, RESULTS, fit_and_save, machine, machine_label, markdown_table, write_json  # noqa: E402

from gdeq_ext import diagnose, silicon_defects  # noqa: E402
from gdeq_ext.datasets.relaxations import ase_relax  # noqa: E402
from gdeq_ext.potentials import MLIP, StillingerWeber  # noqa: E402

CACHE = RESULTS / "cache"
LJ_SIGMA, LJ_EPSILON = 2.0, 1.0
LJ_MIN_DISTANCE = 0.8 * 2 ** (1 / 6) * LJ_SIGMA  # Å: closer pairs sit on the r^-12 wall (forces ~100 eV/Å)


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


# ----------------------------------------------------------------------------------------------- systems
def cu_adatom(k: int, seed: int) -> Atoms:
    from ase.build import fcc111

    rng = _rng("regime/cu_adatom", seed, k)
    slab = fcc111("Cu", size=(3, 3, 3), vacuum=6.0)
    xy = rng.uniform(0, 1, 2) @ slab.cell.array[:2, :2]
    slab += Atoms("Cu", positions=[[xy[0], xy[1], slab.positions[:, 2].max() + 2.0]])
    slab.positions += rng.normal(0, 0.05, slab.positions.shape)
    slab.info["group"] = "Cu adatom on fcc(111)"
    return slab


def cu_vacancy(k: int, seed: int) -> Atoms:
    from ase.build import bulk

    rng = _rng("regime/cu_vacancy", seed, k)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    d = atoms.get_distances(0, range(len(atoms)), mic=True)
    neighbours = np.argsort(d)[1:13]
    atoms.positions[neighbours] += rng.normal(0, 0.15, (12, 3))
    del atoms[0]
    atoms.info["group"] = "Cu vacancy (bulk)"
    return atoms


def lj_cluster(size: int, k: int, seed: int, rattle: float | None = None) -> Atoms:
    from ase.cluster import Icosahedron, Octahedron

    rng = _rng("regime/lj", size, seed, k)
    atoms = Icosahedron("Ar", noshells=2) if size == 13 else Octahedron("Ar", length=4, cutoff=1)
    nearest = np.sort(atoms.get_all_distances().ravel())[len(atoms)]
    atoms.set_positions(atoms.get_positions() * (2 ** (1 / 6) * LJ_SIGMA) / nearest)
    atoms.positions -= atoms.positions.mean(axis=0)
    atoms.cell = np.zeros((3, 3))
    atoms.pbc = False
    rattle = (0.6 if size == 13 else 0.4) if rattle is None else rattle
    positions = atoms.get_positions()
    for i in range(len(positions)):  # atom by atom, redrawn until it is LJ_MIN_DISTANCE clear of the others
        others = np.delete(positions, i, axis=0)
        for _ in range(100):
            candidate = positions[i] + rng.normal(0, rattle, 3)
            if rattle == 0 or np.linalg.norm(others - candidate, axis=1).min() >= LJ_MIN_DISTANCE:
                positions[i] = candidate
                break
    atoms.set_positions(positions)
    atoms.info["group"] = f"LJ{size}"
    return atoms


def lj_minimum(size: int, calculator) -> Atoms:
    """The relaxed, unperturbed LJ13 icosahedron or LJ38 truncated octahedron."""
    atoms = lj_cluster(size, 0, 0, rattle=0.0)
    atoms.set_positions(ase_relax([atoms], calculator)[0]["positions"])
    return atoms


def lj_calculator():
    from ase.calculators.lj import LennardJones

    return LennardJones(sigma=LJ_SIGMA, epsilon=LJ_EPSILON, rc=3 * LJ_SIGMA, smooth=True)


def with_targets(starts, calculator) -> list[Atoms]:
    relaxed = ase_relax(starts, calculator)
    for atoms, result in zip(starts, relaxed, strict=True):
        atoms.arrays["target"] = result["positions"]
        atoms.info["teacher_energy"] = result["energy"]
        atoms.info["steps"] = result["steps"]
    return starts


def labelled(structures, calculator):
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calculator
        out.append((atoms, float(atoms.get_potential_energy()), atoms.get_forces().copy()))
    return out


def fit_base(name: str, species: int, cutoff: float, structures, calculator, args) -> str:
    """Force matching (cached): an MLIP for ``species`` fitted to ``calculator`` on ``structures``."""
    path = CACHE / f"regime_base_{name}_{'quick' if args.quick else 'full'}_{args.dtype}.pt"
    if path.exists():
        return str(path)
    print(f"fitting the {name} base MLIP on {len(structures)} structures ...", flush=True)
    model = MLIP(species=(species,), cutoff=cutoff).to(getattr(torch, args.dtype))
    data = labelled(structures, calculator)
    return str(
        fit_and_save(model, data, path, epochs=300 if args.quick else 1000, max_time_s=args.fit_time, patience=40)
    )


def silicon_in_domain_base(args) -> str:
    """A strong, in-domain silicon base (the regime map's negative row for condition 3): the basin study's bulk
    recipe (rattled, strained and thermal diamond cells, labelled by SW) plus defect configurations along SW's own
    relaxation paths — start, 1/3, 2/3 and the minimum of 48 defect starts of another data seed than the test and
    fine-tuning starts — so the student has seen the defect basins it will be asked to pick. Cached."""
    from gdeq_ext.ase import GDEQCalculator
    from gdeq_ext.train import fit_forces
    from gdeq_ext.train.state import seed_everything

    path = CACHE / f"regime_base_si_in_domain_{'quick' if args.quick else 'full'}_{args.dtype}.pt"
    if path.exists():
        return str(path)
    seed_everything(0)
    teacher = StillingerWeber()
    data = bulk_silicon_data(96, 48)  # the study's base recipe (basins.py), the same 144 cells
    paths = silicon_defects(n_train=48, n_val=0, n_test=0, sizes=(64,), seed=args.data_seed + 1000, cache=str(CACHE))
    frames = []
    for atoms in paths.train:
        for t in (0.0, 1 / 3, 2 / 3, 1.0):
            frame = atoms.copy()
            frame.set_positions((1 - t) * atoms.get_positions() + t * atoms.arrays["target"])
            frames.append(frame)
    data = list(data) + labelled(frames, GDEQCalculator(teacher))
    print(f"fitting the in-domain silicon base MLIP on {len(data)} structures ...", flush=True)
    model = MLIP().to(getattr(torch, args.dtype))
    result = fit_forces(model, data, epochs=400, patience=60, progress=False, seed=0)
    print("  " + result.summary(), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return str(path)


def rattled(make, n, amplitudes, seed_name):
    out = []
    for k in range(n):
        atoms = make(k)
        rng = _rng(seed_name, k)
        atoms.positions += rng.normal(0, amplitudes[k % len(amplitudes)], atoms.positions.shape)
        out.append(atoms)
    return out


def systems(args) -> list[dict]:
    """name, train/test starts, teacher, base path, energy tolerance of each system."""
    from ase.build import bulk, fcc111
    from ase.calculators.emt import EMT

    n_train, n_test = args.n_train, args.n_test
    out = []

    def silicon(name, data, base, student):
        return dict(name=name, train=data.train, test=data.test, teacher=StillingerWeber(), base=base,
                    tolerance=0.005, student=student)  # fmt: skip

    # silicon: the basins.py base and data set
    data = silicon_defects(n_train=n_train, n_val=0, n_test=n_test, sizes=(64,), seed=args.data_seed, cache=str(CACHE))
    bulk_base = args.silicon_model or str(RESULTS / "basins_full" / "base.pt")
    out.append(silicon("silicon defects (SW)", data, bulk_base,
                       "MLIP fitted to SW forces on bulk cells (benchmarks/basins.py)"))  # fmt: skip
    # The announcement's two negative rows, by analogy on the same teacher: a strong, in-domain base (condition 3
    # should fail: it rarely picks a wrong basin) and long relaxations (condition 4 should fail: K = 10 is a small
    # part of a 216-site cell's relaxation).
    in_domain = "MLIP fitted to SW on the bulk cells plus defect configurations along SW relaxation paths"
    out.append(silicon("silicon defects, in-domain base (SW)", data, silicon_in_domain_base(args), in_domain))
    big = silicon_defects(n_train=n_train, n_val=0, n_test=n_test, sizes=(216,), seed=args.data_seed, cache=str(CACHE))
    out.append(silicon("silicon defects, 216-site cells (SW)", big, bulk_base,
                       "the bulk-fitted base of the first row, on 216-site cells (longer relaxations)"))  # fmt: skip
    # Cu (EMT)
    emt = EMT()
    half = n_test // 2
    test = [cu_adatom(k, args.data_seed) for k in range(n_test - half)]
    test += [cu_vacancy(k, args.data_seed) for k in range(half)]
    train = [cu_adatom(1000 + k, args.data_seed) for k in range(n_train)]
    t0 = time.perf_counter()
    with_targets(test, emt)
    with_targets(train, emt)
    print(f"Cu teacher relaxations: {time.perf_counter() - t0:.0f} s", flush=True)
    fit_data = rattled(lambda k: bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2), 24, (0.05, 0.1, 0.2), "cu/bulk")
    fit_data += rattled(lambda k: fcc111("Cu", size=(3, 3, 3), vacuum=6.0), 24, (0.05, 0.1, 0.2), "cu/slab")
    base = fit_base("cu_emt", 29, 5.0, fit_data, emt, args)
    out.append(
        dict(
            name="Cu (EMT)",
            train=train,
            test=test,
            teacher=emt,
            base=base,
            tolerance=2e-4,
            student="MLIP(species=(29,), cutoff 5 Å) fitted to EMT on rattled bulk + clean slabs",
        )
    )
    # Lennard-Jones clusters
    lj = lj_calculator()
    test = [lj_cluster(13, k, args.data_seed) for k in range(n_test - half)]
    test += [lj_cluster(38, k, args.data_seed) for k in range(half)]
    train = [lj_cluster(13 if k % 2 else 38, 1000 + k, args.data_seed) for k in range(n_train)]
    t0 = time.perf_counter()
    with_targets(test, lj)
    with_targets(train, lj)
    print(f"LJ teacher relaxations: {time.perf_counter() - t0:.0f} s", flush=True)

    minima = {size: lj_minimum(size, lj) for size in (13, 38)}
    # rattled global minima only (same rattles as the starts, same close-contact rule): no other minimum is shown
    fit_data = [lj_cluster(13 if k % 2 else 38, 5000 + k, 0, rattle=(0.05, 0.1, 0.2, 0.4)[k % 4]) for k in range(48)]
    for atoms in fit_data:
        size = len(atoms)
        atoms.set_positions(
            atoms.get_positions() - lj_cluster(size, 0, 0, rattle=0.0).get_positions() + minima[size].get_positions()
        )
    base = fit_base("lj", 18, 6.0, fit_data, lj, args)
    out.append(
        dict(
            name="LJ clusters (13, 38)",
            train=train,
            test=test,
            teacher=lj,
            base=base,
            tolerance=0.005,
            student="MLIP(species=(18,), cutoff 6 Å) fitted to LJ on rattled global minima",
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--n-train", type=int, help="fine-tuning starts per system (quick 12, full 100)")
    parser.add_argument("--n-test", type=int, help="test starts per system (quick 12, full 100)")
    parser.add_argument("--steps", type=int, help="hybrid fine-tuning steps (quick 6, full 100)")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fit-time", type=float, help="seconds of force matching per base (quick 90)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--silicon-model", help="base MLIP for silicon (default: benchmarks/basins.py's)")
    parser.add_argument(
        "--output",
        default=str(OUTPUT / "regime"),
        help="prefix of the outputs (default untracked; committed: benchmarks/results/regime)",
    )
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    args.quick = args.quick or (not args.full and not args.device.startswith("cuda"))
    q = args.quick
    args.n_train = args.n_train or (12 if q else 100)
    args.n_test = args.n_test or (12 if q else 100)
    args.steps = args.steps if args.steps is not None else (6 if q else 100)
    args.fit_time = args.fit_time or (90 if q else 1800)
    # the fine-tuning protocol of benchmarks/basins.py (fit_relaxation), at this benchmark's budget
    protocol = dict(QUICK, steps=args.steps, batch_size=4, dtype=args.dtype, polish=False)
    info = machine(args.device)
    print(f"regime map on {machine_label(info)}", flush=True)
    rows, records = [], []
    method = Method(f"hybrid K={args.window}", "hybrid", args.window)
    for system in systems(args):
        t0 = time.perf_counter()
        base = MLIP.load(system["base"]).to(dtype=getattr(torch, args.dtype), device=args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diagnosis = diagnose(
                base,
                system["test"],
                teacher=system["teacher"],
                window=args.window,
                energy_tolerance=system["tolerance"],
            )
            model, train = fine_tune(method, system["base"], system["train"], protocol, args.lr, 0, args.device)
            tuned = evaluate(model, system["test"], protocol, teacher=system["teacher"])
        n = len(system["test"])
        c = diagnosis.conditions
        rows.append(
            [
                system["name"],
                f"{c['forces'].value:.2f} {'✓' if c['forces'].holds else '✗'}",
                f"{c['competing_minima'].value:.0f} {'✓' if c['competing_minima'].holds else '✗'} "
                f"({', '.join(f'{g}: {v}' for g, v in diagnosis.basins_per_group.items())})",
                f"{100 * c['wrong_basin'].value:.0f}% {'✓' if c['wrong_basin'].holds else '✗'}",
                f"{np.median(diagnosis.base_steps):.0f} steps, K/steps {c['relaxation_length'].value:.2f} "
                f"{'✓' if c['relaxation_length'].holds else '✗'}",
                diagnosis.verdict,
                f"{sum(diagnosis.base_correct)}/{n}",
                f"{tuned['correct']}/{n}" + (" (stopped early)" if train["failed"] else ""),
            ]
        )
        records.append(
            {
                "system": system["name"],
                "student": system["student"],
                "diagnosis": diagnosis.to_dict(),
                "hybrid": {"test": tuned, "train": train},
                "time_s": time.perf_counter() - t0,
            }
        )
        print(
            f"{system['name']}: {diagnosis.verdict}; base {sum(diagnosis.base_correct)}/{n}, hybrid "
            f"{tuned['correct']}/{n} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    header = [
        "system",
        "1. force error (rel.)",
        "2. minima per group",
        "3. base wrong",
        "4. relaxation vs K",
        "verdict",
        "base correct",
        f"hybrid K={args.window} correct",
    ]
    heading = (
        f"Regime map ({'quick CPU run' if q else 'full run'}): {args.n_test} test starts and {args.n_train} "
        f"fine-tuning starts per system, hybrid K={args.window} fine-tuned {args.steps} Adam steps × "
        f"{protocol['batch_size']} starts "
        f"(lr {args.lr:g}, one seed), {args.dtype}; measured {info['date']} on {machine_label(info)}. ✓/✗: condition "
        f"holds (thresholds: relative force error ≤ 0.35, ≥ 2 teacher minima in a group, ≥ 5% wrong, K ≥ 0.1 × "
        f"median FIRE steps)."
    )
    markdown = f"{heading}\n\n{markdown_table(header, rows)}\n"
    output = Path(args.output)
    write_json(output.with_suffix(".json"), {"machine": info, "arguments": vars(args), "systems": records})
    output.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
