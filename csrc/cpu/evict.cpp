// CPU implementation of unigist::evict_kv: in-place, order-preserving removal
// of the KV rows that no future query can see any more.
//
// key/value [B, H, C, D] (C = capacity), positions int64 [C]; rows [0, length)
// are valid. A row is kept iff layout::keep_for_future(position, next_query).
// Kept rows move to the front of key, value and positions (stable order) and
// the kept count is returned. Rows before the first dropped one never move,
// so only the tail after it is rewritten.
#include <ATen/ATen.h>

#include <vector>

#include "cpu/evict_checks.h"
#include "layout.h"
#include "ops.h"

namespace unigist {

int64_t evict_kv_cpu(at::Tensor& key, at::Tensor& value, at::Tensor& positions,
                     int64_t length, int64_t ratio, int64_t window,
                     int64_t num_sink, int64_t next_query) {
  check_evict_inputs("unigist::evict_kv (CPU)", key, value, positions, length, ratio,
                     window, num_sink, next_query);
  TORCH_CHECK(key.device().is_cpu(), "unigist::evict_kv (CPU): key must be a CPU tensor, got ",
              key.device());
  if (length == 0) return 0;

  const layout::GistLayout l{ratio, window, num_sink};
  // positions may be strided; read through an accessor.
  auto pos = positions.accessor<int64_t, 1>();

  int64_t first_drop = length;
  std::vector<int64_t> tail;  // kept row indices at or after first_drop
  for (int64_t i = 0; i < length; ++i) {
    const bool keep = layout::keep_for_future(pos[i], next_query, l);
    if (!keep) {
      if (first_drop == length) first_drop = i;
    } else if (first_drop != length) {
      tail.push_back(i);
    }
  }
  if (first_drop == length) return length;  // nothing to drop

  const int64_t moved = static_cast<int64_t>(tail.size());
  const int64_t kept = first_drop + moved;
  if (moved == 0) return kept;

  // Gather the moved rows into a temporary (index_select), then write them
  // back at [first_drop, kept). The temporary avoids any overlap hazard.
  at::Tensor idx = at::from_blob(tail.data(), {moved}, at::TensorOptions().dtype(at::kLong))
                       .clone();
  key.narrow(2, first_drop, moved).copy_(key.index_select(2, idx));
  value.narrow(2, first_drop, moved).copy_(value.index_select(2, idx));
  for (int64_t j = 0; j < moved; ++j) {
    pos[first_drop + j] = pos[tail[j]];  // tail[j] >= first_drop + j: reads never see a write
  }
  return kept;
}

}  // namespace unigist
