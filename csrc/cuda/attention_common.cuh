// Shared device helpers of the gist attention kernels: tensor-core MMA
// (mma.sync.m16n8k16, fp32 accumulate), ldmatrix, cp.async and the swizzled
// shared-memory tile layout. Portable sm_80+ (no wgmma, no TMA).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "layout.h"

namespace unigist {
namespace cuda_detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element type traits --------------------------------------------------
template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct TypeTraits<__half> {
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---- shared memory: rows of D elements, 16-byte chunks XOR-swizzled -------
// Element offset of chunk `c` (8 elements) of row `r`. ldmatrix reads 8 rows
// at one logical chunk; the XOR with (r & 7) spreads them over all banks.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte async copy global -> shared; zero-fills when !pred (src not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(n));
}

// 4-byte async copy; zero-fills when !pred.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
  const int n = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Loads ROWS rows of D elements into swizzled smem. row_ptr(r) returns the
// global address of row r, or nullptr for a row to zero-fill. `any` is a
// valid global address used for zero-filled rows.
template <int ROWS, int D, int NTHREADS, typename T, typename RowPtr>
__device__ __forceinline__ void load_rows(T* smem, const RowPtr& row_ptr, const T* any) {
  constexpr int CPR = D / 8;
  constexpr int TOTAL = ROWS * CPR;
  static_assert(TOTAL % NTHREADS == 0, "tile must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < TOTAL / NTHREADS; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * NTHREADS;
    const int r = idx / CPR, c = idx % CPR;
    const T* src = row_ptr(r);
    cp_async16(smem + swz<D>(r, c), src != nullptr ? src + c * 8 : any, src != nullptr);
  }
}

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

// ---- forward: mask and online softmax of one 16-row fragment -------------
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

// Sets the invisible entries to -inf; qp0 = query position of row r0.
template <int NT>
__device__ __forceinline__ void mask_fragment(float (&s)[NT][4], const Layout32& l, int kind, int first,
                                              int end, int qp0, int lane) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int kp = key_position(l, kind, first, end, j * 8 + 2 * (lane & 3) + c);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const bool ok = kp >= 0 && (kind == 1 || l.visible(qp0 + hr * 8, kp));
        if (!ok) s[j][2 * hr + c] = -INFINITY;
      }
    }
  }
}

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

// Parameters shared by the forward and backward kernels. Tensors are
// contiguous: q/out/dout [B, Hq, Nq, D], k/v [B, Hkv, Nk, D].
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  void* o;          // forward output
  float* lse;       // [B, Hq, Nq]
  const float* delta;  // backward: rowsum(dout * out) [B, Hq, Nq]
  void* dq;         // backward
  void* dk;         // backward, group 1: dK, dV [B, Hkv, Nk, D]
  void* dv;
  float* dk_acc;    // backward, group > 1: per q-head fp32 [B, Hq, Nk, D]
  float* dv_acc;
  float* dk_gist;   // backward: gist pass partials [B, Hq, n_gist_rows, D]
  float* dv_gist;
  int n_gist_rows;  // gists at or past num_sink
  int B, Hq, Hkv, group, Nq, Nk;
  int q_offset;
  int head_fast;  // grid order: 1 = heads along x (used), 0 = tiles along x
  Layout32 l;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
  // Keys in the compressed-cache layout (the wgmma path of
  // gist_attention_cache_fwd, CacheBlocks): cached rows, first tail position,
  // one past the last. Unused (0) in the interleaved layout.
  int cached, tail_start, tail_end;
};

// The keys of a dK/dV CTA (block blk of bn keys): slot s holds index first + s
// (a key position in the dense pass, a gist index past the sinks in the gist
// pass) while first + s < end; pos(s) is that key's position, -1 past the end.
struct DkdvKeys {
  int first, end;
  int gist_pass;
  Layout32 l;
  __device__ __forceinline__ DkdvKeys(const AttnParams& p, int gist_pass_, int blk, int bn)
      : gist_pass(gist_pass_), l(p.l) {
    if (gist_pass) {
      first = l.gists_before(min(l.num_sink, p.Nk)) + blk * bn;
      end = l.gists_before(p.Nk);
    } else {
      first = blk * bn;
      end = p.Nk;
    }
  }
  __device__ __forceinline__ int pos(int s) const {
    const int x = first + s;
    if (x >= end) return -1;
    return gist_pass ? l.gist_position(x) : x;
  }
};

