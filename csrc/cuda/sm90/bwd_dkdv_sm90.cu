// dK/dV of the gist attention backward for Hopper (sm_90a): computes exactly
// what the two launches of gist_attn_bwd_dkdv_kernel (bwd_sm80.cu) compute,
// with the four GEMMs on warpgroup MMA (FlashAttention-3's backward without its
// dQ, which has its own kernel). Same two passes and the same pair partition:
//   gist pass (gist_pass 1, launched first): blocks of BN packed gists (gist g
//     at position g * (ratio + 1) + ratio); query tiles whose gist part holds
//     them (q_lo >= position + window); writes the gist rows' fp32 partials.
//   dense pass (gist_pass 0): aligned blocks of BN keys; query tiles whose
//     dense part (layout::in_dense_part) holds some of the block's pairs;
//     adds the partials and writes every key row of the block
//     (store_dkdv_rows: dk / dv directly at group 1, else dk_acc / dv_acc).
// A query step is one 64-row query tile of the forward partition (kQTile,
// tile t starts at q_offset + 64 t), so every pair is assigned to the same
// pass, with the same per-element test, as in the mma.sync kernel.
//
// CTA = 3 warpgroups (warp-specialized as the wgmma forward / dQ):
//   * warpgroup 0 (producer) gathers the block's K and V once (constant-stride
//     gather_rows: consecutive keys or gists ratio + 1 apart, zero-filled past
//     the end) and streams the query steps (Q and dO rows, lse and delta) through
//     a ring of STAGES buffers completing on mbarriers: Q and dO as TMA boxes
//     issued by thread 0 (sm90/tma.cuh; cp.async gathers with
//     UNIGIST_SM90_TMA=0), lse and delta with cp.async.
//   * warpgroups 1 and 2 (consumers) own 64 keys each (BN = 128). Keys are the
//     M dimension of every GEMM:
//       S^T = K Q^T, dP^T = V dO^T            (wgmma SS, both K-major)
//       P^T = exp2(S^T * scale_log2 - lse[q] * log2e)   (masked entries 0)
//       dS^T = P^T * (dP^T - delta[q])
//       dV += P^T dO, dK += dS^T Q            (wgmma RS, dO and Q read MN-major)
//     P^T and dS^T come out of the S^T / dP^T accumulators in exactly the
//     A-operand register layout of the RS GEMMs (as P in the forward's P V).
//
// BN = 128 with two consumers rather than BN = 64 with one: the Q/dO stream
// (the kernel's L2 -> smem traffic) is loaded once per 128 keys, and two
// consumers let one's exp / dS arithmetic run under the other's GEMMs.
// Registers per consumer thread (64 keys x 64 queries per step, D = 128): S^T
// 32 + dP^T 32 + dV 64 + dK 64 + one packed A operand 16 (P^T, then dS^T) =
// 208 accumulator registers; consumers take 240, the producer 24 (128 * 24 +
// 256 * 240 = 384 * 168, the CTA's allocation at launch).
//
// Schedule of a consumer, step i (commit groups in order):
//   S^T(i) [behind dK(i-1)]; wait dK(i-1), release stage i-1; dP^T(i);
//   wait S^T(i); P^T = exp2 (under the dP^T GEMM); pack; dV(i);
//   wait dP^T(i); dS^T (under the dV GEMM); wait dV(i); pack; dK(i).
// dP^T(i) is issued only once dK(i-1) is done and dS^T is packed only once
// dV(i) is: with S^T, dP^T, dK, dV and a second packed operand all in flight,
// ptxas runs out of registers (measured: C7512, every wgmma serialized,
// unless the consumers had > 248 registers).
// The gist pass visits its query steps last to first: every gist block of a
// head then starts at the head's last tile and the blocks resident together
// read the same Q / dO rows (the mma.sync order, first to first, has each
// block at its own offset). The dense pass goes first to last.
#include <c10/cuda/CUDAException.h>

#include "cuda/dispatch.cuh"
#include "cuda/epilogue.cuh"
#include "cuda/key_visit.cuh"
#include "cuda/launch.h"
#include "cuda/params.cuh"
#include "cuda/softmax.cuh"
#include "cuda/sm90/skeleton.cuh"

