// Gist attention forward for Hopper (sm_90a): the same key visit, masks and
// outputs as gist_attn_fwd_kernel (fwd_sm80.cu), with the two GEMMs on
// warpgroup MMA (wgmma) instead of mma.sync.
//
// CTA = 3 warpgroups, warp-specialized as in FlashAttention-3:
//   * warpgroup 0 (producer) gathers Q once with cp.async and loads the K/V
//     rows of each key block into a ring of STAGES buffers: by default one
//     thread issues TMA boxes (sm90/tma.cuh: gist rows, g * (ratio + 1) +
//     ratio, are consecutive rows of a second tensor map); with
//     UNIGIST_SM90_TMA=0, and over the compressed cache, all 128 threads
//     gather with cp.async at a constant per-thread stride. Either way the
//     copies complete on mbarriers, so no CTA-wide __syncthreads sits in the
//     loop.
//   * the consumer warpgroups own 64 query rows each (BM = 64 x consumers) and
//     run S = Q K^T (Q from registers with two consumers, from shared memory
//     with three; K from shared memory) and O += P V (P from registers, V read
//     MN-major), with the online softmax in registers (a
//     lazy running max: O is rescaled only when a row's max grows by more
//     than 2^8; the eager max, measured 2.4% slower, is
//     benchmarks/experiments/sm90_fwd_eager_max.patch). The
//     S GEMM of block j+1 and the P V GEMM of block j are in flight while
//     the softmax of block j+1 runs, and the consumers take turns issuing
//     their GEMMs (sm90::ConsumerTurns, FlashAttention-3's ping-pong), so one's
//     softmax runs under the others' GEMMs: 2-3% faster at 4k-8k than free
//     drift, 32k unchanged (NOTES v18; UNIGIST_SM90_PINGPONG=0 turns it off).
// The same kernel runs gist_attention_cache_fwd's prefill chunks over the
// compressed-cache key layout (kCache: CacheBlocks instead of KeyBlocks).
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

// CONSUMERS = 2 or 3 consumer warpgroups. At D=64 a key block's two GEMMs are
// half as long as at D=128 while its softmax (one exp2 per score on the SFU,
// 16 per clock per SM) is as long, so a third consumer (BM = 192, as
// FlashAttention-3's hdim-64 tile) was to keep the tensor cores fed while two
// are in their softmax. Measured (NOTES v12): 4.8% faster at N=8k, 1.2% slower
// at 4k; the default at D=64. Its registers, 160 per consumer thread, hold
// D=64's O (32), S (64) and P (32); D=128's do not fit.
template <int D, int CONSUMERS>
struct Sm90Fwd {
  static_assert(CONSUMERS == 2 || (CONSUMERS == 3 && D == 64), "3 consumers only at D=64 (registers)");
  static constexpr int BM = 64 * CONSUMERS;
  static constexpr int BN = 128;  // keys per block
  // K/V ring depth, 3 stages: with Q 225 KB at D=128 (of 227 KB), one CTA per
  // SM; measured 2.5-4.6% faster than 2 stages (benchmarks/NOTES.md v6).
  static constexpr int STAGES = 3;
  static constexpr int THREADS = sm90::threads_for(CONSUMERS);
  static constexpr int Q_BYTES = BM * D * 2;
  static constexpr int KV_BYTES = BN * D * 2;
  static constexpr int NBARS = 1 + 3 * STAGES;
  // + 1024: the dynamic smem base is rounded up to the 1024-byte alignment
  // of the swizzle atoms.
  static constexpr int SMEM = 1024 + Q_BYTES + 2 * STAGES * KV_BYTES + 8 * NBARS;
  static constexpr int PRODUCER_REGS = CONSUMERS == 2 ? 56 : 32;
  static constexpr int CONSUMER_REGS = CONSUMERS == 2 ? 224 : 160;
  static_assert(128 * PRODUCER_REGS + 128 * CONSUMERS * CONSUMER_REGS <= 65536, "register budget");
  static_assert(SMEM <= 227 * 1024, "shared memory");
};

template <bool first, typename A, typename B>
__device__ __forceinline__ const auto& pick(const A& a, const B& b) {
  if constexpr (first) {
    return a;
  } else {
    return b;
  }
}

