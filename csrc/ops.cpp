// Every op of gdeq_ext, declared once. Kernels register per device in csrc/cpu/ and csrc/cuda/;
// autograd, fake (meta) implementations and the pure-PyTorch references live beside the Python wrappers.
#include <torch/library.h>

TORCH_LIBRARY(gdeq_ext, m) {
  // r_ij = x_j - x_i + shifts_ij · cell[system[i]]  ->  (vectors (E, 3), distances (E,))
  m.def("edge_vectors(Tensor positions, Tensor cell, Tensor edge_index, Tensor shifts, Tensor system)"
        " -> (Tensor, Tensor)");
  // Adjoint of the edge-vector gather: per-edge vectors scattered to atoms (+ at j, - at i) and cells (S ⊗ g).
  m.def("edge_vectors_backward(Tensor grad_vectors, Tensor edge_index, Tensor shifts, Tensor system,"
        " SymInt n_atoms, SymInt n_systems) -> (Tensor, Tensor)");
}
