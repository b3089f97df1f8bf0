// The autograd of unigist::gist_attention_fwd, in C++: the backward is
// unigist::gist_attention_bwd on the saved q, k, v, out and lse.
//
// Why not torch.library.register_autograd in Python, as before: its Python
// wrapper (argument filling, redispatch, the backward closure) cost ~185 us of
// host time per forward+backward on the CI CPU, more than the op calls
// themselves (75 us); on the H200's host a 4k training-size call was then
// bound by the host, not the GPU (benchmarks/NOTES.md v15). A C++ autograd
// Function is what SDPA pays.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("unigist::gist_attention_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, int64_t, int64_t, int64_t,
                                                                       double, int64_t)>();
  return op;
}

const auto& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("unigist::gist_attention_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, int64_t,
                                                                int64_t, int64_t, double, int64_t)>();
  return op;
}

class GistAttention : public torch::autograd::Function<GistAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t ratio, int64_t window, int64_t num_sink, double softmax_scale,
                               int64_t q_offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = fwd_op().call(q, k, v, ratio, window, num_sink, softmax_scale, q_offset);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["ratio"] = ratio;
    ctx->saved_data["window"] = window;
    ctx->saved_data["num_sink"] = num_sink;
    ctx->saved_data["softmax_scale"] = softmax_scale;
    ctx->saved_data["q_offset"] = q_offset;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto call = [&] {
      // dout goes in as it comes (any strides): the kernels read it in place.
      return bwd_op().call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["ratio"].toInt(),
                           ctx->saved_data["window"].toInt(), ctx->saved_data["num_sink"].toInt(),
                           ctx->saved_data["softmax_scale"].toDouble(), ctx->saved_data["q_offset"].toInt());
    };
    std::tuple<at::Tensor, at::Tensor, at::Tensor> g;
    if (c10::GradMode::is_enabled()) {
      // create_graph=True: through gist_attention_bwd's own autograd (ops.py),
      // which refuses a second derivative instead of returning zeros.
      g = call();
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = call();
    }
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> gist_attention_fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, int64_t ratio, int64_t window,
                                                               int64_t num_sink, double softmax_scale,
                                                               int64_t q_offset) {
  variable_list r = GistAttention::apply(q, k, v, ratio, window, num_sink, softmax_scale, q_offset);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(unigist, Autograd, m) { m.impl("gist_attention_fwd", &gist_attention_fwd_autograd); }
