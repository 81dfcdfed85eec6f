// lut_gemv.cpp - multi-threaded CPU GEMV on HNLQ codes (lut_gemv.h), threads over rows, compiled for AVX2+FMA
// and the baseline -march and dispatched at run time.
#include "lut_gemv.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "parallel.h"

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
  int n_scales;      // entries of scale_of (when T is used)
};

// Tables per k-tile: small enough to stay in L2 (1 MiB per core here) beside the streamed codes.
constexpr int64_t kTileBytes = 128 * 1024;

namespace base {
#include "lut_gemv_impl.inc"
}  // namespace base

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define COSET_LUT_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")  // float32 sums within a stated tolerance: FMA is welcome
#define COSET_SIMD_AVX2 1  // (__AVX2__ is not defined by the target pragma)
namespace avx2 {
#include "lut_gemv_impl.inc"
}  // namespace avx2
#undef COSET_SIMD_AVX2
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

#ifdef COSET_LUT_AVX2
// B = 1, M = 2, uint8 indices, T scales: 8 blocks per step with AVX2 gathers (two table gathers, the scales by
// an in-register permute when there are <= 8 of them). The hot case of W x for D4 q=4 M=2 and E8 q=2.
__attribute__((target("avx2,fma"))) static void rows_b1_m2_u8(const Args& a, int64_t lo, int64_t hi) {
  const int K = a.K;
  const int Q = (int)a.Q;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i koff0 = _mm256_mullo_epi32(lane, _mm256_set1_epi32(Q));
  const __m256i kstep = _mm256_set1_epi32(8 * Q);
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  float sc16[16] = {0};
  const bool perm = a.n_scales <= 16;  // scales by two in-register permutes + blend (gathers are slow on AMD)
  if (perm) std::memcpy(sc16, a.scale_of, sizeof(float) * a.n_scales);
  const __m256 scv = _mm256_loadu_ps(sc16), scv_hi = _mm256_loadu_ps(sc16 + 8);
  const __m256i seven = _mm256_set1_epi32(7);
  const __m256 qv = _mm256_set1_ps((float)a.q);
  const uint8_t* idx = (const uint8_t*)a.idx;
  // one k-tile (measured: 128 KiB tiles with rows inside made this kernel 2.5x slower, the codes no longer
  // stream; the whole K * Q table, 1 MiB for k = 4096, is read from L2/L3 by the gathers)
  const int kt = K;
  for (int64_t r = lo; r < hi; ++r) a.out[r] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += kt) {
    const int k1 = std::min(K, k0 + kt);
    for (int64_t r = lo; r < hi; ++r) {
      const uint8_t* ir = idx + r * (int64_t)K * 2;
      const uint8_t* Tr = a.T + r * (int64_t)K;
      __m256 acc = _mm256_setzero_ps();
      __m256i koff = _mm256_add_epi32(koff0, _mm256_set1_epi32(k0 * Q));
      int k = k0;
      for (; k + 8 <= k1; k += 8) {
        const __m128i c = _mm_loadu_si128((const __m128i*)(ir + 2 * k));
        const __m256i i0 = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_shuffle_epi8(c, even)), koff);
        const __m256i i1 = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_shuffle_epi8(c, odd)), koff);
        const __m256 t0 = _mm256_i32gather_ps(a.tab, i0, 4);
        const __m256 t1 = _mm256_i32gather_ps(a.tab, i1, 4);
        const __m256i tw = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(Tr + k)));
        __m256 s;
        if (perm) {
          const __m256 hi_sel = _mm256_castsi256_ps(_mm256_cmpgt_epi32(tw, seven));
          s = _mm256_blendv_ps(_mm256_permutevar8x32_ps(scv, tw), _mm256_permutevar8x32_ps(scv_hi, tw), hi_sel);
        } else {
          s = _mm256_i32gather_ps(a.scale_of, tw, 4);
        }
        acc = _mm256_fmadd_ps(s, _mm256_fmadd_ps(t1, qv, t0), acc);
        koff = _mm256_add_epi32(koff, kstep);
      }
      float lanes[8];
      _mm256_storeu_ps(lanes, acc);
      float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      for (; k < k1; ++k) {
        const float* tk = a.tab + (int64_t)k * Q;
        sum += a.scale_of[Tr[k]] * (tk[ir[2 * k + 1]] * (float)a.q + tk[ir[2 * k]]);
      }
      a.out[r] += sum;
    }
  }
}
#endif

