// dQ of the gist attention backward for Hopper (sm_90a): computes exactly what
// gist_attn_bwd_dq_kernel (bwd_sm80.cu) computes, with the three GEMMs on
// warpgroup MMA. Per key block of a query tile:
//   S = Q K^T                               (wgmma RS: Q fragments loaded into
//                                            registers once, K K-major)
//   dP = dO V^T                             (wgmma SS, V K-major)
//   P = exp2(S * scale_log2 - lse * log2e)  (masked entries 0)
//   dS = P * (dP - delta)                   (registers)
//   dQ += dS K                              (wgmma RS, K read MN-major)
// The skeleton is the wgmma forward's (fwd_sm90.cu, skeleton.cuh): a producer
// warpgroup gathers Q and dO once and K/V per block into a ring completing on
// mbarriers, two (three at D=64, see Sm90Dq) consumer warpgroups own 64 query
// rows each.
//
// BN = 64 keys per block: the S, dP and dQ accumulators (32 + 32 + 64 fp32 at
// D = 128) plus dS packed for the RS GEMM (16) and the Q fragments (32) fit the
// 232 consumer registers; BN = 128 would need 240 for the accumulators alone.
//
// A 128-row tile is fine although the dK/dV kernels partition queries in 64-row
// tiles: dQ of a row sums over all its visible keys, and tile_visit of any tile
// visits each of them once for every row of the tile.
#include <c10/cuda/CUDAException.h>

#include "cuda/dispatch.cuh"
#include "cuda/key_visit.cuh"
#include "cuda/launch.h"
#include "cuda/params.cuh"
#include "cuda/softmax.cuh"
#include "cuda/sm90/skeleton.cuh"

