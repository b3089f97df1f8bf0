// The warp-specialized skeleton of the three sm_90a kernels (forward, dQ,
// dK/dV): the 1024-byte aligned shared-memory carve-up, the mbarrier ring, the
// producer / consumer split with its register reallocation, the persistent
// loop's work queue, the consumers' turns (ping-pong), the producer's gather
// of row tiles and the query-tile kernels' K/V producer loop and epilogue. A
// kernel brings its GEMMs and softmax; the rest is here once.
#pragma once

#include <cstdint>

#include "cuda/key_visit.cuh"
#include "cuda/ptx.cuh"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace unigist {
namespace sm90 {

// A CTA is warpgroup 0 (the producer) and `consumers` consumer warpgroups of
// 64 rows or keys each: 2 in the dK/dV kernels and, at D=128, in the forward
// and dQ; 3 in the forward and dQ at D=64 (fwd_sm90.cu says why).
constexpr int threads_for(int consumers) { return 128 * (1 + consumers); }
constexpr int kThreads = threads_for(2);

// The dynamic shared memory from its first 1024-byte boundary (the swizzle
// atoms' alignment; a kernel asks for 1024 bytes more than it takes), handed
// out in order.
struct SmemCarver {
  unsigned char* next;
  __device__ __forceinline__ explicit SmemCarver(unsigned char* raw)
      : next(raw + ((1024 - (cuda_detail::smem_u32(raw) & 1023)) & 1023)) {}
  __device__ __forceinline__ unsigned char* take(int bytes) {
    unsigned char* p = next;
    next += bytes;
    return p;
  }
};

// ---- producer gather of a row tile ---------------------------------------------
// The 128 threads of a producer warpgroup copy a tile of ROWS rows x D 16-bit
// elements into the SW128 layout (sw128_offset<ROWS>). Tile row r is source row
// pos0 + stride * r (stride 1: consecutive rows, as Q tiles and sink / window
// keys; ratio + 1: packed gists), ld elements apart, for r < nrows; later rows are zero-filled
// (source not read). Thread t copies chunk t % CPR of tile rows t / CPR + RS * i,
// so its source address moves by a constant step and its swizzled destination by
// RS rows (RS a multiple of 8 keeps the XOR pattern): no per-row layout math.
// Completion is the caller's (cp_async_arrive on an mbarrier).
template <int ROWS, int D, typename T>
__device__ __forceinline__ void gather_rows(unsigned char* tile, const T* src, int64_t pos0, int64_t stride,
                                            int ld, int nrows, int t) {
  constexpr int CPR = D / 8;     // 16-byte chunks per row
  constexpr int RS = 128 / CPR;  // rows between a thread's copies
  static_assert(RS % 8 == 0 && ROWS % RS == 0, "tile rows must split over 128 threads in steps of 8");
  const int c = t % CPR, r_first = t / CPR;
  const uint32_t dst0 = sw128_offset<ROWS>(r_first, c);
  const int64_t off = (pos0 + stride * r_first) * ld + c * 8;
  const int64_t step = stride * RS * ld;
  const int nvalid = nrows - r_first;
#pragma unroll
  for (int i = 0; i < ROWS / RS; ++i) {
    const bool ok = RS * i < nvalid;
    cuda_detail::cp_async16(tile + dst0 + RS * 128 * i, ok ? src + off + step * i : src, ok);
  }
}

// The mbarriers of the three warp-specialized kernels, 8 bytes each from bar0:
// one for the operand loaded once per CTA (forward / dQ: Q (and dO); dK/dV: K
// and V), then per ring stage two "full" barriers for the two streamed operands
// (K and V; Q and dO) and one "empty". A full barrier completes on one
// cp.async arrival per producer thread (full_arrivals = 128), or on the one
// arrival of the thread issuing TMA loads plus their bytes (forward, dQ: 1;
// dK/dV, whose lse and delta stay cp.async: 128 + 1); an empty one on one
// arrival per consumer warp (4 per consumer warpgroup).
template <int STAGES, int CONSUMERS = 2>
struct RingBarriers {  // 1 + 3 * STAGES barriers (the kernels' NBARS)
  static constexpr int kStages = STAGES;
  uint32_t bar0;
  int full_arrivals = 128;
  __device__ __forceinline__ uint32_t once() const { return bar0; }
  __device__ __forceinline__ uint32_t full0(int st) const { return bar0 + 8 * (1 + st); }
  __device__ __forceinline__ uint32_t full1(int st) const { return bar0 + 8 * (1 + STAGES + st); }
  __device__ __forceinline__ uint32_t empty(int st) const { return bar0 + 8 * (1 + 2 * STAGES + st); }
  // By thread 0, before the CTA's first __syncthreads.
  __device__ __forceinline__ void init() const {
    mbar_init(once(), 128);
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full0(st), full_arrivals);
      mbar_init(full1(st), full_arrivals);
      mbar_init(empty(st), 4 * CONSUMERS);
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

// Work items of a persistent CTA (the dK/dV kernel's key blocks). Its first
// item is blockIdx.x; thread 0 takes the next ones from `counter` (zeroed by
// the launcher; item = count + gridDim.x) one ahead, so the atomic's latency
// hides, and hands each to every warp through two shared slots with full /
// empty mbarriers. counter == nullptr: a CTA per item (gridDim.x =
// items), and fetch(1) is -1 without a barrier round. Each thread holds its own
// copy; `upcoming` is thread 0's.
struct WorkQueue {
  volatile int* slots;  // 2 ints of shared memory
  uint32_t bar0;        // 4 mbarriers, 8 bytes each: full[2], empty[2]
  int* counter;
  int warps;            // warps of the CTA (each reads every item)
  int upcoming = 0;
  __device__ __forceinline__ uint32_t full(int slot) const { return bar0 + 8 * slot; }
  __device__ __forceinline__ uint32_t empty(int slot) const { return bar0 + 8 * (2 + slot); }
  // By thread 0 before warp_specialize (whose barrier init fences these).
  __device__ __forceinline__ void init() {
    for (int slot = 0; slot < 2; ++slot) {
      mbar_init(full(slot), 1);
      mbar_init(empty(slot), warps);
    }
    if (counter != nullptr) upcoming = atomicAdd(counter, 1) + static_cast<int>(gridDim.x);
  }
  // The CTA's j-th item, called by every thread for j = 0, 1, ... in turn; -1
  // (or >= n_items): no more.
  __device__ __forceinline__ int fetch(int j, int n_items) {
    if (j == 0) return blockIdx.x;
    if (counter == nullptr) return -1;
    const int m = j - 1, slot = m & 1;
    if (threadIdx.x == 0) {
      if (m >= 2) mbar_wait(empty(slot), ((m >> 1) - 1) & 1);
      const int item = upcoming < n_items ? upcoming : -1;
      if (item >= 0) upcoming = atomicAdd(counter, 1) + static_cast<int>(gridDim.x);
      slots[slot] = item;
      mbar_arrive(full(slot));
    }
    mbar_wait(full(slot), (m >> 1) & 1);
    const int item = slots[slot];
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(empty(slot));
    return item;
  }
};

// Runs producer() on warpgroup 0 and consumer(wg, warp, lane) on
// the other warpgroups (wg 0, 1, ..., warp in the warpgroup), each with its
// register share, once thread 0 has initialized the barriers. setmaxnreg only
// takes effect when the two roles are the two branches of one if/else: that
// shape lives here, once.
template <int PRODUCER_REGS, int CONSUMER_REGS, typename Bars, typename Producer, typename Consumer>
__device__ __forceinline__ void warp_specialize(const Bars& bars, const Producer& producer,
                                                const Consumer& consumer) {
  if (threadIdx.x == 0) bars.init();
  __syncthreads();
  if (threadIdx.x < 128) {
    reg_dealloc<PRODUCER_REGS>();
    producer();
  } else {
    reg_alloc<CONSUMER_REGS>();
    consumer(static_cast<int>(threadIdx.x / 128 - 1), static_cast<int>((threadIdx.x / 32) & 3),
             static_cast<int>(threadIdx.x & 31));
  }
}

// FlashAttention-3's ping-pong, for the query-tile kernels (forward, dQ): the
// consumer warpgroups take turns issuing their GEMMs, in the ring 0, 1, ...,
// CONSUMERS - 1, 0, ... Named barrier 1 + wg is consumer wg's turn: its 128
// threads wait there (wait), the previous consumer's 128 arrive (pass). Free
// drift lets the consumers fall into step (they wait on the same K/V stage), so
// their GEMMs queue together and then their softmaxes leave the tensor cores
// idle together; taking turns keeps one consumer's softmax under the others'
// GEMMs. Every consumer takes the same number of turns per tile: begin() before
// the first, pass_last() after the last (the ring's last consumer does not
// hand on, so no arrival is left pending). on == false: no-ops.
template <int CONSUMERS>
struct ConsumerTurns {
  static_assert(CONSUMERS >= 2 && CONSUMERS <= 3, "named barriers 1..CONSUMERS");
  int wg;
  bool on;
  __device__ __forceinline__ void begin() const {
    if (on && wg == CONSUMERS - 1) arrive_next();
  }
  __device__ __forceinline__ void wait() const {
    if (on) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg) : "memory");
  }
  __device__ __forceinline__ void pass() const {
    if (on) arrive_next();
  }
  __device__ __forceinline__ void pass_last() const {
    if (on && wg != CONSUMERS - 1) arrive_next();
  }

