"""Verlet-skin neighbor lists for relaxations: build with cutoff + skin, reuse until an atom moved skin/2.

The rebuild decision is per structure: in a batch of relaxations only the structures in which some atom
moved more than ``skin / 2`` since their last build are rebuilt (in one neighbor-list call for all of them);
the others keep their pairs.

Host synchronization on a GPU. Deciding to reuse a list means knowing that no atom moved too far, and the
positions live on the device, so an exact check reads one flag per structure back (one small sync per call).
A caller that can bound how far any atom moves between two calls (FIRE caps every step at ``maxstep``) passes
``max_step``: the check then runs one call ahead with the threshold ``skin / 2 - max_step``, its flags come
back asynchronously, and a reused list costs no host synchronization at all.
"""

from __future__ import annotations

import warnings

import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.neighbors.edges import Edges
from gdeq_ext.neighbors.neighbor_list import neighbor_list

__all__ = ["VerletList"]


class VerletList:
    """A neighbor list with a skin, rebuilt per structure only when needed.

    Built with ``cutoff + skin``; while no atom of a structure has moved more than ``skin / 2`` since that
    structure's last build, every pair closer than ``cutoff`` is still in the list (two atoms approach each
    other by at most ``skin``), so the list is reused. Pairs between ``cutoff`` and ``cutoff + skin`` stay
    in the list; potentials give them exactly zero contribution. A structure whose cell or periodicity
    changed is rebuilt too; a different batch layout (atom or structure counts, device, dtype) rebuilds all.

    Args:
        cutoff: Å, the potential's cutoff.
        skin: Å, extra distance (default 0.5 Å). ``skin=0`` rebuilds at every call.
        max_step: Å or None. A promise that between two calls no atom moves more than ``max_step`` (must be
            below ``skin / 2``). Then the reuse decision for a call is made from a check launched at the
            previous call (threshold ``skin / 2 - max_step``), so reusing costs no host synchronization on a
            GPU. A broken promise is detected one call later: a ``RuntimeWarning`` names the structures whose
            list was incomplete, and they are rebuilt.

    Attributes:
        rebuilds: number of calls that (re)built the list of at least one structure.
        structure_rebuilds: (n_systems,) int64 CPU tensor, builds of each structure's list.
        host_waits: ``max_step`` mode on a GPU: calls that had to wait for the previous call's check
            (the host ran ahead of the device); 0 when the host never blocked.
    """

    def __init__(self, cutoff: float, skin: float = 0.5, max_step: float | None = None):
        if not skin >= 0:
            raise ValueError(f"skin must be non-negative, got {skin}")
        if max_step is not None and not (0 <= max_step < 0.5 * skin):
            raise ValueError(f"max_step must lie in [0, skin / 2) = [0, {0.5 * skin}), got {max_step}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.max_step = None if max_step is None else float(max_step)
        self.rebuilds = 0
        self.host_waits = 0
        self.structure_rebuilds = torch.zeros(0, dtype=torch.int64)
        self._pinned: list[torch.Tensor] = []  # two pinned buffers, used in turn (max_step mode on GPU)
        self.reset()

    def reset(self) -> None:
        """Forget the list: the next call builds every structure."""
        self._edges: Edges | None = None
        self._reference: torch.Tensor | None = None  # positions at each structure's last build
        self._cell: torch.Tensor | None = None
        self._pbc: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None  # the batch's own tensor (identity check, no sync)
        self._layout: tuple | None = None
        self._pending: tuple | None = None  # (host flags, event) of the check launched one call ahead

    # ------------------------------------------------------------------------------------------- checks
    def _same_layout(self, batch: Batch) -> bool:
        layout = (batch.n_atoms, batch.n_systems, batch.device, batch.dtype)
        if self._edges is None or layout != self._layout:
            return False
        if batch.n_atoms_per_system is self._counts:  # with_positions() keeps the tensor: no comparison
            return True
        return torch.equal(batch.n_atoms_per_system, self._counts)

    def _flags(self, batch: Batch, threshold: float) -> torch.Tensor:
        """(n_systems, 2) bool on the batch's device: [moved more than threshold or cell/pbc changed,
        moved more than skin / 2]. No synchronization."""
        moved2 = (batch.positions.detach() - self._reference).square().sum(dim=1)
        largest = moved2.new_zeros(batch.n_systems).scatter_reduce(0, batch.system, moved2, "amax")
        changed = (batch.cell.detach() != self._cell).flatten(1).any(dim=1) | (batch.pbc != self._pbc).any(dim=1)
        stale = (largest > threshold * threshold) | changed
        invalid = (largest > (0.5 * self.skin) ** 2) | changed
        return torch.stack([stale, invalid], dim=1)

    def stale(self, batch: Batch) -> torch.Tensor:
        """(n_systems,) bool on the batch's device: structures whose list must be rebuilt before use now."""
        if not self._same_layout(batch) or self.skin == 0:
            return torch.ones(batch.n_systems, dtype=torch.bool, device=batch.device)
        return self._flags(batch, 0.5 * self.skin)[:, 1]

    def needs_rebuild(self, batch: Batch) -> bool:
        """Whether some structure's list must be rebuilt before use now (reads one flag per structure)."""
        return bool(self.stale(batch).any())

    def _launch_check(self, batch: Batch) -> None:
        """Start the check whose result decides the next call; its flags come back without blocking."""
        flags = self._flags(batch, 0.5 * self.skin - self.max_step)
        if flags.is_cuda:
            # Double buffering: the buffer written now is read at the next call, after its event completed;
            # the other one was read at this call already.
            if not self._pinned or self._pinned[0].shape != flags.shape:
                self._pinned = [torch.empty(flags.shape, dtype=torch.bool, pin_memory=True) for _ in range(2)]
            self._pinned.reverse()
            host = self._pinned[0]
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (flags, None)

    def _collect_check(self) -> torch.Tensor:
        """The previous call's flags (n_systems, 2) on the CPU; waits only for that check if still running."""
        host, event = self._pending
        self._pending = None
        if event is not None and not event.query():
            self.host_waits += 1
            event.synchronize()
        return host

    # ------------------------------------------------------------------------------------------- builds
    def _build_all(self, batch: Batch) -> None:
        self._edges = Edges(*neighbor_list(batch, self.cutoff + self.skin, full=True))
        self._reference = batch.positions.detach().clone()
        self._cell = batch.cell.detach().clone()
        self._pbc = batch.pbc.clone()
        self._counts = batch.n_atoms_per_system
        self._layout = (batch.n_atoms, batch.n_systems, batch.device, batch.dtype)
        if self.structure_rebuilds.shape[0] != batch.n_systems:
            self.structure_rebuilds = torch.zeros(batch.n_systems, dtype=torch.int64)
        self.structure_rebuilds += 1

    def _build_some(self, batch: Batch, rebuild: torch.Tensor) -> None:
        """Rebuild the structures flagged in ``rebuild`` ((n_systems,) bool, CPU) and splice their pairs in."""
        device = batch.device
        selected = rebuild.to(device)
        atoms = selected[batch.system]  # (n_atoms,) bool
        global_index = atoms.nonzero().flatten()  # sub-batch atom -> batch atom (monotonic)
        positions = batch.positions.detach()[global_index]
        sub = (positions, batch.cell.detach()[selected], batch.pbc[selected], batch.n_atoms_per_system[selected])
        new_index, new_shifts = neighbor_list(sub, self.cutoff + self.skin, full=True)
        old_index, old_shifts = self._edges
        keep = ~atoms[old_index[0]]
        edge_index = torch.cat([old_index[:, keep], global_index[new_index]], dim=1)
        shifts = torch.cat([old_shifts[keep], new_shifts])
        # Both parts are sorted by i and own disjoint atoms: a stable sort by i restores the global order.
        order = torch.sort(edge_index[0], stable=True).indices
        self._edges = Edges(edge_index[:, order], shifts[order])
        self._reference = torch.where(atoms[:, None], batch.positions.detach(), self._reference)
        self._cell = torch.where(selected[:, None, None], batch.cell.detach(), self._cell)
        self._pbc = torch.where(selected[:, None], batch.pbc, self._pbc)
        self.structure_rebuilds += rebuild.to(torch.int64)

    def __call__(self, batch: Batch) -> Edges:
        """The current list, (2, n_edges) int64 + (n_edges, 3) int64, sorted by (i, j, shift).

        Structures in which some atom moved more than ``skin / 2`` since their last build (or whose cell
        changed) are rebuilt first; every pair closer than ``cutoff`` is in the returned list.
        """
        if not self._same_layout(batch) or self.skin == 0:
            self._build_all(batch)
            self.rebuilds += 1
            self._pending = None
        else:
            if self.max_step is None:
                rebuild = self._flags(batch, 0.5 * self.skin)[:, 1].cpu()  # the one small sync of a reuse
            else:
                # Built or checked at the previous call: moved at most skin/2 - max_step then, so at most
                # skin/2 now, unless the flags say otherwise.
                flags = self._collect_check() if self._pending is not None else None
                rebuild = torch.zeros(batch.n_systems, dtype=torch.bool) if flags is None else flags[:, 0].clone()
                if flags is not None and bool(flags[:, 1].any()):
                    warnings.warn(
                        f"VerletList: max_step={self.max_step} Å was exceeded; the list used at the previous "
                        f"call missed pairs in structures {flags[:, 1].nonzero().flatten().tolist()}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            if bool(rebuild.all()):
                self._build_all(batch)
                self.rebuilds += 1
            elif bool(rebuild.any()):
                self._build_some(batch, rebuild)
                self.rebuilds += 1
        if self.max_step is not None:
            self._launch_check(batch)
        return self._edges
