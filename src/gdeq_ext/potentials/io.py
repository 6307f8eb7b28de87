"""One file per potential: class name, hyperparameters, dtype and weights, read back with ``Class.load``."""

from __future__ import annotations

import os

import torch

__all__ = ["FORMAT", "PotentialFileError", "SaveLoadMixin"]

FORMAT = "gdeq_ext.potential/1"

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PotentialFileError(ValueError):
    """A saved potential cannot be loaded; the message starts with the file's path and says why."""


class SaveLoadMixin:
    """``save(path)`` / ``Class.load(path)`` for a module rebuilt as ``Class(**hyperparameters())``.

    The file is a plain ``torch.save`` dictionary (loadable with ``weights_only=True``): ``format``,
    ``class``, ``hyperparameters`` (JSON-like), ``dtype`` (e.g. ``"float64"``) and ``state_dict``.
    """

    def hyperparameters(self) -> dict:
        """Keyword arguments that rebuild this potential (before its weights are loaded)."""
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        tensors = [t for t in self.state_dict().values() if t.is_floating_point()]
        return tensors[0].dtype if tensors else torch.float64

    def save(self, path: str | os.PathLike) -> None:
        """Write hyperparameters and weights to ``path`` (one file)."""
        torch.save(
            {
                "format": FORMAT,
                "class": type(self).__name__,
                "hyperparameters": self.hyperparameters(),
                "dtype": str(self._dtype()).removeprefix("torch."),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            },
            path,
        )

    @classmethod
    def check_hyperparameters(cls, hyperparameters: dict) -> None:
        """Raise ValueError naming a stored hyperparameter outside the range this class accepts from a file.

        Called by :meth:`load` before anything is built, so that a corrupted or hostile file cannot make the
        constructor allocate gigabytes. The default accepts anything; classes with sizes override it.
        """

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Rebuild a potential saved by :meth:`save`, on ``map_location`` with its saved dtype.

        Raises:
            FileNotFoundError: no such file.
            PotentialFileError: the file is empty, unreadable, not a gdeq_ext potential, of another class, holds
                hyperparameters outside :meth:`check_hyperparameters`' bounds, or weights that do not fit them
                or are not finite. Every message starts with the file's path.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such potential file")
        size = os.path.getsize(path)
        if size == 0:
            raise PotentialFileError(f"{path}: empty file (0 bytes)")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # RuntimeError, EOFError, UnpicklingError, zipfile errors, ...
            raise PotentialFileError(
                f"{path}: unreadable ({size} bytes; {type(error).__name__}: {str(error).splitlines()[0][:200]})"
            ) from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PotentialFileError(f"{path}: not a gdeq_ext potential file (expected format {FORMAT!r})")
        if data.get("class") != cls.__name__:
            raise PotentialFileError(f"{path} holds a {data.get('class')}, not a {cls.__name__}")
        hyperparameters, state, dtype = data.get("hyperparameters"), data.get("state_dict"), data.get("dtype")
        if not isinstance(hyperparameters, dict) or not all(isinstance(k, str) for k in hyperparameters):
            raise PotentialFileError(f"{path}: 'hyperparameters' must be a dictionary with string keys")
        if dtype not in _DTYPES:
            raise PotentialFileError(f"{path}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PotentialFileError(f"{path}: 'state_dict' must be a dictionary of tensors")
        try:
            cls.check_hyperparameters(hyperparameters)
        except (TypeError, ValueError) as error:
            raise PotentialFileError(f"{path}: {error}") from error
        for key, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise PotentialFileError(f"{path}: weight {key!r} holds NaN or inf")
        try:
            model = cls(**hyperparameters)
        except (TypeError, ValueError) as error:
            raise PotentialFileError(
                f"{path}: the stored hyperparameters do not build a {cls.__name__}: {error}"
            ) from error
        # The stored dtype first: loading float64 weights into float32 parameters would round them.
        model = model.to(dtype=_DTYPES[dtype])
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            detail = " ".join(str(error).split())
            raise PotentialFileError(
                f"{path}: the stored weights do not fit the stored hyperparameters ({detail[:400]})"
            ) from error
        return model.to(device=map_location)
