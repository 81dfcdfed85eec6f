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

// The coordinate loops of the closest-point functions unrolled (D <= 8): the index i becomes a constant, so
// splat(i) and the per-coordinate constants are immediates / broadcasts instead of built each iteration.
#if defined(__CUDACC__)
#define FQ_UNROLL _Pragma("unroll")
#else
#define FQ_UNROLL _Pragma("GCC unroll 8")
#endif

// The lane-pack functions (see fast_quant_lanes.inc for why they live in a file of their own).
namespace hd {
#include "fast_quant_lanes.inc"
}  // namespace hd
using namespace hd;  // (a using-directive: argument-dependent lookup from IntConsts does not see hd)

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
