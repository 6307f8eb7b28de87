// CPU kernel of the cell-list neighbor list (the search itself is in gdeq_ext/neighbor_list.h, shared with
// CUDA). Three phases, none of which takes a lock:
//   1. per structure (structures in parallel): cell, wrapping, grid, counting sort of atoms into bins;
//   2. per atom (contiguous chunks of atoms in parallel): neighbor keys into the chunk's own buffer, each
//      atom's keys sorted by (j, image);
//   3. a prefix sum over per-atom counts, then every chunk decodes its keys into the output in parallel.
#include "gdeq_ext/neighbor_list.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace gdeq_ext {
namespace {

constexpr int64_t kAtomsPerChunk = 512;

// Everything phase 1 produces, indexed by global atom or by structure.
struct Workspace {
  std::vector<nl::Grid> grids;        // per structure
  std::vector<int64_t> detail;        // per structure: the atom or axis an error refers to
  std::vector<int64_t> system;        // per atom
  std::vector<double> fw;             // 3 per atom: wrapped fractional coordinates
  std::vector<int64_t> offset;        // 3 per atom: o, with f = o + fw
  std::vector<double> sorted_w;       // 3 per atom: wrapped Cartesian positions, in bin order
  std::vector<int64_t> sorted_local;  // per atom: local index of the atom at each bin-ordered slot
  std::vector<int64_t> bin_start;     // per structure n_bins + 1 entries at grids[s].bin_base
};

// Phase 1 for structure s. Errors are recorded in the grid (and detail), never thrown from a worker.
template <typename scalar_t>
void bin_structure(int64_t s, const scalar_t* x, const scalar_t* cell, const bool* pbc, double cutoff, Workspace& ws,
                   std::vector<int64_t>& scratch) {
  nl::Grid& g = ws.grids[s];
  g.n_bins = 0;
  int64_t detail = 0;
  g.error = nl::setup_lattice(cell + 9 * s, pbc + 3 * s, g, detail);
  if (g.error != nl::kOk) {
    ws.detail[s] = detail;
    return;
  }
  double lo[3], hi[3];
  for (int k = 0; k < 3; ++k) {
    lo[k] = std::numeric_limits<double>::infinity();
    hi[k] = -std::numeric_limits<double>::infinity();
  }
  double max_abs = 0.0;
  for (int64_t a = 0; a < g.count; ++a) {
    const int64_t i = g.begin + a;
    ws.system[i] = s;
    g.error = nl::wrap_atom(g, x + 3 * i, ws.fw.data() + 3 * i, ws.offset.data() + 3 * i);
    if (g.error != nl::kOk) {
      ws.detail[s] = a;
      return;
    }
    for (int k = 0; k < 3; ++k) {
      max_abs = std::max(max_abs, std::abs(static_cast<double>(x[3 * i + k])));
      if (!g.periodic[k]) {
        lo[k] = std::min(lo[k], ws.fw[3 * i + k]);
        hi[k] = std::max(hi[k], ws.fw[3 * i + k]);
      }
    }
  }
  g.error = nl::size_grid<scalar_t>(g, lo, hi, max_abs, g.count, cutoff, detail);
  if (g.error != nl::kOk) {
    ws.detail[s] = detail;
    return;
  }
  // Counting sort of the structure's atoms into bins.
  int64_t* start = ws.bin_start.data() + g.bin_base;
  std::fill(start, start + g.n_bins + 1, 0);
  scratch.resize(g.count);
  for (int64_t a = 0; a < g.count; ++a) {
    scratch[a] = nl::bin_of(g, ws.fw.data() + 3 * (g.begin + a));
    ++start[scratch[a] + 1];
  }
  for (int64_t b = 0; b < g.n_bins; ++b) start[b + 1] += start[b];
  std::vector<int64_t> cursor(start, start + g.n_bins);
  for (int64_t a = 0; a < g.count; ++a) {
    const int64_t slot = g.begin + cursor[scratch[a]]++;
    nl::wrapped_cartesian(g, ws.fw.data() + 3 * (g.begin + a), ws.sorted_w.data() + 3 * slot);
    ws.sorted_local[slot] = a;
  }
}

// Neighbors per atom are few (~30): insertion sort beats std::sort there.
void sort_keys(uint64_t* first, uint64_t* last) {
  if (last - first > 48) {
    std::sort(first, last);
    return;
  }
  for (uint64_t* it = first + 1; it < last; ++it) {
    const uint64_t key = *it;
    uint64_t* hole = it;
    while (hole > first && *(hole - 1) > key) {
      *hole = *(hole - 1);
      --hole;
    }
    *hole = key;
  }
}

void check_counts(const int64_t* counts, int64_t n_systems, int64_t n_atoms) {
  int64_t total = 0;
  for (int64_t s = 0; s < n_systems; ++s) {
    TORCH_CHECK_VALUE(counts[s] >= 0, "gdeq_ext.neighbor_list: structure ", s, ": n_atoms_per_system is negative (",
                      counts[s], ")");
    total += counts[s];
  }
  TORCH_CHECK_VALUE(total == n_atoms, "gdeq_ext.neighbor_list: n_atoms_per_system sums to ", total,
                    " but positions has ", n_atoms, " rows");
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& positions, const at::Tensor& cell, const at::Tensor& pbc,
                                       const at::Tensor& counts, double cutoff, bool full) {
  const scalar_t* x = positions.data_ptr<scalar_t>();
  const scalar_t* c = cell.data_ptr<scalar_t>();
  const bool* p = pbc.data_ptr<bool>();
  const int64_t* count = counts.data_ptr<int64_t>();
  const int64_t n_atoms = positions.size(0);
  const int64_t n_systems = cell.size(0);
  check_counts(count, n_systems, n_atoms);

  Workspace ws;
  ws.grids.resize(n_systems);
  ws.detail.assign(n_systems, 0);
  ws.system.resize(n_atoms);
  ws.fw.resize(3 * n_atoms);
  ws.offset.resize(3 * n_atoms);
  ws.sorted_w.resize(3 * n_atoms);
  ws.sorted_local.resize(n_atoms);
  ws.bin_start.resize(2 * n_atoms + 2 * n_systems);
  for (int64_t s = 0, begin = 0; s < n_systems; begin += count[s], ++s) {
    ws.grids[s].begin = begin;
    ws.grids[s].count = count[s];
    ws.grids[s].bin_base = 2 * begin + 2 * s;  // n_bins + 1 <= 2 count + 2 entries each
  }

  // Phase 1. Grain: enough atoms per task that small structures do not drown in scheduling.
  const int64_t atoms_per_system = std::max<int64_t>(1, n_atoms / std::max<int64_t>(1, n_systems));
  at::parallel_for(0, n_systems, std::max<int64_t>(1, 2048 / atoms_per_system), [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> scratch;
    for (int64_t s = lo; s < hi; ++s) bin_structure<scalar_t>(s, x, c, p, cutoff, ws, scratch);
  });
  for (int64_t s = 0; s < n_systems; ++s) {  // the first structure at fault, whatever the thread timing
    TORCH_CHECK_VALUE(ws.grids[s].error == nl::kOk, nl::error_message(ws.grids[s].error, s, ws.detail[s]));
  }

  // Phase 2.
  const scalar_t cut = static_cast<scalar_t>(cutoff);
  // Chunks of >= kAtomsPerChunk atoms: small inputs stay on the calling thread (waking an OpenMP team costs
  // more than searching a few hundred atoms, and much more on a loaded machine).
  const int64_t n_chunks = std::min<int64_t>((n_atoms + kAtomsPerChunk - 1) / kAtomsPerChunk,
                                             4 * static_cast<int64_t>(at::get_num_threads()));
  std::vector<std::vector<uint64_t>> keys(n_chunks);
  std::vector<int64_t> per_atom(n_atoms);
  auto chunk_begin = [&](int64_t chunk) { return chunk * n_atoms / n_chunks; };
  at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t chunk = lo; chunk < hi; ++chunk) {
      std::vector<uint64_t>& out = keys[chunk];
      out.reserve(32 * (chunk_begin(chunk + 1) - chunk_begin(chunk)));
      for (int64_t i = chunk_begin(chunk); i < chunk_begin(chunk + 1); ++i) {
        const int64_t s = ws.system[i];
        const nl::Grid& g = ws.grids[s];
        const size_t first = out.size();
        nl::search_atom<scalar_t>(g, i - g.begin, x + 3 * g.begin, ws.offset.data() + 3 * g.begin,
                                  ws.fw.data() + 3 * g.begin, c + 9 * s, ws.sorted_w.data() + 3 * g.begin,
                                  ws.sorted_local.data() + g.begin, ws.bin_start.data() + g.bin_base, cut, full,
                                  [&](uint64_t key) { out.push_back(key); });
        sort_keys(out.data() + first, out.data() + out.size());
        per_atom[i] = static_cast<int64_t>(out.size() - first);
      }
    }
  });

  // Phase 3.
  std::vector<int64_t> first_edge(n_atoms + 1, 0);
  for (int64_t i = 0; i < n_atoms; ++i) first_edge[i + 1] = first_edge[i] + per_atom[i];
  const int64_t n_edges = first_edge[n_atoms];
  auto index_options = positions.options().dtype(at::kLong);
  auto edge_index = at::empty({2, n_edges}, index_options);
  auto shifts = at::empty({n_edges, 3}, index_options);
  int64_t* edge_i = edge_index.data_ptr<int64_t>();
  int64_t* edge_j = edge_i + n_edges;
  int64_t* shift = shifts.data_ptr<int64_t>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t chunk = lo; chunk < hi; ++chunk) {
      const uint64_t* key = keys[chunk].data();
      for (int64_t i = chunk_begin(chunk); i < chunk_begin(chunk + 1); ++i) {
        const nl::Grid& g = ws.grids[ws.system[i]];
        const int64_t* oi = ws.offset.data() + 3 * i;
        for (int64_t e = first_edge[i]; e < first_edge[i + 1]; ++e, ++key) {
          const int64_t j = g.begin + nl::key_atom(*key);
          const int64_t* oj = ws.offset.data() + 3 * j;
          int64_t image[3];
          nl::key_image(*key, image);
          edge_i[e] = i;
          edge_j[e] = j;
          for (int k = 0; k < 3; ++k) shift[3 * e + k] = image[k] + oi[k] - oj[k];
        }
      }
    }
  });
  return {edge_index, shifts};
}

std::tuple<at::Tensor, at::Tensor> neighbor_list_cpu(const at::Tensor& positions, const at::Tensor& cell,
                                                     const at::Tensor& pbc, const at::Tensor& n_atoms_per_system,
                                                     double cutoff, bool full, int64_t initial_capacity) {
  (void)initial_capacity;  // CPU buffers grow as needed; the hint only sizes the GPU's first buffer
  check_neighbor_list_args(positions, cell, pbc, n_atoms_per_system, cutoff);
  const auto pos = positions.contiguous();
  const auto cel = cell.contiguous();
  const auto per = pbc.contiguous();
  const auto counts = n_atoms_per_system.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "neighbor_list_cpu",
                             [&] { out = run<scalar_t>(pos, cel, per, counts, cutoff, full); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdeq_ext, CPU, m) {
  m.impl("neighbor_list", &neighbor_list_cpu);
}

}  // namespace gdeq_ext
