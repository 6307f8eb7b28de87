// CPU kernels of the MLIP's edge op A[i,c,m] = Σ_{e: i_e=i} R_c(r_e) u[j_e,c] Y_m(r̂_e), its VJP and its
// second-order VJP. Per-edge quantities (r, φ_k and derivatives, Y, R_c) are recomputed in registers and small
// per-thread scratch arrays; no tensor with one row per edge and C columns is ever allocated.
//
// Parallel layout (race-free and deterministic for a given thread count):
// * outputs indexed by the receiver i (A, dG) come from a pass over atoms, each atom walking its own edges
//   (CSR by receiver);
// * in the backward, outputs indexed by the sender j (grad_u) come from a pass over atoms walking the edges they
//   send (CSR by sender); the same pass writes the per-edge outputs (grad_vectors) and partial sums of the weight
//   gradients, one (K, C) block per chunk of atoms, summed in chunk order at the end;
// * the double backward is one pass over receivers: dG[i] and dvec[e] are owned, du[j] and dW go to per-chunk
//   blocks summed in chunk order (with one chunk, du is written directly).
// Neighbor lists are sorted by receiver, so the receiver CSR is usually just offsets (sortedness is checked, an
// O(E) integer pass); otherwise, and for the sender CSR, a stable counting sort builds an (E,) permutation.
#include "gdeq_ext/edge_moments.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace gdeq_ext {
namespace {

using moments::EdgeGeometry;
using moments::kMoments;
using moments::RadialBasis;

constexpr int64_t kAtomGrain = 16;

void check_atom_indices(const int64_t* index, int64_t n_edges, int64_t n_atoms, const char* row) {
  for (int64_t e = 0; e < n_edges; ++e) {
    TORCH_CHECK(index[e] >= 0 && index[e] < n_atoms, "gdeq_ext: edge_index[", row, ", ", e, "] = ", index[e],
                " refers to an atom outside [0, ", n_atoms, ")");
  }
}

// Edges grouped by one row of edge_index: edge p of atom a's group is edge(p), p in [offsets[a], offsets[a+1]).
struct EdgeGroups {
  std::vector<int64_t> offsets;  // n_atoms + 1
  std::vector<int64_t> order;    // empty when the row is already sorted (then edge(p) = p)
  int64_t edge(int64_t p) const { return order.empty() ? p : order[p]; }
};

EdgeGroups group_edges(const int64_t* index, int64_t n_edges, int64_t n_atoms) {
  EdgeGroups groups;
  groups.offsets.assign(n_atoms + 1, 0);
  bool sorted = true;
  for (int64_t e = 0; e < n_edges; ++e) {
    ++groups.offsets[index[e] + 1];
    if (e > 0 && index[e] < index[e - 1]) sorted = false;
  }
  for (int64_t a = 0; a < n_atoms; ++a) groups.offsets[a + 1] += groups.offsets[a];
  if (!sorted) {  // stable counting sort: within an atom, edges keep their input order
    groups.order.resize(n_edges);
    std::vector<int64_t> next(groups.offsets.begin(), groups.offsets.end() - 1);
    for (int64_t e = 0; e < n_edges; ++e) groups.order[next[index[e]]++] = e;
  }
  return groups;
}

// Runs body(chunk, atom_begin, atom_end) over `n_chunks` contiguous ranges of atoms in parallel. A fixed number
// of chunks (not at::parallel_for's own split) makes the per-chunk partial sums, and so the results, independent
// of how the thread pool schedules them.
template <typename Body>
void for_atom_chunks(int64_t n_atoms, int64_t n_chunks, const Body& body) {
  const int64_t per = (n_atoms + n_chunks - 1) / n_chunks;
  at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      body(chunk, std::min(n_atoms, chunk * per), std::min(n_atoms, (chunk + 1) * per));
    }
  });
}

int64_t chunk_count(int64_t n_atoms) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_atoms / kAtomGrain));
}

// φ_k (and derivatives where asked) for k = 1..K into arrays.
template <typename T>
void radial_arrays(const EdgeGeometry<T>& g, double cutoff, int64_t K, T* phi, T* dphi, T* ddphi) {
  RadialBasis<T> basis(g, cutoff);
  for (int64_t k = 0; k < K; ++k, basis.next()) {
    if (ddphi != nullptr) {
      basis.values(phi[k], dphi[k], ddphi[k]);
    } else if (dphi != nullptr) {
      basis.values(phi[k], dphi[k]);
    } else {
      phi[k] = basis.value();
    }
  }
}

