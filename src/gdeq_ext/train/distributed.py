"""Data-parallel training with ``torch.distributed``: process setup, sharding, parameter and gradient sync.

Launch with ``torchrun`` (``torchrun --nproc-per-node 2 -m gdeq_ext.train CONFIG``; multi-node with
``--nnodes``/``--rdzv-endpoint``): :func:`init_distributed` reads the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the process group (NCCL on GPUs, gloo on CPUs).
Without those variables it does nothing and training runs in one process, through the same code.

Every process holds a full replica of the potential. A training step takes one global batch of structures
(the same indices on every rank), each rank relaxes and differentiates its contiguous shard
(:func:`shard`), and the gradients are summed over ranks (:func:`all_reduce_gradients`). Each rank's loss
is its *sum* of per-structure losses divided by the *global* batch size, so the summed gradient is exactly
the gradient of the mean over the global batch, however unevenly the structures are spread (a rank may
even hold none). The update is then identical on every rank, so the replicas never drift apart.

Why not ``DistributedDataParallel``: DDP's reducer hooks the autograd graph of one forward per iteration
and fires when each parameter's gradient is accumulated. A relaxation calls the potential hundreds of times
per step (graph-free FIRE, the differentiated window, Hessian-vector products inside the backward), and the
implicit gradient reaches the parameters from a custom autograd Function whose backward runs its own
``torch.autograd.grad`` calls; the number of "forwards" and the set of parameters reached differ between
steps and modes. One explicit all-reduce of a flat gradient buffer after ``backward()`` is simpler, has no
such assumptions, and costs the same single collective per step that DDP's bucketing would approach.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "all_reduce_gradients",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_module",
    "init_distributed",
    "shard",
    "shutdown",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``local_rank`` on the node, the
    process-group ``backend`` ("gloo", "nccl", or None for a single process) and its compute ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def collective_device(self) -> torch.device:
        """Where tensors must be for collectives: CUDA for NCCL, CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> DistributedContext:
        """The context of an already initialised process group (or a single process)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            return cls(
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                backend=dist.get_backend(),
                device=device,
            )
        return cls(device=device)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group torchrun describes in the environment, or return a single-process context.

    Args:
        device: "auto" (CUDA device ``LOCAL_RANK`` when CUDA is available, else CPU), "cpu" or "cuda".
        backend: default "nccl" on CUDA, "gloo" on CPU.
        timeout_s: collective timeout in seconds (default 30 min: relaxations of large batches are slow).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if world_size <= 1:
        return DistributedContext(device=chosen)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": chosen} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, backend=backend, device=chosen
    )


def shutdown(context: DistributedContext, barrier: bool = True) -> None:
    """Leave the process group (no-op for a single process).

    ``barrier`` (default True) first waits for every rank, so no rank tears its connections down while
    another still uses them (rank 0 writes files after the last collective). Pass False on an error path,
    where the other ranks may never arrive.
    """
    if context.distributed and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``indices``: sizes differ by at most one, earlier ranks larger.

    ``shard(range(5), r, 2)`` -> [0, 1, 2] and [3, 4]. Ranks beyond ``len(indices)`` get an empty list.
    """
    n = len(indices)
    lo = rank * n // world_size
    hi = (rank + 1) * n // world_size
    return [int(k) for k in list(indices)[lo:hi]]


def broadcast_module(module: torch.nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (replicas start identical)."""
    if not context.distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            staged = tensor.detach().to(context.collective_device)
            dist.broadcast(staged, src=0)
            tensor.copy_(staged.to(tensor.device))


def all_reduce_gradients(parameters: Iterable[torch.Tensor], context: DistributedContext) -> None:
    """Sum ``.grad`` over ranks in place (one flat buffer, one collective).

    A parameter with no gradient on some ranks (e.g. a rank with no structures) takes zeros there; one with
    no gradient on any rank keeps ``grad = None``, as a single process would.
    """
    if not context.distributed:
        return
    parameters = list(parameters)
    flags = torch.tensor(
        [p.grad is not None for p in parameters], dtype=torch.float32, device=context.collective_device
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    chosen = [p for p, flag in zip(parameters, flags.tolist(), strict=True) if flag > 0]
    if not chosen:
        return
    dtype = chosen[0].dtype
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(dtype) for p in chosen]
    ).to(context.collective_device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in chosen:
        n = p.numel()
        value = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)
        offset += n


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The element-wise sum of ``values`` over ranks (a new tensor on the input's device)."""
    if not context.distributed:
        return values.clone()
    staged = values.detach().to(context.collective_device).clone()
    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
    return staged.to(values.device)


def all_reduce_max(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The element-wise maximum of ``values`` over ranks (a new tensor on the input's device)."""
    if not context.distributed:
        return values.clone()
    staged = values.detach().to(context.collective_device).clone()
    dist.all_reduce(staged, op=dist.ReduceOp.MAX)
    return staged.to(values.device)
