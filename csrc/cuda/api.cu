// The torch entry points of the CUDA attention ops (ops.h): checks, tensors in
// and out, the kernels' parameters, and the choice of kernel (launch.h). No
// kernel code here; the kernels see plain pointers and sizes (params.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/params.cuh"
#include "layout.h"
#include "ops.h"

namespace unigist {
namespace cuda_detail {
namespace {

// CUDA-specific checks on top of checks.h's check_attention_inputs.
void check_cuda_tensor(const char* where, const char* name, const at::Tensor& t,
                              const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), where, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), where, ": ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

void check_cuda_qkv(const char* where, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v) {
  check_cuda_tensor(where, "q", q, q);
  check_cuda_tensor(where, "k", k, q);
  check_cuda_tensor(where, "v", v, q);
  TORCH_CHECK(cuda_kernels_take(q.scalar_type(), q.size(3)), where,
              ": CUDA kernels take bfloat16 or float16 with head_dim 64 or 128, got ", q.scalar_type(),
              " with head_dim ", q.size(3));
  TORCH_CHECK(k.size(2) <= (int64_t{1} << 30), where, ": at most 2^30 keys, got ", k.size(2));
  TORCH_CHECK(q.size(0) * q.size(1) <= INT_MAX, where, ": batch * heads too large");
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, where,
              ": batch * query heads must be at most 65535 (launch grid), got ",
              q.size(0) * q.size(1));
}

// Contiguous and 16-byte aligned (cp.async moves 16-byte chunks): a
// contiguous view whose storage offset is not a multiple of 8 elements is
// copied.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// Element strides of t's first three dims (0 for a dim of size 1, whose stride is
// never stepped), or false when the kernel cannot read t in place: the head dim
// must be unit-stride, every row 16-byte aligned (cp.async moves 16 bytes), the
// row stride below 2^31 (32-bit in AttnParams).
bool in_place_strides(const at::Tensor& t, int64_t& sb, int64_t& sh, int64_t& sn) {
  int64_t st[3];
  for (int d = 0; d < 3; ++d) {
    st[d] = t.size(d) == 1 ? 0 : t.stride(d);
    if (st[d] < 0 || st[d] % 8 != 0) return false;
  }
  if (t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || st[2] > INT_MAX) return false;
  sb = st[0];
  sh = st[1];
  sn = st[2];
  return true;
}

// t itself when the kernel reads it in place, else an aligned contiguous copy.
at::Tensor readable(const at::Tensor& t, int64_t& sb, int64_t& sh, int64_t& sn) {
  if (in_place_strides(t, sb, sh, sn)) return t;
  at::Tensor c = aligned_contiguous(t);
  TORCH_INTERNAL_ASSERT(in_place_strides(c, sb, sh, sn));
  return c;
}

// q, k, v and dout are read in place through their strides (HF's transposed
// views included) whenever readable() allows: on the H200 that made HF-layout
// calls 10-45% faster than copying them first (benchmarks/NOTES.md).
// UNIGIST_CUDA_STRIDED=0 copies to contiguous tensors as before (the A/B
// switch). Read on every call, as UNIGIST_FORCE_SM80.
bool strided_inputs() {
  return !env_is("UNIGIST_CUDA_STRIDED", "0");
}

// The backward's dQ kernel on a second stream, beside dK/dV: 4k D=64 GQA
// fwd+bwd 5% faster, 8k 2% (H200, NOTES.md v14). UNIGIST_CUDA_CONCURRENT_DQ=0
// runs them one after the other (A/B; read on every call, as the switches above).
bool concurrent_dq() {
  return !env_is("UNIGIST_CUDA_CONCURRENT_DQ", "0");
}

// What the attention kernels read of t: t itself or an aligned contiguous copy
// (always the copy with UNIGIST_CUDA_STRIDED=0).
at::Tensor kernel_input(const at::Tensor& t) {
  int64_t sb, sh, sn;
  return strided_inputs() ? readable(t, sb, sh, sn) : aligned_contiguous(t);
}

// Can the kernels read (or write) k and v in place? They must also share their
// row stride (AttnParams::kv_sn, dkv_sn).
bool kv_in_place(const at::Tensor& k, const at::Tensor& v) {
  int64_t kb, kh, kn, vb, vh, vn;
  return in_place_strides(k, kb, kh, kn) && in_place_strides(v, vb, vh, vn) && kn == vn;
}

// The same as kernel_input for k and v.
std::pair<at::Tensor, at::Tensor> kernel_kv(const at::Tensor& k, const at::Tensor& v) {
  if (strided_inputs() && kv_in_place(k, v)) return {k, v};
  return {aligned_contiguous(k), aligned_contiguous(v)};
}

void strides_of(const at::Tensor& t, int64_t& sb, int64_t& sh, int& sn) {
  int64_t n = 0;
  TORCH_INTERNAL_ASSERT(in_place_strides(t, sb, sh, n));
  sn = static_cast<int>(n);
}

// The fields every attention kernel reads, from the kernel inputs q, k, v
// (kernel_input) and lse (the forward's output, the backward's input):
// pointers and strides, sizes, the clamped layout and the softmax scale. The
// caller adds its outputs and the grid order.
AttnParams make_attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                            const Layout32& l, double softmax_scale, int64_t q_offset) {
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  int v_sn = 0;
  strides_of(q, p.q_sb, p.q_sh, p.q_sn);
  strides_of(k, p.k_sb, p.k_sh, p.kv_sn);
  strides_of(v, p.v_sb, p.v_sh, v_sn);
  TORCH_INTERNAL_ASSERT(v_sn == p.kv_sn);
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(q.size(0));
  p.Hq = static_cast<int>(q.size(1));
  p.Hkv = static_cast<int>(k.size(1));
  p.group = p.Hq / p.Hkv;
  p.Nq = static_cast<int>(q.size(2));
  p.Nk = static_cast<int>(k.size(2));
  p.q_offset = static_cast<int>(q_offset);
  p.l = l;
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
  return p;
}

