// fast_quant.h - float32 + integer HNLQ path (D_n and E8, q a power of two), shared by CPU and CUDA.
//
// The float64 reference (coset.quant) computes every closest point as CP(g + eps) in float64. This path
// reaches bit for bit the same lattice points with far cheaper arithmetic:
//
// * Layer 0 (the only layer on real data) runs in float32, u = x * (1/s). It is *certified*: every decision
//   the closest-point algorithm takes (each rounding, the argmax when the parity is odd, E8's D8 vs D8+1/2)
//   must clear a margin larger than the float32 error of u plus |eps|. A vector that comes closer than that
//   to any decision boundary is "rejected" and the caller redoes it with the float64 kernels of
//   hnlq_core.h, so the result is always the reference's (about 1e-5 of Gaussian vectors are rejected).
// * Every later layer is exact integer arithmetic: lambda_m is an integer (D_n) or half-integer (E8) vector,
//   lambda_m / q + eps sits on a Voronoi boundary only at exact ties, and the tiny generic eps then decides
//   each tie exactly as in float64: rounding goes up iff eps_i > 0; among equal |delta| the argmax takes the
//   larger signed perturbation; E8's equal distances are split by the sign of <eps, y1 - y0>. (eps ~ 1e-9
//   is far above float64 resolution of these small values and far below the 1/(2q) spacing, so the float64
//   reference takes exactly these decisions; tests/test_fast_quant.py checks it on every boundary class.)
//
// Integer convention: P = h * lambda with h = 1 (D_n) or 2 (E8), so P is always an integer vector.
// Functions take arrays [coordinate][lane] with LANES vectors side by side; the CPU instantiates LANES = 8
// (the lane loops auto-vectorize to one AVX2 register), CUDA instantiates LANES = 1 (one thread per vector).
#pragma once

#include <cmath>
#include <cstdint>
#ifndef __CUDACC__
#include <vector>
#endif

#include "hnlq_core.h"

#if defined(__CUDACC__)
#define FQ_HD COSET_HD
#else
#define FQ_HD inline __attribute__((always_inline))
#endif

