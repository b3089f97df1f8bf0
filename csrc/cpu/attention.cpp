// CPU kernels of gist attention, built like a flash-attention CPU kernel:
// blocks of queries x blocks of keys, the two GEMMs of each block pair through
// ATen's cpublas (oneDNN / MKL underneath), an online softmax with vectorized
// exp (at::vec), accumulation in float32 (float64 for float64 inputs).
//
// Only the mask's key blocks are visited, by the arithmetic of layout.h: for a
// block of queries, the sinks, the far gists (read with a row stride of
// ratio + 1, or as one packed run when the keys come from a compressed cache)
// and the local window, with an element mask only on blocks that the window
// edge or the diagonal cuts. So the work follows the mask's non-zeros.
//
// q/k/v/dout/out are read in place through their strides (Hugging Face hands
// over transposed [B, H, N, D] views); only the head dim must be unit-stride.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "layout.h"
#include "ops.h"

namespace unigist {
namespace {

using layout::GistLayout;
using layout::KeyLayout;

// Query and key block sizes. 64 x 256 keeps one score block (64 KiB fp32)
// plus the output accumulator in L2 and gives cpublas GEMMs large enough to
// run near the machine's matmul rate (measured: 60-80 GFLOP/s per core for
// 64x256x64 fp32 and bf16 on the 2-core AVX2 CI machine, the rate of a large
// matmul there).
#ifndef UNIGIST_CPU_BQ
#define UNIGIST_CPU_BQ 64
#endif
#ifndef UNIGIST_CPU_BK
#define UNIGIST_CPU_BK 256
#endif
constexpr int64_t kBlockQ = UNIGIST_CPU_BQ;
constexpr int64_t kBlockK = UNIGIST_CPU_BK;
// Score rows (query heads of a kv head x queries) up to which the forward takes
// the few-query form (fwd_kernel_few).
constexpr int64_t kFewRows = 16;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// C[M, N] (+)= A[M, K] B[K, N], all row-major with leading dimensions. float,
// bfloat16 and half go to cpublas::brgemm (its non-VNNI form is the plain
// cpublas GEMM with float accumulation); double, which cpublas has no block
// product for, runs a simple loop (float64 is the exactness path, not a fast one).
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                 int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const at::Half* A, int64_t lda, const at::Half* B,
                 int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                 double* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t x = 0; x < K; ++x) {
      const double a = A[i * lda + x];
      const double* b = B + x * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// Strided view of one [N, D] matrix per (batch, head): element (b, h, n, d) at
// b * sb + h * sh + n * sn + d.
template <typename T>
struct Mat {
  T* data;
  int64_t sb, sh, sn;
  T* at(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
};

template <typename T>
Mat<const T> mat_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The kernels read rows through the row stride and need unit stride along D.
// The row stride is a GEMM leading dimension, which BLAS requires to be >= D
// even for a single row (a size-1 dim may carry any stride).
at::Tensor rows_readable(const at::Tensor& t) {
  const bool unit_d = t.size(3) <= 1 || t.stride(3) == 1;
  return unit_d && t.stride(2) >= t.size(3) ? t : t.contiguous();
}

// Everything about the keys of one call that the block walk needs.
struct Geometry {
  GistLayout l;
  KeyLayout kl;
  int64_t num_keys;      // rows of k/v
  int64_t tail_row;      // first row of the tail
  int64_t tail_end;      // one past the tail's last position
  int64_t tail_gist0;    // global index of the first gist inside the tail
  int64_t tail_gists;    // gists inside the tail
};

Geometry make_geometry(const GistLayout& l, const KeyLayout& kl, int64_t num_keys) {
  Geometry g{l, kl, num_keys, 0, 0, 0, 0};
  g.tail_row = kl.cache_sinks + kl.cache_gists;
  g.tail_end = kl.tail_start + (num_keys - g.tail_row);
  g.tail_gist0 = layout::gists_before(kl.tail_start, l);
  g.tail_gists = layout::gists_before(g.tail_end, l) - g.tail_gist0;
  return g;
}

// One block of keys a block of queries visits.
struct KeyBlock {
  int64_t row;       // k/v row of the first key
  int64_t row_step;  // 1, or ratio + 1 for gists read out of the tail
  int64_t n;         // keys in the block
  int64_t kt_col;    // column of the first key in the transposed keys (KT or KgT)
  bool packed_gist;  // columns of KgT (gathered tail gists) instead of KT
  int64_t pos;       // position of the first key (contiguous blocks)
  bool masked;       // some (query, key) pair of the block is not visible
};

// Calls fn(KeyBlock) for every key block the queries at positions [q_lo, q_hi]
// see; together the blocks hold each visible (query, key) pair exactly once
// (blocks marked `masked` also hold invisible pairs, which the caller masks
// with `visible`). Mirrors layout::tile_visit, extended to the key layout.
template <typename Fn>
void for_each_key_block(int64_t q_lo, int64_t q_hi, const Geometry& g, Fn&& fn) {
  const GistLayout& l = g.l;
  auto contiguous = [&](int64_t row0, int64_t pos0, int64_t count, bool check) {
    for (int64_t s = 0; s < count; s += kBlockK) {
      const int64_t n = std::min(kBlockK, count - s);
      const int64_t first = pos0 + s, last = first + n - 1;
      // Every pair visible: causal for the earliest query, and either all
      // sinks or all inside the latest query's window.
      const bool full = !check || (last <= q_lo && (last < l.num_sink || q_hi - first < l.window));
      fn(KeyBlock{row0 + s, 1, n, row0 + s, false, first, !full});
    }
  };
  // Cached sinks and gists: older than the tail, so older than every query
  // and outside every window, yet visible by rule: no mask.
  const int64_t cached = g.kl.cache_sinks + g.kl.cache_gists;
  if (cached > 0) contiguous(0, 0, cached, false);
  const int64_t key_end = std::min(q_hi + 1, g.tail_end);
  if (key_end <= g.kl.tail_start) return;
  const int64_t t0 = g.kl.tail_start;
  const int64_t sink_end = std::max(t0, std::min(l.num_sink, key_end));
  const int64_t local_lo = std::min(std::max(sink_end, q_lo - l.window + 1), key_end);
  if (sink_end > t0) contiguous(g.tail_row, t0, sink_end - t0, true);
  // Far gists of the tail: seen by every query of the block, no mask.
  const int64_t g_begin = layout::gists_before(sink_end, l);
  const int64_t g_end = std::max(g_begin, layout::gists_before(local_lo, l));
  for (int64_t gi = g_begin; gi < g_end; gi += kBlockK) {
    const int64_t n = std::min(kBlockK, g_end - gi);
    fn(KeyBlock{g.tail_row + layout::gist_position(gi, l) - t0, l.ratio + 1, n, gi - g.tail_gist0, true,
                layout::gist_position(gi, l), false});
  }
  if (key_end > local_lo) contiguous(g.tail_row + (local_lo - t0), local_lo, key_end - local_lo, true);
}

// keep_far[j]: key pos0 + j is visible to any later query whatever the distance
// (a sink or a gist); the window and causality decide the rest.
inline void far_visible(int64_t pos0, int64_t n, const GistLayout& l, uint8_t* keep_far) {
  int64_t phase = pos0 % (l.ratio + 1);
  for (int64_t j = 0; j < n; ++j) {
    keep_far[j] = (pos0 + j < l.num_sink) || phase == l.ratio;
    phase = phase == l.ratio ? 0 : phase + 1;
  }
}

// Scores of an element-masked block: -inf where query q_lo + c cannot see key pos0 + j.
template <typename acc_t>
void mask_scores(acc_t* s, int64_t lds, int64_t nq, int64_t n, int64_t q_lo, int64_t pos0, const GistLayout& l,
                 const uint8_t* keep_far) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < nq; ++c) {
    const int64_t q = q_lo + c;
    acc_t* row = s + c * lds;
    // Keys after the query: causal.
    const int64_t causal_end = std::clamp<int64_t>(q - pos0 + 1, 0, n);
    std::fill(row + causal_end, row + n, neg_inf);
    // Keys before the window: only sinks and gists stay.
    const int64_t win_begin = std::clamp<int64_t>(q - l.window + 1 - pos0, 0, causal_end);
    for (int64_t j = 0; j < win_begin; ++j) {
      if (!keep_far[j]) row[j] = neg_inf;
    }
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, in 8 x 8
// tiles (at::vec's AVX2 transpose for float).
template <typename T>
void transpose_rows(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      at::vec::transpose_mxn<T, 8, 8>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
    }
    if (c < cols) {
      at::vec::transpose_mxn<T>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst, 8,
                                static_cast<int>(cols - c));
    }
  }
  if (r < rows) {
    at::vec::transpose_mxn<T>(src + r * ld_src, ld_src, dst + r, ld_dst, static_cast<int>(rows - r),
                              static_cast<int>(cols));
  }
}

