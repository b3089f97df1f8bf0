// Schemas of every unigist op, and their registration per backend. Kernels
// live in csrc/cpu and csrc/cuda; this file only wires them up.
#include <torch/library.h>

#include "ops.h"

// A Python module named unigist._C so `import unigist._C` loads the library
// and runs the registrations below.
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(unigist, m) {
  m.def(
      "gist_attention_fwd(Tensor q, Tensor k, Tensor v, int ratio, int window, "
      "int num_sink, float softmax_scale, int q_offset=0) -> (Tensor out, Tensor lse)");
  m.def(
      "gist_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int ratio, int window, int num_sink, float softmax_scale, "
      "int q_offset=0) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "evict_kv(Tensor(a!) key, Tensor(b!) value, Tensor(c!) positions, int length, "
      "int ratio, int window, int num_sink, int next_query) -> int");
}

TORCH_LIBRARY_IMPL(unigist, CPU, m) {
  m.impl("gist_attention_fwd", &unigist::gist_attention_fwd_cpu);
  m.impl("gist_attention_bwd", &unigist::gist_attention_bwd_cpu);
  m.impl("evict_kv", &unigist::evict_kv_cpu);
}

#ifdef UNIGIST_WITH_CUDA
TORCH_LIBRARY_IMPL(unigist, CUDA, m) {
  m.impl("gist_attention_fwd", &unigist::gist_attention_fwd_cuda);
  m.impl("gist_attention_bwd", &unigist::gist_attention_bwd_cuda);
  m.impl("evict_kv", &unigist::evict_kv_cuda);
}
#endif
