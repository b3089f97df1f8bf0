// Online softmax of one 16-row accumulator fragment, in base 2 on raw scores,
// shared by the mma.sync and wgmma forwards (and the cache forward) so that
// they normalize alike.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/ptx.cuh"

namespace unigist {
namespace cuda_detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A fragment is the mma.sync m16n8 accumulator layout repeated over NT key
// tiles (the wgmma m64 accumulator is the same per warp): s[j][0..1] are row
// r0 = lane / 4, key slots 8j + 2(lane % 4) + {0, 1}; s[j][2..3] row r0 + 8.

// Scores enter the softmax raw (Q K^T) with the factor scale = softmax_scale *
// log2(e) folded into the exponent's FFMA (max taken on the raw scores), which
// saves one FMUL per score. That needs scale > 0 (-inf * 0 is NaN, and a
// negative factor turns the max into a min): otherwise the scores are
// multiplied first (before masking, so masked entries are -inf) and the
// softmax runs with scale 1. Returns the scale to pass on.
template <int NT>
__device__ __forceinline__ float prescale_unless_positive(float (&s)[NT][4], float scale) {
  if (scale > 0.f) return scale;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] *= scale;
  return 1.f;
}

// The max of each of the thread's two rows (s[.][0..1] and s[.][2..3]) over the
// block, reduced across the quad that holds the row.
template <int NT>
__device__ __forceinline__ void block_row_max(const float (&s)[NT][4], float (&mx)[2]) {
  mx[0] = mx[1] = -INFINITY;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
  }
}

// s -> exp2(s * scale - m_use[row]), added to the thread-partial row sums.
template <int NT>
__device__ __forceinline__ void exp2_rows(float (&s)[NT][4], float scale, const float (&m_use)[2], float (&lsum)[2]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    s[j][0] = exp2f(fmaf(s[j][0], scale, -m_use[0]));
    s[j][1] = exp2f(fmaf(s[j][1], scale, -m_use[0]));
    s[j][2] = exp2f(fmaf(s[j][2], scale, -m_use[1]));
    s[j][3] = exp2f(fmaf(s[j][3], scale, -m_use[1]));
    lsum[0] += s[j][0] + s[j][1];
    lsum[1] += s[j][2] + s[j][3];
  }
}

// One online-softmax step in base 2 on raw scores s (scale > 0, see
// prescale_unless_positive): updates the running max m (in scaled units) and the
// thread-partial row sums lsum, turns s into unnormalized probabilities
// exp2(s * scale - m) and returns in alpha the factor the running output must
// be scaled by.
template <int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float scale, float (&m)[2],
                                               float (&lsum)[2], float (&alpha)[2]) {
  float mx[2], m_use[2];
  block_row_max(s, mx);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float m_new = fmaxf(m[hr], mx[hr] * scale);
    // A row with nothing visible so far keeps m = -inf; exp2(-inf - 0) = 0.
    m_use[hr] = m_new == -INFINITY ? 0.f : m_new;
    alpha[hr] = exp2f(m[hr] - m_use[hr]);
    m[hr] = m_new;
    lsum[hr] *= alpha[hr];
  }
  exp2_rows(s, scale, m_use, lsum);
}

// online_softmax with a lazy running max (FlashAttention-4's trick): the max a
// row's probabilities are taken against moves only when the block's max exceeds
// it by more than kLazyMaxSlack (log2 units), so P <= 2^8 and most blocks of a
// long row leave the output unscaled. Exact: the output, the row sum and the
// lse all use the same max. Returns whether any row of the warp needs its
// output scaled (alpha != 1), a warp-uniform answer.
constexpr float kLazyMaxSlack = 8.f;
template <int NT>
__device__ __forceinline__ bool online_softmax_lazy(float (&s)[NT][4], float scale, float (&m)[2],
                                                    float (&lsum)[2], float (&alpha)[2]) {
  float mx[2], m_use[2];
  block_row_max(s, mx);
  bool moved = false;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float cand = mx[hr] * scale;
    // m = -inf (nothing visible yet) always moves; -inf - -inf is NaN, not > slack.
    const bool move = m[hr] == -INFINITY ? cand > -INFINITY : cand - m[hr] > kLazyMaxSlack;
    const float m_new = move ? cand : m[hr];
    m_use[hr] = m_new == -INFINITY ? 0.f : m_new;
    alpha[hr] = move ? exp2f(m[hr] - m_use[hr]) : 1.f;
    m[hr] = m_new;
    lsum[hr] *= alpha[hr];
    moved |= move;
  }
  exp2_rows(s, scale, m_use, lsum);
  return __any_sync(0xffffffffu, moved);
}

// A-operand fragment (m16k16) of keys 16kk..16kk+15 from probabilities s.
template <typename T, int NT>
__device__ __forceinline__ void pack_p(uint32_t (&a)[4], const float (&s)[NT][4], int kk) {
  using TT = TypeTraits<T>;
  a[0] = TT::pack(s[2 * kk][0], s[2 * kk][1]);
  a[1] = TT::pack(s[2 * kk][2], s[2 * kk][3]);
  a[2] = TT::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = TT::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Full row sums (quad reduction), 1 / sum (0 for an empty row) and the
// natural-log lse of a fragment's two rows.
__device__ __forceinline__ void finish_rows(float (&lsum)[2], const float (&m)[2], float (&inv)[2],
                                            float (&lse)[2]) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    lsum[hr] += __shfl_xor_sync(0xffffffffu, lsum[hr], 1);
    lsum[hr] += __shfl_xor_sync(0xffffffffu, lsum[hr], 2);
    inv[hr] = lsum[hr] > 0.f ? 1.f / lsum[hr] : 0.f;
    lse[hr] = lsum[hr] > 0.f ? (m[hr] + log2f(lsum[hr])) * kLn2 : -INFINITY;
  }
}


}  // namespace cuda_detail
}  // namespace unigist
