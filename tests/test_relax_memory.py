"""The autograd graph of implicit and hybrid relaxations does not grow with the relaxation length.

Bytes are counted with ``saved_tensors_hooks``: every tensor autograd saves for backward is wrapped in a
holder kept in a WeakSet, so after the forward pass the live holders are exactly the tensors the
retained graph keeps (temporary graphs, such as the force evaluations inside FIRE or the graph of a
recomputed window step, are freed and drop out). Unique storages are summed, so a tensor saved by several
nodes counts once.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from gdeq_ext.relax import BPTTRelax, HybridRelax, ImplicitRelax

pytestmark = pytest.mark.usefixtures("single_thread")


class _Holder:
    # Detached: a saved output would otherwise hold its own grad_fn through the holder, a reference cycle
    # through C++ autograd nodes that keeps temporary graphs alive. Autograd re-attaches grad_fn on unpack.
    def __init__(self, tensor):
        self.tensor = tensor.detach()


def saved_bytes(run):
    """(result of ``run()``, bytes of unique storages saved by its autograd graph)."""
    live = weakref.WeakSet()

    def pack(tensor):
        holder = _Holder(tensor)
        live.add(holder)
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        result = run()
    gc.collect()
    storages = {}
    for holder in list(live):
        storage = holder.tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return result, sum(storages.values())


@pytest.mark.parametrize("mode", ["implicit", "hybrid"])
def test_saved_bytes_do_not_depend_on_relaxation_length(sw_like, si_sheared, mode):
    measured = {}
    for length in (50, 500):
        # fmax = 0 is never reached: every structure runs exactly ``length`` FIRE steps.
        if mode == "implicit":
            relax = ImplicitRelax(sw_like, fmax=0.0, max_steps=length, warn=False)
        else:
            relax = HybridRelax(sw_like, window=5, fmax=0.0, max_steps=length, warn=False)
        result, measured[length] = saved_bytes(lambda relax=relax: relax(si_sheared))
        assert int(result.steps[0]) == length + (5 if mode == "hybrid" else 0)
        result.positions.sum().backward()  # the graph that was measured is usable
    assert measured[50] == measured[500] > 0, measured
    if mode == "implicit":
        # X* (8 atoms x 3 x 8 bytes) and the four SW parameters: nothing per step.
        assert measured[50] == 8 * 3 * 8 + 4 * 8


def test_bptt_graph_grows_with_steps_and_checkpointing_keeps_only_states(sw_like, si_sheared):
    _, short = saved_bytes(lambda: BPTTRelax(sw_like, steps=5)(si_sheared))
    _, long = saved_bytes(lambda: BPTTRelax(sw_like, steps=10)(si_sheared))
    _, checkpointed = saved_bytes(lambda: BPTTRelax(sw_like, steps=10, checkpoint=True)(si_sheared))
    assert long > 1.9 * short  # O(T): the counter sees the growth the implicit modes avoid
    assert checkpointed == 10 * 8 * 3 * 8  # one (n_atoms, 3) float64 state per step
