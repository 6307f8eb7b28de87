// The cell-list neighbor search shared by the CPU (csrc/cpu/neighbor_list.cpp) and CUDA
// (csrc/cuda/neighbor_list.cu) kernels. Every step that decides *which* pairs are found lives here as a
// host/device function, so the CPU tests exercise the very code the GPU runs; the two .cpp/.cu files only
// differ in how they schedule the work (threads over structures and atoms vs. blocks and threads).
//
// Per structure:
//   1. complete the cell (non-periodic axes get unit vectors orthogonal to the periodic ones) and invert it;
//   2. wrap every atom into the cell on periodic axes (fractional coordinate f = o + fw, o integer, fw in
//      [0, 1)), remembering o so that returned shifts refer to the *original* positions;
//   3. bin atoms into a grid whose bins are at least `search` (= cutoff + a rounding margin) thick along
//      every reciprocal direction (bounding box on non-periodic axes), capped at 2 n + 1 bins;
//   4. for every atom scan the bins within `reach` bins (several periodic images when the cell is thinner
//      than the cutoff), prefilter candidates with the wrapped double-precision positions, and decide with
//      the exact test |x_j - x_i + S · cell| < cutoff evaluated in the input dtype in the same order as the
//      edge-vector op (so the list and the distances the potential sees agree bit for bit);
//   5. sort each atom's neighbors by (j, image): the output order (i, j, shift) is then unique, so CPU and
//      CUDA produce identical tensors.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

#include "gdeq_ext/checks.h"
#include "gdeq_ext/exact_math.h"