// Buffers of the calling thread that outlive a call (slot: which buffer).
// Grown on demand, never zero-filled; released when a call needed more than
// kWorkspaceKeep elements, so a one-off long sequence does not pin its memory.
constexpr int64_t kWorkspaceKeep = int64_t(1) << 24;

template <typename T>
T* workspace(int slot, int64_t n) {
  thread_local std::unique_ptr<T[]> bufs[4];
  thread_local int64_t sizes[4] = {0, 0, 0, 0};
  n = std::max<int64_t>(n, 1);
  if (sizes[slot] < n || (sizes[slot] > kWorkspaceKeep && n <= kWorkspaceKeep)) {
    bufs[slot].reset(new T[static_cast<size_t>(n)]);
    sizes[slot] = n;
  }
  return bufs[slot].get();
}

// K and V of one (batch, kv head) as the GEMMs read them, in the compute type
// (float, or double for double inputs): K^T [D, num_keys] and the tail's gists
// gathered, Kg^T [D, tail_gists], so that S = Q K^T and dQ^T += K^T dS^T are
// row-major GEMMs; K and V rows themselves, in place through their strides
// when the inputs are already in the compute type, else widened copies [N, D].
// bfloat16/half run their GEMMs in float: on CPUs without bf16 matrix
// instructions (AVX2) cpublas' 16-bit GEMM is a slow generic loop, and widening
// K and V once per call costs O(N D), nothing next to the attention.
template <typename scalar_t>
struct HeadKV {
  using ct = acc_type<scalar_t>;
  static constexpr bool widen = !std::is_same_v<scalar_t, ct>;
  int64_t nk = 0, ng = 0, D = 0;
  // Row strides of K^T and Kg^T: padded off multiples of 1 KiB, since a
  // power-of-two stride (N = 4096 floats is 16 KiB) maps the D rows a GEMM
  // reads to a few cache sets (measured: 1.6x slower S = Q K^T at N = 4096).
  int64_t ld_kt = 0, ld_kgt = 0;
  // Per (batch, kv head), concatenated. Reused across calls of the same
  // thread: fresh buffers of several MiB cost page faults and zero-filling on
  // every call (measured: ~10% of a 4k forward).
  ct *kt = nullptr, *kgt = nullptr, *k_wide = nullptr, *v_wide = nullptr;
  Mat<const scalar_t> k, v;

