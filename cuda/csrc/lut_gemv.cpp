// lut_gemv.cpp - multi-threaded CPU GEMV on HNLQ codes (lut_gemv.h), threads over rows, compiled for AVX2+FMA
// and the baseline -march and dispatched at run time.
#include "lut_gemv.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "kernels.h"

namespace coset {
namespace lut {

struct Args {
  const void* idx;
  int idx_bytes;
  const uint8_t* T;
  const float* scale_of;
  const float* sx;
  const float* tab;  // tables path: [K][Q][B]
  const int8_t* A;   // codebook path: (Q, D) int8
  const float* x;    // codebook path: (B, ldx) queries, already divided by h
  int64_t ldx;
  int64_t n;
  int K, M, D, B, q;
  int64_t Q;
  float* out;        // (n, B)
};

template <typename F>
static void par(int64_t n, int64_t grain, F&& f) {
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
#include "lut_gemv_impl.inc"
}  // namespace base

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define COSET_LUT_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")  // float32 sums within a stated tolerance: FMA is welcome
namespace avx2 {
#include "lut_gemv_impl.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

static bool use_avx2() {
#ifdef COSET_LUT_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

static void run_rows(const Args& a) {
  par(a.n, 32, [&](int64_t lo, int64_t hi) {
#ifdef COSET_LUT_AVX2
    if (use_avx2()) return avx2::rows(a, lo, hi);
#endif
    base::rows(a, lo, hi);
  });
}

}  // namespace lut

void lut_build_tables_cpu(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q, float* tab) {
  lut::par(K, 8, [&](int64_t lo, int64_t hi) {
#ifdef COSET_LUT_AVX2
    if (lut::use_avx2()) return lut::avx2::build_tables(x, ldx, A, B, d, Q, tab, lo, hi);
#endif
    lut::base::build_tables(x, ldx, A, B, d, Q, tab, lo, hi);
  });
}

void lut_gemv_tables_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                         const float* tab, int64_t n, int K, int M, int64_t Q, int q, int B, float* out) {
  lut::Args a{idx, idx_bytes, T, scale_of, sx, tab, nullptr, nullptr, 0, n, K, M, 0, B, q, Q, out};
  lut::run_rows(a);
}

void lut_gemv_codebook_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                           const int8_t* A, int d, const float* x, int64_t ldx, int64_t n, int K, int M, int q, int B,
                           float* out) {
  lut::Args a{idx, idx_bytes, T, scale_of, sx, nullptr, A, x, ldx, n, K, M, d, B, q, 0, out};
  lut::run_rows(a);
}

}  // namespace coset