 private:
  __device__ __forceinline__ void arrive_next() const {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + (wg + 1) % CONSUMERS) : "memory");
  }
};

// Producer loop of the query-tile kernels (forward, dQ): the tile's key blocks
// (cuda_detail::KeyBlocks, or CacheBlocks over a compressed cache) of K and V
// into the ring, K completing full0, V full1. A block's rows are consecutive
// keys (sink / window / cached rows) or gists ratio + 1 positions apart: a
// constant-stride gather; rows past the block's end are zero-filled (masked in
// S, and a zero row keeps 0 * garbage from becoming NaN).
template <int BN, int D, typename Bars, typename T, typename KB>
__device__ __forceinline__ void produce_kv_blocks(const Bars& bars, const KB& kb,
                                                  int nblocks, const cuda_detail::Layout32& l, const T* kg,
                                                  const T* vg, int kv_ld, unsigned char* sK, unsigned char* sV,
                                                  int t) {
  constexpr int KV_BYTES = BN * D * 2, STAGES = Bars::kStages;
  for (int it = 0; it < nblocks; ++it) {
    const int st = it % STAGES;
    bars.wait_empty(it);
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    int64_t pos0, stride;
    kb.rows(kind, first, l, pos0, stride);
    gather_rows<BN, D>(sK + st * KV_BYTES, kg, pos0, stride, kv_ld, end - first, t);
    cp_async_arrive(bars.full0(st));
    gather_rows<BN, D>(sV + st * KV_BYTES, vg, pos0, stride, kv_ld, end - first, t);
    cp_async_arrive(bars.full1(st));
  }
  cuda_detail::cp_async_wait<0>();
}

