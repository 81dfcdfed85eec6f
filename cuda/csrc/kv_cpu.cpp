// kv_cpu.cpp - CPU kernels of the coset.kv attention over HNLQ-coded keys and values (see kv_scores.h).
//
// Plain C ABI on raw pointers (contiguous float32 / uint8 buffers, shapes as ints), bound in the coset.cuda._C
// pybind11 module (bindings.cpp) and wrapped with validation in coset/cuda/kv.py. Shapes (BH = batch * kv_heads, L tokens, K blocks,
// M layers, n queries per KV head):
//   idx (BH, L, K, M) uint8, tpack (BH, L, tb) uint8 (tb = ceil(K t_bits / 8) packed T bytes per vector),
//   rho (BH, L) float32 (the per-vector scales), steps (2^t_bits) float32, tab (BH, K, 256, n), cy (BH, K, n),
//   p (BH, n, L), a (256, 8), c (8)
//   kv_scores_cpu -> out (BH, n, L);  kv_values_cpu -> out (BH, n, K*8)
// SIMD bodies in kv_cpu_impl.inc (compiled for the baseline -march and for AVX2+FMA, chosen at run time).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "kv_scores.h"
#include "parallel.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#endif

namespace {

template <typename F>
void kv_parallel_for(int64_t total, int threads, F fn) {
  threads = std::max(1, std::min<int>(threads, (int)std::min<int64_t>(total, 64)));
  if (threads == 1) {
    fn(0, total, 0);
    return;
  }
  const int64_t step = (total + threads - 1) / threads;
  coset::pool_run(threads, [&fn, total, step](int64_t t) {  // the persistent workers of parallel.h
    const int64_t lo = t * step, hi = std::min(total, lo + step);
    if (lo < hi) fn(lo, hi, (int)t);
  });
}

namespace base {
#include "kv_cpu_impl.inc"
}  // namespace base

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define COSET_KV_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define COSET_KV_FMA 1
namespace avx2 {
#include "kv_cpu_impl.inc"
}  // namespace avx2
#undef COSET_KV_FMA
#pragma GCC pop_options
#endif

bool kv_use_avx2() {
#ifdef COSET_KV_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool kv_bad(int64_t BH, int64_t L, int K, int M, int n, int t_bits) {
  return BH < 0 || L < 0 || K < 1 || M < 1 || M > coset_kv::kMaxM || n < 1 ||
         (t_bits != 0 && t_bits != 1 && t_bits != 2 && t_bits != 4);
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for bad sizes (the Python side validates shapes; this is a last guard).
int kv_scores_cpu(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                  const float* tab, const float* cy, float* out, int64_t BH, int64_t L, int K, int M, int n,
                  int threads) {
  if (kv_bad(BH, L, K, M, n, t_bits)) return 1;
  if (kv_use_avx2())
    avx2::scores(idx, tpack, rho, steps, t_bits, tab, cy, out, BH, L, K, M, n, threads);
  else
    base::scores(idx, tpack, rho, steps, t_bits, tab, cy, out, BH, L, K, M, n, threads);
  return 0;
}

// Values are accumulated from the codes: per token, each block is rebuilt from its M representative rows
// (one 8-float vector per layer, Horner in 2^m) and scaled by its block factor, then added with weight
// p[i,t] into the n output rows; the centring offset enters once per call through s[i][k] = sum_t p w.
int kv_values_cpu(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                  const float* p, const float* a, const float* c, float* out, int64_t BH, int64_t L, int K, int M,
                  int n, int threads) {
  if (kv_bad(BH, L, K, M, n, t_bits)) return 1;
  if (kv_use_avx2())
    avx2::values(idx, tpack, rho, steps, t_bits, p, a, c, out, BH, L, K, M, n, threads);
  else
    base::values(idx, tpack, rho, steps, t_bits, p, a, c, out, BH, L, K, M, n, threads);
  return 0;
}

}  // extern "C"
