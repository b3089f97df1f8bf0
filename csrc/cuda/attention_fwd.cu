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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <tuple>

#include "attention_common.cuh"
#include "checks.h"
#include "layout.h"
#include "ops.h"

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

  const T* qg = static_cast<const T*>(p.q) + qt.row0 * D;
  const T* kg = static_cast<const T*>(p.k) + qt.kv_row0 * D;
  const T* vg = static_cast<const T*>(p.v) + qt.kv_row0 * D;

  load_rows<BM, D, kFwdThreads>(
      sQ, [&](int r) -> const T* { return r < rows_here ? qg + static_cast<int64_t>(r) * D : nullptr; },
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
          return j >= 0 ? kg + static_cast<int64_t>(j) * D : nullptr;
        },
        kg);
    load_rows<BN, D, kFwdThreads>(
        sV + stage * BN * D,
        [&](int r) -> const T* {
          const int j = row(r);
          return j >= 0 ? vg + static_cast<int64_t>(j) * D : nullptr;
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
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        o[mt][i][0] *= alpha[0];
        o[mt][i][1] *= alpha[0];
        o[mt][i][2] *= alpha[1];
        o[mt][i][3] *= alpha[1];
      }
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
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      const int within = 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(r0, i) + within) =
          TT::pack(o[mt][i][0] * inv[0], o[mt][i][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(r0 + 8, i) + within) =
          TT::pack(o[mt][i][2] * inv[1], o[mt][i][3] * inv[1]);
    }
    if ((lane & 3) == 0) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = r0 + hr * 8;
        if (r < rows_here) {
          p.lse[qt.row0 + r] = lse[hr];
        }
      }
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(p.o) + qt.row0 * D;
#pragma unroll
  for (int i = 0; i < 16 * MT * DT / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = wrow + idx / DT, c = idx % DT;
    if (r < rows_here) {
      *reinterpret_cast<uint4*>(og + static_cast<int64_t>(r) * D + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(r, c));
    }
  }
}

template <typename T, int D>
void launch_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<D>();
  auto kernel = gist_attn_fwd_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid = grid_of(p, (p.Nq + kFwdBM - 1) / kFwdBM);
  kernel<<<grid, kFwdThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail

std::tuple<at::Tensor, at::Tensor> gist_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, int64_t ratio,
                                                           int64_t window, int64_t num_sink,
                                                           double softmax_scale, int64_t q_offset) {
  using namespace cuda_detail;
  const char* where = "unigist.gist_attention_fwd";
  check_attention_inputs(where, q, k, v, ratio, window, num_sink, q_offset);
  check_cuda_qkv(where, q, k, v);
  check_softmax_scale(where, softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = aligned_contiguous(q), kc = aligned_contiguous(k), vc = aligned_contiguous(v);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};

  AttnParams p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(k.size(1));
  p.group = p.Hq / p.Hkv;
  p.Nq = static_cast<int>(Nq);
  p.Nk = static_cast<int>(k.size(2));
  p.q_offset = static_cast<int>(q_offset);
  // Grid order. The wgmma forward runs one CTA per SM, and with heads along x
  // the ~130 resident CTAs belong to 32+ heads whose gist rows (3.3 MB of K/V
  // per head at 32k) overflow L2 (ncu: 53% hit rate, 41% of DRAM bandwidth);
  // tiles along x keeps them on one or two heads: 5.6 -> 5.1 ms at 32k r=4
  // (NOTES.md v7). The mma.sync kernel measured no gain from it (v4).
  const bool sm90 = use_sm90_fwd(q.get_device());
  p.head_fast = sm90 ? 0 : 1;
  p.l = clamp_layout(ratio, window, num_sink, k.size(2));
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (sm90) {
    launch_fwd_sm90(p, bf16, static_cast<int>(D), stream);
  } else if (D == 64) {
    bf16 ? launch_fwd<__nv_bfloat16, 64>(p, stream) : launch_fwd<__half, 64>(p, stream);
  } else {
    bf16 ? launch_fwd<__nv_bfloat16, 128>(p, stream) : launch_fwd<__half, 128>(p, stream);
  }
  return {out, lse};
}

int64_t gist_attention_fwd_arch_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "unigist.gist_attention_fwd_arch: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  return cuda_detail::use_sm90_fwd(q.get_device()) ? 90 : 80;
}

}  // namespace unigist