// Epilogue of the dK/dV kernels (mma.sync and wgmma): a thread's key rows
// kp_row[0..1] (-1: none), from fragments in the m16n8 accumulator layout (row
// lane / 4 in [.][0..1], + 8 in [.][2..3]); dK is scaled by softmax_scale.
// The gist pass runs first and writes the fp32 partial of each gist row past
// the sinks, per query head, packed by gist index (1/(ratio+1) of the keys'
// memory). The dense pass adds it and writes the final rows: in the input
// dtype when a key head has one query head (no group sum, no fp32 copy of dK
// and dV), else fp32 per query head for reduce_group_kernel.
template <typename T, int DT>
__device__ __forceinline__ void store_dkdv_rows(const AttnParams& p, int bh, const int (&kp_row)[2],
                                                const float (&dk)[DT][4], const float (&dv)[DT][4], int lane,
                                                bool gist_pass) {
  using TT = TypeTraits<T>;
  constexpr int D = DT * 8;
  const int col = 2 * (lane & 3);
  const int g0 = p.l.gists_before(min(p.l.num_sink, p.Nk));
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int kp = kp_row[hr];
    if (kp < 0) continue;
    const bool gist_row = kp >= p.l.num_sink && p.l.is_gist(kp);
    const int64_t gist_off =
        gist_row ? (static_cast<int64_t>(bh) * p.n_gist_rows + (p.l.gists_before(kp) - g0)) * D + col : 0;
    const int64_t row_off = (static_cast<int64_t>(bh) * p.Nk + kp) * D + col;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      float2 k2 = make_float2(dk[i][2 * hr] * p.scale, dk[i][2 * hr + 1] * p.scale);
      float2 v2 = make_float2(dv[i][2 * hr], dv[i][2 * hr + 1]);
      float2* gk = reinterpret_cast<float2*>(p.dk_gist + gist_off + i * 8);
      float2* gv = reinterpret_cast<float2*>(p.dv_gist + gist_off + i * 8);
      if (gist_pass) {
        *gk = k2;
        *gv = v2;
        continue;
      }
      if (gist_row) {
        const float2 k0 = *gk, v0 = *gv;
        k2.x += k0.x;
        k2.y += k0.y;
        v2.x += v0.x;
        v2.y += v0.y;
      }
      if (p.group == 1) {
        reinterpret_cast<uint32_t*>(static_cast<T*>(p.dk) + row_off + i * 8)[0] = TT::pack(k2.x, k2.y);
        reinterpret_cast<uint32_t*>(static_cast<T*>(p.dv) + row_off + i * 8)[0] = TT::pack(v2.x, v2.y);
      } else {
        *reinterpret_cast<float2*>(p.dk_acc + row_off + i * 8) = k2;
        *reinterpret_cast<float2*>(p.dv_acc + row_off + i * 8) = v2;
      }
    }
  }
}

// Launch grid for `blocks` CTAs per (batch, head); blockIdx -> (block, bh).
inline dim3 grid_of(const AttnParams& p, int64_t blocks) {
  return p.head_fast ? dim3(p.B * p.Hq, static_cast<unsigned>(blocks))
                     : dim3(static_cast<unsigned>(blocks), p.B * p.Hq);
}
__device__ __forceinline__ void block_coords(const AttnParams& p, int& blk, int& bh, int& nblk) {
  if (p.head_fast) {
    bh = blockIdx.x;
    blk = blockIdx.y;
    nblk = gridDim.y;
  } else {
    bh = blockIdx.y;
    blk = blockIdx.x;
    nblk = gridDim.x;
  }
}

