// Hopper (sm_90a) PTX wrappers of the wgmma kernels: 128-byte swizzled tiles
// and their shared-memory matrix descriptors, warpgroup MMA, wgmma fences,
// mbarriers, cp.async completion on an mbarrier, register reallocation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/ptx.cuh"  // ldmatrix_x4, smem_u32

// Built only for sm_90a (setup.py compiles csrc/cuda/sm90/ as its own set).
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "csrc/cuda/sm90 needs -gencode arch=compute_90a,code=sm_90a"
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

// The descriptor of the address `off` bytes past d's: the start field holds
// address bits 4..17 in the low word, and every shared-memory address of a CTA
// is below 2^18, so off / 16 is added to the low word alone (no carry into the
// LBO field, no 64-bit add), where make_desc would redo the mask and shifts.
__device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t off) {
  const uint32_t lo = static_cast<uint32_t>(d) + (off >> 4), hi = static_cast<uint32_t>(d >> 32);
  return (static_cast<uint64_t>(hi) << 32) | lo;
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
  const uint64_t da = make_desc(a_addr, 16, 1024), db = make_desc(b_addr, 16, 1024);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    wgmma_ss<0, 0>(d, desc_add(da, (ks / 4) * A_ROWS * 128 + (ks % 4) * 32),
                   desc_add(db, (ks / 4) * B_ROWS * 128 + (ks % 4) * 32), ks > 0, T{});
}

// KK k16 steps of an RS GEMM (d += A B, A from registers in the mma.sync A
// layout), B read MN-major from a SW128 tile of B_ROWS rows that are the k
// dimension (V in P V; LBO = slab stride, 16 rows = 2048 bytes per step).
template <int KK, int B_ROWS, int NT, typename T>
__device__ __forceinline__ void wgmma_rs_mnmajor(float (&d)[NT][4], const uint32_t (&a)[KK][4], uint32_t b_addr, T) {
  const uint64_t db = make_desc(b_addr, B_ROWS * 128, 1024);
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) wgmma_rs<1>(d, a[kk], desc_add(db, kk * 2048), 1, T{});
}

// A from registers (per k16 step, the m16n8k16 A fragment of the warp's 16
// rows), B K-major: D (+)= A B^T.
template <int KS, int B_ROWS, int NT, typename T>
__device__ __forceinline__ void wgmma_rs_kmajor(float (&d)[NT][4], const uint32_t (&a)[KS][4], uint32_t b_addr, T) {
  const uint64_t db = make_desc(b_addr, 16, 1024);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    wgmma_rs<0>(d, a[ks], desc_add(db, (ks / 4) * B_ROWS * 128 + (ks % 4) * 32), ks > 0, T{});
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

// x, as a value the compiler must compute where it is used: what is derived
// from it (descriptors) is then not hoisted out of a loop (to be spilled).
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
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

template <int N>
__device__ __forceinline__ void reg_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void reg_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace sm90
}  // namespace unigist
