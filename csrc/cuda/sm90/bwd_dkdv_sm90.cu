// dK/dV of the gist attention backward for Hopper (sm_90a): computes exactly
// what the two launches of gist_attn_bwd_dkdv_kernel (bwd_sm80.cu) compute,
// with the four GEMMs on warpgroup MMA (FlashAttention-3's backward without its
// dQ, which has its own kernel). Same two passes and the same pair partition:
//   gist pass (gist_pass 1, launched first): blocks of BN packed gists (gist g
//     at position g * (ratio + 1) + ratio); query tiles whose gist part holds
//     them (q_lo >= position + window); writes the gist rows' fp32 partials.
//   dense pass (gist_pass 0): aligned blocks of BN keys; query tiles whose
//     dense part (layout::in_dense_part) holds some of the block's pairs;
//     starts the gist rows' accumulators from the partials
//     (load_gist_partials) and writes every key row of the block
//     (store_dkdv_rows: dk / dv directly at group 1, else dk_acc / dv_acc).
// A query step is one 64-row query tile of the forward partition (kQTile,
// tile t starts at q_offset + 64 t), so every pair is assigned to the same
// pass, with the same per-element test, as in the mma.sync kernel.
//
// CTA = 3 warpgroups (warp-specialized as the wgmma forward / dQ), looping over
// key blocks when persistent (the default; see the kernel):
//   * warpgroup 0 (producer) gathers a block's K and V once (constant-stride
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

#include <algorithm>
#include <climits>
#include <cstdlib>

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
  // The ring's, then kv_empty, sched_full[2], sched_empty[2] (persistent loop).
  static constexpr int NBARS = 1 + 3 * STAGES + 5;
  static constexpr int SMEM = 1024 + 2 * KV_BYTES + 2 * STAGES * Q_BYTES + 2 * STAGES * BQ * 4 + 16 + 8 * NBARS;
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

// The work item `item` of a pass (a block of BN keys of one (batch, head), in
// the order of item_block) and the query steps it visits.
struct DkdvItem {
  int b, h, bh;
  DkdvKeys keys;
  int wb[2], we[2];          // steps of each consumer's 64 keys (empty: wb >= we)
  int st_begin, st_end, n_it;  // the smallest step range holding both
  __device__ __forceinline__ DkdvItem(const AttnParams& p, int gist_pass, int item, int n_items, int bn,
                                      int n_steps, int order)
      : keys(p, gist_pass, item_block(p, gist_pass, item, n_items, bn, order, bh), bn) {
    b = bh / p.Hq;
    h = bh % p.Hq;
    st_begin = n_steps;
    st_end = 0;
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const int nv = min(64, keys.end - keys.first - 64 * w);
      wb[w] = we[w] = 0;
      if (nv > 0)
        dkdv_step_range(keys.l, gist_pass, keys.pos(64 * w), keys.pos(64 * w + nv - 1), p.q_offset, n_steps, wb[w],
                        we[w]);
      if (we[w] > wb[w]) {
        st_begin = min(st_begin, wb[w]);
        st_end = max(st_end, we[w]);
      }
    }
    if (st_end <= st_begin) st_begin = st_end = 0;
    n_it = st_end - st_begin;
  }
  // Iteration it visits step step_of(it): first to last (dense), last to first (gist).
  __device__ __forceinline__ int step_of(int it) const { return keys.gist_pass ? st_end - 1 - it : st_begin + it; }
  // The block of `item` (and its bh). order 0: heads fastest. order 1, dense
  // pass: the blocks holding sinks (which see every later query) heads fastest
  // first, then each head's other blocks in order, so the blocks resident
  // together are neighbours that read mostly the same query steps. Measured
  // alone it changed nothing (NOTES v16); it is the order the persistent
  // kernel was measured and verified with.
  static __device__ __forceinline__ int item_block(const AttnParams& p, int gist_pass, int item, int n_items, int bn,
                                                   int order, int& bh) {
    const int heads = p.B * p.Hq;
    const int n_long = min(p.l.num_sink, p.Nk) > 0 ? (min(p.l.num_sink, p.Nk) + bn - 1) / bn : 0;
    if (order == 0 || gist_pass || item < heads * n_long) {
      bh = item % heads;
      return item / heads;
    }
    const int rest = n_items / heads - n_long, i = item - heads * n_long;
    bh = i / rest;
    return n_long + i % rest;
  }
};

