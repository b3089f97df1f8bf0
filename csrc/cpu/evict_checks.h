// Input validation of unigist::evict_kv, shared by the CPU and CUDA kernels so
// both backends reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace unigist {

inline void check_evict_inputs(const char* where, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& positions,
                               int64_t length, int64_t ratio, int64_t window,
                               int64_t num_sink, int64_t next_query) {
  check_layout_args(ratio, window, num_sink);
  TORCH_CHECK(key.dim() == 4 && value.dim() == 4, where,
              ": key and value must be 4-D [batch, heads, capacity, head_dim], got ranks ",
              key.dim(), " and ", value.dim());
  TORCH_CHECK(key.sizes() == value.sizes(), where, ": key and value shapes differ: ",
              key.sizes(), " vs ", value.sizes());
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), where,
              ": key and value must share a dtype, got ", key.scalar_type(), " and ",
              value.scalar_type());
  TORCH_CHECK(positions.dim() == 1, where, ": positions must be 1-D [capacity], got rank ",
              positions.dim());
  TORCH_CHECK(positions.scalar_type() == at::kLong, where,
              ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.size(0) == key.size(2), where, ": positions has ", positions.size(0),
              " entries but the cache capacity (key.size(2)) is ", key.size(2));
  TORCH_CHECK(key.device() == value.device() && key.device() == positions.device(), where,
              ": key, value and positions must be on one device, got ", key.device(), ", ",
              value.device(), ", ", positions.device());
  TORCH_CHECK(length >= 0 && length <= key.size(2), where, ": length must be in [0, capacity=",
              key.size(2), "], got ", length);
  TORCH_CHECK(next_query >= 0, where, ": next_query must be >= 0, got ", next_query);
}

}  // namespace unigist