// out[c] = Σ_k coefficients[k] W[k, c] (k outer so that the c loop is contiguous and vectorizes).
template <typename T>
void contract(const T* __restrict__ coefficients, const T* __restrict__ W, int64_t K, int64_t C, T* __restrict__ out) {
  std::fill(out, out + C, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T a = coefficients[k];
    const T* __restrict__ row = W + k * C;
    for (int64_t c = 0; c < C; ++c) out[c] += a * row[c];
  }
}

// Moment-major blocks. The kernels read and write the (N, C, 10) moment tensors through their (N, 10, C) transposes
// (made once per call, N·C·10 values, small next to the per-edge work) so that every inner loop runs over the C
// contiguous channels and vectorizes; with 10 as the inner length it did not (measured: the VJP ~2x slower).

// s[c] = Σ_m Gt[m, c] Y[m] for one atom's (10, C) block Gt; summed over m in order, as the (C, 10) form did.
template <typename T>
void channel_dots(const T* __restrict__ Gt, int64_t C, const T* Y, T* __restrict__ s) {
  std::fill(s, s + C, T(0));
  for (int m = 0; m < kMoments; ++m) {
    const T y = Y[m];
    const T* __restrict__ row = Gt + m * C;
    for (int64_t c = 0; c < C; ++c) s[c] += y * row[c];
  }
}

// out[r][m] = Σ_c coef[r][c] Gt[m, c] for R coefficient rows (a SIMD reduction over channels: the summation order
// is fixed for a given build, not the sequential one).
template <typename T, int R>
void project(const T* __restrict__ Gt, int64_t C, const T* const (&coef)[R], T (&out)[R][kMoments]) {
  for (int m = 0; m < kMoments; ++m) {
    const T* __restrict__ row = Gt + m * C;
    for (int r = 0; r < R; ++r) {
      const T* __restrict__ a = coef[r];
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < C; ++c) acc += a[c] * row[c];
      out[r][m] = acc;
    }
  }
}

// Gt[m, c] += a[c] Y[m] + b[c] DY[m] (b and DY may be null) into one atom's (10, C) block.
template <typename T>
void accumulate_moments(T* __restrict__ Gt, int64_t C, const T* __restrict__ a, const T* Y, const T* __restrict__ b,
                        const T* DY) {
  for (int m = 0; m < kMoments; ++m) {
    T* __restrict__ row = Gt + m * C;
    const T y = Y[m];
    if (b == nullptr) {
      for (int64_t c = 0; c < C; ++c) row[c] += a[c] * y;
    } else {
      const T dy = DY[m];
      for (int64_t c = 0; c < C; ++c) row[c] += a[c] * y + b[c] * dy;
    }
  }
}

// Sums (n_chunks, K·C) partial blocks in chunk order.
template <typename T>
void sum_partials(const std::vector<T>& partial, int64_t n_chunks, int64_t size, T* out) {
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const T* block = partial.data() + chunk * size;
    for (int64_t x = 0; x < size; ++x) out[x] += block[x];
  }
}

