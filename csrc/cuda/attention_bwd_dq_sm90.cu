// dQ of the gist attention backward for Hopper (sm_90a): computes exactly what
// gist_attn_bwd_dq_kernel (attention_bwd.cu) computes, with the three GEMMs on
// warpgroup MMA. Per key block of a query tile:
//   S = Q K^T                               (wgmma RS: Q fragments loaded into
//                                            registers once, K K-major;
//                                            SS when UNIGIST_SM90_DQ_QREG=0)
//   dP = dO V^T                             (wgmma SS, V K-major)
//   P = exp2(S * scale_log2 - lse * log2e)  (masked entries 0)
//   dS = P * (dP - delta)                   (registers)
//   dQ += dS K                              (wgmma RS, K read MN-major)
// The skeleton is the wgmma forward's (attention_fwd_sm90.cu): a producer
// warpgroup gathers Q and dO once and K/V per block into a ring completing on
// mbarriers, two consumer warpgroups own 64 query rows each.
//
// BN = 64 keys per block: the S, dP and dQ accumulators (32 + 32 + 64 fp32 at
// D = 128) plus dS packed for the RS GEMM (16) and the Q fragments (32) fit the
// 232 consumer registers; BN = 128 would need 240 for the accumulators alone.
//
// A 128-row tile is fine although the dK/dV kernels partition queries in 64-row
// tiles: dQ of a row sums over all its visible keys, and tile_visit of any tile
// visits each of them once for every row of the tile.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "attention_common.cuh"
#include "layout.h"
#include "wgmma.cuh"

