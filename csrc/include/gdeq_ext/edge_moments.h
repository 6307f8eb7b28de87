// Per-edge mathematics of the MLIP's edge op, shared by the CPU (.cpp) and CUDA (.cu) kernels, so that the CPU
// tests exercise exactly the formulas the GPU runs. Everything here is inline and header-only.
//
// One edge e = (i, j) with vector v (Å), r = |v|, n = v / r:
//
//   φ_k(r) = sqrt(2/rc) sin(kπr/rc)/r · f_c(r/rc),   f_c(x) = 1 − 10x³ + 15x⁴ − 6x⁵ (x < 1), 0 (x ≥ 1)
//   Y(n)   = [1, x, y, z, x²−⅓, y²−⅓, z²−⅓, xy, xz, yz]                     (n = (x, y, z))
//   A[i, c, m] += R_c(r) u[j, c] Y_m(n),       R_c = Σ_k φ_k W[k, c]
//
// Derivatives of any per-edge scalar f(v) = Σ_m P_m(r) Y_m(n) (P: 10 radial coefficient functions) are written
// through  f = α(r) + p(r)·n + nᵀM(r)n  with α = P0 − (P4+P5+P6)/3, p = (P1, P2, P3) and M the symmetric 3x3
// [[P4, P7/2, P8/2], [P7/2, P5, P9/2], [P8/2, P9/2, P6]]. Written in v (n = v/r), f is a polynomial in v whose
// coefficients depend on r only, which gives closed forms of the gradient and of Hessian-vector products:
//
//   ∇f      = f_r n + (p + 2Mn)/r
//   ∇²f · a = n (f_rr ρ + g_r·a) + f_r (a − ρn)/r + ρ g_r + 2Ma/r²,          ρ = n·a
//
// with f_r = α' + p'·n − p·n/r + nᵀM'n − 2nᵀMn/r (the r-derivative at fixed polynomial),
//      f_rr = α'' + p''·n − 2p'·n/r + 2p·n/r² + nᵀM''n − 4nᵀM'n/r + 6nᵀMn/r²,
//      g_r  = p'/r − p/r² + 2M'n/r − 4Mn/r²   (the r-derivative of the polynomial's gradient).
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "gdeq_ext/checks.h"

#ifdef __CUDACC__
#define GDEQ_HOST_DEVICE __host__ __device__
#else
#define GDEQ_HOST_DEVICE
#endif

namespace gdeq_ext {
namespace moments {

constexpr int kMoments = 10;
constexpr double kPi = 3.14159265358979323846;

// ------------------------------------------------------------------------------------------------ geometry
template <typename T>
struct EdgeGeometry {
  T r;      // |v|, Å
  T inv_r;  // 1/r
  T n[3];   // v / r
};

// Fills `g` and returns whether the edge lies inside the cutoff. Edges at or beyond it (Verlet skin) contribute
// exactly zero to every output, first and second derivatives included, so the kernels skip them.
template <typename T>
GDEQ_HOST_DEVICE inline bool edge_geometry(const T* v, double cutoff, EdgeGeometry<T>& g) {
  using std::sqrt;
  g.r = sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  if (!(g.r / static_cast<T>(cutoff) < T(1))) return false;  // same test as the reference: x = r/rc < 1
  g.inv_r = T(1) / g.r;
  for (int d = 0; d < 3; ++d) g.n[d] = v[d] * g.inv_r;
  return true;
}

// ------------------------------------------------------------------------------------------------ radial
// φ_k and its first two r-derivatives for k = 1, 2, ..., one k at a time: sin(kθ), cos(kθ) advance by the
// angle-addition recurrence (one sin/cos per edge instead of K; the error grows like k·eps, 1e-15 at k = 8),
// and nothing per k needs to be stored, which keeps GPU threads in registers.
template <typename T>
struct RadialBasis {
  T inv_r, omega;  // 1/r, π/rc
  T f0, f1, f2;    // sqrt(2/rc)·f_c(r/rc) and its first and second r-derivatives
  T s1, c1;        // sin θ, cos θ with θ = πr/rc
  T sk, ck;        // sin kθ, cos kθ of the current k
  int k;           // current k (1-based)