// Splits of the key blocks: only when the (tile, batch, key head) CTAs fill less
// than two waves (two CTAs per SM), and at least 4 blocks (256 keys) per split.
// UNIGIST_CACHE_SPLITS=n forces n (benchmarks).
int cache_splits(int64_t ctas, int64_t nblocks, int num_sms) {
  if (const char* env = std::getenv("UNIGIST_CACHE_SPLITS")) {
    const int forced = std::atoi(env);
    if (forced >= 1) return static_cast<int>(std::min<int64_t>({forced, kCacheMaxSplits, std::max<int64_t>(nblocks, 1)}));
  }
  const int64_t want = 2 * static_cast<int64_t>(num_sms);
  if (ctas >= want) return 1;
  const int64_t s = std::min<int64_t>({(want + ctas - 1) / ctas, nblocks / 4, kCacheMaxSplits});
  return static_cast<int>(std::max<int64_t>(s, 1));
}

// The mma.sync compressed-cache forward's parameters that do not depend on where the
// keys sit; `keep` holds q/k/v as the kernel reads them (readable() copies only when it must).
CacheParams cache_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                         at::Tensor& lse, const Layout32& l, double softmax_scale, std::array<at::Tensor, 3>& keep) {
  CacheParams p{};
  keep[0] = readable(q, p.q_sb, p.q_sh, p.q_sn);
  keep[1] = readable(k, p.k_sb, p.k_sh, p.k_sn);
  keep[2] = readable(v, p.v_sb, p.v_sh, p.v_sn);
  p.q = keep[0].data_ptr();
  p.k = keep[1].data_ptr();
  p.v = keep[2].data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(q.size(0));
  p.Hq = static_cast<int>(q.size(1));
  p.Hkv = static_cast<int>(k.size(1));
  p.group = p.Hq / p.Hkv;
  p.Nq = static_cast<int>(q.size(2));
  p.rows = p.Nq * p.group;
  p.l = l;
  p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
  return p;
}