// Persistent (p.work_counter set): a CTA per SM takes items in order from a
// counter (the first from blockIdx.x), and the producer loads the next item's K
// and V as soon as both consumers' last K^T / V^T GEMMs are done, so the load
// overlaps their last dV / dK GEMMs and the epilogue; its Q / dO steps stream
// through the same ring. Else one CTA per item (gridDim.x = items). Why: a
// window sweep (benchmarks/device/diag_cta_cost.py) put ~20 us per dense-pass
// item outside its ~2 us steps; persistent, the dense pass runs 7% faster at
// 32k w1024 (11% at w256) and the gist pass ~1% slower, 32k fwd+bwd 1.0-1.3%
// faster (NOTES v16): most of that cost is the consumers' own ramp and drain
// per block, not launch or loads.
template <typename T, int D>
__global__ void __launch_bounds__(384, 1)
    gist_attn_bwd_dkdv_sm90_kernel(const AttnParams p, const int gist_pass, const int n_items, const int order,
                                   const __grid_constant__ QdoTensorMaps maps) {
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
  volatile int* sched = reinterpret_cast<volatile int*>(smem.take(16));  // items, 2 slots
  // Through TMA, a stage's Q (dO) completes on thread 0's arrival with its
  // bytes plus the 128 cp.async arrivals that bring lse (delta).
  const RingBarriers<STAGES> bars{smem_u32(smem.next), maps.on ? 129 : 128};
  const uint32_t kv_full = bars.once();  // phase j: K, V of the CTA's j-th item
  const uint32_t kv_empty = bars.bar0 + 8 * (1 + 3 * STAGES);  // phase j: every consumer warp is done with them
  // Thread 0 takes the next item from the counter and hands it to every warp
  // (sm90::WorkQueue: its mbarriers follow kv_empty).
  WorkQueue queue{sched, kv_empty + 8, p.work_counter == nullptr ? nullptr : p.work_counter + gist_pass, 12};
  if (threadIdx.x == 0) {  // before warp_specialize's barrier init, fence and __syncthreads
    mbar_init(kv_empty, 8);
    queue.init();
  }
  auto q_full = [&](int st) { return bars.full0(st); };
  auto do_full = [&](int st) { return bars.full1(st); };
  auto fetch = [&](int j) { return queue.fetch(j, n_items); };

  const Layout32 l = p.l;
  const int n_steps = (p.Nq + BQ - 1) / BQ;

  auto producer = [&] {
    const int t = threadIdx.x;  // 0..127
    namespace tma = sm90_tma;
    if (maps.on && t == 0) {
      tma::prefetch(&maps.q);
      tma::prefetch(&maps.dout);
    }
    // A step's Q or dO through TMA: one box per 64-column slab, by thread 0.
    auto load_rows = [&](const CUtensorMap* map, unsigned char* dst, int t0, int h, int b, uint32_t bar) {
      tma::arrive_expect(bar, C::Q_BYTES);
#pragma unroll
      for (int slab = 0; slab < D / 64; ++slab)
        tma::load_4d(smem_u32(dst) + slab * BQ * 128, map, slab * 64, t0, h, b, bar);
    };
    int base = 0;  // ring uses by earlier items
    for (int j = 0;; ++j) {
      const int item = fetch(j);
      if (item < 0 || item >= n_items) break;
      const DkdvItem w(p, gist_pass, item, n_items, BN, n_steps, order);
      const int b = w.b, h = w.h;
      const int64_t qrow0 = static_cast<int64_t>(w.bh) * p.Nq;
      const int64_t k_off = b * p.k_sb + (h / p.group) * p.k_sh, v_off = b * p.v_sb + (h / p.group) * p.v_sh;
      // Zero-filled rows past the block's end: S^T = dP^T = 0 there (masked),
      // never written back.
      if (j > 0) mbar_wait(kv_empty, (j - 1) & 1);
      {
        const int64_t pos0 = gist_pass ? l.gist_position(w.keys.first) : w.keys.first;
        const int64_t stride = gist_pass ? l.ratio + 1 : 1;
        gather_rows<BN, D>(sK, static_cast<const T*>(p.k) + k_off, pos0, stride, p.kv_sn, w.keys.end - w.keys.first, t);
        gather_rows<BN, D>(sV, static_cast<const T*>(p.v) + v_off, pos0, stride, p.kv_sn, w.keys.end - w.keys.first, t);
        cp_async_arrive(kv_full);
      }
      const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
      const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
      // Rows past Nq: Q, dO, lse and delta zero-filled (finite S^T, dP^T, dS^T;
      // their P^T is masked).
      for (int it = 0; it < w.n_it; ++it) {
        const int g = base + it, st = g % STAGES;
        bars.wait_empty(g);
        const int t0 = w.step_of(it) * BQ;
        const int nrows = p.Nq - t0;
        if (!maps.on) {
          gather_rows<BQ, D>(sQ + st * C::Q_BYTES, qg, t0, 1, p.q_sn, nrows, t);
        } else if (t == 0) {
          load_rows(&maps.q, sQ + st * C::Q_BYTES, t0, h, b, q_full(st));
        }
        if (t < BQ) cp_async4(sL + st * BQ + t, p.lse + qrow0 + (t < nrows ? t0 + t : 0), t < nrows);
        cp_async_arrive(q_full(st));
        if (!maps.on) {
          gather_rows<BQ, D>(sdO + st * C::Q_BYTES, dog, t0, 1, p.do_sn, nrows, t);
        } else if (t == 0) {
          load_rows(&maps.dout, sdO + st * C::Q_BYTES, t0, h, b, do_full(st));
        }
        const int r = t - BQ;
        if (t >= BQ) cp_async4(sDl + st * BQ + r, p.delta + qrow0 + (r < nrows ? t0 + r : 0), r < nrows);
        cp_async_arrive(do_full(st));
      }
      base += w.n_it;
    }
    cp_async_wait<0>();
  };

  auto consumer = [&](int wg, int warp, int lane) {
    const int r0 = warp * 16 + lane / 4;  // key row (of the warpgroup's 64) of s[.][0..1]; +8 for [2..3]
    const uint32_t k_addr = smem_u32(sK) + wg * 64 * 128, v_addr = smem_u32(sV) + wg * 64 * 128;
    const uint32_t q_addr = smem_u32(sQ), do_addr = smem_u32(sdO);
    // The current item's: ring uses before it (`base`: iteration it is ring use
    // base + it), step range, this consumer's keys and rows.
    int base = 0, st_begin = 0, st_end = 0, nv = 0, kp_first = -1, kp_last = -1;
    int kp_row[2], last_q[2];
    auto step_of = [&](int it) { return gist_pass ? st_end - 1 - it : st_begin + it; };

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
      bars.wait_full0(base + it);
      bars.wait_full1(base + it);
      bars.release(base + it, lane);
    };
    // K's and V's descriptors are the same at every step, so the compiler
    // hoisted all 2 KS of them (64-bit each) out of the step loop and, short
    // of registers, spilled them: every S^T and dP^T GEMM waited on KS local
    // loads (ncu of the dense pass: R2UR on those loads, ~13% of the stall
    // samples; NOTES v19). An opaque copy of the base address per GEMM makes
    // them a few integer ops each instead (32k fwd+bwd -9.6%). D = 64 keeps
    // them hoisted: its step loop does not spill, so recomputing them would
    // only add instructions.
    auto kv_base = [](uint32_t addr) { return D > 64 ? opaque(addr) : addr; };
    auto issue_s = [&](int it) {
      const int st = (base + it) % STAGES;
      bars.wait_full0(base + it);
      fence_proxy_async();
      wgmma_fence();
      wgmma_ss_kmajor<KS, BN, BQ>(s, kv_base(k_addr), q_addr + st * C::Q_BYTES, T{});
      wgmma_commit();
    };
    auto issue_dp = [&](int it) {
      const int st = (base + it) % STAGES;
      bars.wait_full1(base + it);
      fence_proxy_async();
      wgmma_fence();
      wgmma_ss_kmajor<KS, BN, BQ>(dp, kv_base(v_addr), do_addr + st * C::Q_BYTES, T{});
      wgmma_commit();
    };
    // dV += P^T dO and dK += dS^T Q: the query rows of dO / Q are these GEMMs'
    // k dimension, so they are read MN-major like V in the forward's P V
    // (LBO = slab stride of the 64-row tile, 16 rows = 2048 bytes per k16).
    auto issue_dv = [&](int it) {
      const int st = (base + it) % STAGES;
      wgmma_fence();
      wgmma_rs_mnmajor<BQ / 16, BQ>(dv, af, do_addr + st * C::Q_BYTES, T{});
      wgmma_commit();
    };
    auto issue_dk = [&](int it) {
      const int st = (base + it) % STAGES;
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
    // P^T in place of S^T, selected (not multiplied) by the mask: an invisible
    // score may overflow exp2. Element (key row, query col) is counted iff the
    // mma.sync kernel counts it in this pass: lo <= col <= hi, the interval form
    // of its test (layout::dkdv_key_cols, checked against it in tests/cpp).
    auto compute_p = [&](int it) {
      const int st = (base + it) % STAGES;
      const int t0 = step_of(it) * BQ;
      const int q_lo = p.q_offset + t0;
      const float* cL = sL + st * BQ;
      // Most steps (all but a few at each block's ends, nearly all of the gist
      // pass) hold only pairs of the pass: no element test there.
      // P of element s[j][e]: its query column's lse sits in cL at the column.
      auto prob = [&](int j, int e) {
        const float2 lse = *reinterpret_cast<const float2*>(cL + j * 8 + 2 * (lane & 3));
        return exp2f(fmaf(s[j][e], p.scale_log2, -((e & 1) ? lse.y : lse.x) * kLog2e));
      };
      if (all_in(t0)) {
#pragma unroll
        for (int j = 0; j < NQ; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = prob(j, e);
        return;
      }
      int lo[2], hi[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        layout::dkdv_key_cols<int>(kp_row[hr], last_q[hr], gist_pass != 0, q_lo, min(BQ, p.Nq - t0), l, lo[hr], hi[hr]);
        if (kp_row[hr] < 0) hi[hr] = -1;
      }
#pragma unroll
      for (int j = 0; j < NQ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + 2 * (lane & 3) + (e & 1);
          const float pr = prob(j, e);
          s[j][e] = col >= lo[e >> 1] && col <= hi[e >> 1] ? pr : 0.f;
        }
      }
    };
    // dS^T in place of P^T (fp32).
    auto compute_ds = [&](int it) {
      const float* cD = sDl + ((base + it) % STAGES) * BQ;
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
    // Hands K and V back (one arrival per warp) once this consumer's GEMMs
    // that read them are done.
    auto release_kv = [&] {
      __syncwarp();
      if (lane == 0) mbar_arrive(kv_empty);
    };
    auto step = [&](int it, bool last) {
      wgmma_wait<1>();  // S^T of it
      reg_fence(s);
      compute_p(it);
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) pack_p<T>(af[kk], s, kk);
      issue_dv(it);
      wgmma_wait<1>();  // dP^T of it; its dV GEMM still running
      reg_fence(dp);
      reg_fence(s);
      if (last) release_kv();  // K^T and V^T GEMMs all done
      compute_ds(it);
      wgmma_wait<0>();  // the dV GEMM, which reads af
      reg_fence(af);
      reg_fence(s);
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) pack_p<T>(af[kk], s, kk);
      issue_dk(it);
    };

    for (int j = 0;; ++j) {
      const int item = fetch(j);
      if (item < 0 || item >= n_items) break;
      const DkdvItem w(p, gist_pass, item, n_items, BN, n_steps, order);
      st_begin = w.st_begin;
      st_end = w.st_end;
      const int n_it = w.n_it;
      kp_row[0] = w.keys.pos(wg * 64 + r0);
      kp_row[1] = w.keys.pos(wg * 64 + r0 + 8);
      // dk and dv are zero here (before the first item, and after each epilogue).
      if (!gist_pass) load_gist_partials<DT>(p, w.bh, kp_row, dk, dv, lane);
      // This consumer's keys and its active iterations [ia, ib) (a contiguous
      // part of the item's: the step ranges are nested). Outside them it only
      // waits for each stage and hands it back.
      nv = min(64, w.keys.end - w.keys.first - 64 * wg);
      kp_first = w.keys.pos(wg * 64);
      kp_last = nv > 0 ? w.keys.pos(wg * 64 + nv - 1) : -1;
      const int my_b = wg == 0 ? w.wb[0] : w.wb[1], my_e = wg == 0 ? w.we[0] : w.we[1];
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
      // Per key row, the part of the element test that does not depend on the
      // tile (layout::dkdv_key_last_query); slots past the block's end: none.
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) last_q[hr] = layout::dkdv_key_last_query<int>(kp_row[hr], l, 1 << 30);

      for (int it = 0; it < ia; ++it) skip(it);
      // Waited for even by a consumer with nothing to do: its kv_empty arrival
      // must come after the producer saw the previous item's phase complete.
      mbar_wait(kv_full, j & 1);
      if (ia < ib) {
        issue_s(ia);
        issue_dp(ia);
        step(ia, ia + 1 == ib);
        for (int it = ia + 1; it < ib; ++it) {
          // The S^T GEMM of it queues behind the dK GEMM of it - 1; dP^T is issued
          // once that dK GEMM (which reads af) is done: S^T, dP^T, dK and dV
          // accumulators and af all in flight at once would not fit in 240
          // registers (ptxas would serialize every wgmma).
          issue_s(it);
          wgmma_wait<1>();  // the dK GEMM of it - 1: stage it - 1 is no longer read
          reg_fence(af);
          bars.release(base + it - 1, lane);
          issue_dp(it);
          step(it, it + 1 == ib);
        }
        wgmma_wait<0>();
        reg_fence(dk);
        reg_fence(dv);
        bars.release(base + ib - 1, lane);
      } else {
        release_kv();
      }
      for (int it = ib; it < n_it; ++it) skip(it);

      // Epilogue: every key row of the block, zeros included (the dense pass
      // reads the gist pass's partials).
      store_dkdv_rows<T, DT>(p, w.bh, kp_row, dk, dv, lane, gist_pass != 0);
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
        dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
      }
      base += n_it;
    }
  };

  warp_specialize<C::PRODUCER_REGS, C::CONSUMER_REGS>(bars, producer, consumer);
}

