// trellis_cpu.cpp - CPU kernels of the coset.kv trellis value code (per-vector logic in trellis_core.inc, shared
// with trellis_cuda.cu). Plain C ABI on raw pointers, bound in bindings.cpp, wrapped with validation in
// coset/cuda/kv.py. Shapes: u (n, D) float32 -> stream (n, nbytes) uint8; values: stream (BH, L, nbytes),
// rho (BH, L), p (BH, nq, L) -> out (BH, nq, D) = sum_t p[., ., t] rho[., t] u_hat_t. ks (D) uint8, cb (2^L).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#define COSET_TR_X86 1
#endif

namespace {

#define COSET_TR_HD inline

#ifdef COSET_TR_X86
#define COSET_TR_SIMD 128  // SSE2 is in every x86-64 baseline
#endif
namespace base {
#include "trellis_core.inc"
}  // namespace base

#ifdef COSET_TR_X86
#define COSET_TR_AVX2 1
#undef COSET_TR_SIMD
#define COSET_TR_SIMD 256
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "trellis_core.inc"
}  // namespace avx2
#pragma GCC pop_options
#undef COSET_TR_SIMD
#endif

bool tr_use_avx2() {
#ifdef COSET_TR_AVX2
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

template <typename Work, typename Encode>
void encode_range(const float* u, int64_t lo, int64_t hi, int D, const uint8_t* ks, const float* cb, int L,
                  uint8_t* out, int nbytes, Encode encode) {
  thread_local std::vector<float> fl;
  thread_local std::vector<uint8_t> by;
  const int S = 1 << L;
  fl.resize((size_t)(2 * S + (S >> 1) + 2 * D));
  by.resize((size_t)(D - 1) * (S >> 1) + D);
  Work w;
  w.cost = fl.data();
  w.next = w.cost + S;
  w.m = w.next + S;
  w.xr = w.m + (S >> 1);
  w.states = reinterpret_cast<int32_t*>(w.xr + D);
  w.back = by.data();
  w.kr = w.back + (size_t)(D - 1) * (S >> 1);
  for (int64_t i = lo; i < hi; ++i) encode(u + i * D, D, ks, cb, L, w, out + i * nbytes, nbytes);
}

template <typename Decode>
void values_range(const uint8_t* stream, const float* rho, const float* p, int64_t lo, int64_t hi, int64_t L,
                  int nq, int D, const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, Decode decode) {
  std::vector<uint8_t> buf((size_t)nbytes + 6);
  std::vector<float> v((size_t)D);
  for (int64_t bh = lo; bh < hi; ++bh) {
    float* o = out + bh * nq * D;
    for (int64_t t = 0; t < L; ++t) {
      const float r = rho[bh * L + t];
      if (r == 0.f) continue;  // a zero vector (its stream holds whatever the encoder chose)
      decode(stream + (bh * L + t) * nbytes, nbytes, D, ks, cb, LB, buf.data(), v.data());
      for (int i = 0; i < nq; ++i) {
        const float w = p[(bh * nq + i) * L + t] * r;
        float* oi = o + (int64_t)i * D;
        for (int e = 0; e < D; ++e) oi[e] += w * v[e];
      }
    }
  }
}

#ifdef COSET_TR_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
// values_range with 8 elements at a time: the 8 states from one big-endian 64-bit word (each element's bit offset
// in it is fixed by the schedule), the values from 8 table loads (AVX2 gathers measured slower on AMD Zen 2); the
// per-element products and sums are the scalar loop's (mul, then add, tokens in order), so results are equal.
void values_range_avx2(const uint8_t* stream, const float* rho, const float* p, int64_t lo, int64_t hi, int64_t L,
                       int nq, int D, const uint8_t* ks, const float* cb, int LB, int nbytes, float* out) {
  std::vector<uint8_t> buf((size_t)nbytes + 14, 0);  // trellis_buffer's layout, 8 more zero bytes for 64-bit reads
  const int G = D / 8;
  // element e's window starts at bit start_e of buf; its group reads one big-endian 64-bit word at byte base[g]
  std::vector<int32_t> base((size_t)G), shl((size_t)D);
  int end = 0;
  for (int e = 0; e < D; ++e) {
    end += ks[e];
    const int start = end + 16 - LB;
    if (e % 8 == 0) base[(size_t)(e / 8)] = start >> 3;
    shl[(size_t)e] = start - 8 * base[(size_t)(e / 8)];  // < 8 + 7 * 4 + ... : start + LB <= 64 within the word
  }
  const int right = 64 - LB;
  for (int64_t bh = lo; bh < hi; ++bh) {
    float* o = out + bh * nq * D;
    for (int64_t t = 0; t < L; ++t) {
      const float r = rho[bh * L + t];
      if (r == 0.f) continue;
      const uint8_t* sv = stream + (bh * L + t) * nbytes;
      std::memcpy(buf.data(), sv + nbytes - 2, 2);
      std::memcpy(buf.data() + 2, sv, (size_t)nbytes);
      for (int g = 0; g < G; ++g) {
        uint64_t w;
        std::memcpy(&w, buf.data() + base[(size_t)g], 8);
        w = __builtin_bswap64(w);  // the stream is MSB first
        const int32_t* sh = shl.data() + 8 * g;
        const __m256 v = _mm256_setr_ps(cb[(w << sh[0]) >> right], cb[(w << sh[1]) >> right], cb[(w << sh[2]) >> right],
                                        cb[(w << sh[3]) >> right], cb[(w << sh[4]) >> right], cb[(w << sh[5]) >> right],
                                        cb[(w << sh[6]) >> right], cb[(w << sh[7]) >> right]);
        for (int i = 0; i < nq; ++i) {
          const __m256 wi = _mm256_set1_ps(p[(bh * nq + i) * L + t] * r);
          float* oi = o + (int64_t)i * D + 8 * g;
          _mm256_storeu_ps(oi, _mm256_add_ps(_mm256_loadu_ps(oi), _mm256_mul_ps(wi, v)));
        }
      }
    }
  }
}
#pragma GCC pop_options
#endif

// body(lo, hi) over [0, n) in one contiguous range per thread (rows are independent; results do not depend on
// the split), on the persistent workers of parallel.h.
template <typename F>
void split_rows(int64_t n, int threads, const F& body) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (nt <= 1) {
    body((int64_t)0, n);
    return;
  }
  const int64_t step = (n + nt - 1) / nt;
  coset::pool_run(nt, [&](int64_t t) {
    const int64_t lo = t * step, hi = std::min(n, lo + step);
    if (lo < hi) body(lo, hi);
  });
}