// Launches it over tiles of GQA-packed rows, the key blocks (at most `nblocks` per tile)
// split when too few CTAs would fill the GPU.
void launch_cache_fwd_split(CacheParams& p, const at::Tensor& q, int64_t nblocks, const char* where) {
  const int64_t tiles = (static_cast<int64_t>(p.rows) + kCacheBM - 1) / kCacheBM;
  TORCH_CHECK(tiles <= INT_MAX, where, ": too many queries");
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.splits = cache_splits(tiles * p.B * p.Hkv, nblocks, num_sms);
  at::Tensor o_part, lse_part;
  const int64_t nrows = static_cast<int64_t>(p.B) * p.Hq * p.Nq, D = q.size(3);
  if (p.splits > 1) {
    o_part = at::empty({p.splits, nrows, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({p.splits, nrows}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  launch_cache_fwd(p, q.scalar_type() == at::kBFloat16, static_cast<int>(D), static_cast<int>(tiles),
                   at::cuda::getCurrentCUDAStream());
}

}  // namespace

bool use_sm90(int device) {
#ifdef UNIGIST_WITH_SM90
  if (env_is("UNIGIST_FORCE_SM80", "1")) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  return prop->major == 9 && prop->minor == 0;
#else
  (void)device;
  return false;
#endif
}

}  // namespace cuda_detail

std::tuple<at::Tensor, at::Tensor> gist_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, int64_t ratio,
                                                           int64_t window, int64_t num_sink,
                                                           double softmax_scale, int64_t q_offset) {
  using namespace cuda_detail;
  const char* where = "unigist.gist_attention_fwd";
  check_attention_inputs(where, q, k, v, ratio, window, num_sink, q_offset);
  check_cuda_qkv(where, q, k, v);
  check_softmax_scale(where, softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = kernel_input(q);
  const auto [kc, vc] = kernel_kv(k, v);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};

  AttnParams p = make_attn_params(qc, kc, vc, lse, clamp_layout(ratio, window, num_sink, k.size(2)), softmax_scale,
                                  q_offset);
  p.o = out.data_ptr();
  // Grid order. The wgmma forward runs one CTA per SM, and with heads along x
  // the ~130 resident CTAs belong to 32+ heads whose gist rows (3.3 MB of K/V
  // per head at 32k) overflow L2 (ncu: 53% hit rate, 41% of DRAM bandwidth);
  // tiles along x keeps them on one or two heads: 5.6 -> 5.1 ms at 32k r=4
  // (NOTES.md v7). The mma.sync kernel measured no gain from it (v4).
  const bool sm90 = use_sm90(q.get_device());
  p.head_fast = sm90 ? 0 : 1;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (sm90) {
#ifdef UNIGIST_WITH_SM90
    launch_fwd_sm90(p, bf16, static_cast<int>(D), stream);
#endif
  } else {
    launch_fwd(p, bf16, static_cast<int>(D), stream);
  }
  return {out, lse};
}

int64_t gist_attention_fwd_arch_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "unigist.gist_attention_fwd_arch: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  return cuda_detail::use_sm90(q.get_device()) ? 90 : 80;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t ratio, int64_t window, int64_t num_sink,
    double softmax_scale, int64_t q_offset) {
  using namespace cuda_detail;
  const char* where = "unigist.gist_attention_bwd";
  check_attention_inputs(where, q, k, v, ratio, window, num_sink, q_offset);
  check_softmax_scale(where, softmax_scale);
  check_cuda_qkv(where, q, k, v);
  check_cuda_tensor(where, "dout", dout, q);
  check_cuda_tensor(where, "out", out, q);
  check_cuda_tensor(where, "lse", lse, q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), where,
              ": dout and out must have q's shape ", q.sizes(), ", got ", dout.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), where,
              ": dout and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, where, ": lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              where, ": lse must be [batch, q_heads, q_len] = [", q.size(0), ", ", q.size(1), ", ",
              q.size(2), "], got ", lse.sizes());
  TORCH_CHECK(std::isfinite(softmax_scale), where, ": softmax_scale must be finite");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = kernel_input(q);
  const auto [kc, vc] = kernel_kv(k, v);
  const at::Tensor oc = aligned_contiguous(out), doc = kernel_input(dout), lc = lse.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  // Laid out like q, k, v (empty_like, HF's transposed views included), as the
  // fake kernel's: the gradients then flow back through the caller's views
  // with no copy (SDPA's backward does the same).
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (B == 0 || Hq == 0 || Nk == 0) return {dq, dk, dv};
  if (Nq == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor delta = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  const auto f32 = q.options().dtype(at::kFloat);
  // Per query head fp32 dK/dV only when query heads share a key head.
  const int64_t acc_rows = Hq == Hkv ? 0 : Nk;
  at::Tensor dk_acc = at::empty({B, Hq, acc_rows, D}, f32);
  at::Tensor dv_acc = at::empty({B, Hq, acc_rows, D}, f32);
  const Layout32 l = clamp_layout(ratio, window, num_sink, Nk);
  const layout::GistLayout gl{l.ratio, l.window, l.num_sink};
  const int64_t n_gist_rows =
      layout::gists_before(Nk, gl) - layout::gists_before(std::min<int64_t>(l.num_sink, Nk), gl);
  at::Tensor dk_gist = at::empty({B, Hq, n_gist_rows, D}, f32);
  at::Tensor dv_gist = at::empty({B, Hq, n_gist_rows, D}, f32);
  at::Tensor work_counter = at::empty({2}, q.options().dtype(at::kInt));

  // What the kernels write: dq, dk, dv themselves, or contiguous stand-ins
  // copied into them afterwards (a layout the kernels cannot write, a group
  // summed by reduce_group_kernel, UNIGIST_CUDA_STRIDED=0).
  int64_t sb, sh, sn;
  const bool strided = strided_inputs();
  const at::Tensor dq_w = strided && in_place_strides(dq, sb, sh, sn) ? dq : at::empty(q.sizes(), q.options());
  const bool dkv_in_place = strided && kv_in_place(dk, dv);
  const at::Tensor dk_w = dkv_in_place ? dk : at::empty(k.sizes(), k.options());
  const at::Tensor dv_w = dkv_in_place ? dv : at::empty(v.sizes(), v.options());

  AttnParams p = make_attn_params(qc, kc, vc, lc, l, softmax_scale, q_offset);
  p.out = oc.data_ptr();
  p.dout = doc.data_ptr();
  strides_of(doc, p.do_sb, p.do_sh, p.do_sn);
  p.delta = delta.data_ptr<float>();
  p.dq = dq_w.data_ptr();
  p.dk = dk_w.data_ptr();
  p.dv = dv_w.data_ptr();
  int dv_sn = 0;
  strides_of(dq_w, p.dq_sb, p.dq_sh, p.dq_sn);
  strides_of(dk_w, p.dk_sb, p.dk_sh, p.dkv_sn);
  strides_of(dv_w, p.dv_sb, p.dv_sh, dv_sn);
  TORCH_INTERNAL_ASSERT(dv_sn == p.dkv_sn);
  p.dk_acc = dk_acc.data_ptr<float>();
  p.dv_acc = dv_acc.data_ptr<float>();
  p.dk_gist = dk_gist.data_ptr<float>();
  p.dv_gist = dv_gist.data_ptr<float>();
  p.n_gist_rows = static_cast<int>(n_gist_rows);
  p.work_counter = work_counter.data_ptr<int>();
  p.head_fast = 1;  // heads along x: launches every head's long sink/gist blocks first

  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const bool sm90 = use_sm90(q.get_device());
  launch_bwd(p, bf16, static_cast<int>(D), sm90, BwdStep::kDelta, stream);
  if (concurrent_dq()) {
    // dQ on a pool stream beside dK/dV: each kernel's tail (and the gap between
    // the dK/dV passes) is filled with the other's CTAs. Joined before return,
    // so everything after (and the caching allocator, which orders reuse on
    // `stream`) sees both done; capturable in a CUDA graph (fork / join).
    const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(false, q.get_device());
    at::cuda::CUDAEvent forked, joined;
    forked.record(stream);
    forked.block(side);
    launch_bwd(p, bf16, static_cast<int>(D), sm90, BwdStep::kDq, side);
    joined.record(side);
    launch_bwd(p, bf16, static_cast<int>(D), sm90, BwdStep::kDkdv, stream);
    joined.block(stream);
  } else {
    launch_bwd(p, bf16, static_cast<int>(D), sm90, BwdStep::kDq, stream);
    launch_bwd(p, bf16, static_cast<int>(D), sm90, BwdStep::kDkdv, stream);
  }
  if (!dq_w.is_same(dq)) dq.copy_(dq_w);
  if (!dk_w.is_same(dk)) dk.copy_(dk_w);
  if (!dv_w.is_same(dv)) dv.copy_(dv_w);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> gist_attention_cache_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ratio, int64_t window, int64_t num_sink,
    double softmax_scale, int64_t q_offset, int64_t cache_sinks, int64_t cache_gists, int64_t first_gist,
    int64_t tail_start) {
  using namespace cuda_detail;
  const char* where = "unigist::gist_attention_cache_fwd";
  check_attention_tensors(where, q, k, v, ratio, window, num_sink);
  check_key_layout(where, q, k, ratio, num_sink, q_offset, cache_sinks, cache_gists, first_gist, tail_start);
  check_cuda_qkv(where, q, k, v);
  check_softmax_scale(where, softmax_scale);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  const int64_t cached = cache_sinks + cache_gists;
  const int64_t tail_end = tail_start + (Nk - cached);
  TORCH_CHECK(tail_end <= INT_MAX, where, ": key positions must stay below 2^31, the tail ends at ", tail_end);
  TORCH_CHECK(Nq * (Hq / Hkv) <= INT_MAX, where, ": queries * group too large");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};
  const Layout32 l = clamp_layout(ratio, window, num_sink, tail_end);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;

  // A prefill chunk whose query tiles (one head each) fill every SM: the
  // wgmma forward over CacheBlocks (q/k/v in place; the copies of
  // UNIGIST_CUDA_STRIDED=0 cost ~1% of such a call). Fewer queries (decoding): the
  // mma.sync kernel below, with GQA packing and split-KV.
  const bool sm90 = use_sm90(q.get_device());
  int64_t sm90_rows = 128;
