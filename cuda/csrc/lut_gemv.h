// lut_gemv.h - y = W x with W stored as HNLQ codes (per-row helpers shared by the CPU and CUDA kernels).
//
// W has n rows of K d-blocks; block (r, k) holds M label indices idx[r,k,m] = sum_i b_i q^i and a scale
// s[r,k] = scales[T[r,k]] (or a float sx[r,k]). Two ways to score a row against B queries:
//
// * one-sided tables (paper.md §6): tab[k][i][j] = <a_i, x_j,k> for the q^d representatives a_i, built once
//   per call; then y[r, j] = sum_k s[r,k] sum_m q^m tab[k][idx[r,k,m]][j]: M lookups per block, and the B
//   queries of one lookup are contiguous (one vector load for B = 8).
// * codebook (for q^d too large for per-query tables, e.g. E8 q=4: 2^16 entries per block): the
//   representatives themselves, A[i] = h * a_i as int8 (one 512 KiB table for E8 q=4, shared by all
//   blocks and queries); v = sum_m q^m A[idx_m] is exact in int32 and y += s * <v, x_k> / h.
#pragma once

#include <cstdint>

#include "hnlq_core.h"

namespace coset {
namespace lut {

constexpr int kMaxB = 8;

// One row, blocks [k0, k1), one-sided tables in [k][i][j] layout (Q entries per block, B queries), added
// to acc. IdxT: uint8 / uint16 / int32. Scales from sx (float per block) if non-null, else scale_of[T[k]].
template <typename IdxT, int B, int M>
COSET_HD void row_tables(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx,
                         const float* tab, int k0, int k1, int64_t Q, float q, float* acc) {
  float a[B];
  for (int j = 0; j < B; ++j) a[j] = 0.0f;
  for (int k = k0; k < k1; ++k) {
    const float s = sx ? sx[k] : scale_of[T[k]];
    const float* tk = tab + (int64_t)k * Q * B;
    float v[B];
    const float* t0 = tk + (int64_t)idx[k * M + (M - 1)] * B;
    for (int j = 0; j < B; ++j) v[j] = t0[j];
    for (int m = M - 2; m >= 0; --m) {  // Horner over the layers: sum_m q^m t_m
      const float* tm = tk + (int64_t)idx[k * M + m] * B;
      for (int j = 0; j < B; ++j) v[j] = v[j] * q + tm[j];
    }
    for (int j = 0; j < B; ++j) a[j] += s * v[j];
  }
  for (int j = 0; j < B; ++j) acc[j] += a[j];
}

// One row, codebook path: A (Q, D) int8 = h * a_i; x (B, K*D) float32, xs = x / h folded by the caller.
template <typename IdxT, int D, int B, int M>
COSET_HD void row_codebook(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx,
                           const int8_t* A, const float* x, int64_t ldx, int K, int q, float* acc) {
  float a[B];
  for (int j = 0; j < B; ++j) a[j] = 0.0f;
  for (int k = 0; k < K; ++k) {
    const float s = sx ? sx[k] : scale_of[T[k]];
    int32_t v[D];
    const int8_t* a0 = A + (int64_t)idx[k * M + (M - 1)] * D;
    for (int c = 0; c < D; ++c) v[c] = a0[c];
    for (int m = M - 2; m >= 0; --m) {
      const int8_t* am = A + (int64_t)idx[k * M + m] * D;
      for (int c = 0; c < D; ++c) v[c] = v[c] * q + am[c];
    }
    float vf[D];
    for (int c = 0; c < D; ++c) vf[c] = (float)v[c] * s;
    for (int j = 0; j < B; ++j) {
      const float* xk = x + j * ldx + (int64_t)k * D;
      float dot = 0.0f;
      for (int c = 0; c < D; ++c) dot += vf[c] * xk[c];
      a[j] += dot;
    }
  }
  for (int j = 0; j < B; ++j) acc[j] = a[j];
}

}  // namespace lut
}  // namespace coset

#ifndef __CUDACC__
namespace coset {
// CPU entry points (lut_gemv.cpp). idx: (n, K, M) uint8 / uint16 / int32 (idx_bytes 1, 2, 4); block scales
// from sx (n, K) float32 when non-null, else scale_of[T[r, k]]; B in {1, 2, 4, 8}; out (n, B) float32.
void lut_build_tables_cpu(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q, float* tab);
void lut_gemv_tables_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, int n_scales,
                         const float* sx, const float* tab, int64_t n, int K, int M, int64_t Q, int q, int B,
                         float* out);
void lut_gemv_codebook_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                           const int8_t* A, int d, const float* x, int64_t ldx, int64_t n, int K, int M, int q, int B,
                           float* out);
}  // namespace coset
#endif