  // transposed: also build K^T and Kg^T (the few-query forward reads K rows only).
  void build(const Mat<const scalar_t>& k_in, const Mat<const scalar_t>& v_in, int64_t B, int64_t Hkv,
             int64_t D_, const Geometry& g, bool transposed = true) {
    k = k_in;
    v = v_in;
    nk = g.num_keys;
    ng = g.tail_gists;
    D = D_;
    if (transposed) {
      ld_kt = padded_ld(nk);
      ld_kgt = padded_ld(ng);
      kt = workspace<ct>(0, B * Hkv * D * ld_kt);
      kgt = workspace<ct>(1, B * Hkv * D * ld_kgt);
    }
    if (widen) {
      k_wide = workspace<ct>(2, B * Hkv * nk * D);
      v_wide = workspace<ct>(3, B * Hkv * nk * D);
    }
    if (!transposed && !widen) return;  // K and V are read in place
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) build_head(bh / Hkv, bh % Hkv, bh, g, transposed);
    });
  }

  static int64_t padded_ld(int64_t n) { return (n + 15) / 16 * 16 + 16; }

  void build_head(int64_t b, int64_t h, int64_t bh, const Geometry& g, bool transposed) {
    // Rows of K in the compute type: in place, or widened first.
    const ct* k_rows;
    int64_t ld;
    if constexpr (widen) {
      ct* kw = k_wide + bh * nk * D;
      ct* vw = v_wide + bh * nk * D;
      for (int64_t j = 0; j < nk; ++j) {
        at::vec::convert(k.at(b, h, j), kw + j * D, D);
        at::vec::convert(v.at(b, h, j), vw + j * D, D);
      }
      k_rows = kw;
      ld = D;
    } else {
      k_rows = k.at(b, h, 0);
      ld = k.sn;
    }
    if (!transposed) return;
    transpose_rows(k_rows, ld, nk, D, kt + bh * D * ld_kt, ld_kt);
    if (ng > 0) {  // the tail's gists are ratio + 1 rows apart
      const int64_t row = g.tail_row + layout::gist_position(g.tail_gist0, g.l) - g.kl.tail_start;
      transpose_rows(k_rows + row * ld, ld * (g.l.ratio + 1), ng, D, kgt + bh * D * ld_kgt, ld_kgt);
    }
  }

  // K^T (or Kg^T) columns of a key block, with their leading dimension.
  const ct* kt_cols(int64_t bh, const KeyBlock& kb, int64_t& ld) const {
    ld = kb.packed_gist ? ld_kgt : ld_kt;
    return kb.packed_gist ? kgt + bh * D * ld_kgt + kb.kt_col : kt + bh * D * ld_kt + kb.kt_col;
  }
  // K or V rows of a key block, with their leading dimension (row_step apart).
  const ct* rows(bool value, int64_t b, int64_t h, int64_t bh, const KeyBlock& kb, int64_t& ld) const {
    if constexpr (widen) {
      ld = D * kb.row_step;
      return (value ? v_wide : k_wide) + (bh * nk + kb.row) * D;
    } else {
      const Mat<const scalar_t>& m = value ? v : k;
      ld = m.sn * kb.row_step;
      return m.at(b, h, kb.row);
    }
  }
};

