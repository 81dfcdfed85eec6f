// kernels_cpu.cpp - multi-threaded CPU kernels (std::thread) around the per-vector logic of hnlq_core.h.
//
// std::thread rather than OpenMP: torch wheels bundle their own libgomp, and loading a second OpenMP
// runtime into the same process is a known source of oversubscription and fork problems.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <vector>

#include "fast_quant.h"
#include "hnlq_core.h"

namespace coset {

static int g_num_threads = [] {
  const char* env = std::getenv("COSET_NUM_THREADS");
  if (env) {
    int v = std::atoi(env);
    if (v > 0) return v;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? (int)hc : 1;
}();

int get_num_threads() { return g_num_threads; }
void set_num_threads(int n) { g_num_threads = n > 0 ? n : 1; }

// Run f(begin, end) over [0, n) in contiguous chunks on up to g_num_threads threads.
template <typename F>
static void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  int64_t nt = std::min<int64_t>(g_num_threads, (n + grain - 1) / grain);
  if (nt <= 1) {
    f((int64_t)0, n);
    return;
  }
  const int64_t chunk = (n + nt - 1) / nt;
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int64_t t = 1; t < nt; ++t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([&f, b, e] { f(b, e); });
  }
  f((int64_t)0, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

// Call f(KIND, D) with compile-time constants for the common lattices, D = 0 (runtime d) otherwise.
template <typename F>
static void dispatch_lattice(int kind, int d, F&& f) {
  using std::integral_constant;
  if (kind == kZn) {
    if (d == 2) return f(integral_constant<int, kZn>{}, integral_constant<int, 2>{});
    if (d == 4) return f(integral_constant<int, kZn>{}, integral_constant<int, 4>{});
    if (d == 8) return f(integral_constant<int, kZn>{}, integral_constant<int, 8>{});
    return f(integral_constant<int, kZn>{}, integral_constant<int, 0>{});
  }
  if (kind == kDn) {
    if (d == 4) return f(integral_constant<int, kDn>{}, integral_constant<int, 4>{});
    if (d == 8) return f(integral_constant<int, kDn>{}, integral_constant<int, 8>{});
    return f(integral_constant<int, kDn>{}, integral_constant<int, 0>{});
  }
  return f(integral_constant<int, kE8>{}, integral_constant<int, 8>{});
}

constexpr int64_t kGrain = 2048;

template <typename In>
static inline void load_vec(const In* x, int d, double* out) {
  for (int i = 0; i < d; ++i) out[i] = (double)x[i];
}

// Row r of a float32 or float64 output (one rounding from double, like the reference's .to(dtype)).
static inline void store_vec(void* out, int out_is_double, int64_t r, int d, const double* y) {
  if (out_is_double) {
    double* o = (double*)out + r * d;
    for (int i = 0; i < d; ++i) o[i] = y[i];
  } else {
    float* o = (float*)out + r * d;
    for (int i = 0; i < d; ++i) o[i] = (float)y[i];
  }
}

int64_t encode_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                   int64_t N, uint8_t* b, uint8_t* T, uint8_t* clamped) {
  if (!x_is_double && fq::enabled() && fq::applicable(L, P, z)) {  // float32 + integer path (fast_quant.h)
    const int64_t e = fq::encode_f32(L, P, (const float*)x, N, b, T, clamped);
    if (e >= 0) return e;
  }
  std::atomic<int64_t> errors{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    const int d = L.d, Md = P.M * L.d;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      int64_t err = 0;
      double xv[kMaxDim];
      for (int64_t r = lo; r < hi; ++r) {
        if (x_is_double)
          load_vec((const double*)x + r * d, d, xv);
        else
          load_vec((const float*)x + r * d, d, xv);
        EncodeResult res = encode_vector<KIND, D>(L, P, xv, z ? z + r * d : nullptr, b + r * Md);
        T[r] = res.T;
        clamped[r] = res.clamped;
        err += res.error;
      }
      if (err) errors += err;
    });
  });
  return errors.load();
}

