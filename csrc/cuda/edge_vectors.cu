// CUDA kernels of the edge-vector gather and its adjoint scatter.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "gdeq_ext/edge_vectors.h"
#include "gdeq_ext/exact_math.h"

namespace gdeq_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void gather_edges_kernel(const scalar_t* __restrict__ pos, const scalar_t* __restrict__ cell,
                                    const int64_t* __restrict__ edge_i, const int64_t* __restrict__ edge_j,
                                    const int64_t* __restrict__ shifts, const int64_t* __restrict__ system,
                                    scalar_t* __restrict__ vectors, scalar_t* __restrict__ distances, int64_t n_edges,
                                    int64_t n_atoms, int64_t n_systems) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n_edges) return;
  const int64_t i = edge_i[e], j = edge_j[e];
  CUDA_KERNEL_ASSERT(i >= 0 && i < n_atoms && j >= 0 && j < n_atoms);
  const int64_t s = system[i];
  CUDA_KERNEL_ASSERT(s >= 0 && s < n_systems);
  // The one formula (gdeq_ext/exact_math.h, no FMA contraction): the same vector and distance as the CPU kernel
  // and the neighbor list's cutoff test.
  distances[e] = edge_vector(pos + 3 * i, pos + 3 * j, cell + 9 * s, shifts + 3 * e, vectors + 3 * e);
}

// Cell gradients: every edge of a structure adds to the same 9 numbers, so lanes of a warp that share a
// structure (the common case: edges are grouped by structure) reduce in registers before one atomic each.
template <typename scalar_t>
__global__ void scatter_edges_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ edge_i,
                                     const int64_t* __restrict__ edge_j, const int64_t* __restrict__ shifts,
                                     const int64_t* __restrict__ system, scalar_t* __restrict__ grad_pos,
                                     scalar_t* __restrict__ grad_cell, int64_t n_edges, int64_t n_atoms,
                                     int64_t n_systems) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = e < n_edges;
  int64_t s = -1;
  scalar_t contribution[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  if (active) {
    const int64_t i = edge_i[e], j = edge_j[e];
    CUDA_KERNEL_ASSERT(i >= 0 && i < n_atoms && j >= 0 && j < n_atoms);
    s = system[i];
    CUDA_KERNEL_ASSERT(s >= 0 && s < n_systems);
    const scalar_t g[3] = {grad[3 * e], grad[3 * e + 1], grad[3 * e + 2]};
#pragma unroll
    for (int d = 0; d < 3; ++d) {
      atomicAdd(grad_pos + 3 * j + d, g[d]);
      atomicAdd(grad_pos + 3 * i + d, -g[d]);
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const scalar_t shift = static_cast<scalar_t>(shifts[3 * e + a]);
#pragma unroll
      for (int d = 0; d < 3; ++d) contribution[3 * a + d] = shift * g[d];
    }
  }
  // Every lane of the warp takes part in the shuffles (inactive tail lanes contribute zeros).
  const unsigned lanes = __ballot_sync(0xffffffffu, active);
  if (lanes == 0) return;  // the whole warp is past the end
  const int64_t first = __shfl_sync(0xffffffffu, s, __ffs(lanes) - 1);
  if (!active) s = first;
  if (__all_sync(0xffffffffu, s == first)) {
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      scalar_t value = contribution[k];
      for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
      contribution[k] = value;
    }
    if ((threadIdx.x & 31) != 0) return;  // lane 0 holds the warp's sum
  } else if (!active) {
    return;
  }
#pragma unroll
  for (int k = 0; k < 9; ++k) {
    if (contribution[k] != scalar_t(0)) atomicAdd(grad_cell + 9 * s + k, contribution[k]);
  }
}

int blocks_for(int64_t n) {
  return static_cast<int>((n + kThreads - 1) / kThreads);
}

std::tuple<at::Tensor, at::Tensor> edge_vectors_cuda(const at::Tensor& positions, const at::Tensor& cell,
                                                     const at::Tensor& edge_index, const at::Tensor& shifts,
                                                     const at::Tensor& system) {
  check_edge_vectors_args(positions, cell, edge_index, shifts, system);
  const c10::cuda::CUDAGuard device_guard(positions.device());
  const auto pos = positions.contiguous();
  const auto cel = cell.contiguous();
  const auto edges = edge_index.contiguous();
  const auto shf = shifts.contiguous();
  const auto sys = system.contiguous();
  const int64_t n_edges = edges.size(1);
  auto vectors = at::empty({n_edges, 3}, pos.options());
  auto distances = at::empty({n_edges}, pos.options());
  if (n_edges == 0) return {vectors, distances};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "edge_vectors_cuda", [&] {
    gather_edges_kernel<scalar_t><<<blocks_for(n_edges), kThreads, 0, stream>>>(
        pos.data_ptr<scalar_t>(), cel.data_ptr<scalar_t>(), edges.data_ptr<int64_t>(),
        edges.data_ptr<int64_t>() + n_edges, shf.data_ptr<int64_t>(), sys.data_ptr<int64_t>(),
        vectors.data_ptr<scalar_t>(), distances.data_ptr<scalar_t>(), n_edges, pos.size(0), cel.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {vectors, distances};
}

std::tuple<at::Tensor, at::Tensor> edge_vectors_backward_cuda(const at::Tensor& grad_vectors,
                                                              const at::Tensor& edge_index, const at::Tensor& shifts,
                                                              const at::Tensor& system, int64_t n_atoms,
                                                              int64_t n_systems) {
  check_edge_vectors_backward_args(grad_vectors, edge_index, shifts, system, n_atoms, n_systems);
  const c10::cuda::CUDAGuard device_guard(grad_vectors.device());
  const auto grad = grad_vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto shf = shifts.contiguous();
  const auto sys = system.contiguous();
  const int64_t n_edges = edges.size(1);
  auto grad_positions = at::zeros({n_atoms, 3}, grad.options());
  auto grad_cell = at::zeros({n_systems, 3, 3}, grad.options());
  if (n_edges == 0) return {grad_positions, grad_cell};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "edge_vectors_backward_cuda", [&] {
    scatter_edges_kernel<scalar_t><<<blocks_for(n_edges), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), edges.data_ptr<int64_t>(), edges.data_ptr<int64_t>() + n_edges,
        shf.data_ptr<int64_t>(), sys.data_ptr<int64_t>(), grad_positions.data_ptr<scalar_t>(),
        grad_cell.data_ptr<scalar_t>(), n_edges, n_atoms, n_systems);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_positions, grad_cell};
}

}  // namespace

TORCH_LIBRARY_IMPL(gdeq_ext, CUDA, m) {
  m.impl("edge_vectors", &edge_vectors_cuda);
  m.impl("edge_vectors_backward", &edge_vectors_backward_cuda);
}

}  // namespace gdeq_ext