#ifdef UNIGIST_WITH_SM90
  if (sm90) sm90_rows = fwd_sm90_rows(static_cast<int>(D));
#endif
  if (sm90 && B * Hq * ((Nq + sm90_rows - 1) / sm90_rows) >= num_sms) {
    const at::Tensor qc = kernel_input(q);
    const auto [kc, vc] = kernel_kv(k, v);
    AttnParams a = make_attn_params(qc, kc, vc, lse, l, softmax_scale, q_offset);
    a.o = out.data_ptr();
    a.head_fast = 0;  // as the interleaved wgmma forward (L2 reuse of a head's keys)
    a.cached = static_cast<int>(cached);
    a.tail_start = static_cast<int>(tail_start);
    a.tail_end = static_cast<int>(tail_end);
#ifdef UNIGIST_WITH_SM90
    launch_cache_fwd_sm90(a, bf16, static_cast<int>(D), stream);
#endif
    return {out, lse};
  }

  std::array<at::Tensor, 3> keep;
  CacheParams p = cache_params(q, k, v, out, lse, l, softmax_scale, keep);
  p.q_offset = static_cast<int>(q_offset);
  p.cached = static_cast<int>(cached);
  p.tail_start = static_cast<int>(tail_start);
  p.tail_end = static_cast<int>(tail_end);
  p.row_shift = p.cached - p.tail_start;
  // Key blocks of the last query (the most any tile visits, up to the tile's window span).
  const layout::TileVisit tv =
      layout::tile_visit_from(q_offset + Nq - 1, q_offset + Nq - 1, tail_start, tail_end,
                              layout::GistLayout{p.l.ratio, p.l.window, p.l.num_sink});
  const int64_t bn = kCacheBN;
  const int64_t nblocks = (cached + bn - 1) / bn + (tv.sink_end - tail_start + bn - 1) / bn +
                          (tv.gist_end - tv.gist_begin + bn - 1) / bn + (tv.local_hi - tv.local_lo + bn - 1) / bn;
  launch_cache_fwd_split(p, q, nblocks, where);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> gist_attention_cache_step_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v, const at::Tensor& layout,
                                                                   int64_t ratio, int64_t window, int64_t num_sink,
                                                                   double softmax_scale) {
  using namespace cuda_detail;
  const char* where = "unigist::gist_attention_cache_step";
  check_attention_tensors(where, q, k, v, ratio, window, num_sink);
  check_cuda_qkv(where, q, k, v);
  check_softmax_scale(where, softmax_scale);
  check_step_layout(where, layout, q);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(Nk <= INT_MAX / 2 && Nq * (Hq / Hkv) <= INT_MAX, where, ": too many keys or queries");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, Nq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Nq == 0) return {out, lse};
  // Always the mma.sync kernel (a decode step's few queries; the grid must not depend on
  // the layout, which the host does not read), split over the whole buffer's key blocks.
  // Positions are < 2^30 (read_cache_layout), so no clamping changes what is visible.
  std::array<at::Tensor, 3> keep;
  CacheParams p = cache_params(q, k, v, out, lse, clamp_layout(ratio, window, num_sink, INT_MAX / 2), softmax_scale,
                               keep);
  p.layout = layout.data_ptr<int64_t>();
  p.capacity = Nk;
  launch_cache_fwd_split(p, q, (Nk + kCacheBN - 1) / kCacheBN, where);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_cache_bwd_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, int64_t, int64_t, int64_t, double, int64_t, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "unigist::gist_attention_cache_bwd: no CUDA backward over the compressed-cache key "
                              "layout yet (it serves inference: prefill chunks and decoding). Train on the "
                              "interleaved layout (key_layout=None), or run this backward on CPU tensors");
  return {};
}

}  // namespace unigist
