// Kernel entry points. ops.cpp registers them under TORCH_LIBRARY(unigist);
// csrc/cpu/ and csrc/cuda/ define them. Shapes: q [B, Hq, Nq, D],
// k/v [B, Hkv, Nk, D], Hq % Hkv == 0; query row t sits at interleaved position
// q_offset + t, key row j at position j.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace unigist {

// out [B, Hq, Nq, D] (dtype of q), lse [B, Hq, Nq] float32 (natural log).
std::tuple<at::Tensor, at::Tensor> gist_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset);

// dq, dk, dv with the dtypes and shapes of q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset);

// The same over keys in a compressed-cache layout (layout::KeyLayout): rows
// [cache_sinks | cache_gists gists from first_gist | tail from tail_start];
// queries at q_offset.. inside the tail. CUDA has the forward only (inference);
// its backward raises NotImplementedError.
std::tuple<at::Tensor, at::Tensor> gist_attention_cache_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ratio, int64_t window,
    int64_t num_sink, double softmax_scale, int64_t q_offset, int64_t cache_sinks, int64_t cache_gists,
    int64_t first_gist, int64_t tail_start);

// One step over a compressed cache whose layout sits in a tensor (a CUDA graph replays the
// call while the host rewrites it): layout int64 [q_offset, cache_sinks, cache_gists,
// first_gist, tail_start, num_keys], keys in rows [0, num_keys) of k/v (a cache's whole
// [B, H, capacity, D] buffers). Otherwise gist_attention_cache_fwd.
std::tuple<at::Tensor, at::Tensor> gist_attention_cache_step_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& layout,
                                                                  int64_t ratio, int64_t window, int64_t num_sink,
                                                                  double softmax_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_cache_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset, int64_t cache_sinks, int64_t cache_gists, int64_t first_gist, int64_t tail_start);

// In-place KV eviction. key/value [B, H, C, D], positions int64 [C]; rows
// [0, length) are valid. Keeps, in order, the rows whose position a query at
// position >= next_query can still see, moves them to the front and returns
// how many were kept. Rows past the returned length are left unspecified.
int64_t evict_kv_cpu(at::Tensor& key, at::Tensor& value, at::Tensor& positions,
                     int64_t length, int64_t ratio, int64_t window,
                     int64_t num_sink, int64_t next_query);

#ifdef UNIGIST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gist_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset);

// csrc/cuda/cache_fwd_sm80.cu: q/k/v read in place through their strides;
// split-KV when few CTAs would run (decoding).
std::tuple<at::Tensor, at::Tensor> gist_attention_cache_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ratio, int64_t window,
    int64_t num_sink, double softmax_scale, int64_t q_offset, int64_t cache_sinks, int64_t cache_gists,
    int64_t first_gist, int64_t tail_start);

// The layout is read on the device (the host checks its shape only): values that would read
// past the buffer mean no keys, never an out-of-bounds read.
std::tuple<at::Tensor, at::Tensor> gist_attention_cache_step_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v, const at::Tensor& layout,
                                                                   int64_t ratio, int64_t window, int64_t num_sink,
                                                                   double softmax_scale);

// Raises NotImplementedError (a clear message rather than the dispatcher's).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_cache_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset, int64_t cache_sinks, int64_t cache_gists, int64_t first_gist, int64_t tail_start);

// Which forward kernel gist_attention_fwd runs for q's device right now: 90
// (wgmma, sm_90a) or 80 (mma.sync); see UNIGIST_FORCE_SM80.
int64_t gist_attention_fwd_arch_cuda(const at::Tensor& q);

int64_t evict_kv_cuda(at::Tensor& key, at::Tensor& value, at::Tensor& positions,
                      int64_t length, int64_t ratio, int64_t window,
                      int64_t num_sink, int64_t next_query);
#endif

}  // namespace unigist
