// CUDA implementation of unigist::evict_kv: in-place, order-preserving removal
// of the KV rows that no future query can see any more.
//
// 1. one kernel writes keep flags (layout::keep_for_future) for rows [0, length),
//    an index sequence 0..length-1, and the first dropped row (atomicMin);
// 2. cub::DeviceSelect::Flagged compacts the indices of the kept rows;
// 3. the kept count and the first dropped row come back to the host in one copy
//    (the op returns an int, so this synchronisation is part of its contract);
// 4. rows [first_drop, kept) are gathered from their source rows into a
//    temporary and written back (two passes, so no row is overwritten before
//    it is read). Rows before the first dropped row never move.
// Every temporary comes from the torch caching allocator; everything runs on
// the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/device/device_select.cuh>

#include <cstdint>

#include "cpu/evict_checks.h"
#include "layout.h"
#include "ops.h"

namespace unigist {
namespace {

constexpr int kThreads = 256;

__global__ void keep_flags_kernel(const int64_t* __restrict__ pos, int64_t pos_stride,
                                  int64_t length, layout::GistLayout l, int64_t next_query,
                                  uint8_t* __restrict__ flags, int64_t* __restrict__ iota,
                                  unsigned long long* __restrict__ first_drop) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < length;
       i += step) {
    const bool keep = layout::keep_for_future(pos[i * pos_stride], next_query, l);
    flags[i] = keep ? 1 : 0;
    iota[i] = i;
    if (!keep) atomicMin(first_drop, static_cast<unsigned long long>(i));
  }
}

// Copies `rows` rows of every (b, h) from src to dst. Source row r is
// src_rows[r] when src_rows is given, else src_row0 + r; destination row is
// dst_row0 + r. Strides are in bytes; a row is `vecs` elements of type V.
template <typename V>
__global__ void copy_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                 const int64_t* __restrict__ src_rows, int64_t src_row0,
                                 int64_t dst_row0, int64_t heads, int64_t rows, int64_t vecs,
                                 int64_t src_sb, int64_t src_sh, int64_t src_sr, int64_t dst_sb,
                                 int64_t dst_sh, int64_t dst_sr, int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += step) {
    const int64_t v = t % vecs;
    const int64_t r = (t / vecs) % rows;
    const int64_t bh = t / (vecs * rows);
    const int64_t b = bh / heads;
    const int64_t h = bh % heads;
    const int64_t sr = src_rows != nullptr ? src_rows[r] : src_row0 + r;
    const V* s = reinterpret_cast<const V*>(src + b * src_sb + h * src_sh + sr * src_sr);
    V* d = reinterpret_cast<V*>(dst + b * dst_sb + h * dst_sh + (dst_row0 + r) * dst_sr);
    d[v] = s[v];
  }
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks < 1 ? 1 : blocks) : 65535 * 8);
}

template <typename V>
void launch_copy_rows(const at::Tensor& src, at::Tensor& dst, const int64_t* src_rows,
                      int64_t src_row0, int64_t dst_row0, int64_t rows, cudaStream_t stream) {
  const int64_t es = src.element_size();
  const int64_t vecs = src.size(3) * es / static_cast<int64_t>(sizeof(V));
  const int64_t total = src.size(0) * src.size(1) * rows * vecs;
  if (total == 0) return;
  copy_rows_kernel<V><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()), src_rows,
      src_row0, dst_row0, src.size(1), rows, vecs, src.stride(0) * es, src.stride(1) * es,
      src.stride(2) * es, dst.stride(0) * es, dst.stride(1) * es, dst.stride(2) * es, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Widest vector that divides every byte offset the kernel forms.
int64_t vector_bytes(const at::Tensor& a, const at::Tensor& b) {
  const int64_t es = a.element_size();
  int64_t g = a.size(3) * es;
  for (const at::Tensor* t : {&a, &b}) {
    for (int d = 0; d < 3; ++d) g |= t->stride(d) * es;
    g |= static_cast<int64_t>(reinterpret_cast<uintptr_t>(t->data_ptr()));
  }
  for (int64_t w : {16, 8, 4, 2}) {
    if (g % w == 0) return w;
  }
  return 1;
}