// Rows [t0, t0 + nq) of q (or dout) for a GEMM operand: in place when already
// in the compute type, else widened into buf (leading dimension D).
template <typename scalar_t>
const acc_type<scalar_t>* query_rows(const Mat<const scalar_t>& m, int64_t b, int64_t h, int64_t t0, int64_t nq,
                                     int64_t D, acc_type<scalar_t>* buf, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    ld = m.sn;
    return m.at(b, h, t0);
  } else {
    for (int64_t c = 0; c < nq; ++c) at::vec::convert(m.at(b, h, t0 + c), buf + c * D, D);
    ld = D;
    return buf;
  }
}

// One key block of the online softmax, for `rows` score rows s[c * lds + j]
// (j < n, unscaled logits): turns them into p = exp(s * scale - m_new) in place,
// updates the running max m and sum l of each row, and rescales the output
// rows o[c * D ..] when the max moved.
template <typename acc_t>
void online_softmax(acc_t* s, int64_t lds, int64_t rows, int64_t n, acc_t sc, acc_t* m_buf, acc_t* l_buf, acc_t* o,
                    int64_t D) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < rows; ++c) {
    acc_t* row = s + c * lds;
    // Scale and row max in one pass.
    const acc_t row_max = at::vec::map_reduce_all<acc_t>(
        [sc](Vec x) { return x * Vec(sc); }, [](Vec x, Vec y) { return at::vec::maximum(x, y); }, row, n);
    const acc_t m_old = m_buf[c];
    const acc_t m_new = std::max(m_old, row_max);
    if (m_new == neg_inf) {  // nothing visible yet in this row
      std::fill(row, row + n, acc_t(0));
      continue;
    }
    Vec vsum(acc_t(0));
    const Vec vsc(sc), vm(m_new);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec e = (Vec::loadu(row + j) * vsc - vm).exp_u20();
      vsum = vsum + e;
      e.store(row + j);
    }
    acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec x, Vec y) { return x + y; }, vsum);
    for (; j < n; ++j) {
      const acc_t e = std::exp(row[j] * sc - m_new);
      sum += e;
      row[j] = e;
    }
    const acc_t alpha = m_old == neg_inf ? acc_t(0) : std::exp(m_old - m_new);
    l_buf[c] = l_buf[c] * alpha + sum;
    m_buf[c] = m_new;
    if (alpha != acc_t(1)) {
      acc_t* orow = o + c * D;
      at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, orow, orow, D);
    }
  }
}

// out = o / l and lse = m + log(l) for `rows` rows (out rows ld_out apart).
template <typename scalar_t, typename acc_t>
void finish_rows(const acc_t* o, const acc_t* m_buf, const acc_t* l_buf, int64_t rows, int64_t D, scalar_t* out,
                 int64_t ld_out, acc_t* lse, int64_t ld_lse) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t c = 0; c < rows; ++c) {
    const acc_t l = l_buf[c];
    const acc_t inv = l > 0 ? acc_t(1) / l : acc_t(0);
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, out + c * ld_out, o + c * D, D);
    lse[c * ld_lse] = l > 0 ? m_buf[c] + std::log(l) : -std::numeric_limits<acc_t>::infinity();
  }
}

// ----------------------------------------------------------------- forward
template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                const Geometry& g, double scale, int64_t q_offset) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv;
  const int64_t n_qblocks = (Nq + kBlockQ - 1) / kBlockQ;
  const Mat<const scalar_t> qm = mat_of<scalar_t>(q);
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  HeadKV<scalar_t> kv;
  kv.build(mat_of<scalar_t>(k), mat_of<scalar_t>(v), B, Hkv, D, g);
  const acc_t sc = static_cast<acc_t>(scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * Hq * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_buf(kBlockQ * kBlockK), o_buf(kBlockQ * D), m_buf(kBlockQ), l_buf(kBlockQ),
        q_buf(kBlockQ * D);
    std::vector<uint8_t> keep_far(kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, bh = task / n_qblocks;
      const int64_t b = bh / Hq, h = bh % Hq, hk = h / group, bhk = b * Hkv + hk;
      const int64_t t0 = qb * kBlockQ, nq = std::min(kBlockQ, Nq - t0);
      const int64_t q_lo = q_offset + t0, q_hi = q_lo + nq - 1;
      int64_t ldq = 0;
      const acc_t* qp = query_rows(qm, b, h, t0, nq, D, q_buf.data(), ldq);
      acc_t* s = s_buf.data();
      acc_t* o = o_buf.data();
      std::fill(o, o + nq * D, acc_t(0));
      std::fill(m_buf.begin(), m_buf.begin() + nq, neg_inf);
      std::fill(l_buf.begin(), l_buf.begin() + nq, acc_t(0));

      for_each_key_block(q_lo, q_hi, g, [&](const KeyBlock& kb) {
        const int64_t n = kb.n;
        int64_t ldkt = 0, ldv = 0;
        const acc_t* ktp = kv.kt_cols(bhk, kb, ldkt);
        gemm(nq, n, D, qp, ldq, ktp, ldkt, s, kBlockK, /*add=*/false);
        if (kb.masked) {
          far_visible(kb.pos, n, g.l, keep_far.data());
          mask_scores(s, kBlockK, nq, n, q_lo, kb.pos, g.l, keep_far.data());
        }
        online_softmax(s, kBlockK, nq, n, sc, m_buf.data(), l_buf.data(), o, D);
        const acc_t* vp = kv.rows(true, b, hk, bhk, kb, ldv);
        gemm(nq, D, n, s, kBlockK, vp, ldv, o, D, /*add=*/true);
      });

      finish_rows(o, m_buf.data(), l_buf.data(), nq, D, op + ((b * Hq + h) * Nq + t0) * D, D,
                  lp + (b * Hq + h) * Nq + t0, 1);
    }
  });
}