// kCache: keys in the compressed-cache layout (CacheBlocks; gist_attention_cache_fwd),
// else the interleaved layout (KeyBlocks).
template <typename T, int D, int CONSUMERS, bool kCache>
__global__ void __launch_bounds__(sm90::threads_for(CONSUMERS), 1)
    gist_attn_fwd_sm90_kernel(const AttnParams p, const __grid_constant__ KvTensorMaps maps) {
  using namespace sm90;
  using C = Sm90Fwd<D, CONSUMERS>;
  constexpr int BM = C::BM, BN = C::BN, STAGES = C::STAGES;
  constexpr int NT = BN / 8;  // key tiles of S
  constexpr int DT = D / 8;   // 16-byte chunks per row, d tiles of O
  constexpr int KS = D / 16;  // k16 steps of Q K^T
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  SmemCarver smem(smem_raw);
  unsigned char* sQ = smem.take(C::Q_BYTES);
  unsigned char* sK = smem.take(STAGES * C::KV_BYTES);
  unsigned char* sV = smem.take(STAGES * C::KV_BYTES);
  const bool tma = !kCache && maps.on;
  const RingBarriers<STAGES, CONSUMERS> bars{smem_u32(smem.next), tma ? 1 : 128};
  const uint32_t q_full = bars.once();

  const QueryTile qt(p, BM, BN);
  const int q_lo = qt.q_lo, q_hi = qt.q_hi, rows_here = qt.rows_here;
  const Layout32 l = p.l;
  CacheBlocks cache_kb;
  if constexpr (kCache) cache_kb.init(p.cached, p.tail_start, p.tail_end, l, q_lo, q_hi, BN);
  const auto& kb = pick<kCache>(cache_kb, qt.kb);
  const int nblocks = kCache ? cache_kb.total() : qt.nblocks;

  auto producer = [&] {
    const int t = threadIdx.x;  // 0..127
    const T* qg = static_cast<const T*>(p.q) + qt.q_off;
    const T* kg = static_cast<const T*>(p.k) + qt.k_off;
    const T* vg = static_cast<const T*>(p.v) + qt.v_off;
    gather_rows<BM, D>(sQ, qg, 0, 1, p.q_sn, rows_here, t);
    cp_async_arrive(q_full);
    if constexpr (!kCache) {
      if (tma) {
        if (t == 0) produce_kv_blocks_tma<BN, D>(bars, qt.kb, nblocks, maps, qt.h / p.group, qt.b, sK, sV);
        cp_async_wait<0>();
        return;
      }
    }
    produce_kv_blocks<BN, D>(bars, kb, nblocks, l, kg, vg, p.kv_sn, sK, sV, t);
  };

  auto consumer = [&](int wg, int warp, int lane) {
    const int r0 = wg * 64 + warp * 16 + lane / 4;  // tile row of s[.][0..1]; +8 for [2..3]
    const uint32_t q_addr = smem_u32(sQ) + wg * 64 * 128;
    const uint32_t k_addr = smem_u32(sK), v_addr = smem_u32(sV);

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float s[NT][4];
    uint32_t pf[BN / 16][4];
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};

    // Q as the S GEMM's A operand from registers (RS) rather than shared memory
    // (SS): a third less shared-memory reading per S GEMM (the SS m64n128k16 reads
    // 6 KB per 64 tensor-core cycles, with P V's 4 KB and the TMA writes ~85% of
    // the SM's 128 B/clock): 32k forward 2% faster (NOTES v18). Its 32 registers
    // do not fit beside three consumers' 160 (ptxas serializes every wgmma).
    constexpr bool kQRegs = CONSUMERS == 2;
    uint32_t qf[kQRegs ? KS : 1][4];
    auto issue_qk = [&](int it) {
      const int st = it % STAGES;
      bars.wait_full0(it);
      fence_proxy_async();
      wgmma_fence();
      if constexpr (kQRegs) {
        wgmma_rs_kmajor<KS, BN>(s, qf, k_addr + st * C::KV_BYTES, T{});
      } else {
        wgmma_ss_kmajor<KS, BM, BN>(s, q_addr, k_addr + st * C::KV_BYTES, T{});
      }
      wgmma_commit();
    };
    auto issue_pv = [&](int it) {
      const int st = it % STAGES;
      bars.wait_full1(it);
      fence_proxy_async();
      wgmma_fence();
      wgmma_rs_mnmajor<BN / 16, BN>(o, pf, v_addr + st * C::KV_BYTES, T{});
      wgmma_commit();
    };
    // Returns whether the output must be scaled by alpha (lazy max: only when
    // some row's max moved).
    auto softmax = [&](int it, float (&alpha)[2]) -> bool {
      const float scale = prescale_unless_positive(s, p.scale_log2);
      int kind, first, end;
      kb.block(it, BN, kind, first, end);
      kind = kb.mask_kind(kind);
      if (block_needs_mask(l, kind, first, end, BN, q_lo, q_hi)) mask_fragment(s, l, kind, first, end, q_lo + r0, lane);
      return online_softmax_lazy(s, scale, m_r, l_r, alpha);
    };
    auto pack_all = [&] {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) pack_p<T>(pf[kk], s, kk);
    };

    const ConsumerTurns<CONSUMERS> turns{wg, p.pingpong != 0};
    mbar_wait(q_full, 0);
    if constexpr (kQRegs) load_a_frags<BM, KS>(qf, sQ, wg * 64 + warp * 16, lane);
    if (nblocks > 0) {
      float alpha[2];
      turns.begin();
      turns.wait();
      issue_qk(0);
      turns.pass();
      wgmma_wait<0>();
      reg_fence(s);
      softmax(0, alpha);  // O is still zero: alpha not needed
      pack_all();
      for (int it = 1; it < nblocks; ++it) {
        turns.wait();
        issue_qk(it);
        issue_pv(it - 1);
        turns.pass();
        wgmma_wait<1>();  // S of block it; P V of block it - 1 still running
        reg_fence(s);
        const bool rescale = softmax(it, alpha);
        wgmma_wait<0>();
        reg_fence(o);
        reg_fence(s);  // keeps the P packing below after the wait: P V reads the old P
        bars.release(it - 1, lane);
        if (rescale) scale_rows(o, alpha);
        pack_all();
      }
      turns.wait();
      issue_pv(nblocks - 1);
      turns.pass_last();
      wgmma_wait<0>();
      reg_fence(o);
      bars.release(nblocks - 1, lane);
    }

    // Epilogue: lse, then O normalized, through the warp's own rows of sQ.
    float inv[2], lse[2];
    finish_rows(l_r, m_r, inv, lse);
    store_lse_rows(p, qt.row0, lse, r0, rows_here, lane);
    store_rows_via_smem<BM>(sQ, o, inv, static_cast<T*>(p.o) + qt.row0 * D, D, wg * 64 + warp * 16, rows_here, lane);
  };

  warp_specialize<C::PRODUCER_REGS, C::CONSUMER_REGS>(bars, producer, consumer);
}

