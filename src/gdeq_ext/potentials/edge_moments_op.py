"""The fused edge-moment op of the MLIP (issue #5): compiled kernels, fake (meta) functions and autograd.

    A[i, c, m] = Σ_{e: i_e = i} R_c(r_e) u[j_e, c] Y_m(r̂_e),      R_c(r) = Σ_k φ_k(r) W[k, c]

(the mathematics and the oracle: :func:`gdeq_ext.potentials.mlip_reference.edge_moments_reference`). Three ops,
each the derivative of the one before:

* ``gdeq_ext::edge_moments(vectors, edge_index, u, weights, cutoff) -> A``;
* ``gdeq_ext::edge_moments_backward(G, vectors, edge_index, u, weights, cutoff, compute_vectors=True)
  -> (g_vectors, g_u, g_weights)``, the VJP of the first for a cotangent ``G = dL/dA``;
* ``gdeq_ext::edge_moments_double_backward(a_vectors, a_u, a_weights, G, vectors, edge_index, u, weights, cutoff,
  compute_vectors=True) -> (dG, d_vectors, d_u, d_weights)``, the VJP of the second (what force training,
  Hessian-vector products and (∂F/∂θ)ᵀw need). It is itself not differentiable: a third derivative raises.

``compute_vectors=False`` skips the per-edge vector output (returned as zeros), the most expensive part of both
derivative kernels. The autograd functions below set it when the current backward pass will not use that gradient
(e.g. ``torch.autograd.grad(forces, parameters)``, the parameter VJP (∂F/∂θ)ᵀw, never reaches the positions).

What autograd keeps: the inputs (vectors (E, 3), edge_index (2, E), u (N, C), weights (K, C)) and, for the second
op, G (N, C, 10). No tensor with one row per edge and C columns exists in any of the three kernels.
"""

from __future__ import annotations

import torch

from gdeq_ext._extension import compiled_op, op_defined
from gdeq_ext.compat import will_engine_execute_node

__all__ = ["OPS", "edge_moments_fused", "has_fused_kernels"]

OPS = ("edge_moments", "edge_moments_backward", "edge_moments_double_backward")


def _gradient_used(t: torch.Tensor) -> bool:
    """Whether the backward pass now running will use a gradient for ``t`` (True when unsure)."""
    if not t.requires_grad:
        return False
    if t.grad_fn is None:  # a leaf: its gradient is accumulated whenever it requires one
        return True
    try:
        return will_engine_execute_node(t.grad_fn)
    except RuntimeError:  # not inside the autograd engine (e.g. tracing the backward): assume it is needed
        return True


def has_fused_kernels(device: torch.device) -> bool:
    """Whether all three edge-moment ops have compiled kernels for ``device``'s type."""
    return all(compiled_op(name, device) for name in OPS)


def edge_moments_fused(
    vectors: torch.Tensor, edge_index: torch.Tensor, u: torch.Tensor, weights: torch.Tensor, cutoff: float
) -> torch.Tensor:
    """The compiled edge op, differentiable twice in ``vectors``, ``u`` and ``weights``.

    Args:
        vectors: (E, 3) float32/float64, r_ij in Å (|r_ij| > 0); edges with |r_ij| ≥ cutoff contribute exactly 0.
        edge_index: (2, E) int64, row 0 the receiving atom i, row 1 the sending atom j (any order; sorted by i is
            fastest).
        u: (N, C) channel values, same dtype and device as ``vectors``.
        weights: (K, C) radial weights W[k, c].
        cutoff: r_c in Å.

    Returns:
        A (N, C, 10), as :func:`~gdeq_ext.potentials.mlip_reference.edge_moments_reference`.
    """
    return torch.ops.gdeq_ext.edge_moments(vectors, edge_index, u, weights, float(cutoff))


# ---------------------------------------------------------------------------------------------- registration
if all(op_defined(name) for name in OPS):

    @torch.library.register_fake("gdeq_ext::edge_moments")
    def _edge_moments_fake(vectors, edge_index, u, weights, cutoff):
        return vectors.new_empty(u.shape[0], u.shape[1], 10)

    @torch.library.register_fake("gdeq_ext::edge_moments_backward")
    def _edge_moments_backward_fake(grad_moments, vectors, edge_index, u, weights, cutoff, compute_vectors=True):
        return torch.empty_like(vectors), torch.empty_like(u), torch.empty_like(weights)

    @torch.library.register_fake("gdeq_ext::edge_moments_double_backward")
    def _edge_moments_double_backward_fake(
        gg_vectors, gg_u, gg_weights, grad_moments, vectors, edge_index, u, weights, cutoff, compute_vectors=True
    ):
        return (
            torch.empty_like(grad_moments),
            torch.empty_like(vectors),
            torch.empty_like(u),
            torch.empty_like(weights),
        )

    def _forward_setup_context(ctx, inputs, output):
        vectors, edge_index, u, weights, cutoff = inputs
        ctx.save_for_backward(vectors, edge_index, u, weights)
        ctx.cutoff = cutoff

    def _forward_backward(ctx, grad_moments):
        vectors, edge_index, u, weights = ctx.saved_tensors
        compute_vectors = ctx.needs_input_grad[0] and _gradient_used(vectors)
        grad_vectors, grad_u, grad_weights = torch.ops.gdeq_ext.edge_moments_backward(
            grad_moments, vectors, edge_index, u, weights, ctx.cutoff, compute_vectors
        )
        return grad_vectors, None, grad_u, grad_weights, None

    torch.library.register_autograd("gdeq_ext::edge_moments", _forward_backward, setup_context=_forward_setup_context)

    def _backward_setup_context(ctx, inputs, output):
        grad_moments, vectors, edge_index, u, weights, cutoff, compute_vectors = inputs
        ctx.save_for_backward(grad_moments, vectors, edge_index, u, weights)
        ctx.cutoff = cutoff
        ctx.computed_vectors = compute_vectors

    def _backward_backward(ctx, gg_vectors, gg_u, gg_weights):
        grad_moments, vectors, edge_index, u, weights = ctx.saved_tensors
        if gg_vectors is None or not ctx.computed_vectors:  # an output that was not computed is a constant zero
            gg_vectors = torch.zeros_like(vectors)
        gg_u = torch.zeros_like(u) if gg_u is None else gg_u
        gg_weights = torch.zeros_like(weights) if gg_weights is None else gg_weights
        compute_vectors = ctx.needs_input_grad[1] and _gradient_used(vectors)
        d_grad, d_vectors, d_u, d_weights = torch.ops.gdeq_ext.edge_moments_double_backward(
            gg_vectors, gg_u, gg_weights, grad_moments, vectors, edge_index, u, weights, ctx.cutoff, compute_vectors
        )
        return d_grad, d_vectors, None, d_u, d_weights, None, None

    torch.library.register_autograd(
        "gdeq_ext::edge_moments_backward", _backward_backward, setup_context=_backward_setup_context
    )

    def _double_backward_setup_context(ctx, inputs, output):
        pass

    def _double_backward_backward(ctx, *grads):
        raise RuntimeError(
            "gdeq_ext: edge_moments is differentiable twice (energy -> forces -> force loss or Hessian-vector "
            "products), not three times: edge_moments_double_backward has no derivative. For third derivatives "
            "use MLIP(backend='reference')."
        )

    torch.library.register_autograd(
        "gdeq_ext::edge_moments_double_backward",
        _double_backward_backward,
        setup_context=_double_backward_setup_context,
    )
