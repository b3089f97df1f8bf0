// The kernels' launchers, as the torch entry points (api.cu) see them: params
// in, dtype and head dim as values (dispatch.cuh turns them into template
// arguments on the kernels' side), no ATen.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "cuda/params.cuh"

namespace unigist {
namespace cuda_detail {

// Whether environment variable `name` is set to exactly `value`. The kernel-choice
// switches (UNIGIST_FORCE_SM80, UNIGIST_CUDA_STRIDED, UNIGIST_SM90_*_CONSUMERS,
// UNIGIST_CUDA_CONCURRENT_DQ, UNIGIST_SM90_TMA, UNIGIST_SM90_DKDV_ORDER; and
// UNIGIST_SM90_PERSISTENT, UNIGIST_SM90_PINGPONG through the functions below)
// are read on every call, so tests and A/B runs can flip them in one process.
inline bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

// Whether switch `var`, a '+'-separated list of names, selects `name`: unset or
// "1" selects `default_name` only, "0" nothing (and any other value the names
// it holds).
inline bool env_selects(const char* var, const char* name, const char* default_name) {
  const char* env = std::getenv(var);
  if (env == nullptr || std::strcmp(env, "1") == 0) return std::strcmp(name, default_name) == 0;
  return std::strstr(env, name) != nullptr;
}
// Which passes of the wgmma dK/dV kernel loop persistently over their key
// blocks (a CTA per SM taking them from a counter) rather than launching a CTA
// per block: "dense" and "gist". UNIGIST_SM90_PERSISTENT: the dense pass by
// default (NOTES v16-v17); "dense+gist" both (v16's default; A/B runs).
inline bool sm90_persistent(const char* pass) { return env_selects("UNIGIST_SM90_PERSISTENT", pass, "dense"); }
// Whether the wgmma `kernel` ("fwd", "dq") runs its consumer warpgroups in
// turns (sm90::ConsumerTurns, FlashAttention-3's ping-pong).
// UNIGIST_SM90_PINGPONG: the forward only by default (H200: forward 2-3% faster
// at 4k-8k, 32k unchanged; the dQ kernel 1-3% slower at D=64; NOTES v18);
// "fwd+dq" both (A/B runs).
inline bool sm90_pingpong(const char* kernel) { return env_selects("UNIGIST_SM90_PINGPONG", kernel, "fwd"); }
// CTAs of a persistent grid: one per SM, or UNIGIST_SM90_PERSISTENT_GRID=n
// (tests: a few CTAs take many items each even on small inputs).
int sm90_persistent_ctas();

// mma.sync kernels (fwd_sm80.cu, bwd_sm80.cu, cache_fwd_sm80.cu), built for
// every arch of TORCH_CUDA_ARCH_LIST.
void launch_fwd(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);
// The backward in three steps: delta, then dQ and dK/dV (both passes, then the
// GQA group sums), which depend on delta only, so they may run on two streams.
// With sm90, dQ and dK/dV are the wgmma kernels.
enum class BwdStep { kDelta, kDq, kDkdv };
void launch_bwd(const AttnParams& p, bool bf16, int head_dim, bool sm90, BwdStep step, cudaStream_t stream);
void launch_cache_fwd(const CacheParams& p, bool bf16, int head_dim, int tiles, cudaStream_t stream);

// wgmma kernels (csrc/cuda/sm90/), built only when TORCH_CUDA_ARCH_LIST names
// 9.0a (then setup.py defines UNIGIST_WITH_SM90 for the other sources).
// use_sm90(device): they are built, the device is compute capability 9.0 and
// UNIGIST_FORCE_SM80 is not "1".
bool use_sm90(int device);
// Query rows per CTA of the wgmma forward (and of its compressed-cache form).
int fwd_sm90_rows(int head_dim);
void launch_fwd_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);
// The same kernel over a compressed cache (p.cached, p.tail_start, p.tail_end):
// gist_attention_cache_fwd's path for chunks that fill the GPU.
void launch_cache_fwd_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);
void launch_bwd_dq_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);
// Both dK/dV passes (gist, then dense).
void launch_bwd_dkdv_sm90(const AttnParams& p, bool bf16, int head_dim, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace unigist