  GDEQ_HOST_DEVICE RadialBasis(const EdgeGeometry<T>& g, double cutoff) {
    using std::cos;
    using std::sin;
    using std::sqrt;
    const T rc = static_cast<T>(cutoff);
    const T norm = static_cast<T>(sqrt(2.0 / cutoff));
    inv_r = g.inv_r;
    omega = static_cast<T>(kPi / cutoff);
    const T x = g.r / rc;  // < 1: edges beyond the cutoff never get here
    const T one_minus = T(1) - x;
    f0 = norm * (T(1) + x * x * x * (T(-10) + x * (T(15) - T(6) * x)));
    f1 = norm * (T(-30) * x * x * one_minus * one_minus) / rc;
    f2 = norm * (T(-60) * x * one_minus * (T(1) - T(2) * x)) / (rc * rc);
    const T theta = omega * g.r;
    s1 = sin(theta);
    c1 = cos(theta);
    sk = s1;
    ck = c1;
    k = 1;
  }

  GDEQ_HOST_DEVICE T value() const { return sk * inv_r * f0; }

  GDEQ_HOST_DEVICE void values(T& phi, T& dphi) const {
    const T kw = static_cast<T>(k) * omega;
    const T b0 = sk * inv_r;              // sin(kθ)/r
    const T b1 = (kw * ck - b0) * inv_r;  // d/dr
    phi = b0 * f0;
    dphi = b1 * f0 + b0 * f1;
  }

  GDEQ_HOST_DEVICE void values(T& phi, T& dphi, T& ddphi) const {
    const T kw = static_cast<T>(k) * omega;
    const T b0 = sk * inv_r;
    const T b1 = (kw * ck - b0) * inv_r;
    const T b2 = (-kw * kw * sk - T(2) * b1) * inv_r;  // d²/dr²: (−(kω)² sin − 2 kω cos/r + 2 sin/r²)/r
    phi = b0 * f0;
    dphi = b1 * f0 + b0 * f1;
    ddphi = b2 * f0 + T(2) * b1 * f1 + b0 * f2;
  }

