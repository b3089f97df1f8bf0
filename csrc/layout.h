// Pure layout math of the UniGist interleaved sequence. No torch, no CUDA
// runtime: included by the CPU kernels, the CUDA kernels and the GoogleTest
// suite, so there is exactly one definition of "which key does a query see".
//
// Interleaved sequence: positions 0..N-1. After every `ratio` raw tokens one
// gist token follows, so position p is a gist iff p % (ratio + 1) == ratio.
// Mask for query position i and key position j:
//     j <= i && (j < num_sink || is_gist(j) || i - j < window)
//
// Kernels split the keys a query (or a tile of queries [q_lo, q_hi]) sees into
//   * the dense part: [0, sink_end) and [local_lo, q_hi], masked element-wise,
//   * the gist part: gist positions in [sink_end, local_lo). Every query of
//     the tile sees all of them (they are older than every query and outside
//     every query's window), so this part needs no mask at all.
// The "gist shift": a kernel reads the gist part as if the gists of each key
// tile had been moved to the tile's right end and the far tiles had been cut
// down to those right-aligned slices; packing the slices of consecutive tiles
// gives a dense run of gist keys addressed by gist index g -> position
// g * (ratio + 1) + ratio. No block table is built; everything below is O(1).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define UNIGIST_HD __host__ __device__ __forceinline__
#else
#define UNIGIST_HD inline
#endif