int64_t decode_cpu(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, const double* z,
                   int64_t N, void* out, int out_is_double) {
  if (!out_is_double && fq::enabled() && fq::decode_applicable(L, P, z))  // table path (fast_quant.h)
    return fq::decode_f32(L, P, b, T, N, (float*)out);
  std::atomic<int64_t> bad{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    const int d = L.d, Md = P.M * L.d;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      int64_t nbad = 0;
      double y[kMaxDim];
      for (int64_t r = lo; r < hi; ++r) {
        const uint8_t* br = b + r * Md;
        bool ok = T[r] < P.n_scales;  // range checks here instead of a separate pass over the labels
        for (int i = 0; i < Md; ++i) ok &= br[i] < P.q;
        if (!ok) {
          ++nbad;
          for (int i = 0; i < d; ++i) y[i] = 0.0;
        } else {
          decode_vector<KIND, D>(L, P, br, T[r], z ? z + r * d : nullptr, y);
        }
        store_vec(out, out_is_double, r, d, y);
      }
      if (nbad) bad += nbad;
    });
  });
  return bad.load();
}

// ------------------------------------------------------------------------------------------------------
// Batched fast path of quantize: V vectors at a time, arrays laid out [i][v] so that every step is a loop
// over v (independent vectors: instruction-level parallelism and SSE/AVX lanes). Exactly the operations of
// hnlq_core.h, in the same order per vector; vectors that overload at t = 0 are redone by the scalar
// quantize_vector (identical results: the encoder is deterministic).
constexpr int kV = 8;

template <int KIND, int D>
static inline void cp_batch(const LatticeView& L, const double (*xin)[kV], double (*y)[kV]) {
  double x[D][kV];
  for (int i = 0; i < D; ++i)
    for (int v = 0; v < kV; ++v) x[i][v] = xin[i][v] + L.eps[i];
  auto dn = [](const double (*a)[kV], double (*o)[kV]) {
    double sum[kV], best[kV];
    int k[kV];
    for (int v = 0; v < kV; ++v) {
      sum[v] = 0.0;
      best[v] = -1.0;
      k[v] = 0;
    }
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) {
        const double f = floor(a[i][v] + 0.5);
        o[i][v] = f;
        sum[v] += f;
        const double ab = fabs(a[i][v] - f);
        const bool gt = ab > best[v];
        best[v] = gt ? ab : best[v];
        k[v] = gt ? i : k[v];
      }
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) {
        const bool flip = (i == k[v]) & is_odd(sum[v]);
        const double dk = a[i][v] - o[i][v];
        const double alt = o[i][v] + (dk >= 0.0 ? 1.0 : -1.0);
        o[i][v] = flip ? alt : o[i][v];
      }
  };
  if (KIND == kZn) {
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) y[i][v] = floor(x[i][v] + 0.5);
  } else if (KIND == kDn) {
    dn(x, y);
  } else {
    double y0[D][kV], y1[D][kV], xm[D][kV], d0[kV], d1[kV];
    dn(x, y0);
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) xm[i][v] = x[i][v] - 0.5;
    dn(xm, y1);
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) y1[i][v] = y1[i][v] + 0.5;
    for (int v = 0; v < kV; ++v) {
      double e = x[0][v] - y0[0][v];
      d0[v] = e * e;
      e = x[0][v] - y1[0][v];
      d1[v] = e * e;
    }
    for (int i = 1; i < D; ++i)
      for (int v = 0; v < kV; ++v) {
        double e = x[i][v] - y0[i][v];
        d0[v] = d0[v] + e * e;
        e = x[i][v] - y1[i][v];
        d1[v] = d1[v] + e * e;
      }
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) y[i][v] = d0[v] <= d1[v] ? y0[i][v] : y1[i][v];
  }
}

// Returns a bit mask of the vectors that need the scalar path (overload at t = 0).
template <int KIND, int D, typename In>
static inline unsigned quantize_batch(const LatticeView& L, const QuantParams& P, const In* x, const double* z,
                                      double (*out)[kV]) {
  const double s = P.scales[0];
  const double qd = (double)P.q, inv_q = pow2_inverse(P.q);
  double g[D][kV], lam[D][kV], lam0[D][kV];
  for (int i = 0; i < D; ++i)
    for (int v = 0; v < kV; ++v) {
      const double u = (double)x[v * D + i] / s;
      g[i][v] = z ? u + z[v * D + i] : u;
    }
  for (int m = 0; m < P.M; ++m) {
    cp_batch<KIND, D>(L, g, lam);
    if (m == 0)
      for (int i = 0; i < D; ++i)
        for (int v = 0; v < kV; ++v) lam0[i][v] = lam[i][v];
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) g[i][v] = div_q(lam[i][v], qd, inv_q);
  }
  cp_batch<KIND, D>(L, g, lam);
  unsigned redo = 0;
  for (int v = 0; v < kV; ++v) {
    bool ovl = false;
    for (int i = 0; i < D; ++i) ovl |= (lam[i][v] != 0.0);
    redo |= (unsigned)ovl << v;
  }
  for (int i = 0; i < D; ++i)
    for (int v = 0; v < kV; ++v) {
      const double y = z ? lam0[i][v] - z[v * D + i] : lam0[i][v];
      out[i][v] = y * s;
    }
  return redo;
}

