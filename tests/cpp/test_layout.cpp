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
