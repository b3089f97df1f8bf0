// Standalone check of the wgmma conventions in csrc/cuda/sm90/wgmma.cuh against a
// host GEMM: descriptors of K-major and MN-major 128B-swizzled tiles, the
// accumulator fragment layout, and A from registers. No torch needed:
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I csrc tests/cuda/wgmma_check.cu -o /tmp/wgmma_check && /tmp/wgmma_check
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/sm90/wgmma.cuh"

using namespace unigist::sm90;
using T = __nv_bfloat16;

constexpr int M = 64, K = 128, N = 128;

// C1 = A B^T (A [M][K] K-major, B [N][K] K-major);   SS, N = 128 and 64
// C2 = A V   (A from registers, V [K][N] MN-major); RS, N = 128 and 64
__global__ void check_kernel(const T* a, const T* b, const T* v, float* c1, float* c2, float* c3,
                             float* c4) {
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* sA = smem;              // 64 x 128: 2 slabs of 8 KB
  unsigned char* sB = sA + M * K * 2;    // 128 x 128: 2 slabs of 16 KB
  unsigned char* sV = sB + N * K * 2;    // 128 (K) x 128 (N): 2 slabs of 16 KB
  const int t = threadIdx.x;
  for (int i = t; i < M * K / 8; i += 128) {
    const int r = i / (K / 8), c = i % (K / 8);
    *reinterpret_cast<uint4*>(sA + sw128_offset<M>(r, c)) = *reinterpret_cast<const uint4*>(a + r * K + c * 8);
  }
  for (int i = t; i < N * K / 8; i += 128) {
    const int r = i / (K / 8), c = i % (K / 8);
    *reinterpret_cast<uint4*>(sB + sw128_offset<N>(r, c)) = *reinterpret_cast<const uint4*>(b + r * K + c * 8);
  }
  for (int i = t; i < K * N / 8; i += 128) {
    const int r = i / (N / 8), c = i % (N / 8);
    *reinterpret_cast<uint4*>(sV + sw128_offset<K>(r, c)) = *reinterpret_cast<const uint4*>(v + r * N + c * 8);
  }
  fence_proxy_async();
  __syncthreads();
  const uint32_t aA = static_cast<uint32_t>(__cvta_generic_to_shared(sA));
  const uint32_t aB = static_cast<uint32_t>(__cvta_generic_to_shared(sB));
  const uint32_t aV = static_cast<uint32_t>(__cvta_generic_to_shared(sV));
  const int warp = t / 32, lane = t % 32;

  float d[N / 8][4];
  float e[8][4];
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    const uint64_t da = make_desc(aA + (ks / 4) * M * 128 + (ks % 4) * 32, 16, 1024);
    const uint64_t db = make_desc(aB + (ks / 4) * N * 128 + (ks % 4) * 32, 16, 1024);
    wgmma_ss<0, 0>(d, da, db, ks > 0, T{});
    wgmma_ss<0, 0>(e, da, db, ks > 0, T{});  // first 64 rows of B
  }
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(d);
  reg_fence(e);
  const int r0 = warp * 16 + lane / 4;
  for (int j = 0; j < N / 8; ++j)
    for (int x = 0; x < 4; ++x) {
      const int r = r0 + (x / 2) * 8, c = j * 8 + 2 * (lane % 4) + (x % 2);
      c1[r * N + c] = d[j][x];
      if (j < 8) c3[r * 64 + c] = e[j][x];
    }

  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    uint32_t af[4];
    const int kc = ks * 16 + 2 * (lane % 4);
    auto pk = [&](int r, int k) {
      __nv_bfloat162 h;
      h.x = a[r * K + k];
      h.y = a[r * K + k + 1];
      return *reinterpret_cast<uint32_t*>(&h);
    };
    af[0] = pk(r0, kc);
    af[1] = pk(r0 + 8, kc);
    af[2] = pk(r0, kc + 8);
    af[3] = pk(r0 + 8, kc + 8);
    const uint64_t dv = make_desc(aV + ks * 2048, K * 128, 1024);
    wgmma_rs<1>(d, af, dv, ks > 0, T{});
    wgmma_rs<1>(e, af, dv, ks > 0, T{});  // first 64 columns of V
  }
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(d);
  reg_fence(e);
  for (int j = 0; j < N / 8; ++j)
    for (int x = 0; x < 4; ++x) {
      const int r = r0 + (x / 2) * 8, c = j * 8 + 2 * (lane % 4) + (x % 2);
      c2[r * N + c] = d[j][x];
      if (j < 8) c4[r * 64 + c] = e[j][x];
    }
}

int main() {
  std::vector<T> a(M * K), b(N * K), v(K * N);
  std::vector<float> fa(M * K), fb(N * K), fv(K * N);
  srand(1);
  auto rnd = [] { return static_cast<float>(rand()) / RAND_MAX * 2.f - 1.f; };
  for (int i = 0; i < M * K; ++i) { a[i] = __float2bfloat16(rnd()); fa[i] = __bfloat162float(a[i]); }
  for (int i = 0; i < N * K; ++i) { b[i] = __float2bfloat16(rnd()); fb[i] = __bfloat162float(b[i]); }
  for (int i = 0; i < K * N; ++i) { v[i] = __float2bfloat16(rnd()); fv[i] = __bfloat162float(v[i]); }
  T *da, *db, *dv;
  float *c1, *c2, *c3, *c4;
  cudaMalloc(&da, a.size() * 2);
  cudaMalloc(&db, b.size() * 2);
  cudaMalloc(&dv, v.size() * 2);
  cudaMalloc(&c1, M * N * 4);
  cudaMalloc(&c2, M * N * 4);
  cudaMalloc(&c3, M * 64 * 4);
  cudaMalloc(&c4, M * 64 * 4);
  cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice);
  const int smem = (M * K + N * K + K * N) * 2;
  cudaFuncSetAttribute(check_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  check_kernel<<<1, 128, smem>>>(da, db, dv, c1, c2, c3, c4);
  cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    printf("wgmma_check: CUDA error %s\n", cudaGetErrorString(err));
    return 1;
  }
  std::vector<float> h1(M * N), h2(M * N), h3(M * 64), h4(M * 64);
  cudaMemcpy(h1.data(), c1, M * N * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(h2.data(), c2, M * N * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(h3.data(), c3, M * 64 * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(h4.data(), c4, M * 64 * 4, cudaMemcpyDeviceToHost);
  double e1 = 0, e2 = 0, e3 = 0, e4 = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s1 = 0, s2 = 0;
      for (int k = 0; k < K; ++k) {
        s1 += static_cast<double>(fa[i * K + k]) * fb[j * K + k];
        s2 += static_cast<double>(fa[i * K + k]) * fv[k * N + j];
      }
      e1 = fmax(e1, fabs(s1 - h1[i * N + j]));
      e2 = fmax(e2, fabs(s2 - h2[i * N + j]));
      if (j < 64) {
        e3 = fmax(e3, fabs(s1 - h3[i * 64 + j]));
        e4 = fmax(e4, fabs(s2 - h4[i * 64 + j]));
      }
    }
  const bool ok = e1 < 1e-2 && e2 < 1e-2 && e3 < 1e-2 && e4 < 1e-2;
  printf("wgmma_check: SS K-major n128 %.2e n64 %.2e | RS MN-major n128 %.2e n64 %.2e -> %s\n", e1, e3, e2, e4,
         ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}