namespace unigist {
namespace layout {

struct GistLayout {
  int64_t ratio;     // raw tokens per gist (>= 1)
  int64_t window;    // local window in positions (>= 1)
  int64_t num_sink;  // leading positions every query sees (>= 0)
};

UNIGIST_HD int64_t period(const GistLayout& l) { return l.ratio + 1; }

// Templated on the integer and layout types: the CUDA kernels' inner loops run
// it in 32 bits on their clamped layout (Layout32), everything else in 64.
template <typename I, typename Lay>
UNIGIST_HD bool is_gist(I pos, const Lay& l) {
  return pos % (l.ratio + 1) == l.ratio;
}

UNIGIST_HD bool visible(int64_t q, int64_t k, const GistLayout& l) {
  return k <= q && (k < l.num_sink || is_gist(k, l) || q - k < l.window);
}

// Number of gist positions in [0, end).
UNIGIST_HD int64_t gists_before(int64_t end, const GistLayout& l) {
  return end <= 0 ? 0 : end / (l.ratio + 1);
}

// Position of the g-th gist (0-based).
UNIGIST_HD int64_t gist_position(int64_t g, const GistLayout& l) {
  return g * (l.ratio + 1) + l.ratio;
}

// Interleaved length for `num_raw` raw tokens (a gist closes every full group).
UNIGIST_HD int64_t interleaved_length(int64_t num_raw, const GistLayout& l) {
  return num_raw + num_raw / l.ratio;
}

UNIGIST_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
UNIGIST_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Keys a tile of queries [q_lo, q_hi] must visit, over keys [0, num_keys).
//   dense:  [0, sink_end) and [local_lo, local_hi)  (element-wise mask)
//   gists:  gist indices [gist_begin, gist_end)     (no mask needed)
// The ranges are disjoint and together hold every visible (q, k) pair exactly
// once for every q in the tile.
struct TileVisit {
  int64_t sink_end;
  int64_t gist_begin;
  int64_t gist_end;
  int64_t local_lo;
  int64_t local_hi;
};

UNIGIST_HD TileVisit tile_visit(int64_t q_lo, int64_t q_hi, int64_t num_keys,
                                const GistLayout& l) {
  TileVisit t;
  const int64_t key_end = min64(q_hi + 1, num_keys);
  t.sink_end = min64(l.num_sink, key_end);
  // Below local_lo no query of the tile has the key inside its window.
  t.local_lo = min64(max64(t.sink_end, q_lo - l.window + 1), key_end);
  t.local_hi = key_end;
  t.gist_begin = gists_before(t.sink_end, l);
  t.gist_end = max64(t.gist_begin, gists_before(t.local_lo, l));
  return t;
}

// tile_visit over keys at positions [key_begin, key_stop) only: the tail of a
// compressed cache (KeyLayout below), whose older sinks and gists the caller
// visits as rows. The dense sink range is then [key_begin, sink_end), empty
// when sink_end == key_begin; key_begin = 0 gives tile_visit. The queries must
// sit at or after key_begin (they lie inside the tail).
UNIGIST_HD TileVisit tile_visit_from(int64_t q_lo, int64_t q_hi, int64_t key_begin, int64_t key_stop,
                                     const GistLayout& l) {
  TileVisit t;
  const int64_t key_end = max64(key_begin, min64(q_hi + 1, key_stop));
  t.sink_end = max64(key_begin, min64(l.num_sink, key_end));
  t.local_lo = min64(max64(t.sink_end, q_lo - l.window + 1), key_end);
  t.local_hi = key_end;
  t.gist_begin = gists_before(t.sink_end, l);
  t.gist_end = max64(t.gist_begin, gists_before(t.local_lo, l));
  return t;
}

// Is key k of query q handled by the dense part of the tile that starts at
// q_lo? (The backward kernels, which loop over keys, use this to count each
// pair in the same part the forward did.)
UNIGIST_HD bool in_dense_part(int64_t q, int64_t k, int64_t q_lo,
                              const GistLayout& l) {
  const int64_t local_lo = max64(l.num_sink, q_lo - l.window + 1);
  return visible(q, k, l) && (k < l.num_sink || k >= local_lo);
}

// The dK/dV kernels loop over query tiles for a block of keys. Tile t holds
// query positions q_offset + tile * t + [0, tile) (n_tiles tiles); the block's
// keys are positions in [k_first, k_last] and the pairs counted are those of the
// dense part (in_dense_part with the tile's q_lo) or, for gist_part, of the gist
// part (a gist k >= num_sink with q_lo >= k + window; the block must hold only
// such gists). Tiles [begin, end) hold every such pair of the block (begin ==
// end: none). Tiles past the last query are not counted: the caller's n_tiles.
struct TileRange {
  int64_t begin;
  int64_t end;
};

UNIGIST_HD TileRange dkdv_tile_range(int64_t k_first, int64_t k_last, bool gist_part, int64_t q_offset,
                                     int64_t n_tiles, int64_t tile, const GistLayout& l) {
  TileRange r;
  if (gist_part) {
    // Tiles with q_lo >= k_first + window see the first gist.
    const int64_t need = k_first + l.window - q_offset;
    r.begin = need <= 0 ? 0 : (need + tile - 1) / tile;
    r.end = n_tiles;
  } else {
    // Tiles before the one holding position k_first have every query below
    // every key.
    const int64_t rfirst = k_first - q_offset;
    r.begin = rfirst <= 0 ? 0 : rfirst / tile;
    if (k_first < l.num_sink) {
      r.end = n_tiles;
    } else {
      // A non-sink key k is in the dense part of tile q_lo only if
      // k >= q_lo - window + 1, so only tiles with q_lo <= k_last + window - 1.
      const int64_t lim = k_last + l.window - 1 - q_offset;
      r.end = lim < 0 ? 0 : min64(n_tiles, lim / tile + 1);
    }
  }
  r.begin = min64(r.begin, n_tiles);
  r.end = max64(r.end, r.begin);
  return r;
}

// True when every pair of the block's keys [k_first, k_last] (as above) and
// every query of the full tile starting at q_lo belongs to the part, so the
// kernel needs no per-element test.
UNIGIST_HD bool dkdv_tile_all_in(int64_t k_first, int64_t k_last, bool gist_part, int64_t q_lo, int64_t tile,
                                 const GistLayout& l) {
  if (gist_part) return q_lo >= k_last + l.window;
  return k_last <= q_lo &&
         (k_last < l.num_sink || (k_first >= l.num_sink && q_lo + tile - 1 - k_first < l.window));
}

// The same kernels' per-element test as an interval: the pairs of key k with
// the queries q_lo + c (0 <= c < n_cols) of the tile starting at q_lo that are
// in the part are exactly those with lo <= c <= hi. dkdv_key_last_query is the
// part that depends on the key alone (hoisted out of the loop over tiles): the
// last query position whose window holds k, or `unbounded` (any value >= the
// last query position) for a sink or a gist key. Templated on the integer and
// layout types so that the CUDA kernels run it in 32 bits (Layout32).
template <typename I, typename Lay>
UNIGIST_HD I dkdv_key_last_query(I k, const Lay& l, I unbounded) {
  return (k < l.num_sink || is_gist(k, l)) ? unbounded : static_cast<I>(k + l.window - 1);
}

template <typename I, typename Lay>
UNIGIST_HD void dkdv_key_cols(I k, I last_query, bool gist_part, I q_lo, I n_cols, const Lay& l, I& lo, I& hi) {
  if (gist_part) {  // k a gist >= num_sink: every query of the tile, or none
    lo = 0;
    hi = q_lo >= k + l.window ? n_cols - 1 : -1;
    return;
  }
  // Dense part: the sinks, and keys at or after local_lo = q_lo - window + 1
  // that the query sees (causal; a raw key only inside the query's window).
  const bool in_part = k < l.num_sink || k >= q_lo - l.window + 1;
  const I last = last_query - q_lo;
  lo = k - q_lo;
  hi = !in_part ? -1 : (last < n_cols - 1 ? last : n_cols - 1);
}

// Number of visible keys of query q over keys [0, num_keys): the mask's
// non-zeros on row q.
UNIGIST_HD int64_t row_nnz(int64_t q, int64_t num_keys, const GistLayout& l) {
  const int64_t key_end = min64(q + 1, num_keys);
  if (key_end <= 0) return 0;
  const int64_t sink_end = min64(l.num_sink, key_end);
  const int64_t local_lo = max64(sink_end, q - l.window + 1);
  const int64_t far = gists_before(local_lo, l) - gists_before(sink_end, l);
  return sink_end + far + max64(0, key_end - local_lo);
}

// Gist shift inside fixed tiles of `tile` positions: within each tile the raw
// tokens keep their order and move left, the gists move to the tile's right
// end. shift_position maps an interleaved position to its shifted position;
// unshift_position is its inverse. The last, partial tile is shifted the same
// way over its own length.
UNIGIST_HD int64_t tile_gist_count(int64_t tile_start, int64_t tile_len,
                                   const GistLayout& l) {
  return gists_before(tile_start + tile_len, l) - gists_before(tile_start, l);
}

UNIGIST_HD int64_t shift_position(int64_t pos, int64_t tile, int64_t n,
                                  const GistLayout& l) {
  const int64_t start = (pos / tile) * tile;
  const int64_t len = min64(tile, n - start);
  const int64_t g_before = gists_before(pos, l) - gists_before(start, l);
  const int64_t raws = len - tile_gist_count(start, len, l);
  if (is_gist(pos, l)) return start + raws + g_before;
  return start + (pos - start - g_before);
}

UNIGIST_HD int64_t unshift_position(int64_t spos, int64_t tile, int64_t n,
                                    const GistLayout& l) {
  const int64_t start = (spos / tile) * tile;
  const int64_t len = min64(tile, n - start);
  const int64_t g0 = gists_before(start, l);
  const int64_t raws = len - tile_gist_count(start, len, l);
  const int64_t off = spos - start;
  if (off >= raws) return gist_position(g0 + (off - raws), l);
  // off-th raw token of the tile: raw tokens before a position p number
  // p - gists_before(p); invert over the raw index.
  const int64_t raw_index = (start - g0) + off;  // global raw index
  return raw_index + raw_index / l.ratio;
}

// Where the keys of a call sit. Rows [0, num_keys) of k/v hold, in order:
//   [0, cache_sinks)                     positions 0 .. cache_sinks-1,
//   [cache_sinks, + cache_gists)         the gists first_gist, first_gist+1, ...,
//   the rest (the tail)                  positions tail_start, tail_start+1, ...
// The interleaved layout (training, a full forward) is {0, 0, 0, 0}: row j holds
// position j. A compressed cache after eviction is [sinks | older gists | a
// contiguous tail]; the descriptor gives every key's position by arithmetic.
struct KeyLayout {
  int64_t cache_sinks;
  int64_t cache_gists;
  int64_t first_gist;
  int64_t tail_start;
};

UNIGIST_HD int64_t key_position(int64_t row, const KeyLayout& kl, const GistLayout& l) {
  if (row < kl.cache_sinks) return row;
  if (row < kl.cache_sinks + kl.cache_gists) return gist_position(kl.first_gist + row - kl.cache_sinks, l);
  return kl.tail_start + (row - kl.cache_sinks - kl.cache_gists);
}

// KV eviction: keep cached position `pos` iff some query at position >=
// next_query can still see it.
UNIGIST_HD bool keep_for_future(int64_t pos, int64_t next_query,
                                const GistLayout& l) {
  return pos < l.num_sink || is_gist(pos, l) || next_query - pos < l.window;
}

}  // namespace layout
}  // namespace unigist