// The query tile of a forward / dQ CTA: its (batch, head), its bm query rows
// from m0 (later tiles carry more work: they get the lower block indices, so
// they start first) and its key blocks of bn keys.
struct QueryTile {
  int bh, b, h, m0, q_lo, q_hi, rows_here, nblocks;
  int64_t row0;    // first query row of the tile in q / out / dout / lse: bh * Nq + m0
  int64_t kv_row0; // first row of the tile's key head in k / v
  KeyBlocks kb;
  __device__ __forceinline__ QueryTile(const AttnParams& p, int bm, int bn) {
    int blk, nblk;
    block_coords(p, blk, bh, nblk);
    b = bh / p.Hq;
    h = bh % p.Hq;
    m0 = (nblk - 1 - blk) * bm;
    q_lo = p.q_offset + m0;
    rows_here = min(bm, p.Nq - m0);
    q_hi = q_lo + rows_here - 1;
    row0 = static_cast<int64_t>(bh) * p.Nq + m0;
    kv_row0 = (static_cast<int64_t>(b) * p.Hkv + h / p.group) * p.Nk;
    kb.init(layout::tile_visit(q_lo, q_hi, p.Nk, p.l.as64()), bn);
    nblocks = kb.total();
  }
  // lse * log2(e) and delta of tile row r (0 past the tile; a row that sees no
  // key has lse -inf: 0 keeps exp2 finite, its P is masked anyway).
  __device__ __forceinline__ void row_stats(const AttnParams& p, int r, float& lse2, float& dlt) const {
    const bool valid = r < rows_here;
    lse2 = valid ? p.lse[row0 + r] * kLog2e : 0.f;
    dlt = valid ? p.delta[row0 + r] : 0.f;
    if (!(lse2 > -INFINITY)) lse2 = 0.f;
  }
};

}  // namespace cuda_detail
}  // namespace unigist

// ---- host-side helpers shared by the entry points -------------------------
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include "checks.h"

#include <climits>
#include <cstdint>

namespace unigist {
namespace cuda_detail {

// CUDA-specific checks on top of checks.h's check_attention_inputs.
inline void check_cuda_tensor(const char* where, const char* name, const at::Tensor& t,
                              const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), where, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), where, ": ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

inline void check_cuda_qkv(const char* where, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v) {
  check_cuda_tensor(where, "q", q, q);
  check_cuda_tensor(where, "k", k, q);
  check_cuda_tensor(where, "v", v, q);
  TORCH_CHECK(cuda_kernels_take(q.scalar_type(), q.size(3)), where,
              ": CUDA kernels take bfloat16 or float16 with head_dim 64 or 128, got ", q.scalar_type(),
              " with head_dim ", q.size(3));
  TORCH_CHECK(k.size(2) <= (int64_t{1} << 30), where, ": at most 2^30 keys, got ", k.size(2));
  TORCH_CHECK(q.size(0) * q.size(1) <= INT_MAX, where, ": batch * heads too large");
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, where,
              ": batch * query heads must be at most 65535 (launch grid), got ",
              q.size(0) * q.size(1));
}

// Contiguous and 16-byte aligned (cp.async moves 16-byte chunks): a
// contiguous view whose storage offset is not a multiple of 8 elements is
// copied.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The wgmma forward (attention_fwd_sm90.cu). use_sm90_fwd: the device is
// compute capability 9.0, this build holds the sm_90a kernel (TORCH_CUDA_ARCH_LIST
// had 9.0a) and UNIGIST_FORCE_SM80 is not "1".
bool use_sm90_fwd(int device);
void launch_fwd_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);
// The same kernel over a compressed cache (p.cached, p.tail_start, p.tail_end;
// contiguous q/k/v): gist_attention_cache_fwd's path for tiles that fill the GPU.
void launch_cache_fwd_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);
// The wgmma dQ kernel of the backward (attention_bwd_dq_sm90.cu), taken on the
// same condition as the wgmma forward.
void launch_bwd_dq_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);
// The wgmma dK/dV kernels (attention_bwd_dkdv_sm90.cu): both passes (gist, then
// dense), in place of gist_attn_bwd_dkdv_kernel; same condition.
void launch_bwd_dkdv_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);

// Layout values clamped so that 32-bit arithmetic is exact and the visible
// set over keys [0, nk) is unchanged.
inline Layout32 clamp_layout(int64_t ratio, int64_t window, int64_t num_sink, int64_t nk) {
  // ratio > nk: no position below nk is a gist either way; window >= nk: every
  // causal pair is inside it either way; num_sink >= nk: every key is a sink.
  const int64_t cap = nk > 1 ? nk : 1;
  Layout32 l;
  l.ratio = static_cast<int>(ratio < cap + 1 ? ratio : cap + 1);
  l.window = static_cast<int>(window < cap ? window : cap);
  l.num_sink = static_cast<int>(num_sink < cap ? num_sink : cap);
  return l;
}

}  // namespace cuda_detail
}  // namespace unigist
