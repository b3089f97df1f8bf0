// Input validation shared by every backend, so CPU and CUDA reject the same
// inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "layout.h"

namespace unigist {

// Which inputs the CUDA kernels take: the one table (Python reads it through the
// kernel_supports op; the CPU kernels take every float dtype and head dim).
inline bool cuda_kernels_take(at::ScalarType dtype, int64_t head_dim) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && (head_dim == 64 || head_dim == 128);
}

inline bool cpu_kernels_take(at::ScalarType dtype, int64_t head_dim) {
  return (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf) &&
         head_dim >= 1;
}

inline void check_layout_args(int64_t ratio, int64_t window, int64_t num_sink) {
  TORCH_CHECK_VALUE(ratio >= 1, "unigist: ratio must be >= 1, got ", ratio);
  TORCH_CHECK_VALUE(window >= 1, "unigist: window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(num_sink >= 0, "unigist: num_sink must be >= 0, got ", num_sink);
}

// Checks q/k/v (everything but where the queries sit); `where` names the op.
inline void check_attention_tensors(const char* where, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v,
                                    int64_t ratio, int64_t window, int64_t num_sink) {
  check_layout_args(ratio, window, num_sink);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, where,
              ": q, k, v must be 4-D [batch, heads, seq, head_dim], got ranks ",
              q.dim(), ", ", k.dim(), ", ", v.dim());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              where, ": q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), where,
              ": q, k, v must be on one device, got ", q.device(), ", ",
              k.device(), ", ", v.device());
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0), where,
              ": batch sizes differ: q ", q.size(0), ", k ", k.size(0), ", v ", v.size(0));
  TORCH_CHECK(k.sizes() == v.sizes(), where, ": k and v shapes differ: ", k.sizes(),
              " vs ", v.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, where,
              ": query heads (", q.size(1), ") must be a multiple of key/value heads (",
              k.size(1), ")");
  TORCH_CHECK(q.size(3) == k.size(3), where, ": head dims differ: q ", q.size(3),
              ", k ", k.size(3));
  TORCH_CHECK_VALUE(q.size(3) >= 1, where, ": head_dim must be >= 1, got ", q.size(3));
}

// Checks q/k/v of the interleaved layout (key row j at position j; queries at
// q_offset .. q_offset + Nq - 1); `where` names the op in messages.
inline void check_attention_inputs(const char* where, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v,
                                   int64_t ratio, int64_t window,
                                   int64_t num_sink, int64_t q_offset) {
  check_attention_tensors(where, q, k, v, ratio, window, num_sink);
  TORCH_CHECK_VALUE(q_offset >= 0, where, ": q_offset must be >= 0, got ", q_offset);
  // Compared as Nk - Nq >= q_offset so a huge q_offset cannot overflow.
  TORCH_CHECK_VALUE(k.size(2) >= q.size(2) && k.size(2) - q.size(2) >= q_offset, where, ": keys (",
                    k.size(2), ") must cover every query position: q_offset (", q_offset,
                    ") + q_len (", q.size(2), ") > k_len");
}

// softmax_scale multiplies the logits; a NaN, infinite, zero or negative scale
// would give garbage (or a different softmax) without any error.
inline void check_softmax_scale(const char* where, double softmax_scale) {
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0, where,
                    ": softmax_scale must be a finite positive number, got ", softmax_scale);
}

// The compressed-cache key layout (layout::KeyLayout) of a call: rows
// [sinks | gists first_gist.. | tail from tail_start], and every query inside
// the tail (queries at q_offset .. q_offset + Nq - 1, keys up to its end).
// Written without sums that could overflow for huge arguments.
inline void check_key_layout(const char* where, const at::Tensor& q, const at::Tensor& k, int64_t ratio,
                             int64_t num_sink, int64_t q_offset, int64_t cache_sinks, int64_t cache_gists,
                             int64_t first_gist, int64_t tail_start) {
  const int64_t nk = k.size(2), nq = q.size(2);
  TORCH_CHECK_VALUE(cache_sinks >= 0 && cache_gists >= 0 && first_gist >= 0 && tail_start >= 0, where,
                    ": cache_sinks, cache_gists, first_gist and tail_start must be >= 0, got ", cache_sinks,
                    ", ", cache_gists, ", ", first_gist, ", ", tail_start);
  TORCH_CHECK_VALUE(cache_sinks <= nk && cache_gists <= nk - cache_sinks, where, ": cache_sinks (",
                    cache_sinks, ") + cache_gists (", cache_gists, ") exceed the ", nk, " key rows");
  TORCH_CHECK_VALUE(cache_sinks <= num_sink && cache_sinks <= tail_start, where, ": cache_sinks (",
                    cache_sinks, ") must be <= num_sink (", num_sink, ") and <= tail_start (", tail_start, ")");
  if (cache_gists > 0) {
    const layout::GistLayout l{ratio, 1, num_sink};
    // Gist positions grow by ratio + 1; bound the index before multiplying.
    const int64_t max_index = tail_start / (ratio + 1);
    TORCH_CHECK_VALUE(first_gist <= max_index && cache_gists <= max_index - first_gist + 1 &&
                          layout::gist_position(first_gist, l) >= cache_sinks &&
                          layout::gist_position(first_gist + cache_gists - 1, l) < tail_start,
                      where, ": the cached gists ", first_gist, " .. ", first_gist + cache_gists - 1,
                      " must sit after the cached sinks (", cache_sinks, ") and before tail_start (", tail_start,
                      ")");
  }
  const int64_t tail_rows = nk - cache_sinks - cache_gists;
  TORCH_CHECK_VALUE(q_offset >= tail_start && nq <= tail_rows && q_offset - tail_start <= tail_rows - nq, where,
                    ": queries at positions ", q_offset, " .. ", q_offset, " + ", nq,
                    " - 1 must lie inside the tail of ", tail_rows, " keys starting at position ", tail_start);
}

// gist_attention_cache_step's layout tensor: int64 [q_offset, cache_sinks, cache_gists,
// first_gist, tail_start, num_keys] on q's device.
inline void check_step_layout(const char* where, const at::Tensor& layout, const at::Tensor& q) {
  TORCH_CHECK_VALUE(layout.scalar_type() == at::kLong && layout.dim() == 1 && layout.numel() == 6 &&
                        layout.is_contiguous(),
                    where, ": layout must be a contiguous int64 tensor of 6 values [q_offset, cache_sinks, "
                    "cache_gists, first_gist, tail_start, num_keys], got ", layout.scalar_type(), " of shape ",
                    layout.sizes());
  TORCH_CHECK_VALUE(layout.device() == q.device(), where, ": layout is on ", layout.device(), " but q on ",
                    q.device());
}

}  // namespace unigist