  GDEQ_HOST_DEVICE void next() {
    const T s = sk * c1 + ck * s1;
    ck = ck * c1 - sk * s1;
    sk = s;
    ++k;
  }
};

// ------------------------------------------------------------------------------------------------ angular
template <typename T>
GDEQ_HOST_DEVICE inline void angular(const T* n, T* Y) {
  const T third = T(1) / T(3);
  Y[0] = T(1);
  Y[1] = n[0];
  Y[2] = n[1];
  Y[3] = n[2];
  Y[4] = n[0] * n[0] - third;
  Y[5] = n[1] * n[1] - third;
  Y[6] = n[2] * n[2] - third;
  Y[7] = n[0] * n[1];
  Y[8] = n[0] * n[2];
  Y[9] = n[1] * n[2];
}

// Directional derivative DY = ∇_v Y · a of Y(v/|v|) along a; also returns ρ = n·a (= the derivative of r).
template <typename T>
GDEQ_HOST_DEVICE inline T angular_derivative(const EdgeGeometry<T>& g, const T* a, T* DY) {
  const T* n = g.n;
  const T rho = n[0] * a[0] + n[1] * a[1] + n[2] * a[2];
  T dn[3];
  for (int d = 0; d < 3; ++d) dn[d] = (a[d] - rho * n[d]) * g.inv_r;
  DY[0] = T(0);
  DY[1] = dn[0];
  DY[2] = dn[1];
  DY[3] = dn[2];
  DY[4] = T(2) * n[0] * dn[0];
  DY[5] = T(2) * n[1] * dn[1];
  DY[6] = T(2) * n[2] * dn[2];
  DY[7] = dn[0] * n[1] + n[0] * dn[1];
  DY[8] = dn[0] * n[2] + n[0] * dn[2];
  DY[9] = dn[1] * n[2] + n[1] * dn[2];
  return rho;
}

// ------------------------------------------------------------------------------------------------ f = P·Y
// The pieces of f = α + p·n + nᵀMn that the gradient and Hessian formulas need, for one coefficient vector P.
template <typename T>
struct Quadric {
  T alpha;  // P0 − (P4+P5+P6)/3
  T pn;     // p·n
  T Mn[3];  // M n
  T nMn;    // nᵀ M n
  T p[3];
};

template <typename T>
GDEQ_HOST_DEVICE inline Quadric<T> quadric(const T* P, const T* n) {
  Quadric<T> q;
  const T half = T(0.5);
  q.alpha = P[0] - (P[4] + P[5] + P[6]) / T(3);
  q.p[0] = P[1];
  q.p[1] = P[2];
  q.p[2] = P[3];
  q.pn = P[1] * n[0] + P[2] * n[1] + P[3] * n[2];
  q.Mn[0] = P[4] * n[0] + half * (P[7] * n[1] + P[8] * n[2]);
  q.Mn[1] = P[5] * n[1] + half * (P[7] * n[0] + P[9] * n[2]);
  q.Mn[2] = P[6] * n[2] + half * (P[8] * n[0] + P[9] * n[1]);
  q.nMn = q.Mn[0] * n[0] + q.Mn[1] * n[1] + q.Mn[2] * n[2];
  return q;
}

// out += ∇_v f for f = Σ_m P_m(r) Y_m(n), given P (values) and P1 (r-derivatives) at this edge.
template <typename T>
GDEQ_HOST_DEVICE inline void add_moment_gradient(const T* P, const T* P1, const EdgeGeometry<T>& g, T* out) {
  const Quadric<T> q0 = quadric(P, g.n);
  const Quadric<T> q1 = quadric(P1, g.n);
  const T ir = g.inv_r;
  const T f_r = q1.alpha + q1.pn - q0.pn * ir + q1.nMn - T(2) * q0.nMn * ir;
  for (int d = 0; d < 3; ++d) out[d] += f_r * g.n[d] + (q0.p[d] + T(2) * q0.Mn[d]) * ir;
}

// out += (∇²_v f) a for f = Σ_m P_m(r) Y_m(n), given P, P1, P2 (values, first and second r-derivatives).
template <typename T>
GDEQ_HOST_DEVICE inline void add_moment_hessian_vector(const T* P, const T* P1, const T* P2, const EdgeGeometry<T>& g,
                                                       const T* a, T* out) {
  const Quadric<T> q0 = quadric(P, g.n);
  const Quadric<T> q1 = quadric(P1, g.n);
  const Quadric<T> q2 = quadric(P2, g.n);
  const T ir = g.inv_r;
  const T* n = g.n;
  const T rho = n[0] * a[0] + n[1] * a[1] + n[2] * a[2];
  const T f_r = q1.alpha + q1.pn - q0.pn * ir + q1.nMn - T(2) * q0.nMn * ir;
  const T f_rr = q2.alpha + q2.pn - T(2) * q1.pn * ir + T(2) * q0.pn * ir * ir + q2.nMn - T(4) * q1.nMn * ir +
                 T(6) * q0.nMn * ir * ir;
  T g_r[3];
  for (int d = 0; d < 3; ++d) g_r[d] = (q1.p[d] + T(2) * q1.Mn[d]) * ir - (q0.p[d] + T(4) * q0.Mn[d]) * ir * ir;
  const T g_ra = g_r[0] * a[0] + g_r[1] * a[1] + g_r[2] * a[2];
  // M a (M from P, the values), for the ∇²_poly f = 2M/r² term.
  const T half = T(0.5);
  T Ma[3];
  Ma[0] = P[4] * a[0] + half * (P[7] * a[1] + P[8] * a[2]);
  Ma[1] = P[5] * a[1] + half * (P[7] * a[0] + P[9] * a[2]);
  Ma[2] = P[6] * a[2] + half * (P[8] * a[0] + P[9] * a[1]);
  const T radial = f_rr * rho + g_ra;
  for (int d = 0; d < 3; ++d) {
    out[d] += n[d] * radial + f_r * (a[d] - rho * n[d]) * ir + rho * g_r[d] + T(2) * Ma[d] * ir * ir;
  }
}

}  // namespace moments

// ------------------------------------------------------------------------------------------------ argument checks
inline void check_edge_moments_args(const at::Tensor& vectors, const at::Tensor& edge_index, const at::Tensor& u,
                                    const at::Tensor& weights, double cutoff) {
  check_dim(vectors, "vectors", 2);
  check_size(vectors, "vectors", 1, 3);
  check_floating(vectors, "vectors");
  check_dim(edge_index, "edge_index", 2);
  check_size(edge_index, "edge_index", 0, 2);
  check_size(edge_index, "edge_index", 1, vectors.size(0));
  check_dtype(edge_index, "edge_index", at::kLong);
  check_dim(u, "u", 2);
  check_dtype(u, "u", vectors.scalar_type());
  check_dim(weights, "weights", 2);
  check_size(weights, "weights", 1, u.size(1));
  check_dtype(weights, "weights", vectors.scalar_type());
  TORCH_CHECK(cutoff > 0 && std::isfinite(cutoff), "gdeq_ext: cutoff must be positive and finite, got ", cutoff);
  check_same_device(edge_index, "edge_index", vectors, "vectors");
  check_same_device(u, "u", vectors, "vectors");
  check_same_device(weights, "weights", vectors, "vectors");
}

inline void check_edge_moments_backward_args(const at::Tensor& grad_moments, const at::Tensor& vectors,
                                             const at::Tensor& edge_index, const at::Tensor& u,
                                             const at::Tensor& weights, double cutoff) {
  check_edge_moments_args(vectors, edge_index, u, weights, cutoff);
  check_dim(grad_moments, "grad_moments", 3);
  check_size(grad_moments, "grad_moments", 0, u.size(0));
  check_size(grad_moments, "grad_moments", 1, u.size(1));
  check_size(grad_moments, "grad_moments", 2, moments::kMoments);
  check_dtype(grad_moments, "grad_moments", vectors.scalar_type());
  check_same_device(grad_moments, "grad_moments", vectors, "vectors");
}

inline void check_edge_moments_double_backward_args(const at::Tensor& gg_vectors, const at::Tensor& gg_u,
                                                    const at::Tensor& gg_weights, const at::Tensor& grad_moments,
                                                    const at::Tensor& vectors, const at::Tensor& edge_index,
                                                    const at::Tensor& u, const at::Tensor& weights, double cutoff) {
  check_edge_moments_backward_args(grad_moments, vectors, edge_index, u, weights, cutoff);
  const std::pair<const at::Tensor*, const char*> cotangents[] = {
      {&gg_vectors, "grad_grad_vectors"}, {&gg_u, "grad_grad_u"}, {&gg_weights, "grad_grad_weights"}};
  const at::Tensor* shapes[] = {&vectors, &u, &weights};
  for (int t = 0; t < 3; ++t) {
    const at::Tensor& x = *cotangents[t].first;
    TORCH_CHECK(x.sizes() == shapes[t]->sizes(), "gdeq_ext: ", cotangents[t].second, " must have shape ",
                shapes[t]->sizes(), ", got ", x.sizes());
    check_dtype(x, cotangents[t].second, vectors.scalar_type());
    check_same_device(x, cotangents[t].second, vectors, "vectors");
  }
}

}  // namespace gdeq_ext
