// The one dtype x head-dim switch of the CUDA launchers (flash-attention's
// static_switch.h): runs the lambda with `T` (the element type) and `kHeadDim`
// bound, one instantiation per supported pair. The pairs are checks.h's
// cuda_kernels_take; the entry points reject any other before launching.
//
//   UNIGIST_DISPATCH(bf16, head_dim, [&] { launch_fwd_t<T, kHeadDim>(p, stream); });
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define UNIGIST_DISPATCH_DTYPE(BF16, ...) \
  [&] {                                   \
    if (BF16) {                           \
      using T = __nv_bfloat16;            \
      return __VA_ARGS__();               \
    } else {                              \
      using T = __half;                   \
      return __VA_ARGS__();               \
    }                                     \
  }()

#define UNIGIST_DISPATCH(BF16, HEAD_DIM, ...)                \
  [&] {                                                      \
    if ((HEAD_DIM) == 64) {                                  \
      constexpr int kHeadDim = 64;                           \
      return UNIGIST_DISPATCH_DTYPE(BF16, __VA_ARGS__);      \
    } else {                                                 \
      constexpr int kHeadDim = 128;                          \
      return UNIGIST_DISPATCH_DTYPE(BF16, __VA_ARGS__);      \
    }                                                        \
  }()
