// Input checks shared by every kernel: one message format, naming the argument and the offending value.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace gdeq_ext {

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "gdeq_ext: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t size) {
  TORCH_CHECK(t.size(dim) == size, "gdeq_ext: ", name, " must have size ", size, " along dimension ", dim,
              ", got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "gdeq_ext: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "gdeq_ext: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "gdeq_ext: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// positions (n_atoms, 3) float32/float64 and cell (n_systems, 3, 3) of the same dtype, on the same device.
inline void check_positions_and_cell(const at::Tensor& positions, const at::Tensor& cell) {
  check_dim(positions, "positions", 2);
  check_size(positions, "positions", 1, 3);
  check_floating(positions, "positions");
  check_dim(cell, "cell", 3);
  check_size(cell, "cell", 1, 3);
  check_size(cell, "cell", 2, 3);
  TORCH_CHECK(cell.scalar_type() == positions.scalar_type(), "gdeq_ext: cell has dtype ", cell.scalar_type(),
              " but positions have ", positions.scalar_type());
  check_same_device(cell, "cell", positions, "positions");
}

}  // namespace gdeq_ext
