// fast_quant.cpp - CPU entry points of the float32 + integer path (fast_quant.h), multi-threaded, compiled
// twice (AVX2+FMA and the baseline -march) and dispatched at run time on __builtin_cpu_supports.
#include "fast_quant.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "parallel.h"

namespace coset {
namespace fq {

static bool getenv_off(const char* name) {  // NAME=0 turns an ISA level off (A/B runs, or a CPU that misreports it)
  const char* v = std::getenv(name);
  return v && v[0] == '0';
}

namespace base {
#include "fast_quant_lanes.inc"  // compiled for this namespace's target (see that file)
#include "fast_quant_impl.inc"
}  // namespace base

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define COSET_FQ_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
#define COSET_FQ_BMI2 1
#define COSET_SIMD_AVX2 1  // (__AVX2__ is not defined by the target pragma)
namespace avx2 {
#include "fast_quant_lanes.inc"  // compiled for this namespace's target (see that file)
#include "fast_quant_impl.inc"
}  // namespace avx2
#undef COSET_SIMD_AVX2
#undef COSET_FQ_BMI2
#pragma GCC pop_options
// The same 8-lane code with AVX-512VL enabled: 32 vector registers instead of 16 (the layer functions keep
// ~20 lanes of state live and spilled with 16), mask registers for the compares and selects, and three-input
// logic; the vectors stay 256 bits wide, so the arithmetic (and every rounding) is the AVX2 build's.
#define COSET_FQ_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=256")
#define COSET_FQ_BMI2 1
#define COSET_SIMD_AVX2 1
#define COSET_FQ_LANES16 1  // the rows kernel's main D4 pass in 16-lane packs (fast_quant_impl.inc)
namespace avx512 {
#include "fast_quant_lanes.inc"  // compiled for this namespace's target (see that file)
#include "fast_quant_impl.inc"
}  // namespace avx512
#undef COSET_FQ_LANES16
#undef COSET_SIMD_AVX2
#undef COSET_FQ_BMI2
#pragma GCC pop_options
#endif

static bool use_avx2() {
#ifdef COSET_FQ_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("bmi2") && !getenv_off("COSET_AVX2");
  return ok;
#else
  return false;
#endif
}

static bool use_avx512() {  // the AVX2 build's requirements (and its COSET_AVX2 switch) plus AVX-512VL/BW/DQ
#ifdef COSET_FQ_AVX512
  static const bool ok = use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                         !getenv_off("COSET_AVX512");
  return ok;
#else
  return false;
#endif
}

// BMI2 pext is one fast instruction on Intel and on AMD from Zen 3 (family 19h) on; AMD's earlier BMI2 CPUs
// (families 15h-18h: Excavator, Zen 1/2, Hygon) microcode it at tens of cycles. COSET_PEXT=0 turns it off.
static bool fast_pext() {
#ifdef COSET_FQ_AVX2
  static const bool ok = [] {
    if (!use_avx2() || getenv_off("COSET_PEXT")) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0u), "c"(0u));
    const bool amd = (b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u) ||  // "AuthenticAMD"
                     (b == 0x6f677948u && d == 0x6e65476eu && c == 0x656e6975u);    // "HygonGenuine"
    if (!amd) return true;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1u), "c"(0u));
    const unsigned family = ((a >> 8) & 0xf) + (((a >> 8) & 0xf) == 0xf ? (a >> 20) & 0xff : 0);
    return family >= 0x19;
  }();
  return ok;
#else
  return false;
#endif
}

// `return <isa>::CALL` on the best build this CPU runs (void calls too: returning a void expression is allowed).
#ifdef COSET_FQ_AVX2
#define FQ_DISPATCH(CALL)                     \
  do {                                        \
    if (use_avx512()) return avx512::CALL;    \
    if (use_avx2()) return avx2::CALL;        \
    return base::CALL;                        \
  } while (0)
#else
#define FQ_DISPATCH(CALL) return base::CALL
#endif

static std::atomic<bool> g_enabled{[] {
  const char* env = std::getenv("COSET_FAST_PATH");
  return !(env && env[0] == '0');
}()};
bool enabled() { return g_enabled.load(); }
void set_enabled(bool on) { g_enabled.store(on); }

