// Gist attention forward over a compressed cache on CUDA (gist_attention_cache_fwd):
// keys in layout::KeyLayout's rows [cached sinks | cached gists | contiguous tail],
// queries inside the tail. Every prefill chunk after the first eviction and every
// decode step runs here.
//
// The mma.sync forward of attention_fwd.cu with four differences:
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
// (attention_fwd_sm90.cu) over the same CacheBlocks instead.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <tuple>

#include "attention_common.cuh"
#include "checks.h"
#include "layout.h"
#include "ops.h"

namespace unigist {
namespace cuda_detail {

constexpr int kCacheBM = 64;  // packed (query, head) rows per CTA: 4 warps x 16
constexpr int kCacheBN = 64;  // keys per block
constexpr int kCacheThreads = 128;
constexpr int kCacheMaxSplits = 64;

template <int D>
constexpr int cache_smem_bytes() {
  return (kCacheBM * D + 4 * kCacheBN * D) * 2;  // Q + 2 stages of K and V
}

struct CacheParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;          // [B, Hq, Nq, D], contiguous
  float* lse;       // [B, Hq, Nq]
  float* o_part;    // splits > 1: [splits, B * Hq * Nq, D], each split normalized by its own sum
  float* lse_part;  // splits > 1: [splits, B * Hq * Nq]
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;  // element strides
  int B, Hq, Hkv, group, Nq;
  int rows;        // Nq * group: packed rows per (batch, key head)
  int q_offset;
  int cached;      // rows [0, cached): the cache's sinks and gists
  int row_shift;   // row of tail position x: x + row_shift (cached - tail_start)
  int tail_start;  // position of the first tail row
  int tail_end;    // one past the last tail position
  int splits;
  Layout32 l;
  float scale_log2;
};

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
  const int q_lo = p.q_offset + m0 / G, q_hi = p.q_offset + (m0 + rows_here - 1) / G;
  const Layout32 l = p.l;
  CacheBlocks kb;
  kb.init(p.cached, p.tail_start, p.tail_end, l, q_lo, q_hi, BN);
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
          const int j = cache_key_row(l, p.row_shift, kind, first, end, r);
          return j >= 0 ? kg + j * p.k_sn : nullptr;
        },
        kg);
    load_rows<BN, D, kCacheThreads>(
        sV + stage * BN * D,
        [&](int r) -> const T* {
          const int j = cache_key_row(l, p.row_shift, kind, first, end, r);
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
  for (int hr = 0; hr < 2; ++hr) qpos[hr] = p.q_offset + (m0 + row0 + 8 * hr) / G;

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
    if (block_needs_mask(l, mkind, first, end, BN, q_lo, q_hi)) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int kp = key_position(l, mkind, first, end, j * 8 + 2 * (lane & 3) + c);
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const bool ok = kp >= 0 && (mkind == 1 || l.visible(qpos[hr], kp));
            if (!ok) s[j][2 * hr + c] = -INFINITY;
          }
        }
      }
    }

    float alpha[2];
    online_softmax(s, scale, m_r, l_r, alpha);
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
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
void launch_cache_fwd(const CacheParams& p, int tiles, cudaStream_t stream) {
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

// Element strides of t's first three dims (0 for a dim of size 1, whose stride is
// never stepped), or false when the kernel cannot read t in place: the head dim
// must be unit-stride, every row 16-byte aligned (cp.async moves 16 bytes).
bool in_place_strides(const at::Tensor& t, int64_t& sb, int64_t& sh, int64_t& sn) {
  int64_t st[3];
  for (int d = 0; d < 3; ++d) {
    st[d] = t.size(d) == 1 ? 0 : t.stride(d);
    if (st[d] < 0 || st[d] % 8 != 0) return false;
  }
  if (t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  sb = st[0];
  sh = st[1];
  sn = st[2];
  return true;
}

// t itself when the kernel reads it in place, else an aligned contiguous copy.
at::Tensor readable(const at::Tensor& t, int64_t& sb, int64_t& sh, int64_t& sn) {
  if (in_place_strides(t, sb, sh, sn)) return t;
  at::Tensor c = aligned_contiguous(t);
  TORCH_INTERNAL_ASSERT(in_place_strides(c, sb, sh, sn));
  return c;
}

// Splits of the key blocks: only when the (tile, batch, key head) CTAs fill less
// than two waves (two CTAs per SM), and at least 4 blocks (256 keys) per split.
// UNIGIST_CACHE_SPLITS=n forces n (benchmarks).
int cache_splits(int64_t ctas, int64_t nblocks, int num_sms) {
  if (const char* env = std::getenv("UNIGIST_CACHE_SPLITS")) {
    const int forced = std::atoi(env);
    if (forced >= 1) return static_cast<int>(std::min<int64_t>({forced, kCacheMaxSplits, std::max<int64_t>(nblocks, 1)}));
  }
  const int64_t want = 2 * static_cast<int64_t>(num_sms);
  if (ctas >= want) return 1;
  const int64_t s = std::min<int64_t>({(want + ctas - 1) / ctas, nblocks / 4, kCacheMaxSplits});
  return static_cast<int>(std::max<int64_t>(s, 1));
}

}  // namespace cuda_detail

std::tuple<at::Tensor, at::Tensor> gist_attention_cache_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ratio, int64_t window, int64_t num_sink,
    double softmax_scale, int64_t q_offset, int64_t cache_sinks, int64_t cache_gists, int64_t first_gist,
    int64_t tail_start) {
  using namespace cuda_detail;
  const char* where = "unigist::gist_attention_cache_fwd";
  check_attention_tensors(where, q, k, v, ratio, window, num_sink);
  check_key_layout(where, q, k, ratio, num_sink, q_offset, cache_sinks, cache_gists, first_gist, tail_start);
  check_cuda_qkv(where, q, k, v);
  check_softmax_scale(where, softmax_scale);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  const int64_t cached = cache_sinks + cache_gists;
  const int64_t tail_end = tail_start + (Nk - cached);
  TORCH_CHECK(tail_end <= INT_MAX, where, ": key positions must stay below 2^31, the tail ends at ", tail_end);
  TORCH_CHECK(Nq * (Hq / Hkv) <= INT_MAX, where, ": queries * group too large");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};
  const Layout32 l = clamp_layout(ratio, window, num_sink, tail_end);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;

  // A prefill chunk whose tiles of 128 queries (one head each) fill every SM: the
  // wgmma forward over CacheBlocks (it reads contiguous q/k/v; the copies cost
  // ~1% of such a call). Fewer queries (decoding): the mma.sync kernel below,
  // with GQA packing and split-KV.
  constexpr int64_t kSm90Rows = 128;
  if (B * Hq * ((Nq + kSm90Rows - 1) / kSm90Rows) >= num_sms && use_sm90_fwd(q.get_device())) {
    const at::Tensor qc = aligned_contiguous(q), kc = aligned_contiguous(k), vc = aligned_contiguous(v);
    AttnParams a{};
    a.q = qc.data_ptr();
    a.k = kc.data_ptr();
    a.v = vc.data_ptr();
    a.o = out.data_ptr();
    a.lse = lse.data_ptr<float>();
    a.B = static_cast<int>(B);
    a.Hq = static_cast<int>(Hq);
    a.Hkv = static_cast<int>(Hkv);
    a.group = a.Hq / a.Hkv;
    a.Nq = static_cast<int>(Nq);
    a.Nk = static_cast<int>(Nk);
    a.q_offset = static_cast<int>(q_offset);
    a.head_fast = 0;  // as the interleaved wgmma forward (L2 reuse of a head's keys)
    a.l = l;
    a.scale = static_cast<float>(softmax_scale);
    a.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
    a.cached = static_cast<int>(cached);
    a.tail_start = static_cast<int>(tail_start);
    a.tail_end = static_cast<int>(tail_end);
    launch_cache_fwd_sm90(a, bf16, static_cast<int>(D), stream);
    return {out, lse};
  }

  CacheParams p{};
  const at::Tensor qr = readable(q, p.q_sb, p.q_sh, p.q_sn);
  const at::Tensor kr = readable(k, p.k_sb, p.k_sh, p.k_sn);
  const at::Tensor vr = readable(v, p.v_sb, p.v_sh, p.v_sn);
  p.q = qr.data_ptr();
  p.k = kr.data_ptr();
  p.v = vr.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.Nq = static_cast<int>(Nq);
  p.rows = static_cast<int>(Nq * p.group);
  p.q_offset = static_cast<int>(q_offset);
  p.cached = static_cast<int>(cached);
  p.tail_start = static_cast<int>(tail_start);
  p.tail_end = static_cast<int>(tail_end);
  p.l = l;
  p.row_shift = p.cached - p.tail_start;
  p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;

  const int64_t tiles = (static_cast<int64_t>(p.rows) + kCacheBM - 1) / kCacheBM;
  TORCH_CHECK(tiles <= INT_MAX, where, ": too many queries");
  // Key blocks of the last query (the most any tile visits, up to the tile's window span).
  const layout::TileVisit tv =
      layout::tile_visit_from(q_offset + Nq - 1, q_offset + Nq - 1, tail_start, tail_end,
                              layout::GistLayout{p.l.ratio, p.l.window, p.l.num_sink});
  const int64_t bn = kCacheBN;
  const int64_t nblocks = (cached + bn - 1) / bn + (tv.sink_end - tail_start + bn - 1) / bn +
                          (tv.gist_end - tv.gist_begin + bn - 1) / bn + (tv.local_hi - tv.local_lo + bn - 1) / bn;
  p.splits = cache_splits(tiles * B * Hkv, nblocks, num_sms);
  at::Tensor o_part, lse_part;
  if (p.splits > 1) {
    o_part = at::empty({p.splits, B * Hq * Nq, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({p.splits, B * Hq * Nq}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }

  const int t = static_cast<int>(tiles);
  if (D == 64) {
    bf16 ? launch_cache_fwd<__nv_bfloat16, 64>(p, t, stream) : launch_cache_fwd<__half, 64>(p, t, stream);
  } else {
    bf16 ? launch_cache_fwd<__nv_bfloat16, 128>(p, t, stream) : launch_cache_fwd<__half, 128>(p, t, stream);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_cache_bwd_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, int64_t, int64_t, int64_t, double, int64_t, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "unigist::gist_attention_cache_bwd: no CUDA backward over the compressed-cache key "
                              "layout yet (it serves inference: prefill chunks and decoding). Train on the "
                              "interleaved layout (key_layout=None), or run this backward on CPU tensors");
  return {};
}

}  // namespace unigist
