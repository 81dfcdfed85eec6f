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

// ------------------------------------------------------------------ the GPU order (shared host/device core)
// The CUDA kernels (lut_gemv_cuda.cu) give one warp to a row: lane l of kWarp adds the contributions of blocks
// k = l, l + 32, l + 64, ... in that order (from +0.0f), then the 32 lane sums are added by a fixed tree
// (lane i + lane i + h for h = 16, 8, 4, 2, 1: a butterfly of __shfl_xor_sync, and float addition is
// commutative bit for bit). Every float operation below is one IEEE rounding (host -ffp-contract=off, device
// --fmad=false), so the CPU driver lut_gemv_core_cpu (lut_gemv.cpp) that runs these same functions lane by lane
// returns the GPU kernel's result bit for bit, and coset.cuda.lut_gemv.gemv_reference spells out the same
// order in torch (tests/test_lut_gemv.py compares the three with torch.equal).
constexpr int kWarp = 32;

COSET_HD int64_t code_index(uint8_t i) { return i; }
COSET_HD int64_t code_index(int16_t i) { return (uint16_t)i; }  // uint16 bit pattern (E8 q=4: q^d = 65536)
COSET_HD int64_t code_index(uint16_t i) { return i; }
COSET_HD int64_t code_index(int32_t i) { return i; }

COSET_HD float block_scale(const uint8_t* T, const float* scale_of, const float* sx, int64_t k) {
  return sx ? sx[k] : scale_of[T[k]];
}

// Codebook block: v = sum_m q^m A[idx_m] exactly in int32 (Horner), w_c = float(v_c) * s (centred codes:
// w_c = (float(v_c) - hc_c) * s with hc = h * c, c the offset of the whole M-layer constellation), then per query
// a[j] += (((w_0 x_0 + w_1 x_1) + w_2 x_2) + ...). A (Q, D) int8 = h * a_i; xk = x + k * D (queries / h).
template <typename IdxT, int D, int B>
COSET_HD void block_codebook(const IdxT* ik, int M, float s, const int8_t* A, const float* xk, int64_t ldx, int q,
                             float* a, const float* hc) {
  int32_t v[D];
  const int8_t* a0 = A + code_index(ik[M - 1]) * D;
  for (int c = 0; c < D; ++c) v[c] = a0[c];
  for (int m = M - 2; m >= 0; --m) {
    const int8_t* am = A + code_index(ik[m]) * D;
    for (int c = 0; c < D; ++c) v[c] = v[c] * q + am[c];
  }
  float w[D];
  for (int c = 0; c < D; ++c) w[c] = hc ? ((float)v[c] - hc[c]) * s : (float)v[c] * s;
  for (int j = 0; j < B; ++j) {
    const float* xj = xk + j * ldx;
    float dot = w[0] * xj[0];
    for (int c = 1; c < D; ++c) dot = dot + w[c] * xj[c];
    a[j] = a[j] + dot;
  }
}

// One-sided tables block: v_j = (t_{M-1} q + t_{M-2}) q + ... + t_0 (float32 Horner), a[j] += s * v_j.
// tk = tab + k * Q * B in [i][j] layout.
template <typename IdxT, int B>
COSET_HD void block_tables(const IdxT* ik, int M, float s, const float* tk, float q, float* a) {
  float v[B];
  const float* t0 = tk + code_index(ik[M - 1]) * B;
  for (int j = 0; j < B; ++j) v[j] = t0[j];
  for (int m = M - 2; m >= 0; --m) {
    const float* tm = tk + code_index(ik[m]) * B;
    for (int j = 0; j < B; ++j) v[j] = v[j] * q + tm[j];
  }
  for (int j = 0; j < B; ++j) a[j] = a[j] + s * v[j];
}

// One lane's share of a row: blocks k = lane, lane + kWarp, ... < K, added to a[0..B) in that order.
// idx, T, sx point at the row (K * M indices, K steps or K scales).
template <typename IdxT, int D, int B>
COSET_HD void lane_codebook(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx,
                            const int8_t* A, const float* x, int64_t ldx, int K, int M, int q, int lane, float* a,
                            const float* hc) {
  for (int k = lane; k < K; k += kWarp)
    block_codebook<IdxT, D, B>(idx + (int64_t)k * M, M, block_scale(T, scale_of, sx, k), A, x + (int64_t)k * D, ldx,
                               q, a, hc);
}

template <typename IdxT, int B>
COSET_HD void lane_tables(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx,
                          const float* tab, int64_t Q, int K, int M, float q, int lane, float* a) {
  for (int k = lane; k < K; k += kWarp)
    block_tables<IdxT, B>(idx + (int64_t)k * M, M, block_scale(T, scale_of, sx, k), tab + (int64_t)k * Q * B, q, a);
}

// One entry of the one-sided table, tab[k][i][j] = ((A_i0 x_0 + A_i1 x_1) + ...) with xk = x_j + k * d.
COSET_HD float table_entry(const float* ai, const float* xk, int d) {
  float s = ai[0] * xk[0];
  for (int c = 1; c < d; ++c) s = s + ai[c] * xk[c];
  return s;
}

// The lane tree on the host: p[kWarp][B] -> p[0][.] (the device does the same with __shfl_xor_sync).
template <int B>
COSET_HD void lane_tree(float (*p)[B]) {
  for (int h = kWarp / 2; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i)
      for (int j = 0; j < B; ++j) p[i][j] = p[i][j] + p[i + h][j];
}

}  // namespace lut
}  // namespace coset

#ifndef __CUDACC__
namespace coset {
// CPU entry points (lut_gemv.cpp). idx: (n, K, M) uint8 / uint16 / int32 (idx_bytes 1, 2, 4); block scales
// from sx (n, K) float32 when non-null, else scale_of[T[r, k]]; B in {1, 2, 4, 8}; out (n, B) float32. n_scales:
// entries of scale_of (the codebook path's fast loops take the scales from registers when <= 16). hc: null, or d
// floats h * c for centred codes (block_codebook).
void lut_build_tables_cpu(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q, float* tab);
void lut_gemv_tables_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, int n_scales,
                         const float* sx, const float* tab, int64_t n, int K, int M, int64_t Q, int q, int B,
                         float* out);
void lut_gemv_codebook_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                           const int8_t* A, int d, const float* x, int64_t ldx, int64_t n, int K, int M, int q, int B,
                           float* out, int n_scales = 0, const float* hc = nullptr);
// The shared core of the CUDA kernels run on the CPU in the GPU's order (lane by lane, then the lane tree), for
// the tests: bit for bit what lut_gemv_cuda.cu computes. A == nullptr: tables path (tab), else codebook (A, x).
void lut_build_tables_core_cpu(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q,
                               float* tab);
void lut_gemv_core_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                       const int8_t* A, int d, const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t n,
                       int K, int M, int q, int B, float* out, const float* hc = nullptr);
}  // namespace coset
#endif

namespace coset {
// CUDA entry points (lut_gemv_cuda.cu), same arguments as the CPU ones plus the stream; every pointer is on
// the device. Return a cudaError_t value (0 = success).
int lut_build_tables_cuda(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q, float* tab,
                          void* stream);
int lut_gemv_cuda(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                  const int8_t* A, int d, const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t n, int K,
                  int M, int q, int B, float* out, void* stream, const float* hc = nullptr);
}  // namespace coset