const char* isa() { return use_avx512() ? "avx512vl" : use_avx2() ? "avx2" : "baseline"; }
bool pext_enabled() { return fast_pext(); }

static bool pow2(int q) { return q >= 2 && (q & (q - 1)) == 0; }

bool applicable(const LatticeView& L, const QuantParams& P, const double* z) {
  const bool lat = L.kind == kE8 || (L.kind == kDn && (L.d == 4 || L.d == 8));
  return lat && pow2(P.q) && L.eps != nullptr && z == nullptr && !P.single_pass && P.n_scales <= 65;
}

bool build_consts(const LatticeView& L, IntConsts& C) {
  const int d = L.d;
  C.d = d;
  C.h = L.kind == kE8 ? 2 : 1;
  C.hshift = L.kind == kE8 ? 2 : 1;
  double pm[2 * kMaxDim];
  for (int i = 0; i < d; ++i) {
    pm[2 * i] = L.eps[i];
    pm[2 * i + 1] = -L.eps[i];
  }
  for (int i = 0; i < d; ++i) {
    int rp = 0, rn = 0;
    for (int j = 0; j < 2 * d; ++j) {
      rp += pm[j] < L.eps[i];
      rn += pm[j] < -L.eps[i];
    }
    C.rk_pos[i] = rp;
    C.rk_neg[i] = rn;
    C.rk_abs[i] = std::max(rp, rn);
    C.neg[i] = L.eps[i] < 0.0 ? 1 : 0;
    C.step0[i] = L.eps[i] >= 0.0 ? 1 : -1;
    C.epsf[i] = (float)(L.eps[i] * 1e9);
    C.key_pos[i] = (C.rk_pos[i] << 5) | (i << 2) | 2;  // dn_int's sort-key payloads (fast_quant.h)
    C.key_neg[i] = (C.rk_neg[i] << 5) | (i << 2);
    C.key_zero[i] = (C.rk_abs[i] << 5) | (i << 2) | (C.step0[i] + 1);
  }
  for (int i = 0; i < 2 * d; ++i)  // the ranks must separate every +-eps_j (a generic eps does)
    for (int j = i + 1; j < 2 * d; ++j)
      if (pm[i] == pm[j]) return false;
  for (int i = 0; i < d * d; ++i) {
    const double h2 = 2.0 * L.Ginv[i];
    if (h2 != std::nearbyint(h2) || std::fabs(h2) > 64.0) return false;
    C.H[(i / d) * d + (i % d)] = (int32_t)h2;
  }
  return true;
}

template <int MODE>
static int64_t run_mode(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, float* outq,
                        uint8_t* outb, uint8_t* T, uint8_t* clamped) {
  IntConsts C;
  if (!build_consts(L, C)) return -1;
  FQ_DISPATCH(run<MODE>(L, P, C, x, N, outq, outb, T, clamped));
}

int64_t quantize_rows_f32(const LatticeView& L, const QuantParams& P, const float* x, const float* betas, int64_t R,
                          int64_t k, float lim, float* out, uint8_t* T, uint8_t* clamped, int64_t* nonfinite,
                          const RmsSpec* rms, const float* prev_betas, int8_t* ws, int64_t* counts) {
  IntConsts C;
  *nonfinite = 0;
  if (counts) counts[0] = counts[1] = -1;  // (-1: not counted; the call did not quantize)
  if (!build_consts(L, C)) return -1;
  if (rms) {  // the betas first (a streaming pass over x, parallel over rows), then the rows quantize with them
    // (measured: summing each row's squares as the kernel reaches it, or one row ahead inside its pack loop, cost
    // more than this pass, which leaves x in L3 for the quantizing pass)
    rms_betas_f32(x, R, k, rms->scale, rms->per_row, rms->betas_out);
    betas = rms->betas_out;
    for (int64_t r = 0; r < R; ++r)
      if (!std::isfinite(betas[r])) {  // NaN / Inf in x, or a beta past the float32 range: the caller raises
        *nonfinite = 1;
        return 0;
      }
  }
  if (R <= 0 || k <= 0) {
    if (counts) counts[0] = counts[1] = 0;
    return 0;
  }
  FQ_DISPATCH(run_rows_scaled(L, P, C, x, betas, R, k, lim, out, T, clamped, nonfinite, prev_betas, ws, counts));
}

