// Epilogues: what a kernel does with its accumulators once the key (or query)
// loop is done. Shared so that the mma.sync and wgmma variants of a kernel write
// the same rows the same way.
#pragma once

#include <cstdint>

#include "cuda/params.cuh"
#include "cuda/ptx.cuh"

namespace unigist {
namespace cuda_detail {

// Epilogue of the dK/dV kernels (mma.sync and wgmma): a thread's key rows
// kp_row[0..1] (-1: none), from fragments in the m16n8 accumulator layout (row
// lane / 4 in [.][0..1], + 8 in [.][2..3]); dK is scaled by softmax_scale.
// The gist pass runs first and writes the fp32 partial of each gist row past
// the sinks, per query head (bh = b * Hq + h), packed by gist index (1/(ratio+1)
// of the keys' memory). The dense pass adds it and writes the final rows: in
// the input dtype when a key head has one query head (no group sum, no fp32
// copy of dK and dV; dk / dv through their strides), else fp32 per query head
// for reduce_group_kernel.
template <typename T, int DT>
__device__ __forceinline__ void store_dkdv_rows(const AttnParams& p, int bh, const int (&kp_row)[2],
                                                const float (&dk)[DT][4], const float (&dv)[DT][4], int lane,
                                                bool gist_pass) {
  using TT = TypeTraits<T>;
  constexpr int D = DT * 8;
  const int col = 2 * (lane & 3);
  const int g0 = p.l.gists_before(min(p.l.num_sink, p.Nk));
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int kp = kp_row[hr];
    if (kp < 0) continue;
    const bool gist_row = kp >= p.l.num_sink && p.l.is_gist(kp);
    const int64_t gist_off =
        gist_row ? (static_cast<int64_t>(bh) * p.n_gist_rows + (p.l.gists_before(kp) - g0)) * D + col : 0;
    const int64_t row_off = (static_cast<int64_t>(bh) * p.Nk + kp) * D + col;  // in dk_acc, dv_acc
    // In dk, dv (written at group 1, where bh = b * Hkv + key head).
    const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
    const int64_t dk_off = b * p.dk_sb + hk * p.dk_sh + static_cast<int64_t>(kp) * p.dkv_sn + col;
    const int64_t dv_off = b * p.dv_sb + hk * p.dv_sh + static_cast<int64_t>(kp) * p.dkv_sn + col;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      float2 k2 = make_float2(dk[i][2 * hr] * p.scale, dk[i][2 * hr + 1] * p.scale);
      float2 v2 = make_float2(dv[i][2 * hr], dv[i][2 * hr + 1]);
      float2* gk = reinterpret_cast<float2*>(p.dk_gist + gist_off + i * 8);
      float2* gv = reinterpret_cast<float2*>(p.dv_gist + gist_off + i * 8);
      if (gist_pass) {
        *gk = k2;
        *gv = v2;
        continue;
      }
      if (gist_row) {
        const float2 k0 = *gk, v0 = *gv;
        k2.x += k0.x;
        k2.y += k0.y;
        v2.x += v0.x;
        v2.y += v0.y;
      }
      if (p.group == 1) {
        reinterpret_cast<uint32_t*>(static_cast<T*>(p.dk) + dk_off + i * 8)[0] = TT::pack(k2.x, k2.y);
        reinterpret_cast<uint32_t*>(static_cast<T*>(p.dv) + dv_off + i * 8)[0] = TT::pack(v2.x, v2.y);
      } else {
        *reinterpret_cast<float2*>(p.dk_acc + row_off + i * 8) = k2;
        *reinterpret_cast<float2*>(p.dv_acc + row_off + i * 8) = v2;
      }
    }
  }
}

// ---- the online softmax's output ------------------------------------------
// o (a fragment of DT d tiles, rows lane / 4 in [.][0..1], + 8 in [.][2..3])
// times the softmax's per-row factor: alpha while the key loop runs, 1 / sum at
// the end.
template <int DT>
__device__ __forceinline__ void scale_rows(float (&o)[DT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    o[i][0] *= alpha[0];
    o[i][1] *= alpha[0];
    o[i][2] *= alpha[1];
    o[i][3] *= alpha[1];
  }
}

// The natural-log lse of a fragment's two rows (tile rows r0, r0 + 8; tile row
// r at p.lse[row0 + r]), written by one thread of the quad that holds each;
// rows from rows_here on are left out.
__device__ __forceinline__ void store_lse_rows(const AttnParams& p, int64_t row0, const float (&lse)[2], int r0,
                                               int rows_here, int lane) {
  if ((lane & 3) == 0) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = r0 + hr * 8;
      if (r < rows_here) p.lse[row0 + r] = lse[hr];
    }
  }
}

// ---- mma.sync kernels: rows out through shared memory ----------------------
// A fragment's two rows r0, r0 + 8 (acc times mul[0] / mul[1], in T) into the
// same rows of a swz<D> tile whose rows no other warp reads any more; then
// copy_rows_out writes them with 16-byte stores instead of 4-byte ones.
template <int D, typename T, int DT>
__device__ __forceinline__ void stage_rows(T* tile, const float (&acc)[DT][4], const float (&mul)[2], int r0,
                                           int lane) {
  using TT = TypeTraits<T>;
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    const int within = 2 * (lane & 3);
    *reinterpret_cast<uint32_t*>(tile + swz<D>(r0, i) + within) = TT::pack(acc[i][0] * mul[0], acc[i][1] * mul[0]);
    *reinterpret_cast<uint32_t*>(tile + swz<D>(r0 + 8, i) + within) =
        TT::pack(acc[i][2] * mul[1], acc[i][3] * mul[1]);
  }
}

// The warp's ROWS staged rows from wrow (after a __syncwarp) to out (tile row
// r at row row0 + r of out's rows of D elements); rows from rows_here on are
// left out. (out and row0 rather than a row pointer: the forward's address
// arithmetic then compiles as it did inline.)
template <int ROWS, int D, typename T>
__device__ __forceinline__ void copy_rows_out(void* out, int64_t row0, const T* tile, int wrow, int rows_here,
                                              int lane) {
  constexpr int DT = D / 8;
  T* og = static_cast<T*>(out) + row0 * D;
#pragma unroll
  for (int i = 0; i < ROWS * DT / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = wrow + idx / DT, c = idx % DT;
    if (r < rows_here) {
      *reinterpret_cast<uint4*>(og + static_cast<int64_t>(r) * D + c * 8) =
          *reinterpret_cast<const uint4*>(tile + swz<D>(r, c));
    }
  }
}

}  // namespace cuda_detail
}  // namespace unigist
