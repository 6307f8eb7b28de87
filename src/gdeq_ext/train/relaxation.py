"""Training a potential through relaxations: :func:`fit_relaxation`, its metrics, checkpoints and outputs.

One training step takes a global batch of relaxation pairs (start, teacher-relaxed reference), relaxes
every start with the potential in the configured mode (``bptt`` / ``implicit`` / ``hybrid`` with window K,
:mod:`gdeq_ext.relax`), and minimises

    loss = mean over the global batch of ΔQ_s          (ΔQ: :func:`gdeq_ext.delta_q`, Å·amu^½)

(plus ``relax.guidance`` × ΔQ of the last window state X_K in the hybrid mode when it is set; the ``loss``
column stays ΔQ(X*), so runs with and without guidance compare on the same scale).

Metrics per step (``metrics.csv``, ``learning_curves.png``):

* ΔQ (the loss), and the **correct-basin rate** by the project's one judge (:class:`gdeq_ext.datasets.BasinJudge`,
  ``train.teacher`` / ``basin_threshold`` / ``direct_threshold``): with a teacher, the relaxed structure quenched
  by it lies within 0.1 Å of the reference in its largest per-atom deviation; without one, the relaxed structure
  itself within 0.4 Å; ``*_basin_rate_direct`` is the direct test either way. Deviations are taken after
  pairing atoms (permutation-invariant) and removing the net translation. (Until 2026-12-03: the per-atom RMS of the
  minimum-image displacements after pairing atoms (permutation-invariant) and removing the net translation;
* fmax (eV/Å) and the converged share at the end of each relaxation, relaxation steps per structure;
* solver iterations: Hessian-vector products per structure of the implicit backward (implicit and hybrid);
* trust (implicit and hybrid; ``gdeq_ext.relax.validity``): ``skipped`` structures whose gradient contribution was
  zeroed (``relax.on_invalid = "skip"``, the default, or a non-finite/diverged solve), of which ``saddles`` (negative
  curvature at X*), ``inexact`` (the Newton polish missed its tolerance) and ``solve_failed`` (the backward solve
  missed its tolerance); ``fixed_point_error``, the largest estimated distance of a relaxed structure from its exact
  fixed point (Å); ``nonfinite_gradient`` is 1 when the summed gradient was not finite and the optimizer step was
  skipped (it never reaches the optimizer);
* peak memory of the step (MiB): ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the process's peak
  resident memory during the step (VmHWM, reset before it: Python, torch and the data included);
* validation metrics every ``eval_every`` steps, from a fixed protocol for every mode: FIRE (ASE's
  defaults) from the start to ``fmax``, graph-free.

Checkpoints (every ``checkpoint_every`` steps, at the end, and when SIGINT/SIGTERM asks the run to stop)
hold the model, optimizer, scheduler, step, data order, the RNG states (torch, numpy, python, CUDA) and the
metric history, so a resumed run continues exactly where the checkpoint was taken: its parameters equal an
uninterrupted run's bit for bit (on the same hardware, threads and world size).

Data-parallel over ``torch.distributed`` ranks: see :mod:`gdeq_ext.train.distributed`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from gdeq_ext.data.relaxation_pairs import RelaxationPairs, read_relaxation_pairs
from gdeq_ext.hardware import describe
from gdeq_ext.loss import delta_q
from gdeq_ext.profiling import PeakMemory
from gdeq_ext.train.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_resume,
    find_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    model_signature,
    remove_stale_temporaries,
)
from gdeq_ext.train.config import Config
from gdeq_ext.train.distributed import (
    DistributedContext,
    all_reduce_gradients,
    all_reduce_max,
    all_reduce_sum,
    broadcast_module,
    shard,
)
from gdeq_ext.train.factories import make_judge, make_optimizer, make_relaxation, make_scheduler
from gdeq_ext.train.metrics import (
    COLUMNS,
    STEP_FAILURES,
    TrainingStepError,
    basin_distance,
    correct_basin,
    evaluate_relaxation,
    gradient_norm,
    make_row,
    mean_or_none,
    step_failure,
    trust_counts,
)
from gdeq_ext.train.outputs import BestValidation, Outputs, RelaxationFitResult, describe_backend, plot_learning_curves
from gdeq_ext.train.state import DataOrder, StopRequest, rng_state, seed_everything, set_rng_state

__all__ = [
    "CHECKPOINT_FORMAT",
    "COLUMNS",
    "RelaxationFitResult",
    "TrainingStepError",
    "basin_distance",
    "correct_basin",
    "evaluate_relaxation",
    "find_checkpoint",
    "fit_relaxation",
    "load_checkpoint",
    "make_optimizer",
    "make_relaxation",
    "make_scheduler",
    "plot_learning_curves",
]


# ---------------------------------------------------------------------------------------------- training
def _resolve_config(config, overrides: dict) -> Config:
    if config is None:
        config = Config()
    elif isinstance(config, dict):
        config = Config.from_dict(config)
    elif not isinstance(config, Config):
        raise TypeError(f"config must be a Config, a dict or None, got {type(config).__name__}")
    return config.update(overrides, source="fit_relaxation") if overrides else config.copy()


def _as_pairs(data, what: str) -> RelaxationPairs | None:
    if data is None:
        return None
    if isinstance(data, RelaxationPairs):
        return data
    if isinstance(data, str | os.PathLike):
        return read_relaxation_pairs(data)
    pairs = RelaxationPairs(list(data), source=what)
    if not len(pairs):
        raise ValueError(f"the {what} set is empty")
    return pairs


def fit_relaxation(
    model: torch.nn.Module,
    train,
    *,
    validation=None,
    config: Config | dict | None = None,
    output_dir: str | os.PathLike | None = None,
    callback: Callable[[int, dict], None] | None = None,
    context: DistributedContext | None = None,
    **overrides,
) -> RelaxationFitResult:
    """Train ``model`` (in place) so that relaxing each start under it lands on the reference structure.

    Args:
        model: the potential (Batch -> energies (n_systems,) eV), e.g. a force-matched
            :class:`~gdeq_ext.MLIP`; trained in its own dtype and on its own device.
        train: training pairs: :class:`~gdeq_ext.data.RelaxationPairs`, a list of
            :class:`~gdeq_ext.data.RelaxationPair`, or an extxyz path.
        validation: validation pairs (same forms), evaluated before training, every ``train.eval_every``
            steps and at the end (default none).
        config: :class:`~gdeq_ext.train.config.Config` or nested dict; only [relax], [optim] and [train] are
            used here (defaults: hybrid K=10, Adam lr 1e-3, 100 steps of 4 structures).
        output_dir: where checkpoints and outputs go (default ``train.output_dir``; None writes nothing and
            cannot resume).
        callback: called as ``callback(step, row)`` after every step (and its checkpoint); ``row`` is the
            metrics.csv row. An exception raised there stops the run like a crash would.
        context: the distributed context (default: the initialised process group, else one process).
        overrides: flat settings of [relax], [optim], [train], e.g. ``mode="implicit"``, ``lr=3e-4``,
            ``steps=20``, or dotted ``**{"relax.window": 5}``.

    Returns:
        :class:`RelaxationFitResult` (history, evaluations before/after, timings, paths).

    Raises:
        ConfigError: an unknown setting or a value out of range; resuming with changed [relax]/[optim]
            settings, batch size or seed.
        NonFiniteError: forces became NaN/inf; names the step and the dataset frames of the batch.
        KeyboardInterrupt: after SIGINT/SIGTERM, once the current step and its checkpoint are written.

    Under ``torchrun`` every rank calls this with the same arguments: each relaxes its shard of every global
    batch and the summed gradient equals the single-process gradient of the mean over the global batch.
    """
    from tqdm.auto import tqdm

    config = _resolve_config(config, overrides)
    relax_config, optim_config, run = config.relax, config.optim, config.train
    output_dir = os.fspath(output_dir) if output_dir is not None else run.output_dir
    run.output_dir = output_dir
    parameter = next(iter(model.parameters()), None)
    if parameter is None:
        raise ValueError("the model has no parameters to train")
    dtype, device = parameter.dtype, parameter.device
    context = context or DistributedContext.current(device)
    train = _as_pairs(train, "training")
    validation = _as_pairs(validation, "validation")
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer = make_optimizer(model, optim_config)
    scheduler = make_scheduler(optimizer, optim_config, run.steps)
    relax = make_relaxation(model, relax_config)
    order = DataOrder(len(train), run.seed)
    memory = PeakMemory(device)
    judge = make_judge(run)
    evaluate = dict(
        fmax=relax_config.fmax,
        max_steps=relax_config.max_relax_steps,
        judge=judge,
        context=context,
    )

    # Rank 0 decides and reads; the other ranks get its checkpoint over the process group, so nodes without a
    # shared file system resume too. The newest checkpoint that loads is used (unreadable newer ones are named
    # in a CheckpointWarning); a folder whose checkpoints all fail to load is an error, not a fresh start.
    if context.is_main and output_dir is not None:
        remove_stale_temporaries(output_dir)
    loaded = None
    if context.is_main and run.resume != "never":
        try:
            loaded = load_latest_checkpoint(output_dir, map_location="cpu")
        except CheckpointError as error:
            if not context.distributed:
                raise
            loaded = error  # every rank raises it below, none waits in a broadcast for rank 0
    if context.distributed:
        shared = [loaded]
        dist.broadcast_object_list(shared, src=0)
        loaded = shared[0]
        if isinstance(loaded, CheckpointError):
            raise CheckpointError(str(loaded))
    if run.resume == "always" and loaded is None:
        raise FileNotFoundError(f"train.resume = 'always' but there is no checkpoint in {output_dir}/checkpoints")
    existing = find_checkpoint(output_dir) if context.is_main and run.resume == "never" else None
    if existing is not None:
        raise FileExistsError(
            f"{output_dir} already holds checkpoints ({existing}) and train.resume = 'never': choose "
            f"another output_dir or resume"
        )
    fingerprint = train.fingerprint()
    history: list[dict] = []
    initial: dict = {}
    step, train_time, resumed_from = 0, 0.0, None
    best: BestValidation | None = None
    resumes: list[int] = []
    checkpoint_path = None
    if loaded is not None:
        checkpoint_path, saved = loaded
        check_resume(saved, config.to_dict(), model, len(train), fingerprint, checkpoint_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, train_time, resumed_from = int(saved["step"]), float(saved["train_time_s"]), int(saved["step"])
        order = DataOrder(len(train), run.seed, **saved["order"])
        history, initial = list(saved["history"]), dict(saved["initial"])
        best = BestValidation.from_state(saved.get("best"))
        resumes = [*saved.get("resumes", []), step]
        set_rng_state(saved["rng"])
    else:
        seed_everything(run.seed)
        broadcast_module(model, context)
        model.eval()
        if validation is not None:
            initial["val"] = evaluate_relaxation(model, validation, **evaluate)
            best = BestValidation.consider(best, 0, initial["val"], model)
        if run.eval_train:
            initial["train"] = evaluate_relaxation(model, train, **evaluate)
        history.append(make_row(0, 0, None, initial.get("val")))

    description = (
        f"{relax_config.mode}"
        + (f" K={relax_config.window}" if relax_config.mode == "hybrid" else "")
        + (f" T={relax_config.bptt_steps}" if relax_config.mode == "bptt" else "")
        + f", batch {run.batch_size} structures over {context.world_size} process"
        + ("es" if context.world_size > 1 else "")
        + f", {len(train)} training pairs, {str(dtype).removeprefix('torch.')}, {describe(device)}"
        + f", {describe_backend(model, device)}"
    )
    files = Outputs(output_dir, context) if output_dir else None
    if files is not None:
        files.start(config, history, resumed=resumed_from is not None)

    signature = model_signature(model)

    def save_checkpoint(at_step, order_state, rng_state):
        if files is None:
            return None
        return files.checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "step": at_step,
                "train_time_s": train_time,
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "order": order_state,
                "rng": rng_state,
                "history": history,
                "initial": initial,
                "config": config.to_dict(),
                "world_size": context.world_size,
                "n_train": len(train),
                "data_fingerprint": fingerprint,
                "model_signature": signature,
                "best": best.state() if best is not None else None,
                "resumes": resumes,
            },
            at_step,
            run.keep_checkpoints,
        )

    bar = tqdm(
        total=run.steps,
        initial=min(step, run.steps),
        disable=not (run.progress and context.is_main),
        desc=f"fit_relaxation ({relax_config.mode})",
        unit="step",
    )
    last_checkpoint = checkpoint_path
    last_validation = None
    interrupted = False
    with StopRequest() as stop:
        while step < run.steps:
            model.train()
            started = time.perf_counter()
            global_indices = order.next(run.batch_size)
            local = shard(global_indices, context.rank, context.world_size)
            optimizer.zero_grad(set_to_none=True)
            memory.reset()
            # n, ΔQ, basin, fmax, converged, steps, iterations, skipped, saddles, inexact, solve_failed, direct
            sums = torch.zeros(12, dtype=torch.float64)
            fixed_point_error = -1.0  # "none": a NaN would not survive the all-reduce max
            if local:
                batch, reference = train.batch(local, dtype=dtype, device=device)
                try:
                    result = relax(batch)
                    dq = delta_q(result.positions, reference, batch)
                    objective = dq
                    if relax_config.guidance:  # the window guidance loss on X_K (hybrid; checked by the config)
                        objective = dq + relax_config.guidance * delta_q(result.window[-1], reference, batch)
                    # The sum over this rank's structures over the *global* batch size: summed over ranks, the
                    # gradient is the one of the mean over the global batch (distributed.py).
                    (objective.sum() / len(global_indices)).backward()
                except STEP_FAILURES as error:
                    raise step_failure(error, f"training step {step + 1}", step + 1, local, train) from error
                iterations = result.iterations
                trust = trust_counts(result)
                if result.fixed_point_error is not None:
                    fixed_point_error = float(
                        torch.nan_to_num(result.fixed_point_error, nan=0.0, posinf=math.inf).max()
                    )
                verdict = judge(result.positions, reference, batch)
                sums += torch.stack(
                    [
                        torch.tensor(float(len(local)), dtype=torch.float64),
                        dq.detach().double().sum().cpu(),
                        verdict.correct.double().sum(),
                        result.fmax.double().sum().cpu(),
                        result.converged.double().sum().cpu(),
                        result.steps.double().sum().cpu(),
                        iterations.double().sum().cpu() if iterations is not None else torch.tensor(math.nan),
                        *trust,
                        verdict.direct_correct.double().sum(),
                    ]
                )
            all_reduce_gradients(params, context)
            grad_norm = gradient_norm(params)
            # Identical on every rank (the gradients were summed), so every rank skips or steps alike.
            nonfinite = not math.isfinite(grad_norm)
            if nonfinite:
                for p in params:
                    p.grad = None
            elif optim_config.grad_clip:  # None or 0: no clipping
                torch.nn.utils.clip_grad_norm_(params, optim_config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            if not nonfinite:
                optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - started
            peaks = torch.tensor([memory.read_mib(), float(stop.requested), fixed_point_error], dtype=torch.float64)
            sums = all_reduce_sum(sums, context)
            peaks = all_reduce_max(peaks, context)
            train_time += elapsed
            n = float(sums[0])
            row = make_row(
                step,
                order.epoch,
                lr,
                None,
                loss=mean_or_none(float(sums[1]), n),
                train_basin_rate=mean_or_none(float(sums[2]), n),
                train_basin_rate_direct=mean_or_none(float(sums[11]), n),
                train_fmax=mean_or_none(float(sums[3]), n),
                train_converged=mean_or_none(float(sums[4]), n),
                relax_steps=mean_or_none(float(sums[5]), n),
                solver_iterations=None if math.isnan(float(sums[6])) else mean_or_none(float(sums[6]), n),
                skipped=int(sums[7]),
                saddles=int(sums[8]),
                inexact=int(sums[9]),
                solve_failed=int(sums[10]),
                fixed_point_error=None if float(peaks[2]) < 0 else float(peaks[2]),
                nonfinite_gradient=int(nonfinite),
                grad_norm=grad_norm,
                peak_memory_mib=float(peaks[0]),
                step_time_s=elapsed,
                wall_time_s=train_time,
            )
            if validation is not None and ((run.eval_every and step % run.eval_every == 0) or step == run.steps):
                model.eval()
                last_validation = (step, evaluate_relaxation(model, validation, step=step, **evaluate))
                best = BestValidation.consider(best, step, last_validation[1], model)
                evaluated = make_row(step, order.epoch, lr, last_validation[1])
                row.update({k: v for k, v in evaluated.items() if k.startswith("val_")})
            history.append(row)
            if files is not None:
                files.append(row)
            due = (run.checkpoint_every and step % run.checkpoint_every == 0) or step == run.steps
            if due or bool(peaks[1]):
                last_checkpoint = save_checkpoint(step, order.state(), rng_state()) or last_checkpoint
            postfix = {"ΔQ": f"{row['loss']:.3f}", "basin": f"{row['train_basin_rate']:.2f}"}
            if row["skipped"] or nonfinite:
                postfix["skipped"] = row["skipped"] + (len(global_indices) if nonfinite else 0)
            if row.get("val_delta_q") is not None:
                postfix["val ΔQ"] = f"{row['val_delta_q']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if callback is not None:
                callback(step, row)
            if bool(peaks[1]):
                interrupted = True
                break
    bar.close()

    model.eval()
    final: dict = {}
    if not interrupted:
        if validation is not None:
            reuse = last_validation is not None and last_validation[0] == step
            final["val"] = (
                last_validation[1] if reuse else evaluate_relaxation(model, validation, step=step, **evaluate)
            )
        if run.eval_train:
            final["train"] = evaluate_relaxation(model, train, step=step, **evaluate)
    steps_with_memory = [r["peak_memory_mib"] for r in history if r.get("peak_memory_mib") is not None]
    steps_with_memory = [m for m in steps_with_memory if not math.isnan(m)]
    result = RelaxationFitResult(
        steps=step,
        history=history,
        initial=initial,
        final=final,
        train_time_s=train_time,
        peak_memory_mib=max(steps_with_memory) if steps_with_memory else math.nan,
        resumed_from=resumed_from,
        resumes=resumes,
        best_step=best.step if best is not None else None,
        interrupted=interrupted,
        output_dir=output_dir,
        checkpoint=last_checkpoint,
        description=description,
    )
    if files is not None and not interrupted:
        files.finish(model, result, run.plot, best=best)
    if interrupted:
        raise KeyboardInterrupt(
            f"stopped by a signal after step {step}; checkpoint {last_checkpoint}: run again to resume"
        )
    return result
