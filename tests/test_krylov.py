"""Batched CG / MINRES / fixed-point solves on block-diagonal systems with known dense solutions."""

from __future__ import annotations

import pytest
import torch

from gdeq_ext.data.batch import Batch
from gdeq_ext.gradients import (
    ImplicitSolveOptions,
    LinearSolveWarning,
    RigidModeProjector,
    conjugate_gradient,
    fixed_point_solve,
    minres,
    solve_hessian,
)

SIZES = [4, 7, 3]  # atoms per structure

pytestmark = pytest.mark.usefixtures("single_thread")


def _blocks(seed, sizes=SIZES, indefinite=(), translation_null=False):
    """One dense symmetric (3n, 3n) block per structure; the batched operator applies them all."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for s, n in enumerate(sizes):
        q, _ = torch.linalg.qr(torch.randn(3 * n, 3 * n, generator=gen, dtype=torch.float64))
        eig = torch.logspace(-1, 1, 3 * n, dtype=torch.float64)
        if s in indefinite:
            eig[::3] *= -1
        a = q @ torch.diag(eig) @ q.T
        if translation_null:  # A·(translation) = 0: the Hessian of a translation-invariant energy
            t = torch.eye(3, dtype=torch.float64).repeat(n, 1) / n**0.5  # (3n, 3) orthonormal
            p = torch.eye(3 * n, dtype=torch.float64) - t @ t.T
            a = p @ a @ p
        blocks.append(a)
    system = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ptr = [0, *torch.tensor(sizes).cumsum(0).tolist()]

    def matvec(v):
        return torch.cat([(blocks[s] @ v[ptr[s] : ptr[s + 1]].reshape(-1)).reshape(-1, 3) for s in range(len(sizes))])

    b = torch.randn(sum(sizes), 3, generator=gen, dtype=torch.float64)
    return blocks, matvec, b, system, ptr


def _dense_solution(blocks, b, ptr, pinv=False):
    parts = []
    for s, a in enumerate(blocks):
        rhs = b[ptr[s] : ptr[s + 1]].reshape(-1)
        x = torch.linalg.pinv(a, hermitian=True) @ rhs if pinv else torch.linalg.solve(a, rhs)
        parts.append(x.reshape(-1, 3))
    return torch.cat(parts)


def test_cg_matches_dense_solve_per_structure():
    blocks, matvec, b, system, ptr = _blocks(0)
    x, info = conjugate_gradient(matvec, b, system, 3, rtol=1e-10)
    torch.testing.assert_close(x, _dense_solution(blocks, b, ptr), rtol=1e-8, atol=1e-8)
    assert bool(info.converged.all())
    # Per-structure scalars: the 9-unknown block stops (after ~9 products in finite precision) well
    # before the 21-unknown one.
    assert int(info.iterations[2]) <= 11 < int(info.iterations[1]) <= info.matvecs
    true_residual = (b - matvec(x)).square()
    for s in range(3):
        assert float(true_residual[ptr[s] : ptr[s + 1]].sum().sqrt()) <= 1e-10 * float(info.rhs_norm[s]) * 10


def test_per_structure_tolerance_and_iteration_cap():
    blocks, matvec, b, system, ptr = _blocks(1)
    rtol = torch.tensor([1e-2, 1e-10, 1e-10], dtype=torch.float64)
    _, loose = conjugate_gradient(matvec, b, system, 3, rtol=rtol)
    assert int(loose.iterations[0]) < int(loose.iterations[1])
    assert bool((loose.residual <= rtol * loose.rhs_norm).all())
    with pytest.warns(LinearSolveWarning, match=r"structure 1: residual .* after 2 iterations"):
        _, capped = conjugate_gradient(matvec, b, system, 3, rtol=1e-10, max_iter=torch.tensor([50, 2, 50]))
    assert capped.converged.tolist() == [True, False, True]
    assert int(capped.iterations[1]) == 2


def test_translation_projection_gives_minimum_norm_solution():
    blocks, matvec, b, system, ptr = _blocks(2, translation_null=True)
    positions = torch.randn(sum(SIZES), 3, dtype=torch.float64)
    pbc = torch.ones(3, 3, dtype=torch.bool)
    project = RigidModeProjector(positions, system, 3, pbc)
    x, info = conjugate_gradient(matvec, b, system, 3, rtol=1e-12, project=project)
    assert bool(info.converged.all())
    torch.testing.assert_close(x, _dense_solution(blocks, project(b), ptr, pinv=True), rtol=1e-8, atol=1e-8)
    # Without the projection b has a component in the null space: CG cannot reach the tolerance.
    with pytest.warns(LinearSolveWarning):
        conjugate_gradient(matvec, b, system, 3, rtol=1e-12, max_iter=200)


def test_projector_is_symmetric_idempotent_and_kills_rigid_modes():
    n = 5
    positions = torch.randn(2 * n, 3, dtype=torch.float64)
    system = torch.repeat_interleave(torch.arange(2), n)
    pbc = torch.tensor([[True, True, True], [False, False, False]])
    project = RigidModeProjector(positions, system, 2, pbc, rotations=True)
    v, w = torch.randn(2, 2 * n, 3, dtype=torch.float64)
    torch.testing.assert_close((project(v) * w).sum(), (v * project(w)).sum())
    torch.testing.assert_close(project(project(v)), project(v))
    translation = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64).expand(2 * n, 3)
    assert float(project(translation).abs().max()) < 1e-12
    centred = positions[n:] - positions[n:].mean(0)
    rotation = torch.cat(
        [
            torch.zeros(n, 3, dtype=torch.float64),
            torch.cross(torch.tensor([[0.2, 0.5, -1.0]], dtype=torch.float64).expand(n, 3), centred, dim=1),
        ]
    )
    assert float(project(rotation).abs().max()) < 1e-12
    # A rotation of the periodic structure is not a zero mode there and must survive.
    periodic_rotation = torch.cat([rotation[n:], torch.zeros(n, 3, dtype=torch.float64)])
    assert float(project(periodic_rotation).abs().max()) > 0.1


def test_minres_solves_indefinite_blocks_where_cg_fails():
    blocks, matvec, b, system, ptr = _blocks(3, indefinite=(1,))
    x, info = minres(matvec, b, system, 3, rtol=1e-10)
    assert bool(info.converged.all())
    torch.testing.assert_close(x, _dense_solution(blocks, b, ptr), rtol=1e-7, atol=1e-7)
    with pytest.warns(LinearSolveWarning, match="structure 1.*non-positive curvature"):
        _, cg_info = conjugate_gradient(matvec, b, system, 3, rtol=1e-10)
    assert cg_info.indefinite.tolist() == [False, True, False]


def test_solve_hessian_retries_indefinite_structures_with_minres():
    blocks, matvec, b, system, ptr = _blocks(4, indefinite=(2,))
    batch = Batch.from_tensors(
        torch.zeros(sum(SIZES), 3, dtype=torch.float64),
        torch.full((sum(SIZES),), 14),
        torch.eye(3, dtype=torch.float64).expand(3, 3, 3) * 10,
        torch.ones(3, 3, dtype=torch.bool),
        SIZES,
    )
    options = ImplicitSolveOptions(solver="cg", rtol=1e-10)
    x, info = solve_hessian(matvec, b, batch, lambda v: v, options)
    assert info.method == "cg+minres" and info.indefinite.tolist() == [False, False, True]
    assert bool(info.converged.all())
    torch.testing.assert_close(x, _dense_solution(blocks, b, ptr), rtol=1e-7, atol=1e-7)


def test_minres_matches_cg_on_positive_definite_blocks():
    blocks, matvec, b, system, ptr = _blocks(5)
    x_cg, _ = conjugate_gradient(matvec, b, system, 3, rtol=1e-11)
    x_mr, info = minres(matvec, b, system, 3, rtol=1e-11)
    torch.testing.assert_close(x_mr, x_cg, rtol=1e-8, atol=1e-8)
    assert info.matvecs <= 2 * 3 * max(SIZES)  # 3n in exact arithmetic; Lanczos loses orthogonality


def test_fixed_point_reaches_the_same_solution_with_more_products():
    blocks, matvec, b, system, ptr = _blocks(6)
    x_fp, fp = fixed_point_solve(matvec, b, system, 3, alpha=0.1, rtol=1e-8, max_iter=5000)
    x_cg, cg = conjugate_gradient(matvec, b, system, 3, rtol=1e-8)
    assert bool(fp.converged.all())
    torch.testing.assert_close(x_fp, x_cg, rtol=1e-6, atol=1e-6)
    assert fp.matvecs > 5 * cg.matvecs
    # Divergent step (α > 2/λ_max = 0.2): reported, not returned as converged.
    with pytest.warns(LinearSolveWarning, match="fixed_point did not converge"):
        _, bad = fixed_point_solve(matvec, b, system, 3, alpha=0.5, rtol=1e-8, max_iter=3000)
    assert not bool(bad.converged.any())


def test_damping_solves_shifted_system():
    blocks, matvec, b, system, ptr = _blocks(7, translation_null=True)
    lam = 0.3
    x, info = conjugate_gradient(lambda v: matvec(v) + lam * v, b, system, 3, rtol=1e-11)
    eye = [torch.eye(a.shape[0], dtype=torch.float64) for a in blocks]
    shifted = [a + lam * e for a, e in zip(blocks, eye, strict=True)]
    torch.testing.assert_close(x, _dense_solution(shifted, b, ptr), rtol=1e-8, atol=1e-8)


def test_zero_right_hand_side_costs_nothing():
    blocks, matvec, b, system, ptr = _blocks(8)
    b[ptr[1] : ptr[2]] = 0
    x, info = conjugate_gradient(matvec, b, system, 3, rtol=1e-10)
    assert int(info.iterations[1]) == 0 and bool(info.converged[1])
    assert float(x[ptr[1] : ptr[2]].abs().max()) == 0.0


def test_cg_restricted_to_unfinished_structures_gives_the_same_solution_with_fewer_products():
    """With ``restrict``, once at most 3/4 of the structures still iterate the products are those of the unfinished
    ones only; every structure's iterations and solution equal the whole-batch solve's (block-diagonal A)."""
    sizes = [3, 5, 4, 6, 2, 7, 3, 4]
    blocks, matvec, b, system, ptr = _blocks(5, sizes=sizes)
    rows, subsets = [], []

    def restrict(members):
        keep = members.tolist()
        subsets.append(len(keep))
        sub_ptr = [0, *torch.tensor([sizes[s] for s in keep]).cumsum(0).tolist()]

        def sub_matvec(v):
            rows.append(v.shape[0])
            return torch.cat(
                [(blocks[s] @ v[sub_ptr[k] : sub_ptr[k + 1]].reshape(-1)).reshape(-1, 3) for k, s in enumerate(keep)]
            )

        return sub_matvec, lambda v: v

    tolerance = torch.logspace(-12, -4, len(sizes), dtype=torch.float64)  # very different iteration counts
    x_whole, whole = conjugate_gradient(matvec, b, system, len(sizes), rtol=tolerance)
    x_packed, packed = conjugate_gradient(matvec, b, system, len(sizes), rtol=tolerance, restrict=restrict)
    assert len(set(whole.iterations.tolist())) > 3
    assert packed.iterations.tolist() == whole.iterations.tolist() and packed.matvecs == whole.matvecs
    torch.testing.assert_close(x_packed, x_whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(packed.residual, whole.residual, rtol=1e-8, atol=1e-14)
    assert bool(packed.converged.all())
    assert subsets[0] <= 6 and all(a > b for a, b in zip(subsets, subsets[1:], strict=False))  # 8 -> <= 6 -> ...
    assert max(rows) < b.shape[0] and sum(rows) < (whole.matvecs - 1) * b.shape[0]  # fewer rows multiplied
