// CPU kernels of gist attention. One query row at a time, visiting only the
// keys the mask lets it see (sinks, far gists, local window), so the cost
// follows the mask's non-zeros, like the CUDA kernels. This is the fallback for
// users without a GPU and the path CI tests against the dense reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "layout.h"
#include "ops.h"

namespace unigist {
namespace {

using layout::GistLayout;

// Calls fn(j) for every key j that query position q sees among keys [0, nk),
// in increasing j. Within a single row the local part needs no mask: every key
// of [local_lo, q] is inside the window.
template <typename Fn>
inline void for_each_visible_key(int64_t q, int64_t nk, const GistLayout& l, Fn&& fn) {
  const layout::TileVisit t = layout::tile_visit(q, q, nk, l);
  for (int64_t j = 0; j < t.sink_end; ++j) fn(j);
  for (int64_t g = t.gist_begin; g < t.gist_end; ++g) fn(layout::gist_position(g, l));
  for (int64_t j = t.local_lo; j < t.local_hi; ++j) fn(j);
}

template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t d) {
  acc_t s = 0;
  for (int64_t x = 0; x < d; ++x) s += static_cast<acc_t>(a[x]) * static_cast<acc_t>(b[x]);
  return s;
}

struct Dims {
  int64_t B, Hq, Hkv, Nq, Nk, D, group;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k) {
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0};
  d.group = d.Hq / d.Hkv;
  return d;
}

void check_cpu(const char* where, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), where, ": expected CPU tensors, got ", q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kDouble || st == at::kHalf, where,
              ": CPU kernels take float32, float64, bfloat16 or float16, got ", st);
}

template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                at::Tensor& lse, const GistLayout& l, double scale, int64_t q_offset) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Dims d = dims_of(q, k);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const int64_t rows = d.B * d.Hq * d.Nq;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores;
    std::vector<int64_t> keys;
    std::vector<acc_t> acc(d.D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % d.Nq;
      const int64_t bh = row / d.Nq;
      const int64_t b = bh / d.Hq, h = bh % d.Hq;
      const int64_t kv_base = (b * d.Hkv + h / d.group) * d.Nk * d.D;
      const scalar_t* qrow = qp + row * d.D;
      scores.clear();
      keys.clear();
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for_each_visible_key(q_offset + t, d.Nk, l, [&](int64_t j) {
        const acc_t s = dot<acc_t>(qrow, kp + kv_base + j * d.D, d.D) * static_cast<acc_t>(scale);
        scores.push_back(s);
        keys.push_back(j);
        m = std::max(m, s);
      });
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t sum = 0;
      for (size_t x = 0; x < keys.size(); ++x) {
        const acc_t p = std::exp(scores[x] - m);
        sum += p;
        const scalar_t* vrow = vp + kv_base + keys[x] * d.D;
        for (int64_t c = 0; c < d.D; ++c) acc[c] += p * static_cast<acc_t>(vrow[c]);
      }
      scalar_t* orow = op + row * d.D;
      const acc_t inv = sum > 0 ? acc_t(1) / sum : acc_t(0);
      for (int64_t c = 0; c < d.D; ++c) orow[c] = static_cast<scalar_t>(acc[c] * inv);
      lp[row] = sum > 0 ? static_cast<float>(m + std::log(sum)) : -std::numeric_limits<float>::infinity();
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk_heads,
                at::Tensor& dv_heads, const GistLayout& l, double scale, int64_t q_offset) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Dims d = dims_of(q, k);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* dop = dout.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  // Per query head, so heads of one GQA group never write the same memory.
  acc_t* dkp = dk_heads.data_ptr<acc_t>();
  acc_t* dvp = dv_heads.data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, d.B * d.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dq_acc(d.D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.Hq, h = bh % d.Hq;
      const int64_t kv_base = (b * d.Hkv + h / d.group) * d.Nk * d.D;
      acc_t* dk_head = dkp + bh * d.Nk * d.D;
      acc_t* dv_head = dvp + bh * d.Nk * d.D;
      for (int64_t t = 0; t < d.Nq; ++t) {
        const int64_t row = bh * d.Nq + t;
        const scalar_t* qrow = qp + row * d.D;
        const scalar_t* dorow = dop + row * d.D;
        const acc_t delta = dot<acc_t>(dorow, op + row * d.D, d.D);
        const acc_t row_lse = static_cast<acc_t>(lp[row]);
        std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
        for_each_visible_key(q_offset + t, d.Nk, l, [&](int64_t j) {
          const scalar_t* krow = kp + kv_base + j * d.D;
          const scalar_t* vrow = vp + kv_base + j * d.D;
          const acc_t p = std::exp(dot<acc_t>(qrow, krow, d.D) * sc - row_lse);
          const acc_t dp = dot<acc_t>(dorow, vrow, d.D);
          const acc_t ds = p * (dp - delta) * sc;
          acc_t* dkr = dk_head + j * d.D;
          acc_t* dvr = dv_head + j * d.D;
          for (int64_t c = 0; c < d.D; ++c) {
            dq_acc[c] += ds * static_cast<acc_t>(krow[c]);
            dkr[c] += ds * static_cast<acc_t>(qrow[c]);
            dvr[c] += p * static_cast<acc_t>(dorow[c]);
          }
        });
        scalar_t* dqrow = dqp + row * d.D;
        for (int64_t c = 0; c < d.D; ++c) dqrow[c] = static_cast<scalar_t>(dq_acc[c]);
      }
    }
  });
}