namespace unigist {
namespace cuda_detail {

template <int D>
struct Sm90Dkdv {
  static constexpr int BN = 128;  // keys per CTA: 2 consumer warpgroups x 64
  static constexpr int BQ = 64;   // queries per step: one forward query tile (kQTile)
  // K + V take 64 KB at D = 128, a stage of Q + dO (+ lse, delta) 32.5 KB:
  // 4 stages fill 195 KB of the 227 KB (5 would not fit).
  static constexpr int STAGES = 4;
  static constexpr int THREADS = sm90::kThreads;
  static constexpr int KV_BYTES = BN * D * 2;
  static constexpr int Q_BYTES = BQ * D * 2;
  static constexpr int NBARS = 1 + 3 * STAGES;
  static constexpr int SMEM = 1024 + 2 * KV_BYTES + 2 * STAGES * Q_BYTES + 2 * STAGES * BQ * 4 + 8 * NBARS;
  static constexpr int PRODUCER_REGS = 24;
  static constexpr int CONSUMER_REGS = 240;
  static_assert(128 * PRODUCER_REGS + 256 * CONSUMER_REGS <= 384 * 168, "register budget");
  static_assert(SMEM <= 227 * 1024, "shared memory");
};

// Query steps [begin, end) (64-row tiles) holding a pair of keys [kp_first,
// kp_last] in the pass: layout::dkdv_tile_range (the mma.sync kernel's bounds,
// checked against brute force in tests/cpp).
__device__ __forceinline__ void dkdv_step_range(const Layout32& l, int gist_pass, int kp_first, int kp_last,
                                                int q_offset, int n_steps, int& begin, int& end) {
  const layout::TileRange r = layout::dkdv_tile_range(kp_first, kp_last, gist_pass != 0, q_offset, n_steps, 64, l.as64());
  begin = static_cast<int>(r.begin);
  end = static_cast<int>(r.end);
}

template <typename T, int D>
__global__ void __launch_bounds__(384, 1)
    gist_attn_bwd_dkdv_sm90_kernel(const AttnParams p, const int gist_pass, const __grid_constant__ QdoTensorMaps maps) {
  using namespace sm90;
  using C = Sm90Dkdv<D>;
  constexpr int BN = C::BN, BQ = C::BQ, STAGES = C::STAGES;
  constexpr int NQ = BQ / 8;  // query tiles of S^T and dP^T
  constexpr int DT = D / 8;   // d tiles of dK, dV
  constexpr int KS = D / 16;  // k16 steps of K Q^T and V dO^T
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  SmemCarver smem(smem_raw);
  unsigned char* sK = smem.take(C::KV_BYTES);
  unsigned char* sV = smem.take(C::KV_BYTES);
  unsigned char* sQ = smem.take(STAGES * C::Q_BYTES);
  unsigned char* sdO = smem.take(STAGES * C::Q_BYTES);
  float* sL = reinterpret_cast<float*>(smem.take(STAGES * BQ * 4));   // lse, STAGES x BQ
  float* sDl = reinterpret_cast<float*>(smem.take(STAGES * BQ * 4));  // delta, STAGES x BQ
  // Through TMA, a stage's Q (dO) completes on thread 0's arrival with its
  // bytes plus the 128 cp.async arrivals that bring lse (delta).
  const RingBarriers<STAGES> bars{smem_u32(smem.next), maps.on ? 129 : 128};
  const uint32_t kv_full = bars.once();
  auto q_full = [&](int st) { return bars.full0(st); };
  auto do_full = [&](int st) { return bars.full1(st); };

  int blk, bh, nblk;
  block_coords(p, blk, bh, nblk);
  const int b = bh / p.Hq, h = bh % p.Hq;
  const Layout32 l = p.l;
  const DkdvKeys keys(p, gist_pass, blk, BN);
  const int first = keys.first, end = keys.end;
  auto kpos = [&](int s) { return keys.pos(s); };
  const int n_steps = (p.Nq + BQ - 1) / BQ;
  // Steps of each consumer's 64 keys (empty: wb >= we); the CTA visits the
  // smallest range holding both.
  int wb[2], we[2];
  int st_begin = n_steps, st_end = 0;
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    const int nv = min(64, end - first - 64 * w);
    wb[w] = we[w] = 0;
    if (nv > 0) dkdv_step_range(l, gist_pass, kpos(64 * w), kpos(64 * w + nv - 1), p.q_offset, n_steps, wb[w], we[w]);
    if (we[w] > wb[w]) {
      st_begin = min(st_begin, wb[w]);
      st_end = max(st_end, we[w]);
    }
  }
  if (st_end <= st_begin) st_begin = st_end = 0;
  const int n_it = st_end - st_begin;
  // Iteration it visits step step_of(it): first to last (dense), last to first (gist).
  auto step_of = [&](int it) { return gist_pass ? st_end - 1 - it : st_begin + it; };
  const int64_t qrow0 = static_cast<int64_t>(bh) * p.Nq;

