"""Run state that makes a resumed run continue exactly: the data order, RNG states, and the stop request."""

from __future__ import annotations

import random
import signal
import threading

import numpy as np
import torch

from gdeq_ext.seeds import seed_for

__all__ = [
    "DataOrder",
    "StopRequest",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]


# ---------------------------------------------------------------------------------------------- state
class DataOrder:
    """Epoch-wise shuffled order of the training pairs, determined by (seed, epoch) alone.

    A global batch never straddles two epochs (the last batch of an epoch may be smaller), so the state is
    just (epoch, cursor) and a resumed run draws exactly the batches the interrupted one would have.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.n, self.seed, self.epoch, self.cursor = n, seed, epoch, cursor

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed_for("relaxation-order", self.seed, epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def next(self, batch_size: int) -> list[int]:
        if self.cursor >= self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        chosen = self.permutation(self.epoch)[self.cursor : self.cursor + batch_size]
        self.cursor += len(chosen)
        return chosen

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


def rng_state() -> dict:
    # The legacy global numpy RNG is what user code and libraries draw from: it is saved, not used here.
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed_for("numpy", seed))  # noqa: NPY002 (the global RNG, for user code and libraries)
    random.seed(seed_for("python", seed))


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop at the end of the current step (after a checkpoint); a second
    signal interrupts at once. Only installed in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False