at::ScalarType acc_type_of(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> gist_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, int64_t ratio,
                                                          int64_t window, int64_t num_sink,
                                                          double softmax_scale, int64_t q_offset) {
  const char* where = "unigist::gist_attention_fwd";
  check_attention_inputs(where, q_in, k_in, v_in, ratio, window, num_sink, q_offset);
  check_cpu(where, q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const GistLayout l{ratio, window, num_sink};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gist_attention_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(q, k, v, out, lse, l, softmax_scale, q_offset);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t ratio, int64_t window, int64_t num_sink,
    double softmax_scale, int64_t q_offset) {
  const char* where = "unigist::gist_attention_bwd";
  check_attention_inputs(where, q_in, k_in, v_in, ratio, window, num_sink, q_offset);
  check_cpu(where, q_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), where,
              ": dout and out must have q's shape ", q_in.sizes(), ", got ", dout_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              where, ": dout and out must have q's dtype ", q_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(1) && lse_in.size(2) == q_in.size(2),
              where, ": lse must be float32 [B, Hq, Nq], got ", lse_in.scalar_type(), " ", lse_in.sizes());
  TORCH_CHECK(dout_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              where, ": all tensors must be on one device");
  const at::Tensor dout = dout_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(),
                   v = v_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const Dims d = dims_of(q, k);
  at::Tensor dq = at::empty_like(q);
  const auto acc_opts = q.options().dtype(acc_type_of(q.scalar_type()));
  at::Tensor dk_heads = at::zeros({d.B, d.Hq, d.Nk, d.D}, acc_opts);
  at::Tensor dv_heads = at::zeros({d.B, d.Hq, d.Nk, d.D}, acc_opts);
  const GistLayout l{ratio, window, num_sink};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gist_attention_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(dout, q, k, v, out, lse, dq, dk_heads, dv_heads, l, softmax_scale, q_offset);
  });
  // Sum the per-query-head gradients of each GQA group.
  at::Tensor dk = dk_heads.view({d.B, d.Hkv, d.group, d.Nk, d.D}).sum(2).to(k.scalar_type());
  at::Tensor dv = dv_heads.view({d.B, d.Hkv, d.group, d.Nk, d.D}).sum(2).to(v.scalar_type());
  return {dq, dk, dv};
}

}  // namespace unigist
