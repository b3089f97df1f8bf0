// Host side of tma.cuh: the K/V tensor maps of the query-tile kernels.
#include "cuda/sm90/tma.cuh"

#include <atomic>
#include <cstdio>

#include "cuda/launch.h"

namespace unigist {
namespace cuda_detail {

bool sm90_tma_enabled() { return !env_is("UNIGIST_SM90_TMA", "0"); }

namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  // Looked up once; nullptr when the driver lacks it (then the kernels gather
  // with cp.async).
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A 4-d map [D, rows, heads, batch] of 16-bit elements at base; strides in
// elements (row, head, batch). A dim of size 1 is never stepped: its stride is
// set to a harmless multiple of 16 bytes (the entry points pass 0 for it).
bool encode(EncodeTiled fn, CUtensorMap& map, bool bf16, const void* base, int D, int64_t rows, int heads,
            int batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const int64_t st[3] = {row_stride, heads == 1 ? 8 : head_stride, batch == 1 ? 8 : batch_stride};
  cuuint64_t strides[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t bytes = st[i] * 2;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t{1} << 40)) return false;
    strides[i] = static_cast<cuuint64_t>(bytes);
  }
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || rows < 1) return false;
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = fn(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                        const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    // Tensors that pass the checks above should always encode: say so (once)
    // rather than fall back unseen; the results stay right either way.
    static std::atomic<bool> told{false};
    if (!told.exchange(true))
      std::fprintf(stderr, "unigist: cuTensorMapEncodeTiled failed (CUresult %d); K/V gathered with cp.async\n",
                   static_cast<int>(r));
    return false;
  }
  return true;
}

}  // namespace

void make_kv_tensor_maps(const AttnParams& p, bool bf16, int head_dim, int box_rows, KvTensorMaps& maps) {
  maps.on = 0;
  if (!sm90_tma_enabled()) return;
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return;
  const int D = head_dim;
  const int64_t step = p.l.ratio + 1;  // rows between gists (the clamped layout, as the kernels use)
  // Gist g sits at row g * step + ratio; `gists` of them lie below Nk. With none,
  // the gist maps are never read: any valid map will do.
  const int64_t gists = p.Nk / step;
  const int64_t first_gist = gists > 0 ? p.l.ratio : 0;
  const auto* k = static_cast<const uint16_t*>(p.k);
  const auto* v = static_cast<const uint16_t*>(p.v);
  const bool ok =
      encode(fn, maps.k_rows, bf16, k, D, p.Nk, p.Hkv, p.B, p.kv_sn, p.k_sh, p.k_sb, box_rows) &&
      encode(fn, maps.v_rows, bf16, v, D, p.Nk, p.Hkv, p.B, p.kv_sn, p.v_sh, p.v_sb, box_rows) &&
      encode(fn, maps.k_gists, bf16, k + first_gist * p.kv_sn, D, gists > 0 ? gists : 1, p.Hkv, p.B,
             gists > 0 ? step * p.kv_sn : p.kv_sn, p.k_sh, p.k_sb, box_rows) &&
      encode(fn, maps.v_gists, bf16, v + first_gist * p.kv_sn, D, gists > 0 ? gists : 1, p.Hkv, p.B,
             gists > 0 ? step * p.kv_sn : p.kv_sn, p.v_sh, p.v_sb, box_rows);
  maps.on = ok ? 1 : 0;
}

void make_qdo_tensor_maps(const AttnParams& p, bool bf16, int head_dim, int box_rows, QdoTensorMaps& maps) {
  maps.on = 0;
  if (!sm90_tma_enabled()) return;
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return;
  const bool ok =
      encode(fn, maps.q, bf16, p.q, head_dim, p.Nq, p.Hq, p.B, p.q_sn, p.q_sh, p.q_sb, box_rows) &&
      encode(fn, maps.dout, bf16, p.dout, head_dim, p.Nq, p.Hq, p.B, p.do_sn, p.do_sh, p.do_sb, box_rows);
  maps.on = ok ? 1 : 0;
}

}  // namespace cuda_detail
}  // namespace unigist