struct Problem {
  int64_t E, N, C, K;
  double cutoff;
  const int64_t* ei;  // receivers
  const int64_t* ej;  // senders
};

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
void forward_kernel(const Problem& p, const EdgeGroups& recv, const T* vec, const T* u, const T* W, T* At) {
  for_atom_chunks(p.N, chunk_count(p.N), [&](int64_t, int64_t begin, int64_t end) {
    std::vector<T> phi(p.K), R(p.C), w(p.C);
    T Y[kMoments];
    for (int64_t i = begin; i < end; ++i) {
      T* Ati = At + i * p.C * kMoments;
      for (int64_t q = recv.offsets[i]; q < recv.offsets[i + 1]; ++q) {
        const int64_t e = recv.edge(q);
        EdgeGeometry<T> g;
        if (!moments::edge_geometry(vec + 3 * e, p.cutoff, g)) continue;
        radial_arrays<T>(g, p.cutoff, p.K, phi.data(), nullptr, nullptr);
        moments::angular(g.n, Y);
        contract(phi.data(), W, p.K, p.C, R.data());
        const T* uj = u + p.ej[e] * p.C;
        for (int64_t c = 0; c < p.C; ++c) w[c] = R[c] * uj[c];
        accumulate_moments<T>(Ati, p.C, w.data(), Y, nullptr, nullptr);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------ backward
// One pass over senders j: grad_u[j] (owned), grad_vectors[e] for j's edges (owned), grad_W partial per chunk.
template <typename T>
void backward_kernel(const Problem& p, const EdgeGroups& send, const T* Gt, const T* vec, const T* u, const T* W,
                     T* grad_vec, T* grad_u, T* grad_W, bool compute_vectors) {
  const int64_t n_chunks = chunk_count(p.N), KC = p.K * p.C;
  std::vector<T> partial(n_chunks * KC, T(0));
  for_atom_chunks(p.N, n_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<T> phi(p.K), dphi(p.K), R(p.C), R1(p.C), sc(p.C), q(p.C), a0(p.C), a1(p.C);
    T* gW = partial.data() + chunk * KC;
    T Y[kMoments], P[2][kMoments];
    for (int64_t j = begin; j < end; ++j) {
      const T* uj = u + j * p.C;
      T* guj = grad_u + j * p.C;
      for (int64_t s = send.offsets[j]; s < send.offsets[j + 1]; ++s) {
        const int64_t e = send.edge(s);
        EdgeGeometry<T> g;
        if (!moments::edge_geometry(vec + 3 * e, p.cutoff, g)) continue;  // grad_vectors[e] stays 0
        radial_arrays<T>(g, p.cutoff, p.K, phi.data(), compute_vectors ? dphi.data() : nullptr, nullptr);
        moments::angular(g.n, Y);
        contract(phi.data(), W, p.K, p.C, R.data());
        if (compute_vectors) contract(dphi.data(), W, p.K, p.C, R1.data());
        const T* Gti = Gt + p.ei[e] * p.C * kMoments;
        channel_dots(Gti, p.C, Y, sc.data());  // s_c = Σ_m G[i,c,m] Y_m
        for (int64_t c = 0; c < p.C; ++c) {
          guj[c] += R[c] * sc[c];
          q[c] = uj[c] * sc[c];
        }
        if (compute_vectors) {
          for (int64_t c = 0; c < p.C; ++c) {
            a0[c] = uj[c] * R[c];  // F = Σ_m P_m(r) Y_m with P = Σ_c a0_c G_ic, P' = Σ_c a1_c G_ic
            a1[c] = uj[c] * R1[c];
          }
        }
        for (int64_t k = 0; k < p.K; ++k) {
          const T a = phi[k];
          T* row = gW + k * p.C;
          for (int64_t c = 0; c < p.C; ++c) row[c] += a * q[c];
        }
        if (!compute_vectors) continue;
        project<T, 2>(Gti, p.C, {a0.data(), a1.data()}, P);
        moments::add_moment_gradient(P[0], P[1], g, grad_vec + 3 * e);
      }
    }
  });
  sum_partials(partial, n_chunks, KC, grad_W);
}

// ------------------------------------------------------------------------------------------------ double backward
// Cotangents (av, au, aW) of (grad_vectors, grad_u, grad_W). Per edge, with ρ = n·av, DY = ∇Y·av,
// Q_c = Σ_k φ_k aW[k,c], s_c = G_ic·Y, t_c = G_ic·DY:
//   dG[i,c,m] += ((R'_c ρ + Q_c) u_jc + R_c au_jc) Y_m + R_c u_jc DY_m                      (receiver pass)
//   du[j,c]   += (R'_c ρ + Q_c) s_c + R_c t_c                                                (sender pass)
//   dW[k,c]   += φ'_k ρ u_jc s_c + φ_k (au_jc s_c + u_jc t_c)
//   dvec_e     = ∇²F·av + ∇H,  F = Σ_m (Σ_c u_jc R_c G_icm) Y_m,  H = Σ_m (Σ_c (Q_c u_jc + R_c au_jc) G_icm) Y_m
// One pass over receivers i: each edge's geometry, radial basis and angular terms are computed once and feed every
// output. dG[i] and dvec[e] are owned by i's chunk; du[j] (indexed by the sender) is written directly with one chunk
// and into one (N, C) block per chunk otherwise, summed in chunk order (as dW is), so the result is deterministic for
// a given thread count. With one chunk and a receiver-sorted list, du[j] sums j's edges in increasing edge order, the
// order of the former two-pass kernel's sender pass.
template <typename T>
void double_backward_kernel(const Problem& p, const EdgeGroups& recv, const T* av, const T* au, const T* aW,
                            const T* Gt, const T* vec, const T* u, const T* W, T* dGt, T* dvec, T* du, T* dW,
                            bool compute_vectors) {
  const int64_t n_chunks = chunk_count(p.N), KC = p.K * p.C, NC = p.N * p.C;
  std::vector<T> partial(n_chunks * KC, T(0));
  std::vector<T> du_partial(n_chunks > 1 ? n_chunks * NC : 0, T(0));
  for_atom_chunks(p.N, n_chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<T> phi(p.K), dphi(p.K), ddphi(p.K), R(p.C), R1(p.C), R2(p.C), Q(p.C), Q1(p.C), qs(p.C), qt(p.C);
    std::vector<T> a0(p.C), a1(p.C), a2(p.C), h0(p.C), h1(p.C), sc(p.C), tc(p.C), a_y(p.C);
    T* dWc = partial.data() + chunk * KC;
    T* du_out = n_chunks > 1 ? du_partial.data() + chunk * NC : du;
    T Y[kMoments], DY[kMoments], P[5][kMoments];
    for (int64_t i = begin; i < end; ++i) {
      T* dGti = dGt + i * p.C * kMoments;
      const T* Gti = Gt + i * p.C * kMoments;
      for (int64_t q = recv.offsets[i]; q < recv.offsets[i + 1]; ++q) {
        const int64_t e = recv.edge(q);
        EdgeGeometry<T> g;
        if (!moments::edge_geometry(vec + 3 * e, p.cutoff, g)) continue;  // every output of e stays 0
        radial_arrays<T>(g, p.cutoff, p.K, phi.data(), dphi.data(), compute_vectors ? ddphi.data() : nullptr);
        moments::angular(g.n, Y);
        const T* a = av + 3 * e;
        const T rho = moments::angular_derivative(g, a, DY);
        contract(phi.data(), W, p.K, p.C, R.data());
        contract(dphi.data(), W, p.K, p.C, R1.data());
        contract(phi.data(), aW, p.K, p.C, Q.data());
        if (compute_vectors) {
          contract(ddphi.data(), W, p.K, p.C, R2.data());
          contract(dphi.data(), aW, p.K, p.C, Q1.data());
        }
        const int64_t j = p.ej[e];
        const T* uj = u + j * p.C;
        const T* auj = au + j * p.C;
        T* duj = du_out + j * p.C;
        // dG[i] (the JVP of the forward): a_y Y + (R u_j) DY.
        for (int64_t c = 0; c < p.C; ++c) {
          a_y[c] = (R1[c] * rho + Q[c]) * uj[c] + R[c] * auj[c];
          a0[c] = R[c] * uj[c];
        }
        accumulate_moments<T>(dGti, p.C, a_y.data(), Y, a0.data(), DY);
        // du[j], dW.
        channel_dots(Gti, p.C, Y, sc.data());
        channel_dots(Gti, p.C, DY, tc.data());
        for (int64_t c = 0; c < p.C; ++c) {
          duj[c] += (R1[c] * rho + Q[c]) * sc[c] + R[c] * tc[c];
          qs[c] = rho * uj[c] * sc[c];             // multiplies φ'_k in dW
          qt[c] = auj[c] * sc[c] + uj[c] * tc[c];  // multiplies φ_k in dW
        }
        for (int64_t k = 0; k < p.K; ++k) {
          const T b = dphi[k], c0 = phi[k];
          T* row = dWc + k * p.C;
          for (int64_t c = 0; c < p.C; ++c) row[c] += b * qs[c] + c0 * qt[c];
        }
        if (!compute_vectors) continue;
        // dvec[e] = ∇²F·av + ∇H.
        for (int64_t c = 0; c < p.C; ++c) {
          a1[c] = uj[c] * R1[c];  // F's coefficients P, P', P'' (as Σ_c a_c G_ic; a0 = u_j R above)
          a2[c] = uj[c] * R2[c];
          h0[c] = Q[c] * uj[c] + R[c] * auj[c];  // H's coefficients and their r-derivative
          h1[c] = Q1[c] * uj[c] + R1[c] * auj[c];
        }
        project<T, 5>(Gti, p.C, {a0.data(), a1.data(), a2.data(), h0.data(), h1.data()}, P);
        T* out = dvec + 3 * e;
        moments::add_moment_hessian_vector(P[0], P[1], P[2], g, a, out);
        moments::add_moment_gradient(P[3], P[4], g, out);
      }
    }
  });
  if (n_chunks > 1) sum_partials(du_partial, n_chunks, NC, du);
  sum_partials(partial, n_chunks, KC, dW);
}

// ------------------------------------------------------------------------------------------------ entry points
Problem problem(const at::Tensor& edges, const at::Tensor& u, const at::Tensor& W, double cutoff) {
  Problem p;
  p.E = edges.size(1);
  p.N = u.size(0);
  p.C = u.size(1);
  p.K = W.size(0);
  p.cutoff = cutoff;
  p.ei = edges.data_ptr<int64_t>();
  p.ej = p.ei + p.E;
  check_atom_indices(p.ei, p.E, p.N, "0");
  check_atom_indices(p.ej, p.E, p.N, "1");
  return p;
}

at::Tensor edge_moments_cpu(const at::Tensor& vectors, const at::Tensor& edge_index, const at::Tensor& u,
                            const at::Tensor& weights, double cutoff) {
  check_edge_moments_args(vectors, edge_index, u, weights, cutoff);
  const auto vec = vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto uu = u.contiguous();
  const auto W = weights.contiguous();
  auto At = at::zeros({u.size(0), moments::kMoments, u.size(1)}, vec.options());  // (N, 10, C): see channel_dots
  const Problem p = problem(edges, uu, W, cutoff);
  if (p.E > 0 && p.C > 0) {
    const EdgeGroups recv = group_edges(p.ei, p.E, p.N);
    AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "edge_moments_cpu", [&] {
      forward_kernel<scalar_t>(p, recv, vec.data_ptr<scalar_t>(), uu.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(),
                               At.data_ptr<scalar_t>());
    });
  }
  return At.transpose(1, 2).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_moments_backward_cpu(const at::Tensor& grad_moments,
                                                                         const at::Tensor& vectors,
                                                                         const at::Tensor& edge_index,
                                                                         const at::Tensor& u, const at::Tensor& weights,
                                                                         double cutoff, bool compute_vectors) {
  check_edge_moments_backward_args(grad_moments, vectors, edge_index, u, weights, cutoff);
  const auto Gt = grad_moments.transpose(1, 2).contiguous();  // (N, 10, C)
  const auto vec = vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto uu = u.contiguous();
  const auto W = weights.contiguous();
  auto grad_vec = at::zeros_like(vec);
  auto grad_u = at::zeros_like(uu);
  auto grad_W = at::zeros_like(W);
  const Problem p = problem(edges, uu, W, cutoff);
  if (p.E == 0 || p.C == 0) return {grad_vec, grad_u, grad_W};
  const EdgeGroups send = group_edges(p.ej, p.E, p.N);
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "edge_moments_backward_cpu", [&] {
    backward_kernel<scalar_t>(p, send, Gt.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), uu.data_ptr<scalar_t>(),
                              W.data_ptr<scalar_t>(), grad_vec.data_ptr<scalar_t>(), grad_u.data_ptr<scalar_t>(),
                              grad_W.data_ptr<scalar_t>(), compute_vectors);
  });
  return {grad_vec, grad_u, grad_W};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> edge_moments_double_backward_cpu(
    const at::Tensor& gg_vectors, const at::Tensor& gg_u, const at::Tensor& gg_weights, const at::Tensor& grad_moments,
    const at::Tensor& vectors, const at::Tensor& edge_index, const at::Tensor& u, const at::Tensor& weights,
    double cutoff, bool compute_vectors) {
  check_edge_moments_double_backward_args(gg_vectors, gg_u, gg_weights, grad_moments, vectors, edge_index, u, weights,
                                          cutoff);
  const auto av = gg_vectors.contiguous();
  const auto au = gg_u.contiguous();
  const auto aW = gg_weights.contiguous();
  const auto Gt = grad_moments.transpose(1, 2).contiguous();  // (N, 10, C)
  const auto vec = vectors.contiguous();
  const auto edges = edge_index.contiguous();
  const auto uu = u.contiguous();
  const auto W = weights.contiguous();
  auto dGt = at::zeros_like(Gt);
  auto dvec = at::zeros_like(vec);
  auto du = at::zeros_like(uu);
  auto dW = at::zeros_like(W);
  const Problem p = problem(edges, uu, W, cutoff);
  if (p.E == 0 || p.C == 0) return {dGt.transpose(1, 2).contiguous(), dvec, du, dW};
  const EdgeGroups recv = group_edges(p.ei, p.E, p.N);
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "edge_moments_double_backward_cpu", [&] {
    double_backward_kernel<scalar_t>(p, recv, av.data_ptr<scalar_t>(), au.data_ptr<scalar_t>(), aW.data_ptr<scalar_t>(),
                                     Gt.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), uu.data_ptr<scalar_t>(),
                                     W.data_ptr<scalar_t>(), dGt.data_ptr<scalar_t>(), dvec.data_ptr<scalar_t>(),
                                     du.data_ptr<scalar_t>(), dW.data_ptr<scalar_t>(), compute_vectors);
  });
  return {dGt.transpose(1, 2).contiguous(), dvec, du, dW};
}

}  // namespace

TORCH_LIBRARY_IMPL(gdeq_ext, CPU, m) {
  m.impl("edge_moments", &edge_moments_cpu);
  m.impl("edge_moments_backward", &edge_moments_backward_cpu);
  m.impl("edge_moments_double_backward", &edge_moments_double_backward_cpu);
}

}  // namespace gdeq_ext
