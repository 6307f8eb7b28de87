"""Gradients through a relaxed structure: batched Krylov solves on the Hessian and the implicit backward."""

from gdeq_ext.gradients.fixed_point import fixed_point_solve
from gdeq_ext.gradients.hessian import HessianOperator
from gdeq_ext.gradients.implicit_function import (
    ON_INVALID,
    ImplicitContext,
    ImplicitSolveOptions,
    InvalidGradientError,
    SolveRecord,
    attach_implicit,
    implicit_vjp,
    screen_solution,
    solve_hessian,
)
from gdeq_ext.gradients.krylov import LinearSolveWarning, SolveInfo, conjugate_gradient, minres
from gdeq_ext.gradients.lanczos import extreme_curvatures
from gdeq_ext.gradients.projection import RigidModeProjector

__all__ = [
    "ON_INVALID",
    "HessianOperator",
    "ImplicitContext",
    "ImplicitSolveOptions",
    "InvalidGradientError",
    "LinearSolveWarning",
    "RigidModeProjector",
    "SolveInfo",
    "SolveRecord",
    "attach_implicit",
    "conjugate_gradient",
    "extreme_curvatures",
    "fixed_point_solve",
    "implicit_vjp",
    "minres",
    "screen_solution",
    "solve_hessian",
]