static void run_rows(const Args& a) {
  parallel_for(a.n, 32, [&](int64_t lo, int64_t hi) {
#ifdef COSET_LUT_AVX2
    if (use_avx2() && a.A == nullptr && a.B == 1 && a.M == 2 && a.idx_bytes == 1 && a.T && !a.sx &&
        a.K * a.Q < (int64_t(1) << 31))
      return rows_b1_m2_u8(a, lo, hi);
    if (use_avx2()) return avx2::rows(a, lo, hi);
#endif
    base::rows(a, lo, hi);
  });
}

}  // namespace lut

void lut_build_tables_cpu(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q, float* tab) {
  parallel_for(K, 8, [&](int64_t lo, int64_t hi) {
#ifdef COSET_LUT_AVX2
    if (lut::use_avx2()) return lut::avx2::build_tables(x, ldx, A, B, d, Q, tab, lo, hi);
#endif
    lut::base::build_tables(x, ldx, A, B, d, Q, tab, lo, hi);
  });
}

void lut_gemv_tables_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, int n_scales,
                         const float* sx, const float* tab, int64_t n, int K, int M, int64_t Q, int q, int B,
                         float* out) {
  lut::Args a{idx, idx_bytes, T, scale_of, sx, tab, nullptr, nullptr, 0, n, K, M, 0, B, q, Q, out, n_scales};
  lut::run_rows(a);
}

void lut_gemv_codebook_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                           const int8_t* A, int d, const float* x, int64_t ldx, int64_t n, int K, int M, int q, int B,
                           float* out) {
  lut::Args a{idx, idx_bytes, T, scale_of, sx, nullptr, A, x, ldx, n, K, M, d, B, q, 0, out, 0};
  lut::run_rows(a);
}

// ------------------------------------------------------------------ the CUDA kernels' core, in the GPU's order
namespace lut {
namespace {

template <typename IdxT, int B>
void core_rows(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx, const int8_t* A, int d,
               const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t lo, int64_t hi, int K, int M, int q,
               float* out) {
  for (int64_t r = lo; r < hi; ++r) {
    const IdxT* ir = idx + r * (int64_t)K * M;
    const uint8_t* Tr = T ? T + r * (int64_t)K : nullptr;
    const float* sr = sx ? sx + r * (int64_t)K : nullptr;
    float p[kWarp][B];
    for (int l = 0; l < kWarp; ++l) {  // what lane l of the row's warp computes
      for (int j = 0; j < B; ++j) p[l][j] = 0.0f;
      if (A == nullptr)
        lane_tables<IdxT, B>(ir, Tr, scale_of, sr, tab, Q, K, M, (float)q, l, p[l]);
      else if (d == 4)
        lane_codebook<IdxT, 4, B>(ir, Tr, scale_of, sr, A, x, ldx, K, M, q, l, p[l]);
      else
        lane_codebook<IdxT, 8, B>(ir, Tr, scale_of, sr, A, x, ldx, K, M, q, l, p[l]);
    }
    lane_tree<B>(p);
    for (int j = 0; j < B; ++j) out[r * B + j] = p[0][j];
  }
}

template <typename IdxT>
void core_B(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx, const int8_t* A, int d,
            const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t lo, int64_t hi, int K, int M, int q,
            int B, float* out) {
  switch (B) {
    case 1: return core_rows<IdxT, 1>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out);
    case 2: return core_rows<IdxT, 2>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out);
    case 4: return core_rows<IdxT, 4>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out);
    default: return core_rows<IdxT, 8>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out);
  }
}

}  // namespace
}  // namespace lut

void lut_build_tables_core_cpu(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q,
                               float* tab) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < Q; ++i)
      for (int j = 0; j < B; ++j) tab[(k * Q + i) * B + j] = lut::table_entry(A + i * d, x + j * ldx + k * d, d);
}

void lut_gemv_core_cpu(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                       const int8_t* A, int d, const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t n,
                       int K, int M, int q, int B, float* out) {
  parallel_for(n, 16, [&](int64_t lo, int64_t hi) {
    if (idx_bytes == 1)
      lut::core_B((const uint8_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, B, out);
    else if (idx_bytes == 2)
      lut::core_B((const int16_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, B, out);
    else
      lut::core_B((const int32_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, B, out);
  });
}

}  // namespace coset
