// K/V key blocks through the Tensor Memory Accelerator (TMA) for the
// query-tile kernels (forward and dQ) over the interleaved layout, and the
// query steps (Q, dO rows) of the dK/dV kernel.
//
// Why: with cp.async the producer warpgroup issues 16 bytes per thread per copy
// (32 copies per thread per 128-key block at D=128) plus their addresses, issue
// slots the consumer warpgroups share on every SM sub-partition; a diagnostic
// build without K/V loads ran the 32k forward 10% faster (NOTES v12). One TMA
// instruction per 64-column slab moves a whole block, issued by one thread.
//
// A key block is consecutive rows (sinks, window) or gists ratio + 1 rows apart
// (KeyBlocks::rows), so two 4-d tensor maps per operand cover every block with
// a constant row coordinate step of 1: `rows` over [D, Nk, Hkv, B] and `gists`
// over [D, gists, Hkv, B], based at the first gist's row with a row stride of
// ratio + 1 rows. TMA writes the 128-byte swizzle that sw128_offset describes
// (16-byte chunk c of row r at chunk c ^ (r % 8), 1024-byte atoms), and fills
// rows past the tensor's end with zeros. Rows past a block's end but inside
// the tensor are real keys: the kernels mask every partial block
// (block_needs_mask), so their P is exactly 0.
//
// The tensor maps are built on the host per call (cuTensorMapEncodeTiled,
// reached through the runtime's driver entry point: no link to libcuda) and
// passed as a __grid_constant__ kernel parameter.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/params.cuh"

namespace unigist {
namespace cuda_detail {

struct KvTensorMaps {  // aligned as CUtensorMap requires
  CUtensorMap k_rows, v_rows, k_gists, v_gists;
  int on;  // 0: the kernels gather with cp.async (these maps unset)
};

// The dK/dV kernel's query steps: Q and dO rows [D, Nq, Hq, B] (rows past Nq
// zero-filled), boxes of 64 query rows x 64 columns.
struct QdoTensorMaps {
  CUtensorMap q, dout;
  int on;
};

// Whether the wgmma kernels load K/V (forward, dQ) and Q/dO (dK/dV) through
// TMA: yes unless UNIGIST_SM90_TMA=0 (read on every call, for A/B runs). H200,
// 32k r=4 D=128: forward 6%, forward+backward 5% faster (NOTES.md v15).
bool sm90_tma_enabled();

// Fills maps for the K/V of p with boxes of box_rows rows x 64 columns, or
// leaves maps.on = 0 when TMA is off or cannot describe the tensors (a stride
// or base address not a multiple of 16 bytes, a driver without the entry point).
void make_kv_tensor_maps(const AttnParams& p, bool bf16, int head_dim, int box_rows, KvTensorMaps& maps);
// The same for the Q and dO of p (boxes of box_rows query rows).
void make_qdo_tensor_maps(const AttnParams& p, bool bf16, int head_dim, int box_rows, QdoTensorMaps& maps);

namespace sm90_tma {

__device__ __forceinline__ void prefetch(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// One arrival on bar that also expects `bytes` more of transaction count.
__device__ __forceinline__ void arrive_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// The box at (col, row, head, batch) of map into shared memory at dst; its bytes
// count against bar's transaction count.
__device__ __forceinline__ void load_4d(uint32_t dst, const CUtensorMap* map, int col, int row, int head,
                                        int batch, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(bar)
      : "memory");
}

}  // namespace sm90_tma
}  // namespace cuda_detail
}  // namespace unigist
