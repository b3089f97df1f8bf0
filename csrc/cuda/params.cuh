// The kernels' parameters (plain pointers, sizes and the clamped layout: no
// ATen, so that kernels and torch entry points build apart) and the mapping of
// a CTA onto them: launch grid, query tile, dK/dV key block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/key_visit.cuh"
#include "cuda/softmax.cuh"  // kLog2e

namespace unigist {
namespace cuda_detail {

// Parameters shared by the forward and backward kernels. q / dout [B, Hq, Nq,
// D] and k / v [B, Hkv, Nk, D] are read through their element strides (batch,
// head, row; the head dim unit-stride, rows 16-byte aligned), so a caller's
// transposed view needs no copy; out and lse are contiguous, dq / dk / dv
// strided as below. Row
// strides are 32-bit and k and v share theirs (the entry points copy
// otherwise): the wgmma producers have 56 registers.
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, do_sb, do_sh;  // batch, head
  int q_sn, kv_sn, do_sn;                                    // row
  void* o;          // forward output
  float* lse;       // [B, Hq, Nq]
  const float* delta;  // backward: rowsum(dout * out) [B, Hq, Nq]
  void* dq;         // backward
  void* dk;         // backward: dK, dV [B, Hkv, Nk, D]
  void* dv;
  // Element strides of dq, dk, dv (batch, head, row; the head dim unit-stride,
  // rows 16-byte aligned): the entry point allocates them like q, k, v (HF's
  // transposed views too, as the fake kernel does), so autograd copies nothing.
  int64_t dq_sb, dq_sh, dk_sb, dk_sh, dv_sb, dv_sh;
  int dq_sn, dkv_sn;
  float* dk_acc;    // backward, group > 1: per q-head fp32 [B, Hq, Nk, D]
  float* dv_acc;
  float* dk_gist;   // backward: gist pass partials [B, Hq, n_gist_rows, D]
  float* dv_gist;
  int n_gist_rows;  // gists at or past num_sink
  // backward: 2 ints, the wgmma dK/dV passes' item counters (zeroed by their
  // launcher); nullptr: a CTA per item.
  int* work_counter;
  int B, Hq, Hkv, group, Nq, Nk;
  int q_offset;
  int head_fast;  // grid order: 1 = heads along x (used), 0 = tiles along x
  int pingpong;   // wgmma forward / dQ: consumers take turns issuing GEMMs (sm90::ConsumerTurns)
  Layout32 l;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
  // Keys in the compressed-cache layout (the wgmma path of
  // gist_attention_cache_fwd, CacheBlocks): cached rows, first tail position,
  // one past the last. Unused (0) in the interleaved layout.
  int cached, tail_start, tail_end;
};

// The keys of a dK/dV CTA (block blk of bn keys): slot s holds index first + s
// (a key position in the dense pass, a gist index past the sinks in the gist
// pass) while first + s < end; pos(s) is that key's position, -1 past the end.
struct DkdvKeys {
  int first, end;
  int gist_pass;
  Layout32 l;
  __device__ __forceinline__ DkdvKeys(const AttnParams& p, int gist_pass_, int blk, int bn)
      : gist_pass(gist_pass_), l(p.l) {
    if (gist_pass) {
      first = l.gists_before(min(l.num_sink, p.Nk)) + blk * bn;
      end = l.gists_before(p.Nk);
    } else {
      first = blk * bn;
      end = p.Nk;
    }
  }
  __device__ __forceinline__ int pos(int s) const {
    const int x = first + s;
    if (x >= end) return -1;
    return gist_pass ? l.gist_position(x) : x;
  }
};


// Launch grid for `blocks` CTAs per (batch, head); blockIdx -> (block, bh).
inline dim3 grid_of(const AttnParams& p, int64_t blocks) {
  return p.head_fast ? dim3(p.B * p.Hq, static_cast<unsigned>(blocks))
                     : dim3(static_cast<unsigned>(blocks), p.B * p.Hq);
}
__device__ __forceinline__ void block_coords(const AttnParams& p, int& blk, int& bh, int& nblk) {
  if (p.head_fast) {
    bh = blockIdx.x;
    blk = blockIdx.y;
    nblk = gridDim.y;
  } else {
    bh = blockIdx.y;
    blk = blockIdx.x;
    nblk = gridDim.x;
  }
}

// The query tile of a forward / dQ CTA: its (batch, head), its bm query rows
// from m0 (later tiles carry more work: they get the lower block indices, so
// they start first) and its key blocks of bn keys.
struct QueryTile {
  int bh, b, h, m0, q_lo, q_hi, rows_here, nblocks;
  int64_t row0;          // first query row of the tile in out / dq / lse: bh * Nq + m0
  int64_t q_off, do_off;  // element offset of that row in q / dout
  int64_t k_off, v_off;   // element offset of the tile's key head in k / v
  KeyBlocks kb;
  __device__ __forceinline__ QueryTile(const AttnParams& p, int bm, int bn) {
    int blk, nblk;
    block_coords(p, blk, bh, nblk);
    b = bh / p.Hq;
    h = bh % p.Hq;
    m0 = (nblk - 1 - blk) * bm;
    q_lo = p.q_offset + m0;
    rows_here = min(bm, p.Nq - m0);
    q_hi = q_lo + rows_here - 1;
    row0 = static_cast<int64_t>(bh) * p.Nq + m0;
    q_off = b * p.q_sb + h * p.q_sh + static_cast<int64_t>(m0) * p.q_sn;
    do_off = b * p.do_sb + h * p.do_sh + static_cast<int64_t>(m0) * p.do_sn;
    k_off = b * p.k_sb + (h / p.group) * p.k_sh;
    v_off = b * p.v_sb + (h / p.group) * p.v_sh;
    kb.init(layout::tile_visit(q_lo, q_hi, p.Nk, p.l.as64()), bn);
    nblocks = kb.total();
  }
  // lse * log2(e) and delta of tile row r (0 past the tile; a row that sees no
  // key has lse -inf: 0 keeps exp2 finite, its P is masked anyway).
  __device__ __forceinline__ void row_stats(const AttnParams& p, int r, float& lse2, float& dlt) const {
    const bool valid = r < rows_here;
    lse2 = valid ? p.lse[row0 + r] * kLog2e : 0.f;
    dlt = valid ? p.delta[row0 + r] : 0.f;
    if (!(lse2 > -INFINITY)) lse2 = 0.f;
  }
};

// Parameters of the compressed-cache forward's mma.sync kernel
// (cache_fwd_sm80.cu): q, k, v read in place through their strides. Its tile
// shape, from which the entry point sizes the grid and the split-KV:
constexpr int kCacheBM = 64;  // packed (query, head) rows per CTA: 4 warps x 16
constexpr int kCacheBN = 64;  // keys per block
constexpr int kCacheMaxSplits = 64;
struct CacheParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;          // [B, Hq, Nq, D], contiguous
  float* lse;       // [B, Hq, Nq]
  float* o_part;    // splits > 1: [splits, B * Hq * Nq, D], each split normalized by its own sum
  float* lse_part;  // splits > 1: [splits, B * Hq * Nq]
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;  // element strides
  int B, Hq, Hkv, group, Nq;
  int rows;        // Nq * group: packed rows per (batch, key head)
  int q_offset;
  int cached;      // rows [0, cached): the cache's sinks and gists
  int row_shift;   // row of tail position x: x + row_shift (cached - tail_start)
  int tail_start;  // position of the first tail row
  int tail_end;    // one past the last tail position
  int splits;
  Layout32 l;
  float scale_log2;
  // gist_attention_cache_step: q_offset and the key layout come from device memory
  // (int64 [q_offset, cache_sinks, cache_gists, first_gist, tail_start, num_keys]),
  // over a key buffer of `capacity` rows; nullptr: the fields above.
  const int64_t* layout;
  int64_t capacity;
};

// Layout values clamped so that 32-bit arithmetic is exact and the visible
// set over keys [0, nk) is unchanged.
inline Layout32 clamp_layout(int64_t ratio, int64_t window, int64_t num_sink, int64_t nk) {
  // ratio > nk: no position below nk is a gist either way; window >= nk: every
  // causal pair is inside it either way; num_sink >= nk: every key is a sink.
  const int64_t cap = nk > 1 ? nk : 1;
  Layout32 l;
  l.ratio = static_cast<int>(ratio < cap + 1 ? ratio : cap + 1);
  l.window = static_cast<int>(window < cap ? window : cap);
  l.num_sink = static_cast<int>(num_sink < cap ? num_sink : cap);
  return l;
}

}  // namespace cuda_detail
}  // namespace unigist
