// Every op of gdeq_ext, declared once. Kernels register per device in csrc/cpu/ and csrc/cuda/;
// autograd, fake (meta) implementations and the pure-PyTorch references live beside the Python wrappers.
#include <torch/library.h>

TORCH_LIBRARY(gdeq_ext, m) {
  // r_ij = x_j - x_i + shifts_ij · cell[system[i]]  ->  (vectors (E, 3), distances (E,))
  m.def(
      "edge_vectors(Tensor positions, Tensor cell, Tensor edge_index, Tensor shifts, Tensor system)"
      " -> (Tensor, Tensor)");
  // Adjoint of the edge-vector gather: per-edge vectors scattered to atoms (+ at j, - at i) and cells (S ⊗ g).
  m.def(
      "edge_vectors_backward(Tensor grad_vectors, Tensor edge_index, Tensor shifts, Tensor system,"
      " SymInt n_atoms, SymInt n_systems) -> (Tensor, Tensor)");
  // Pairs closer than `cutoff` (Å, strictly), all structures of a batch in one call: (edge_index (2, E) int64,
  // shifts (E, 3) int64) sorted by (i, j, shift), r_ij = x_j - x_i + shift · cell[s]. pbc (S, 3) bool,
  // n_atoms_per_system (S,) int64. initial_capacity: neighbors per atom of the GPU's first buffer (0: automatic).
  m.def(
      "neighbor_list(Tensor positions, Tensor cell, Tensor pbc, Tensor n_atoms_per_system, float cutoff,"
      " bool full=True, int initial_capacity=0) -> (Tensor, Tensor)");
  // The MLIP's edge op A[i,c,m] = Σ_{e: i_e=i} R_c(r_e) u[j_e,c] Y_m(r̂_e) -> (N, C, 10); R_c = Σ_k φ_k(r) W[k,c].
  m.def("edge_moments(Tensor vectors, Tensor edge_index, Tensor u, Tensor weights, float cutoff) -> Tensor");
  // Its VJP: grad_moments (N, C, 10) -> (grad_vectors (E, 3), grad_u (N, C), grad_weights (K, C)).
  // compute_vectors=False skips the per-edge output (returned as zeros) when autograd will not use it.
  m.def(
      "edge_moments_backward(Tensor grad_moments, Tensor vectors, Tensor edge_index, Tensor u, Tensor weights,"
      " float cutoff, bool compute_vectors=True) -> (Tensor, Tensor, Tensor)");
  // VJP of edge_moments_backward: cotangents of its three outputs -> (d grad_moments, d vectors, d u, d weights).
  m.def(
      "edge_moments_double_backward(Tensor grad_grad_vectors, Tensor grad_grad_u, Tensor grad_grad_weights,"
      " Tensor grad_moments, Tensor vectors, Tensor edge_index, Tensor u, Tensor weights, float cutoff,"
      " bool compute_vectors=True) -> (Tensor, Tensor, Tensor, Tensor)");
}
