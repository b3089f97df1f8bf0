// Hopper (sm_90a) primitives of the wgmma forward kernel: warpgroup MMA,
// shared-memory matrix descriptors, mbarriers, cp.async completion on an
// mbarrier, register reallocation. Everything is compiled only in the sm_90a
// device pass (UNIGIST_SM90A); the host and sm_80 passes see empty stubs, so
// the one source builds for "8.0;9.0a".
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention_common.cuh"  // cp_async16

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define UNIGIST_SM90A 1
#else
#define UNIGIST_SM90A 0
#endif

namespace unigist {
namespace sm90 {

// ---- 128-byte swizzled tiles ----------------------------------------------
// A tile of ROWS rows x D 16-bit elements is stored as D/64 "slabs" of
// [ROWS][64] elements (128-byte rows); inside a slab the 16-byte chunk index
// is XORed with row % 8. This is the canonical layout wgmma reads with
// swizzle mode 128B: 8-row x 128-byte atoms, 1024 bytes each, so slab bases
// must be 1024-byte aligned. Byte offset of chunk c (8 elements) of row r:
template <int ROWS>
__host__ __device__ __forceinline__ uint32_t sw128_offset(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * ROWS * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor, swizzle 128B. lbo/sbo in bytes.
//   K-major operand (rows are M or N, 64 K-elements per slab row): sbo =
//   1024 (next 8 rows), lbo unused; a k16 step moves the start by 32 bytes
//   inside the slab, a new slab every 4 steps.
//   MN-major operand (rows are K, 64 MN-elements per slab row; V in P V):
//   lbo = slab stride (next 64 MN elements), sbo = 1024 (next 8 K rows); a
//   k16 step moves the start by 16 rows = 2048 bytes.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // swizzle 128B
  return d;
}

#if UNIGIST_SM90A

// ---- producer gather of a row tile ---------------------------------------------
// The 128 threads of a producer warpgroup copy a tile of ROWS rows x D 16-bit
// elements into the SW128 layout (sw128_offset<ROWS>). Tile row r is source row
// pos0 + stride * r (stride 1: consecutive rows, as Q tiles and sink / window
// keys; ratio + 1: packed gists), for r < nrows; later rows are zero-filled
// (source not read). Thread t copies chunk t % CPR of tile rows t / CPR + RS * i,
// so its source address moves by a constant step and its swizzled destination by
// RS rows (RS a multiple of 8 keeps the XOR pattern): no per-row layout math.
// Completion is the caller's (cp_async_arrive on an mbarrier).
template <int ROWS, int D, typename T>
__device__ __forceinline__ void gather_rows(unsigned char* tile, const T* src, int64_t pos0, int64_t stride,
                                            int nrows, int t) {
  constexpr int CPR = D / 8;     // 16-byte chunks per row
  constexpr int RS = 128 / CPR;  // rows between a thread's copies
  static_assert(RS % 8 == 0 && ROWS % RS == 0, "tile rows must split over 128 threads in steps of 8");
  const int c = t % CPR, r_first = t / CPR;
  const uint32_t dst0 = sw128_offset<ROWS>(r_first, c);
  const int64_t off = (pos0 + stride * r_first) * D + c * 8;
  const int64_t step = stride * RS * D;
  const int nvalid = nrows - r_first;
#pragma unroll
  for (int i = 0; i < ROWS / RS; ++i) {
    const bool ok = RS * i < nvalid;
    cuda_detail::cp_async16(tile + dst0 + RS * 128 * i, ok ? src + off + step * i : src, ok);
  }
}

// ---- warpgroup MMA ----------------------------------------------------------
// Accumulator fragment of m64nN (f32): warp w of the warpgroup holds rows
// 16w..16w+15; d[j][0..1] = row lane/4, cols 8j + 2(lane%4) + {0,1};
// d[j][2..3] = the same cols of row lane/4 + 8 (the mma.sync m16n8 C layout
// repeated over N/8 tiles). A from registers uses the mma.sync A layout.
#include "wgmma_ops.inc"

// KS k16 steps of an SS GEMM (d = A B^T over K = 16 KS), both operands K-major
// SW128 tiles (sw128_offset<A_ROWS> / <B_ROWS>, a slab of 64 K-elements per
// A_ROWS / B_ROWS rows; the first step overwrites d). Issue only: fence, commit
// and wait are the caller's.
template <int KS, int A_ROWS, int B_ROWS, int NT, typename T>
__device__ __forceinline__ void wgmma_ss_kmajor(float (&d)[NT][4], uint32_t a_addr, uint32_t b_addr, T) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const uint64_t da = make_desc(a_addr + (ks / 4) * A_ROWS * 128 + (ks % 4) * 32, 16, 1024);
    const uint64_t db = make_desc(b_addr + (ks / 4) * B_ROWS * 128 + (ks % 4) * 32, 16, 1024);
    wgmma_ss<0, 0>(d, da, db, ks > 0, T{});
  }
}