int64_t quantize_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                     int64_t N, void* out, int out_is_double, uint8_t* T, uint8_t* clamped) {
  if (!x_is_double && !out_is_double && fq::enabled() && fq::applicable(L, P, z)) {  // fast_quant.h
    const int64_t e = fq::quantize_f32(L, P, (const float*)x, N, (float*)out, T, clamped);
    if (e >= 0) return e;
  }
  std::atomic<int64_t> errors{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    const int d = L.d;
    // the batched fast path: compile-time d, tie offset on, overload protection on
    // (not E8: its larger state and frequent t > 0 make the batch slower there, measured)
    const bool batched = D > 0 && KIND != kE8 && L.eps != nullptr && !P.single_pass;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      int64_t err = 0;
      double xv[kMaxDim], y[kMaxDim];  // labels never leave quantize_vector
      int64_t r = lo;
      if constexpr (D > 0) {
        if (batched) {
          double ob[D > 0 ? D : 1][kV];
          for (; r + kV <= hi; r += kV) {
            const double* zr = z ? z + r * D : nullptr;
            unsigned redo = x_is_double
                                ? quantize_batch<KIND, D>(L, P, (const double*)x + r * D, zr, ob)
                                : quantize_batch<KIND, D>(L, P, (const float*)x + r * D, zr, ob);
            for (int v = 0; v < kV; ++v) {
              const int64_t rv = r + v;
              if ((redo >> v) & 1u) {  // overloaded at t = 0: the scalar ramp
                if (x_is_double)
                  load_vec((const double*)x + rv * D, D, xv);
                else
                  load_vec((const float*)x + rv * D, D, xv);
                EncodeResult res = quantize_vector<KIND, D>(L, P, xv, z ? z + rv * D : nullptr, y);
                if (T) T[rv] = res.T;
                if (clamped) clamped[rv] = res.clamped;
                err += res.error;
              } else {
                for (int i = 0; i < D; ++i) y[i] = ob[i][v];
                if (T) T[rv] = 0;
                if (clamped) clamped[rv] = 0;
              }
              store_vec(out, out_is_double, rv, D, y);
            }
          }
        }
      }
      for (; r < hi; ++r) {
        if (x_is_double)
          load_vec((const double*)x + r * d, d, xv);
        else
          load_vec((const float*)x + r * d, d, xv);
        const double* zr = z ? z + r * d : nullptr;
        EncodeResult res = quantize_vector<KIND, D>(L, P, xv, zr, y);
        if (T) T[r] = res.T;
        if (clamped) clamped[r] = res.clamped;
        err += res.error;
        store_vec(out, out_is_double, r, d, y);
      }
      if (err) errors += err;
    });
  });
  return errors.load();
}

// LUT scoring. Both ops are reorganised so that the innermost loop runs over a contiguous block of queries j
// (like an embedding-bag): per encoded row r and lookup (k, m), one row of a (K, Q, m_chunk) table is added
// to the row's accumulators. Accumulation is in float64 (one rounding to float32 at the end).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define COSET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define COSET_CLONES
#endif

// Contiguous inner loops, compiled twice (AVX2 and baseline) and picked at load time (no FMA either way).
COSET_CLONES static void axpy_f(double* __restrict__ acc, const float* __restrict__ row, double w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += w * (double)row[j];
}
COSET_CLONES static void axpy_d(double* __restrict__ acc, const double* __restrict__ row, double w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += w * row[j];
}
// One encoded row against a chunk of mc queries (tabT: (K, Q, mc) transposed tables); whole row per call so
// the inner loops inline into the AVX2 clone.
COSET_CLONES static void one_sided_row(double* __restrict__ acc, const int32_t* __restrict__ ir,
                                       const float* __restrict__ sr, const float* __restrict__ tabT, int64_t K,
                                       int M, int64_t Q, int64_t mc, double qd) {
  for (int64_t j = 0; j < mc; ++j) acc[j] = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double w = (double)sr[k];
    for (int mm = 0; mm < M; ++mm) {
      const float* __restrict__ row = tabT + (k * Q + ir[k * M + mm]) * mc;
      for (int64_t j = 0; j < mc; ++j) acc[j] += w * (double)row[j];
      w *= qd;
    }
  }
}

