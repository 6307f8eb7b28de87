"""The private torch APIs of gdeq_ext.compat exist and behave on the installed torch (pinned to the supported range)."""

from __future__ import annotations

import pytest
import torch

from gdeq_ext import compat
from gdeq_ext._extension import HAVE_EXTENSION, compiled_op


def test_installed_torch_is_in_the_supported_range():
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    low, high = compat.SUPPORTED_TORCH
    assert low <= version <= high, f"torch {torch.__version__} is outside gdeq_ext's supported range {low}-{high}"


def test_dispatch_has_kernel_answers_for_an_aten_op():
    assert compat.dispatch_has_kernel("aten::add.Tensor", "CPU") is True
    assert isinstance(compat.dispatch_has_kernel("aten::add.Tensor", "CUDA"), bool)


@pytest.mark.skipif(not HAVE_EXTENSION, reason="the compiled extension is not built")
def test_compiled_op_finds_our_kernels_and_refuses_unknown_ops():
    assert compiled_op("edge_vectors", "cpu")
    assert not compiled_op("no_such_op", "cpu")
    assert not compiled_op("edge_vectors", "meta")


def test_will_engine_execute_node_inside_and_outside_backward():
    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    used = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a * b

        @staticmethod
        def backward(ctx, grad):
            used["x"] = compat.will_engine_execute_node(x_node)
            used["y"] = compat.will_engine_execute_node(y_node)
            return grad, grad

    xs, ys = x * 2, y * 2
    x_node, y_node = xs.grad_fn, ys.grad_fn
    out = Probe.apply(xs, ys).sum()
    (grad_x,) = torch.autograd.grad(out, [x])  # only x's branch is needed
    assert used == {"x": True, "y": False}
    assert torch.equal(grad_x, torch.full_like(x, 2.0))  # the probe passes the gradient through, times 2 from xs
    with pytest.raises(RuntimeError):  # outside the engine: callers assume "used"
        compat.will_engine_execute_node(x_node)
