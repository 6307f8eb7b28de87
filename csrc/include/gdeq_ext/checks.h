// Input checks shared by every kernel: one message format, naming the argument and the offending value.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>

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

}  // namespace gdeq_ext
