"""The configuration of a training run through relaxations (``python -m gdeq_ext.train CONFIG``).

A config file has up to six sections; every key is optional except ``data.train`` for the command::

    [data]      train, val                                       extxyz files of relaxation pairs
    [model]     backbone, init or the MLIP's sizes, dtype         the potential to train
    [pretrain]  rattled, thermal, epochs, lr, ...                 optional force matching to Stillinger-Weber first
    [relax]     mode (bptt / implicit / hybrid), window K, ...    how each structure is relaxed and differentiated
    [optim]     optimizer, lr, schedule, ...                      the parameter update
    [train]     steps, batch_size, checkpoint_every, ...          the loop, checkpoints, outputs

TOML is read with the standard library (``tomllib``, Python >= 3.11; ``tomli`` on 3.10), YAML with
``pyyaml`` when it is installed. An unknown section or key, a value of the wrong type, or a value outside
its choices raises :class:`ConfigError` naming the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

from gdeq_ext.gradients.implicit_function import ON_INVALID, SOLVERS
from gdeq_ext.relax.factory import MODES
from gdeq_ext.relax.options import BPTT_STEPS, DEFAULT_ALPHA, HYBRID_WINDOW

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RelaxConfig",
    "TrainConfig",
    "load_config",
    "parse_override",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine", "step", "exponential")
DTYPES = ("float32", "float64")
RESUME = ("auto", "always", "never")
TEACHERS = ("none", "sw")  # train.teacher: who labelled the data (the correct-basin judge quenches with it)
BACKBONES = ("mlip", "mace", "transformer")  # model.backbone: docs/backbones.md


class ConfigError(ValueError):
    """A configuration key or value is not valid; the message names it and lists what is valid."""


@dataclass
class DataConfig:
    """Relaxation pairs (extxyz, see :mod:`gdeq_ext.data.relaxation_pairs`); relative paths are relative to
    the config file.

    Attributes:
        train: training pairs (required by the command).
        val: validation pairs, evaluated every ``train.eval_every`` steps (default none).
    """

    train: str | None = None
    val: str | None = None


@dataclass
class ModelConfig:
    """The potential: a saved one (``init``, written by the backbone's ``save``) or a fresh one.

    Attributes:
        backbone: "mlip" (default: :class:`~gdeq_ext.MLIP`), "mace" (a small ScaleShiftMACE through
            :class:`~gdeq_ext.potentials.MACEPotential`, ``build_mace``'s sizes; needs ``pip install "gdeq_ext[mace]"``)
            or "transformer" (:class:`~gdeq_ext.Transformer` at its default sizes). docs/backbones.md.
        init: path of a saved potential of that backbone to start from (default none: a fresh one).
        features, channels, n_radial, n_layers, hidden: MLIP sizes (defaults 16, 8, 8, 2, 32: small, for CPUs);
            ignored by the other backbones.
        cutoff: Å (default 4.0; MACE's r_max, the Transformer's attention cutoff). seed: initial weights
            (default 0). backend: "fused" or "reference" (MLIP only).
        dtype: "float64" (default) or "float32": parameters and structures.
    """

    backbone: str = "mlip"
    init: str | None = None
    features: int = 16
    channels: int = 8
    n_radial: int = 8
    n_layers: int = 2
    hidden: int = 32
    cutoff: float = 4.0
    seed: int = 0
    backend: str = "fused"
    dtype: str = "float64"


@dataclass
class PretrainConfig:
    """Optional force matching to Stillinger-Weber before training through relaxations (the base potential).

    Only bulk diamond silicon (rattled and thermal cells, :func:`gdeq_ext.train.silicon_dataset`): the base
    is deliberately not fitted to the defect basins it is later asked to find. Skipped when resuming.

    Attributes:
        rattled, thermal: number of rattled / MD-snapshot cells (default 0 and 0: no pretraining).
        repeat: diamond supercell (default 2: 64-atom cells).
        epochs, lr, batch_size: :func:`gdeq_ext.train.fit_forces` (defaults 60, 1e-2, 8).
        seed: data and split (default 0).
    """

    rattled: int = 0
    thermal: int = 0
    repeat: int = 2
    epochs: int = 60
    lr: float = 1e-2
    batch_size: int = 8
    seed: int = 0


@dataclass
class RelaxConfig:
    """How every training structure is relaxed and differentiated (``gdeq_ext.relax``).

    Attributes:
        mode: "hybrid" (default: K differentiated steps, FIRE, implicit gradient), "implicit" or "bptt".
        window: K, differentiated window steps of the hybrid mode (default 10).
        bptt_steps: T, unrolled steps of the bptt mode (default 100).
        handoff: β of the hybrid hand-off (default 1.0).
        guidance: weight w of the window guidance loss, hybrid only: the loss of a structure becomes
            ΔQ(X*) + w ΔQ(X_K) (default 0: none).
        fmax: eV/Å, FIRE tolerance (implicit, hybrid, and every evaluation; default 0.01).
        max_relax_steps: FIRE steps per structure at most (default 1000).
        alpha: Å²/eV, step of the differentiated map (default 0.03); maxstep: Å, per-atom cap (default 0.2).
            (The defaults of window, bptt_steps and alpha are :mod:`gdeq_ext.relax.options`', with the reasons.)
        checkpoint_window: recompute window steps in backward (the same gradients, bit for bit for a
            deterministic potential, less memory; default: the mode's own default, on for hybrid and off for bptt).
        solver: Hessian solve, "cg" (default), "minres" or "fixed_point"; rtol: its relative tolerance
            (default 1e-6); max_iter: Hessian-vector products per structure at most (default 30 n_atoms + 10);
            damping: eV/Å² (default 0); atol: absolute tolerance of the solve (default 0); project_rotations:
            also project rigid rotations out of non-periodic structures (default true).
        skin: Å, Verlet-list skin of the relaxations (default 0.5; 0 rebuilds the list every step).
        on_invalid: what a structure without a trustworthy implicit gradient (unconverged relaxation, inexact fixed
            point, saddle, failed backward solve) does: "skip" (default: its gradient contribution is zeroed and
            counted in metrics.csv), "raise" or "warn" (``gdeq_ext.relax.validity``).
        newton_steps: Newton polish steps of the relaxed structure before the implicit backward (default 24; 0 off).
    """

    mode: str = "hybrid"
    window: int = HYBRID_WINDOW
    bptt_steps: int = BPTT_STEPS
    handoff: float = 1.0
    guidance: float = 0.0
    fmax: float = 0.01
    max_relax_steps: int = 1000
    alpha: float = DEFAULT_ALPHA
    maxstep: float = 0.2
    checkpoint_window: bool | None = None
    solver: str = "cg"
    rtol: float = 1e-6
    max_iter: int | None = None
    damping: float = 0.0
    atol: float = 0.0
    project_rotations: bool = True
    skin: float = 0.5
    on_invalid: str = "skip"
    newton_steps: int = 24


@dataclass
class OptimConfig:
    """The parameter update.

    Attributes:
        optimizer: "adam" (default), "adamw" or "sgd"; lr: learning rate (default 1e-3);
            weight_decay (default 0); momentum: sgd only (default 0.9).
        schedule: learning rate over the run: "constant" (default), "linear" or "cosine" (to ``min_lr`` at
            ``train.steps``), "step" (times ``gamma`` every ``decay_steps``), "exponential" (times ``gamma``
            every step); warmup_steps: linear warm-up first (default 0).
        grad_clip: clip the global gradient norm to this (default 1.0, as every benchmark; 0 turns clipping off).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_steps: int = 100
    gamma: float = 0.5
    grad_clip: float | None = 1.0


@dataclass
class TrainConfig:
    """The loop, its checkpoints and outputs.

    Attributes:
        steps: optimizer steps in total (default 100); a resumed run continues to this number.
        batch_size: structures per step over all processes (the global batch; default 4).
        seed: data order and RNG seeds (default 0).
        checkpoint_every: write a checkpoint every this many steps (default 10; 0: only at the end).
        keep_checkpoints: most recent checkpoints kept (default 3).
        eval_every: evaluate the validation pairs every this many steps (default 10; 0: only at the end).
        teacher: "none" (default) or "sw": the potential that labelled the data, used by the correct-basin judge
            (:class:`gdeq_ext.datasets.BasinJudge`) to quench each relaxed structure before comparing it.
        basin_threshold: Å, largest per-atom deviation of the teacher-quenched structure from the reference below
            which it is in the correct basin (default 0.1; after pairing atoms, net translation removed).
        direct_threshold: Å, the same for the relaxed structure itself (default 0.4): the verdict without a
            teacher, and reported beside it with one.
        eval_train: also evaluate the training pairs before and after training (default true).
        output_dir: checkpoints, metrics.csv, learning_curves.png, model.pt, summary.md (default none: write
            nothing; the command defaults to ``runs/<config file name>``).
        resume: "auto" (default: continue from the latest checkpoint in output_dir if there is one),
            "always" (fail if there is none) or "never" (fail if there is one).
        progress: tqdm progress bar (default true). plot: write the PNG (default true; needs matplotlib).
        device: "auto" (default: CUDA if available, one GPU per process), "cpu", "cuda".
        threads: torch CPU threads per process (default: torch's choice).
    """

    steps: int = 100
    batch_size: int = 4
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    eval_every: int = 10
    teacher: str = "none"
    basin_threshold: float = 0.1
    direct_threshold: float = 0.4
    eval_train: bool = True
    output_dir: str | None = None
    resume: str = "auto"
    progress: bool = True
    plot: bool = True
    device: str = "auto"
    threads: int | None = None


_CHOICES = {
    ("relax", "mode"): MODES,
    ("relax", "solver"): SOLVERS,
    ("relax", "on_invalid"): ON_INVALID,
    ("optim", "optimizer"): OPTIMIZERS,
    ("optim", "schedule"): SCHEDULES,
    ("model", "dtype"): DTYPES,
    ("model", "backend"): ("fused", "reference"),
    ("model", "backbone"): BACKBONES,
    ("train", "resume"): RESUME,
    ("train", "teacher"): TEACHERS,
    ("train", "device"): ("auto", "cpu", "cuda"),
}
_POSITIVE = {
    ("train", "steps"),
    ("train", "batch_size"),
    ("train", "keep_checkpoints"),
    ("train", "basin_threshold"),
    ("train", "direct_threshold"),
    ("relax", "max_relax_steps"),
    ("relax", "fmax"),
    ("relax", "alpha"),
    ("relax", "maxstep"),
    ("relax", "rtol"),
    ("optim", "lr"),
    ("model", "cutoff"),
}
_NON_NEGATIVE = {
    ("relax", "newton_steps"),
    ("relax", "guidance"),
    ("relax", "window"),
    ("relax", "bptt_steps"),
    ("relax", "damping"),
    ("relax", "atol"),
    ("relax", "skin"),
    ("train", "checkpoint_every"),
    ("train", "eval_every"),
    ("optim", "warmup_steps"),
    ("optim", "weight_decay"),
    ("optim", "min_lr"),
    ("optim", "grad_clip"),
    ("pretrain", "rattled"),
    ("pretrain", "thermal"),
}


@dataclass
class Config:
    """All sections (each a dataclass with documented defaults). Build with :meth:`from_dict`,
    :func:`load_config` or directly; :meth:`to_dict` gives the plain nested dictionary back."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    relax: RelaxConfig = field(default_factory=RelaxConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("data", "model", "pretrain", "relax", "optim", "train")

    @classmethod
    def from_dict(cls, values: dict | None, source: str | None = None) -> Config:
        """A config from nested dictionaries ``{section: {key: value}}``; every key and value is checked."""
        config = cls()
        values = {} if values is None else values
        where = f"{source}: " if source else ""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}a config must be a mapping of sections, got {type(values).__name__}")
        for section, entries in values.items():
            if section not in cls.SECTIONS:
                raise ConfigError(f"{where}unknown section {section!r}{_suggest(section, cls.SECTIONS)}")
            if entries is None:
                continue
            if not isinstance(entries, dict):
                raise ConfigError(f"{where}section [{section}] must be a table of keys, got {entries!r}")
            for key, value in entries.items():
                config.set(section, key, value, source=source)
        config.validate(source)
        return config

    def set(self, section: str, key: str, value, source: str | None = None) -> None:
        """Set ``section.key`` to ``value`` after checking that the key exists and the value's type fits."""
        where = f"{source}: " if source else ""
        if section not in self.SECTIONS:
            raise ConfigError(f"{where}unknown section {section!r}{_suggest(section, self.SECTIONS)}")
        part = getattr(self, section)
        hints = typing.get_type_hints(type(part))
        if key not in hints:
            raise ConfigError(f"{where}unknown key {section}.{key}{_suggest(key, tuple(hints), section)}")
        setattr(part, key, _coerce(value, hints[key], f"{where}{section}.{key}"))

    def validate(self, source: str | None = None) -> None:
        """Check choices and ranges; raise :class:`ConfigError` naming the key and the value."""
        where = f"{source}: " if source else ""
        for (section, key), choices in _CHOICES.items():
            value = getattr(getattr(self, section), key)
            if value not in choices:
                raise ConfigError(f"{where}{section}.{key} = {value!r} is not one of {list(choices)}")
        for (section, key), strict in [(k, True) for k in _POSITIVE] + [(k, False) for k in _NON_NEGATIVE]:
            value = getattr(getattr(self, section), key)
            # "not value > 0": NaN fails too (NaN <= 0 is False, so a "value <= 0" check would let it through).
            if value is not None and (not (value > 0 if strict else value >= 0) or value == float("inf")):
                raise ConfigError(
                    f"{where}{section}.{key} = {value!r} must be {'> 0' if strict else '>= 0'} (and finite)"
                )
        if self.relax.guidance and (self.relax.mode != "hybrid" or self.relax.window == 0):
            raise ConfigError(
                f"{where}relax.guidance = {self.relax.guidance!r} needs a window: mode 'hybrid' with window > 0 "
                f"(got mode {self.relax.mode!r}, window {self.relax.window})"
            )
        if self.relax.mode == "bptt" and self.relax.bptt_steps == 0:
            raise ConfigError(f"{where}relax.bptt_steps = 0 gives BPTT nothing to differentiate")
        if self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"{where}optim.min_lr = {self.optim.min_lr} is above optim.lr = {self.optim.lr}")

    def to_dict(self) -> dict:
        return {section: dataclasses.asdict(getattr(self, section)) for section in self.SECTIONS}

    def copy(self) -> Config:
        return Config.from_dict(self.to_dict())

    def update(self, overrides: dict, source: str | None = None) -> Config:
        """A copy with flat or dotted overrides: ``{"lr": 1e-3}``, ``{"optim.lr": 1e-3}``.

        A flat key is looked up in the [relax], [optim] and [train] sections (their key names are unique);
        other sections need the dotted form.
        """
        config = self.copy()
        for name, value in overrides.items():
            section, key = _locate(name, source)
            config.set(section, key, value, source=source)
        config.validate(source)
        return config


_FLAT_SECTIONS = ("relax", "optim", "train")


def _locate(name: str, source: str | None) -> tuple[str, str]:
    where = f"{source}: " if source else ""
    if "." in name:
        section, key = name.split(".", 1)
        return section, key
    owners = [s for s in _FLAT_SECTIONS if name in typing.get_type_hints(type(getattr(Config(), s)))]
    if len(owners) == 1:
        return owners[0], name
    valid = [k for s in _FLAT_SECTIONS for k in typing.get_type_hints(type(getattr(Config(), s)))]
    raise ConfigError(f"{where}unknown setting {name!r}{_suggest(name, tuple(valid))} (or use section.key)")


def _suggest(name: str, valid: tuple[str, ...], section: str | None = None) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    label = f"[{section}] keys" if section else "valid"
    return f"{hint} ({label}: {', '.join(valid)})"


def _coerce(value, hint, name: str):
    """Check ``value`` against a dataclass type hint (int, float, bool, str, X | None); ints become floats."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))
    raise ConfigError(f"{name} must be {kind}{' or null' if optional else ''}, got {value!r}")


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading TOML on Python < 3.11 needs tomli (pip install tomli)") from None
    with open(path, "rb") as handle:
        try:
            return tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None


def _read_yaml(path: str) -> dict:
    try:
        import yaml
    except ModuleNotFoundError:
        raise ConfigError(
            f"{path}: reading YAML needs pyyaml (pip install pyyaml); TOML configs work without it"
        ) from None
    with open(path) as handle:
        try:
            return yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> Config:
    """Read a ``.toml``, ``.yaml`` or ``.yml`` config; relative data/model paths become relative to its folder.

    ``overrides``: ``{"section.key": value}`` (or flat keys of [relax], [optim], [train]) applied on top.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".toml":
        values = _read_toml(path)
    elif suffix in (".yaml", ".yml"):
        values = _read_yaml(path)
    else:
        raise ConfigError(f"{path}: unknown config format {suffix!r} (use .toml, .yaml or .yml)")
    config = Config.from_dict(values, source=path)
    if overrides:
        config = config.update(overrides, source="override")
    folder = os.path.dirname(os.path.abspath(path))
    for section, key in (("data", "train"), ("data", "val"), ("model", "init")):
        value = getattr(getattr(config, section), key)
        if value is not None and not os.path.isabs(value):
            setattr(getattr(config, section), key, os.path.normpath(os.path.join(folder, value)))
    return config


def parse_override(text: str) -> tuple[str, object]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``; the value is read as TOML (strings may be bare)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    name, raw = (part.strip() for part in text.split("=", 1))
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as hybrid or runs/x
    if raw.lower() in ("none", "null"):
        value = None
    return name, value
