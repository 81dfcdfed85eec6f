// kernels_cpu.cpp - multi-threaded CPU kernels (std::thread) around the per-vector logic of hnlq_core.h.
//
// std::thread rather than OpenMP: torch wheels bundle their own libgomp, and loading a second OpenMP
// runtime into the same process is a known source of oversubscription and fork problems.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <vector>

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

int64_t encode_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                   int64_t N, uint8_t* b, uint8_t* T, uint8_t* clamped) {
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
        if (out_is_double) {
          double* o = (double*)out + r * d;
          for (int i = 0; i < d; ++i) o[i] = y[i];
        } else {
          float* o = (float*)out + r * d;
          for (int i = 0; i < d; ++i) o[i] = (float)y[i];
        }
      }
      if (nbad) bad += nbad;
    });
  });
  return bad.load();
}

int64_t quantize_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                     int64_t N, void* out, int out_is_double, uint8_t* T, uint8_t* clamped) {
  std::atomic<int64_t> errors{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    const int d = L.d;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      int64_t err = 0;
      double xv[kMaxDim], y[kMaxDim];  // labels never leave quantize_vector
      for (int64_t r = lo; r < hi; ++r) {
        if (x_is_double)
          load_vec((const double*)x + r * d, d, xv);
        else
          load_vec((const float*)x + r * d, d, xv);
        const double* zr = z ? z + r * d : nullptr;
        EncodeResult res = quantize_vector<KIND, D>(L, P, xv, zr, y);
        if (T) T[r] = res.T;
        if (clamped) clamped[r] = res.clamped;
        err += res.error;
        if (out_is_double) {
          double* o = (double*)out + r * d;
          for (int i = 0; i < d; ++i) o[i] = y[i];
        } else {
          float* o = (float*)out + r * d;
          for (int i = 0; i < d; ++i) o[i] = (float)y[i];
        }
      }
      if (err) errors += err;
    });
  });
  return errors.load();
}

void lut_one_sided_cpu(const int32_t* ix, const float* sx, const float* tables, int64_t n, int64_t m, int K, int M,
                       int64_t Q, int q, float* out) {
  // rows of the output in parallel; each (r, j) reads K*M table entries
  const int64_t work = std::max<int64_t>(1, (int64_t)K * M * m);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  parallel_for(n, grain, [&](int64_t lo, int64_t hi) {
    // tiles of rows: one query's K x Q tables stay in cache while a tile of rows is scored against them
    constexpr int64_t kTile = 64;
    for (int64_t r0 = lo; r0 < hi; r0 += kTile) {
      const int64_t r1 = std::min(hi, r0 + kTile);
      for (int64_t j = 0; j < m; ++j) {
        const float* tj = tables + j * (int64_t)K * Q;
        for (int64_t r = r0; r < r1; ++r) {
          out[r * m + j] =
              (float)lut_one_sided_row<double>(ix + r * (int64_t)K * M, sx + r * (int64_t)K, tj, K, M, Q, (double)q);
        }
      }
    }
  });
}

template <typename LutT>
static void lut_two_sided_impl(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy,
                               const LutT* lut, int64_t n, int64_t m, int K, int M, int64_t Q, int q, float* out) {
  const int64_t work = std::max<int64_t>(1, (int64_t)K * M * M * m);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  parallel_for(n, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int32_t* ir = ix + r * (int64_t)K * M;
      const float* sr = sx + r * (int64_t)K;
      for (int64_t j = 0; j < m; ++j) {
        out[r * m + j] = (float)lut_two_sided_pair<LutT, double>(ir, sr, iy + j * (int64_t)K * M, sy + j * (int64_t)K,
                                                                 lut, K, M, Q, q);
      }
    }
  });
}

void lut_two_sided_cpu(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy, const void* lut,
                       int lut_bytes, int64_t n, int64_t m, int K, int M, int64_t Q, int q, float* out) {
  if (lut_bytes == 1)
    lut_two_sided_impl(ix, sx, iy, sy, (const int8_t*)lut, n, m, K, M, Q, q, out);
  else if (lut_bytes == 2)
    lut_two_sided_impl(ix, sx, iy, sy, (const int16_t*)lut, n, m, K, M, Q, q, out);
  else
    lut_two_sided_impl(ix, sx, iy, sy, (const int32_t*)lut, n, m, K, M, Q, q, out);
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