int sm90_persistent_ctas() {
  if (const char* env = std::getenv("UNIGIST_SM90_PERSISTENT_GRID")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T, int D>
void launch_bwd_dkdv_sm90_t(AttnParams p, cudaStream_t stream) {
  using C = Sm90Dkdv<D>;
  auto kernel = gist_attn_bwd_dkdv_sm90_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM));
  QdoTensorMaps maps;
  make_qdo_tensor_maps(p, std::is_same<T, __nv_bfloat16>::value, D, C::BQ, maps);
  // The dense pass persistent, the gist pass a CTA per block: its blocks are
  // long (up to ~490 steps at 32k), the hardware's own block scheduling packs
  // them as well, and persistent it ran 0.8-1.9% slower (NOTES v16); a CTA per
  // gist block took 32k fwd+bwd 0.3-0.9% down, 4k-8k within +-0.7% (v17).
  const bool persistent = sm90_persistent("dense") && p.work_counter != nullptr;
  const bool persistent_gist = sm90_persistent("gist") && p.work_counter != nullptr;
  if (persistent || persistent_gist) C10_CUDA_CHECK(cudaMemsetAsync(p.work_counter, 0, 2 * sizeof(int), stream));
  const int64_t ctas = persistent || persistent_gist ? sm90_persistent_ctas() : 0;
  const int order = env_is("UNIGIST_SM90_DKDV_ORDER", "heads") ? 0 : 1;
  // Items heads-fastest: every head's heaviest blocks (the sink block of the
  // dense pass, the first gist blocks, which see almost every query) start first.
  auto launch = [&](int gist_pass, int64_t blocks) {
    const int64_t items = blocks * p.B * p.Hq;
    TORCH_CHECK(items < INT_MAX, "unigist: too many dK/dV blocks");
    AttnParams pass = p;
    if (!(gist_pass ? persistent_gist : persistent)) pass.work_counter = nullptr;
    const int64_t grid = pass.work_counter != nullptr ? std::min(items, ctas) : items;
    kernel<<<static_cast<unsigned>(grid), C::THREADS, C::SMEM, stream>>>(pass, gist_pass, static_cast<int>(items),
                                                                          order, maps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // The gist pass first: the dense pass starts from its partials.
  const int64_t gist_blocks = (p.n_gist_rows + C::BN - 1) / C::BN;
  if (gist_blocks > 0) launch(1, gist_blocks);
  launch(0, (p.Nk + C::BN - 1) / C::BN);
}

void launch_bwd_dkdv_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream) {
  UNIGIST_DISPATCH(bf16, head_dim, [&] { launch_bwd_dkdv_sm90_t<T, kHeadDim>(p, stream); });
}

}  // namespace cuda_detail
}  // namespace unigist
