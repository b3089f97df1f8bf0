// Gist attention forward over a compressed cache on CUDA (gist_attention_cache_fwd):
// keys in layout::KeyLayout's rows [cached sinks | cached gists | contiguous tail],
// queries inside the tail. Every prefill chunk after the first eviction and every
// decode step runs here.
//
// The mma.sync forward of fwd_sm80.cu with four differences:
//   * key blocks: the cached rows [0, cached) come first and need no mask (they
//     are older than every query and sinks or gists, so always visible); then
//     layout::tile_visit_from's ranges over the tail, read at row
//     position - tail_start + cached. The cached gists are already packed, so no
//     gist shift is needed for them; far gists inside the tail are gathered with
//     a row stride of ratio + 1 as in the interleaved kernel.
//   * GQA packing: a CTA's 64 rows are (query, head) pairs of one key head
//     (row = query * group + head in group), so K/V are read once per key head
//     and a decode step of one query fills group rows instead of one. Warps whose
//     rows are all padding skip the math (a one-query decode of group 4 runs one
//     warp of MMAs while all four load).
//   * split-KV (FlashDecoding): when (tiles x batch x key heads) CTAs cannot fill
//     the GPU, blockIdx.z splits a tile's key blocks; each split writes its
//     normalized fp32 output and lse, and cache_combine_kernel merges them.
//   * strides: q, k, v are read in place through their batch / head / row strides
//     (HF's transposed q, a cache's [B, H, capacity, D] buffer narrowed to its
//     length), whenever the head dim is unit-stride and rows are 16-byte aligned.
// On sm_90a a chunk with enough queries to fill the GPU runs the wgmma forward
// (sm90/fwd_sm90.cu) over the same CacheBlocks instead (api.cu chooses).
#include <c10/cuda/CUDAException.h>

#include <climits>
#include <cmath>

#include "cuda/dispatch.cuh"
#include "cuda/epilogue.cuh"
#include "cuda/key_visit.cuh"
#include "cuda/launch.h"
#include "cuda/params.cuh"
#include "cuda/ptx.cuh"
#include "cuda/softmax.cuh"

namespace unigist {
namespace cuda_detail {

constexpr int kCacheThreads = 128;

template <int D>
constexpr int cache_smem_bytes() {
  return (kCacheBM * D + 4 * kCacheBN * D) * 2;  // Q + 2 stages of K and V
}


// gist_attention_cache_step: the layout in device memory, (q_offset, cache_sinks,
// cache_gists, first_gist, tail_start, num_keys), written by the host before a CUDA
// graph replays the step. The host checked it when it wrote it; here values that would
// read outside the key buffer (p.capacity rows) or overflow int mean no keys at all.
__device__ __forceinline__ void read_cache_layout(const CacheParams& p, int& q_offset, int& cached, int& tail_start,
                                                  int& tail_end) {
  const int64_t q0 = p.layout[0], sinks = p.layout[1], gists = p.layout[2], t0 = p.layout[4], nk = p.layout[5];
  const int64_t c = sinks + gists;
  const int64_t limit = INT_MAX / 2;
  const bool ok = q0 >= 0 && q0 < limit && sinks >= 0 && gists >= 0 && c <= nk && nk <= p.capacity && t0 >= 0 &&
                  t0 < limit && t0 + (nk - c) < limit;
  q_offset = ok ? static_cast<int>(q0) : 0;
  cached = ok ? static_cast<int>(c) : 0;
  tail_start = ok ? static_cast<int>(t0) : 0;
  tail_end = ok ? static_cast<int>(t0 + nk - c) : 0;
}

template <typename T, int D>
__global__ void __launch_bounds__(kCacheThreads) gist_attn_cache_fwd_kernel(const CacheParams p) {
  using TT = TypeTraits<T>;
  constexpr int BM = kCacheBM, BN = kCacheBN;
  constexpr int NT = BN / 8;  // n-tiles of keys in S
  constexpr int DT = D / 8;   // n-tiles of head dim in O
  constexpr int KS = D / 16;  // k-steps over head dim
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + 2 * BN * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = p.group;
  // Later tiles see more keys: they take the lower block indices, so start first.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int b = blockIdx.y / p.Hkv, kvh = blockIdx.y % p.Hkv;
  const int rows_here = min(BM, p.rows - m0);
  int q_offset = p.q_offset, cached = p.cached, tail_start = p.tail_start, tail_end = p.tail_end;
  if (p.layout != nullptr) read_cache_layout(p, q_offset, cached, tail_start, tail_end);
  const int row_shift = cached - tail_start;
  const int q_lo = q_offset + m0 / G, q_hi = q_offset + (m0 + rows_here - 1) / G;
  const Layout32 l = p.l;
  CacheBlocks kb;
  kb.init(cached, tail_start, tail_end, l, q_lo, q_hi, BN);
  const int nall = kb.total();
  const int it_begin = static_cast<int>(static_cast<int64_t>(nall) * blockIdx.z / p.splits);
  const int it_end = static_cast<int>(static_cast<int64_t>(nall) * (blockIdx.z + 1) / p.splits);

  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  load_rows<BM, D, kCacheThreads>(
      sQ,
      [&](int r) -> const T* {
        if (r >= rows_here) return nullptr;
        const int pr = m0 + r;
        return qb + (kvh * G + pr % G) * p.q_sh + (pr / G) * p.q_sn;
      },
      qb);
  cp_async_commit();

  auto load_kv = [&](int it, int stage) {
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    load_rows<BN, D, kCacheThreads>(
        sK + stage * BN * D,
        [&](int r) -> const T* {
          const int j = cache_key_row(l, row_shift, kind, first, end, r);
          return j >= 0 ? kg + j * p.k_sn : nullptr;
        },
        kg);
    load_rows<BN, D, kCacheThreads>(
        sV + stage * BN * D,
        [&](int r) -> const T* {
          const int j = cache_key_row(l, row_shift, kind, first, end, r);
          return j >= 0 ? vg + j * p.v_sn : nullptr;
        },
        vg);
  };
  if (it_begin < it_end) load_kv(it_begin, 0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  const int wrow = warp * 16;
  // Padding rows of a small tile (decode): the warp computes nothing.
  const bool active = wrow < rows_here;
  uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int r = wrow + (lane & 15), c = ks * 2 + (lane >> 4);
    ldmatrix_x4(qf[ks], smem_u32(sQ + swz<D>(r, c)));
  }
  const int row0 = wrow + (lane >> 2);  // the thread's rows: row0, row0 + 8
  int qpos[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) qpos[hr] = q_offset + (m0 + row0 + 8 * hr) / G;

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};

