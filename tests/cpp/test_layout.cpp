// Exhaustive checks of csrc/layout.h on small sizes against a brute-force mask.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "layout.h"

using unigist::layout::GistLayout;
namespace L = unigist::layout;

namespace {

bool brute_visible(int64_t q, int64_t k, const GistLayout& l) {
  const bool gist = (k + 1) % (l.ratio + 1) == 0;
  return k <= q && (k < l.num_sink || gist || q - k < l.window);
}

struct L32 {  // the fields of the CUDA kernels' Layout32
  int ratio, window, num_sink;
};

std::vector<GistLayout> layouts() {
  std::vector<GistLayout> out;
  for (int64_t r : {1, 2, 3, 4, 8})
    for (int64_t w : {1, 2, 5, 16})
      for (int64_t s : {0, 1, 4, 9}) out.push_back({r, w, s});
  return out;
}

}  // namespace

TEST(Layout, GistPositionsAndCounts) {
  for (const auto& l : layouts()) {
    int64_t count = 0;
    for (int64_t p = 0; p < 100; ++p) {
      EXPECT_EQ(L::gists_before(p, l), count);
      if (L::is_gist(p, l)) {
        EXPECT_EQ(L::gist_position(count, l), p);
        ++count;
      }
    }
    for (int64_t raw = 0; raw < 50; ++raw) {
      const int64_t n = L::interleaved_length(raw, l);
      EXPECT_EQ(n - L::gists_before(n, l), raw);
    }
  }
}

TEST(Layout, VisibleMatchesBruteForce) {
  for (const auto& l : layouts())
    for (int64_t q = 0; q < 40; ++q)
      for (int64_t k = 0; k < 40; ++k) EXPECT_EQ(L::visible(q, k, l), brute_visible(q, k, l));
}

TEST(Layout, TileVisitPartitionsEveryTile) {
  const int64_t n = 37;
  for (const auto& l : layouts()) {
    for (int64_t q_lo = 0; q_lo < n; ++q_lo) {
      for (int64_t q_hi = q_lo; q_hi < std::min(n, q_lo + 12); ++q_hi) {
        for (int64_t nk : {q_hi + 1, n}) {
          const L::TileVisit t = L::tile_visit(q_lo, q_hi, nk, l);
          std::vector<int> part(nk, 0);  // 1 dense, 2 gist
          for (int64_t k = 0; k < t.sink_end; ++k) part[k] = 1;
          for (int64_t k = t.local_lo; k < t.local_hi; ++k) {
            ASSERT_EQ(part[k], 0);
            part[k] = 1;
          }
          for (int64_t g = t.gist_begin; g < t.gist_end; ++g) {
            const int64_t k = L::gist_position(g, l);
            ASSERT_LT(k, nk);
            ASSERT_EQ(part[k], 0) << "gist part overlaps the dense part";
            part[k] = 2;
          }
          for (int64_t q = q_lo; q <= q_hi; ++q) {
            for (int64_t k = 0; k < nk; ++k) {
              const bool vis = brute_visible(q, k, l);
              if (part[k] == 2) {
                EXPECT_TRUE(vis) << "gist part must need no mask";
              }
              if (vis) {
                EXPECT_NE(part[k], 0) << "visible key left out";
              }
              // the backward's per-element partition agrees with the tile's
              EXPECT_EQ(L::in_dense_part(q, k, q_lo, l), vis && part[k] == 1);
            }
          }
        }
      }
    }
  }
}

