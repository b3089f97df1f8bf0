// Gist attention backward on CUDA, without atomics:
//   1. delta = rowsum(dout * out)                          (small kernel)
//   2. dQ: query-tile outer, the same three key ranges as the forward
//      (sinks, packed gists, local window)                  -> dq
//      On Hopper (use_sm90) the wgmma kernel of sm90/bwd_dq_sm90.cu
//      (128-row tiles) runs instead of gist_attn_bwd_dq_kernel.
//   3. dK/dV gist pass: blocks of 64 packed gists past the sinks (gist g at
//      position g*(ratio+1)+ratio); loops over the query tiles whose gist part
//      holds them (q_lo >= position + window); writes fp32 per-query-head
//      partials of those gist rows (dk_gist / dv_gist, packed by gist index).
//   4. dK/dV dense pass (same stream, after 3): key-block outer over aligned
//      blocks of 64 keys; loops over the query tiles whose dense part
//      (layout::in_dense_part) holds some of its pairs; starts the gist rows'
//      accumulators from their partials and writes every key: dk / dv in the
//      input dtype when each key head has one query head, else fp32
//      per-query-head dK/dV.
//      On Hopper (use_sm90) 3. and 4. are the wgmma kernel of
//      sm90/bwd_dkdv_sm90.cu (128-key blocks, same pair partition).
//   5. GQA only: sum the fp32 dK/dV over each group, convert to the input dtype.
// Query tiles are the forward's: 64 rows, tile t starting at position
// q_offset + 64 t, so each (query, key) pair is counted once, in the same
// part (dense or gist) by the dQ and the dK/dV kernels.
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <type_traits>

#include "cuda/dispatch.cuh"
#include "cuda/epilogue.cuh"
#include "cuda/key_visit.cuh"
#include "cuda/launch.h"
#include "cuda/params.cuh"
#include "cuda/ptx.cuh"
#include "cuda/softmax.cuh"

namespace unigist {
namespace cuda_detail {

constexpr int kBwdThreads = 128;
constexpr int kQTile = 64;  // query tile (must equal the partition used by both passes)
constexpr int kKBlock = 64; // keys per block (4 warps x 16)

// ---------------------------------------------------------------------------
// 1. delta[row] = sum_d dout[row, d] * out[row, d]; one warp per row (row =
// (b * Hq + h) * Nq + n; out contiguous, dout through its strides).
template <typename T, int D>
__global__ void __launch_bounds__(256) delta_kernel(const AttnParams p, int64_t rows) {
  using TT = TypeTraits<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int64_t bh = row / p.Nq, n = row % p.Nq;
  const int64_t dout_off = (bh / p.Hq) * p.do_sb + (bh % p.Hq) * p.do_sh + n * p.do_sn;
  const uint32_t* o = reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.out) + row * D);
  const uint32_t* g = reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.dout) + dout_off);
  float acc = 0.f;
#pragma unroll
  for (int i = lane; i < D / 2; i += 32) {
    const float2 a = TT::unpack(o[i]), b = TT::unpack(g[i]);
    acc += a.x * b.x + a.y * b.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) const_cast<float*>(p.delta)[row] = acc;
}