// The forward for a few queries (decoding: 1 or 2 queries per head over a long
// cache). The blocked forward builds K^T for every call, three passes over the
// keys for one GEMV (measured: most of a 1-query call over 4k keys). Here the
// scores come out transposed, S^T = K Q^T over K's rows in place, and all the
// query heads of a kv head share each block of K: R = group * Nq score rows.
template <typename scalar_t>
void fwd_kernel_few(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, const Geometry& g, double scale, int64_t q_offset) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, R = group * Nq;
  const Mat<const scalar_t> qm = mat_of<scalar_t>(q);
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  HeadKV<scalar_t> kv;
  kv.build(mat_of<scalar_t>(k), mat_of<scalar_t>(v), B, Hkv, D, g, /*transposed=*/false);
  const acc_t sc = static_cast<acc_t>(scale);
  const int64_t q_lo = q_offset, q_hi = q_offset + Nq - 1;

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    // Row r of the score block is query c = r % Nq of head hk * group + r / Nq.
    std::vector<acc_t> qt(D * R), st_buf(kBlockK * R), s_buf(R * kBlockK), o_buf(R * D), m_buf(R), l_buf(R);
    std::vector<uint8_t> keep_far(kBlockK);
    for (int64_t bhk = begin; bhk < end; ++bhk) {
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* qrow = qm.at(b, hk * group + r / Nq, r % Nq);
        for (int64_t d = 0; d < D; ++d) qt[d * R + r] = static_cast<acc_t>(qrow[d]);
      }
      acc_t* s = s_buf.data();
      acc_t* o = o_buf.data();
      std::fill(o, o + R * D, acc_t(0));
      std::fill(m_buf.begin(), m_buf.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l_buf.begin(), l_buf.end(), acc_t(0));
      for_each_key_block(q_lo, q_hi, g, [&](const KeyBlock& kb) {
        const int64_t n = kb.n;
        int64_t ldk = 0, ldv = 0;
        const acc_t* kp = kv.rows(false, b, hk, bhk, kb, ldk);
        gemm(n, R, D, kp, ldk, qt.data(), R, st_buf.data(), R, /*add=*/false);
        transpose_rows(st_buf.data(), R, n, R, s, kBlockK);
        if (kb.masked) {
          far_visible(kb.pos, n, g.l, keep_far.data());
          for (int64_t h = 0; h < group; ++h) mask_scores(s + h * Nq * kBlockK, kBlockK, Nq, n, q_lo, kb.pos, g.l,
                                                          keep_far.data());
        }
        online_softmax(s, kBlockK, R, n, sc, m_buf.data(), l_buf.data(), o, D);
        const acc_t* vp = kv.rows(true, b, hk, bhk, kb, ldv);
        gemm(R, D, n, s, kBlockK, vp, ldv, o, D, /*add=*/true);
      });
      for (int64_t h = 0; h < group; ++h) {
        const int64_t hq = hk * group + h;
        finish_rows(o + h * Nq * D, m_buf.data() + h * Nq, l_buf.data() + h * Nq, Nq, D,
                    op + (b * Hq + hq) * Nq * D, D, lp + (b * Hq + hq) * Nq, 1);
      }
    }
  });
}

// Few queries per kv head, and enough kv heads to keep every thread busy.
bool use_few_query_forward(const at::Tensor& q, const at::Tensor& k) {
  const int64_t rows = (q.size(1) / k.size(1)) * q.size(2);
  return rows <= kFewRows && q.size(0) * k.size(1) >= at::get_num_threads();
}