  auto producer = [&] {
    const int t = threadIdx.x;  // 0..127
    const int64_t k_off = b * p.k_sb + (h / p.group) * p.k_sh, v_off = b * p.v_sb + (h / p.group) * p.v_sh;
    // Zero-filled rows past the block's end: S^T = dP^T = 0 there (masked),
    // never written back.
    {
      const int64_t pos0 = gist_pass ? l.gist_position(first) : first;
      const int64_t stride = gist_pass ? l.ratio + 1 : 1;
      gather_rows<BN, D>(sK, static_cast<const T*>(p.k) + k_off, pos0, stride, p.kv_sn, end - first, t);
      gather_rows<BN, D>(sV, static_cast<const T*>(p.v) + v_off, pos0, stride, p.kv_sn, end - first, t);
      cp_async_arrive(kv_full);
    }
    const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
    // Rows past Nq: Q, dO, lse and delta zero-filled (finite S^T, dP^T, dS^T;
    // their P^T is masked).
    namespace tma = sm90_tma;
    if (maps.on && t == 0) {
      tma::prefetch(&maps.q);
      tma::prefetch(&maps.dout);
    }
    // A step's Q or dO through TMA: one box per 64-column slab, by thread 0.
    auto load_rows = [&](const CUtensorMap* map, unsigned char* dst, int t0, uint32_t bar) {
      tma::arrive_expect(bar, C::Q_BYTES);
#pragma unroll
      for (int slab = 0; slab < D / 64; ++slab)
        tma::load_4d(smem_u32(dst) + slab * BQ * 128, map, slab * 64, t0, h, b, bar);
    };
    for (int it = 0; it < n_it; ++it) {
      const int st = it % STAGES;
      bars.wait_empty(it);
      const int t0 = step_of(it) * BQ;
      const int nrows = p.Nq - t0;
      if (!maps.on) {
        gather_rows<BQ, D>(sQ + st * C::Q_BYTES, qg, t0, 1, p.q_sn, nrows, t);
      } else if (t == 0) {
        load_rows(&maps.q, sQ + st * C::Q_BYTES, t0, q_full(st));
      }
      if (t < BQ) cp_async4(sL + st * BQ + t, p.lse + qrow0 + (t < nrows ? t0 + t : 0), t < nrows);
      cp_async_arrive(q_full(st));
      if (!maps.on) {
        gather_rows<BQ, D>(sdO + st * C::Q_BYTES, dog, t0, 1, p.do_sn, nrows, t);
      } else if (t == 0) {
        load_rows(&maps.dout, sdO + st * C::Q_BYTES, t0, do_full(st));
      }
      const int r = t - BQ;
      if (t >= BQ) cp_async4(sDl + st * BQ + r, p.delta + qrow0 + (r < nrows ? t0 + r : 0), r < nrows);
      cp_async_arrive(do_full(st));
    }
    cp_async_wait<0>();
  };

  auto consumer = [&](int wg, int warp, int lane) {
    const int r0 = warp * 16 + lane / 4;  // key row (of the warpgroup's 64) of s[.][0..1]; +8 for [2..3]
    const int kp_row[2] = {kpos(wg * 64 + r0), kpos(wg * 64 + r0 + 8)};
    const uint32_t k_addr = smem_u32(sK) + wg * 64 * 128, v_addr = smem_u32(sV) + wg * 64 * 128;
    const uint32_t q_addr = smem_u32(sQ), do_addr = smem_u32(sdO);

    // This consumer's keys and its active iterations [ia, ib) (a contiguous
    // part of the CTA's: the step ranges are nested). Outside them it only
    // waits for each stage and hands it back.
    const int nv = min(64, end - first - 64 * wg);
    const int kp_first = kpos(wg * 64), kp_last = nv > 0 ? kpos(wg * 64 + nv - 1) : -1;
    const int my_b = wg == 0 ? wb[0] : wb[1], my_e = wg == 0 ? we[0] : we[1];
    int ia, ib;
    if (my_e <= my_b) {
      ia = ib = n_it;
    } else if (gist_pass) {
      ia = st_end - my_e;
      ib = st_end - my_b;
    } else {
      ia = my_b - st_begin;
      ib = my_e - st_begin;
    }

    float dk[DT][4], dv[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
      dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
    }
    float s[NQ][4], dp[NQ][4];
    // A operand of the RS GEMMs: P^T packed for dV, then dS^T packed for dK
    // (one array: 16 registers less, at the price of waiting for the dV GEMM
    // before packing dS^T).
    uint32_t af[BQ / 16][4];
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) af[kk][0] = af[kk][1] = af[kk][2] = af[kk][3] = 0u;