// ---------------------------------------------------------------------------
// 2. dQ kernel. Same key visit as the forward.
template <int D>
constexpr int dq_smem_bytes() {
  return (2 * kQTile * D + 4 * kKBlock * D) * 2;  // Q, dO + 2 stages of K and V
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) gist_attn_bwd_dq_kernel(const AttnParams p) {
  using TT = TypeTraits<T>;
  constexpr int BM = kQTile, BN = kKBlock;
  constexpr int NT = BN / 8, DT = D / 8, KS = D / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * D;
  T* sK = sdO + BM * D;
  T* sV = sK + 2 * BN * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QueryTile qt(p, BM, BN);
  const int q_lo = qt.q_lo, q_hi = qt.q_hi, rows_here = qt.rows_here, nblocks = qt.nblocks;
  const KeyBlocks& kb = qt.kb;
  const Layout32 l = p.l;
  const int64_t row_off = qt.b * p.dq_sb + qt.h * p.dq_sh + static_cast<int64_t>(qt.m0) * p.dq_sn;  // in dq
  const T* qg = static_cast<const T*>(p.q) + qt.q_off;
  const T* dog = static_cast<const T*>(p.dout) + qt.do_off;
  const T* kg = static_cast<const T*>(p.k) + qt.k_off;
  const T* vg = static_cast<const T*>(p.v) + qt.v_off;

  auto qrow = [&](const T* base, int64_t ld) {
    return [=](int r) -> const T* { return r < rows_here ? base + r * ld : nullptr; };
  };
  load_rows<BM, D, kBwdThreads>(sQ, qrow(qg, p.q_sn), qg);
  load_rows<BM, D, kBwdThreads>(sdO, qrow(dog, p.do_sn), dog);
  cp_async_commit();

  auto load_kv = [&](int it, int stage) {
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    load_rows<BN, D, kBwdThreads>(
        sK + stage * BN * D,
        [&](int r) -> const T* {
          const int j = key_position(l, kind, first, end, r);
          return j >= 0 ? kg + static_cast<int64_t>(j) * p.kv_sn : nullptr;
        },
        kg);
    load_rows<BN, D, kBwdThreads>(
        sV + stage * BN * D,
        [&](int r) -> const T* {
          const int j = key_position(l, kind, first, end, r);
          return j >= 0 ? vg + static_cast<int64_t>(j) * p.kv_sn : nullptr;
        },
        vg);
  };
  if (nblocks > 0) load_kv(0, 0);
  cp_async_commit();

  const int row0 = warp * 16 + (lane >> 2);
  const int qpos[2] = {q_lo + row0, q_lo + row0 + 8};
  float lse2[2], dlt[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) qt.row_stats(p, row0 + hr * 8, lse2[hr], dlt[hr]);

  float dq[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int it = 0; it < nblocks; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < nblocks) load_kv(it + 1, (it + 1) & 1);
    cp_async_commit();
    const T* cK = sK + (it & 1) * BN * D;
    const T* cV = sV + (it & 1) * BN * D;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t qa[4], da[4];
      const int r = warp * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
      ldmatrix_x4(qa, smem_u32(sQ + swz<D>(r, c)));
      ldmatrix_x4(da, smem_u32(sdO + swz<D>(r, c)));
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        uint32_t bk[4], bv[4];
        const int key = jj * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int cc = ks * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(bk, smem_u32(cK + swz<D>(key, cc)));
        ldmatrix_x4(bv, smem_u32(cV + swz<D>(key, cc)));
        TT::mma(s[2 * jj], qa, bk[0], bk[1]);
        TT::mma(s[2 * jj + 1], qa, bk[2], bk[3]);
        TT::mma(dp[2 * jj], da, bv[0], bv[1]);
        TT::mma(dp[2 * jj + 1], da, bv[2], bv[3]);
      }
    }

    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    bool need_mask;
    if (kind == 1) {
      need_mask = first + BN > end;
    } else {
      const int last = first + BN - 1;
      need_mask = last >= end || last > q_lo || (kind == 0 ? false : q_hi - first >= l.window);
    }
    need_mask = need_mask || rows_here < BM;

    uint32_t dsf[NT / 2][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) pr[e] = exp2f(s[j][e] * p.scale_log2 - lse2[e >> 1]);
      if (need_mask) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int kp = key_position(l, kind, first, end, j * 8 + 2 * (lane & 3) + c);
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const bool ok = kp >= 0 && row0 + hr * 8 < rows_here &&
                            (kind == 1 || l.visible(qpos[hr], kp));
            if (!ok) pr[2 * hr + c] = 0.f;
          }
        }
      }
      float ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[e] = pr[e] * (dp[j][e] - dlt[e >> 1]);
      dsf[j / 2][(j & 1) * 2 + 0] = TT::pack(ds[0], ds[1]);
      dsf[j / 2][(j & 1) * 2 + 1] = TT::pack(ds[2], ds[3]);
    }
    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        uint32_t bf[4];
        const int key = kk * 16 + (lane & 15);
        const int c = dd * 2 + (lane >> 4);
        ldmatrix_x4_trans(bf, smem_u32(cK + swz<D>(key, c)));
        TT::mma(dq[2 * dd], dsf[kk], bf[0], bf[1]);
        TT::mma(dq[2 * dd + 1], dsf[kk], bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with sQ before it is reused below

  // Epilogue through this warp's rows of sQ (written out here rather than with
  // epilogue.cuh's stage_rows / copy_rows_out, whose address arithmetic compiles
  // differently for this kernel).
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    const int within = 2 * (lane & 3);
    *reinterpret_cast<uint32_t*>(sQ + swz<D>(row0, i) + within) =
        TT::pack(dq[i][0] * p.scale, dq[i][1] * p.scale);
    *reinterpret_cast<uint32_t*>(sQ + swz<D>(row0 + 8, i) + within) =
        TT::pack(dq[i][2] * p.scale, dq[i][3] * p.scale);
  }
  __syncwarp();
  T* dqg = static_cast<T*>(p.dq) + row_off;
