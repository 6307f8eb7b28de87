// Shared argument checks of the edge-vector ops (CPU and CUDA kernels check the same things).
#pragma once

#include "gdeq_ext/checks.h"

namespace gdeq_ext {

inline void check_edge_vectors_args(const at::Tensor& positions, const at::Tensor& cell, const at::Tensor& edge_index,
                                    const at::Tensor& shifts, const at::Tensor& system) {
  check_positions_and_cell(positions, cell);
  check_dim(edge_index, "edge_index", 2);
  check_size(edge_index, "edge_index", 0, 2);
  check_dtype(edge_index, "edge_index", at::kLong);
  check_dim(shifts, "shifts", 2);
  check_size(shifts, "shifts", 0, edge_index.size(1));
  check_size(shifts, "shifts", 1, 3);
  check_dtype(shifts, "shifts", at::kLong);
  check_dim(system, "system", 1);
  check_size(system, "system", 0, positions.size(0));
  check_dtype(system, "system", at::kLong);
  check_same_device(edge_index, "edge_index", positions, "positions");
  check_same_device(shifts, "shifts", positions, "positions");
  check_same_device(system, "system", positions, "positions");
}

inline void check_edge_vectors_backward_args(const at::Tensor& grad_vectors, const at::Tensor& edge_index,
                                             const at::Tensor& shifts, const at::Tensor& system, int64_t n_atoms,
                                             int64_t n_systems) {
  check_dim(grad_vectors, "grad_vectors", 2);
  check_size(grad_vectors, "grad_vectors", 1, 3);
  check_floating(grad_vectors, "grad_vectors");
  check_dim(edge_index, "edge_index", 2);
  check_size(edge_index, "edge_index", 0, 2);
  check_size(edge_index, "edge_index", 1, grad_vectors.size(0));
  check_dtype(edge_index, "edge_index", at::kLong);
  check_size(shifts, "shifts", 0, grad_vectors.size(0));
  check_size(shifts, "shifts", 1, 3);
  check_dtype(shifts, "shifts", at::kLong);
  check_dim(system, "system", 1);
  check_size(system, "system", 0, n_atoms);
  check_dtype(system, "system", at::kLong);
  TORCH_CHECK(n_systems >= 0, "gdeq_ext: n_systems must be non-negative, got ", n_systems);
  check_same_device(edge_index, "edge_index", grad_vectors, "grad_vectors");
  check_same_device(shifts, "shifts", grad_vectors, "grad_vectors");
  check_same_device(system, "system", grad_vectors, "grad_vectors");
}

}  // namespace gdeq_ext
