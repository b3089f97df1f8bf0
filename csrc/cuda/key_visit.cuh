// Which keys a query tile (or a dK/dV block) visits, in the 32-bit form the
// inner loops use, and the masks of the blocks that are not fully visible. One
// place, so that the forward, dQ and dK/dV kernels (mma.sync and wgmma) count
// every (query, key) pair alike; layout.h holds the 64-bit originals the CPU
// kernels and tests/cpp check against.
#pragma once

#include <cmath>
#include <cstdint>

#include "layout.h"

namespace unigist {
namespace cuda_detail {

// ---- 32-bit layout math for the inner loops (values clamped on the host) --
struct Layout32 {
  int ratio, window, num_sink;
  __device__ __forceinline__ bool is_gist(int p) const { return layout::is_gist(p, *this); }
  __device__ __forceinline__ bool visible(int q, int k) const {
    return k <= q && (k < num_sink || q - k < window || is_gist(k));
  }
  // Mirrors layout::in_dense_part.
  __device__ __forceinline__ bool in_dense_part(int q, int k, int q_lo) const {
    const int local_lo = max(num_sink, q_lo - window + 1);
    return visible(q, k) && (k < num_sink || k >= local_lo);
  }
  __device__ __forceinline__ int gist_position(int g) const { return g * (ratio + 1) + ratio; }
  __device__ __forceinline__ int gists_before(int end) const {
    return end <= 0 ? 0 : end / (ratio + 1);
  }
  __device__ __forceinline__ layout::GistLayout as64() const {
    return layout::GistLayout{ratio, window, num_sink};
  }
};

// A query tile's key visit (layout::tile_visit) cut into blocks of bn keys,
// shared by the forward and the dQ kernel so both count each pair alike.
// Which keys key block `it` of a tile covers. kind: 0 sink, 1 gist, 2 local.
struct KeyBlocks {
  int sink_end, gist_begin, gist_end, local_lo, local_hi;
  int nA, nB, nC;
  __device__ __forceinline__ void init(const layout::TileVisit& tv, int bn) {
    sink_end = static_cast<int>(tv.sink_end);
    gist_begin = static_cast<int>(tv.gist_begin);
    gist_end = static_cast<int>(tv.gist_end);
    local_lo = static_cast<int>(tv.local_lo);
    local_hi = static_cast<int>(tv.local_hi);
    nA = (sink_end + bn - 1) / bn;
    nB = (gist_end - gist_begin + bn - 1) / bn;
    nC = (local_hi - local_lo + bn - 1) / bn;
  }
  __device__ __forceinline__ int total() const { return nA + nB + nC; }
  // The k/v row of slot 0 of a block and the row step between its slots.
  __device__ __forceinline__ void rows(int kind, int first, const Layout32& l, int64_t& row0,
                                       int64_t& step) const {
    row0 = kind == 1 ? l.gist_position(first) : first;
    step = kind == 1 ? l.ratio + 1 : 1;
  }
  __device__ __forceinline__ int mask_kind(int kind) const { return kind; }
  // Sets kind, first (first key position or first gist index) and end
  // (exclusive bound of the same quantity) of block it.
  __device__ __forceinline__ void block(int it, int bn, int& kind, int& first, int& end) const {
    if (it < nA) {
      kind = 0;
      first = it * bn;
      end = sink_end;
    } else if (it < nA + nB) {
      kind = 1;
      first = gist_begin + (it - nA) * bn;
      end = gist_end;
    } else {
      kind = 2;
      first = local_lo + (it - nA - nB) * bn;
      end = local_hi;
    }
  }
};

// Position of slot s of a block (kind, first); -1 when past the block's end.
__device__ __forceinline__ int key_position(const Layout32& l, int kind, int first, int end, int s) {
  const int x = first + s;
  if (x >= end) return -1;
  return kind == 1 ? l.gist_position(x) : x;
}

// The key blocks of a query tile over a compressed cache (layout::KeyLayout):
// kind 3, the cached rows [0, cached) (sinks and gists older than every query,
// so always visible: only the block's end is masked); then kinds 0, 1, 2 as in
// KeyBlocks over the tail (layout::tile_visit_from), whose position x sits at
// row x + row_shift (row_shift = cached - tail_start).
struct CacheBlocks {
  int cached, row_shift, sink_begin, sink_end, gist_begin, gist_end, local_lo, local_hi;
  int nP, nA, nB, nC;
  __device__ __forceinline__ void init(int cached_, int tail_start, int tail_end, const Layout32& l, int q_lo,
                                       int q_hi, int bn) {
    const layout::TileVisit tv = layout::tile_visit_from(q_lo, q_hi, tail_start, tail_end, l.as64());
    cached = cached_;
    row_shift = cached_ - tail_start;
    sink_begin = tail_start;
    sink_end = static_cast<int>(tv.sink_end);
    gist_begin = static_cast<int>(tv.gist_begin);
    gist_end = static_cast<int>(tv.gist_end);
    local_lo = static_cast<int>(tv.local_lo);
    local_hi = static_cast<int>(tv.local_hi);
    nP = (cached + bn - 1) / bn;
    nA = (sink_end - sink_begin + bn - 1) / bn;
    nB = (gist_end - gist_begin + bn - 1) / bn;
    nC = (local_hi - local_lo + bn - 1) / bn;
  }
  __device__ __forceinline__ int total() const { return nP + nA + nB + nC; }
  __device__ __forceinline__ void block(int it, int bn, int& kind, int& first, int& end) const {
    if (it < nP) {
      kind = 3;
      first = it * bn;
      end = cached;
    } else if ((it -= nP) < nA) {
      kind = 0;
      first = sink_begin + it * bn;
      end = sink_end;
    } else if ((it -= nA) < nB) {
      kind = 1;
      first = gist_begin + it * bn;
      end = gist_end;
    } else {
      kind = 2;
      first = local_lo + (it - nB) * bn;
      end = local_hi;
    }
  }
  __device__ __forceinline__ void rows(int kind, int first, const Layout32& l, int64_t& row0,
                                       int64_t& step) const {
    row0 = kind == 3 ? first : (kind == 1 ? l.gist_position(first) : first) + row_shift;
    step = kind == 1 ? l.ratio + 1 : 1;
  }
  // The kind the mask helpers take: cached rows are masked like gist blocks
  // (their end only).
  __device__ __forceinline__ int mask_kind(int kind) const { return kind == 3 ? 1 : kind; }
};

// k/v row of slot s of CacheBlocks block (kind, first, end); -1 past the block's
// end. (row_shift passed in: the mma.sync kernel reads it from its parameters,
// which measured faster than a CacheBlocks member.)
__device__ __forceinline__ int cache_key_row(const Layout32& l, int row_shift, int kind, int first, int end,
                                             int s) {
  const int x = first + s;
  if (x >= end) return -1;
  if (kind == 3) return x;
  return (kind == 1 ? l.gist_position(x) : x) + row_shift;
}

// ---- masks of one 16-row fragment ----------------------------------------
// A fragment is the mma.sync m16n8 accumulator layout repeated over NT key
// tiles (the wgmma m64 accumulator is the same per warp): s[j][0..1] are row
// r0 = lane / 4, key slots 8j + 2(lane % 4) + {0, 1}; s[j][2..3] row r0 + 8.
// Both forward kernels use these, so they mask and normalize alike.

// False when every (query, key) pair of key block (kind, first, end) of BN
// slots is visible to every query of the tile [q_lo, q_hi].
__device__ __forceinline__ bool block_needs_mask(const Layout32& l, int kind, int first, int end,
                                                 int bn, int q_lo, int q_hi) {
  if (kind == 1) return first + bn > end;
  const int last = first + bn - 1;
  return last >= end || last > q_lo || (kind == 0 ? false : q_hi - first >= l.window);
}

// Calls f(j, e, ok) for each element s[j][e] of the thread's fragment over key
// block (kind, first, end): row qpos[e >> 1], key slot 8j + 2(lane % 4) + (e & 1);
// ok says whether that (query, key) pair is visible. Gist blocks are visible to
// every query of the tile but for slots past the block's end. In sink and local
// blocks the keys are the consecutive positions first + slot, and row q sees key
// k < end iff k <= q and (q - k < window, or k is a sink or a gist): that last
// part depends on the key only, so it is computed per slot, and the gist test
// (k mod (ratio + 1) == ratio) is carried from slot to slot. The per-element
// modulo it replaces (layout::visible) was an integer division of ~25
// instructions per element, which made a masked block cost several unmasked
// ones (benchmarks/NOTES.md, 2026-12-03).
template <int NT, typename F>
__device__ __forceinline__ void fragment_visibility(const Layout32& l, int kind, int first, int end,
                                                    const int (&qpos)[2], int lane, F&& f) {
  const int c0 = 2 * (lane & 3);
  if (kind == 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool ok = first + j * 8 + c0 + c < end;
        f(j, c, ok);
        f(j, 2 + c, ok);
      }
    return;
  }
  const int m = l.ratio + 1;
  const int step = 8 % m;
  int g = (first + c0) % m;  // position mod (ratio + 1) of slot 8j + c0; one division per block
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int kp = first + j * 8 + c0 + c;
      const int gc = g + c < m ? g + c : g + c - m;
      const bool far_ok = kp < l.num_sink || gc == l.ratio;  // visible beyond the window
      const bool in = kp < end;
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int q = qpos[hr];
        f(j, 2 * hr + c, in && kp <= q && (q - kp < l.window || far_ok));
      }
    }
    g += step;
    if (g >= m) g -= m;
  }
}