  for (int it = it_begin; it < it_end; ++it) {
    const int stage = (it - it_begin) & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < it_end) load_kv(it + 1, stage ^ 1);
    cp_async_commit();
    if (!active) continue;
    const T* cK = sK + stage * BN * D;
    const T* cV = sV + stage * BN * D;

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        uint32_t bf[4];
        const int key = jj * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int c = ks * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(bf, smem_u32(cK + swz<D>(key, c)));
        TT::mma(s[2 * jj], qf[ks], bf[0], bf[1]);
        TT::mma(s[2 * jj + 1], qf[ks], bf[2], bf[3]);
      }
    }
    const float scale = prescale_unless_positive(s, p.scale_log2);

    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    const int mkind = kind == 3 ? 1 : kind;  // CacheBlocks::mask_kind
    if (block_needs_mask(l, mkind, first, end, BN, q_lo, q_hi)) mask_fragment(s, l, mkind, first, end, qpos, lane);

    float alpha[2];
    online_softmax(s, scale, m_r, l_r, alpha);
    scale_rows(o, alpha);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pf[4];
      pack_p<T>(pf, s, kk);
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        uint32_t bf[4];
        const int key = kk * 16 + (lane & 15);
        const int c = dd * 2 + (lane >> 4);
        ldmatrix_x4_trans(bf, smem_u32(cV + swz<D>(key, c)));
        TT::mma(o[2 * dd], pf, bf[0], bf[1]);
        TT::mma(o[2 * dd + 1], pf, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();
  if (!active) return;

  float inv[2], lse[2];
  finish_rows(l_r, m_r, inv, lse);
  const int col = 2 * (lane & 3);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row0 + 8 * hr;
    if (r >= rows_here) continue;
    const int pr = m0 + r;
    const int64_t orow = (static_cast<int64_t>(b) * p.Hq + kvh * G + pr % G) * p.Nq + pr / G;
    if (p.splits == 1) {
      T* og = static_cast<T*>(p.o) + orow * D + col;
#pragma unroll
      for (int i = 0; i < DT; ++i)
        *reinterpret_cast<uint32_t*>(og + i * 8) = TT::pack(o[i][2 * hr] * inv[hr], o[i][2 * hr + 1] * inv[hr]);
      if ((lane & 3) == 0) p.lse[orow] = lse[hr];
    } else {
      const int64_t prow = static_cast<int64_t>(blockIdx.z) * p.B * p.Hq * p.Nq + orow;
      float* og = p.o_part + prow * D + col;
#pragma unroll
      for (int i = 0; i < DT; ++i)
        *reinterpret_cast<float2*>(og + i * 8) = make_float2(o[i][2 * hr] * inv[hr], o[i][2 * hr + 1] * inv[hr]);
      if ((lane & 3) == 0) p.lse_part[prow] = lse[hr];
    }
  }
}

// Merges the splits of each output row: one warp per row, D / 32 columns per lane.
// A split that saw no key of the row has lse -inf and weight 0.
template <typename T, int D>
__global__ void __launch_bounds__(128) cache_combine_kernel(const float* __restrict__ o_part,
                                                            const float* __restrict__ lse_part, T* __restrict__ out,
                                                            float* __restrict__ lse, int64_t nrows, int splits) {
  constexpr int E = D / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= nrows) return;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, lse_part[s * nrows + row]);
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
  float sum = 0.f;
  if (m > -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float w = __expf(lse_part[s * nrows + row] - m);
      sum += w;
      const float* src = o_part + (s * nrows + row) * D + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = fmaf(w, src[e], acc[e]);
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* dst = out + row * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; e += 2)
    *reinterpret_cast<uint32_t*>(dst + e) = TypeTraits<T>::pack(acc[e] * inv, acc[e + 1] * inv);
  if (lane == 0) lse[row] = sum > 0.f ? m + __logf(sum) : -INFINITY;
}

template <typename T, int D>
void launch_cache_fwd_t(const CacheParams& p, int tiles, cudaStream_t stream) {
  constexpr int smem = cache_smem_bytes<D>();
  auto kernel = gist_attn_cache_fwd_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.B * p.Hkv), static_cast<unsigned>(p.splits));
  kernel<<<grid, kCacheThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    const int64_t nrows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
    cache_combine_kernel<T, D><<<static_cast<unsigned>((nrows + 3) / 4), 128, 0, stream>>>(
        p.o_part, p.lse_part, static_cast<T*>(p.o), p.lse, nrows, p.splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void launch_cache_fwd(const CacheParams& p, bool bf16, int head_dim, int tiles, cudaStream_t stream) {
  UNIGIST_DISPATCH(bf16, head_dim, [&] { launch_cache_fwd_t<T, kHeadDim>(p, tiles, stream); });
}

}  // namespace cuda_detail
}  // namespace unigist
