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

constexpr int kFwdBM = 64;   // query rows per CTA (4 warps x 16 rows)
constexpr int kFwdBN = 64;   // keys per block
constexpr int kFwdThreads = 128;

template <int D>
constexpr int fwd_smem_bytes() {
  return (kFwdBM * D + 4 * kFwdBN * D) * 2;  // Q + 2 stages of K and V (16-bit elements)
}

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

template <typename T, int D>
__global__ void __launch_bounds__(kFwdThreads) gist_attn_fwd_kernel(const AttnParams p) {
  using TT = TypeTraits<T>;
  constexpr int BM = kFwdBM, BN = kFwdBN;
  constexpr int NT = BN / 8;   // n-tiles of keys in S
  constexpr int DT = D / 8;    // n-tiles of head dim in O
  constexpr int KS = D / 16;   // k-steps over head dim
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + 2 * BN * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.x;
  const int tile = gridDim.y - 1 - blockIdx.y;  // later tiles carry more work: start them first
  const int b = bh / p.Hq, h = bh % p.Hq;
  const int m0 = tile * BM;
  const Layout32 l = p.l;

  const T* qg = static_cast<const T*>(p.q) + (static_cast<int64_t>(bh) * p.Nq + m0) * D;
  const int64_t kv_off = (static_cast<int64_t>(b) * p.Hkv + h / p.group) * p.Nk * D;
  const T* kg = static_cast<const T*>(p.k) + kv_off;
  const T* vg = static_cast<const T*>(p.v) + kv_off;

  const int q_lo = p.q_offset + m0;
  const int rows_here = min(BM, p.Nq - m0);
  const int q_hi = q_lo + rows_here - 1;
  KeyBlocks kb;
  kb.init(layout::tile_visit(q_lo, q_hi, p.Nk, l.as64()), BN);
  const int nblocks = kb.total();

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

  uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int r = warp * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
    ldmatrix_x4(qf[ks], smem_u32(sQ + swz<D>(r, c)));
  }

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};  // running max of scale*log2e*s
  float l_r[2] = {0.f, 0.f};               // thread-partial running sums
  const int row0 = warp * 16 + (lane >> 2);
  const int qpos[2] = {q_lo + row0, q_lo + row0 + 8};

  for (int it = 0; it < nblocks; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < nblocks) load_kv(it + 1, (it + 1) & 1);
    cp_async_commit();
    const T* cK = sK + (it & 1) * BN * D;
    const T* cV = sV + (it & 1) * BN * D;

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

#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] *= p.scale_log2;
      s[j][1] *= p.scale_log2;
      s[j][2] *= p.scale_log2;
      s[j][3] *= p.scale_log2;
    }
    // Mask: only blocks that are not fully visible for every row of the tile.
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    bool need_mask;
    if (kind == 1) {
      need_mask = first + BN > end;
    } else {
      const int last = first + BN - 1;
      need_mask = last >= end || last > q_lo || (kind == 0 ? false : q_hi - first >= l.window);
    }
    if (need_mask) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int kp = key_position(l, kind, first, end, j * 8 + 2 * (lane & 3) + c);
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const bool ok = kp >= 0 && (kind == 1 || l.visible(qpos[hr], kp));
            if (!ok) s[j][2 * hr + c] = -INFINITY;
          }
        }
      }
    }

    // Online softmax (base 2).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
      const float m_new = fmaxf(m_r[hr], mx[hr]);
      m_use[hr] = m_new == -INFINITY ? 0.f : m_new;
      alpha[hr] = exp2f(m_r[hr] - m_use[hr]);
      m_r[hr] = m_new;
      l_r[hr] *= alpha[hr];
    }
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    uint32_t pf[NT / 2][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float p0 = exp2f(s[j][0] - m_use[0]);
      const float p1 = exp2f(s[j][1] - m_use[0]);
      const float p2 = exp2f(s[j][2] - m_use[1]);
      const float p3 = exp2f(s[j][3] - m_use[1]);
      l_r[0] += p0 + p1;
      l_r[1] += p2 + p3;
      pf[j / 2][(j & 1) * 2 + 0] = TT::pack(p0, p1);
      pf[j / 2][(j & 1) * 2 + 1] = TT::pack(p2, p3);
    }
    // O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        uint32_t bf[4];
        const int key = kk * 16 + (lane & 15);
        const int c = dd * 2 + (lane >> 4);
        ldmatrix_x4_trans(bf, smem_u32(cV + swz<D>(key, c)));
        TT::mma(o[2 * dd], pf[kk], bf[0], bf[1]);
        TT::mma(o[2 * dd + 1], pf[kk], bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: normalize, stage the warp's 16 rows in its own rows of sQ, then
  // write 16-byte chunks.
  float inv[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l_r[hr] += __shfl_xor_sync(0xffffffffu, l_r[hr], 1);
    l_r[hr] += __shfl_xor_sync(0xffffffffu, l_r[hr], 2);
    inv[hr] = l_r[hr] > 0.f ? 1.f / l_r[hr] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    const int c = i, within = 2 * (lane & 3);
    *reinterpret_cast<uint32_t*>(sQ + swz<D>(row0, c) + within) =
        TT::pack(o[i][0] * inv[0], o[i][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(sQ + swz<D>(row0 + 8, c) + within) =
        TT::pack(o[i][2] * inv[1], o[i][3] * inv[1]);
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = row0 + hr * 8;
      if (r < rows_here) {
        p.lse[static_cast<int64_t>(bh) * p.Nq + m0 + r] =
            l_r[hr] > 0.f ? (m_r[hr] + log2f(l_r[hr])) * kLn2 : -INFINITY;
      }
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(p.o) + (static_cast<int64_t>(bh) * p.Nq + m0) * D;
#pragma unroll
  for (int i = 0; i < 16 * DT / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = warp * 16 + idx / DT, c = idx % DT;
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
  const dim3 grid(p.B * p.Hq, (p.Nq + kFwdBM - 1) / kFwdBM);
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
  TORCH_CHECK(std::isfinite(softmax_scale), where, ": softmax_scale must be finite");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
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
  p.l = clamp_layout(ratio, window, num_sink, k.size(2));
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (D == 64) {
    bf16 ? launch_fwd<__nv_bfloat16, 64>(p, stream) : launch_fwd<__half, 64>(p, stream);
  } else {
    bf16 ? launch_fwd<__nv_bfloat16, 128>(p, stream) : launch_fwd<__half, 128>(p, stream);
  }
  return {out, lse};
}

}  // namespace unigist