// Sets the invisible entries to -inf; qpos(hr) = query position of the
// thread's row r0 + 8 hr.
template <int NT, typename QPos>
__device__ __forceinline__ void mask_fragment_at(float (&s)[NT][4], const Layout32& l, int kind, int first,
                                                 int end, const QPos& qpos, int lane) {
  const int q[2] = {qpos(0), qpos(1)};
  fragment_visibility<NT>(l, kind, first, end, q, lane, [&](int j, int e, bool ok) {
    if (!ok) s[j][e] = -INFINITY;
  });
}

// Rows of one query each: qp0 = query position of row r0.
template <int NT>
__device__ __forceinline__ void mask_fragment(float (&s)[NT][4], const Layout32& l, int kind, int first,
                                              int end, int qp0, int lane) {
  mask_fragment_at(s, l, kind, first, end, [qp0](int hr) { return qp0 + hr * 8; }, lane);
}

// Rows at any query positions (the cache forward packs (query, head) rows).
template <int NT>
__device__ __forceinline__ void mask_fragment(float (&s)[NT][4], const Layout32& l, int kind, int first,
                                              int end, const int (&qpos)[2], int lane) {
  mask_fragment_at(s, l, kind, first, end, [&qpos](int hr) { return qpos[hr]; }, lane);
}

}  // namespace cuda_detail
}  // namespace unigist
