// Schemas of every unigist op, and their registration per backend. Kernels
// live in csrc/cpu and csrc/cuda; this file only wires them up.
#include <torch/library.h>

#include <string>

#include "checks.h"
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

namespace {

// evict_kv returns a SymInt so torch.compile can trace it with a data-dependent
// size; the kernels compute a plain count.
using EvictFn = int64_t (*)(at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                            int64_t);
template <EvictFn fn>
c10::SymInt evict_kv_sym(at::Tensor& key, at::Tensor& value, at::Tensor& positions, int64_t length,
                         int64_t ratio, int64_t window, int64_t num_sink, int64_t next_query) {
  return c10::SymInt(fn(key, value, positions, length, ratio, window, num_sink, next_query));
}

// The vector ISA the CPU kernels were compiled for (setup.py, UNIGIST_CPU_ISA),
// and whether this CPU runs it: ops.py refuses to import a build whose
// instructions this CPU lacks (rather than dying of SIGILL in a kernel).
std::string cpu_isa() {
#ifdef UNIGIST_CPU_AVX2
  return "avx2";
#else
  return "default";
#endif
}

bool cpu_isa_runs_here() {
#if defined(UNIGIST_CPU_AVX2) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return true;
#endif
}

// Whether unigist has a kernel for `device` ("cpu" / "cuda") taking these inputs
// (for CUDA: whether this build has CUDA kernels, too).
bool kernel_supports(const std::string& device, at::ScalarType dtype, int64_t head_dim) {
  if (device == "cpu") return unigist::cpu_kernels_take(dtype, head_dim);
#ifdef UNIGIST_WITH_CUDA
  if (device == "cuda") return unigist::cuda_kernels_take(dtype, head_dim);
#endif
  return false;
}

}  // namespace

TORCH_LIBRARY(unigist, m) {
  m.def(
      "gist_attention_fwd(Tensor q, Tensor k, Tensor v, int ratio, int window, "
      "int num_sink, float softmax_scale, int q_offset=0) -> (Tensor out, Tensor lse)");
  m.def(
      "gist_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int ratio, int window, int num_sink, float softmax_scale, "
      "int q_offset=0) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Keys in the compressed-cache layout [sinks | gists | contiguous tail]
  // (csrc/layout.h KeyLayout); the backward has CPU kernels only.
  m.def(
      "gist_attention_cache_fwd(Tensor q, Tensor k, Tensor v, int ratio, int window, int num_sink, "
      "float softmax_scale, int q_offset, int cache_sinks, int cache_gists, int first_gist, int tail_start) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "gist_attention_cache_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int ratio, "
      "int window, int num_sink, float softmax_scale, int q_offset, int cache_sinks, int cache_gists, "
      "int first_gist, int tail_start) -> (Tensor dq, Tensor dk, Tensor dv)");
  // A decode step replayed by a CUDA graph: the layout (int64 [q_offset, cache_sinks,
  // cache_gists, first_gist, tail_start, num_keys]) is a tensor the host rewrites between
  // replays; keys are rows [0, num_keys) of k/v. Forward only (inference).
  m.def(
      "gist_attention_cache_step(Tensor q, Tensor k, Tensor v, Tensor layout, int ratio, int window, "
      "int num_sink, float softmax_scale) -> (Tensor out, Tensor lse)");
  // 90 or 80: the CUDA forward kernel in use for q's device; 0 on CPU.
  m.def("gist_attention_fwd_arch(Tensor q) -> int");
  m.def("kernel_supports(str device, ScalarType dtype, int head_dim) -> bool", &kernel_supports);
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isa_runs_here() -> bool", &cpu_isa_runs_here);
  m.def(
      "evict_kv(Tensor(a!) key, Tensor(b!) value, Tensor(c!) positions, int length, "
      "int ratio, int window, int num_sink, int next_query) -> SymInt");
}

TORCH_LIBRARY_IMPL(unigist, CPU, m) {
  m.impl("gist_attention_fwd", &unigist::gist_attention_fwd_cpu);
  m.impl("gist_attention_bwd", &unigist::gist_attention_bwd_cpu);
  m.impl("gist_attention_cache_fwd", &unigist::gist_attention_cache_fwd_cpu);
  m.impl("gist_attention_cache_bwd", &unigist::gist_attention_cache_bwd_cpu);
  m.impl("gist_attention_cache_step", &unigist::gist_attention_cache_step_cpu);
  m.impl("evict_kv", &evict_kv_sym<&unigist::evict_kv_cpu>);
  m.impl("gist_attention_fwd_arch", [](const at::Tensor&) -> int64_t { return 0; });
}

#ifdef UNIGIST_WITH_CUDA
TORCH_LIBRARY_IMPL(unigist, CUDA, m) {
  m.impl("gist_attention_fwd", &unigist::gist_attention_fwd_cuda);
  m.impl("gist_attention_bwd", &unigist::gist_attention_bwd_cuda);
  m.impl("gist_attention_cache_fwd", &unigist::gist_attention_cache_fwd_cuda);
  m.impl("gist_attention_cache_bwd", &unigist::gist_attention_cache_bwd_cuda);
  m.impl("gist_attention_cache_step", &unigist::gist_attention_cache_step_cuda);
  m.impl("evict_kv", &evict_kv_sym<&unigist::evict_kv_cuda>);
  m.impl("gist_attention_fwd_arch", &unigist::gist_attention_fwd_arch_cuda);
}
#endif
