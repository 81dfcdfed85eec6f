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
  const float* hc = nullptr;  // codebook path, centred codes: h * c subtracted from v (block_codebook)
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

#ifdef COSET_LUT_AVX2
// Codebook path for D = 8 (E8), AVX2: the generic kernel's arithmetic (v = sum_m q^m A[idx_m] exact in int32,
// w = float(v) * s, even/odd blocks into two accumulators per query, lanes summed in order: bit for bit the
// same result, tests), in a loop that keeps every pointer in registers, is specialised for per-block float
// scales or T steps, and takes the scales of 8 blocks at once (the T bytes widened and permuted in registers)
// instead of a T load and a scale load per block. ~1.15x faster than the generic loop (E8 q=2 M=4, 4096 x 4096,
// batch 1 and 8; benchmarks/results/kernels.md).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")  // as in the avx2:: kernels, so that both loops round alike
// The block scales of 8 blocks at once: per-block floats (SX) loaded, or T steps widened and permuted out of the
// <= 16 scales held in two registers; lane(i) broadcasts block i's scale.
template <bool SX>
struct Scales8 {
  __m256 lo, hi;
  explicit Scales8(const Args& a) {
    float sc16[16] = {0};
    if (!SX) std::memcpy(sc16, a.scale_of, sizeof(float) * a.n_scales);
    lo = _mm256_loadu_ps(sc16);
    hi = _mm256_loadu_ps(sc16 + 8);
  }
  __m256 at(const uint8_t* Tk, const float* sk) const {
    if constexpr (SX) return _mm256_loadu_ps(sk);
    const __m256i t = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)Tk));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, t), _mm256_permutevar8x32_ps(hi, t),
                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(t, _mm256_set1_epi32(7))));
  }
};

template <typename IdxT, int B, int M, bool SX, bool HC>
static void rows_codebook8(const Args& a, int64_t lo, int64_t hi) {
  const __m256 hcv = HC ? _mm256_loadu_ps(a.hc) : _mm256_setzero_ps();
  const IdxT* const idx = (const IdxT*)a.idx;
  const int8_t* const A = a.A;
  const uint8_t* const T = a.T;
  const float* const scale_of = a.scale_of;
  const float* const sx = a.sx;
  const float* const x = a.x;
  const int64_t ldx = a.ldx;
  const int K = a.K;
  int lq = 0;  // q is a power of two here (checked by the caller)
  while ((1 << lq) < a.q) ++lq;
  const Scales8<SX> scales(a);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * K;
    const IdxT* const ir = idx + o * M;
    const uint8_t* const Tr = SX ? nullptr : T + o;
    const float* const sr = SX ? sx + o : nullptr;
    __m256 acc[B], acc2[B];
    for (int j = 0; j < B; ++j) acc[j] = acc2[j] = _mm256_setzero_ps();
    auto code = [&](int k) -> __m256 {  // float(v) of block k
      const IdxT* p = ir + (int64_t)k * M;
      __m256i v = (__m256i)avx2::load_rep<8>(A, (uint32_t)p[M - 1]);
      for (int m = M - 2; m >= 0; --m)
        v = _mm256_add_epi32(_mm256_slli_epi32(v, lq), (__m256i)avx2::load_rep<8>(A, (uint32_t)p[m]));
      if constexpr (HC) return _mm256_sub_ps(_mm256_cvtepi32_ps(v), hcv);
      return _mm256_cvtepi32_ps(v);
    };
    auto pair = [&](int k, __m256 s0, __m256 s1) {  // blocks k (into acc) and k + 1 (into acc2)
      const __m256 w0 = _mm256_mul_ps(code(k), s0), w1 = _mm256_mul_ps(code(k + 1), s1);
      for (int j = 0; j < B; ++j) {
        const float* xj = x + j * ldx + (int64_t)k * 8;
        acc[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xj), acc[j]);
        acc2[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xj + 8), acc2[j]);
      }
    };
    int k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 s8 = scales.at(SX ? nullptr : Tr + k, SX ? sr + k : nullptr);
#define COSET_LANE(i) _mm256_permutevar8x32_ps(s8, _mm256_set1_epi32(i))
      pair(k, COSET_LANE(0), COSET_LANE(1));
      pair(k + 2, COSET_LANE(2), COSET_LANE(3));
      pair(k + 4, COSET_LANE(4), COSET_LANE(5));
      pair(k + 6, COSET_LANE(6), COSET_LANE(7));
