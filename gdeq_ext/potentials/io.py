"""One file per potential: class name, hyperparameters, dtype and weights, read back with ``Class.load``."""

from __future__ import annotations

import os

import torch

__all__ = ["FORMAT", "SaveLoadMixin"]

FORMAT = "gdeq_ext.potential/1"


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
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Rebuild a potential saved by :meth:`save`, on ``map_location`` with its saved dtype."""
        data = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a gdeq_ext potential file (expected format {FORMAT!r})")
        if data["class"] != cls.__name__:
            raise ValueError(f"{path} holds a {data['class']}, not a {cls.__name__}")
        model = cls(**data["hyperparameters"])
        model = model.to(device=map_location, dtype=getattr(torch, data["dtype"]))
        model.load_state_dict(data["state_dict"])
        return model