bool tr_bad(int D, int L, int nbytes, const uint8_t* ks) {
  if (D < 8 || L < 6 || L > 14 || nbytes < 2) return true;
  int n = 0;
  for (int t = 0; t < D; ++t) {
    if (ks[t] < 1 || ks[t] > 4) return true;
    n += ks[t];
  }
  return n != 8 * nbytes;
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for bad sizes (the Python side validates; this is a last guard).
int trellis_encode_cpu(const float* u, int64_t n, int D, const uint8_t* ks, const float* cb, int L, uint8_t* out,
                       int nbytes, int threads) {
  if (n < 0 || tr_bad(D, L, nbytes, ks)) return 1;
  const bool fast = tr_use_avx2();
  auto body = [&](int64_t lo, int64_t hi) {
#ifdef COSET_TR_AVX2
    if (fast) {
      encode_range<avx2::TrellisWork>(u, lo, hi, D, ks, cb, L, out, nbytes, avx2::trellis_encode_vector);
      return;
    }
#endif
    encode_range<base::TrellisWork>(u, lo, hi, D, ks, cb, L, out, nbytes, base::trellis_encode_vector);
  };
  (void)fast;
  split_rows(n, threads, body);
  return 0;
}

// out (BH, nq, D) is accumulated into (zeroed by the caller).
int trellis_values_cpu(const uint8_t* stream, const float* rho, const float* p, int64_t BH, int64_t L, int nq, int D,
                       const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, int threads) {
  if (BH < 0 || L < 0 || nq < 1 || tr_bad(D, LB, nbytes, ks)) return 1;
  auto body = [&](int64_t lo, int64_t hi) {
#ifdef COSET_TR_AVX2
    if (tr_use_avx2()) {
      values_range_avx2(stream, rho, p, lo, hi, L, nq, D, ks, cb, LB, nbytes, out);
      return;
    }
#endif
    values_range(stream, rho, p, lo, hi, L, nq, D, ks, cb, LB, nbytes, out, base::trellis_decode_vector);
  };
  split_rows(BH, threads, body);
  return 0;
}

}  // extern "C"
