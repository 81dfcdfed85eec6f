// kv_scores.h - per-token logic of the coset.kv attention kernels, shared by kv_cpu.cpp and kv_cuda.cu.
//
// A cached head vector is K blocks of 8 (E8, q = 2, M layers): idx[k*M + m] is the label byte of layer m of
// block k (= its index in the block's 256-entry table), w[k] = rho * steps[T_k] its block factor, with rho the
// vector's scale and T_k read from the vector's packed T bytes (t_bits per block, little-endian bit stream,
// the layout of coset.quant.pack_labels).
//
//   score(query i) = sum_k w[k] * ( sum_m 2^m tab[k][idx[k,m]][i] - cy[k][i] )      (one-sided LUT, paper §6)
//   v_hat[8k + d]  = w[k] * ( sum_m 2^m a[idx[k,m]][d] - c[d] )                       (decoded value block)
//
// tab is (K, 256, n) float32 (n queries contiguous: one lookup reads all queries of a KV head), cy (K, n).
// Self-contained: no torch, no pybind11; compiled as C++17 or CUDA.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define COSET_KV_HD __host__ __device__ __forceinline__
#else
#define COSET_KV_HD inline
#endif

namespace coset_kv {

constexpr int kBlock = 8;     // E8 block length
constexpr int kTable = 256;   // 2^8 labels of E8 mod 2E8
constexpr int kMaxM = 4;

// w_k of one vector: tp = its packed T bytes (unused when t_bits == 0), steps[t] = beta 2^(alpha t).
COSET_KV_HD float block_factor(const uint8_t* tp, int t_bits, int k, float rho, const float* steps) {
  if (t_bits == 0) return rho * steps[0];
  const int bit = k * t_bits;
  const int T = (tp[bit >> 3] >> (bit & 7)) & ((1 << t_bits) - 1);
  return rho * steps[T];
}

// acc[i] += score of one token against n queries (acc zeroed by the caller).
COSET_KV_HD void score_token(const uint8_t* idx, const uint8_t* tp, int t_bits, float rho, const float* steps,
                             const float* tab, const float* cy, int K, int M, int n, float* acc) {
  for (int k = 0; k < K; ++k) {
    const float wk = block_factor(tp, t_bits, k, rho, steps);
    const float* tk = tab + (int64_t)k * kTable * n;
    const float* ck = cy + (int64_t)k * n;
    const uint8_t* ik = idx + k * M;
    for (int i = 0; i < n; ++i) {
      float blk = 0.f;
      float lw = 1.f;
      for (int m = 0; m < M; ++m) {
        blk += lw * tk[(int64_t)ik[m] * n + i];
        lw *= 2.f;
      }
      acc[i] += wk * (blk - ck[i]);
    }
  }
}

// v[0..8) = decoded block k of one token.
COSET_KV_HD void decode_block(const uint8_t* idx_k, float wk, const float* a, const float* c, int M, float* v) {
  for (int d = 0; d < kBlock; ++d) v[d] = 0.f;
  float lw = 1.f;
  for (int m = 0; m < M; ++m) {
    const float* am = a + (int)idx_k[m] * kBlock;
    for (int d = 0; d < kBlock; ++d) v[d] += lw * am[d];
    lw *= 2.f;
  }
  for (int d = 0; d < kBlock; ++d) v[d] = wk * (v[d] - c[d]);
}

}  // namespace coset_kv
