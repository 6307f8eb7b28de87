"""Checkpoints of relaxation training: durable writes, the newest one that loads, and what a resume must match.

Files are ``output_dir/checkpoints/step_<8 digits>.pt``, plain ``torch.save`` dictionaries loaded with
``weights_only=True`` (:data:`CHECKPOINT_FORMAT`). Written to a temporary file, flushed and fsynced, renamed
over the final name, and the folder fsynced: a crash or power loss leaves either the previous checkpoint or
the new one, never a truncated "latest". A temporary left by a killed writer (``step_*.pt.tmp<pid>`` whose
process is gone) is deleted when the next run opens the folder.

Resuming reads the newest checkpoint that loads; an unreadable newer one (truncated, empty, foreign) is
skipped with a :class:`CheckpointWarning` naming it and the reason, and renamed ``*.pt.unreadable``. A resume is refused
(:class:`~gdeq_ext.train.config.ConfigError`) when anything that changes what the remaining steps compute
differs from the checkpoint: the locked config keys (:data:`RESUME_LOCKED`), the model's hyperparameters,
parameter shapes or dtype, or the training data (number of pairs and their fingerprint,
:meth:`gdeq_ext.data.RelaxationPairs.fingerprint`).
"""

from __future__ import annotations

import glob
import os
import re
import warnings

import torch

from gdeq_ext.train.config import Config, ConfigError

__all__ = [
    "CHECKPOINT_FORMAT",
    "RESUME_LOCKED",
    "CheckpointError",
    "CheckpointWarning",
    "check_resume",
    "checkpoint_dir",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "model_signature",
    "remove_stale_temporaries",
    "write_atomically",
]

CHECKPOINT_FORMAT = "gdeq_ext.relaxation_checkpoint/1"

# Config keys that must not change when a run is resumed: they change what the remaining steps compute.
# ("train.steps" may grow: that extends a run. "model.*" is checked on the model itself, model_signature.)
RESUME_LOCKED = (
    "relax",
    "optim",
    "train.batch_size",
    "train.seed",
    "train.basin_threshold",
    "train.direct_threshold",
    "train.teacher",
)

# Keys every checkpoint written by fit_relaxation holds; a dictionary without them is not resumable.
REQUIRED_KEYS = (
    "format",
    "step",
    "train_time_s",
    "model",
    "optimizer",
    "scheduler",
    "order",
    "rng",
    "history",
    "initial",
    "config",
    "n_train",
)

# Hyperparameters that do not change the mathematics (the edge-op implementation agrees to round-off).
_FREE_HYPERPARAMETERS = ("backend",)

# An unreadable checkpoint skipped by a resume is renamed with this suffix.
UNREADABLE_SUFFIX = ".unreadable"

