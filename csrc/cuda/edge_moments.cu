// CUDA kernels of the MLIP's edge op, its VJP and its second-order VJP (same per-edge math header as the CPU).
//
// Layout. A "group" of L lanes (L = 8, 16 or 32, the smallest power of two >= C, at most 32) walks a contiguous
// range of edges; lane l handles channel c = blockIdx.y·L + l (blockIdx.y tiles C > 32). Per-edge scalars (r, Y,
// the φ_k recurrence) are recomputed by every lane of the group: cheap, and it keeps everything in registers.
// * Receiver-indexed outputs (A, dG): neighbor lists are sorted by receiver, so a group accumulates A[i, c, :] in
//   10 registers while consecutive edges share i and flushes with atomicAdd when i changes: about two flushes per
//   atom instead of one atomic per edge, and still correct for any edge order (an unsorted list only flushes
//   more often).
// * Sender-indexed outputs (grad_u, du): one atomicAdd per (edge, channel), coalesced across the lanes.
// * Per-edge outputs (grad_vectors, dvec): each lane's 3-vector contribution, summed over the group's lanes with
//   shuffles; lane 0 adds it (atomically only because channel tiles > 1 add to the same edge).
// * Weight gradients (K, C): every thread keeps its channel's K partial sums in shared memory (its own column,
//   no atomics); at the end the block sums its groups into one (K, C) slice of a (blocks, K, C) buffer, and
//   at::sum reduces the blocks. The grid is capped at a few blocks per SM, so that buffer is small.
// Floating-point sums at flushes and in atomics are order-dependent: results agree with the CPU to round-off, not
// bit for bit.
//
// UNTESTED ON A GPU: written against the CPU kernels (tests/test_edge_moments.py runs the CUDA cases when a GPU
// is visible); it compiles for sm_90 here.
#include <ATen/Dispatch.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "gdeq_ext/edge_moments.h"

namespace gdeq_ext {
namespace {

using moments::EdgeGeometry;
using moments::kMoments;
using moments::RadialBasis;

constexpr int kThreads = 128;
constexpr int64_t kEdgesPerGroup = 16;  // about one atom's neighbourhood in silicon at r_c = 4 Å
constexpr int kBlocksPerSM = 8;

struct Plan {
  int lanes;          // L
  int64_t per_group;  // edges per group
  dim3 grid;          // (blocks, channel tiles)
};

Plan make_plan(int64_t n_edges, int64_t channels) {
  Plan plan;
  plan.lanes = channels <= 8 ? 8 : channels <= 16 ? 16 : 32;
  const int groups_per_block = kThreads / plan.lanes;
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted_groups = (n_edges + kEdgesPerGroup - 1) / kEdgesPerGroup;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((wanted_groups + groups_per_block - 1) / groups_per_block,
                                             static_cast<int64_t>(sms) * kBlocksPerSM));
  const int64_t groups = blocks * groups_per_block;
  plan.per_group = (n_edges + groups - 1) / groups;
  const int64_t tiles = (channels + plan.lanes - 1) / plan.lanes;
  TORCH_CHECK(tiles <= 65535, "gdeq_ext: edge_moments supports at most ", 65535 * 32, " channels");
  plan.grid = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles));
  return plan;
}

// Where this thread sits: its group's edge range, its channel, and the shuffle mask of its group.
struct Lane {
  int lane;       // 0 .. L-1
  int c;          // channel
  bool has_c;     // c < C (lanes past C still take part in the group's shuffles)
  unsigned mask;  // the group's lanes within the warp
  int64_t begin, end;
};

__device__ inline Lane locate(int lanes, int64_t per_group, int64_t n_edges, int channels) {
  Lane t;
  t.lane = threadIdx.x % lanes;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * (blockDim.x / lanes) + threadIdx.x / lanes;
  t.c = blockIdx.y * lanes + t.lane;
  t.has_c = t.c < channels;
  const int first_lane = (threadIdx.x % 32) / lanes * lanes;
  t.mask = lanes == 32 ? 0xffffffffu : (((1u << lanes) - 1u) << first_lane);
  const int64_t begin = group * per_group;
  t.begin = begin < n_edges ? begin : n_edges;
  t.end = t.begin + per_group < n_edges ? t.begin + per_group : n_edges;
  return t;
}

