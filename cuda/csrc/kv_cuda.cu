// kv_cuda.cu - CUDA twin of kv_cpu.cpp (same per-token logic from kv_scores.h). Device pointers; returns a
// cudaError_t as int. Compiles with nvcc (sm_80/sm_90); it cannot be run on this machine (no GPU).
#include <cuda_runtime.h>

#include <cstdint>

#include "kv_scores.h"

namespace {

constexpr int kMaxQueries = 64;

// one thread per (bh, token); n <= kMaxQueries queries accumulated in registers
__global__ void kv_scores_kernel(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps,
                                 int t_bits, const float* tab, const float* cy, float* out, int64_t BH, int64_t L,
                                 int K, int M, int n) {
  const int tb = (K * t_bits + 7) / 8;
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= BH * L) return;
  const int64_t bh = r / L, t = r % L;
  float acc[kMaxQueries];
  for (int i = 0; i < n; ++i) acc[i] = 0.f;
  coset_kv::score_token(idx + r * K * M, tpack + r * tb, t_bits, rho[r], steps, tab + bh * K * coset_kv::kTable * n,
                        cy + bh * K * n, K, M, n, acc);
  for (int i = 0; i < n; ++i) out[(bh * n + i) * L + t] = acc[i];
}

// one thread per (bh, query, block): loops over the tokens, decoding its block of each
__global__ void kv_values_kernel(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps,
                                 int t_bits, const float* p, const float* a, const float* c, float* out, int64_t BH,
                                 int64_t L, int K, int M, int n) {
  const int tb = (K * t_bits + 7) / 8;
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= BH * n * K) return;
  const int k = (int)(r % K);
  const int64_t i = (r / K) % n, bh = r / ((int64_t)K * n);
  float acc[coset_kv::kBlock] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float v[coset_kv::kBlock];
  for (int64_t t = 0; t < L; ++t) {
    const int64_t r2 = bh * L + t;
    const float wk = coset_kv::block_factor(tpack + r2 * tb, t_bits, k, rho[r2], steps);
    coset_kv::decode_block(idx + (r2 * K + k) * M, wk, a, c, M, v);
    const float pi = p[(bh * n + i) * L + t];
    for (int d = 0; d < coset_kv::kBlock; ++d) acc[d] += pi * v[d];
  }
  float* o = out + (bh * n + i) * (int64_t)K * coset_kv::kBlock + k * coset_kv::kBlock;
  for (int d = 0; d < coset_kv::kBlock; ++d) o[d] = acc[d];
}

}  // namespace

extern "C" {

int kv_scores_cuda(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                   const float* tab, const float* cy, float* out, int64_t BH, int64_t L, int K, int M, int n,
                   std::uintptr_t stream) {
  if (n < 1 || n > kMaxQueries || M < 1 || M > coset_kv::kMaxM || K < 1) return (int)cudaErrorInvalidValue;
  const int64_t total = BH * L;
  if (total == 0) return 0;
  const int threads = 256;
  kv_scores_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
      idx, tpack, rho, steps, t_bits, tab, cy, out, BH, L, K, M, n);
  return (int)cudaGetLastError();
}

int kv_values_cuda(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                   const float* p, const float* a, const float* c, float* out, int64_t BH, int64_t L, int K, int M,
                   int n, std::uintptr_t stream) {
  if (n < 1 || M < 1 || M > coset_kv::kMaxM || K < 1) return (int)cudaErrorInvalidValue;
  const int64_t total = BH * n * K;
  if (total == 0) return 0;
  const int threads = 128;
  kv_values_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
      idx, tpack, rho, steps, t_bits, p, a, c, out, BH, L, K, M, n);
  return (int)cudaGetLastError();
}

}  // extern "C"