// KK k16 steps of an RS GEMM (d += A B, A from registers in the mma.sync A
// layout), B read MN-major from a SW128 tile of B_ROWS rows that are the k
// dimension (V in P V; LBO = slab stride, 16 rows = 2048 bytes per step).
template <int KK, int B_ROWS, int NT, typename T>
__device__ __forceinline__ void wgmma_rs_mnmajor(float (&d)[NT][4], const uint32_t (&a)[KK][4], uint32_t b_addr, T) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) wgmma_rs<1>(d, a[kk], make_desc(b_addr + kk * 2048, B_ROWS * 128, 1024), 1, T{});
}

// A from registers (per k16 step, the m16n8k16 A fragment of the warp's 16
// rows), B K-major: D (+)= A B^T.
template <int KS, int B_ROWS, int NT, typename T>
__device__ __forceinline__ void wgmma_rs_kmajor(float (&d)[NT][4], const uint32_t (&a)[KS][4], uint32_t b_addr, T) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    wgmma_rs<0>(d, a[ks], make_desc(b_addr + (ks / 4) * B_ROWS * 128 + (ks % 4) * 32, 16, 1024), ks > 0, T{});
}

// The A fragments of rows row0 .. row0 + 15 of a K-major sw128 tile of ROWS
// rows, for every k16 step: ldmatrix x4 reads (rows 0-7, k 0-7), (rows 8-15,
// k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15), the fragment's a[0..3].
template <int ROWS, int KS>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[KS][4], const unsigned char* tile, int row0, int lane) {
  const int r = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    cuda_detail::ldmatrix_x4(a[ks], cuda_detail::smem_u32(tile + sw128_offset<ROWS>(r, 2 * ks + (lane >> 4))));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads or writes of a register that an
// in-flight wgmma owns across the wgmma_wait / issue that guards it.
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }
template <int A, int B>
__device__ __forceinline__ void reg_fence(float (&x)[A][B]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j) reg_fence(x[i][j]);
}
template <int A, int B>
__device__ __forceinline__ void reg_fence(uint32_t (&x)[A][B]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j) reg_fence(x[i][j]);
}

// cp.async writes through the generic proxy, wgmma reads through the async
// proxy: order them after the data is known to have landed.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- mbarriers ----------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// One arrival on `bar` once every cp.async this thread issued so far has
// landed (the barrier's expected count includes it: .noinc).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// The mbarriers of the three warp-specialized kernels, 8 bytes each from bar0:
// one for the operand loaded once per CTA (forward / dQ: Q (and dO); dK/dV: K
// and V), then per ring stage two "full" barriers for the two streamed operands
// (K and V; Q and dO) and one "empty". A full barrier completes on one
// cp.async arrival per producer thread, an empty one on one arrival per
// consumer warp.
template <int STAGES>
struct RingBarriers {  // 1 + 3 * STAGES barriers (the kernels' NBARS)
  uint32_t bar0;
  __device__ __forceinline__ uint32_t once() const { return bar0; }
  __device__ __forceinline__ uint32_t full0(int st) const { return bar0 + 8 * (1 + st); }
  __device__ __forceinline__ uint32_t full1(int st) const { return bar0 + 8 * (1 + STAGES + st); }
  __device__ __forceinline__ uint32_t empty(int st) const { return bar0 + 8 * (1 + 2 * STAGES + st); }
  // By thread 0, before the CTA's first __syncthreads.
  __device__ __forceinline__ void init() const {
    mbar_init(once(), 128);
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full0(st), 128);
      mbar_init(full1(st), 128);
      mbar_init(empty(st), 8);
    }
    mbar_init_fence();
  }
  // Use `it` of the ring (stage it % STAGES, phase it / STAGES).
  // Consumer: wait until the stage's first / second operand has landed.
  __device__ __forceinline__ void wait_full0(int it) const { mbar_wait(full0(it % STAGES), (it / STAGES) & 1); }
  __device__ __forceinline__ void wait_full1(int it) const { mbar_wait(full1(it % STAGES), (it / STAGES) & 1); }
  // Consumer warp: hand the stage back (one arrival per warp).
  __device__ __forceinline__ void release(int it, int lane) const {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(it % STAGES));
  }
  // Producer: wait until every consumer warp released the stage's previous use.
  __device__ __forceinline__ void wait_empty(int it) const {
    if (it >= STAGES) mbar_wait(empty(it % STAGES), (it / STAGES - 1) & 1);
  }
};

