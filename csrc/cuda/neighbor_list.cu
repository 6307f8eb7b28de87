// CUDA kernels of the cell-list neighbor list: every structure of a batch in the same launches, and the
// decisions (wrapping, binning, candidate bins, the exact distance test, key packing) made by the same
// host/device functions as on CPU (gdeq_ext/neighbor_list.h), so CPU and CUDA return identical tensors.
//
//   setup_kernel   one block per structure: cell, wrapping, bounding box, grid, counting sort into bins;
//   search_kernel  one thread per atom: neighbor keys into row i of a (capacity x n_atoms) buffer, sorted
//                  in place; per-atom counts, plus the total and the largest count by warp-aggregated atomics;
//   write_kernel   one thread per atom: keys -> (i, j, shift) at the atom's prefix-sum offset.
//
// One host synchronization per call: reading {pairs, largest count, first error} (3 int64) back. If the
// largest count exceeds the buffer's capacity the search is re-run with exactly that capacity (counts do
// not depend on the capacity, so nothing needs reading again); pairs are never dropped. The capacity of the
// next call's first buffer is remembered per device.
#include <ATen/Dispatch.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>

#include "gdeq_ext/neighbor_list.h"

namespace gdeq_ext {
namespace {

using ull = unsigned long long;

constexpr int kSetupThreads = 256;  // power of two (block scan and reductions)
constexpr int kSearchThreads = 128;
constexpr int kMaxDevices = 64;

// Neighbors per atom of the next call's first buffer, per device (0: not yet known).
std::atomic<int64_t> g_capacity[kMaxDevices];

// status[0] += pairs, status[1] = max(count), status[2] = max(~word): the lowest error word wins.
__device__ void report_error(ull* status, int64_t structure, int code, int64_t detail) {
  const ull word =
      (static_cast<ull>(structure) << 40) | (static_cast<ull>(code) << 32) | static_cast<ull>(detail & 0xffffffffLL);
  atomicMax(status + 2, ~word);
}

// Block-wide reduction of one double (every thread calls it; the result is valid in every thread).
template <bool kMax>
__device__ double block_reduce(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double other = __shfl_down_sync(0xffffffffu, value, offset);
    value = kMax ? fmax(value, other) : fmin(value, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kSetupThreads / 32; ++w) value = kMax ? fmax(value, scratch[w]) : fmin(value, scratch[w]);
    scratch[0] = value;
  }
  __syncthreads();
  value = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return value;
}

// Inclusive scan of one int64 per thread across the block (Hillis-Steele; blocks are small).
__device__ int64_t block_inclusive_scan(int64_t value, int64_t* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int offset = 1; offset < kSetupThreads; offset <<= 1) {
    const int64_t add = threadIdx.x >= offset ? scratch[threadIdx.x - offset] : 0;
    __syncthreads();
    scratch[threadIdx.x] += add;
    __syncthreads();
  }
  value = scratch[threadIdx.x];
  __syncthreads();
  return value;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kSetupThreads)
    setup_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cell, const bool* __restrict__ pbc,
                 const int64_t* __restrict__ counts_end, int64_t n_atoms, int64_t n_systems, double cutoff,
                 nl::Grid* __restrict__ grids, int64_t* __restrict__ system, double* __restrict__ fw,
                 int64_t* __restrict__ offset, double* __restrict__ sorted_w, int64_t* __restrict__ sorted_local,
                 int64_t* __restrict__ bin_start, int64_t* __restrict__ bin_cursor, int64_t* __restrict__ atom_bin,
                 ull* __restrict__ status) {
  const int64_t s = blockIdx.x;
  const int tid = threadIdx.x;
  __shared__ nl::Grid g;
  __shared__ int error;
  __shared__ double reduce_scratch[kSetupThreads / 32];
  __shared__ int64_t scan_scratch[kSetupThreads];

  if (tid == 0) {
    const int64_t end = counts_end[s];
    const int64_t begin = s == 0 ? 0 : counts_end[s - 1];
    g.begin = begin;
    g.count = end - begin;
    g.bin_base = 2 * begin + 2 * s;
    g.n_bins = 0;
    int64_t detail = 0;
    int err = nl::kOk;
    if (g.count < 0 || begin < 0 || end > n_atoms || (s == n_systems - 1 && end != n_atoms)) err = nl::kBadCounts;
    if (err == nl::kOk) err = nl::setup_lattice(cell + 9 * s, pbc + 3 * s, g, detail);
    g.error = err;
    error = err;
    if (err != nl::kOk) {
      report_error(status, s, err, detail);
      grids[s] = g;
    }
  }
  __syncthreads();
  if (error != nl::kOk) return;

  // Wrap every atom; bounding box of the open axes and the largest coordinate (rounding margin).
  double lo[3], hi[3], max_abs = 0.0;
  for (int k = 0; k < 3; ++k) {
    lo[k] = INFINITY;
    hi[k] = -INFINITY;
  }
  for (int64_t a = tid; a < g.count; a += kSetupThreads) {
    const int64_t i = g.begin + a;
    system[i] = s;
    const int err = nl::wrap_atom(g, x + 3 * i, fw + 3 * i, offset + 3 * i);
    if (err != nl::kOk) {
      report_error(status, s, err, a);
      error = err;  // benign race: any non-zero value stops the block
      continue;
    }
    for (int k = 0; k < 3; ++k) {
      max_abs = fmax(max_abs, fabs(static_cast<double>(x[3 * i + k])));
      if (!g.periodic[k]) {
        lo[k] = fmin(lo[k], fw[3 * i + k]);
        hi[k] = fmax(hi[k], fw[3 * i + k]);
      }
    }
  }
  for (int k = 0; k < 3; ++k) {
    lo[k] = block_reduce<false>(lo[k], reduce_scratch);
    hi[k] = block_reduce<true>(hi[k], reduce_scratch);
  }
  max_abs = block_reduce<true>(max_abs, reduce_scratch);  // its barriers also publish `error`
  if (error != nl::kOk) {
    if (tid == 0) {
      g.error = error;
      grids[s] = g;
    }
    return;
  }
  if (tid == 0) {
    int64_t detail = 0;
    const int err = nl::size_grid<scalar_t>(g, lo, hi, max_abs, g.count, cutoff, detail);
    g.error = err;
    error = err;
    if (err != nl::kOk) report_error(status, s, err, detail);
    grids[s] = g;
  }
  __syncthreads();
  if (error != nl::kOk) return;

  // Counting sort into bins: count, scan, scatter (order inside a bin is arbitrary; keys are sorted later).
  int64_t* start = bin_start + g.bin_base;
  int64_t* cursor = bin_cursor + g.bin_base;
  for (int64_t b = tid; b <= g.n_bins; b += kSetupThreads) start[b] = 0;
  __syncthreads();
  for (int64_t a = tid; a < g.count; a += kSetupThreads) {
    const int64_t i = g.begin + a;
    const int64_t b = nl::bin_of(g, fw + 3 * i);
    atom_bin[i] = b;
    atomicAdd(reinterpret_cast<ull*>(start + b + 1), 1ull);
  }
  __syncthreads();
  int64_t carry = 0;
  for (int64_t first = 0; first < g.n_bins; first += kSetupThreads) {
    const int64_t b = first + tid;
    const int64_t value = b < g.n_bins ? start[b + 1] : 0;
    const int64_t inclusive = block_inclusive_scan(value, scan_scratch) + carry;
    if (b < g.n_bins) {
      start[b + 1] = inclusive;
      cursor[b] = inclusive - value;
    }
    carry += scan_scratch[kSetupThreads - 1];  // this chunk's total (scratch is rewritten after the barrier)
    __syncthreads();
  }
  __syncthreads();
  for (int64_t a = tid; a < g.count; a += kSetupThreads) {
    const int64_t i = g.begin + a;
    const int64_t slot = g.begin + static_cast<int64_t>(atomicAdd(reinterpret_cast<ull*>(cursor + atom_bin[i]), 1ull));
    nl::wrapped_cartesian(g, fw + 3 * i, sorted_w + 3 * slot);
    sorted_local[slot] = a;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kSearchThreads)
    search_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cell, const nl::Grid* __restrict__ grids,
                  const int64_t* __restrict__ system, const double* __restrict__ fw, const int64_t* __restrict__ offset,
                  const double* __restrict__ sorted_w, const int64_t* __restrict__ sorted_local,
                  const int64_t* __restrict__ bin_start, int64_t n_atoms, scalar_t cutoff, bool full, int64_t capacity,
                  uint64_t* __restrict__ keys, int64_t* __restrict__ counts, ull* __restrict__ status) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t count = 0;
  // status[2] != 0: an input error was found; nothing below would be meaningful (or in bounds).
  if (i < n_atoms && status[2] == 0) {
    const int64_t s = system[i];
    const nl::Grid& g = grids[s];
    nl::search_atom<scalar_t>(g, i - g.begin, x + 3 * g.begin, offset + 3 * g.begin, fw + 3 * g.begin, cell + 9 * s,
                              sorted_w + 3 * g.begin, sorted_local + g.begin, bin_start + g.bin_base, cutoff, full,
                              [&](uint64_t key) {
                                if (count < capacity) keys[count * n_atoms + i] = key;
                                ++count;
                              });
    if (count <= capacity) {  // insertion sort of column i (an overflowing search is re-run anyway)
      for (int64_t k = 1; k < count; ++k) {
        const uint64_t key = keys[k * n_atoms + i];
        int64_t hole = k;
        while (hole > 0 && keys[(hole - 1) * n_atoms + i] > key) {
          keys[hole * n_atoms + i] = keys[(hole - 1) * n_atoms + i];
          --hole;
        }
        keys[hole * n_atoms + i] = key;
      }
    }
  }
  if (i < n_atoms) counts[i] = count;
  ull total = static_cast<ull>(count), largest = static_cast<ull>(count);
  for (int offset_ = 16; offset_ > 0; offset_ >>= 1) {
    total += __shfl_down_sync(0xffffffffu, total, offset_);
    largest = max(largest, __shfl_down_sync(0xffffffffu, largest, offset_));
  }
  if ((threadIdx.x & 31) == 0 && largest > 0) {
    atomicAdd(status, total);
    atomicMax(status + 1, largest);
  }
}