_STEP_FILE = re.compile(r"step_(\d+)\.pt$")
_TEMPORARY = re.compile(r"step_\d+\.pt\.tmp(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or no checkpoint in a folder loads; the message names the file(s)."""


class CheckpointWarning(RuntimeWarning):
    """A newer checkpoint was unreadable and skipped; the message names it, the reason and the one used."""


def checkpoint_dir(output_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(output_dir), "checkpoints")


def list_checkpoints(output_dir: str | os.PathLike | None) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` of ``output_dir/checkpoints/step_*.pt``, newest (highest step) first."""
    if output_dir is None:
        return []
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir(output_dir), "step_*.pt")):
        match = _STEP_FILE.search(path)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_checkpoint(output_dir: str | os.PathLike | None) -> str | None:
    """The latest checkpoint file (highest step) in ``output_dir/checkpoints``, or None; not opened."""
    found = list_checkpoints(output_dir)
    return found[0][1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`~gdeq_ext.train.fit_relaxation` (``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: the file is empty, truncated, not a torch file, not a gdeq_ext relaxation-training
            checkpoint, or lacks a key a resume needs; the message names the file and the reason.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error})") from error
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors, ...
        raise CheckpointError(
            f"{path}: unreadable ({size} bytes; {type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a gdeq_ext relaxation-training checkpoint (format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    return data


def load_latest_checkpoint(output_dir: str | os.PathLike | None, map_location="cpu") -> tuple[str, dict] | None:
    """``(path, data)`` of the newest checkpoint in ``output_dir`` that loads, or None when there is none.

    Unreadable newer checkpoints are skipped with one :class:`CheckpointWarning` each (file and reason) and
    renamed ``step_<n>.pt.unreadable`` (kept, but no longer a checkpoint of the run).

    Raises:
        CheckpointError: checkpoints exist but none loads (each named with its reason); starting afresh
            would silently discard the run, so this is the user's decision.
    """
    found = list_checkpoints(output_dir)
    failures, unreadable = [], []
    for _, path in found:
        try:
            data = load_checkpoint(path, map_location)
        except CheckpointError as error:
            failures.append(str(error))
            unreadable.append(path)
            continue
        for failure, bad in zip(failures, unreadable, strict=True):
            # Renamed, not deleted: kept for inspection, and out of the step_*.pt rotation, which would
            # otherwise count it as the newest checkpoint and delete the good ones written after it.
            os.replace(bad, bad + UNREADABLE_SUFFIX)
            warnings.warn(
                f"skipped checkpoint {failure}; renamed to {os.path.basename(bad) + UNREADABLE_SUFFIX}; "
                f"resuming from {path}",
                CheckpointWarning,
                stacklevel=2,
            )
        return path, data
    if failures:
        raise CheckpointError(
            f"none of the {len(failures)} checkpoints in {checkpoint_dir(output_dir)} loads: "
            + "; ".join(failures)
            + ". Move them away to start afresh, or choose another output_dir"
        )
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Delete ``step_*.pt.tmp<pid>`` files in ``output_dir/checkpoints`` whose writer process is gone.

    A live writer's temporary (another process on this machine, this one) is kept. Returns the deleted paths.
    """
    removed = []
    for path in glob.glob(os.path.join(checkpoint_dir(output_dir), "step_*.pt.tmp*")):
        match = _TEMPORARY.search(path)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _process_alive(pid):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:  # removed concurrently
            pass
    return removed


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms / file systems cannot open a folder: nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(data: dict, path: str | os.PathLike) -> None:
    """``torch.save(data)`` to ``path`` so that a crash at any moment leaves the old file or the complete new one.

    Temporary in the same folder, flushed and fsynced, renamed over ``path``, the folder fsynced (the rename
    itself must survive a power loss). The temporary is removed if the write fails.
    """
    path = os.fspath(path)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def model_signature(model: torch.nn.Module) -> dict:
    """What a resumed model must match: class, hyperparameters (if it has them), dtype and parameter shapes."""
    state = model.state_dict()
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    hyperparameters = None
    if callable(getattr(model, "hyperparameters", None)):
        try:
            hyperparameters = {k: v for k, v in model.hyperparameters().items() if k not in _FREE_HYPERPARAMETERS}
        except NotImplementedError:
            hyperparameters = None
    return {
        "class": type(model).__name__,
        "hyperparameters": hyperparameters,
        "dtype": str(floating[0]).removeprefix("torch.") if floating else None,
        "shapes": {k: list(v.shape) for k, v in state.items()},
    }


def _differences(saved: dict, current: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{key} was {saved.get(key, '(absent)')!r} and is now {current.get(key, '(absent)')!r}")
    return out


def check_resume(
    saved: dict, config: dict, model: torch.nn.Module, n_train: int, fingerprint: str | None, path: str
) -> None:
    """Raise ConfigError naming the first thing that differs between checkpoint ``saved`` and this run.

    Args:
        saved: a checkpoint (:func:`load_checkpoint`).
        config: this run's ``Config.to_dict()``.
        model: this run's model, before the checkpoint's weights are loaded into it.
        n_train, fingerprint: this run's training pairs (count and :meth:`RelaxationPairs.fingerprint`).
        path: the checkpoint's file, for the message.
    """
    advice = "restore it, or start a new run (another output_dir, or train.resume = 'never' in a fresh directory)"
    # A key the checkpoint's version of the config did not have yet held its default then: compare with that,
    # so adding a setting does not lock every earlier run out of resuming.
    defaults = Config().to_dict()
    for locked in RESUME_LOCKED:
        section, _, key = locked.partition(".")
        old_section, new_section = saved["config"].get(section, {}), config.get(section, {})
        keys = [key] if key else sorted(set(old_section) | set(new_section))
        for name in keys:
            old = old_section.get(name, defaults.get(section, {}).get(name))
            new = new_section.get(name)
            if old != new:
                raise ConfigError(
                    f"cannot resume from {path}: {section}.{name} was {old!r} and is now {new!r}; {advice}"
                )
    if int(saved["n_train"]) != n_train:
        raise ConfigError(
            f"cannot resume from {path}: it was trained on {saved['n_train']} pairs, the training set now has "
            f"{n_train}; {advice}"
        )
    old_fingerprint = saved.get("data_fingerprint")
    if old_fingerprint is not None and fingerprint is not None and old_fingerprint != fingerprint:
        raise ConfigError(
            f"cannot resume from {path}: the training pairs changed (same count, {n_train}, but fingerprint "
            f"{old_fingerprint[:12]} then and {fingerprint[:12]} now: other structures, positions, references or "
            f"order); {advice}"
        )
    old_model = saved.get("model_signature")
    if old_model is not None:
        new_model = model_signature(model)
        problems = []
        if old_model["class"] != new_model["class"]:
            problems.append(f"the model was a {old_model['class']} and is now a {new_model['class']}")
        if old_model["hyperparameters"] is not None and new_model["hyperparameters"] is not None:
            problems += [f"model {d}" for d in _differences(old_model["hyperparameters"], new_model["hyperparameters"])]
        if old_model["dtype"] != new_model["dtype"]:
            problems.append(f"model dtype was {old_model['dtype']} and is now {new_model['dtype']}")
        if not problems:
            problems += [f"parameter {d}" for d in _differences(old_model["shapes"], new_model["shapes"])]
        if problems:
            raise ConfigError(f"cannot resume from {path}: " + "; ".join(problems[:4]) + f"; {advice}")
