// CPU kernels of the edge-vector gather and its adjoint scatter.
#include "gdeq_ext/edge_vectors.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "gdeq_ext/exact_math.h"

namespace gdeq_ext {
namespace {

constexpr int64_t kEdgeGrain = 4096;

template <typename scalar_t>
void gather_edges(const scalar_t* pos, const scalar_t* cell, const int64_t* edge_i, const int64_t* edge_j,
                  const int64_t* shifts, const int64_t* system, scalar_t* vectors, scalar_t* distances, int64_t n_edges,
                  int64_t n_atoms, int64_t n_systems) {
  at::parallel_for(0, n_edges, kEdgeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t i = edge_i[e], j = edge_j[e];
      TORCH_CHECK(i >= 0 && i < n_atoms && j >= 0 && j < n_atoms, "gdeq_ext: edge ", e, " = (", i, ", ", j,
                  ") refers to an atom outside [0, ", n_atoms, ")");
      const int64_t s = system[i];
      TORCH_CHECK(s >= 0 && s < n_systems, "gdeq_ext: atom ", i, " has system index ", s, " outside [0, ", n_systems,
                  ")");
      // The one formula (gdeq_ext/exact_math.h): the same vector and distance as CUDA and the neighbor list.
      distances[e] = edge_vector(pos + 3 * i, pos + 3 * j, cell + 9 * s, shifts + 3 * e, vectors + 3 * e);
    }
  });
}

// Serial on purpose: the scatter is memory-bound and cheap next to everything that consumes it, and a
// fixed summation order keeps results bit-reproducible run to run.
template <typename scalar_t>
void scatter_edges(const scalar_t* grad, const int64_t* edge_i, const int64_t* edge_j, const int64_t* shifts,
                   const int64_t* system, scalar_t* grad_pos, scalar_t* grad_cell, int64_t n_edges, int64_t n_atoms,
                   int64_t n_systems) {
  for (int64_t e = 0; e < n_edges; ++e) {
    const int64_t i = edge_i[e], j = edge_j[e];
    TORCH_CHECK(i >= 0 && i < n_atoms && j >= 0 && j < n_atoms, "gdeq_ext: edge ", e, " = (", i, ", ", j,
                ") refers to an atom outside [0, ", n_atoms, ")");
    const int64_t s = system[i];
    TORCH_CHECK(s >= 0 && s < n_systems, "gdeq_ext: atom ", i, " has system index ", s, " outside [0, ", n_systems,
                ")");
    const scalar_t* g = grad + 3 * e;
    const int64_t* S = shifts + 3 * e;
    for (int d = 0; d < 3; ++d) {
      grad_pos[3 * j + d] += g[d];
      grad_pos[3 * i + d] -= g[d];
    }
    scalar_t* c = grad_cell + 9 * s;
    for (int a = 0; a < 3; ++a) {
      if (S[a] == 0) continue;
      for (int d = 0; d < 3; ++d) c[3 * a + d] += static_cast<scalar_t>(S[a]) * g[d];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> edge_vectors_cpu(const at::Tensor& positions, const at::Tensor& cell,
                                                    const at::Tensor& edge_index, const at::Tensor& shifts,
                                                    const at::Tensor& system) {
  check_edge_vectors_args(positions, cell, edge_index, shifts, system);
  const auto pos = positions.contiguous();
  const auto cel = cell.contiguous();
  const auto edges = edge_index.contiguous();
  const auto shf = shifts.contiguous();
  const auto sys = system.contiguous();
  const int64_t n_edges = edges.size(1);
  auto vectors = at::empty({n_edges, 3}, pos.options());
  auto distances = at::empty({n_edges}, pos.options());
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "edge_vectors_cpu", [&] {
    gather_edges<scalar_t>(pos.data_ptr<scalar_t>(), cel.data_ptr<scalar_t>(), edges.data_ptr<int64_t>(),
                           edges.data_ptr<int64_t>() + n_edges, shf.data_ptr<int64_t>(), sys.data_ptr<int64_t>(),
                           vectors.data_ptr<scalar_t>(), distances.data_ptr<scalar_t>(), n_edges, pos.size(0),
                           cel.size(0));
  });
  return {vectors, distances};
}

std::tuple<at::Tensor, at::Tensor> edge_vectors_backward_cpu(const at::Tensor& grad_vectors,
                                                             const at::Tensor& edge_index, const at::Tensor& shifts,
                                                             const at::Tensor& system, int64_t n_atoms,
                                                             int64_t n_systems) {
  check_edge_vectors_backward_args(grad_vectors, edge_index, shifts, system, n_atoms, n_systems);
  const auto grad = grad_vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto shf = shifts.contiguous();
  const auto sys = system.contiguous();
  const int64_t n_edges = edges.size(1);
  auto grad_positions = at::zeros({n_atoms, 3}, grad.options());
  auto grad_cell = at::zeros({n_systems, 3, 3}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "edge_vectors_backward_cpu", [&] {
    scatter_edges<scalar_t>(grad.data_ptr<scalar_t>(), edges.data_ptr<int64_t>(), edges.data_ptr<int64_t>() + n_edges,
                            shf.data_ptr<int64_t>(), sys.data_ptr<int64_t>(), grad_positions.data_ptr<scalar_t>(),
                            grad_cell.data_ptr<scalar_t>(), n_edges, n_atoms, n_systems);
  });
  return {grad_positions, grad_cell};
}

}  // namespace

TORCH_LIBRARY_IMPL(gdeq_ext, CPU, m) {
  m.impl("edge_vectors", &edge_vectors_cpu);
  m.impl("edge_vectors_backward", &edge_vectors_backward_cpu);
}

}  // namespace gdeq_ext
