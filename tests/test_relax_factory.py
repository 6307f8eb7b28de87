"""#14: one relaxation factory (RelaxOptions, build_relaxation) used by training and the benchmarks."""

from __future__ import annotations

import pytest
import torch

from gdeq_ext.loss import delta_q
from gdeq_ext.relax import BPTTRelax, HybridRelax, ImplicitRelax, RelaxOptions, build_relaxation
from gdeq_ext.train.config import RelaxConfig
from gdeq_ext.train.factories import make_relaxation, relax_options


def gradients(relax, potential, batch):
    potential.zero_grad(set_to_none=True)
    result = relax(batch)
    delta_q(result.positions, batch.positions.detach() + 0.01, batch).sum().backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in potential.named_parameters()}


@pytest.mark.parametrize(
    ("mode", "cls", "direct"),
    [
        ("bptt", BPTTRelax, lambda p: BPTTRelax(p, steps=4, fmax=0.01)),
        ("implicit", ImplicitRelax, lambda p: ImplicitRelax(p, fmax=1e-6, warn=False)),
        ("hybrid", HybridRelax, lambda p: HybridRelax(p, window=3, fmax=1e-6, warn=False)),
    ],
)
def test_factory_builds_the_same_relaxation_as_the_class(mode, cls, direct, morse, morse_cells):
    options = RelaxOptions(mode=mode, window=3, bptt_steps=4, fmax=1e-6 if mode != "bptt" else 0.01, warn=False)
    built = build_relaxation(morse, options)
    assert type(built) is cls
    ours, theirs = gradients(built, morse, morse_cells), gradients(direct(morse), morse, morse_cells)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


def test_overrides_config_mapping_and_bad_mode(morse, morse_cells):
    relax = build_relaxation(morse, RelaxOptions(mode="implicit"), fmax=1e-3, skin=0.0, on_invalid="skip")
    assert isinstance(relax, ImplicitRelax) and relax.fmax == 1e-3 and relax.on_invalid == "skip"
    config = RelaxConfig(mode="hybrid", window=4, max_relax_steps=77, checkpoint_window=False, newton_steps=3)
    options = relax_options(config)
    assert (options.window, options.max_steps, options.checkpoint, options.polish.newton_steps) == (4, 77, False, 3)
    assert options.on_invalid == "skip" and options.warn is False  # the training defaults
    hybrid = make_relaxation(morse, config)
    assert isinstance(hybrid, HybridRelax) and hybrid.window == 4
    with pytest.raises(ValueError, match=r"RelaxOptions: mode must be one of \['bptt', 'implicit', 'hybrid'\]"):
        RelaxOptions(mode="unrolled")


def test_bptt_parameters_receive_the_only_gradients(morse, morse_cells):
    grads = gradients(BPTTRelax(morse, steps=3, parameters=[morse.D]), morse, morse_cells)
    assert grads["D"] is not None and float(grads["D"].abs()) > 0
    assert grads["a"] is None and grads["r0"] is None


def test_potentials_satisfy_the_protocol(morse):
    from gdeq_ext.potentials import MLIP, PotentialLike, StillingerWeber

    assert all(isinstance(p, PotentialLike) for p in (morse, MLIP(), StillingerWeber()))
    assert not isinstance(object(), PotentialLike)


def test_option_objects_are_shared_and_flat_fields_route_to_their_owner(morse, morse_cells):
    from gdeq_ext.gradients.implicit_function import ImplicitSolveOptions
    from gdeq_ext.relax import FIREOptions, FIREParameters, WindowOptions
    from gdeq_ext.relax.options import BPTT_STEPS, DEFAULT_ALPHA

    window = WindowOptions(steps=3, alpha=0.02, checkpoint=False)
    fire = FIREOptions(fmax=1e-6, max_steps=300)
    solve = ImplicitSolveOptions(rtol=1e-8)
    objects = HybridRelax(morse, window, fire=fire, solve=solve, warn=False)
    flat = HybridRelax(morse, 3, alpha=0.02, checkpoint=False, fmax=1e-6, max_steps=300, rtol=1e-8, warn=False)
    assert objects.window_options == flat.window_options == window
    assert objects.fire_options == flat.fire_options == fire and objects.options == flat.options
    ours, theirs = gradients(objects, morse, morse_cells), gradients(flat, morse, morse_cells)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    # the window object is the same type for BPTT; its own default keeps all T graphs (the baseline)
    bptt = BPTTRelax(morse)
    assert (bptt.steps, bptt.alpha, bptt.checkpoint) == (BPTT_STEPS, DEFAULT_ALPHA, False)
    assert BPTTRelax(morse, WindowOptions(steps=4)).checkpoint is True
    # the argument's earlier form, FIREParameters, still works
    legacy = ImplicitRelax(morse, fire=FIREParameters(dt=0.05), fmax=1e-3)
    assert legacy.fire_parameters.dt == 0.05 and legacy.fmax == 1e-3
    # the relaxation's warn / on_invalid are the solve's
    assert ImplicitRelax(morse, solve=solve, on_invalid="skip", warn=False).options.on_invalid == "skip"
    with pytest.raises(TypeError, match=r"HybridRelax\(\) got an unexpected keyword argument 'fmx'; option fields"):
        HybridRelax(morse, fmx=1e-3)
    with pytest.raises(TypeError, match=r"BPTTRelax\(\) got an unexpected keyword argument 'rtol'"):
        BPTTRelax(morse, rtol=1e-3)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        WindowOptions(alpha=float("nan"))