#pragma unroll
  for (int i = 0; i < 16 * DT / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = warp * 16 + idx / DT, c = idx % DT;
    if (r < rows_here) {
      *reinterpret_cast<uint4*>(dqg + static_cast<int64_t>(r) * p.dq_sn + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(r, c));
    }
  }
}

// ---------------------------------------------------------------------------
// 3./4. dK/dV kernel. gist_pass == 1 (launched first): packed gist blocks,
// writing the gist rows' partials; gist_pass == 0: dense pass over aligned key
// blocks, whose accumulators start from them (load_gist_partials).
template <int D>
constexpr int dkv_bq() {
  return D == 128 ? 32 : 64;  // query rows per inner step (divides kQTile)
}

template <int D>
constexpr int dkv_smem_bytes() {
  return (2 * kKBlock * D + 2 * 2 * dkv_bq<D>() * D) * 2 + 2 * 2 * dkv_bq<D>() * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) gist_attn_bwd_dkdv_kernel(const AttnParams p,
                                                                         const int gist_pass) {
  using TT = TypeTraits<T>;
  constexpr int BN = kKBlock;     // keys of the CTA
  constexpr int BQ = dkv_bq<D>(); // queries per inner step
  constexpr int NQ = BQ / 8;      // n-tiles of queries
  constexpr int DT = D / 8, KS = D / 16;
  static_assert(kQTile % BQ == 0, "inner query step must divide the query tile");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;          // 2 stages
  T* sdO = sQ + 2 * BQ * D;     // 2 stages
  float* sL = reinterpret_cast<float*>(sdO + 2 * BQ * D);  // lse*log2e, 2 stages
  float* sD = sL + 2 * BQ;                                 // delta, 2 stages

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int blk, bh, nblk;
  block_coords(p, blk, bh, nblk);
  const int b = bh / p.Hq, h = bh % p.Hq;
  const Layout32 l = p.l;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + (h / p.group) * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + (h / p.group) * p.v_sh;
  const int64_t qrow0 = static_cast<int64_t>(bh) * p.Nq;  // in lse, delta
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;

  const DkdvKeys keys(p, gist_pass, blk, BN);
  const int first = keys.first, end = keys.end;
  auto kpos = [&](int s) { return keys.pos(s); };
  const int n_valid = min(BN, end - first);
  const int kp_first = kpos(0), kp_last = kpos(n_valid - 1);

  // Query steps (of BQ rows) to visit: [st_begin, st_end).
  const int n_steps = (p.Nq + BQ - 1) / BQ;
  int st_begin, st_end;
  if (gist_pass) {
    // Tiles with q_lo >= kp_first + window hold some of these gists.
    const int need = kp_first + l.window - p.q_offset;  // first tile row offset
    const int t0 = need <= 0 ? 0 : (need + kQTile - 1) / kQTile;
    st_begin = t0 * (kQTile / BQ);
    st_end = n_steps;
  } else {
    const int rfirst = kp_first - p.q_offset;  // queries at positions >= the first key
    st_begin = rfirst <= 0 ? 0 : (rfirst / kQTile) * (kQTile / BQ);
    if (kp_first < l.num_sink) {
      st_end = n_steps;
    } else {
      // Tiles with q_lo <= kp_last + window - 1.
      const int lim = kp_last + l.window - 1 - p.q_offset;
      st_end = lim < 0 ? 0 : min(n_steps, (lim / kQTile + 1) * (kQTile / BQ));
    }
  }

  // Load K, V of the block once.
  load_rows<BN, D, kBwdThreads>(
      sK,
      [&](int r) -> const T* {
        const int j = kpos(r);
        return j >= 0 ? kg + static_cast<int64_t>(j) * p.kv_sn : nullptr;
      },
      kg);
  load_rows<BN, D, kBwdThreads>(
      sV,
      [&](int r) -> const T* {
        const int j = kpos(r);
        return j >= 0 ? vg + static_cast<int64_t>(j) * p.kv_sn : nullptr;
      },
      vg);
  cp_async_commit();

  auto load_q = [&](int st, int stage) {
    const int t0 = st * BQ;
    auto rowp = [&](const T* base, int64_t ld) {
      return [=](int r) -> const T* { return t0 + r < p.Nq ? base + (t0 + r) * ld : nullptr; };
    };
    load_rows<BQ, D, kBwdThreads>(sQ + stage * BQ * D, rowp(qg, p.q_sn), qg);
    load_rows<BQ, D, kBwdThreads>(sdO + stage * BQ * D, rowp(dog, p.do_sn), dog);
    const int tid = threadIdx.x;
    if (tid < BQ) {
      const bool ok = t0 + tid < p.Nq;
      cp_async4(sL + stage * BQ + tid, p.lse + qrow0 + (ok ? t0 + tid : 0), ok);
    } else if (tid < 2 * BQ) {
      const int r = tid - BQ;
      const bool ok = t0 + r < p.Nq;
      cp_async4(sD + stage * BQ + r, p.delta + qrow0 + (ok ? t0 + r : 0), ok);
    }
  };
  if (st_begin < st_end) load_q(st_begin, 0);
  cp_async_commit();

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
  const int krow0 = warp * 16 + (lane >> 2);
  const int kp_row[2] = {kpos(krow0), kpos(krow0 + 8)};
  if (!gist_pass) load_gist_partials<DT>(p, bh, kp_row, dk, dv, lane);

  for (int st = st_begin; st < st_end; ++st) {
    const int stage = (st - st_begin) & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (st + 1 < st_end) load_q(st + 1, stage ^ 1);
    cp_async_commit();
    const T* cQ = sQ + stage * BQ * D;
    const T* cdO = sdO + stage * BQ * D;
    const float* cL = sL + stage * BQ;
    const float* cD = sD + stage * BQ;
    const int t0 = st * BQ;
    const int q_lo = p.q_offset + (t0 / kQTile) * kQTile;  // start of the forward tile
    const int qp0 = p.q_offset + t0;                       // first query position of the step
    const int qp1 = qp0 + BQ - 1;

    // S^T = K Q^T and dP^T = V dO^T (rows: keys, cols: queries).
    float s[NQ][4], dp[NQ][4];
#pragma unroll
    for (int j = 0; j < NQ; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t ka[4], va[4];
      const int r = warp * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
      ldmatrix_x4(ka, smem_u32(sK + swz<D>(r, c)));
      ldmatrix_x4(va, smem_u32(sV + swz<D>(r, c)));
#pragma unroll
      for (int jj = 0; jj < NQ / 2; ++jj) {
        uint32_t bq[4], bd[4];
        const int qr = jj * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int cc = ks * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(bq, smem_u32(cQ + swz<D>(qr, cc)));
        ldmatrix_x4(bd, smem_u32(cdO + swz<D>(qr, cc)));
        TT::mma(s[2 * jj], ka, bq[0], bq[1]);
        TT::mma(s[2 * jj + 1], ka, bq[2], bq[3]);
        TT::mma(dp[2 * jj], va, bd[0], bd[1]);
        TT::mma(dp[2 * jj + 1], va, bd[2], bd[3]);
      }
    }

    // Does every (query, key) pair of this step belong to this pass?
    bool full;
    if (gist_pass) {
      full = n_valid == BN && q_lo >= kp_last + l.window && t0 + BQ <= p.Nq;
    } else {
      full = n_valid == BN && t0 + BQ <= p.Nq && kp_last <= qp0 &&
             (kp_last < l.num_sink || (kp_first >= l.num_sink && qp1 - kp_first < l.window));
    }

    uint32_t pf[NQ / 2][4], dsf[NQ / 2][4];
#pragma unroll
    for (int j = 0; j < NQ; ++j) {
      float pr[4], ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * (lane & 3) + (e & 1);
        pr[e] = exp2f(s[j][e] * p.scale_log2 - cL[col] * kLog2e);
        if (!full) {
          const int kp = kp_row[e >> 1];
          const int qp = qp0 + col;
          bool ok = kp >= 0 && t0 + col < p.Nq;
          if (gist_pass) {
            ok = ok && q_lo >= kp + l.window;
          } else {
            ok = ok && l.in_dense_part(qp, kp, q_lo);
          }
          if (!ok) pr[e] = 0.f;
        }
        ds[e] = pr[e] * (dp[j][e] - cD[col]);
      }
      pf[j / 2][(j & 1) * 2 + 0] = TT::pack(pr[0], pr[1]);
      pf[j / 2][(j & 1) * 2 + 1] = TT::pack(pr[2], pr[3]);
      dsf[j / 2][(j & 1) * 2 + 0] = TT::pack(ds[0], ds[1]);
      dsf[j / 2][(j & 1) * 2 + 1] = TT::pack(ds[2], ds[3]);
    }
    // dV += P^T dO, dK += dS^T Q (k: queries).
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        uint32_t bo[4], bq[4];
        const int qr = kk * 16 + (lane & 15);
        const int c = dd * 2 + (lane >> 4);
        ldmatrix_x4_trans(bo, smem_u32(cdO + swz<D>(qr, c)));
        ldmatrix_x4_trans(bq, smem_u32(cQ + swz<D>(qr, c)));
        TT::mma(dv[2 * dd], pf[kk], bo[0], bo[1]);
        TT::mma(dv[2 * dd + 1], pf[kk], bo[2], bo[3]);
        TT::mma(dk[2 * dd], dsf[kk], bq[0], bq[1]);
        TT::mma(dk[2 * dd + 1], dsf[kk], bq[2], bq[3]);
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: every row, also those without a step (the dense pass reads the
  // gist pass's partials).
  store_dkdv_rows<T, DT>(p, bh, kp_row, dk, dv, lane, gist_pass != 0);
}

// ---------------------------------------------------------------------------
// 5. dk[b, hkv, n, :] and dv[b, hkv, n, :] = sums over the group's query heads
// of dk_acc / dv_acc, in the input dtype, through dk's and dv's strides; 4
// elements of each per thread.
template <typename T, int D>
__global__ void __launch_bounds__(256) reduce_group_kernel(const AttnParams p, int64_t total4) {
  using TT = TypeTraits<T>;
  const int64_t i4 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i4 >= total4) return;
  const int64_t e = i4 * 4;
  const int64_t row = e / D, d = e % D;  // row: (b * Hkv + hkv) * Nk + n
  const int64_t bkv = row / p.Nk, n = row % p.Nk;
  const int64_t b = bkv / p.Hkv, hk = bkv % p.Hkv;
  const int64_t src = (bkv * p.group * p.Nk + n) * D + d;
  const int64_t per_head = static_cast<int64_t>(p.Nk) * D;
  float4 sk = make_float4(0.f, 0.f, 0.f, 0.f), sv = sk;
  for (int g = 0; g < p.group; ++g) {
    const float4 xk = *reinterpret_cast<const float4*>(p.dk_acc + src + g * per_head);
    const float4 xv = *reinterpret_cast<const float4*>(p.dv_acc + src + g * per_head);
    sk.x += xk.x;
    sk.y += xk.y;
    sk.z += xk.z;
    sk.w += xk.w;
    sv.x += xv.x;
    sv.y += xv.y;
    sv.z += xv.z;
    sv.w += xv.w;
  }
  *reinterpret_cast<uint2*>(static_cast<T*>(p.dk) + b * p.dk_sb + hk * p.dk_sh + n * p.dkv_sn + d) =
      make_uint2(TT::pack(sk.x, sk.y), TT::pack(sk.z, sk.w));
  *reinterpret_cast<uint2*>(static_cast<T*>(p.dv) + b * p.dv_sb + hk * p.dv_sh + n * p.dkv_sn + d) =
      make_uint2(TT::pack(sv.x, sv.y), TT::pack(sv.z, sv.w));
}

