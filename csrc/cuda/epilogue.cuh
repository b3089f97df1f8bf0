// Epilogues: what a kernel does with its accumulators once the key (or query)
// loop is done. Shared so that the mma.sync and wgmma variants of a kernel write
// the same rows the same way.
#pragma once

#include <cstdint>

#include "cuda/params.cuh"
#include "cuda/ptx.cuh"

namespace unigist {
namespace cuda_detail {

// Offset (floats) of key row kp's gist-pass partial in dk_gist / dv_gist, at
// column `col`; -1 when kp is not a gist row past the sinks (no partial). The
// partials are per query head (bh = b * Hq + h), packed by gist index.
template <int D>
__device__ __forceinline__ int64_t gist_partial_offset(const AttnParams& p, int bh, int kp, int col) {
  if (kp < 0 || kp < p.l.num_sink || !p.l.is_gist(kp)) return -1;
  const int g0 = p.l.gists_before(min(p.l.num_sink, p.Nk));
  return (static_cast<int64_t>(bh) * p.n_gist_rows + (p.l.gists_before(kp) - g0)) * D + col;
}

// The dense pass starts a block's dK / dV accumulators from the gist pass's
// partials of its gist rows (zeros elsewhere), so that its epilogue only
// stores. Added in the epilogue instead, the loads sat between the stores of
// dk / dv, which the compiler cannot tell from the partials, so each waited a
// full round trip to memory: 2 DT serial trips per row; loaded all before
// the stores, they held registers the wgmma kernel does not have (ptxas
// spilled). Here they land in the accumulators themselves, and their latency
// runs under the block's first GEMMs (4k fwd+bwd 5-6% faster, NOTES v19).
// The partials are the unscaled dK sums, so dK = scale * (partial + dense
// part) as before.
template <int DT>
__device__ __forceinline__ void load_gist_partials(const AttnParams& p, int bh, const int (&kp_row)[2],
                                                   float (&dk)[DT][4], float (&dv)[DT][4], int lane) {
  constexpr int D = DT * 8;
  const int col = 2 * (lane & 3);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t off = gist_partial_offset<D>(p, bh, kp_row[hr], col);
    if (off < 0) continue;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      const float2 k0 = __ldg(reinterpret_cast<const float2*>(p.dk_gist + off + i * 8));
      const float2 v0 = __ldg(reinterpret_cast<const float2*>(p.dv_gist + off + i * 8));
      dk[i][2 * hr] = k0.x;
      dk[i][2 * hr + 1] = k0.y;
      dv[i][2 * hr] = v0.x;
      dv[i][2 * hr + 1] = v0.y;
    }
  }
}

// Epilogue of the dK/dV kernels (mma.sync and wgmma): a thread's key rows
// kp_row[0..1] (-1: none), from fragments in the m16n8 accumulator layout (row
// lane / 4 in [.][0..1], + 8 in [.][2..3]). The gist pass runs first and
// writes each gist row's fp32 partial (gist_partial_offset; dK unscaled); the
// dense pass, whose accumulators started from those partials
// (load_gist_partials), writes the final rows, dK times softmax_scale: in the
// input dtype when a key head has one query head (no group sum, no fp32 copy
// of dK and dV; dk / dv through their strides), else fp32 per query head for
// reduce_group_kernel.
template <typename T, int DT>
__device__ __forceinline__ void store_dkdv_rows(const AttnParams& p, int bh, const int (&kp_row)[2],
                                                const float (&dk)[DT][4], const float (&dv)[DT][4], int lane,
                                                bool gist_pass) {
  using TT = TypeTraits<T>;
  constexpr int D = DT * 8;
  const int col = 2 * (lane & 3);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int kp = kp_row[hr];
    if (kp < 0) continue;
    if (gist_pass) {
      const int64_t off = gist_partial_offset<D>(p, bh, kp, col);
      if (off < 0) continue;  // (every key of the gist pass is a gist past the sinks)
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        *reinterpret_cast<float2*>(p.dk_gist + off + i * 8) = make_float2(dk[i][2 * hr], dk[i][2 * hr + 1]);
        *reinterpret_cast<float2*>(p.dv_gist + off + i * 8) = make_float2(dv[i][2 * hr], dv[i][2 * hr + 1]);
      }
      continue;
    }
    const int64_t row_off = (static_cast<int64_t>(bh) * p.Nk + kp) * D + col;  // in dk_acc, dv_acc
    // In dk, dv (written at group 1, where bh = b * Hkv + key head).
    const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
    const int64_t dk_off = b * p.dk_sb + hk * p.dk_sh + static_cast<int64_t>(kp) * p.dkv_sn + col;
    const int64_t dv_off = b * p.dv_sb + hk * p.dv_sh + static_cast<int64_t>(kp) * p.dkv_sn + col;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      const float2 k2 = make_float2(dk[i][2 * hr] * p.scale, dk[i][2 * hr + 1] * p.scale);
      const float2 v2 = make_float2(dv[i][2 * hr], dv[i][2 * hr + 1]);
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
