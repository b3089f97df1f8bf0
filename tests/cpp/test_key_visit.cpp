// The CUDA kernels' element masks (csrc/cuda/key_visit.cuh), compiled for the host:
// fragment_visibility, which carries the gist test from key slot to key slot, must
// agree with layout::visible on every element of a fragment, for every block kind a
// query tile visits (sinks, gists, local keys) and for rows at any query positions.
#include <algorithm>
#include <cmath>
#include <random>

#include <gtest/gtest.h>

// key_visit.cuh is device code: on the host its qualifiers are plain inline functions
// (its unroll pragmas are nvcc's: CMakeLists.txt builds this file with -Wno-unknown-pragmas).
#define __device__
#define __forceinline__ inline
using std::max;
using std::min;
#include "cuda/key_visit.cuh"

namespace {

using unigist::cuda_detail::fragment_visibility;
using unigist::cuda_detail::KeyBlocks;
using unigist::cuda_detail::Layout32;

constexpr int kNT = 16;  // 128-key blocks, as the wgmma forward's

TEST(KeyVisit, FragmentVisibilityMatchesLayoutVisible) {
  std::mt19937 rng(1234);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int checked = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const Layout32 l{uni(1, 9), uni(1, 700), uni(0, 300)};
    const int bm = uni(0, 1) ? 64 : 128;
    const int nk = uni(1, 3000);
    const int q_lo = uni(0, nk - 1);
    const int q_hi = std::min(nk - 1, q_lo + bm - 1);
    KeyBlocks kb;
    kb.init(unigist::layout::tile_visit(q_lo, q_hi, nk, l.as64()), 8 * kNT);
    for (int it = 0; it < kb.total(); ++it) {
      int kind, first, end;
      kb.block(it, 8 * kNT, kind, first, end);
      for (int lane = 0; lane < 32; ++lane) {
        // rows of the tile (as the forward's fragment) and, for the cache forward's
        // packed rows, any two positions
        const int r0 = uni(0, q_hi - q_lo);
        const int qpos[2] = {q_lo + r0, uni(0, 1) ? std::min(q_hi, q_lo + r0 + 8) : uni(q_lo, q_hi)};
        int calls = 0;
        fragment_visibility<kNT>(l, kind, first, end, qpos, lane, [&](int j, int e, bool ok) {
          ++calls;
          const int slot = 8 * j + 2 * (lane & 3) + (e & 1);
          const int x = first + slot;
          bool want = x < end;
          if (want && kind != 1) want = unigist::layout::visible(qpos[e >> 1], x, l.as64());
          ASSERT_EQ(ok, want) << "kind " << kind << " first " << first << " end " << end << " slot " << slot
                              << " q " << qpos[e >> 1] << " ratio " << l.ratio << " window " << l.window
                              << " sinks " << l.num_sink;
        });
        ASSERT_EQ(calls, 4 * kNT);
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 10000);
}

}  // namespace