template <typename T, int D>
void launch_bwd_delta_t(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  delta_kernel<T, D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_bwd_dq_t(const AttnParams& p, bool sm90, cudaStream_t stream) {
  if (sm90) {
#ifdef UNIGIST_WITH_SM90
    launch_bwd_dq_sm90(p, std::is_same<T, __nv_bfloat16>::value, D, stream);
#endif
    return;
  }
  constexpr int smem = dq_smem_bytes<D>();
  auto kernel = gist_attn_bwd_dq_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid = grid_of(p, (p.Nq + kQTile - 1) / kQTile);
  kernel<<<grid, kBwdThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_bwd_dkdv_t(const AttnParams& p, bool sm90, cudaStream_t stream) {
  if (sm90) {
#ifdef UNIGIST_WITH_SM90
    launch_bwd_dkdv_sm90(p, std::is_same<T, __nv_bfloat16>::value, D, stream);
#endif
  } else {
    constexpr int smem = dkv_smem_bytes<D>();
    auto kernel = gist_attn_bwd_dkdv_kernel<T, D>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int64_t gist_blocks = (p.n_gist_rows + kKBlock - 1) / kKBlock;
    if (gist_blocks > 0) {
      kernel<<<grid_of(p, gist_blocks), kBwdThreads, smem, stream>>>(p, 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int dense_blocks = (p.Nk + kKBlock - 1) / kKBlock;
    kernel<<<grid_of(p, dense_blocks), kBwdThreads, smem, stream>>>(p, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // 5. group sums (group 1: the dense pass wrote dk and dv)
  if (p.group == 1) return;
  const int64_t total4 = static_cast<int64_t>(p.B) * p.Hkv * p.Nk * D / 4;
  reduce_group_kernel<T, D><<<static_cast<unsigned>((total4 + 255) / 256), 256, 0, stream>>>(p, total4);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd(const AttnParams& p, bool bf16, int head_dim, bool sm90, BwdStep step, cudaStream_t stream) {
  UNIGIST_DISPATCH(bf16, head_dim, [&] {
    switch (step) {
      case BwdStep::kDelta:
        launch_bwd_delta_t<T, kHeadDim>(p, stream);
        break;
      case BwdStep::kDq:
        launch_bwd_dq_t<T, kHeadDim>(p, sm90, stream);
        break;
      case BwdStep::kDkdv:
        launch_bwd_dkdv_t<T, kHeadDim>(p, sm90, stream);
        break;
    }
  });
}

}  // namespace cuda_detail
}  // namespace unigist
