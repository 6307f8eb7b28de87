// Arithmetic with the same roundings on the host and the device, and the one edge-vector formula built from it.
//
// nvcc contracts a * b + c into a fused multiply-add by default and g++ on x86-64 (without -mfma) never does, so
// the same expression can round differently on the GPU and the CPU. The _rn intrinsics forbid the contraction:
// every kernel that computes an edge vector (the gather of edge_vectors on CPU and CUDA, and the cutoff test of
// the neighbor list on both) calls edge_vector() below, so a pair the list keeps has the same vector and distance
// everywhere, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GDEQ_HD __host__ __device__ __forceinline__
#else
#define GDEQ_HD inline
#endif

namespace gdeq_ext {

GDEQ_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
GDEQ_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GDEQ_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GDEQ_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
// IEEE square roots are correctly rounded on the host and (double; float with _rn) on the device.
GDEQ_HD double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(a);
#else
  return std::sqrt(a);
#endif
}
GDEQ_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// r_ij = x_j - x_i + S · cell, term by term: v_d = ((x_j - x_i) + S_0 c_0d) + S_1 c_1d) + S_2 c_2d, and
// |r_ij| = sqrt((v_0^2 + v_1^2) + v_2^2), in the input dtype. Writes v (3) and returns |r_ij|.
template <typename scalar_t>
GDEQ_HD scalar_t edge_vector(const scalar_t* xi, const scalar_t* xj, const scalar_t* cell, const int64_t* shift,
                             scalar_t* v) {
  const scalar_t s0 = static_cast<scalar_t>(shift[0]);
  const scalar_t s1 = static_cast<scalar_t>(shift[1]);
  const scalar_t s2 = static_cast<scalar_t>(shift[2]);
  scalar_t norm2 = 0;
  for (int d = 0; d < 3; ++d) {
    scalar_t value = add_rn(xj[d], -xi[d]);
    value = add_rn(value, mul_rn(s0, cell[d]));
    value = add_rn(value, mul_rn(s1, cell[3 + d]));
    value = add_rn(value, mul_rn(s2, cell[6 + d]));
    v[d] = value;
    norm2 = add_rn(norm2, mul_rn(value, value));
  }
  return sqrt_rn(norm2);
}

}  // namespace gdeq_ext