void row_sumsq_f32(const float* x, int64_t R, int64_t k, double* out) {
  if (R <= 0) return;
  FQ_DISPATCH(row_sumsq(x, R, k, out));
}

static double sumsq_f32(const float* x, int64_t n) { FQ_DISPATCH(sumsq16(x, n)); }
static float rms_beta_f32(double s, int64_t n, double scale) { FQ_DISPATCH(rms_beta(s, n, scale)); }

void rms_betas_f32(const float* x, int64_t R, int64_t k, double scale, bool per_row, float* out) {
  if (R <= 0) return;
  if (!per_row) {
    const float b = rms_beta_f32(sumsq_f32(x, R * k), R * k, scale);
    for (int64_t r = 0; r < R; ++r) out[r] = b;
    return;
  }
  std::vector<double> s((size_t)R);
  row_sumsq_f32(x, R, k, s.data());
  for (int64_t r = 0; r < R; ++r) out[r] = rms_beta_f32(s[r], k, scale);
}

// (N, d) is one row of N blocks without a scale: the row driver's contiguous packs (the inputs were checked).
int64_t quantize_f32(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, float* out, uint8_t* T,
                     uint8_t* clamped) {
  int64_t nonfinite = 0;
  return quantize_rows_f32(L, P, x, nullptr, 1, N * L.d, std::numeric_limits<float>::infinity(), out, T, clamped,
                           &nonfinite, nullptr);
}

int64_t quantize_f32_lanes1(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, float* out,
                            uint8_t* T, uint8_t* clamped) {
  IntConsts C;
  if (!build_consts(L, C)) return -1;
  int lq = 0;
  while ((1 << lq) < P.q) ++lq;
  float inv_s[65];
  for (int t = 0; t < P.n_scales; ++t) inv_s[t] = (float)(1.0 / P.scales[t]);
  int64_t err = 0;
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * L.d;
    float* o = out + r * L.d;
    bool ok;
    if (L.kind == kE8)
      ok = quantize_one<kE8, 8>(C, xr, inv_s, P.scales, P.n_scales, lq, P.M, o, T[r]);
    else if (L.d == 4)
      ok = quantize_one<kDn, 4>(C, xr, inv_s, P.scales, P.n_scales, lq, P.M, o, T[r]);
    else
      ok = quantize_one<kDn, 8>(C, xr, inv_s, P.scales, P.n_scales, lq, P.M, o, T[r]);
    clamped[r] = 0;
    if (ok) continue;
    double xv[kMaxDim], y[kMaxDim];  // the float64 kernels, as the CUDA kernel does
    for (int i = 0; i < L.d; ++i) xv[i] = (double)xr[i];
    EncodeResult res;
    if (L.kind == kE8)
      res = quantize_vector<kE8, 8>(L, P, xv, nullptr, y);
    else if (L.d == 4)
      res = quantize_vector<kDn, 4>(L, P, xv, nullptr, y);
    else
      res = quantize_vector<kDn, 8>(L, P, xv, nullptr, y);
    for (int i = 0; i < L.d; ++i) o[i] = (float)y[i];
    T[r] = res.T;
    clamped[r] = res.clamped;
    err += res.error;
  }
  return err;
}

int64_t encode_f32(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, uint8_t* b, uint8_t* T,
                   uint8_t* clamped) {
  return run_mode<1>(L, P, x, N, nullptr, b, T, clamped);
}

// Representative tables h * a(b) for every label index, built with the float64 decoder of hnlq_core.h
// (so they are the reference's representatives by construction) and cached per (lattice, q), as int8 (every
// entry fits for D4/D8/E8 with q <= 16, |h a_i| <= 2q; otherwise a8 stays empty and decode is not applicable).
struct RepTable {
  std::vector<int8_t> a8;
};
static std::mutex g_rep_mu;
static std::map<std::tuple<int, int, int, std::vector<double>>, RepTable> g_reps;