// ---------------------------------------------------------------- backward
// Per (batch, kv head, split of its query blocks): dK and dV accumulate in
// buffers of the task (no two tasks write the same memory), dQ of each query
// block is written by the one task that owns it. The block products are taken
// in the transposed form S^T = K Q^T, so that P^T and dS^T come out row-major
// for dV += P^T dO and dK += dS^T Q, and dQ^T += K^T dS^T reads the transposed
// keys, as the forward does.
template <typename scalar_t>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk_acc,
                at::Tensor& dv_acc, int64_t splits, const Geometry& g, double scale, int64_t q_offset) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t n_qblocks = (Nq + kBlockQ - 1) / kBlockQ;
  const int64_t units = group * n_qblocks;  // (query head of the group, query block)
  const Mat<const scalar_t> qm = mat_of<scalar_t>(q), dom = mat_of<scalar_t>(dout), om = mat_of<scalar_t>(out);
  const acc_t* lp = lse.const_data_ptr<acc_t>();
  // dq through its strides (the head dim unit-stride): HF's transposed layout too.
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  const int64_t dq_sb = dq.stride(0), dq_sh = dq.stride(1), dq_sn = dq.stride(2);
  TORCH_INTERNAL_ASSERT(dq.stride(3) == 1 || D == 1);
  acc_t* dkp = dk_acc.data_ptr<acc_t>();
  acc_t* dvp = dv_acc.data_ptr<acc_t>();
  HeadKV<scalar_t> kv;
  kv.build(mat_of<scalar_t>(k), mat_of<scalar_t>(v), B, Hkv, D, g);
  const acc_t sc = static_cast<acc_t>(scale);

  at::parallel_for(0, B * Hkv * splits, 1, [&](int64_t begin, int64_t end) {
    // Row-major blocks: S^T / P^T / dP^T / dS^T [kBlockK, kBlockQ]; Q^T, dO^T,
    // dQ^T [D, kBlockQ]; Q and dO rows [kBlockQ, D] when widened.
    std::vector<acc_t> st(kBlockK * kBlockQ), dpt(kBlockK * kBlockQ), dqt(D * kBlockQ), qt(D * kBlockQ),
        dot(D * kBlockQ), q_buf(kBlockQ * D), do_buf(kBlockQ * D);
    std::vector<acc_t> lse_blk(kBlockQ), delta(kBlockQ);
    std::vector<uint8_t> keep_far(kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, bhk = task / splits;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      const int64_t u_begin = units * split / splits, u_end = units * (split + 1) / splits;
      acc_t* dk_task = dkp + task * Nk * D;
      acc_t* dv_task = dvp + task * Nk * D;
      for (int64_t u = u_begin; u < u_end; ++u) {
        const int64_t h = hk * group + u / n_qblocks, qb = u % n_qblocks;
        const int64_t t0 = qb * kBlockQ, nq = std::min(kBlockQ, Nq - t0);
        const int64_t q_lo = q_offset + t0, q_hi = q_lo + nq - 1;
        int64_t ldq = 0, lddo = 0;
        const acc_t* qp = query_rows(qm, b, h, t0, nq, D, q_buf.data(), ldq);
        const acc_t* dop = query_rows(dom, b, h, t0, nq, D, do_buf.data(), lddo);
        // Q^T, dO^T, the row statistics lse and delta = rowsum(dO * O).
        for (int64_t c = 0; c < nq; ++c) {
          const acc_t* qrow = qp + c * ldq;
          const acc_t* dorow = dop + c * lddo;
          const scalar_t* orow = om.at(b, h, t0 + c);
          acc_t dsum = 0;
          for (int64_t d = 0; d < D; ++d) {
            qt[d * nq + c] = qrow[d];
            dot[d * nq + c] = dorow[d];
            dsum += dorow[d] * static_cast<acc_t>(orow[d]);
          }
          delta[c] = dsum;
          lse_blk[c] = lp[(b * Hq + h) * Nq + t0 + c];
        }
        std::fill(dqt.begin(), dqt.begin() + D * nq, acc_t(0));

        for_each_key_block(q_lo, q_hi, g, [&](const KeyBlock& kb) {
          const int64_t n = kb.n;
          int64_t ldk = 0, ldv = 0, ldkt = 0;
          const acc_t* kp = kv.rows(false, b, hk, bhk, kb, ldk);
          const acc_t* vp = kv.rows(true, b, hk, bhk, kb, ldv);
          acc_t* s = st.data();
          // S^T = K Q^T, then P^T = exp(S^T * scale - lse) (0 where masked).
          gemm(n, nq, D, kp, ldk, qt.data(), nq, s, nq, false);
          if (kb.masked) far_visible(kb.pos, n, g.l, keep_far.data());
          const Vec vsc(sc);
          for (int64_t j = 0; j < n; ++j) {
            acc_t* row = s + j * nq;
            int64_t c = 0;
            for (; c + Vec::size() <= nq; c += Vec::size()) {
              (Vec::loadu(row + c) * vsc - Vec::loadu(lse_blk.data() + c)).exp_u20().store(row + c);
            }
            for (; c < nq; ++c) row[c] = std::exp(row[c] * sc - lse_blk[c]);
            if (kb.masked) {
              // Query q sees key p iff p <= q and (keep_far or q < p + window):
              // an interval of the block's query columns.
              const int64_t p = kb.pos + j;
              const int64_t c_lo = std::clamp<int64_t>(p - q_lo, 0, nq);
              const int64_t c_hi = keep_far[j] ? nq : std::clamp<int64_t>(p + g.l.window - q_lo, c_lo, nq);
              std::fill(row, row + c_lo, acc_t(0));
              std::fill(row + c_hi, row + nq, acc_t(0));
            }
          }
          // dP^T = V dO^T, dS^T = P^T * (dP^T - delta) * scale.
          acc_t* dp = dpt.data();
          gemm(n, nq, D, vp, ldv, dot.data(), nq, dp, nq, false);
          for (int64_t j = 0; j < n; ++j) {
            acc_t* drow = dp + j * nq;
            at::vec::map3<acc_t>([sc](Vec pv, Vec dpv, Vec dl) { return pv * (dpv - dl) * Vec(sc); }, drow,
                                 s + j * nq, drow, delta.data(), nq);
          }
          // dV += P^T dO, dK += dS^T Q (rows of the block, row_step apart).
          gemm(n, D, nq, s, nq, dop, lddo, dv_task + kb.row * D, D * kb.row_step, true);
          gemm(n, D, nq, dp, nq, qp, ldq, dk_task + kb.row * D, D * kb.row_step, true);
          // dQ^T += K^T dS^T.
          const acc_t* ktm = kv.kt_cols(bhk, kb, ldkt);
          gemm(D, nq, n, ktm, ldkt, dp, nq, dqt.data(), nq, true);
        });

        scalar_t* dqrow = dqp + b * dq_sb + h * dq_sh + t0 * dq_sn;
        for (int64_t c = 0; c < nq; ++c) {
          for (int64_t d = 0; d < D; ++d) dqrow[c * dq_sn + d] = static_cast<scalar_t>(dqt[d * nq + c]);
        }
      }
    }
  });
}