    // A stage this consumer has nothing to do with: it still waits for the
    // stage's data (so that its arrival falls in the stage's current phase and
    // no copy is in flight when the producer refills it), then hands it back.
    auto skip = [&](int it) {
      bars.wait_full0(it);
      bars.wait_full1(it);
      bars.release(it, lane);
    };
    auto issue_s = [&](int it) {
      const int st = it % STAGES;
      bars.wait_full0(it);
      fence_proxy_async();
      wgmma_fence();
      wgmma_ss_kmajor<KS, BN, BQ>(s, k_addr, q_addr + st * C::Q_BYTES, T{});
      wgmma_commit();
    };
    auto issue_dp = [&](int it) {
      const int st = it % STAGES;
      bars.wait_full1(it);
      fence_proxy_async();
      wgmma_fence();
      wgmma_ss_kmajor<KS, BN, BQ>(dp, v_addr, do_addr + st * C::Q_BYTES, T{});
      wgmma_commit();
    };
    // dV += P^T dO and dK += dS^T Q: the query rows of dO / Q are these GEMMs'
    // k dimension, so they are read MN-major like V in the forward's P V
    // (LBO = slab stride of the 64-row tile, 16 rows = 2048 bytes per k16).
    auto issue_dv = [&](int it) {
      const int st = it % STAGES;
      wgmma_fence();
      wgmma_rs_mnmajor<BQ / 16, BQ>(dv, af, do_addr + st * C::Q_BYTES, T{});
      wgmma_commit();
    };
    auto issue_dk = [&](int it) {
      const int st = it % STAGES;
      wgmma_fence();
      wgmma_rs_mnmajor<BQ / 16, BQ>(dk, af, q_addr + st * C::Q_BYTES, T{});
      wgmma_commit();
    };
    // Does every (key, query) pair of this consumer's keys and tile t0 belong
    // to this pass? (Then no element test.)
    auto all_in = [&](int t0) {
      if (nv < 64 || t0 + BQ > p.Nq) return false;
      return layout::dkdv_tile_all_in(kp_first, kp_last, gist_pass != 0, p.q_offset + t0, BQ, l.as64());
    };
    // Per key row, the part of the element test that does not depend on the
    // tile (layout::dkdv_key_last_query); slots past the block's end: none.
    int last_q[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) last_q[hr] = layout::dkdv_key_last_query<int>(kp_row[hr], l, 1 << 30);
    // P^T in place of S^T, selected (not multiplied) by the mask: an invisible
    // score may overflow exp2. Element (key row, query col) is counted iff the
    // mma.sync kernel counts it in this pass: lo <= col <= hi, the interval form
    // of its test (layout::dkdv_key_cols, checked against it in tests/cpp).
    auto compute_p = [&](int it) {
      const int st = it % STAGES;
      const int t0 = step_of(it) * BQ;
      const int q_lo = p.q_offset + t0;
      const float* cL = sL + st * BQ;
      const bool full = all_in(t0);
      int lo[2], hi[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        layout::dkdv_key_cols<int>(kp_row[hr], last_q[hr], gist_pass != 0, q_lo, min(BQ, p.Nq - t0), l, lo[hr], hi[hr]);
        if (kp_row[hr] < 0) hi[hr] = -1;
        if (full) lo[hr] = -BQ, hi[hr] = BQ;
      }
#pragma unroll
      for (int j = 0; j < NQ; ++j) {
        const int col0 = j * 8 + 2 * (lane & 3);
        const float2 lse = *reinterpret_cast<const float2*>(cL + col0);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = col0 + (e & 1);
          const float pr = exp2f(fmaf(s[j][e], p.scale_log2, -((e & 1) ? lse.y : lse.x) * kLog2e));
          s[j][e] = col >= lo[e >> 1] && col <= hi[e >> 1] ? pr : 0.f;
        }
      }
    };
    // dS^T in place of P^T (fp32).
    auto compute_ds = [&](int it) {
      const float* cD = sDl + (it % STAGES) * BQ;
#pragma unroll
      for (int j = 0; j < NQ; ++j) {
        const float2 dl = *reinterpret_cast<const float2*>(cD + j * 8 + 2 * (lane & 3));
        s[j][0] *= dp[j][0] - dl.x;
        s[j][1] *= dp[j][1] - dl.y;
        s[j][2] *= dp[j][2] - dl.x;
        s[j][3] *= dp[j][3] - dl.y;
      }
    };

