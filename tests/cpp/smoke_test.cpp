// C++ smoke test: the ops registered by libgdeq_ext_ops are reachable through the dispatcher and give the
// values of the same formula written with ATen ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, const char* what) {
  if (!at::allclose(got, want, 1e-12, 1e-12)) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  } else {
    std::printf("ok: %s\n", what);
  }
}

}  // namespace

int main() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::manual_seed(0);
  const at::Tensor positions = at::rand({4, 3}, f64) * 3.0;
  const at::Tensor cell = (at::eye(3, f64) * 4.0 + at::rand({3, 3}, f64) * 0.5).unsqueeze(0).repeat({2, 1, 1});
  const at::Tensor system = at::tensor({0, 0, 1, 1}, i64);
  const at::Tensor edge_index = at::tensor({0, 1, 1, 0, 2, 3, 3, 2}, i64).view({2, 4}).t().contiguous().t();
  const at::Tensor shifts = at::tensor({0, 0, 0, 1, -1, 0, 0, 0, 2, 0, 1, 0}, i64).view({4, 3});

  auto gather = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("gdeq_ext::edge_vectors", "")
                    .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&)>();
  const auto [vectors, distances] = gather.call(positions, cell, edge_index, shifts, system);

  const at::Tensor i = edge_index[0], j = edge_index[1];
  const at::Tensor image =
      at::bmm(shifts.to(at::kDouble).unsqueeze(1), cell.index_select(0, system.index_select(0, i))).squeeze(1);
  const at::Tensor want = positions.index_select(0, j) - positions.index_select(0, i) + image;
  expect_close(vectors, want, "edge_vectors: vectors");
  expect_close(distances, want.norm(2, {1}), "edge_vectors: distances");

  auto scatter = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("gdeq_ext::edge_vectors_backward", "")
                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, c10::SymInt, c10::SymInt)>();
  const at::Tensor grad = at::rand({4, 3}, f64);
  const auto [grad_positions, grad_cell] = scatter.call(grad, edge_index, shifts, system, 4, 2);
  // Adjoint identity: <gather(a, b), g> = <a, scatter(g).positions> + <b, scatter(g).cell>
  const at::Tensor a = at::rand({4, 3}, f64), b = at::rand({2, 3, 3}, f64);
  const auto [va, unused] = gather.call(a, b, edge_index, shifts, system);
  expect_close((va * grad).sum(), (a * grad_positions).sum() + (b * grad_cell).sum(), "edge_vectors_backward: adjoint");

  if (failures) return 1;
  std::printf("gdeq_ext C++ smoke test passed\n");
  return 0;
}