template <typename T, int D, int CONSUMERS, bool kCache>
void launch_fwd_sm90_t(const AttnParams& p, cudaStream_t stream) {
  using C = Sm90Fwd<D, CONSUMERS>;
  auto kernel = gist_attn_fwd_sm90_kernel<T, D, CONSUMERS, kCache>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
  const dim3 grid = grid_of(p, (p.Nq + C::BM - 1) / C::BM);
  KvTensorMaps maps;
  maps.on = 0;
  if constexpr (!kCache) make_kv_tensor_maps(p, std::is_same<T, __nv_bfloat16>::value, D, C::BN, maps);
  AttnParams pk = p;
  pk.pingpong = sm90_pingpong("fwd");
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(pk, maps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kCache>
void launch_fwd_sm90_any(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  const bool three = fwd_sm90_rows(head_dim) == 192;
  UNIGIST_DISPATCH(bf16, head_dim, [&] {
    if constexpr (kHeadDim == 64) {
      if (three) return launch_fwd_sm90_t<T, kHeadDim, 3, kCache>(p, stream);
    }
    launch_fwd_sm90_t<T, kHeadDim, 2, kCache>(p, stream);
  });
}

int fwd_sm90_rows(int head_dim) {
  // 3 consumers at D=64 unless UNIGIST_SM90_FWD_CONSUMERS=2 (read on every call, as
  // UNIGIST_FORCE_SM80; for A/B runs): H200, 32/8 heads, HF layout, forward 4.8% faster
  // at N=8k, 1.2% slower at 4k (benchmarks/NOTES.md, 2026-12-03).
  return head_dim == 64 && !env_is("UNIGIST_SM90_FWD_CONSUMERS", "2") ? 192 : 128;
}

void launch_fwd_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  launch_fwd_sm90_any<false>(p, bf16, head_dim, stream);
}

void launch_cache_fwd_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  launch_fwd_sm90_any<true>(p, bf16, head_dim, stream);
}

}  // namespace cuda_detail
}  // namespace unigist