    // One step after its S^T and dP^T GEMMs were issued, the GEMMs of earlier
    // steps complete. Pending on entry: S^T, dP^T of it.
    auto step = [&](int it) {
      wgmma_wait<1>();  // S^T of it
      reg_fence(s);
      compute_p(it);
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) pack_p<T>(af[kk], s, kk);
      issue_dv(it);
      wgmma_wait<1>();  // dP^T of it; its dV GEMM still running
      reg_fence(dp);
      reg_fence(s);
      compute_ds(it);
      wgmma_wait<0>();  // the dV GEMM, which reads af
      reg_fence(af);
      reg_fence(s);
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) pack_p<T>(af[kk], s, kk);
      issue_dk(it);
    };

    for (int it = 0; it < ia; ++it) skip(it);
    if (ia < ib) {
      mbar_wait(kv_full, 0);
      issue_s(ia);
      issue_dp(ia);
      step(ia);
      for (int it = ia + 1; it < ib; ++it) {
        // The S^T GEMM of it queues behind the dK GEMM of it - 1; dP^T is issued
        // once that dK GEMM (which reads af) is done: S^T, dP^T, dK and dV
        // accumulators and af all in flight at once would not fit in 240
        // registers (ptxas would serialize every wgmma).
        issue_s(it);
        wgmma_wait<1>();  // the dK GEMM of it - 1: stage it - 1 is no longer read
        reg_fence(af);
        bars.release(it - 1, lane);
        issue_dp(it);
        step(it);
      }
      wgmma_wait<0>();
      reg_fence(dk);
      reg_fence(dv);
      bars.release(ib - 1, lane);
    }
    for (int it = ib; it < n_it; ++it) skip(it);

    // Epilogue: every key row of the block, zeros included (the dense pass
    // reads the gist pass's partials).
    store_dkdv_rows<T, DT>(p, bh, kp_row, dk, dv, lane, gist_pass != 0);
  };

  warp_specialize<C::PRODUCER_REGS, C::CONSUMER_REGS>(bars, producer, consumer);
}

template <typename T, int D>
void launch_bwd_dkdv_sm90_t(AttnParams p, cudaStream_t stream) {
  using C = Sm90Dkdv<D>;
  auto kernel = gist_attn_bwd_dkdv_sm90_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
  // Heads along x: every head's heaviest blocks (the sink block of the dense
  // pass, the first gist blocks, which see almost every query) start first.
  p.head_fast = 1;
  QdoTensorMaps maps;
  make_qdo_tensor_maps(p, std::is_same<T, __nv_bfloat16>::value, D, C::BQ, maps);
  // The gist pass first: the dense pass adds its partials.
  const int64_t gist_blocks = (p.n_gist_rows + C::BN - 1) / C::BN;
  if (gist_blocks > 0) {
    kernel<<<grid_of(p, gist_blocks), C::THREADS, C::SMEM, stream>>>(p, 1, maps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int dense_blocks = (p.Nk + C::BN - 1) / C::BN;
  kernel<<<grid_of(p, dense_blocks), C::THREADS, C::SMEM, stream>>>(p, 0, maps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd_dkdv_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  UNIGIST_DISPATCH(bf16, head_dim, [&] { launch_bwd_dkdv_sm90_t<T, kHeadDim>(p, stream); });
}

}  // namespace cuda_detail
}  // namespace unigist