__global__ void write_kernel(const uint64_t* __restrict__ keys, const int64_t* __restrict__ counts,
                             const int64_t* __restrict__ counts_inclusive, const nl::Grid* __restrict__ grids,
                             const int64_t* __restrict__ system, const int64_t* __restrict__ offset, int64_t n_atoms,
                             int64_t* __restrict__ edge_i, int64_t* __restrict__ edge_j, int64_t* __restrict__ shifts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_atoms) return;
  const int64_t count = counts[i];
  const int64_t first = counts_inclusive[i] - count;
  const int64_t begin = grids[system[i]].begin;
  const int64_t* oi = offset + 3 * i;
  for (int64_t k = 0; k < count; ++k) {
    const uint64_t key = keys[k * n_atoms + i];
    const int64_t j = begin + nl::key_atom(key);
    int64_t image[3];
    nl::key_image(key, image);
    const int64_t e = first + k;
    edge_i[e] = i;
    edge_j[e] = j;
    for (int d = 0; d < 3; ++d) shifts[3 * e + d] = image[d] + oi[d] - offset[3 * j + d];
  }
}

unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// First buffer: the last call's largest count plus slack, else a density estimate (0.1 atoms/Å^3, denser
// than any element at ambient pressure, in a sphere of radius cutoff).
int64_t first_capacity(int device, double cutoff, int64_t requested) {
  if (requested > 0) return requested;
  const int64_t remembered = (device >= 0 && device < kMaxDevices) ? g_capacity[device].load() : 0;
  if (remembered > 0) return remembered + remembered / 4 + 4;
  const double estimate = 4.0 / 3.0 * M_PI * cutoff * cutoff * cutoff * 0.1 + 16.0;
  return static_cast<int64_t>(std::min(std::max(estimate, 16.0), 4096.0));
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& positions, const at::Tensor& cell, const at::Tensor& pbc,
                                       const at::Tensor& counts, double cutoff, bool full, int64_t requested) {
  const int64_t n_atoms = positions.size(0);
  const int64_t n_systems = cell.size(0);
  const auto long_options = positions.options().dtype(at::kLong);
  const auto double_options = positions.options().dtype(at::kDouble);
  if (n_systems == 0) {
    TORCH_CHECK_VALUE(n_atoms == 0, "gdeq_ext.neighbor_list: ", n_atoms, " positions but no structure");
    return {at::empty({2, 0}, long_options), at::empty({0, 3}, long_options)};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = positions.device().index();

  auto status = at::zeros({3}, long_options);
  auto counts_end = at::cumsum(counts, 0);
  auto grids = at::empty({n_systems * static_cast<int64_t>(sizeof(nl::Grid))}, positions.options().dtype(at::kByte));
  auto system = at::full({n_atoms}, -1, long_options);
  auto fw = at::empty({n_atoms, 3}, double_options);
  auto offset = at::empty({n_atoms, 3}, long_options);
  auto sorted_w = at::empty({n_atoms, 3}, double_options);
  auto sorted_local = at::empty({n_atoms}, long_options);
  auto atom_bin = at::empty({n_atoms}, long_options);
  auto bin_start = at::empty({2 * n_atoms + 2 * n_systems}, long_options);
  auto bin_cursor = at::empty({2 * n_atoms + 2 * n_systems}, long_options);
  auto* grid_ptr = reinterpret_cast<nl::Grid*>(grids.data_ptr<uint8_t>());
  auto* status_ptr = reinterpret_cast<ull*>(status.data_ptr<int64_t>());

  setup_kernel<scalar_t><<<static_cast<unsigned>(n_systems), kSetupThreads, 0, stream>>>(
      positions.data_ptr<scalar_t>(), cell.data_ptr<scalar_t>(), pbc.data_ptr<bool>(), counts_end.data_ptr<int64_t>(),
      n_atoms, n_systems, cutoff, grid_ptr, system.data_ptr<int64_t>(), fw.data_ptr<double>(),
      offset.data_ptr<int64_t>(), sorted_w.data_ptr<double>(), sorted_local.data_ptr<int64_t>(),
      bin_start.data_ptr<int64_t>(), bin_cursor.data_ptr<int64_t>(), atom_bin.data_ptr<int64_t>(), status_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const scalar_t cut = static_cast<scalar_t>(cutoff);
  auto per_atom = at::empty({n_atoms}, long_options);
  auto search = [&](int64_t capacity, at::Tensor& keys) {
    keys = at::empty({std::max<int64_t>(capacity * n_atoms, 1)}, long_options);
    if (n_atoms == 0) return;
    search_kernel<scalar_t><<<blocks_for(n_atoms, kSearchThreads), kSearchThreads, 0, stream>>>(
        positions.data_ptr<scalar_t>(), cell.data_ptr<scalar_t>(), grid_ptr, system.data_ptr<int64_t>(),
        fw.data_ptr<double>(), offset.data_ptr<int64_t>(), sorted_w.data_ptr<double>(),
        sorted_local.data_ptr<int64_t>(), bin_start.data_ptr<int64_t>(), n_atoms, cut, full, capacity,
        reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), per_atom.data_ptr<int64_t>(), status_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  int64_t capacity = std::max<int64_t>(first_capacity(device, cutoff, requested), 1);
  at::Tensor keys;
  search(capacity, keys);
  auto per_atom_inclusive = at::cumsum(per_atom, 0);

  // The one host synchronization of the call.
  const auto host = status.to(at::kCPU);
  const int64_t* h = host.data_ptr<int64_t>();
  const ull error = static_cast<ull>(h[2]);
  if (error != 0) {
    const ull word = ~error;
    TORCH_CHECK_VALUE(false, nl::error_message(static_cast<int>((word >> 32) & 0xff), static_cast<int64_t>(word >> 40),
                                               static_cast<int64_t>(word & 0xffffffffull)));
  }
  const int64_t n_edges = h[0], largest = h[1];
  if (device >= 0 && device < kMaxDevices) g_capacity[device].store(std::max<int64_t>(largest, 1));
  if (largest > capacity) {  // overflow: re-run with the exact capacity; per-atom counts are unchanged
    capacity = largest;
    search(capacity, keys);
  }

  auto edge_index = at::empty({2, n_edges}, long_options);
  auto shifts = at::empty({n_edges, 3}, long_options);
  if (n_edges > 0) {
    write_kernel<<<blocks_for(n_atoms, kSearchThreads), kSearchThreads, 0, stream>>>(
        reinterpret_cast<const uint64_t*>(keys.data_ptr<int64_t>()), per_atom.data_ptr<int64_t>(),
        per_atom_inclusive.data_ptr<int64_t>(), grid_ptr, system.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
        n_atoms, edge_index.data_ptr<int64_t>(), edge_index.data_ptr<int64_t>() + n_edges, shifts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {edge_index, shifts};
}

std::tuple<at::Tensor, at::Tensor> neighbor_list_cuda(const at::Tensor& positions, const at::Tensor& cell,
                                                      const at::Tensor& pbc, const at::Tensor& n_atoms_per_system,
                                                      double cutoff, bool full, int64_t initial_capacity) {
  check_neighbor_list_args(positions, cell, pbc, n_atoms_per_system, cutoff);
  const c10::cuda::CUDAGuard device_guard(positions.device());
  const auto pos = positions.contiguous();
  const auto cel = cell.contiguous();
  const auto per = pbc.contiguous();
  const auto counts = n_atoms_per_system.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "neighbor_list_cuda",
                             [&] { out = run<scalar_t>(pos, cel, per, counts, cutoff, full, initial_capacity); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdeq_ext, CUDA, m) {
  m.impl("neighbor_list", &neighbor_list_cuda);
}

}  // namespace gdeq_ext