namespace unigist {
namespace cuda_detail {

// Measured and left out (benchmarks/experiments/, dQ kernel ms at 32k, H=32,
// D=128, bf16, r=4 / r=8 on H100): S and dP as one wgmma group instead of two
// (sm90_dq_one_group.patch) 8.44 / 6.22 against 8.24 / 6.05; the consumers'
// named-barrier ping-pong (sm90_pingpong.patch) 8.52 / 6.27; S = Q K^T with Q
// from shared memory (SS, sm90_dq_q_smem.patch): +7% at 32k r=4 (NOTES v10).
// Q in registers halves the shared-memory reads of the S GEMM: at BN = 64 an
// SS m64n64k16 reads 4 KB of shared memory per 32 tensor-core cycles, the SM's
// whole shared-memory bandwidth. It costs 32 consumer registers at D = 128.
// CONSUMERS = 3 (BM = 192) only at D=64, for the forward's reason (fwd_sm90.cu):
// the exp2 of P costs as much as at D=128 while the three GEMMs halve. 160
// registers hold D=64's S, dP, dQ (32 each), dS (16) and Q (16).
template <int D, int CONSUMERS>
struct Sm90Dq {
  static_assert(CONSUMERS == 2 || (CONSUMERS == 3 && D == 64), "3 consumers only at D=64 (registers)");
  static constexpr int BM = 64 * CONSUMERS;
  static constexpr int BN = 64;
  // Q + dO take 64 KB at D = 128; 4 stages of K + V (32 KB each) fill most of
  // the rest. One CTA per SM either way (registers).
  static constexpr int STAGES = 4;
  static constexpr int THREADS = sm90::threads_for(CONSUMERS);
  static constexpr int Q_BYTES = BM * D * 2;
  static constexpr int KV_BYTES = BN * D * 2;
  static constexpr int NBARS = 1 + 3 * STAGES;
  static constexpr int SMEM = 1024 + 2 * Q_BYTES + 2 * STAGES * KV_BYTES + 8 * NBARS;
  static constexpr int PRODUCER_REGS = CONSUMERS == 2 ? 40 : 32;
  static constexpr int CONSUMER_REGS = CONSUMERS == 2 ? 232 : 160;
  static_assert(128 * PRODUCER_REGS + 128 * CONSUMERS * CONSUMER_REGS <= 65536, "register budget");
  static_assert(SMEM <= 227 * 1024, "shared memory");
};

template <typename T, int D, int CONSUMERS>
__global__ void __launch_bounds__(sm90::threads_for(CONSUMERS), 1)
    gist_attn_bwd_dq_sm90_kernel(const AttnParams p, const __grid_constant__ KvTensorMaps maps) {
  using namespace sm90;
  using C = Sm90Dq<D, CONSUMERS>;
  constexpr int BM = C::BM, BN = C::BN, STAGES = C::STAGES;
  constexpr int NT = BN / 8;  // key tiles of S and dP
  constexpr int DT = D / 8;   // 16-byte chunks per row, d tiles of dQ
  constexpr int KS = D / 16;  // k16 steps of Q K^T and dO V^T
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  SmemCarver smem(smem_raw);
  unsigned char* sQ = smem.take(C::Q_BYTES);
  unsigned char* sdO = smem.take(C::Q_BYTES);
  unsigned char* sK = smem.take(STAGES * C::KV_BYTES);
  unsigned char* sV = smem.take(STAGES * C::KV_BYTES);
  const RingBarriers<STAGES, CONSUMERS> bars{smem_u32(smem.next), maps.on ? 1 : 128};
  const uint32_t q_full = bars.once();

  const QueryTile qt(p, BM, BN);
  const int q_lo = qt.q_lo, q_hi = qt.q_hi, rows_here = qt.rows_here, nblocks = qt.nblocks;
  const KeyBlocks& kb = qt.kb;
  const Layout32 l = p.l;
  const int64_t row_off = qt.b * p.dq_sb + qt.h * p.dq_sh + static_cast<int64_t>(qt.m0) * p.dq_sn;  // in dq

  auto producer = [&] {
    const int t = threadIdx.x;  // 0..127
    const T* qg = static_cast<const T*>(p.q) + qt.q_off;
    const T* dog = static_cast<const T*>(p.dout) + qt.do_off;
    const T* kg = static_cast<const T*>(p.k) + qt.k_off;
    const T* vg = static_cast<const T*>(p.v) + qt.v_off;
    // Rows past the tile are zero-filled: their S, dP and dS stay finite and
    // they are never written back.
    gather_rows<BM, D>(sQ, qg, 0, 1, p.q_sn, rows_here, t);
    gather_rows<BM, D>(sdO, dog, 0, 1, p.do_sn, rows_here, t);
    cp_async_arrive(q_full);
    // As the forward's; zero-filled rows past a block's end also make the dS K
    // GEMM multiply a zero dS by a zero K row, never by garbage. Through TMA
    // those rows are real keys (or zeros past the tensor): finite K and V, so
    // their masked dS is exactly 0 as well.
    if (maps.on) {
      if (t == 0) produce_kv_blocks_tma<BN, D>(bars, kb, nblocks, maps, qt.h / p.group, qt.b, sK, sV);
      cp_async_wait<0>();
      return;
    }
    produce_kv_blocks<BN, D>(bars, kb, nblocks, l, kg, vg, p.kv_sn, sK, sV, t);
  };

  auto consumer = [&](int wg, int warp, int lane) {
    const int r0 = wg * 64 + warp * 16 + lane / 4;  // tile row of s[.][0..1]; +8 for [2..3]
    const uint32_t do_addr = smem_u32(sdO) + wg * 64 * 128;
    const uint32_t k_addr = smem_u32(sK), v_addr = smem_u32(sV);

    float lse2[2], dlt[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) qt.row_stats(p, r0 + hr * 8, lse2[hr], dlt[hr]);

    float dq[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    float s[NT][4], dp[NT][4];
    uint32_t dsf[BN / 16][4];
    uint32_t qf[KS][4];

    // S and dP of block it as two commit groups: P = exp2(...) of block it
    // runs while its dP GEMM (and the dQ GEMM of block it - 1) are in flight.
    auto issue_sdp = [&](int it) {
      const int st = it % STAGES;
      bars.wait_full0(it);
      fence_proxy_async();
      wgmma_fence();
      wgmma_rs_kmajor<KS, BN>(s, qf, k_addr + st * C::KV_BYTES, T{});
      wgmma_commit();
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
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = exp2f(fmaf(s[j][e], p.scale_log2, -lse2[e >> 1]));
      if (need_mask) {
        const int qpos[2] = {q_lo + r0, q_lo + r0 + 8};
        fragment_visibility<NT>(l, kind, first, end, qpos, lane, [&](int j, int e, bool ok) {
          if (!ok) s[j][e] = 0.f;
        });
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

    const ConsumerTurns<CONSUMERS> turns{wg, p.pingpong != 0};
    mbar_wait(q_full, 0);
    load_a_frags<BM, KS>(qf, sQ, wg * 64 + warp * 16, lane);
    if (nblocks > 0) {
      turns.begin();
      turns.wait();
      issue_sdp(0);
      turns.pass();
      wgmma_wait<0>();
      reg_fence(s);
      reg_fence(dp);
      compute_p(0);
      compute_ds();
      pack_ds();
      for (int it = 1; it < nblocks; ++it) {
        turns.wait();
        issue_sdp(it);
        issue_dq(it - 1);
        turns.pass();
        wgmma_wait<2>();  // S of block it; its dP and dQ of block it - 1 still running
        reg_fence(s);
        compute_p(it);
        wgmma_wait<1>();  // dP of block it
        reg_fence(s);
        reg_fence(dp);
        compute_ds();
        wgmma_wait<0>();
        reg_fence(dq);
        reg_fence(s);  // keeps the packing below after the wait: the dQ GEMM reads the old dS
        bars.release(it - 1, lane);
        pack_ds();
      }
      turns.wait();
      issue_dq(nblocks - 1);
      turns.pass_last();
      wgmma_wait<0>();
      reg_fence(dq);
      bars.release(nblocks - 1, lane);
    }

    // Epilogue: dQ * softmax_scale through the warp's own rows of sQ (only
    // this warpgroup's GEMMs read them, and those have completed).
    const float scale2[2] = {p.scale, p.scale};
    store_rows_via_smem<BM>(sQ, dq, scale2, static_cast<T*>(p.dq) + row_off, p.dq_sn, wg * 64 + warp * 16, rows_here,
                            lane);
  };

  warp_specialize<C::PRODUCER_REGS, C::CONSUMER_REGS>(bars, producer, consumer);
}

template <typename T, int D, int CONSUMERS>
void launch_bwd_dq_sm90_t(AttnParams p, cudaStream_t stream) {
  using C = Sm90Dq<D, CONSUMERS>;
  auto kernel = gist_attn_bwd_dq_sm90_kernel<T, D, CONSUMERS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
  // Query tiles along x: the resident CTAs then share a few heads' K/V and gist
  // rows in L2 (the forward measured 53% -> 92% L2 hits with this order).
  p.head_fast = 0;
  const dim3 grid = grid_of(p, (p.Nq + C::BM - 1) / C::BM);
  KvTensorMaps maps;
  make_kv_tensor_maps(p, std::is_same<T, __nv_bfloat16>::value, D, C::BN, maps);
  p.pingpong = sm90_pingpong("dq");
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p, maps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd_dq_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  // 3 consumers at D=64 unless UNIGIST_SM90_DQ_CONSUMERS=2 (read on every call; for
  // A/B runs): the dQ kernel 1.3% (4k) to 2.2% (8k) of fwd+bwd faster (NOTES.md, 2026-12-03).
  const bool three = !env_is("UNIGIST_SM90_DQ_CONSUMERS", "2");
  UNIGIST_DISPATCH(bf16, head_dim, [&] {
    if constexpr (kHeadDim == 64) {
      if (three) return launch_bwd_dq_sm90_t<T, kHeadDim, 3>(p, stream);
    }
    launch_bwd_dq_sm90_t<T, kHeadDim, 2>(p, stream);
  });
}

}  // namespace cuda_detail
}  // namespace unigist