static const RepTable& rep_table(const LatticeView& L, int q) {
  const int d = L.d;
  int64_t Q = 1;
  for (int i = 0; i < d; ++i) Q *= q;
  std::vector<double> key_eps(L.eps, L.eps + d);
  auto key = std::make_tuple(L.kind, d, q, key_eps);
  std::lock_guard<std::mutex> lock(g_rep_mu);
  auto it = g_reps.find(key);
  if (it != g_reps.end()) return it->second;
  RepTable R;
  std::vector<int16_t> a16((size_t)(Q * d));
  const double h = L.kind == kE8 ? 2.0 : 1.0;
  uint8_t b[kMaxDim];
  double a[kMaxDim];
  bool fits8 = true;
  for (int64_t idx = 0; idx < Q; ++idx) {
    int64_t v = idx;
    for (int i = 0; i < d; ++i) {
      b[i] = (uint8_t)(v % q);
      v /= q;
    }
    if (L.kind == kE8)
      decode_lattice_units<kE8, 8>(L, q, 1, b, a);
    else if (d == 4)
      decode_lattice_units<kDn, 4>(L, q, 1, b, a);
    else
      decode_lattice_units<kDn, 8>(L, q, 1, b, a);
    for (int i = 0; i < d; ++i) {
      const int16_t e = (int16_t)(a[i] * h);
      a16[(size_t)(idx * d + i)] = e;
      fits8 &= e >= -128 && e <= 127;
    }
  }
  if (fits8) R.a8.assign(a16.begin(), a16.end());
  return g_reps.emplace(key, std::move(R)).first->second;
}

bool decode_applicable(const LatticeView& L, const QuantParams& P, const double* z) {
  if (!applicable(L, P, z)) return false;
  int64_t Q = 1;
  for (int i = 0; i < L.d; ++i) Q *= P.q;
  int64_t span = 1;
  for (int m = 0; m < P.M; ++m) span *= P.q;
  // the table stays small; int32 sums cannot overflow; the representatives fit int8
  return Q <= 65536 && span * P.q * 4 < (1 << 30) && !rep_table(L, P.q).a8.empty();
}

int64_t decode_f32(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, int64_t N,
                   float* out) {
  const int8_t* A = rep_table(L, P.q).a8.data();
  const int h = L.kind == kE8 ? 2 : 1;
#ifdef COSET_FQ_AVX2
  // the AVX2 build: the table-load loop gains nothing from AVX-512VL (E8 measured 0.88 vs 0.95-1.00 ms / 4M)
  if (use_avx2()) return avx2::decode(L, P, A, h, b, T, N, out, fast_pext());
#endif
  return base::decode(L, P, A, h, b, T, N, out, false);
}

ModularPlan modular_plan(const LatticeView& L, int64_t modulus) {
  ModularPlan p;
  if (!enabled()) return p;
  const bool lat = L.kind == kE8 || (L.kind == kDn && (L.d == 4 || L.d == 8));
  if (!lat || L.eps == nullptr || modulus < 2 || modulus > (1 << 16) || (modulus & (modulus - 1)) != 0) return p;
  if (!build_consts(L, p.C)) return p;
  const int d = L.d;
  const double h = L.kind == kE8 ? 2.0 : 1.0;
  for (int i = 0; i < d * d; ++i) {
    const double v = h * L.G[i];
    if (v != std::nearbyint(v) || std::fabs(v) > 64.0) return p;
    p.HG[i] = (int32_t)v;
  }
  while ((int64_t(1) << p.lm) < modulus) ++p.lm;
  p.ok = true;
  return p;
}

void modular_encode_f32(const ModularPlan& p, const LatticeView& L, const float* xe, float* resid,
                        const double* scales, int64_t bpc, int64_t b0, int64_t b1, int32_t* codes,
                        std::vector<int64_t>& rej) {
  FQ_DISPATCH(modular_encode(L, p.C, p.lm, xe, resid, scales, bpc, b0, b1, codes, rej));
}

void modular_decode_f32(const ModularPlan& p, const LatticeView& L, const int32_t* codes, const double* scales,
                        int64_t bpc, int W, int64_t b0, int64_t b1, int64_t n, float* out, std::vector<int64_t>& rej) {
  FQ_DISPATCH(modular_decode(L, p.C, p.HG, p.lm, codes, scales, bpc, W, b0, b1, n, out, rej));
}

#undef FQ_DISPATCH

}  // namespace fq
}  // namespace coset