// tile_visit_from over the tail [t0, stop) of a compressed cache: its ranges
// (sinks from t0, gists, local) hold every visible tail key of the tile exactly
// once, the gist part needs no mask, and t0 = 0 gives tile_visit.
TEST(Layout, TileVisitFromCoversTheTail) {
  const int64_t n = 41;
  for (const auto& l : layouts()) {
    for (int64_t t0 = 0; t0 < n; t0 += 3) {
      for (int64_t q_lo = t0; q_lo < n; ++q_lo) {
        for (int64_t q_hi = q_lo; q_hi < std::min(n, q_lo + 9); ++q_hi) {
          const L::TileVisit t = L::tile_visit_from(q_lo, q_hi, t0, n, l);
          if (t0 == 0) {
            const L::TileVisit u = L::tile_visit(q_lo, q_hi, n, l);
            ASSERT_EQ(t.sink_end, u.sink_end);
            ASSERT_EQ(t.gist_begin, u.gist_begin);
            ASSERT_EQ(t.gist_end, u.gist_end);
            ASSERT_EQ(t.local_lo, u.local_lo);
            ASSERT_EQ(t.local_hi, u.local_hi);
          }
          std::vector<int> part(n, 0);  // 1 dense, 2 gist
          ASSERT_GE(t.sink_end, t0);
          for (int64_t k = t0; k < t.sink_end; ++k) part[k] = 1;
          for (int64_t k = t.local_lo; k < t.local_hi; ++k) {
            ASSERT_GE(k, t0);
            ASSERT_EQ(part[k], 0);
            part[k] = 1;
          }
          for (int64_t g = t.gist_begin; g < t.gist_end; ++g) {
            const int64_t k = L::gist_position(g, l);
            ASSERT_GE(k, t0);
            ASSERT_EQ(part[k], 0);
            part[k] = 2;
          }
          for (int64_t q = q_lo; q <= q_hi; ++q) {
            for (int64_t k = 0; k < n; ++k) {
              const bool vis = brute_visible(q, k, l);
              if (part[k] == 2) {
                EXPECT_TRUE(vis);
              }
              if (k >= t0 && vis) {
                EXPECT_NE(part[k], 0) << "visible tail key left out";
              }
              if (k < t0) {
                EXPECT_EQ(part[k], 0);
              }
            }
          }
        }
      }
    }
  }
}

// is_gist in the 32-bit layout the CUDA kernels use agrees with the 64-bit one.
TEST(Layout, IsGist32) {
  for (const auto& l : layouts()) {
    const L32 l32{int(l.ratio), int(l.window), int(l.num_sink)};
    for (int p = 0; p < 200; ++p) EXPECT_EQ(L::is_gist(p, l32), L::is_gist(int64_t{p}, l));
  }
}