#undef COSET_LANE
    }
    auto scale1 = [&](int kk) { return _mm256_set1_ps(SX ? sr[kk] : scale_of[Tr[kk]]); };
    for (; k + 2 <= K; k += 2) pair(k, scale1(k), scale1(k + 1));
    for (; k < K; ++k) {
      const __m256 w = _mm256_mul_ps(code(k), scale1(k));
      for (int j = 0; j < B; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j * ldx + (int64_t)k * 8), acc[j]);
    }
    for (int j = 0; j < B; ++j) {
      float l[8];
      _mm256_storeu_ps(l, _mm256_add_ps(acc[j], acc2[j]));
      float t = 0.0f;
      for (int c = 0; c < 8; ++c) t += l[c];
      a.out[r * B + j] = t;
    }
  }
}

// The same loop for D4: two blocks per 8-lane vector, the pair's scales {s0 x4, s1 x4} permuted out of the 8-block
// scale vector; even and odd pairs into two accumulators, the odd last block alone (the generic
// codebook_rows_d4's order, bit for bit).
template <typename IdxT, int B, int M, bool SX, bool HC>
static void rows_codebook4(const Args& a, int64_t lo, int64_t hi) {
  float hc8[8] = {0};
  if (HC)
    for (int c = 0; c < 8; ++c) hc8[c] = a.hc[c % 4];
  const __m256 hcv = _mm256_loadu_ps(hc8);
  const IdxT* const idx = (const IdxT*)a.idx;
  const int8_t* const A = a.A;
  const uint8_t* const T = a.T;
  const float* const scale_of = a.scale_of;
  const float* const sx = a.sx;
  const float* const x = a.x;
  const int64_t ldx = a.ldx;
  const int K = a.K;
  const int32_t q = a.q;
  int lq = 0;
  while ((1 << lq) < q) ++lq;
  const Scales8<SX> scales(a);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * K;
    const IdxT* const ir = idx + o * M;
    const uint8_t* const Tr = SX ? nullptr : T + o;
    const float* const sr = SX ? sx + o : nullptr;
    __m256 acc[B], acc2[B];
    for (int j = 0; j < B; ++j) acc[j] = acc2[j] = _mm256_setzero_ps();
    auto code2 = [&](int k) -> __m256 {  // float(v) of blocks k, k + 1
      const IdxT* i0 = ir + (int64_t)k * M;
      const IdxT* i1 = i0 + M;
      __m256i v = (__m256i)avx2::load_rep_pair4(A, (uint32_t)(uint16_t)i0[M - 1], (uint32_t)(uint16_t)i1[M - 1]);
      for (int m = M - 2; m >= 0; --m)
        v = _mm256_add_epi32(_mm256_slli_epi32(v, lq),
                             (__m256i)avx2::load_rep_pair4(A, (uint32_t)(uint16_t)i0[m], (uint32_t)(uint16_t)i1[m]));
      if constexpr (HC) return _mm256_sub_ps(_mm256_cvtepi32_ps(v), hcv);
      return _mm256_cvtepi32_ps(v);
    };
    auto step = [&](int k, __m256 sc, __m256* ac) {
      const __m256 w = _mm256_mul_ps(code2(k), sc);
      for (int j = 0; j < B; ++j) ac[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j * ldx + (int64_t)k * 4), ac[j]);
    };
    int k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 s8 = scales.at(SX ? nullptr : Tr + k, SX ? sr + k : nullptr);
#define COSET_PAIR(i) _mm256_permutevar8x32_ps(s8, _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1))
      step(k, COSET_PAIR(0), acc);
      step(k + 2, COSET_PAIR(2), acc2);
      step(k + 4, COSET_PAIR(4), acc);
      step(k + 6, COSET_PAIR(6), acc2);
#undef COSET_PAIR
    }
    auto scale1 = [&](int kk) { return SX ? sr[kk] : scale_of[Tr[kk]]; };
    for (; k + 2 <= K; k += 2) {
      const float s0 = scale1(k), s1 = scale1(k + 1);
      step(k, _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1), (k & 2) ? acc2 : acc);
    }
    float tail[B];
    for (int j = 0; j < B; ++j) tail[j] = 0.0f;
    for (; k < K; ++k) {  // odd K: the last block alone
      const float s = scale1(k);
      int32_t v[4];
      for (int c = 0; c < 4; ++c) {
        v[c] = A[(size_t)(uint16_t)ir[k * M + (M - 1)] * 4 + c];
        for (int m = M - 2; m >= 0; --m) v[c] = v[c] * q + A[(size_t)(uint16_t)ir[k * M + m] * 4 + c];
      }
      for (int j = 0; j < B; ++j)
        for (int c = 0; c < 4; ++c)
          tail[j] += ((HC ? (float)v[c] - a.hc[c] : (float)v[c]) * s) * x[j * ldx + (int64_t)k * 4 + c];
    }
    for (int j = 0; j < B; ++j) {
      float l[8];
      _mm256_storeu_ps(l, _mm256_add_ps(acc[j], acc2[j]));
      float t = tail[j];
      for (int c = 0; c < 8; ++c) t += l[c];
      a.out[r * B + j] = t;
    }
  }
}