void copy_rows(const at::Tensor& src, at::Tensor& dst, const int64_t* src_rows, int64_t src_row0,
               int64_t dst_row0, int64_t rows, cudaStream_t stream) {
  switch (vector_bytes(src, dst)) {
    case 16: launch_copy_rows<uint4>(src, dst, src_rows, src_row0, dst_row0, rows, stream); break;
    case 8: launch_copy_rows<uint2>(src, dst, src_rows, src_row0, dst_row0, rows, stream); break;
    case 4: launch_copy_rows<uint32_t>(src, dst, src_rows, src_row0, dst_row0, rows, stream); break;
    case 2: launch_copy_rows<uint16_t>(src, dst, src_rows, src_row0, dst_row0, rows, stream); break;
    default: launch_copy_rows<uint8_t>(src, dst, src_rows, src_row0, dst_row0, rows, stream); break;
  }
}

// Moves rows src_rows[0..moved) of t to rows [first, first + moved).
void compact_tensor(at::Tensor& t, const at::Tensor& src_rows, int64_t first, int64_t moved,
                    cudaStream_t stream) {
  if (t.size(3) == 0 || t.size(0) == 0 || t.size(1) == 0) return;
  if (t.stride(3) != 1) {
    // Rare layout (strided last dim): let ATen gather through a temporary.
    t.narrow(2, first, moved).copy_(t.index_select(2, src_rows));
    return;
  }
  at::Tensor tmp = at::empty({t.size(0), t.size(1), moved, t.size(3)}, t.options());
  copy_rows(t, tmp, src_rows.data_ptr<int64_t>(), 0, 0, moved, stream);
  copy_rows(tmp, t, nullptr, 0, first, moved, stream);
}

}  // namespace

int64_t evict_kv_cuda(at::Tensor& key, at::Tensor& value, at::Tensor& positions,
                      int64_t length, int64_t ratio, int64_t window, int64_t num_sink,
                      int64_t next_query) {
  check_evict_inputs("unigist::evict_kv (CUDA)", key, value, positions, length, ratio, window,
                     num_sink, next_query);
  TORCH_CHECK(key.is_cuda(), "unigist::evict_kv (CUDA): key must be a CUDA tensor, got ",
              key.device());
  if (length == 0) return 0;

  const c10::cuda::CUDAGuard guard(key.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const layout::GistLayout l{ratio, window, num_sink};
  const auto long_opts = positions.options().dtype(at::kLong);

  at::Tensor flags = at::empty({length}, positions.options().dtype(at::kByte));
  at::Tensor iota = at::empty({length}, long_opts);
  at::Tensor kept_idx = at::empty({length}, long_opts);
  // counts[0]: kept rows (written by CUB), counts[1]: first dropped row.
  at::Tensor counts = at::full({2}, length, long_opts);

  keep_flags_kernel<<<grid_for(length), kThreads, 0, stream>>>(
      positions.data_ptr<int64_t>(), positions.stride(0), length, l, next_query,
      flags.data_ptr<uint8_t>(), iota.data_ptr<int64_t>(),
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>() + 1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSelect::Flagged(nullptr, temp_bytes, iota.data_ptr<int64_t>(),
                                            flags.data_ptr<uint8_t>(),
                                            kept_idx.data_ptr<int64_t>(),
                                            counts.data_ptr<int64_t>(), length, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes) + 1},
                              positions.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceSelect::Flagged(temp.data_ptr(), temp_bytes,
                                            iota.data_ptr<int64_t>(), flags.data_ptr<uint8_t>(),
                                            kept_idx.data_ptr<int64_t>(),
                                            counts.data_ptr<int64_t>(), length, stream));

  const at::Tensor host = counts.to(at::kCPU);  // synchronises the current stream
  const int64_t kept = host[0].item<int64_t>();
  const int64_t first_drop = host[1].item<int64_t>();
  TORCH_INTERNAL_ASSERT(kept >= 0 && kept <= length && first_drop <= kept + (length - kept),
                        "unigist::evict_kv (CUDA): inconsistent compaction result");
  if (first_drop >= length) return length;  // nothing dropped
  const int64_t moved = kept - first_drop;
  if (moved == 0) return kept;

  const at::Tensor src_rows = kept_idx.narrow(0, first_drop, moved);
  compact_tensor(key, src_rows, first_drop, moved, stream);
  compact_tensor(value, src_rows, first_drop, moved, stream);
  positions.narrow(0, first_drop, moved).copy_(positions.index_select(0, src_rows));
  return kept;
}

}  // namespace unigist

#ifdef UNIGIST_EVICT_SELF_REGISTER
// Only for builds that compile ops.cpp without the CUDA attention kernels
// (benchmarks/bench_generate.py --fallback-build): register the CUDA eviction
// op here. The regular build registers it in ops.cpp.
#include <torch/library.h>
TORCH_LIBRARY_IMPL(unigist, CUDA, m) { m.impl("evict_kv", &unigist::evict_kv_cuda); }
#endif