// dkdv_tile_range / dkdv_tile_all_in against the per-element partition: for
// key blocks of both passes (consecutive keys; consecutive gists >= num_sink),
// every tile outside the range holds no pair of the block in that part, and
// every pair of an "all in" full tile is in it.
TEST(Layout, DkdvTileRangeHoldsEveryPair) {
  for (const auto& l : layouts()) {
    for (int64_t tile : {1, 3, 4}) {
      for (int64_t nk : {1, 23, 41}) {
        for (int64_t q_offset : {int64_t{0}, nk / 3, nk - 1}) {
          const int64_t nq = nk - q_offset;
          const int64_t n_tiles = (nq + tile - 1) / tile;
          for (int gist_part = 0; gist_part < 2; ++gist_part) {
            // the pass's keys in order: positions (dense) or gist positions >= num_sink
            std::vector<int64_t> keys;
            for (int64_t k = 0; k < nk; ++k)
              if (!gist_part || (L::is_gist(k, l) && k >= l.num_sink)) keys.push_back(k);
            for (int64_t bn : {1, 2, 5}) {
              for (size_t b0 = 0; b0 < keys.size(); b0 += bn) {
                const size_t b1 = std::min(keys.size(), b0 + bn);
                const L::TileRange r =
                    L::dkdv_tile_range(keys[b0], keys[b1 - 1], gist_part, q_offset, n_tiles, tile, l);
                ASSERT_LE(0, r.begin);
                ASSERT_LE(r.begin, r.end);
                ASSERT_LE(r.end, n_tiles);
                for (int64_t t = 0; t < n_tiles; ++t) {
                  const int64_t q_lo = q_offset + tile * t;
                  const int64_t q_end = std::min(q_offset + nq, q_lo + tile);
                  bool all = true;
                  for (size_t i = b0; i < b1; ++i) {
                    const int64_t k = keys[i];
                    for (int64_t q = q_lo; q < q_end; ++q) {
                      const bool vis = brute_visible(q, k, l);
                      const bool in = gist_part ? vis && !L::in_dense_part(q, k, q_lo, l) : L::in_dense_part(q, k, q_lo, l);
                      if (gist_part) {  // the gist pass's per-element test
                        EXPECT_EQ(in, q_lo >= k + l.window) << "q " << q << " k " << k;
                      }
                      {  // the kernels' interval form of the same test
                        int64_t lo, hi;
                        const int64_t last = L::dkdv_key_last_query<int64_t>(k, l, int64_t{1} << 40);
                        L::dkdv_key_cols<int64_t>(k, last, gist_part, q_lo, q_end - q_lo, l, lo, hi);
                        const int64_t c = q - q_lo;
                        EXPECT_EQ(in, lo <= c && c <= hi) << "q " << q << " k " << k << " q_lo " << q_lo;
                        // 32-bit, as in the kernels (Layout32)
                        const L32 l32{int(l.ratio), int(l.window), int(l.num_sink)};
                        int lo32, hi32;
                        const int last32 = L::dkdv_key_last_query<int>(int(k), l32, 1 << 30);
                        L::dkdv_key_cols<int>(int(k), last32, gist_part, int(q_lo), int(q_end - q_lo), l32, lo32, hi32);
                        EXPECT_EQ(in, lo32 <= c && c <= hi32);
                      }
                      if (in) {
                        EXPECT_TRUE(t >= r.begin && t < r.end)
                            << "pair outside the range: q " << q << " k " << k << " tile " << t;
                      }
                      all = all && in;
                    }
                  }
                  if (q_end == q_lo + tile && L::dkdv_tile_all_in(keys[b0], keys[b1 - 1], gist_part, q_lo, tile, l)) {
                    EXPECT_TRUE(all) << "all_in but a pair is not in the part, tile " << t;
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(Layout, RowNnz) {
  for (const auto& l : layouts())
    for (int64_t nk : {1, 10, 33})
      for (int64_t q = 0; q < nk; ++q) {
        int64_t c = 0;
        for (int64_t k = 0; k < nk; ++k) c += brute_visible(q, k, l);
        EXPECT_EQ(L::row_nnz(q, nk, l), c);
      }
}

TEST(Layout, GistShiftIsAPermutationWithGistsRightAligned) {
  for (const auto& l : layouts()) {
    for (int64_t tile : {1, 3, 8, 16}) {
      for (int64_t n : {0, 1, 7, 16, 45}) {
        std::vector<int> hit(n, 0);
        for (int64_t p = 0; p < n; ++p) {
          const int64_t s = L::shift_position(p, tile, n, l);
          ASSERT_GE(s, 0);
          ASSERT_LT(s, n);
          EXPECT_EQ(s / tile, p / tile) << "stays inside its tile";
          EXPECT_EQ(L::unshift_position(s, tile, n, l), p);
          ++hit[s];
        }
        for (int64_t s = 0; s < n; ++s) EXPECT_EQ(hit[s], 1);
        // inside each tile: all raws, then all gists, each kept in order
        for (int64_t start = 0; start < n; start += tile) {
          const int64_t end = std::min(n, start + tile);
          bool seen_gist = false;
          int64_t last = -1;
          for (int64_t s = start; s < end; ++s) {
            const int64_t p = L::unshift_position(s, tile, n, l);
            const bool g = L::is_gist(p, l);
            EXPECT_FALSE(seen_gist && !g);
            if (g != seen_gist) last = -1;
            EXPECT_GT(p, last);
            last = p;
            seen_gist = seen_gist || g;
          }
        }
      }
    }
  }
}

TEST(Layout, KeepForFutureIsWhatLaterQueriesSee) {
  const int64_t n = 40;
  for (const auto& l : layouts())
    for (int64_t next = 0; next < n; ++next)
      for (int64_t p = 0; p < next; ++p) {
        bool seen = false;
        for (int64_t q = next; q < n + l.window; ++q) seen = seen || brute_visible(q, p, l);
        EXPECT_EQ(L::keep_for_future(p, next, l), seen);
      }
}

// A compressed cache built by evicting, from the interleaved keys 0..seen-1,
// every key no query at position >= evicted_at sees, holds exactly
// [sinks | gists older than the tail | contiguous tail]; key_position of the
// descriptor gives the position of every kept row.
TEST(Layout, KeyPositionDescribesAnEvictedCache) {
  for (const GistLayout& l : layouts()) {
    for (int64_t seen = 1; seen <= 40; ++seen) {
      for (int64_t evicted_at = 0; evicted_at <= seen; ++evicted_at) {
        std::vector<int64_t> kept;
        for (int64_t p = 0; p < seen; ++p)
          if (L::keep_for_future(p, evicted_at, l)) kept.push_back(p);
        // The tail starts after the last hole (or at 0 without one).
        int64_t tail_start = 0;
        for (int64_t p = 0; p < seen; ++p)
          if (!L::keep_for_future(p, evicted_at, l)) tail_start = p + 1;
        const int64_t sinks = std::min(l.num_sink, tail_start);
        const int64_t first_gist = L::gists_before(sinks, l);
        const int64_t gists = std::max<int64_t>(0, L::gists_before(tail_start, l) - first_gist);
        const L::KeyLayout kl{sinks, gists, first_gist, tail_start};
        ASSERT_EQ(static_cast<int64_t>(kept.size()), sinks + gists + (seen - tail_start));
        for (int64_t row = 0; row < static_cast<int64_t>(kept.size()); ++row)
          ASSERT_EQ(L::key_position(row, kl, l), kept[row]) << "seen " << seen << " evicted_at " << evicted_at;
      }
    }
  }
}
