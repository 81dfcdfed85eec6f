// fast_quant.cpp - CPU entry points of the float32 + integer path (fast_quant.h), multi-threaded, compiled
// twice (AVX2+FMA and the baseline -march) and dispatched at run time on __builtin_cpu_supports.
#include "fast_quant.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace coset {
namespace fq {

// Run f(begin, end) over [0, n) in contiguous chunks on up to get_num_threads() threads.
template <typename F>
static void fq_parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(get_num_threads(), (n + grain - 1) / grain);
  if (nt <= 1) {
    f((int64_t)0, n);
    return;
  }
  const int64_t chunk = (n + nt - 1) / nt;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < nt; ++t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([&f, b, e] { f(b, e); });
  }
  f((int64_t)0, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

namespace base {
#include "fast_quant_impl.inc"
}  // namespace base

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define COSET_FQ_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "fast_quant_impl.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

static bool use_avx2() {
#ifdef COSET_FQ_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

static std::atomic<bool> g_enabled{[] {
  const char* env = std::getenv("COSET_FAST_PATH");
  return !(env && env[0] == '0');
}()};
bool enabled() { return g_enabled.load(); }
void set_enabled(bool on) { g_enabled.store(on); }

const char* isa() { return use_avx2() ? "avx2" : "baseline"; }

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
#ifdef COSET_FQ_AVX2
  if (use_avx2()) return avx2::run<MODE>(L, P, C, x, N, outq, outb, T, clamped);
#endif
  return base::run<MODE>(L, P, C, x, N, outq, outb, T, clamped);
}

int64_t quantize_f32(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, float* out, uint8_t* T,
                     uint8_t* clamped) {
  return run_mode<0>(L, P, x, N, out, nullptr, T, clamped);
}

int64_t encode_f32(const LatticeView& L, const QuantParams& P, const float* x, int64_t N, uint8_t* b, uint8_t* T,
                   uint8_t* clamped) {
  return run_mode<1>(L, P, x, N, nullptr, b, T, clamped);
}

// Representative tables h * a(b) for every label index, built with the float64 decoder of hnlq_core.h
// (so they are the reference's representatives by construction) and cached per (lattice, q).
static std::mutex g_rep_mu;
static std::map<std::tuple<int, int, int, std::vector<double>>, std::vector<int16_t>> g_reps;

static const int16_t* rep_table(const LatticeView& L, int q) {
  const int d = L.d;
  int64_t Q = 1;
  for (int i = 0; i < d; ++i) Q *= q;
  std::vector<double> key_eps(L.eps, L.eps + d);
  auto key = std::make_tuple(L.kind, d, q, key_eps);
  std::lock_guard<std::mutex> lock(g_rep_mu);
  auto it = g_reps.find(key);
  if (it != g_reps.end()) return it->second.data();
  std::vector<int16_t> A((size_t)(Q * d));
  const double h = L.kind == kE8 ? 2.0 : 1.0;
  uint8_t b[kMaxDim];
  double a[kMaxDim];
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
    for (int i = 0; i < d; ++i) A[(size_t)(idx * d + i)] = (int16_t)(a[i] * h);
  }
  return g_reps.emplace(key, std::move(A)).first->second.data();
}

bool decode_applicable(const LatticeView& L, const QuantParams& P, const double* z) {
  if (!applicable(L, P, z)) return false;
  int64_t Q = 1;
  for (int i = 0; i < L.d; ++i) Q *= P.q;
  int64_t span = 1;
  for (int m = 0; m < P.M; ++m) span *= P.q;
  return Q <= 65536 && span * P.q * 4 < (1 << 30);  // the table stays small; int32 sums cannot overflow
}

int64_t decode_f32(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, int64_t N,
                   float* out) {
  const int16_t* A = rep_table(L, P.q);
  const int h = L.kind == kE8 ? 2 : 1;
#ifdef COSET_FQ_AVX2
  if (use_avx2()) return avx2::decode(L, P, A, h, b, T, N, out);
#endif
  return base::decode(L, P, A, h, b, T, N, out);
}

}  // namespace fq
}  // namespace coset