namespace coset {
namespace fq {

// Per-lattice constants of the integer layers (built once on the host from eps and G^-1).
struct IntConsts {
  int d;
  int h;                 // 1 for D_n, 2 for E8
  int32_t neg[kMaxDim];  // eps_i < 0: an exact rounding tie goes down
  int32_t rk_pos[kMaxDim], rk_neg[kMaxDim], rk_abs[kMaxDim];  // rank of +eps_i, -eps_i, |eps_i| among {+-eps_j}
  int32_t step0[kMaxDim];  // sign(eps_i) (the D_n fix direction when delta_i = eps_i)
  // dn_int's sort-key payloads (rank << 5) | (i << 2) | (step + 1) for R > 0, R < 0 and R = 0 (step +1, -1, step0)
  int32_t key_pos[kMaxDim], key_neg[kMaxDim], key_zero[kMaxDim];
  int32_t H[kMaxDim * kMaxDim];  // 2 * G^-1 (integer for D_n and E8), row-major
  int hshift;            // z = (H P) >> hshift: 1 for D_n (h*2 = 2), 2 for E8 (h*2 = 4)
  float epsf[kMaxDim];   // 1e9 * eps (only the sign of <eps, v> is used, with a rejection margin)
};

// Float32 margin of layer 0: |u32 - u64| <= 2^-23 |u| (one rounding of 1/s, one of the product) and
// |eps| < 1e-9; 2^-21 |u| + 2^-26 leaves a factor 4 and 15 on these.
constexpr float kRel = 4.76837158203125e-07f;  // 2^-21
constexpr float kAbs = 1.4901161193847656e-08f;  // 2^-26
constexpr float kBig = 4194304.0f;                // 2^22: beyond this, reject (integers stay exact)

// ------------------------------------------------------------------------------------------ lane packs
// The functions below are written once for a "pack" of lanes: F = float, I = int32_t (one vector; CUDA) or
// F = v8f, I = v8i (GCC vector extensions: 8 vectors in one AVX2 register on the CPU, two SSE registers in
// the baseline build). Comparisons go through mask() (0 / -1 per lane) and selects are m ? a : b.
// The nearest integer of a lane that is not rejected (|frac - 1/2| above the margin, |x| < 2^22): there
// floor(x + 1/2) and any rounding to nearest agree, so the CPU pack adds and subtracts 1.5 * 2^23 (two adds
// instead of floor's five operations); rejected lanes are redone in float64, whatever this returned.
FQ_HD float p_rnear(float x) { return floorf(x + 0.5f); }
FQ_HD float p_abs(float x) { return fabsf(x); }
FQ_HD int32_t p_toi(float x) { return (int32_t)x; }
FQ_HD float p_tof(int32_t x) { return (float)x; }
FQ_HD int32_t mask(bool m) { return m ? -1 : 0; }
FQ_HD int32_t p_maxi(int32_t a, int32_t b) { return a > b ? a : b; }
FQ_HD int32_t p_mini(int32_t a, int32_t b) { return a < b ? a : b; }
FQ_HD int32_t p_shl(int32_t x, int s) { return (int32_t)((uint32_t)x << s); }  // (a negative x << s is UB in C++17)
#ifndef __CUDACC__
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
FQ_HD v8f p_rnear(v8f x) {
  const v8f big = {12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f,
                   12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f};  // 1.5 * 2^23
  return (x + big) - big;  // round to nearest even: exact for |x| < 2^22 (-ffp-contract=off, no fast-math)
}
// |x| by clearing the sign bit (one vandps instead of a compare, a negation and a blend); it differs from
// x < 0 ? -x : x only on -0.0, which every use compares or adds as 0.
FQ_HD v8f p_abs(v8f x) {
  typedef uint32_t u8v __attribute__((vector_size(32)));
  return (v8f)((u8v)x & 0x7fffffffu);
}
FQ_HD v8i p_toi(v8f x) { return __builtin_convertvector(x, v8i); }
FQ_HD v8f p_tof(v8i x) { return __builtin_convertvector(x, v8f); }
FQ_HD v8i mask(v8i m) { return m; }
FQ_HD v8i p_maxi(v8i a, v8i b) { return a > b ? a : b; }
FQ_HD v8i p_mini(v8i a, v8i b) { return a < b ? a : b; }
typedef uint32_t v8u __attribute__((vector_size(32)));
FQ_HD v8i p_shl(v8i x, int s) { return (v8i)((v8u)x << s); }
// Unaligned whole-vector load / store (one vmovups). A __builtin_memcpy into a v8f on the stack compiles to two
// 16-byte moves and a 32-byte reload: a failed store-to-load forward per vector (measured: ~20% of
// quantize_rows' time sat on the reload and the division by beta that waits for it).
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
FQ_HD v8f loadu8(const float* p) { return *(const v8f_u*)p; }
FQ_HD void storeu8(float* p, v8f v) { *(v8f_u*)p = v; }
#endif
template <class T>
FQ_HD T splat(float c) { return T{} + c; }
template <class T>
FQ_HD T splati(int32_t c) { return T{} + c; }
#ifndef __CUDACC__
// Broadcast as a shuffle of lane 0 (vpbroadcastd in the AVX2 build): GCC 12 expanded `T{} + c` and the
// all-equal initializer of a loaded value (dn_int's per-coordinate constants) to eight vpinsrd, because these
// header functions are compiled for the baseline target before they are inlined into the AVX2 drivers.
template <>
FQ_HD v8f splat<v8f>(float c) {
  const v8f t = {c};
  return __builtin_shufflevector(t, t, 0, 0, 0, 0, 0, 0, 0, 0);
}
template <>
FQ_HD v8i splati<v8i>(int32_t c) {
  const v8i t = {c};
  return __builtin_shufflevector(t, t, 0, 0, 0, 0, 0, 0, 0, 0);
}
#endif
// The coordinate loops of the closest-point functions unrolled (D <= 8): the index i becomes a constant, so
// splat(i) and the per-coordinate constants are immediates / broadcasts instead of built each iteration.
#if defined(__CUDACC__)
#define FQ_UNROLL _Pragma("unroll")
#else
#define FQ_UNROLL _Pragma("GCC unroll 8")
#endif

// ------------------------------------------------------------------------------------------ layer 0 (float32)
// Q_{D_n}(u) without eps; y = the integer lattice point, r = u - y (exact); bad |= lanes within the margin.
// EXACT: u is the reference's float64 value itself (x * inv_s with inv_s a power of two: exact barring subnormals,
// whose error < 2^-149), so the only perturbations are eps and the reference's rounding of g + eps (< 1e-9 + 2^-31
// for |u| < 2^22). A rounding decision is then uncertain only at an exact tie: |delta| = 1/2 needs |u| >= 1/2 or
// |u| just below 1/2, where u is a multiple of 2^-25, so |delta| != 1/2 means ||delta| - 1/2| >= 2^-25. The argmax
// keeps the constant margin 2 kAbs (two small |delta| can be arbitrarily close).
template <int D, bool EXACT = false, class F, class I>
FQ_HD void dn_float(const F* u, F* y, F* r, I& bad) {
  F best = splat<F>(-1.0f), second = splat<F>(-1.0f), mmax = splat<F>(0.0f), bdl = splat<F>(0.0f);
  F kk = splat<F>(0.0f), sum = splat<F>(0.0f);
  I b = splati<I>(0);
  FQ_UNROLL
  for (int i = 0; i < D; ++i) {
    const F ui = u[i];
    const F au = p_abs(ui);
    const F f = p_rnear(ui);
    const F dl = ui - f;  // exact: u minus a nearby integer
    const F ad = p_abs(dl);
    if (EXACT) {  // u is a float32 multiple of 2^-24 near 1/2 (|u| >= 1/2, or just below it): a rounding the
      // perturbations (< 2e-9) could flip is an exact tie
      b |= mask(ad == 0.5f) | mask(au >= kBig);
    } else {
      const F m = au * kRel + kAbs;
      b |= mask(p_abs(ad - 0.5f) <= m) | mask(au >= kBig);
      mmax = mask(m > mmax) ? m : mmax;
    }
    y[i] = f;
    r[i] = dl;
    sum += f;  // exact: small integers
    const I gt = mask(ad > best);
    const F lo = mask(ad < best) ? ad : best;
    second = mask(lo > second) ? lo : second;
    best = gt ? ad : best;
    kk = gt ? splat<F>((float)i) : kk;
    bdl = gt ? dl : bdl;
  }
  const I odd = -(p_toi(sum) & 1);
  // the argmax (and the sign of delta_k) only matters when the parity is odd
  if (EXACT)
    bad |= b | (odd & mask(best - second <= 2.0f * kAbs));
  else
    bad |= b | (odd & mask(best - second <= mmax * 2.0f));
  const F st = odd ? (mask(bdl >= 0.0f) ? splat<F>(1.0f) : splat<F>(-1.0f)) : splat<F>(0.0f);
  FQ_UNROLL
  for (int i = 0; i < D; ++i) {
    const F fix = mask(kk == (float)i) ? st : splat<F>(0.0f);
    y[i] = y[i] + fix;
    r[i] = r[i] - fix;
  }
}

// Layer 0 of KIND (kDn or kE8) at scale 1/s: P = h * Q(x / s + eps), bad |= uncertain lanes. EXACT: inv_s is a
// power of two (see dn_float).
template <int KIND, int D, bool EXACT = false, class F, class I>
FQ_HD void first_layer(const F* x, float inv_s, I* P, I& bad) {
  F u[D], y0[D], r0[D];
  for (int i = 0; i < D; ++i) u[i] = x[i] * inv_s;
  dn_float<D, EXACT>(u, y0, r0, bad);
  if (KIND == kDn) {
    for (int i = 0; i < D; ++i) P[i] = p_toi(y0[i]);
    return;
  }
  F um[D], y1[D], r1[D];
  for (int i = 0; i < D; ++i) um[i] = u[i] - 0.5f;  // exact for |u| < 2^22
  dn_float<D, EXACT>(um, y1, r1, bad);
  F d0 = splat<F>(0.0f), d1 = splat<F>(0.0f), mm = splat<F>(kAbs);
  for (int i = 0; i < D; ++i) {
    d0 += r0[i] * r0[i];
    d1 += r1[i] * r1[i];  // u - (y1 + 1/2) = um - y1
    if (!EXACT) {
      const F m = p_abs(u[i]) * kRel + kAbs;
      mm = mask(m > mm) ? m : mm;
    }
  }
  // |r| <= 1 per coordinate: each distance moves by <= 2 * 8 * m; float32 sums of <= 8 terms in [0, 3]
  const F margin = mm * 40.0f + (d0 + d1 + 1.0f) * 4.0e-6f;
  bad |= mask(p_abs(d0 - d1) <= margin);
  const I take0 = mask(d0 <= d1);
  for (int i = 0; i < D; ++i) P[i] = take0 ? p_toi(y0[i]) * 2 : p_toi(y1[i]) * 2 + 1;
}

// ------------------------------------------------------------------------------------------ integer layers
// D_n closest point of N / S + eps (S a power of two, log2(2S) = sh2): f and the residual numerator
// R = N - S f (|R| <= S/2) after the parity fix. Exact.
// The parity fix moves the coordinate with the largest |delta| (ties: the larger signed eps term). Each
// coordinate's sort key carries its payload in the low bits, (|R| << 9) | key_lo, key_lo = (rank << 5) | (i << 2) |
// (step + 1) (IntConsts::key_pos / key_neg / key_zero by the sign of R): the ranks are distinct, so one max per
// coordinate finds the argmax, its index and its step (no compare-and-three-selects chain).
template <int D, class I>
FQ_HD void dn_int(const IntConsts& C, const I* N, int32_t S, int sh2, I* f, I* R) {
  I best = splati<I>(-1), sum = splati<I>(0);
  const int sh = sh2 - 1;  // S = 2^sh
  FQ_UNROLL
  for (int i = 0; i < D; ++i) {
    const I n = N[i];
    const I fi = (n * 2 + (S - C.neg[i])) >> sh2;  // floor(N/S + 1/2 + eps): arithmetic shift = floor
    const I r = n - p_shl(fi, sh);
    f[i] = fi;
    R[i] = r;
    sum += fi;
    const I mp = mask(r > 0), mn = mask(r < 0);
    const I ar = mn ? -r : r;
    const I lo = mp ? splati<I>(C.key_pos[i]) : (mn ? splati<I>(C.key_neg[i]) : splati<I>(C.key_zero[i]));
    best = p_maxi((ar << 9) + lo, best);
  }
  const I odd = -(sum & 1);
  const I kk = best & 0x1c, st = (best & 3) - 1;
  FQ_UNROLL
  for (int i = 0; i < D; ++i) {
    const I fix = odd & mask(kk == (i << 2)) & st;
    f[i] += fix;
    R[i] -= p_shl(fix, sh);
  }
}

// One integer layer: Pout = h * Q(lambda / q + eps) for P = h * lambda, q = 2^lq. E8 lanes whose two
// candidates are equally far and whose eps tie-break is too close to call in float32 join `bad`.
template <int KIND, int D, class F, class I>
FQ_HD void int_layer(const IntConsts& C, const I* P, int lq, I* Pout, I& bad) {
  const int32_t q = 1 << lq;
  if (KIND == kDn) {
    I R[D];
    dn_int<D>(C, P, q, lq + 1, Pout, R);
    return;
  }
  // E8: x = P / (2q); y0 = Q_D8(x), y1 = Q_D8(x - 1/2) + 1/2 (numerator P - q, same denominator 2q).
  I Nm[D], f0[D], R0[D], f1[D], R1[D];
  for (int i = 0; i < D; ++i) Nm[i] = P[i] - q;
  dn_int<D>(C, P, 2 * q, lq + 2, f0, R0);
  dn_int<D>(C, Nm, 2 * q, lq + 2, f1, R1);
  I e0 = splati<I>(0), e1 = splati<I>(0);
  F s = splat<F>(0.0f), sa = splat<F>(0.0f);
  for (int i = 0; i < D; ++i) {
    e0 += R0[i] * R0[i];
    e1 += R1[i] * R1[i];
    // 2 (y1 - y0) = 2 f1 + 1 - 2 f0; the sign of <eps, y1 - y0> splits equal distances
    const F t = p_tof((f1[i] - f0[i]) * 2 + 1) * C.epsf[i];
    s += t;
    sa += p_abs(t);
  }
  const I tie = mask(e0 == e1);
  bad |= tie & mask(p_abs(s) <= sa * 1.0e-4f);
  const I take0 = mask(e0 < e1) | (tie & mask(s <= 0.0f));
  for (int i = 0; i < D; ++i) Pout[i] = take0 ? f0[i] * 2 : f1[i] * 2 + 1;
}

// Labels of one layer: b = (G^-1 lambda) mod q = ((H P) >> hshift) & (q - 1).
template <int D, class I>
FQ_HD void labels(const IntConsts& C, const I* P, int32_t qmask, I* b) {
  for (int i = 0; i < D; ++i) {
    I s = splati<I>(0);
    for (int j = 0; j < D; ++j) s += P[j] * C.H[i * D + j];
    b[i] = (s >> C.hshift) & qmask;  // exact division (G^-1 lambda is an integer), then floor mod q
  }
}

// The first n integer layers from lambda_0 (P0): A = h * lambda_n. Writes the labels of layers 0 .. n-1 when
// B != nullptr (B[m * D + i]); bad |= lanes to redo in float64.
template <int KIND, int D, class F, class I>
FQ_HD void int_layers(const IntConsts& C, const I* P0, int lq, int n, I* B, I* A, I& bad) {
  I Bn[D];
  const int32_t qmask = (1 << lq) - 1;
  for (int i = 0; i < D; ++i) A[i] = P0[i];
  for (int m = 0; m < n; ++m) {
    if (B) labels<D>(C, A, qmask, B + m * D);
    int_layer<KIND, D, F>(C, A, lq, Bn, bad);
    for (int i = 0; i < D; ++i) A[i] = Bn[i];
  }
}

// The last D_n layer (n = 4 or 8) as a test: is Q(lambda / q + eps) != 0 for the D_n point lambda (= A)? The
// Voronoi-relevant vectors of D_n are its minimal vectors v = s_i e_i + s_j e_j (every other coset of 2 D_n has
// more than one shortest pair), so the cell of 0 is {x : |x_i| + |x_j| <= 1 for all i != j} (the 24-cell for D4;
// Conway & Sloane ch. 21). lambda / q + eps is closer to 0 than to v iff <lambda, v> < q, or <lambda, v> = q and
// <eps, v> < 0. Per pair the largest <lambda, v> is |lambda_i| + |lambda_j|, reached by s_k = sign(lambda_k)
// (both signs when lambda_k = 0, the worse one counts: +|eps_k|). With r_k the rank of that eps term among the 2n
// values {+-eps_j} (rk_pos / rk_neg / rk_abs), <eps, v> < 0 iff r_i + r_j < 2n - 1, so lambda stays inside iff
// for every pair 2n (|lambda_i| + |lambda_j|) + r_i + r_j < 2n q + 2n - 1: the two largest b_k = 2n |lambda_k| +
// r_k decide. ~30 (D4) / ~60 (D8) vector operations instead of the decoder's ~80 / ~160, no table; exact (tests
// compare every D4 point of a box, and random D8 points around the boundary, with the float64 reference).
template <int D, class I>
FQ_HD I dn_outside(const IntConsts& C, const I* A, int32_t q) {
  I first = splati<I>(-1), second = splati<I>(-1);
  FQ_UNROLL
  for (int k = 0; k < D; ++k) {
    const I pos = mask(A[k] > 0), neg = mask(A[k] < 0);
    const I a = neg ? -A[k] : A[k];
    const I r = pos ? splati<I>(C.rk_pos[k]) : (neg ? splati<I>(C.rk_neg[k]) : splati<I>(C.rk_abs[k]));
    const I b = a * (2 * D) + r;  // distinct over k (distinct ranks): max / min keep the two largest
    second = p_maxi(second, p_mini(first, b));
    first = p_maxi(first, b);
  }
  return mask(first + second >= 2 * D * q + 2 * D - 1);
}

// Layers 1..M and the overload test on lambda_0 (P0): lambda_M = 0 iff the vector is inside the code. Writes
// the labels of every layer when B != nullptr; ovl = lanes that overload (mask), bad |= lanes to redo in float64.
template <int KIND, int D, class F, class I>
FQ_HD void later_layers(const IntConsts& C, const I* P0, int lq, int M, I* B, I& ovl, I& bad) {
  I A[D];
  if (KIND == kDn) {  // the last layer only decides inside / outside: dn_outside
    int_layers<KIND, D, F>(C, P0, lq, M - 1, B, A, bad);
    if (B) labels<D>(C, A, (1 << lq) - 1, B + (M - 1) * D);
    ovl = dn_outside<D>(C, A, 1 << lq);
    return;
  }
  int_layers<KIND, D, F>(C, P0, lq, M, B, A, bad);
  I o = splati<I>(0);
  for (int i = 0; i < D; ++i) o |= A[i];
  ovl = mask(o != 0);
}

// ------------------------------------------------------------------------------------------ one vector
// The whole float32 + integer path for one vector (LANES = 1): the CUDA kernel's per-thread body, also run on
// the CPU by quantize_f32_lanes1 (tests compare it with the reference). x: D floats; inv_s[t] = float(1 /
// scales[t]). Writes out (D floats) and T and returns true, or returns false when the vector must be redone
// by the float64 kernels (a decision too close to call in float32, or still overloaded at the cap).
template <int KIND, int D>
FQ_HD bool quantize_one(const IntConsts& C, const float* x, const float* inv_s, const double* scales, int n_scales,
                        int lq, int M, float* out, uint8_t& T) {
  for (int t = 0; t < n_scales; ++t) {
    int32_t P0[D];
    int32_t bad = 0, ovl = 0;
    first_layer<KIND, D, false, float, int32_t>(x, inv_s[t], P0, bad);
    later_layers<KIND, D, float, int32_t>(C, P0, lq, M, (int32_t*)nullptr, ovl, bad);
    if (bad) return false;
    if (!ovl) {
      const double s = scales[t] * (KIND == kE8 ? 0.5 : 1.0);  // P0 = h * lambda_0; 0.5 * s is exact
      for (int i = 0; i < D; ++i) out[i] = (float)((double)P0[i] * s);
      T = (uint8_t)t;
      return true;
    }
  }
  return false;
}

// Host helpers shared by the CPU drivers and the CUDA launcher (fast_quant.cpp).
// applicable(): D4, D8 or E8; q a power of two; tie offset on; no dither or centring; overload protection on.
bool applicable(const LatticeView& L, const QuantParams& P, const double* z);
bool build_consts(const LatticeView& L, IntConsts& C);
bool enabled();            // default on; env COSET_FAST_PATH=0 or set_enabled(false) turns it off

#ifndef __CUDACC__
// ------------------------------------------------------------------------------------------ CPU entry points
// The *_f32 functions take float32 in and out and return the number of "error"-policy failures (-1 if the
// lattice constants do not suit the integer path; the caller then uses the float64 kernels).
bool decode_applicable(const LatticeView& L, const QuantParams& P, const double* z);
const char* isa();
bool pext_enabled();  // decode's label index uses BMI2 pext (not on CPUs that microcode it)
void set_enabled(bool on);
// quantize_f32 through quantize_one, one vector at a time (the CUDA kernel's code path, for tests)
int64_t quantize_f32_lanes1(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, float* out,
                            uint8_t* T, uint8_t* clamped);
int64_t quantize_f32(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, float* out, uint8_t* T,
                     uint8_t* clamped);
// Row-scaled quantize of a (R, k) float32 matrix in d-blocks (the last block of a row zero padded):
// out[r, :] = beta_r * Q(x[r, :] / beta_r) with u = x / beta_r and the product by beta_r rounded once each in
// float32 (betas == nullptr: beta_r = 1); T, clamped per block (R, ceil(k/d)). Entries with |u| > lim (or NaN)
// are counted in *nonfinite and the outputs are then unspecified. Returns the "error"-policy failures, or -1.
// rms != nullptr: the betas come from the rows themselves (coset.quant.RmsBetas; `betas` is ignored) and are
// written to rms->betas_out (R floats), per row (parallel over rows) or one for the whole matrix (single-threaded:
// the order of the sum is fixed), in a pass before the quantizing one (one call from Python, no torch reductions).
// A beta that is not finite (NaN / Inf in x, or past the float32 range) stops the call with *nonfinite = 1.
// prev_betas != nullptr (a hint, used for D4 / D8 with betas): out and T already hold the results of this call's
// code on an earlier x with betas prev_betas (R floats), e.g. the previous training step's; blocks whose point
// provably did not move are then not quantized again (fast_quant_impl.inc, the hinted mode). The results equal a
// call without the hint provided out and T are unchanged since that call (the point is certified, its overload
// state is taken from T). ws (R * nb * d int8, or nullptr; D4 / D8): a workspace the call keeps each block's t = 0
// point in; passed again (unchanged) with the hint, it spares the t = 0 pass of the blocks kept at t = 1.
// counts (2 int64, or nullptr): the number of blocks with T > 0 or clamped, and of clamped blocks (-1, -1 when the
// call returns before quantizing: -1 or non-finite), so that a training step needs no scan of T and clamped.

struct RmsSpec {
  double scale;
  bool per_row;
  float* betas_out;
};
int64_t quantize_rows_f32(const LatticeView& L, const QuantParams& P, const float* x, const float* betas, int64_t R,
                          int64_t k, float lim, float* out, uint8_t* T, uint8_t* clamped, int64_t* nonfinite,
                          const RmsSpec* rms = nullptr, const float* prev_betas = nullptr, int8_t* ws = nullptr,
                          int64_t* counts = nullptr);
// coset.quant.rms_betas on float32 rows: out[r] = float32(scale * sqrt(s_r / k)) (1 for an all-zero row) with s_r
// the float64 sum of squares in the reference's order (fast_quant_impl.inc sumsq16); per_row false: one beta from
// the whole (R, k) matrix as one sequence, repeated R times. row_sumsq_f32: the sums themselves (for tests).
void rms_betas_f32(const float* x, int64_t R, int64_t k, double scale, bool per_row, float* out);
void row_sumsq_f32(const float* x, int64_t R, int64_t k, double* out);
int64_t encode_f32(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, uint8_t* b, uint8_t* T,
                   uint8_t* clamped);
int64_t decode_f32(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, int64_t N,
                   float* out);
// coset.dist's modular codec (bucket_codec.cpp) through this path: the constants of a lattice and a modulus
// 2^lm, or nothing (ok = false) when the path does not apply (the caller keeps the float64 kernels).
struct ModularPlan {
  bool ok = false;
  int lm = 0;
  IntConsts C;
  int32_t HG[kMaxDim * kMaxDim];  // h * G (integer for D_n and E8)
};
ModularPlan modular_plan(const LatticeView& L, int64_t modulus);
// Whole blocks [b0, b1) of xe (n >= b1 * d floats): codes (G^-1 lam) mod 2^lm of lam = Q(xe / s_c + eps) into
// codes[(blk - b0) * d + i], resid[blk * d + i] -= (float)(lam_i * s_c) (if resid), bit for bit the float64
// kernels; blocks it cannot certify are appended to rej (codes and resid untouched).
void modular_encode_f32(const ModularPlan& p, const LatticeView& L, const float* xe, float* resid,
                        const double* scales, int64_t bpc, int64_t b0, int64_t b1, int32_t* codes,
                        std::vector<int64_t>& rej);
// Blocks [b0, b1) of codes (< 2^lm): out[blk * d + i] = (float)(((G c - 2^lm Q(G c / 2^lm + eps))_i * s_c) / W)
// for blk * d + i < n; blocks too close to an E8 tie to certify are appended to rej (out untouched).
void modular_decode_f32(const ModularPlan& p, const LatticeView& L, const int32_t* codes, const double* scales,
                        int64_t bpc, int W, int64_t b0, int64_t b1, int64_t n, float* out, std::vector<int64_t>& rej);
#endif

}  // namespace fq
}  // namespace coset
