// Gist attention forward on CUDA: FlashAttention-2 style (online softmax in
// registers, mma.sync m16n8k16, cp.async double buffering), with the "gist
// shift": a CTA owns a tile of BM query rows and visits exactly
// layout::tile_visit's three key ranges
//   (a) sink keys [0, sink_end)            element-wise mask,
//   (b) gist indices [gist_begin, gist_end) packed BN per block: key row of
//       packed slot s is position (gist_begin + s) * (ratio + 1) + ratio,
//       computed in the cp.async address arithmetic; no mask but the tail,
//   (c) local keys [local_lo, local_hi)   element-wise mask,
// so its work follows the mask's non-zeros. No block table.
// Runs wherever the wgmma forward (sm90/fwd_sm90.cu) does not.
#include <c10/cuda/CUDAException.h>

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

constexpr int kFwdMT = 2;    // m16 tiles per warp
constexpr int kFwdBM = 64 * kFwdMT;  // query rows per CTA (4 warps x 16 * kFwdMT rows)
constexpr int kFwdBN = 64;   // keys per block
constexpr int kFwdThreads = 128;

template <int D>
constexpr int fwd_smem_bytes() {
  return (kFwdBM * D + 4 * kFwdBN * D) * 2;  // Q + 2 stages of K and V (16-bit elements)
}

template <typename T, int D>
__global__ void __launch_bounds__(kFwdThreads) gist_attn_fwd_kernel(const AttnParams p) {
  using TT = TypeTraits<T>;
  constexpr int MT = kFwdMT;      // m16 tiles per warp (a warp owns 16 * MT query rows)
  constexpr int BM = kFwdBM, BN = kFwdBN;
  constexpr int NT = BN / 8;   // n-tiles of keys in S
  constexpr int DT = D / 8;    // n-tiles of head dim in O
  constexpr int KS = D / 16;   // k-steps over head dim
  // Q fragments stay in registers when they are small; else re-read per k-step.
  constexpr bool kQRegs = MT * KS * 4 <= 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + 2 * BN * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QueryTile qt(p, BM, BN);
  const int q_lo = qt.q_lo, q_hi = qt.q_hi, rows_here = qt.rows_here, nblocks = qt.nblocks;
  const KeyBlocks& kb = qt.kb;
  const Layout32 l = p.l;

  const T* qg = static_cast<const T*>(p.q) + qt.q_off;
  const T* kg = static_cast<const T*>(p.k) + qt.k_off;
  const T* vg = static_cast<const T*>(p.v) + qt.v_off;

  load_rows<BM, D, kFwdThreads>(
      sQ, [&](int r) -> const T* { return r < rows_here ? qg + static_cast<int64_t>(r) * p.q_sn : nullptr; },
      qg);
  cp_async_commit();

  auto load_kv = [&](int it, int stage) {
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    auto row = [&](int r) -> int { return key_position(l, kind, first, end, r); };
    load_rows<BN, D, kFwdThreads>(
        sK + stage * BN * D,
        [&](int r) -> const T* {
          const int j = row(r);
          return j >= 0 ? kg + static_cast<int64_t>(j) * p.kv_sn : nullptr;
        },
        kg);
    load_rows<BN, D, kFwdThreads>(
        sV + stage * BN * D,
        [&](int r) -> const T* {
          const int j = row(r);
          return j >= 0 ? vg + static_cast<int64_t>(j) * p.kv_sn : nullptr;
        },
        vg);
  };
  if (nblocks > 0) load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  const int wrow = warp * 16 * MT;  // first row of this warp in the tile
  uint32_t qf[kQRegs ? MT : 1][kQRegs ? KS : 1][4];
  if constexpr (kQRegs) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int r = wrow + mt * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
        ldmatrix_x4(qf[mt][ks], smem_u32(sQ + swz<D>(r, c)));
      }
    }
  }

  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < DT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  float m_r[MT][2], l_r[MT][2];  // running max of scale*log2e*s; thread-partial sums
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_r[mt][0] = m_r[mt][1] = -INFINITY;
    l_r[mt][0] = l_r[mt][1] = 0.f;
  }
  const int row0 = wrow + (lane >> 2);  // rows row0 + 16 mt + 8 hr

  for (int it = 0; it < nblocks; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < nblocks) load_kv(it + 1, (it + 1) & 1);
    cp_async_commit();
    const T* cK = sK + (it & 1) * BN * D;
    const T* cV = sV + (it & 1) * BN * D;

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t qa[MT][4];
      if constexpr (!kQRegs) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int r = wrow + mt * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
          ldmatrix_x4(qa[mt], smem_u32(sQ + swz<D>(r, c)));
        }
      }
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        uint32_t bf[4];
        const int key = jj * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int c = ks * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(bf, smem_u32(cK + swz<D>(key, c)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t(&a)[4] = kQRegs ? qf[kQRegs ? mt : 0][kQRegs ? ks : 0] : qa[mt];
          TT::mma(s[mt][2 * jj], a, bf[0], bf[1]);
          TT::mma(s[mt][2 * jj + 1], a, bf[2], bf[3]);
        }
      }
    }
    float scale = p.scale_log2;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) scale = prescale_unless_positive(s[mt], p.scale_log2);

    // Mask: only blocks that are not fully visible for every row of the tile.
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    if (block_needs_mask(l, kind, first, end, BN, q_lo, q_hi)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mask_fragment(s[mt], l, kind, first, end, q_lo + row0 + mt * 16, lane);
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float alpha[2];
      online_softmax(s[mt], scale, m_r[mt], l_r[mt], alpha);
      scale_rows(o[mt], alpha);
    }
    // O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pf[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) pack_p<T>(pf[mt], s[mt], kk);
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        uint32_t bf[4];
        const int key = kk * 16 + (lane & 15);
        const int c = dd * 2 + (lane >> 4);
        ldmatrix_x4_trans(bf, smem_u32(cV + swz<D>(key, c)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          TT::mma(o[mt][2 * dd], pf[mt], bf[0], bf[1]);
          TT::mma(o[mt][2 * dd + 1], pf[mt], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: normalize, stage the warp's rows in its own rows of sQ, then
  // write 16-byte chunks.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2], lse[2];
    finish_rows(l_r[mt], m_r[mt], inv, lse);
    const int r0 = row0 + mt * 16;
    stage_rows<D>(sQ, o[mt], inv, r0, lane);
    store_lse_rows(p, qt.row0, lse, r0, rows_here, lane);
  }
  __syncwarp();
  copy_rows_out<16 * MT, D>(p.o, qt.row0, sQ, wrow, rows_here, lane);
}

template <typename T, int D>
void launch_fwd_t(const AttnParams& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<D>();
  auto kernel = gist_attn_fwd_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid = grid_of(p, (p.Nq + kFwdBM - 1) / kFwdBM);
  kernel<<<grid, kFwdThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_fwd(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  UNIGIST_DISPATCH(bf16, head_dim, [&] { launch_fwd_t<T, kHeadDim>(p, stream); });
}

}  // namespace cuda_detail
}  // namespace unigist