// Two-sided, float64 inner sums (exact below 2^53): U (K, Q, mc) half tables, syT (K, mc).
COSET_CLONES static void two_sided_row(double* __restrict__ acc, double* __restrict__ inner,
                                       const int32_t* __restrict__ ir, const float* __restrict__ sr,
                                       const double* __restrict__ U, const double* __restrict__ syT, int64_t K,
                                       int M, int64_t Q, int64_t mc, double qd) {
  for (int64_t j = 0; j < mc; ++j) acc[j] = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double* __restrict__ u0 = U + (k * Q + ir[k * M]) * mc;
    for (int64_t j = 0; j < mc; ++j) inner[j] = u0[j];
    double wm = qd;
    for (int mm = 1; mm < M; ++mm) {
      const double* __restrict__ u = U + (k * Q + ir[k * M + mm]) * mc;
      for (int64_t j = 0; j < mc; ++j) inner[j] += wm * u[j];
      wm *= qd;
    }
    const double s = (double)sr[k];
    const double* __restrict__ sk = syT + k * mc;
    for (int64_t j = 0; j < mc; ++j) acc[j] += (s * sk[j]) * inner[j];
  }
}

COSET_CLONES static void axpy_scaled(double* __restrict__ acc, const double* __restrict__ sy,
                                     const double* __restrict__ inner, double s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += (s * sy[j]) * inner[j];
}

static int64_t query_chunk(int64_t m, int64_t K, int64_t Q, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(m, budget / std::max<int64_t>(1, K * Q)));
}

void lut_one_sided_cpu(const int32_t* ix, const float* sx, const float* tables, int64_t n, int64_t m, int K, int M,
                       int64_t Q, int q, float* out) {
  const int64_t mc_max = query_chunk(m, K, Q, (int64_t)1 << 22);  // <= 16 MiB of transposed tables
  std::vector<float> tabT((size_t)(K * Q * mc_max));
  for (int64_t j0 = 0; j0 < m; j0 += mc_max) {
    const int64_t mc = std::min(mc_max, m - j0);
    // tabT[k, i, jj] = tables[j0 + jj, k, i]
    parallel_for(K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t jj = 0; jj < mc; ++jj) {
          const float* src = tables + ((j0 + jj) * K + k) * Q;
          float* dst = tabT.data() + k * Q * mc + jj;
          for (int64_t i = 0; i < Q; ++i) dst[i * mc] = src[i];
        }
    });
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (int64_t)K * M * mc));
    parallel_for(n, grain, [&](int64_t lo, int64_t hi) {
      std::vector<double> acc((size_t)mc);
      for (int64_t r = lo; r < hi; ++r) {
        one_sided_row(acc.data(), ix + r * (int64_t)K * M, sx + r * (int64_t)K, tabT.data(), K, M, Q, mc,
                      (double)q);
        float* o = out + r * m + j0;
        for (int64_t jj = 0; jj < mc; ++jj) o[jj] = (float)acc[jj];
      }
    });
  }
}