namespace gdeq_ext {
namespace nl {

// Host passes take the math functions from std; the device pass uses CUDA's global overloads.
#if !defined(__CUDA_ARCH__)
using std::ceil;
using std::fabs;
using std::floor;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::sqrt;
#endif

// ------------------------------------------------------------------------------------------- constants
// A neighbor is stored as one 64-bit key: local index j in the high bits, then the periodic image of the
// bin it was found in (three 10-bit fields, biased by 512). Sorting keys sorts by (j, image) and, for a
// fixed atom i, by (j, shift), because shift = image + o_i - o_j.
constexpr int kImageBits = 10;
constexpr int64_t kImageBias = 512;
constexpr int64_t kMaxReach = 511;  // images -511..511 fit the 10-bit fields
constexpr int kJShift = 3 * kImageBits;

// Cells are rejected as singular below this |a x b| / (|a| |b|) or |det| / (|a| |b| |c|): the same
// threshold as Batch.validate (gdeq_ext/data/batch.py).
constexpr double kDegenerateRatio = 1e-8;
// Wrapped fractional coordinates are exact only while |f| < 2^52.
constexpr double kMaxFractional = 4503599627370496.0;

enum Error : int {
  kOk = 0,
  kNonFinitePosition = 1,
  kNonFiniteCell = 2,
  kZeroLatticeVector = 3,
  kDegenerateCell = 4,
  kTooManyImages = 5,
  kBadCounts = 6,
  kPositionTooFar = 7,
  kTooManyPairs = 8,
};

// Candidate pairs per atom above which a structure is refused before anything is allocated: a dense solid with
// a 15 Å cutoff scans ~1e4 by this estimate (27 bins of 0.1 atoms/Å^3 x 15^3 Å^3); only a cell far thinner than the
// cutoff (or atoms piled on each other) reaches this.
constexpr double kMaxCandidatesPerAtom = 1e5;

// Per-structure geometry, written once per call (CPU: a std::vector; CUDA: a device buffer).
struct Grid {
  double lattice[3][3];  // completed lattice, rows = vectors (Å)
  double inverse[3][3];  // lattice^-1: f_k = sum_d x_d inverse[d][k]
  double lo[3];          // lower end of the binned coordinate (0 on periodic axes)
  double inv_width[3];   // bins per unit of the binned coordinate
  double search;         // prefilter radius (Å): cutoff plus a rounding margin
  double search2;
  int64_t bins[3];   // bins along each axis
  int64_t reach[3];  // bins scanned on each side of an atom's bin
  int64_t n_bins;
  int64_t bin_base;      // offset of this structure's bins in the global bin arrays (2 * begin + 2 * s)
  int64_t begin, count;  // atoms [begin, begin + count)
  int periodic[3];
  int error;  // Error of this structure (kOk when usable)
};

// Exact arithmetic (add_rn, mul_rn, sqrt_rn) and edge_vector(): gdeq_ext/exact_math.h, shared with edge_vectors.

template <typename scalar_t>
GDEQ_HD double dtype_epsilon() {
  return sizeof(scalar_t) == 4 ? 1.1920928955078125e-07 : 2.220446049250313e-16;
}

// ------------------------------------------------------------------------------------- small linear algebra
GDEQ_HD double dot3(const double* a, const double* b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}
GDEQ_HD double norm3(const double* a) {
  return sqrt(dot3(a, a));
}
GDEQ_HD void cross3(const double* a, const double* b, double* out) {
  out[0] = a[1] * b[2] - a[2] * b[1];
  out[1] = a[2] * b[0] - a[0] * b[2];
  out[2] = a[0] * b[1] - a[1] * b[0];
}
GDEQ_HD void scale3(double* a, double factor) {
  a[0] *= factor;
  a[1] *= factor;
  a[2] *= factor;
}

// Inverse of a 3x3 matrix by cofactors; the matrix is already checked to be well conditioned.
GDEQ_HD void invert3(const double m[3][3], double out[3][3]) {
  const double c00 = m[1][1] * m[2][2] - m[1][2] * m[2][1];
  const double c01 = m[1][2] * m[2][0] - m[1][0] * m[2][2];
  const double c02 = m[1][0] * m[2][1] - m[1][1] * m[2][0];
  const double inv_det = 1.0 / (m[0][0] * c00 + m[0][1] * c01 + m[0][2] * c02);
  out[0][0] = c00 * inv_det;
  out[1][0] = c01 * inv_det;
  out[2][0] = c02 * inv_det;
  out[0][1] = (m[0][2] * m[2][1] - m[0][1] * m[2][2]) * inv_det;
  out[1][1] = (m[0][0] * m[2][2] - m[0][2] * m[2][0]) * inv_det;
  out[2][1] = (m[0][1] * m[2][0] - m[0][0] * m[2][1]) * inv_det;
  out[0][2] = (m[0][1] * m[1][2] - m[0][2] * m[1][1]) * inv_det;
  out[1][2] = (m[0][2] * m[1][0] - m[0][0] * m[1][2]) * inv_det;
  out[2][2] = (m[0][0] * m[1][1] - m[0][1] * m[1][0]) * inv_det;
}

GDEQ_HD int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// ------------------------------------------------------------------------------------------- step 1: cell
// Fills g.lattice / g.inverse / g.periodic from one structure's cell (3x3, rows) and pbc (3). Returns an
// Error; `detail` receives the offending axis where there is one.
template <typename scalar_t>
GDEQ_HD int setup_lattice(const scalar_t* cell, const bool* pbc, Grid& g, int64_t& detail) {
  int periodic_rows[3], open_rows[3];
  int n_periodic = 0, n_open = 0;
  for (int r = 0; r < 3; ++r) {
    for (int d = 0; d < 3; ++d) {
      const double value = static_cast<double>(cell[3 * r + d]);
      if (!isfinite(value)) return kNonFiniteCell;  // even on open axes: 0 * inf would poison S · cell
      g.lattice[r][d] = value;
    }
    g.periodic[r] = pbc[r] ? 1 : 0;
    if (pbc[r]) {
      if (norm3(g.lattice[r]) == 0.0) {
        detail = r;
        return kZeroLatticeVector;
      }
      periodic_rows[n_periodic++] = r;
    } else {
      open_rows[n_open++] = r;
    }
  }
  if (n_periodic == 3) {
    double c[3];
    cross3(g.lattice[0], g.lattice[1], c);
    const double ratio =
        fabs(dot3(c, g.lattice[2])) / (norm3(g.lattice[0]) * norm3(g.lattice[1]) * norm3(g.lattice[2]));
    if (!(ratio >= kDegenerateRatio)) return kDegenerateCell;
  } else if (n_periodic == 2) {
    const double* a = g.lattice[periodic_rows[0]];
    const double* b = g.lattice[periodic_rows[1]];
    double c[3];
    cross3(a, b, c);
    const double length = norm3(c);
    if (!(length / (norm3(a) * norm3(b)) >= kDegenerateRatio)) return kDegenerateCell;
    scale3(c, 1.0 / length);
    for (int d = 0; d < 3; ++d) g.lattice[open_rows[0]][d] = c[d];
  } else if (n_periodic == 1) {
    double u[3] = {g.lattice[periodic_rows[0]][0], g.lattice[periodic_rows[0]][1], g.lattice[periodic_rows[0]][2]};
    scale3(u, 1.0 / norm3(u));
    // Cross with the Cartesian axis least aligned with u: well conditioned.
    int axis = 0;
    for (int d = 1; d < 3; ++d)
      if (fabs(u[d]) < fabs(u[axis])) axis = d;
    double e[3] = {0.0, 0.0, 0.0};
    e[axis] = 1.0;
    double v[3], w[3];
    cross3(u, e, v);
    scale3(v, 1.0 / norm3(v));
    cross3(u, v, w);
    for (int d = 0; d < 3; ++d) {
      g.lattice[open_rows[0]][d] = v[d];
      g.lattice[open_rows[1]][d] = w[d];
    }
  } else {
    for (int r = 0; r < 3; ++r)
      for (int d = 0; d < 3; ++d) g.lattice[r][d] = r == d ? 1.0 : 0.0;
  }
  invert3(g.lattice, g.inverse);
  return kOk;
}

// ------------------------------------------------------------------------------------------ step 2: wrap
// Fractional coordinates of x; on periodic axes split into o (integer) + fw in [0, 1]. Returns an Error.
template <typename scalar_t>
GDEQ_HD int wrap_atom(const Grid& g, const scalar_t* x, double* fw, int64_t* o) {
  const double x0 = static_cast<double>(x[0]), x1 = static_cast<double>(x[1]), x2 = static_cast<double>(x[2]);
  if (!(isfinite(x0) && isfinite(x1) && isfinite(x2))) return kNonFinitePosition;
  for (int k = 0; k < 3; ++k) {
    const double f = x0 * g.inverse[0][k] + x1 * g.inverse[1][k] + x2 * g.inverse[2][k];
    if (g.periodic[k]) {
      if (!(fabs(f) < kMaxFractional)) return kPositionTooFar;
      const double whole = floor(f);
      o[k] = static_cast<int64_t>(whole);
      fw[k] = f - whole;
    } else {
      o[k] = 0;
      fw[k] = f;
    }
  }
  return kOk;
}

// Wrapped Cartesian position fw · lattice (double), used only by the prefilter.
GDEQ_HD void wrapped_cartesian(const Grid& g, const double* fw, double* w) {
  for (int d = 0; d < 3; ++d) w[d] = fw[0] * g.lattice[0][d] + fw[1] * g.lattice[1][d] + fw[2] * g.lattice[2][d];
}

// ------------------------------------------------------------------------------------------ step 3: grid
// lo/hi: range of fw on open axes (ignored on periodic ones); max_abs: largest |x| component of the
// structure, for the rounding margin. Returns an Error (kTooManyImages with the axis in `detail`).
template <typename scalar_t>
GDEQ_HD int size_grid(Grid& g, const double* lo, const double* hi, double max_abs, int64_t count, double cutoff,
                      int64_t& detail) {
  double lattice_sum = 0.0;
  for (int k = 0; k < 3; ++k)
    if (g.periodic[k]) lattice_sum += norm3(g.lattice[k]);
  // Margin for every rounding between the geometry here (double) and the exact test (input dtype): the
  // exact test's error is a few ulps of the largest term |x_i|, |x_j|, |S · cell|.
  g.search = cutoff * (1.0 + 1e-6) + 64.0 * dtype_epsilon<scalar_t>() * (max_abs + cutoff + lattice_sum);
  g.search2 = g.search * g.search;
  const double budget = 2.0 * static_cast<double>(count) + 1.0;  // bins per structure: at most 2 n + 1
  double reach_f[3], span[3], bins[3];
  for (int k = 0; k < 3; ++k) {
    const double b[3] = {g.inverse[0][k], g.inverse[1][k], g.inverse[2][k]};
    reach_f[k] = g.search * norm3(b);  // |Δf_k| <= |r| |b_k|
    if (g.periodic[k]) {
      g.lo[k] = 0.0;
      span[k] = 1.0;
    } else {
      g.lo[k] = lo[k];
      span[k] = hi[k] - lo[k];
    }
    bins[k] = span[k] > 0.0 ? floor(span[k] / reach_f[k]) : 1.0;
    bins[k] = fmin(fmax(bins[k], 1.0), budget);
  }
  // Sparse structures (few atoms in a large box): coarser bins keep memory O(n); still >= search thick.
  while (bins[0] * bins[1] * bins[2] > budget) {
    int largest = 0;
    for (int k = 1; k < 3; ++k)
      if (bins[k] > bins[largest]) largest = k;
    bins[largest] = ceil(bins[largest] / 2.0);
  }
  g.n_bins = 1;
  for (int k = 0; k < 3; ++k) {
    g.bins[k] = static_cast<int64_t>(bins[k]);
    g.n_bins *= g.bins[k];
    const double width = span[k] > 0.0 ? span[k] / bins[k] : 1.0;
    g.inv_width[k] = 1.0 / width;
    // -1e-9: an exact multiple (e.g. a 10 Å cell with a 5 Å cutoff) stays at one bin; `search` covers it.
    const double reach = fmax(ceil(reach_f[k] * g.inv_width[k] - 1e-9), 1.0);
    if (g.periodic[k]) {
      if (reach > static_cast<double>(kMaxReach)) {
        detail = k;
        return kTooManyImages;
      }
      g.reach[k] = static_cast<int64_t>(reach);
    } else {
      g.reach[k] = static_cast<int64_t>(fmin(reach, bins[k] - 1.0));
    }
  }
  // Pair budget: an atom scans (2 reach + 1) bins per axis (periodic: tiles of images), each holding count / bins
  // atoms on average. Refuse before the search allocates (one atom in a 0.01 Å cell, cutoff 3.77 Å: 4.3e8).
  double per_atom = static_cast<double>(count);
  for (int k = 0; k < 3; ++k) {
    const double scanned = 2.0 * static_cast<double>(g.reach[k]) + 1.0;
    per_atom *= (g.periodic[k] ? scanned : fmin(scanned, bins[k])) / bins[k];
  }
  if (per_atom > kMaxCandidatesPerAtom) {
    // detail: thousands of pairs (the device reports 32 bits)
    detail = static_cast<int64_t>(fmin(ceil(per_atom * static_cast<double>(count) / 1e3), 4294967295.0));
    return kTooManyPairs;
  }
  return kOk;
}

// Local bin index (row-major over the three axes) of a wrapped fractional position.
GDEQ_HD int64_t bin_of(const Grid& g, const double* fw) {
  int64_t flat = 0;
  for (int k = 0; k < 3; ++k) {
    double t = floor((fw[k] - g.lo[k]) * g.inv_width[k]);
    t = fmin(fmax(t, 0.0), static_cast<double>(g.bins[k] - 1));  // fw == 1.0 after rounding, hi of the box
    flat = flat * g.bins[k] + static_cast<int64_t>(t);
  }
  return flat;
}

// ------------------------------------------------------------------------------------ step 4: the test
// |x_j - x_i + S · cell| < cutoff in the input dtype, term by term in the order of the edge-vector op:
// v_d = ((x_j - x_i) + S_0 c_0d) + S_1 c_1d) + S_2 c_2d, |v| = sqrt((v_0^2 + v_1^2) + v_2^2).
template <typename scalar_t>
GDEQ_HD bool within_cutoff(const scalar_t* xi, const scalar_t* xj, const scalar_t* cell, const int64_t* shift,
                           scalar_t cutoff) {
  scalar_t v[3];
  return edge_vector(xi, xj, cell, shift, v) < cutoff;  // the formula of the edge-vector op, bit for bit
}

GDEQ_HD uint64_t pack_key(int64_t j, const int64_t* image) {
  return (static_cast<uint64_t>(j) << kJShift) | (static_cast<uint64_t>(image[0] + kImageBias) << (2 * kImageBits)) |
         (static_cast<uint64_t>(image[1] + kImageBias) << kImageBits) | static_cast<uint64_t>(image[2] + kImageBias);
}

GDEQ_HD int64_t key_atom(uint64_t key) {
  return static_cast<int64_t>(key >> kJShift);
}

GDEQ_HD void key_image(uint64_t key, int64_t* image) {
  const uint64_t mask = (uint64_t(1) << kImageBits) - 1;
  image[0] = static_cast<int64_t>((key >> (2 * kImageBits)) & mask) - kImageBias;
  image[1] = static_cast<int64_t>((key >> kImageBits) & mask) - kImageBias;
  image[2] = static_cast<int64_t>(key & mask) - kImageBias;
}

// Half list: (i, j) with i < j, and for self-images (i, i, S) the S whose first non-zero component is > 0.
GDEQ_HD bool keep_in_half_list(int64_t i, int64_t j, const int64_t* shift) {
  if (i != j) return i < j;
  for (int k = 0; k < 3; ++k)
    if (shift[k] != 0) return shift[k] > 0;
  return false;
}

// All neighbors of local atom `a` of one structure; calls emit(key) once per pair (unsorted).
// Pointers are offset to the structure: x/o/fw by its first atom, sorted_* by its first atom,
// bin_start by g.bin_base (n_bins + 1 entries).
template <typename scalar_t, typename Emit>
GDEQ_HD void search_atom(const Grid& g, int64_t a, const scalar_t* x, const int64_t* o, const double* fw,
                         const scalar_t* cell, const double* sorted_w, const int64_t* sorted_local,
                         const int64_t* bin_start, scalar_t cutoff, bool full, Emit&& emit) {
  double wi[3];
  wrapped_cartesian(g, fw + 3 * a, wi);
  const int64_t* oi = o + 3 * a;
  const scalar_t* xi = x + 3 * a;
  int64_t home = bin_of(g, fw + 3 * a);
  int64_t cell_of[3];
  cell_of[2] = home % g.bins[2];
  home /= g.bins[2];
  cell_of[1] = home % g.bins[1];
  cell_of[0] = home / g.bins[1];

  int64_t image[3], bin[3], shift[3];
  for (int64_t d0 = -g.reach[0]; d0 <= g.reach[0]; ++d0) {
    const int64_t t0 = cell_of[0] + d0;
    if (g.periodic[0]) {
      image[0] = floor_div(t0, g.bins[0]);
      bin[0] = t0 - image[0] * g.bins[0];
    } else {
      if (t0 < 0 || t0 >= g.bins[0]) continue;
      image[0] = 0;
      bin[0] = t0;
    }
    for (int64_t d1 = -g.reach[1]; d1 <= g.reach[1]; ++d1) {
      const int64_t t1 = cell_of[1] + d1;
      if (g.periodic[1]) {
        image[1] = floor_div(t1, g.bins[1]);
        bin[1] = t1 - image[1] * g.bins[1];
      } else {
        if (t1 < 0 || t1 >= g.bins[1]) continue;
        image[1] = 0;
        bin[1] = t1;
      }
      for (int64_t d2 = -g.reach[2]; d2 <= g.reach[2]; ++d2) {
        const int64_t t2 = cell_of[2] + d2;
        if (g.periodic[2]) {
          image[2] = floor_div(t2, g.bins[2]);
          bin[2] = t2 - image[2] * g.bins[2];
        } else {
          if (t2 < 0 || t2 >= g.bins[2]) continue;
          image[2] = 0;
          bin[2] = t2;
        }
        // Candidates are j's wrapped position plus image · lattice; compare with w_i - image · lattice.
        double base[3];
        for (int d = 0; d < 3; ++d)
          base[d] = wi[d] -
                    (static_cast<double>(image[0]) * g.lattice[0][d] + static_cast<double>(image[1]) * g.lattice[1][d] +
                     static_cast<double>(image[2]) * g.lattice[2][d]);
        const int64_t flat = (bin[0] * g.bins[1] + bin[1]) * g.bins[2] + bin[2];
        const int64_t stop = bin_start[flat + 1];
        for (int64_t k = bin_start[flat]; k < stop; ++k) {
          const double dx = sorted_w[3 * k] - base[0];
          const double dy = sorted_w[3 * k + 1] - base[1];
          const double dz = sorted_w[3 * k + 2] - base[2];
          if (dx * dx + dy * dy + dz * dz >= g.search2) continue;
          const int64_t j = sorted_local[k];
          const int64_t* oj = o + 3 * j;
          shift[0] = image[0] + oi[0] - oj[0];
          shift[1] = image[1] + oi[1] - oj[1];
          shift[2] = image[2] + oi[2] - oj[2];
          if (j == a && shift[0] == 0 && shift[1] == 0 && shift[2] == 0) continue;  // the atom itself
          if (!full && !keep_in_half_list(a, j, shift)) continue;
          if (!within_cutoff(xi, x + 3 * j, cell, shift, cutoff)) continue;
          emit(pack_key(j, image));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- messages
inline std::string error_message(int code, int64_t structure, int64_t detail) {
  const std::string where = "gdeq_ext.neighbor_list: structure " + std::to_string(structure) + ": ";
  switch (code) {
    case kNonFinitePosition:
      return where + "atom " + std::to_string(detail) + " has a non-finite (NaN or inf) position";
    case kPositionTooFar:
      return where + "atom " + std::to_string(detail) +
             " lies more than 2^52 cell lengths outside the cell (fractional coordinates lose every digit)";
    case kNonFiniteCell:
      return where + "the cell has non-finite (NaN or inf) entries";
    case kZeroLatticeVector:
      return where + "axis " + std::to_string(detail) + " is periodic but its lattice vector is zero";
    case kDegenerateCell:
      return where + "the periodic lattice vectors are linearly dependent (singular or degenerate cell)";
    case kTooManyImages:
      return where + "the cutoff spans more than " + std::to_string(kMaxReach) + " lattice planes along axis " +
             std::to_string(detail) + " (an absurdly thin periodic cell)";
    case kTooManyPairs: {
      char pairs[32];
      snprintf(pairs, sizeof(pairs), "%.3g", 1e3 * static_cast<double>(detail));
      return where + "cell far thinner than the cutoff: up to " + pairs +
             " pairs would be built (more than 1e5 per atom; no physical structure needs that many), so nothing "
             "was allocated; check the cell (Å) and the cutoff";
    }
    case kBadCounts:
      return where + "n_atoms_per_system is negative or the counts do not add up to the number of positions";
    default:
      return where + "unknown error " + std::to_string(code);
  }
}

}  // namespace nl

// ------------------------------------------------------------------------------------------ arguments
inline void check_neighbor_list_args(const at::Tensor& positions, const at::Tensor& cell, const at::Tensor& pbc,
                                     const at::Tensor& n_atoms_per_system, double cutoff) {
  check_positions_and_cell(positions, cell);
  check_dim(pbc, "pbc", 2);
  check_size(pbc, "pbc", 0, cell.size(0));
  check_size(pbc, "pbc", 1, 3);
  check_dtype(pbc, "pbc", at::kBool);
  check_dim(n_atoms_per_system, "n_atoms_per_system", 1);
  check_size(n_atoms_per_system, "n_atoms_per_system", 0, cell.size(0));
  check_dtype(n_atoms_per_system, "n_atoms_per_system", at::kLong);
  check_same_device(pbc, "pbc", positions, "positions");
  check_same_device(n_atoms_per_system, "n_atoms_per_system", positions, "positions");
  TORCH_CHECK_VALUE(std::isfinite(cutoff) && cutoff > 0,
                    "gdeq_ext.neighbor_list: cutoff must be positive and "
                    "finite, got ",
                    cutoff);
  TORCH_CHECK(positions.size(0) < (int64_t(1) << (63 - nl::kJShift)), "gdeq_ext.neighbor_list: too many atoms");
}

}  // namespace gdeq_ext
