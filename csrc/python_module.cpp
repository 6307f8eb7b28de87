// The Python module gdeq_ext._C: importing it registers every op (static initializers of TORCH_LIBRARY and
// TORCH_LIBRARY_IMPL); build_info() reports what this binary was compiled with.
#include <torch/extension.h>

// Set by the build (setup.py / CMakeLists.txt) to the torch version the binary is compiled against.
#ifndef GDEQ_EXT_TORCH_VERSION
#define GDEQ_EXT_TORCH_VERSION "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiled_torch_version"] = GDEQ_EXT_TORCH_VERSION;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef GDEQ_EXT_WITH_CUDA
  info["cuda_kernels"] = true;
#else
  info["cuda_kernels"] = false;
#endif
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gdeq_ext compiled kernels (ops are registered under torch.ops.gdeq_ext)";
  m.def("build_info", &build_info, "What this binary was compiled with.");
}