template <typename LutT, typename Inner>
static void lut_two_sided_impl(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy,
                               const LutT* lut, int64_t n, int64_t m, int K, int M, int64_t Q, int q, float* out) {
  // U[k, i, jj] = sum_l q^l lut[i, iy[j0+jj, k, l]]: exact int64 "half tables" of a chunk of queries, so that
  // the inner double sum sum_{m,l} q^(m+l) lut[.,.] = sum_m q^m U[k, ix[r,k,m], jj] stays exact.
  const int64_t mc_max = query_chunk(m, K, Q, (int64_t)1 << 21);  // <= 16 MiB of int64
  std::vector<Inner> U((size_t)(K * Q * mc_max));
  std::vector<double> syT((size_t)(K * mc_max));
  for (int64_t j0 = 0; j0 < m; j0 += mc_max) {
    const int64_t mc = std::min(mc_max, m - j0);
    parallel_for(K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t jj = 0; jj < mc; ++jj) syT[k * mc + jj] = (double)sy[(j0 + jj) * K + k];
        for (int64_t i = 0; i < Q; ++i) {
          const LutT* lrow = lut + i * Q;
          Inner* u = U.data() + (k * Q + i) * mc;
          for (int64_t jj = 0; jj < mc; ++jj) {
            const int32_t* jy = iy + ((j0 + jj) * K + k) * M;
            int64_t v = 0, wl = 1;
            for (int l = 0; l < M; ++l) {
              v += wl * (int64_t)lrow[jy[l]];
              wl *= q;
            }
            u[jj] = (Inner)v;
          }
        }
      }
    });
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (int64_t)K * M * mc));
    parallel_for(n, grain, [&](int64_t lo, int64_t hi) {
      std::vector<double> acc((size_t)mc);
      std::vector<Inner> inner((size_t)mc);
      std::vector<double> innerd((size_t)mc);
      for (int64_t r = lo; r < hi; ++r) {
        const int32_t* ir = ix + r * (int64_t)K * M;
        if constexpr (std::is_same<Inner, double>::value) {
          two_sided_row(acc.data(), innerd.data(), ir, sx + r * (int64_t)K, U.data(), syT.data(), K, M, Q, mc,
                        (double)q);
          float* o = out + r * m + j0;
          for (int64_t jj = 0; jj < mc; ++jj) o[jj] = (float)acc[jj];
          continue;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t k = 0; k < K; ++k) {
          const double s = (double)sx[r * K + k];
          const double* sk = syT.data() + k * mc;
          if constexpr (std::is_same<Inner, double>::value) {
            // exact: every partial sum is an integer below 2^53 (checked by the caller)
            std::fill(innerd.begin(), innerd.end(), 0.0);
            double wm = 1.0;
            for (int mm = 0; mm < M; ++mm) {
              axpy_d(innerd.data(), U.data() + (k * Q + ir[k * M + mm]) * mc, wm, mc);
              wm *= (double)q;
            }
          } else {
            std::fill(inner.begin(), inner.end(), (Inner)0);
            int64_t wm = 1;
            for (int mm = 0; mm < M; ++mm) {
              const Inner* u = U.data() + (k * Q + ir[k * M + mm]) * mc;
              for (int64_t jj = 0; jj < mc; ++jj) inner[jj] += wm * u[jj];
              wm *= q;
            }
            for (int64_t jj = 0; jj < mc; ++jj) innerd[jj] = (double)inner[jj];
          }
          axpy_scaled(acc.data(), sk, innerd.data(), s, mc);
        }
        float* o = out + r * m + j0;
        for (int64_t jj = 0; jj < mc; ++jj) o[jj] = (float)acc[jj];
      }
    });
  }
}

template <typename LutT>
static void lut_two_sided_dispatch(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy,
                                   const LutT* lut, int64_t n, int64_t m, int K, int M, int64_t Q, int q,
                                   float* out) {
  // |inner| <= max|lut| * (sum_l q^l)^2: float64 sums are exact below 2^53, else use int64
  int64_t mx = 0;
  for (int64_t i = 0; i < Q * Q; ++i) mx = std::max<int64_t>(mx, std::abs((int64_t)lut[i]));
  double geo = 0.0, w = 1.0;
  for (int l = 0; l < M; ++l, w *= q) geo += w;
  if ((double)mx * geo * geo < 9007199254740992.0)
    lut_two_sided_impl<LutT, double>(ix, sx, iy, sy, lut, n, m, K, M, Q, q, out);
  else
    lut_two_sided_impl<LutT, int64_t>(ix, sx, iy, sy, lut, n, m, K, M, Q, q, out);
}

void lut_two_sided_cpu(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy, const void* lut,
                       int lut_bytes, int64_t n, int64_t m, int K, int M, int64_t Q, int q, float* out) {
  if (lut_bytes == 1)
    lut_two_sided_dispatch(ix, sx, iy, sy, (const int8_t*)lut, n, m, K, M, Q, q, out);
  else if (lut_bytes == 2)
    lut_two_sided_dispatch(ix, sx, iy, sy, (const int16_t*)lut, n, m, K, M, Q, q, out);
  else
    lut_two_sided_dispatch(ix, sx, iy, sy, (const int32_t*)lut, n, m, K, M, Q, q, out);
}

void add_modq_cpu(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, int q) {
  parallel_for(n, 1 << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int s = (int)a[i] + (int)b[i];
      out[i] = (uint8_t)(s % q);
    }
  });
}

}  // namespace coset