namespace unigist {
namespace cuda_detail {

// A/B switches (compile time), measured in one H100 run (dQ kernel ms, 32k,
// H=32, D=128, bf16, r=4 / r=8): S and dP as separate wgmma groups (exp under
// the dP GEMM) 8.24 / 6.05, as one group 8.44 / 6.22; with named-barrier
// ping-pong between the consumers (FA3) 8.52 / 6.27, so off.
#ifndef UNIGIST_SM90_DQ_SPLIT
#define UNIGIST_SM90_DQ_SPLIT 1
#endif
#ifndef UNIGIST_SM90_DQ_PINGPONG
#define UNIGIST_SM90_DQ_PINGPONG 0
#endif
// Q in registers: S = Q K^T as wgmma RS instead of SS. At BN = 64 an SS
// m64n64k16 reads 4 KB of shared memory per 32 tensor-core cycles, the SM's
// whole shared-memory bandwidth; with A from registers it reads half. Costs
// 32 consumer registers at D = 128. Measured -7% dQ at 32k r=4 (NOTES v10);
// 0 gives the SS form for A/B builds.
#ifndef UNIGIST_SM90_DQ_QREG
#define UNIGIST_SM90_DQ_QREG 1
#endif
#ifndef UNIGIST_SM90_DQ_STAGES
#define UNIGIST_SM90_DQ_STAGES 4
#endif

template <int D>
struct Sm90Dq {
  static constexpr int BM = 128;  // 2 consumer warpgroups x 64 rows
  static constexpr int BN = 64;
  // Q + dO take 64 KB at D = 128; 4 stages of K + V (32 KB each) fill most of
  // the rest. One CTA per SM either way (registers).
  static constexpr int STAGES = UNIGIST_SM90_DQ_STAGES;
  static constexpr int THREADS = 384;
  static constexpr int Q_BYTES = BM * D * 2;
  static constexpr int KV_BYTES = BN * D * 2;
  static constexpr int NBARS = 1 + 3 * STAGES;
  static constexpr int SMEM = 1024 + 2 * Q_BYTES + 2 * STAGES * KV_BYTES + 8 * NBARS;
  static constexpr int PRODUCER_REGS = UNIGIST_SM90_DQ_QREG ? 40 : 56;
  static constexpr int CONSUMER_REGS = UNIGIST_SM90_DQ_QREG ? 232 : 224;
};

template <typename T, int D>
__global__ void __launch_bounds__(384, 1) gist_attn_bwd_dq_sm90_kernel(const AttnParams p) {
#if UNIGIST_SM90A
  using namespace sm90;
  using C = Sm90Dq<D>;
  constexpr int BM = C::BM, BN = C::BN, STAGES = C::STAGES;
  constexpr int NT = BN / 8;  // key tiles of S and dP
  constexpr int DT = D / 8;   // 16-byte chunks per row, d tiles of dQ
  constexpr int KS = D / 16;  // k16 steps of Q K^T and dO V^T
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* sQ = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  unsigned char* sdO = sQ + C::Q_BYTES;
  unsigned char* sK = sdO + C::Q_BYTES;
  unsigned char* sV = sK + STAGES * C::KV_BYTES;
  const RingBarriers<STAGES> bars{smem_u32(sV + STAGES * C::KV_BYTES)};
  const uint32_t q_full = bars.once();

  const QueryTile qt(p, BM, BN);
  const int q_lo = qt.q_lo, q_hi = qt.q_hi, rows_here = qt.rows_here, nblocks = qt.nblocks;
  const KeyBlocks& kb = qt.kb;
  const Layout32 l = p.l;
  const int64_t row_off = qt.row0 * D;

  if (threadIdx.x == 0) bars.init();
  __syncthreads();

  if (threadIdx.x < 128) {
    // ---- producer ----
    reg_dealloc<C::PRODUCER_REGS>();
    const int t = threadIdx.x;
    const T* qg = static_cast<const T*>(p.q) + row_off;
    const T* dog = static_cast<const T*>(p.dout) + row_off;
    const T* kg = static_cast<const T*>(p.k) + qt.kv_row0 * D;
    const T* vg = static_cast<const T*>(p.v) + qt.kv_row0 * D;
    // Rows past the tile are zero-filled: their S, dP and dS stay finite and
    // they are never written back.
    gather_rows<BM, D>(sQ, qg, 0, 1, rows_here, t);
    gather_rows<BM, D>(sdO, dog, 0, 1, rows_here, t);
    cp_async_arrive(q_full);
    // As the forward's; zero-filled rows past a block's end also make the dS K
    // GEMM multiply a zero dS by a zero K row, never by garbage.
    produce_kv_blocks<BN, D>(bars, kb, nblocks, l, kg, vg, sK, sV, t);
  } else {
    // ---- consumers ----
    reg_alloc<C::CONSUMER_REGS>();
    const int wg = threadIdx.x / 128 - 1;
    const int warp = (threadIdx.x / 32) & 3, lane = threadIdx.x & 31;
    const int r0 = wg * 64 + warp * 16 + lane / 4;  // tile row of s[.][0..1]; +8 for [2..3]
    const uint32_t q_addr = smem_u32(sQ) + wg * 64 * 128;
    const uint32_t do_addr = smem_u32(sdO) + wg * 64 * 128;
    const uint32_t k_addr = smem_u32(sK), v_addr = smem_u32(sV);

    float lse2[2], dlt[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) qt.row_stats(p, r0 + hr * 8, lse2[hr], dlt[hr]);

    constexpr bool kSplit = UNIGIST_SM90_DQ_SPLIT, kPingPong = UNIGIST_SM90_DQ_PINGPONG;
    float dq[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    float s[NT][4], dp[NT][4];
    uint32_t dsf[BN / 16][4];
#if UNIGIST_SM90_DQ_QREG
    uint32_t qf[KS][4];
#endif

    // S and dP of block it as two commit groups: P = exp2(...) of block it
    // runs while its dP GEMM (and the dQ GEMM of block it - 1) are in flight.
    auto issue_sdp = [&](int it) {
      const int st = it % STAGES;
      bars.wait_full0(it);
      fence_proxy_async();
      wgmma_fence();
#if UNIGIST_SM90_DQ_QREG
      wgmma_rs_kmajor<KS, BN>(s, qf, k_addr + st * C::KV_BYTES, T{});
#else
      wgmma_ss_kmajor<KS, BM, BN>(s, q_addr, k_addr + st * C::KV_BYTES, T{});
#endif
      if (kSplit) wgmma_commit();
      bars.wait_full1(it);
      fence_proxy_async();
      wgmma_fence();  // after the wait loop's branch ptxas would insert one itself
      wgmma_ss_kmajor<KS, BM, BN>(dp, do_addr, v_addr + st * C::KV_BYTES, T{});
      wgmma_commit();
    };
    // dQ += dS K: K's rows are this GEMM's k dimension, so it is read MN-major
    // like V in the forward's P V (LBO = slab stride, 16 key rows per k16).
    auto issue_dq = [&](int it) {
      const int st = it % STAGES;
      wgmma_fence();
      wgmma_rs_mnmajor<BN / 16, BN>(dq, dsf, k_addr + st * C::KV_BYTES, T{});
      wgmma_commit();
    };
    // P in place of S; selected, not multiplied, by the mask: an invisible
    // score may overflow exp2.
    auto compute_p = [&](int it) {
      int kind, first, end;
      kb.block(it, BN, kind, first, end);
      const bool need_mask = block_needs_mask(l, kind, first, end, BN, q_lo, q_hi);
      const int qp0 = q_lo + r0;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pr = exp2f(fmaf(s[j][e], p.scale_log2, -lse2[e >> 1]));
          if (need_mask) {
            const int kp = key_position(l, kind, first, end, j * 8 + 2 * (lane & 3) + (e & 1));
            const bool ok = kp >= 0 && (kind == 1 || l.visible(qp0 + (e >> 1) * 8, kp));
            if (!ok) pr = 0.f;
          }
          s[j][e] = pr;
        }
      }
    };
    // dS in place of P (fp32); packed once the dQ GEMM that reads dsf is done.
    auto compute_ds = [&] {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= dp[j][e] - dlt[e >> 1];
    };
    auto pack_ds = [&] {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) pack_p<T>(dsf[kk], s, kk);
    };

