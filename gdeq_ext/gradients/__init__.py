"""Gradients through a relaxed structure: batched Krylov solves on the Hessian and the implicit backward."""

from gdeq_ext.gradients.fixed_point import fixed_point_solve
from gdeq_ext.gradients.implicit_function import (
    ImplicitContext,
    ImplicitSolveOptions,
    SolveRecord,
    attach_implicit,
    implicit_vjp,
    solve_hessian,
)
from gdeq_ext.gradients.krylov import LinearSolveWarning, SolveInfo, conjugate_gradient, minres
from gdeq_ext.gradients.projection import RigidModeProjector

__all__ = [
    "ImplicitContext",
    "ImplicitSolveOptions",
    "LinearSolveWarning",
    "RigidModeProjector",
    "SolveInfo",
    "SolveRecord",
    "attach_implicit",
    "conjugate_gradient",
    "fixed_point_solve",
    "implicit_vjp",
    "minres",
    "solve_hessian",
]
