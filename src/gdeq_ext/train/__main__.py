"""``python -m gdeq_ext.train CONFIG``: train a potential through relaxations from a TOML or YAML config.

One process::

    python -m gdeq_ext.train examples/hybrid.toml

Data-parallel (the same command under torchrun; one GPU per process when there are GPUs, else gloo on CPUs)::

    torchrun --standalone --nproc-per-node 4 -m gdeq_ext.train examples/hybrid.toml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m gdeq_ext.train CONFIG

Settings can be overridden on the command line (``--set optim.lr=3e-4 --set train.steps=200``). Running the
same command again resumes from the latest checkpoint in the output folder; Ctrl-C (or SIGTERM) stops after
the current step and writes a checkpoint first. Outputs: ``metrics.csv``, ``learning_curves.png``,
``summary.md``, ``model.pt`` (load with ``gdeq_ext.MLIP.load``; ASE: ``gdeq_ext.ase.GDEQCalculator``).
Exit status: 0 done; 2 bad config, data, checkpoint or potential file, or a training step that failed (the
message names the step and the dataset frames); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from gdeq_ext.data.relaxation_pairs import RelaxationPairs, read_relaxation_pairs
from gdeq_ext.gradients.implicit_function import InvalidGradientError
from gdeq_ext.train.config import RESUME, Config, ConfigError, load_config, parse_override
from gdeq_ext.train.distributed import DistributedContext, init_distributed, shutdown
from gdeq_ext.train.relaxation import TrainingStepError, find_checkpoint, fit_relaxation

__all__ = ["build_model", "main"]


def _species(*sets: RelaxationPairs | None) -> tuple[int, ...]:
    numbers = set()
    for pairs in sets:
        for pair in pairs or ():
            numbers.update(int(z) for z in pair.start.numbers)
    return tuple(sorted(numbers))


def build_model(
    config: Config, context: DistributedContext, species: tuple[int, ...], output_dir: str, resuming: bool
) -> torch.nn.Module:
    """The potential to train (``model.backbone``): ``model.init`` loaded, or a fresh one; pretrained (rank 0) if
    configured.

    Pretraining (force matching to Stillinger-Weber on bulk silicon, :class:`PretrainConfig`) runs only on
    rank 0 and only for a fresh run; ``fit_relaxation`` then broadcasts rank 0's parameters to all ranks. The
    pretrained base is saved as ``output_dir/base.pt``.
    """
    from gdeq_ext.potentials import MLIP, MACEPotential, Transformer, build_mace

    spec, dtype = config.model, getattr(torch, config.model.dtype)
    kind = {"mlip": MLIP, "mace": MACEPotential, "transformer": Transformer}[spec.backbone]
    if spec.init is not None:
        if not os.path.exists(spec.init):
            raise FileNotFoundError(f"model.init: no such file {spec.init}")
        model = kind.load(spec.init)
    elif spec.backbone == "mace":
        model = build_mace(species, r_max=spec.cutoff, seed=spec.seed)
    elif spec.backbone == "transformer":
        model = Transformer(species, cutoff=spec.cutoff, seed=spec.seed)
    else:
        model = MLIP(
            species=species,
            cutoff=spec.cutoff,
            features=spec.features,
            channels=spec.channels,
            n_radial=spec.n_radial,
            n_layers=spec.n_layers,
            hidden=spec.hidden,
            seed=spec.seed,
            backend=spec.backend,
        )
    model = model.to(device=context.device, dtype=dtype)
    pretrain = config.pretrain
    if pretrain.rattled + pretrain.thermal > 0 and not resuming and context.is_main:
        if species != (14,):
            raise ConfigError(f"[pretrain] fits Stillinger-Weber silicon, but the data hold species {list(species)}")
        from gdeq_ext.train.data import silicon_dataset
        from gdeq_ext.train.forces import fit_forces

        data = silicon_dataset(pretrain.rattled, pretrain.thermal, repeat=(pretrain.repeat,) * 3, seed=pretrain.seed)
        fitted = fit_forces(
            model,
            data,
            epochs=pretrain.epochs,
            lr=pretrain.lr,
            batch_size=pretrain.batch_size,
            seed=pretrain.seed,
            patience=pretrain.epochs,
            progress=config.train.progress,
        )
        print(f"pretrained base potential (force matching to SW): {fitted.summary()}", flush=True)
        os.makedirs(output_dir, exist_ok=True)
        model.save(os.path.join(output_dir, "base.pt"))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gdeq_ext.train",
        description="Train a potential through relaxations (bptt / implicit / hybrid) from a TOML or YAML config.",
    )
    parser.add_argument("config", help="a .toml, .yaml or .yml file (see docs/training.md)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting (repeatable)"
    )
    parser.add_argument("--output-dir", help="override train.output_dir (default runs/<config name>)")
    parser.add_argument("--resume", choices=RESUME, help="override train.resume")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    try:
        overrides = dict(parse_override(text) for text in args.set)
        if args.output_dir:
            overrides["train.output_dir"] = args.output_dir
        if args.resume:
            overrides["train.resume"] = args.resume
        if args.no_progress:
            overrides["train.progress"] = False
        config = load_config(args.config, overrides)
        if config.data.train is None:
            raise ConfigError(f"{args.config}: data.train (an extxyz file of relaxation pairs) is required")
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config.train.output_dir is None:
        config.train.output_dir = os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    output_dir = config.train.output_dir
    if config.train.threads:
        torch.set_num_threads(config.train.threads)

    context = init_distributed(config.train.device)
    finished = False
    try:
        train = read_relaxation_pairs(config.data.train)
        validation = read_relaxation_pairs(config.data.val) if config.data.val else None
        resuming = config.train.resume != "never" and find_checkpoint(output_dir) is not None
        if context.is_main:
            where = f"{context.world_size} processes ({context.backend})" if context.distributed else "1 process"
            print(
                f"{len(train)} training pairs from {config.data.train}"
                + (f", {len(validation)} validation pairs" if validation is not None else "")
                + f"; {where} on {context.device}; output {output_dir}"
                + ("; resuming from its latest checkpoint" if resuming else ""),
                flush=True,
            )
        model = build_model(config, context, _species(train, validation), output_dir, resuming)
        result = fit_relaxation(
            model, train, validation=validation, config=config, output_dir=output_dir, context=context
        )
        finished = True
    except (
        ValueError,
        FloatingPointError,
        TrainingStepError,
        InvalidGradientError,
        FileNotFoundError,
        FileExistsError,
    ) as error:
        # Bad config, data, checkpoint or potential file (ConfigError, RelaxationDataError, CheckpointError,
        # PotentialFileError are ValueErrors), or a step that failed on named dataset frames (TrainingStepError):
        # the message says what to fix; a traceback would only bury it.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        if context.is_main:
            print(f"\ninterrupted: {error}", file=sys.stderr)
        return 130
    finally:
        shutdown(context, barrier=finished)
    if context.is_main:
        print()
        print(result.table())
        print()
        for label, path in (
            ("metrics", result.csv_path),
            ("learning curves", result.png_path),
            ("summary", result.summary_path),
            ("trained potential", result.model_path),
        ):
            if path:
                print(f"{label:18s} {path}")
        if result.model_path:
            kind = type(model).__name__
            print(
                f"use it from ASE:   from gdeq_ext import {kind}; from gdeq_ext.ase import GDEQCalculator; "
                f"atoms.calc = GDEQCalculator({kind}.load({result.model_path!r}))"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