    // Ping-pong (FlashAttention-3): named barriers hand the right to issue
    // GEMMs back and forth between the two consumers. A/B switch.
    auto my_turn = [&] {
      if (kPingPong) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg) : "memory");
    };
    auto your_turn = [&] {
      if (kPingPong) asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - wg) : "memory");
    };
    if (wg == 1) your_turn();

    mbar_wait(q_full, 0);
#if UNIGIST_SM90_DQ_QREG
    load_a_frags<BM, KS>(qf, sQ, wg * 64 + warp * 16, lane);
#endif
    if (nblocks > 0) {
      my_turn();
      issue_sdp(0);
      your_turn();
      wgmma_wait<0>();
      reg_fence(s);
      reg_fence(dp);
      compute_p(0);
      compute_ds();
      pack_ds();
      for (int it = 1; it < nblocks; ++it) {
        my_turn();
        issue_sdp(it);
        issue_dq(it - 1);
        your_turn();
        if (kSplit) {
          wgmma_wait<2>();  // S of block it; its dP and dQ of block it - 1 still running
          reg_fence(s);
          compute_p(it);
          wgmma_wait<1>();  // dP of block it
          reg_fence(s);
          reg_fence(dp);
        } else {
          wgmma_wait<1>();  // S, dP of block it; dQ of block it - 1 still running
          reg_fence(s);
          reg_fence(dp);
          compute_p(it);
        }
        compute_ds();
        wgmma_wait<0>();
        reg_fence(dq);
        reg_fence(s);  // keeps the packing below after the wait: the dQ GEMM reads the old dS
        bars.release(it - 1, lane);
        pack_ds();
      }
      my_turn();
      issue_dq(nblocks - 1);
      if (wg == 0) your_turn();
      wgmma_wait<0>();
      reg_fence(dq);
      bars.release(nblocks - 1, lane);
    }

    // Epilogue: dQ * softmax_scale through the warp's own rows of sQ (only
    // this warpgroup's GEMMs read them, and those have completed).
    const float scale2[2] = {p.scale, p.scale};
    store_rows_via_smem<BM>(sQ, dq, scale2, static_cast<T*>(p.dq) + row_off, wg * 64 + warp * 16, rows_here, lane);
  }
#endif
}

template <typename T, int D>
void launch_bwd_dq_sm90_t(AttnParams p, cudaStream_t stream) {
  using C = Sm90Dq<D>;
  auto kernel = gist_attn_bwd_dq_sm90_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
  // Query tiles along x: the resident CTAs then share a few heads' K/V and gist
  // rows in L2 (the forward measured 53% -> 92% L2 hits with this order).
  p.head_fast = 0;
  const dim3 grid = grid_of(p, (p.Nq + C::BM - 1) / C::BM);
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd_dq_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  if (head_dim == 64) {
    bf16 ? launch_bwd_dq_sm90_t<__nv_bfloat16, 64>(p, stream) : launch_bwd_dq_sm90_t<__half, 64>(p, stream);
  } else {
    bf16 ? launch_bwd_dq_sm90_t<__nv_bfloat16, 128>(p, stream) : launch_bwd_dq_sm90_t<__half, 128>(p, stream);
  }
}

}  // namespace cuda_detail
}  // namespace unigist