void check_cpu(const char* where, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), where, ": expected CPU tensors, got ", q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kDouble || st == at::kHalf, where,
                   ": CPU kernels take float32, float64, bfloat16 or float16, got ", st);
}

at::ScalarType acc_type_of(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

namespace {

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const char* where, const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const GistLayout& l, const KeyLayout& kl,
                                           double softmax_scale, int64_t q_offset) {
  check_softmax_scale(where, softmax_scale);
  check_cpu(where, q_in);
  const at::Tensor q = rows_readable(q_in), k = rows_readable(k_in), v = rows_readable(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_type_of(q.scalar_type())));
  if (q.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const Geometry g = make_geometry(l, kl, k.size(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gist_attention_fwd_cpu", [&] {
    if (use_few_query_forward(q, k)) {
      fwd_kernel_few<scalar_t>(q, k, v, out, lse, g, softmax_scale, q_offset);
    } else {
      fwd_kernel<scalar_t>(q, k, v, out, lse, g, softmax_scale, q_offset);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const char* where, const at::Tensor& dout_in,
                                                       const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& out_in,
                                                       const at::Tensor& lse_in, const GistLayout& l,
                                                       const KeyLayout& kl, double softmax_scale,
                                                       int64_t q_offset) {
  check_softmax_scale(where, softmax_scale);
  check_cpu(where, q_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), where,
              ": dout and out must have q's shape ", q_in.sizes(), ", got ", dout_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK_TYPE(dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
                   where, ": dout and out must have q's dtype ", q_in.scalar_type());
  const auto lse_type = acc_type_of(q_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == lse_type && lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(1) && lse_in.size(2) == q_in.size(2),
              where, ": lse must be ", lse_type == at::kDouble ? "float64" : "float32",
              " [B, Hq, Nq] (what gist_attention_fwd returns), got ", lse_in.scalar_type(), " ", lse_in.sizes());
  TORCH_CHECK(dout_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              where, ": all tensors must be on one device");
  const at::Tensor dout = rows_readable(dout_in), q = rows_readable(q_in), k = rows_readable(k_in),
                   v = rows_readable(v_in), out = rows_readable(out_in), lse = lse_in.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  // The gradients are laid out like q, k, v (empty_like, as the fake kernel's
  // and the CUDA kernels'), so they flow back through a caller's transposed
  // views with no copy. The kernel writes dq through its strides when its head
  // dim is unit-stride, else a contiguous stand-in copied after.
  at::Tensor dq_out = at::empty_like(q_in), dk_out = at::empty_like(k_in), dv_out = at::empty_like(v_in);
  if (q.numel() == 0 || k.numel() == 0) {
    dq_out.zero_();
    dk_out.zero_();
    dv_out.zero_();
    return {dq_out, dk_out, dv_out};
  }
  at::Tensor dq = dq_out.stride(3) == 1 ? dq_out : at::empty(q.sizes(), q.options());
  // Enough tasks for every thread: split a (batch, kv head)'s query blocks
  // when there are fewer of those than threads (each split has its own dK/dV).
  const int64_t units = (Hq / Hkv) * ((Nq + kBlockQ - 1) / kBlockQ);
  const int64_t want = 2 * at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min(units, (want + B * Hkv - 1) / (B * Hkv)));
  const auto acc_opts = q.options().dtype(acc_type_of(q.scalar_type()));
  at::Tensor dk_acc = at::zeros({B, Hkv, splits, Nk, D}, acc_opts);
  at::Tensor dv_acc = at::zeros({B, Hkv, splits, Nk, D}, acc_opts);
  const Geometry g = make_geometry(l, kl, Nk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gist_attention_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(dout, q, k, v, out, lse, dq, dk_acc, dv_acc, splits, g, softmax_scale, q_offset);
  });
  if (!dq.is_same(dq_out)) dq_out.copy_(dq);
  dk_out.copy_(splits == 1 ? dk_acc.squeeze(2) : dk_acc.sum(2));
  dv_out.copy_(splits == 1 ? dv_acc.squeeze(2) : dv_acc.sum(2));
  return {dq_out, dk_out, dv_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gist_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, int64_t ratio, int64_t window,
                                                          int64_t num_sink, double softmax_scale,
                                                          int64_t q_offset) {
  const char* where = "unigist::gist_attention_fwd";
  check_attention_inputs(where, q, k, v, ratio, window, num_sink, q_offset);
  return fwd_cpu(where, q, k, v, GistLayout{ratio, window, num_sink}, KeyLayout{0, 0, 0, 0}, softmax_scale,
                 q_offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset) {
  const char* where = "unigist::gist_attention_bwd";
  check_attention_inputs(where, q, k, v, ratio, window, num_sink, q_offset);
  return bwd_cpu(where, dout, q, k, v, out, lse, GistLayout{ratio, window, num_sink}, KeyLayout{0, 0, 0, 0},
                 softmax_scale, q_offset);
}

std::tuple<at::Tensor, at::Tensor> gist_attention_cache_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ratio, int64_t window,
    int64_t num_sink, double softmax_scale, int64_t q_offset, int64_t cache_sinks, int64_t cache_gists,
    int64_t first_gist, int64_t tail_start) {
  const char* where = "unigist::gist_attention_cache_fwd";
  check_attention_tensors(where, q, k, v, ratio, window, num_sink);
  check_key_layout(where, q, k, ratio, num_sink, q_offset, cache_sinks, cache_gists, first_gist, tail_start);
  return fwd_cpu(where, q, k, v, GistLayout{ratio, window, num_sink},
                 KeyLayout{cache_sinks, cache_gists, first_gist, tail_start}, softmax_scale, q_offset);
}

std::tuple<at::Tensor, at::Tensor> gist_attention_cache_step_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& layout,
                                                                  int64_t ratio, int64_t window, int64_t num_sink,
                                                                  double softmax_scale) {
  const char* where = "unigist::gist_attention_cache_step";
  check_attention_tensors(where, q, k, v, ratio, window, num_sink);
  check_step_layout(where, layout, q);
  const auto m = layout.accessor<int64_t, 1>();
  const int64_t num_keys = m[5];
  TORCH_CHECK_VALUE(num_keys >= 0 && num_keys <= k.size(2), where, ": layout says ", num_keys,
                    " keys but the key buffer holds ", k.size(2), " rows");
  return gist_attention_cache_fwd_cpu(q, k.narrow(2, 0, num_keys), v.narrow(2, 0, num_keys), ratio, window,
                                      num_sink, softmax_scale, m[0], m[1], m[2], m[3], m[4]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_cache_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
    int64_t q_offset, int64_t cache_sinks, int64_t cache_gists, int64_t first_gist, int64_t tail_start) {
  const char* where = "unigist::gist_attention_cache_bwd";
  check_attention_tensors(where, q, k, v, ratio, window, num_sink);
  check_key_layout(where, q, k, ratio, num_sink, q_offset, cache_sinks, cache_gists, first_gist, tail_start);
  return bwd_cpu(where, dout, q, k, v, out, lse, GistLayout{ratio, window, num_sink},
                 KeyLayout{cache_sinks, cache_gists, first_gist, tail_start}, softmax_scale, q_offset);
}

}  // namespace unigist
