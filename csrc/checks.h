// Input validation shared by every backend, so CPU and CUDA reject the same
// inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace unigist {

inline void check_layout_args(int64_t ratio, int64_t window, int64_t num_sink) {
  TORCH_CHECK_VALUE(ratio >= 1, "unigist: ratio must be >= 1, got ", ratio);
  TORCH_CHECK_VALUE(window >= 1, "unigist: window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(num_sink >= 0, "unigist: num_sink must be >= 0, got ", num_sink);
}

// Checks q/k/v and returns nothing; `where` names the op in messages.
inline void check_attention_inputs(const char* where, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v,
                                   int64_t ratio, int64_t window,
                                   int64_t num_sink, int64_t q_offset) {
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

}  // namespace unigist
