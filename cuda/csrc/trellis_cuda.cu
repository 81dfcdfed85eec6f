// trellis_cuda.cu - CUDA twin of trellis_cpu.cpp (the same per-vector logic from trellis_core.inc). Device
// pointers; returns a cudaError_t as int. Compiles with nvcc (sm_80/sm_90); it cannot be run on this machine
// (no GPU). Encoding: one thread per vector, its Viterbi scratch in a global buffer the caller provides
// (trellis_encode_cuda_work_bytes per vector) - correct by construction, not tuned (a block per vector with the
// states across threads is the fast layout). Values: one thread per (bh, query, element), looping over tokens;
// scores: one thread per (bh, token).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#define COSET_TR_HD __host__ __device__ __forceinline__

namespace coset_trellis {
#include "trellis_core.inc"
}  // namespace coset_trellis

namespace {

using coset_trellis::TrellisWork;

__global__ void trellis_encode_kernel(const float* u, int64_t n, int D, const uint8_t* ks, const float* cb, int L,
                                      uint8_t* out, int nbytes, char* work, int64_t work_bytes) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int S = 1 << L;
  float* fl = reinterpret_cast<float*>(work + i * work_bytes);
  TrellisWork w;
  w.cost = fl;
  w.next = fl + S;
  w.m = fl + 2 * S;
  w.xr = w.m + (S >> 1);
  w.states = reinterpret_cast<int32_t*>(w.xr + D);
  w.back = reinterpret_cast<uint8_t*>(w.xr + 2 * D);
  w.kr = w.back + (int64_t)(D - 1) * (S >> 1);
  coset_trellis::trellis_encode_vector(u + i * D, D, ks, cb, L, w, out + i * nbytes, nbytes);
}

constexpr int kMaxBytes = 64;  // streams up to 512 bits (head dim 128 at 4 bits per element)

__global__ void trellis_values_kernel(const uint8_t* stream, const float* rho, const float* p, int64_t BH, int64_t L,
                                      int nq, int D, const uint8_t* ks, const float* cb, int LB, int nbytes,
                                      float* out) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= BH * nq * D) return;
  const int e = (int)(r % D);
  const int64_t i = (r / D) % nq, bh = r / ((int64_t)D * nq);
  int end = 0;
  for (int t = 0; t <= e; ++t) end += ks[t];
  uint8_t buf[kMaxBytes + 6];
  float acc = 0.f;
  for (int64_t t = 0; t < L; ++t) {
    const float rt = rho[bh * L + t];
    if (rt == 0.f) continue;
    coset_trellis::trellis_buffer(stream + (bh * L + t) * nbytes, nbytes, buf);
    acc += p[(bh * nq + i) * L + t] * rt * cb[coset_trellis::trellis_state_at(buf, end, LB)];
  }
  out[r] += acc;
}

// Scores: one thread per (bh, token), decoding the token once for all nq queries.
__global__ void trellis_scores_kernel(const uint8_t* stream, const float* rho, const float* q, int64_t BH, int64_t L,
                                      int nq, int D, const uint8_t* ks, const float* cb, int LB, int nbytes,
                                      float* out) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= BH * L) return;
  const int64_t bh = r / L, t = r % L;
  const float rt = rho[r];
  uint8_t buf[kMaxBytes + 6];
  coset_trellis::trellis_buffer(stream + r * nbytes, nbytes, buf);
  for (int i = 0; i < nq; ++i) {
    const float* qi = q + (bh * nq + i) * D;
    float acc = 0.f;
    int end = 0;
    for (int e = 0; e < D; ++e) {
      end += ks[e];
      acc += qi[e] * cb[coset_trellis::trellis_state_at(buf, end, LB)];
    }
    out[(bh * nq + i) * L + t] = rt == 0.f ? 0.f : rt * acc;
  }
}

}  // namespace

extern "C" {

int64_t trellis_encode_cuda_work_bytes(int L, int D) {
  // floats: cost, next (2^L each), m (2^(L-1)), xr, states (D each); bytes: back, kr
  const int64_t b = 4 * (2 * (int64_t)(1 << L) + (1 << (L - 1)) + 2 * D) + (int64_t)(D - 1) * (1 << (L - 1)) + D;
  return (b + 15) / 16 * 16;  // each vector's floats stay aligned
}

int trellis_encode_cuda(const float* u, int64_t n, int D, const uint8_t* ks, const float* cb, int L, uint8_t* out,
                        int nbytes, void* work, std::uintptr_t stream) {
  if (n < 0 || D < 8 || L < 6 || L > 14 || nbytes < 2) return (int)cudaErrorInvalidValue;
  if (n == 0) return 0;
  const int threads = 64;
  trellis_encode_kernel<<<(unsigned)((n + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
      u, n, D, ks, cb, L, out, nbytes, static_cast<char*>(work), trellis_encode_cuda_work_bytes(L, D));
  return (int)cudaGetLastError();
}

int trellis_values_cuda(const uint8_t* stream_, const float* rho, const float* p, int64_t BH, int64_t L, int nq, int D,
                        const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, std::uintptr_t stream) {
  if (BH < 0 || L < 0 || nq < 1 || D < 8 || nbytes < 2 || nbytes > kMaxBytes) return (int)cudaErrorInvalidValue;
  const int64_t total = BH * nq * D;
  if (total == 0) return 0;
  const int threads = 128;
  trellis_values_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
      stream_, rho, p, BH, L, nq, D, ks, cb, LB, nbytes, out);
  return (int)cudaGetLastError();
}

int trellis_scores_cuda(const uint8_t* stream_, const float* rho, const float* q, int64_t BH, int64_t L, int nq, int D,
                        const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, std::uintptr_t stream) {
  if (BH < 0 || L < 0 || nq < 1 || D < 8 || nbytes < 2 || nbytes > kMaxBytes) return (int)cudaErrorInvalidValue;
  const int64_t total = BH * L;
  if (total == 0) return 0;
  const int threads = 128;
  trellis_scores_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
      stream_, rho, q, BH, L, nq, D, ks, cb, LB, nbytes, out);
  return (int)cudaGetLastError();
}

}  // extern "C"