// The same loop through TMA (tma.cuh), run by one producer thread: per block a
// box of BN rows x 64 columns per 64-column slab of K, then of V, from the
// `rows` maps (consecutive keys) or the `gists` maps (gist index first: the
// gists' rows are consecutive in that map). The ring's full barriers count one
// arrival (RingBarriers::full_arrivals = 1) and the boxes' bytes.
template <int BN, int D, typename Bars>
__device__ __forceinline__ void produce_kv_blocks_tma(const Bars& bars, const cuda_detail::KeyBlocks& kb,
                                                      int nblocks, const cuda_detail::KvTensorMaps& maps,
                                                      int kv_head, int batch, unsigned char* sK,
                                                      unsigned char* sV) {
  namespace tma = cuda_detail::sm90_tma;
  constexpr int KV_BYTES = BN * D * 2, STAGES = Bars::kStages, SLAB = BN * 128;
  tma::prefetch(&maps.k_rows);
  tma::prefetch(&maps.v_rows);
  tma::prefetch(&maps.k_gists);
  tma::prefetch(&maps.v_gists);
  const uint32_t k0 = cuda_detail::smem_u32(sK), v0 = cuda_detail::smem_u32(sV);
  for (int it = 0; it < nblocks; ++it) {
    const int st = it % STAGES;
    bars.wait_empty(it);
    int kind, first, end;
    kb.block(it, BN, kind, first, end);
    const bool gist = kind == 1;
    tma::arrive_expect(bars.full0(st), KV_BYTES);
#pragma unroll
    for (int slab = 0; slab < D / 64; ++slab)
      tma::load_4d(k0 + st * KV_BYTES + slab * SLAB, gist ? &maps.k_gists : &maps.k_rows, slab * 64, first, kv_head,
                   batch, bars.full0(st));
    tma::arrive_expect(bars.full1(st), KV_BYTES);
#pragma unroll
    for (int slab = 0; slab < D / 64; ++slab)
      tma::load_4d(v0 + st * KV_BYTES + slab * SLAB, gist ? &maps.v_gists : &maps.v_rows, slab * 64, first, kv_head,
                   batch, bars.full1(st));
  }
}

// Epilogue of the query-tile kernels (forward O, dQ): the warp's 16 rows of an
// m64 accumulator (tile rows wrow + lane / 4 in acc[.][0..1], + 8 in [2..3]),
// times mul[0] / mul[1], in T, staged in the same rows of a sw128 tile of ROWS
// rows that no other warp reads any more, then written to dst (tile row r at
// dst + r * row_stride) in 16-byte chunks; rows from rows_here on are left out.
template <int ROWS, typename T, int DT>
__device__ __forceinline__ void store_rows_via_smem(unsigned char* tile, const float (&acc)[DT][4],
                                                    const float (&mul)[2], T* dst, int64_t row_stride, int wrow,
                                                    int rows_here, int lane) {
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
      *reinterpret_cast<uint4*>(dst + r * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(tile + sw128_offset<ROWS>(r, c));
    }
  }
}

}  // namespace sm90
}  // namespace unigist