template <typename IdxT, int B, int M>
static void codebook8_M(const Args& a, int64_t lo, int64_t hi) {
  if (a.D == 4) {
    if (a.hc) return a.sx ? rows_codebook4<IdxT, B, M, true, true>(a, lo, hi) : rows_codebook4<IdxT, B, M, false, true>(a, lo, hi);
    return a.sx ? rows_codebook4<IdxT, B, M, true, false>(a, lo, hi) : rows_codebook4<IdxT, B, M, false, false>(a, lo, hi);
  }
  if (a.hc) return a.sx ? rows_codebook8<IdxT, B, M, true, true>(a, lo, hi) : rows_codebook8<IdxT, B, M, false, true>(a, lo, hi);
  return a.sx ? rows_codebook8<IdxT, B, M, true, false>(a, lo, hi) : rows_codebook8<IdxT, B, M, false, false>(a, lo, hi);
}

template <typename IdxT, int B>
static void codebook8_B(const Args& a, int64_t lo, int64_t hi) {
  switch (a.M) {
    case 1: return codebook8_M<IdxT, B, 1>(a, lo, hi);
    case 2: return codebook8_M<IdxT, B, 2>(a, lo, hi);
    case 3: return codebook8_M<IdxT, B, 3>(a, lo, hi);
    default: return codebook8_M<IdxT, B, 4>(a, lo, hi);
  }
}

template <typename IdxT>
static void codebook8(const Args& a, int64_t lo, int64_t hi) {
  switch (a.B) {
    case 1: return codebook8_B<IdxT, 1>(a, lo, hi);
    case 2: return codebook8_B<IdxT, 2>(a, lo, hi);
    case 4: return codebook8_B<IdxT, 4>(a, lo, hi);
    default: return codebook8_B<IdxT, 8>(a, lo, hi);
  }
}
#pragma GCC pop_options

// the fast codebook loops apply: uint8 / uint16 indices, power-of-two q, scales as floats or <= 16 T steps
static bool codebook8_ok(const Args& a) {
  return a.A && (a.D == 8 || a.D == 4) && (a.idx_bytes == 1 || a.idx_bytes == 2) && a.q > 0 && (a.q & (a.q - 1)) == 0 &&
         (a.sx || (a.n_scales >= 1 && a.n_scales <= 16));
}
#endif

static void run_rows(const Args& a) {
  parallel_for(a.n, 32, [&](int64_t lo, int64_t hi) {
#ifdef COSET_LUT_AVX2
    if (use_avx2() && a.A == nullptr && a.B == 1 && a.M == 2 && a.idx_bytes == 1 && a.T && !a.sx &&
        a.K * a.Q < (int64_t(1) << 31))
      return rows_b1_m2_u8(a, lo, hi);
    if (use_avx2() && codebook8_ok(a))
      return a.idx_bytes == 1 ? codebook8<uint8_t>(a, lo, hi) : codebook8<uint16_t>(a, lo, hi);
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
                           float* out, int n_scales, const float* hc) {
  lut::Args a{idx, idx_bytes, T, scale_of, sx, nullptr, A, x, ldx, n, K, M, d, B, q, 0, out, n_scales, hc};
  lut::run_rows(a);
}

// ------------------------------------------------------------------ the CUDA kernels' core, in the GPU's order
namespace lut {
namespace {

template <typename IdxT, int B>
void core_rows(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx, const int8_t* A, int d,
               const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t lo, int64_t hi, int K, int M, int q,
               float* out, const float* hc) {
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
        lane_codebook<IdxT, 4, B>(ir, Tr, scale_of, sr, A, x, ldx, K, M, q, l, p[l], hc);
      else
        lane_codebook<IdxT, 8, B>(ir, Tr, scale_of, sr, A, x, ldx, K, M, q, l, p[l], hc);
    }
    lane_tree<B>(p);
    for (int j = 0; j < B; ++j) out[r * B + j] = p[0][j];
  }
}

template <typename IdxT>
void core_B(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx, const int8_t* A, int d,
            const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t lo, int64_t hi, int K, int M, int q,
            int B, float* out, const float* hc) {
  switch (B) {
    case 1: return core_rows<IdxT, 1>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out, hc);
    case 2: return core_rows<IdxT, 2>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out, hc);
    case 4: return core_rows<IdxT, 4>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out, hc);
    default: return core_rows<IdxT, 8>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, out, hc);
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
                       int K, int M, int q, int B, float* out, const float* hc) {
  parallel_for(n, 16, [&](int64_t lo, int64_t hi) {
    if (idx_bytes == 1)
      lut::core_B((const uint8_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, B, out, hc);
    else if (idx_bytes == 2)
      lut::core_B((const int16_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, B, out, hc);
    else
      lut::core_B((const int32_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, lo, hi, K, M, q, B, out, hc);
  });
}

}  // namespace coset