template <typename T>
__device__ inline T group_sum(T value, unsigned mask, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) value += __shfl_xor_sync(mask, value, offset, lanes);
  return value;
}

template <typename T>
__device__ inline void add_edge_vector(T* out, const T* local, const Lane& t, int lanes, bool tiled) {
  T sum[3];
#pragma unroll
  for (int d = 0; d < 3; ++d) sum[d] = group_sum(local[d], t.mask, lanes);
  if (t.lane != 0) return;
#pragma unroll
  for (int d = 0; d < 3; ++d) {
    if (tiled) {
      atomicAdd(out + d, sum[d]);
    } else {
      out[d] = sum[d];  // the only writer of this edge
    }
  }
}

template <typename T>
__device__ inline void flush_moments(T* dst, T* acc) {
#pragma unroll
  for (int m = 0; m < kMoments; ++m) {
    if (acc[m] != T(0)) atomicAdd(dst + m, acc[m]);
    acc[m] = T(0);
  }
}

// Sums each group's per-thread weight-gradient columns (shared, [k][thread]) into partial[blockIdx.x, k, c].
template <typename T>
__device__ inline void reduce_weight_partials(const T* acc, T* partial, int K, int C, int lanes) {
  __syncthreads();
  const int groups = blockDim.x / lanes;
  for (int idx = threadIdx.x; idx < K * lanes; idx += blockDim.x) {
    const int k = idx / lanes, l = idx % lanes;
    const int c = blockIdx.y * lanes + l;
    if (c >= C) continue;
    T sum = 0;
    for (int g = 0; g < groups; ++g) sum += acc[k * blockDim.x + g * lanes + l];
    partial[(static_cast<int64_t>(blockIdx.x) * K + k) * C + c] = sum;
  }
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
__global__ void forward_kernel(const T* __restrict__ vec, const int64_t* __restrict__ ei,
                               const int64_t* __restrict__ ej, const T* __restrict__ u, const T* __restrict__ W,
                               T* __restrict__ A, int64_t E, int64_t N, int C, int K, double cutoff, int lanes,
                               int64_t per_group) {
  const Lane t = locate(lanes, per_group, E, C);
  T acc[kMoments];
#pragma unroll
  for (int m = 0; m < kMoments; ++m) acc[m] = T(0);
  int64_t current = -1;
  for (int64_t e = t.begin; e < t.end; ++e) {
    const int64_t i = ei[e], j = ej[e];
    CUDA_KERNEL_ASSERT(i >= 0 && i < N && j >= 0 && j < N);
    if (i != current) {
      if (current >= 0 && t.has_c) flush_moments(A + (current * C + t.c) * kMoments, acc);
      current = i;
    }
    EdgeGeometry<T> g;
    if (!t.has_c || !moments::edge_geometry(vec + 3 * e, cutoff, g)) continue;
    RadialBasis<T> basis(g, cutoff);
    T R = 0;
    for (int k = 0; k < K; ++k, basis.next()) R += basis.value() * W[k * C + t.c];
    const T w = R * u[j * C + t.c];
    T Y[kMoments];
    moments::angular(g.n, Y);
#pragma unroll
    for (int m = 0; m < kMoments; ++m) acc[m] += w * Y[m];
  }
  if (current >= 0 && t.has_c) flush_moments(A + (current * C + t.c) * kMoments, acc);
}

// ------------------------------------------------------------------------------------------------ backward
template <typename T>
__global__ void backward_kernel(const T* __restrict__ G, const T* __restrict__ vec, const int64_t* __restrict__ ei,
                                const int64_t* __restrict__ ej, const T* __restrict__ u, const T* __restrict__ W,
                                T* __restrict__ grad_vec, T* __restrict__ grad_u, T* __restrict__ partial_W, int64_t E,
                                int64_t N, int C, int K, double cutoff, int lanes, int64_t per_group,
                                bool compute_vectors) {
  extern __shared__ unsigned char shared_raw[];
  T* acc_W = reinterpret_cast<T*>(shared_raw);  // [K][blockDim.x]
  for (int k = 0; k < K; ++k) acc_W[k * blockDim.x + threadIdx.x] = T(0);
  const Lane t = locate(lanes, per_group, E, C);
  const bool tiled = gridDim.y > 1;
  for (int64_t e = t.begin; e < t.end; ++e) {
    const int64_t i = ei[e], j = ej[e];
    CUDA_KERNEL_ASSERT(i >= 0 && i < N && j >= 0 && j < N);
    EdgeGeometry<T> g;
    if (!moments::edge_geometry(vec + 3 * e, cutoff, g)) continue;  // the same for the whole group
    T local[3] = {T(0), T(0), T(0)};
    if (t.has_c) {
      T Y[kMoments], Gc[kMoments];
      moments::angular(g.n, Y);
      const T* src = G + (i * C + t.c) * kMoments;
      T s = 0;
#pragma unroll
      for (int m = 0; m < kMoments; ++m) {
        Gc[m] = src[m];
        s += Gc[m] * Y[m];
      }
      const T uc = u[j * C + t.c];
      T R = 0, R1 = 0;
      {
        RadialBasis<T> basis(g, cutoff);
        for (int k = 0; k < K; ++k, basis.next()) {
          T phi, dphi;
          basis.values(phi, dphi);
          const T w = W[k * C + t.c];
          R += phi * w;
          R1 += dphi * w;
          acc_W[k * blockDim.x + threadIdx.x] += phi * uc * s;
        }
      }
      atomicAdd(grad_u + j * C + t.c, R * s);
      if (compute_vectors) {
        T P[kMoments], P1[kMoments];
#pragma unroll
        for (int m = 0; m < kMoments; ++m) {
          P[m] = uc * R * Gc[m];
          P1[m] = uc * R1 * Gc[m];
        }
        moments::add_moment_gradient(P, P1, g, local);
      }
    }
    if (compute_vectors) add_edge_vector(grad_vec + 3 * e, local, t, lanes, tiled);
  }
  reduce_weight_partials(acc_W, partial_W, K, C, lanes);
}

// ------------------------------------------------------------------------------------------------ double backward
// Formulas: see double_backward_kernel in csrc/cpu/edge_moments.cpp.
template <typename T>
__global__ void double_backward_kernel(const T* __restrict__ av, const T* __restrict__ au, const T* __restrict__ aW,
                                       const T* __restrict__ G, const T* __restrict__ vec,
                                       const int64_t* __restrict__ ei, const int64_t* __restrict__ ej,
                                       const T* __restrict__ u, const T* __restrict__ W, T* __restrict__ dG,
                                       T* __restrict__ dvec, T* __restrict__ du, T* __restrict__ partial_W, int64_t E,
                                       int64_t N, int C, int K, double cutoff, int lanes, int64_t per_group,
                                       bool compute_vectors) {
  extern __shared__ unsigned char shared_raw[];
  T* acc_W = reinterpret_cast<T*>(shared_raw);  // [K][blockDim.x]
  for (int k = 0; k < K; ++k) acc_W[k * blockDim.x + threadIdx.x] = T(0);
  const Lane t = locate(lanes, per_group, E, C);
  const bool tiled = gridDim.y > 1;
  T acc[kMoments];
#pragma unroll
  for (int m = 0; m < kMoments; ++m) acc[m] = T(0);
  int64_t current = -1;
  for (int64_t e = t.begin; e < t.end; ++e) {
    const int64_t i = ei[e], j = ej[e];
    CUDA_KERNEL_ASSERT(i >= 0 && i < N && j >= 0 && j < N);
    if (i != current) {
      if (current >= 0 && t.has_c) flush_moments(dG + (current * C + t.c) * kMoments, acc);
      current = i;
    }
    EdgeGeometry<T> g;
    if (!moments::edge_geometry(vec + 3 * e, cutoff, g)) continue;  // the same for the whole group
    T local[3] = {T(0), T(0), T(0)};
    if (t.has_c) {
      const T a[3] = {av[3 * e], av[3 * e + 1], av[3 * e + 2]};
      T Y[kMoments], DY[kMoments], Gc[kMoments];
      moments::angular(g.n, Y);
      const T rho = moments::angular_derivative(g, a, DY);
      const T* src = G + (i * C + t.c) * kMoments;
      T s = 0, tt = 0;
#pragma unroll
      for (int m = 0; m < kMoments; ++m) {
        Gc[m] = src[m];
        s += Gc[m] * Y[m];
        tt += Gc[m] * DY[m];
      }
      const T uc = u[j * C + t.c], auc = au[j * C + t.c];
      T R = 0, R1 = 0, R2 = 0, Q = 0, Q1 = 0;
      {
        RadialBasis<T> basis(g, cutoff);
        const T qs = rho * uc * s, qt = auc * s + uc * tt;
        for (int k = 0; k < K; ++k, basis.next()) {
          T phi, dphi, ddphi;
          basis.values(phi, dphi, ddphi);
          const T w = W[k * C + t.c], aw = aW[k * C + t.c];
          R += phi * w;
          R1 += dphi * w;
          R2 += ddphi * w;
          Q += phi * aw;
          Q1 += dphi * aw;
          acc_W[k * blockDim.x + threadIdx.x] += dphi * qs + phi * qt;
        }
      }
      const T a_y = (R1 * rho + Q) * uc + R * auc, a_dy = R * uc;
#pragma unroll
      for (int m = 0; m < kMoments; ++m) acc[m] += a_y * Y[m] + a_dy * DY[m];
      atomicAdd(du + j * C + t.c, (R1 * rho + Q) * s + R * tt);
      if (compute_vectors) {
        T P0[kMoments], P1[kMoments], P2[kMoments], H0[kMoments], H1[kMoments];
        const T h0 = Q * uc + R * auc, h1 = Q1 * uc + R1 * auc;
#pragma unroll
        for (int m = 0; m < kMoments; ++m) {
          P0[m] = uc * R * Gc[m];
          P1[m] = uc * R1 * Gc[m];
          P2[m] = uc * R2 * Gc[m];
          H0[m] = h0 * Gc[m];
          H1[m] = h1 * Gc[m];
        }
        moments::add_moment_hessian_vector(P0, P1, P2, g, a, local);
        moments::add_moment_gradient(H0, H1, g, local);
      }
    }
    if (compute_vectors) add_edge_vector(dvec + 3 * e, local, t, lanes, tiled);
  }
  if (current >= 0 && t.has_c) flush_moments(dG + (current * C + t.c) * kMoments, acc);
  reduce_weight_partials(acc_W, partial_W, K, C, lanes);
}

// ------------------------------------------------------------------------------------------------ entry points
size_t weight_shared_bytes(int64_t K, size_t element) {
  const size_t bytes = static_cast<size_t>(K) * kThreads * element;
  TORCH_CHECK(bytes <= 48 * 1024, "gdeq_ext: the CUDA edge_moments kernels support at most ",
              48 * 1024 / (kThreads * element), " radial functions for this dtype, got ", K);
  return bytes;
}

at::Tensor edge_moments_cuda(const at::Tensor& vectors, const at::Tensor& edge_index, const at::Tensor& u,
                             const at::Tensor& weights, double cutoff) {
  check_edge_moments_args(vectors, edge_index, u, weights, cutoff);
  const c10::cuda::CUDAGuard device_guard(vectors.device());
  const auto vec = vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto uu = u.contiguous();
  const auto W = weights.contiguous();
  const int64_t E = edges.size(1), N = uu.size(0), C = uu.size(1), K = W.size(0);
  auto A = at::zeros({N, C, kMoments}, vec.options());
  if (E == 0 || C == 0) return A;
  const Plan plan = make_plan(E, C);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "edge_moments_cuda", [&] {
    const int64_t* ei = edges.data_ptr<int64_t>();
    forward_kernel<scalar_t><<<plan.grid, kThreads, 0, stream>>>(
        vec.data_ptr<scalar_t>(), ei, ei + E, uu.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
        E, N, static_cast<int>(C), static_cast<int>(K), cutoff, plan.lanes, plan.per_group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return A;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_moments_backward_cuda(
    const at::Tensor& grad_moments, const at::Tensor& vectors, const at::Tensor& edge_index, const at::Tensor& u,
    const at::Tensor& weights, double cutoff, bool compute_vectors) {
  check_edge_moments_backward_args(grad_moments, vectors, edge_index, u, weights, cutoff);
  const c10::cuda::CUDAGuard device_guard(vectors.device());
  const auto G = grad_moments.contiguous();
  const auto vec = vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto uu = u.contiguous();
  const auto W = weights.contiguous();
  const int64_t E = edges.size(1), N = uu.size(0), C = uu.size(1), K = W.size(0);
  auto grad_vec = at::zeros_like(vec);
  auto grad_u = at::zeros_like(uu);
  if (E == 0 || C == 0 || K == 0) return {grad_vec, grad_u, at::zeros_like(W)};
  const Plan plan = make_plan(E, C);
  auto partial = at::zeros({static_cast<int64_t>(plan.grid.x), K, C}, vec.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "edge_moments_backward_cuda", [&] {
    const int64_t* ei = edges.data_ptr<int64_t>();
    const size_t shared = weight_shared_bytes(K, sizeof(scalar_t));
    backward_kernel<scalar_t><<<plan.grid, kThreads, shared, stream>>>(
        G.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), ei, ei + E, uu.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(),
        grad_vec.data_ptr<scalar_t>(), grad_u.data_ptr<scalar_t>(), partial.data_ptr<scalar_t>(), E, N,
        static_cast<int>(C), static_cast<int>(K), cutoff, plan.lanes, plan.per_group, compute_vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_vec, grad_u, at::sum(partial, 0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> edge_moments_double_backward_cuda(
    const at::Tensor& gg_vectors, const at::Tensor& gg_u, const at::Tensor& gg_weights, const at::Tensor& grad_moments,
    const at::Tensor& vectors, const at::Tensor& edge_index, const at::Tensor& u, const at::Tensor& weights,
    double cutoff, bool compute_vectors) {
  check_edge_moments_double_backward_args(gg_vectors, gg_u, gg_weights, grad_moments, vectors, edge_index, u, weights,
                                          cutoff);
  const c10::cuda::CUDAGuard device_guard(vectors.device());
  const auto av = gg_vectors.contiguous();
  const auto au = gg_u.contiguous();
  const auto aW = gg_weights.contiguous();
  const auto G = grad_moments.contiguous();
  const auto vec = vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto uu = u.contiguous();
  const auto W = weights.contiguous();
  const int64_t E = edges.size(1), N = uu.size(0), C = uu.size(1), K = W.size(0);
  auto dG = at::zeros_like(G);
  auto dvec = at::zeros_like(vec);
  auto du = at::zeros_like(uu);
  if (E == 0 || C == 0 || K == 0) return {dG, dvec, du, at::zeros_like(W)};
  const Plan plan = make_plan(E, C);
  auto partial = at::zeros({static_cast<int64_t>(plan.grid.x), K, C}, vec.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "edge_moments_double_backward_cuda", [&] {
    const int64_t* ei = edges.data_ptr<int64_t>();
    const size_t shared = weight_shared_bytes(K, sizeof(scalar_t));
    double_backward_kernel<scalar_t><<<plan.grid, kThreads, shared, stream>>>(
        av.data_ptr<scalar_t>(), au.data_ptr<scalar_t>(), aW.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
        vec.data_ptr<scalar_t>(), ei, ei + E, uu.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>(),
        dvec.data_ptr<scalar_t>(), du.data_ptr<scalar_t>(), partial.data_ptr<scalar_t>(), E, N, static_cast<int>(C),
        static_cast<int>(K), cutoff, plan.lanes, plan.per_group, compute_vectors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dG, dvec, du, at::sum(partial, 0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gdeq_ext, CUDA, m) {
  m.impl("edge_moments", &edge_moments_cuda);
  m.impl("edge_moments_backward", &edge_moments_backward_cuda);
  m.impl("edge_moments_double_backward", &edge_moments_double_backward_cuda);
}

}  // namespace gdeq_ext