// Producer loop of the query-tile kernels (forward, dQ): the tile's key blocks
// (cuda_detail::KeyBlocks, or CacheBlocks over a compressed cache) of K and V
// into the ring, K completing full0, V full1. A block's rows are consecutive
// keys (sink / window / cached rows) or gists ratio + 1 positions apart: a
// constant-stride gather; rows past the block's end are zero-filled (masked in
// S, and a zero row keeps 0 * garbage from becoming NaN).
template <int BN, int D, int STAGES, typename T, typename KB>
__device__ __forceinline__ void produce_kv_blocks(const RingBarriers<STAGES>& bars, const KB& kb,
                                                  int nblocks, const cuda_detail::Layout32& l, const T* kg,
                                                  const T* vg, unsigned char* sK, unsigned char* sV, int t) {
  constexpr int KV_BYTES = BN * D * 2;
  for (int it = 0; it < nblocks; ++it) {
    const int st = it % STAGES;
    bars.wait_empty(it);
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    int64_t pos0, stride;
    kb.rows(kind, first, l, pos0, stride);
    gather_rows<BN, D>(sK + st * KV_BYTES, kg, pos0, stride, end - first, t);
    cp_async_arrive(bars.full0(st));
    gather_rows<BN, D>(sV + st * KV_BYTES, vg, pos0, stride, end - first, t);
    cp_async_arrive(bars.full1(st));
  }
  cuda_detail::cp_async_wait<0>();
}

// Epilogue of the query-tile kernels (forward O, dQ): the warp's 16 rows of an
// m64 accumulator (tile rows wrow + lane / 4 in acc[.][0..1], + 8 in [2..3]),
// times mul[0] / mul[1], in T, staged in the same rows of a sw128 tile of ROWS
// rows that no other warp reads any more, then written to dst (tile row r at
// dst + r * D) in 16-byte chunks; rows from rows_here on are left out.
template <int ROWS, typename T, int DT>
__device__ __forceinline__ void store_rows_via_smem(unsigned char* tile, const float (&acc)[DT][4],
                                                    const float (&mul)[2], T* dst, int wrow, int rows_here,
                                                    int lane) {
  using TT = cuda_detail::TypeTraits<T>;
  constexpr int D = DT * 8;
  const int r0 = wrow + lane / 4;
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    *reinterpret_cast<uint32_t*>(tile + sw128_offset<ROWS>(r0, i) + 4 * (lane & 3)) =
        TT::pack(acc[i][0] * mul[0], acc[i][1] * mul[0]);
    *reinterpret_cast<uint32_t*>(tile + sw128_offset<ROWS>(r0 + 8, i) + 4 * (lane & 3)) =
        TT::pack(acc[i][2] * mul[1], acc[i][3] * mul[1]);
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * DT / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = wrow + idx / DT, c = idx % DT;
    if (r < rows_here) {
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(r) * D + c * 8) =
          *reinterpret_cast<const uint4*>(tile + sw128_offset<ROWS>(r, c));
    }
  }
}

template <int N>
__device__ __forceinline__ void reg_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void reg_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

#endif  // UNIGIST_SM90A

}  // namespace sm90
}  // namespace unigist
