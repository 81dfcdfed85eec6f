// trellis_cpu.cpp - CPU kernels of the coset.kv trellis value code (per-vector logic in trellis_core.inc, shared
// with trellis_cuda.cu). Plain C ABI on raw pointers, bound in bindings.cpp, wrapped with validation in
// coset/cuda/kv.py. Shapes: u (n, D) float32 -> stream (n, nbytes) uint8; values: stream (BH, L, nbytes),
// rho (BH, L), p (BH, nq, L) -> out (BH, nq, D) = sum_t p[., ., t] rho[., t] u_hat_t; scores: stream, rho,
// q (BH, nq, D) -> out (BH, nq, L) = rho[., t] <q[., i], u_hat_t>. ks (D) uint8, cb (2^L).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
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
#pragma GCC target("avx2,bmi2")
namespace avx2 {
#include "trellis_core.inc"
}  // namespace avx2
#pragma GCC pop_options
#undef COSET_TR_SIMD
#endif

bool tr_use_avx2() {
#ifdef COSET_TR_AVX2
  // every AVX2 CPU has BMI2 and FMA3 in practice; checked, since the kernels below use all three
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") &&
                         __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}


// One side (keys or values) of trellis_attend_cpu: streams and 8-bit scale codes read in place, rows `*_stride`
// apart; the schedule, decode table, state bits and stream bytes of its code.
struct TrellisSide {
  const uint8_t* stream;
  int64_t stream_stride;
  const uint8_t* scale;
  int64_t scale_stride;
  const uint8_t* ks;
  const float* cb;
  int LB, nb;
};

// Arguments of trellis_attend_cpu (see there).
struct TrellisAttendArgs {
  TrellisSide k, v;
  const float* scale_tab;
  int64_t BH, L;
  int nq, D;
  const float* q;
  int bias_mode;
  const float* bias;
  const float* tab;
  int64_t pos0;
  int tdim;
  float scaling;
  const float* extra;
  int64_t Le;
  float* acc;
  float* pe;
  float* psum;
};

// Full-precision tokens of a decoding step (a cache's sink or window): row bh's keys and values at k / v +
// bh * stride, token t at + t * D floats.
struct DenseTokens {
  const float* k;
  const float* v;
  int64_t stride, len;
};

// Arguments of trellis_attend_step_cpu (see there); core's q, bias, extra, acc, pe and psum are the step's own.
struct AttendStepArgs {
  TrellisAttendArgs core;
  int H;
  const float* query;
  const float* qmap;
  int qw;
  const float* omap;
  int orows;
  DenseTokens dense[2];
  float* out;
};

// The Viterbi encoder's work space for head dim D and L state bits, in this thread's buffers (reused by every
// encode of the thread).
template <typename Work>
Work trellis_work(int D, int L) {
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
  return w;
}

template <typename Work, typename Encode>
void encode_range(const float* u, int64_t lo, int64_t hi, int D, const uint8_t* ks, const float* cb, int L,
                  uint8_t* out, int nbytes, Encode encode) {
  const Work w = trellis_work<Work>(D, L);
  for (int64_t i = lo; i < hi; ++i) encode(u + i * D, D, ks, cb, L, w, out + i * nbytes, nbytes);
}

// Arguments of trellis_normalise_encode_cpu (see there).
struct NormaliseEncodeArgs {
  const float* x;
  int64_t n;
  int H, D;
  int mean_mode;
  const float* mu;
  const float* cs;
  int64_t pos0;
  const float* chan;
  const float* A;
  const float* scale_tab;
  double limit;
  const uint8_t* ks;
  const float* cb;
  int L;
  uint8_t* stream;
  uint8_t* scale;
  int nbytes;
  int64_t cap, t0;  // outputs: row r (= bh * n + t) at token t0 + t of bh's cap tokens (a cache's buffer)
};

// Row r of trellis_normalise_encode_cpu into u (D floats) and its 8-bit scale code; false when the rms is past
// the limit (or not finite).
bool normalise_row(const NormaliseEncodeArgs& a, int64_t r, float* y, float* u, uint8_t& code) {
  const int D = a.D, h2 = D / 2;
  const int64_t tok = r % a.n, head = (r / a.n) % a.H;
  const float* x = a.x + r * D;
  const float* mu = a.mean_mode ? a.mu + head * D : nullptr;
  for (int d = 0; d < D; ++d) y[d] = x[d];
  if (a.mean_mode == 1) {
    for (int d = 0; d < D; ++d) y[d] = y[d] - mu[d];
  } else if (a.mean_mode == 2) {  // R_p mu = mu cos_p + rotate_half(mu) sin_p, as coset.kv.rope.apply_rotary
    const float* c = a.cs + (a.pos0 + tok) * 2 * D;
    for (int d = 0; d < D; ++d) {
      const float rot = d < h2 ? -mu[d + h2] : mu[d - h2];
      const float m = mu[d] * c[d] + rot * c[D + d];
      y[d] = y[d] - m;
    }
  }
  if (a.chan)
    for (int d = 0; d < D; ++d) y[d] = y[d] / a.chan[head * D + d];
  const float* A = a.A + head * D * D;
  double ss = 0.0;
  for (int i = 0; i < D; ++i) {
    double z = 0.0;
    for (int d = 0; d < D; ++d) z += (double)A[i * D + d] * y[d];
    u[i] = (float)z;
    ss += (double)u[i] * u[i];
  }
  const double rms = std::sqrt(ss / D);
  if (!(rms <= a.limit)) return false;
  if (rms == 0.0) {  // an exact zero vector: code 0, u = 0
    code = 0;
    return true;
  }
  // the nearest log step (coset.kv.codes.normalise_checked): 2^((e - 128) / 8)
  const double e = std::nearbyint(8.0 * std::log2(std::max(rms, std::ldexp(1.0, -20))) + 128.0);
  code = (uint8_t)std::min(255.0, std::max(1.0, e));
  const float rho = a.scale_tab[code];
  for (int i = 0; i < D; ++i) u[i] = u[i] / rho;
  return true;
}

template <typename Work, typename Encode>
void normalise_encode_range(const NormaliseEncodeArgs& a, int64_t lo, int64_t hi, Encode encode, int64_t* bad) {
  thread_local std::vector<float> yu;
  const int D = a.D;
  yu.resize(2 * (size_t)D);
  const Work w = trellis_work<Work>(D, a.L);
  for (int64_t r = lo; r < hi; ++r) {
    uint8_t code = 0;
    if (!normalise_row(a, r, yu.data(), yu.data() + D, code)) {
      *bad = r;
      return;
    }
    const int64_t o = (r / a.n) * a.cap + a.t0 + r % a.n;
    a.scale[o] = code;
    encode(yu.data() + D, D, a.ks, a.cb, a.L, w, a.stream + o * a.nbytes, a.nbytes);
  }
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

template <typename Decode>
void scores_range(const uint8_t* stream, const float* rho, const float* q, int64_t lo, int64_t hi, int64_t L, int nq,
                  int D, const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, Decode decode) {
  std::vector<uint8_t> buf((size_t)nbytes + 6);
  std::vector<float> v((size_t)D);
  for (int64_t bh = lo; bh < hi; ++bh) {
    for (int64_t t = 0; t < L; ++t) {
      const float r = rho[bh * L + t];
      float* o = out + bh * nq * L + t;
      if (r == 0.f) {  // a zero vector (its stream holds whatever the encoder chose)
        for (int i = 0; i < nq; ++i) o[(int64_t)i * L] = 0.f;
        continue;
      }
      decode(stream + (bh * L + t) * nbytes, nbytes, D, ks, cb, LB, buf.data(), v.data());
      for (int i = 0; i < nq; ++i) {
        const float* qi = q + (bh * nq + i) * D;
        float acc = 0.f;
        for (int e = 0; e < D; ++e) acc += qi[e] * v[e];
        o[(int64_t)i * L] = r * acc;
      }
    }
  }
}

#ifdef COSET_TR_AVX2
// The layout of the AVX2 word reads: element e's L-bit window starts at bit start_e of trellis_buffer's layout;
// group g (elements 8g .. 8g+7) reads one big-endian 64-bit word at byte base[g] and element e sits at bit
// shl[e] of it (start + L <= 64 within the word: a group spans at most 8 * 4 bits plus L - 1 <= 13 before it).
void word_layout(int D, const uint8_t* ks, int LB, std::vector<int32_t>& base, std::vector<int32_t>& shl) {
  base.assign((size_t)(D / 8), 0);
  shl.assign((size_t)D, 0);
  int end = 0;
  for (int e = 0; e < D; ++e) {
    end += ks[e];
    const int start = end + 16 - LB;
    if (e % 8 == 0) base[(size_t)(e / 8)] = start >> 3;
    shl[(size_t)e] = start - 8 * base[(size_t)(e / 8)];
  }
}

#pragma GCC push_options
#pragma GCC target("avx2,bmi2,fma")
// The 8 codebook values of group g of a vector whose stream sits in buf (trellis_buffer's layout + 8 zero bytes).
inline __m256 group_values(const uint8_t* buf, const int32_t* base, const int32_t* shl, int g, const float* cb,
                           int right) {
  uint64_t w;
  std::memcpy(&w, buf + base[g], 8);
  w = __builtin_bswap64(w);  // the stream is MSB first
  const int32_t* sh = shl + 8 * g;
  return _mm256_setr_ps(cb[(w << sh[0]) >> right], cb[(w << sh[1]) >> right], cb[(w << sh[2]) >> right],
                        cb[(w << sh[3]) >> right], cb[(w << sh[4]) >> right], cb[(w << sh[5]) >> right],
                        cb[(w << sh[6]) >> right], cb[(w << sh[7]) >> right]);
}

// A vector's stream into buf in trellis_buffer's layout (the last 2 bytes, then the stream; the 8 bytes after it
// stay zero for the 64-bit reads).
inline void load_stream(uint8_t* buf, const uint8_t* sv, int nbytes) {
  std::memcpy(buf, sv + nbytes - 2, 2);
  std::memcpy(buf + 2, sv, (size_t)nbytes);
}

inline float hsum(__m256 a) {  // a fixed tree: (lanes 0-3 + 4-7), then pairs, then the two halves
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

// scores_range with 8 elements at a time (the values as in values_range_avx2), two tokens per pass (the shift
// counts and query loads shared: 1.59 -> 1.15 ms for 3 x 8192 tokens, 3 queries, L = 12), up to 3 queries' sums
// per token in registers; the sums are in another order than the scalar loop's (8 lanes, then a fixed tree) and
// fused (FMA: one rounding per product and add; on Zen 1 a 256-bit mul + add is 4 micro-ops, an FMA 2, and the
// fused step at 8192 tokens went 4.15 -> 3.13 ms), so the two agree to float32 rounding, not bit for bit (as any
// dot product with torch's matmul).
// BIAS (the fused attention's rotary key mean): out[i, t] = <q_i, rho_t u_t> + <qm_i, tab[t]> with tab rows of D
// floats, one sum per query and token (the decoded values scaled first, so the order differs from BIAS = false).
// Two tokens' scores for NI <= 4 query rows (scores_range_avx2's common case: the query heads of one KV head): the
// sums in registers, no copy of the decoded values, no run-time query count (the general loop below made the
// compiler spill its lanes to the stack; the fused step, 3 x 8192 tokens, 3 queries, 1 thread: 4.17 -> 3.28 ms).
// The same products and sums as the general loop, in the same order.
template <int NI, bool BIAS>
inline void scores_pair(const uint8_t* b0, const uint8_t* b1, const int32_t* base, const int32_t* shl, int G, int D,
                        const float* cb, int right, const float* qb, const float* qm, const float* t0row,
                        const float* t1row, float r0, float r1, float* o, int64_t L, bool two) {
  __m256 a0[NI], a1[NI];
  for (int j = 0; j < NI; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  const __m256 vr0 = _mm256_set1_ps(r0), vr1 = _mm256_set1_ps(r1);
  for (int g = 0; g < G; ++g) {
    __m256 x0 = group_values(b0, base, shl, g, cb, right);
    __m256 x1 = group_values(b1, base, shl, g, cb, right);
    if (BIAS) {  // a zero vector (rho 0) scores its mean alone: its values times 0
      x0 = _mm256_mul_ps(x0, vr0);
      x1 = _mm256_mul_ps(x1, vr1);
      const __m256 t0 = _mm256_loadu_ps(t0row + 8 * g), t1 = _mm256_loadu_ps(t1row + 8 * g);
      for (int j = 0; j < NI; ++j) {
        const __m256 qv = _mm256_loadu_ps(qb + (int64_t)j * D + 8 * g);
        const __m256 mv = _mm256_loadu_ps(qm + (int64_t)j * D + 8 * g);
        a0[j] = _mm256_fmadd_ps(mv, t0, _mm256_fmadd_ps(qv, x0, a0[j]));
        a1[j] = _mm256_fmadd_ps(mv, t1, _mm256_fmadd_ps(qv, x1, a1[j]));
      }
    } else {
      for (int j = 0; j < NI; ++j) {
        const __m256 qv = _mm256_loadu_ps(qb + (int64_t)j * D + 8 * g);
        a0[j] = _mm256_fmadd_ps(qv, x0, a0[j]);
        a1[j] = _mm256_fmadd_ps(qv, x1, a1[j]);
      }
    }
  }
  for (int j = 0; j < NI; ++j) {
    if (BIAS) {
      o[(int64_t)j * L] = hsum(a0[j]);
      if (two) o[(int64_t)j * L + 1] = hsum(a1[j]);
    } else {
      o[(int64_t)j * L] = r0 == 0.f ? 0.f : r0 * hsum(a0[j]);
      if (two) o[(int64_t)j * L + 1] = r1 == 0.f ? 0.f : r1 * hsum(a1[j]);
    }
  }
}

template <bool BIAS>
void scores_range_avx2(const uint8_t* stream, const float* rho, const float* q, int64_t lo, int64_t hi, int64_t L,
                       int nq, int D, const uint8_t* ks, const float* cb, int LB, int nbytes, float* out,
                       const float* qm = nullptr, const float* tab = nullptr, int64_t ldo = 0) {
  if (ldo == 0) ldo = L;  // out (rows, nq, ldo): query i's scores ldo floats apart (a chunk of tokens: ldo > L)
  std::vector<uint8_t> buf(2 * ((size_t)nbytes + 14), 0);
  uint8_t* b0 = buf.data();
  uint8_t* b1 = b0 + nbytes + 14;
  std::vector<int32_t> base, shl;
  word_layout(D, ks, LB, base, shl);
  const int G = D / 8, right = 64 - LB;
  if (nq <= 4) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const float* qb = q + bh * nq * D;
      const float* qmb = BIAS ? qm + bh * nq * D : nullptr;
      for (int64_t t = 0; t < L; t += 2) {
        const bool two = t + 1 < L;
        const uint8_t* s0 = stream + (bh * L + t) * nbytes;
        load_stream(b0, s0, nbytes);
        if (two) load_stream(b1, s0 + nbytes, nbytes);
        const float r0 = rho[bh * L + t], r1 = two ? rho[bh * L + t + 1] : 0.f;
        const float* tr0 = BIAS ? tab + t * D : nullptr;
        const float* tr1 = BIAS ? (two ? tr0 + D : tr0) : nullptr;
        float* o = out + bh * nq * ldo + t;
        const uint8_t* c1 = two ? b1 : b0;
        const int32_t *bs = base.data(), *sh = shl.data();
        switch (nq) {
          case 1: scores_pair<1, BIAS>(b0, c1, bs, sh, G, D, cb, right, qb, qmb, tr0, tr1, r0, r1, o, ldo, two); break;
          case 2: scores_pair<2, BIAS>(b0, c1, bs, sh, G, D, cb, right, qb, qmb, tr0, tr1, r0, r1, o, ldo, two); break;
          case 3: scores_pair<3, BIAS>(b0, c1, bs, sh, G, D, cb, right, qb, qmb, tr0, tr1, r0, r1, o, ldo, two); break;
          default: scores_pair<4, BIAS>(b0, c1, bs, sh, G, D, cb, right, qb, qmb, tr0, tr1, r0, r1, o, ldo, two);
        }
      }
    }
    return;
  }
  std::vector<float> v(2 * (size_t)D);
  for (int64_t bh = lo; bh < hi; ++bh) {
    const float* qb = q + bh * nq * D;
    for (int64_t t = 0; t < L; t += 2) {
      const int nt = t + 1 < L ? 2 : 1;  // two tokens per pass: the shift counts and queries are loaded once
      const float r0 = rho[bh * L + t], r1 = nt == 2 ? rho[bh * L + t + 1] : 0.f;
      const uint8_t* s0 = stream + (bh * L + t) * nbytes;
      load_stream(b0, s0, nbytes);
      if (nt == 2) load_stream(b1, s0 + nbytes, nbytes);
      float* o = out + bh * nq * ldo + t;
      for (int i0 = 0; i0 < nq; i0 += 3) {
        const int ni = std::min(3, nq - i0);
        __m256 a0[3] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256 a1[3] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int g = 0; g < G; ++g) {
          __m256 x0, x1;
          if (i0 == 0) {  // decode once per token, keep the values for the next queries
            x0 = group_values(b0, base.data(), shl.data(), g, cb, right);
            x1 = group_values(b1, base.data(), shl.data(), g, cb, right);
            if (BIAS) {  // a zero vector (rho 0) scores its mean alone
              x0 = r0 == 0.f ? _mm256_setzero_ps() : _mm256_mul_ps(x0, _mm256_set1_ps(r0));
              x1 = r1 == 0.f ? _mm256_setzero_ps() : _mm256_mul_ps(x1, _mm256_set1_ps(r1));
            }
            _mm256_storeu_ps(v.data() + 8 * g, x0);
            _mm256_storeu_ps(v.data() + D + 8 * g, x1);
          } else {
            x0 = _mm256_loadu_ps(v.data() + 8 * g);
            x1 = _mm256_loadu_ps(v.data() + D + 8 * g);
          }
          if (BIAS) {
            const __m256 t0 = _mm256_loadu_ps(tab + t * D + 8 * g);
            const __m256 t1 = nt == 2 ? _mm256_loadu_ps(tab + (t + 1) * D + 8 * g) : _mm256_setzero_ps();
            for (int j = 0; j < ni; ++j) {
              const __m256 qv = _mm256_loadu_ps(qb + (int64_t)(i0 + j) * D + 8 * g);
              const __m256 mv = _mm256_loadu_ps(qm + (bh * nq + i0 + j) * D + 8 * g);
              a0[j] = _mm256_fmadd_ps(mv, t0, _mm256_fmadd_ps(qv, x0, a0[j]));
              a1[j] = _mm256_fmadd_ps(mv, t1, _mm256_fmadd_ps(qv, x1, a1[j]));
            }
          } else {
            for (int j = 0; j < ni; ++j) {
              const __m256 qv = _mm256_loadu_ps(qb + (int64_t)(i0 + j) * D + 8 * g);
              a0[j] = _mm256_fmadd_ps(qv, x0, a0[j]);
              a1[j] = _mm256_fmadd_ps(qv, x1, a1[j]);
            }
          }
        }
        for (int j = 0; j < ni; ++j) {
          if (BIAS) {
            o[(int64_t)(i0 + j) * ldo] = hsum(a0[j]);
            if (nt == 2) o[(int64_t)(i0 + j) * ldo + 1] = hsum(a1[j]);
          } else {
            o[(int64_t)(i0 + j) * ldo] = r0 == 0.f ? 0.f : r0 * hsum(a0[j]);
            if (nt == 2) o[(int64_t)(i0 + j) * ldo + 1] = r1 == 0.f ? 0.f : r1 * hsum(a1[j]);
          }
        }
      }
    }
  }
}

// One group g of NI query rows over the n buffered tokens of a chunk (values_range_avx2): the group's 8 shift
// counts and word offset stay in registers for the whole chunk, the NI sums in ymm registers (o read and written
// once per chunk, not per token).
template <int NI>
inline void values_group(const uint8_t* buf, size_t stride, int n, int32_t bg, const int32_t* sh, const float* cb,
                         int right, const float* wt, int C, float* o, int D) {
  const int32_t s0 = sh[0], s1 = sh[1], s2 = sh[2], s3 = sh[3], s4 = sh[4], s5 = sh[5], s6 = sh[6], s7 = sh[7];
  __m256 acc[NI];
  for (int j = 0; j < NI; ++j) acc[j] = _mm256_loadu_ps(o + (int64_t)j * D);
  for (int c = 0; c < n; ++c) {
    uint64_t w;
    std::memcpy(&w, buf + (size_t)c * stride + bg, 8);
    w = __builtin_bswap64(w);  // the stream is MSB first
    const __m256 x = _mm256_setr_ps(cb[(w << s0) >> right], cb[(w << s1) >> right], cb[(w << s2) >> right],
                                    cb[(w << s3) >> right], cb[(w << s4) >> right], cb[(w << s5) >> right],
                                    cb[(w << s6) >> right], cb[(w << s7) >> right]);
    for (int j = 0; j < NI; ++j)  // o + w_t x_t (fused), token by token: the scalar loop's order
      acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(wt[(size_t)j * C + c]), x, acc[j]);
  }
  for (int j = 0; j < NI; ++j) _mm256_storeu_ps(o + (int64_t)j * D, acc[j]);
}

// values_range with 8 elements at a time: the 8 states from one big-endian 64-bit word (each element's bit offset
// in it is fixed by the schedule), the values from 8 table loads (AVX2 gathers measured slower on AMD Zen 2).
// Tokens in chunks of 128 (their streams copied to an L1-sized buffer), each chunk group by group (values_group:
// shifts and sums in registers: 1.94 -> 1.50 ms for 3 x 8192 tokens, 3 queries, 1 thread). Per element the
// products and sums are the scalar loop's (tokens in order) but fused (FMA), so results agree with it to float32
// rounding (a token skipped for a zero scale or weights that are all 0 adds +-0 in the scalar loop).
void values_range_avx2(const uint8_t* stream, const float* rho, const float* p, int64_t lo, int64_t hi, int64_t L,
                       int nq, int D, const uint8_t* ks, const float* cb, int LB, int nbytes, float* out) {
  constexpr int C = 128;
  const size_t stride = (size_t)nbytes + 14;  // trellis_buffer's layout + 8 zero bytes per token
  std::vector<uint8_t> buf(C * stride, 0);
  std::vector<int32_t> base, shl;
  word_layout(D, ks, LB, base, shl);
  const int G = D / 8, right = 64 - LB;
  std::vector<float> wt((size_t)nq * C);
  for (int64_t bh = lo; bh < hi; ++bh) {
    float* o = out + bh * nq * D;
    int64_t t = 0;
    while (t < L) {
      int n = 0;
      for (; t < L && n < C; ++t) {
        // a zero vector's stream holds whatever the encoder chose; a token whose weights are all 0 adds nothing
        const float r = rho[bh * L + t];
        if (r == 0.f) continue;
        bool any = false;
        for (int i = 0; i < nq; ++i) any = any || p[(bh * nq + i) * L + t] != 0.f;
        if (!any) continue;
        for (int i = 0; i < nq; ++i) wt[(size_t)i * C + n] = p[(bh * nq + i) * L + t] * r;
        load_stream(buf.data() + (size_t)n * stride, stream + (bh * L + t) * nbytes, nbytes);
        ++n;
      }
      if (n == 0) continue;
      for (int g = 0; g < G; ++g) {
        const int32_t* sh = shl.data() + 8 * g;
        for (int i0 = 0; i0 < nq; i0 += 4) {
          float* oi = o + (int64_t)i0 * D + 8 * g;
          const float* wi = wt.data() + (size_t)i0 * C;
          switch (std::min(4, nq - i0)) {
            case 1: values_group<1>(buf.data(), stride, n, base[g], sh, cb, right, wi, C, oi, D); break;
            case 2: values_group<2>(buf.data(), stride, n, base[g], sh, cb, right, wi, C, oi, D); break;
            case 3: values_group<3>(buf.data(), stride, n, base[g], sh, cb, right, wi, C, oi, D); break;
            default: values_group<4>(buf.data(), stride, n, base[g], sh, cb, right, wi, C, oi, D); break;
          }
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

// The value (values = true: x = p) and score (x = q) kernels over rows [0, BH): checks, ISA dispatch, threads.
int stream_kernel(bool values, const uint8_t* stream, const float* rho, const float* x, int64_t BH, int64_t L, int nq,
                  int D, const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, int threads) {
  if (BH < 0 || L < 0 || nq < 1 || tr_bad(D, LB, nbytes, ks)) return 1;
  auto body = [&](int64_t lo, int64_t hi) {
#ifdef COSET_TR_AVX2
    if (tr_use_avx2()) {
      if (values)
        values_range_avx2(stream, rho, x, lo, hi, L, nq, D, ks, cb, LB, nbytes, out);
      else
        scores_range_avx2<false>(stream, rho, x, lo, hi, L, nq, D, ks, cb, LB, nbytes, out);
      return;
    }
#endif
    (values ? values_range<decltype(&base::trellis_decode_vector)>
            : scores_range<decltype(&base::trellis_decode_vector)>)(stream, rho, x, lo, hi, L, nq, D, ks, cb, LB,
                                                                     nbytes, out, base::trellis_decode_vector);
  };
  split_rows(BH, threads, body);
  return 0;
}


#ifdef COSET_TR_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
// s[t] += <qm, tab row t> for one query row over n rows of tdim (a multiple of 8) floats.
void add_table_dots_avx2(float* s, const float* qm, const float* tab, int64_t n, int tdim) {
  for (int64_t t = 0; t < n; ++t) {
    const float* row = tab + t * tdim;
    __m256 a = _mm256_setzero_ps();
    for (int d = 0; d < tdim; d += 8) a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(qm + d), _mm256_loadu_ps(row + d)));
    s[t] += hsum(a);
  }
}
#pragma GCC pop_options
#endif

void add_table_dots(float* s, const float* qm, const float* tab, int64_t n, int tdim) {
#ifdef COSET_TR_AVX2
  if (tr_use_avx2() && tdim % 8 == 0) {
    add_table_dots_avx2(s, qm, tab, n, tdim);
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    const float* row = tab + t * tdim;
    float a = 0.f;
    for (int d = 0; d < tdim; ++d) a += qm[d] * row[d];
    s[t] += a;
  }
}

// Subnormal floats flushed to zero (FTZ) and read as zero (DAZ) while alive, on this thread. In a decoding step
// most softmax weights of a peaked row (a sink token, a recent token) are exp(-100)-small: as subnormals each
// product with them takes a microcode assist (SmolLM2's rows: ~1 ms per layer at 8k tokens); flushed they are 0,
// which changes a weighted sum by < 1e-38 of its largest weight.
struct FlushDenormals {
#ifdef COSET_TR_X86
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#ifdef COSET_TR_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
// exp(x) for x <= 0, 8 lanes (Cephes' expf: range reduction by ln 2 in two parts, a degree-6 polynomial; relative
// error ~2 ulp); x < -87 (and NaN) -> 0, so no result is subnormal.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(y, r), r), r), _mm256_set1_ps(1.f));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(n)));
}

// softmax_row's coded part with 8 lanes: s *= scaling with the running max and sum, then exp and the sum of weights.
void scale_max_sum_avx2(float* s, int64_t L, float scaling, float& m, float& sum) {
  __m256 vm = _mm256_set1_ps(-INFINITY), vs = _mm256_setzero_ps();
  const __m256 sc = _mm256_set1_ps(scaling);
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + t), sc);
    _mm256_storeu_ps(s + t, x);
    vm = _mm256_max_ps(vm, x);
    vs = _mm256_add_ps(vs, x);
  }
  alignas(32) float lm[8];
  _mm256_store_ps(lm, vm);
  for (float x : lm) m = std::max(m, x);
  sum += hsum(vs);
  for (; t < L; ++t) {
    s[t] *= scaling;
    m = std::max(m, s[t]);
    sum += s[t];
  }
}

float exp_sum_avx2(float* s, int64_t L, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vz = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= L; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, e);
    vz = _mm256_add_ps(vz, e);
  }
  float z = hsum(vz);
  for (; t < L; ++t) {
    const float d = s[t] - m;
    z += (s[t] = d < -87.f ? 0.f : std::exp(d));
  }
  return z;
}
#pragma GCC pop_options
#endif

// The softmax of one query row over [extra (Le dense tokens' scores, already scaled), scaling * s (L coded
// tokens)]: s becomes the coded tokens' weights, pe the dense tokens', *psum the coded tokens' total weight.
// Weights below e^-87 of the largest are 0. Returns false when a score is not finite (a NaN or an infinite score
// carries into the sum of scores).
bool softmax_row(float* s, int64_t L, const float* extra, float* pe, int64_t Le, float scaling, float* psum) {
  float m = -INFINITY, sum = 0.f;
#ifdef COSET_TR_AVX2
  const bool fast = tr_use_avx2();
#else
  const bool fast = false;
#endif
  if (fast) {
#ifdef COSET_TR_AVX2
    scale_max_sum_avx2(s, L, scaling, m, sum);
#endif
  } else {
    for (int64_t t = 0; t < L; ++t) {
      s[t] *= scaling;
      m = std::max(m, s[t]);
      sum += s[t];
    }
  }
  for (int64_t t = 0; t < Le; ++t) {
    m = std::max(m, extra[t]);
    sum += extra[t];
  }
  if (!std::isfinite(sum)) return false;
  float z = 0.f, zc = 0.f;
  for (int64_t t = 0; t < Le; ++t) {
    const float d = extra[t] - m;
    z += (pe[t] = d < -87.f ? 0.f : std::exp(d));
  }
  if (fast) {
#ifdef COSET_TR_AVX2
    zc = exp_sum_avx2(s, L, m);
#endif
  } else {
    for (int64_t t = 0; t < L; ++t) {
      const float d = s[t] - m;
      zc += (s[t] = d < -87.f ? 0.f : std::exp(d));
    }
  }
  z += zc;
  const float inv = 1.f / z;
  for (int64_t t = 0; t < Le; ++t) pe[t] *= inv;
  for (int64_t t = 0; t < L; ++t) s[t] *= inv;
  *psum = zc * inv;
  return true;
}

// The fused decode attention of rows [lo, hi) (trellis_attend_cpu below); ok[bh] = 0 when a score of row bh is not
// finite. With the rotary mean scored in the AVX2 pass, the tokens are walked in chunks of kChunk, each chunk for
// every row: a chunk's table rows (kChunk * D floats) come from memory once and from L2 for the other rows (KV
// heads), instead of the whole table (P * D floats, 4 MB at 16k positions) once per row.
void attend_rows(const TrellisAttendArgs& a, int64_t lo, int64_t hi, uint8_t* ok) {
  constexpr int64_t kChunk = 256;
  const int64_t L = a.L, Le = a.Le, n = hi - lo, rs = (int64_t)a.nq * L;
  const int nq = a.nq, D = a.D;
  thread_local std::vector<float> sc, rk, rv;
  sc.resize((size_t)(n * rs + 1));
  rk.resize((size_t)(n * L + 1));
  rv.resize((size_t)(n * L + 1));
  for (int64_t r = 0; r < n; ++r) {  // 8-bit log scale codes -> rho (coset.kv.codes.scale_values' table)
    const uint8_t* kc = a.k.scale + (lo + r) * a.k.scale_stride;
    const uint8_t* vc = a.v.scale + (lo + r) * a.v.scale_stride;
    for (int64_t t = 0; t < L; ++t) {
      rk[(size_t)(r * L + t)] = a.scale_tab[kc[t]];
      rv[(size_t)(r * L + t)] = a.scale_tab[vc[t]];
    }
  }
  bool fused_bias = false;
  if (L > 0) {
#ifdef COSET_TR_AVX2
    if (tr_use_avx2() && a.bias_mode == 2 && a.tdim == D) {  // the rotary mean's dots in the same pass
      for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
        const int64_t c1 = std::min(L, c0 + kChunk);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t bh = lo + r;
          scores_range_avx2<true>(a.k.stream + bh * a.k.stream_stride + c0 * a.k.nb, rk.data() + r * L + c0,
                                  a.q + bh * nq * D, 0, 1, c1 - c0, nq, D, a.k.ks, a.k.cb, a.k.LB, a.k.nb,
                                  sc.data() + r * rs + c0, a.bias + bh * nq * D, a.tab + (a.pos0 + c0) * D, L);
        }
      }
      fused_bias = true;
    }
#endif
  }
  for (int64_t r = 0; r < n; ++r) {
    const int64_t bh = lo + r;
    const float* qb = a.q + bh * nq * D;
    const uint8_t* ks = a.k.stream + bh * a.k.stream_stride;
    const uint8_t* vs = a.v.stream + bh * a.v.stream_stride;
    float* s = sc.data() + r * rs;
    const float* rkr = rk.data() + r * L;
    const float* rvr = rv.data() + r * L;
    if (L > 0 && !fused_bias) {
#ifdef COSET_TR_AVX2
      if (tr_use_avx2())
        scores_range_avx2<false>(ks, rkr, qb, 0, 1, L, nq, D, a.k.ks, a.k.cb, a.k.LB, a.k.nb, s);
      else
#endif
        scores_range<decltype(&base::trellis_decode_vector)>(ks, rkr, qb, 0, 1, L, nq, D, a.k.ks, a.k.cb, a.k.LB,
                                                              a.k.nb, s, base::trellis_decode_vector);
    }
    bool finite = true;
    for (int i = 0; i < nq; ++i) {
      float* si = s + (int64_t)i * L;
      const int64_t row = bh * nq + i;
      if (a.bias_mode == 1) {
        const float b = a.bias[row];
        for (int64_t t = 0; t < L; ++t) si[t] += b;
      } else if (a.bias_mode == 2 && !fused_bias) {
        add_table_dots(si, a.bias + row * a.tdim, a.tab + a.pos0 * a.tdim, L, a.tdim);
      }
      if (!softmax_row(si, L, a.extra + row * Le, a.pe + row * Le, Le, a.scaling, a.psum + row)) finite = false;
    }
    ok[bh] = finite ? 1 : 0;
    if (!finite) continue;
    float* out = a.acc + bh * nq * D;
    std::fill(out, out + (int64_t)nq * D, 0.f);
    if (L > 0) {
#ifdef COSET_TR_AVX2
      if (tr_use_avx2())
        values_range_avx2(vs, rvr, s, 0, 1, L, nq, D, a.v.ks, a.v.cb, a.v.LB, a.v.nb, out);
      else
#endif
        values_range<decltype(&base::trellis_decode_vector)>(vs, rvr, s, 0, 1, L, nq, D, a.v.ks, a.v.cb, a.v.LB,
                                                              a.v.nb, out, base::trellis_decode_vector);
    }
  }
}

// The full decode step of trellis_attend_step_cpu (see there) over rows [lo, hi): per row the query maps, the
// dense tokens' scores, attend_rows on the coded tokens (its buffers per call, its rows offset to lo), then the
// output map and the dense tokens' values. Everything a decoding step does per layer in one pass over the rows:
// in the model each small op of the same maps in torch cost 10-100 us of dispatch (0.6 ms per layer and step).
void attend_step_rows(const AttendStepArgs& s, int64_t lo, int64_t hi, uint8_t* ok) {
  const TrellisAttendArgs& c = s.core;
  const int nq = c.nq, D = c.D, qw = s.qw, bw = s.qw - c.D;
  const int64_t n = hi - lo, Le = s.dense[0].len + s.dense[1].len, rows = n * nq;
  thread_local std::vector<float> qr, bias, extra, acc, pe, psum, qin;
  qr.resize((size_t)(rows * D));
  bias.resize((size_t)(rows * bw + 1));
  extra.resize((size_t)(rows * Le + 1));
  acc.resize((size_t)(rows * D));
  pe.resize((size_t)(rows * Le + 1));
  psum.resize((size_t)rows);
  qin.resize((size_t)qw);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t bh = lo + r;
    const float* M = s.qmap + (bh % s.H) * (int64_t)D * qw;
    for (int i = 0; i < nq; ++i) {
      const int64_t row = r * nq + i;
      const float* x = s.query + (bh * nq + i) * D;
      std::fill(qin.begin(), qin.end(), 0.f);
      for (int d = 0; d < D; ++d) {  // [q' | qm] = x @ qmap[h], row by row (the loop over columns vectorizes)
        const float xd = x[d];
        const float* m = M + (int64_t)d * qw;
        for (int j = 0; j < qw; ++j) qin[(size_t)j] += xd * m[j];
      }
      std::copy(qin.begin(), qin.begin() + D, qr.begin() + row * D);
      std::copy(qin.begin() + D, qin.end(), bias.begin() + row * bw);
      float* e = extra.data() + row * Le;
      for (const DenseTokens& seg : s.dense) {
        const float* kb = seg.k + bh * seg.stride;
        for (int64_t t = 0; t < seg.len; ++t) {
          float a = 0.f;
          for (int d = 0; d < D; ++d) a += x[d] * kb[t * D + d];
          *e++ = a * c.scaling;
        }
      }
    }
  }
  TrellisAttendArgs sub = c;
  sub.k.stream += lo * c.k.stream_stride;
  sub.k.scale += lo * c.k.scale_stride;
  sub.v.stream += lo * c.v.stream_stride;
  sub.v.scale += lo * c.v.scale_stride;
  sub.BH = n;
  sub.q = qr.data();
  sub.bias = bias.data();
  sub.extra = extra.data();
  sub.Le = Le;
  sub.acc = acc.data();
  sub.pe = pe.data();
  sub.psum = psum.data();
  attend_rows(sub, 0, n, ok + lo);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t bh = lo + r;
    if (!ok[bh]) continue;
    const float* O = s.omap + (bh % s.H) * (int64_t)s.orows * D;
    for (int i = 0; i < nq; ++i) {
      const int64_t row = r * nq + i;
      float* o = s.out + (bh * nq + i) * D;
      std::fill(o, o + D, 0.f);
      const float* a = acc.data() + row * D;
      for (int d = 0; d < D; ++d) {  // [acc | psum] @ omap[h]
        const float ad = a[d];
        const float* m = O + (int64_t)d * D;
        for (int j = 0; j < D; ++j) o[j] += ad * m[j];
      }
      if (s.orows > D) {
        const float ps = psum[(size_t)row];
        const float* m = O + (int64_t)D * D;
        for (int j = 0; j < D; ++j) o[j] += ps * m[j];
      }
      const float* w = pe.data() + row * Le;
      for (const DenseTokens& seg : s.dense) {
        const float* vb = seg.v + bh * seg.stride;
        for (int64_t t = 0; t < seg.len; ++t, ++w) {
          if (*w == 0.f) continue;
          for (int j = 0; j < D; ++j) o[j] += *w * vb[t * D + j];
        }
      }
    }
  }
}

// trellis_normalise_encode_cpu's rows [0, rows) on the threads: the first bad row, or -1.
int64_t normalise_encode_rows(const NormaliseEncodeArgs& a, int64_t rows, int threads) {
  const bool fast = tr_use_avx2();
  std::mutex mu_bad;
  int64_t first = -1;
  auto body = [&](int64_t lo, int64_t hi) {
    int64_t b = -1;
#ifdef COSET_TR_AVX2
    if (fast)
      normalise_encode_range<avx2::TrellisWork>(a, lo, hi, avx2::trellis_encode_vector, &b);
    else
#endif
      normalise_encode_range<base::TrellisWork>(a, lo, hi, base::trellis_encode_vector, &b);
    if (b >= 0) {
      std::lock_guard<std::mutex> lock(mu_bad);
      if (first < 0 || b < first) first = b;
    }
  };
  (void)fast;
  split_rows(rows, threads, body);
  return first;
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

// The encoder of a cache's new tokens after the first chunk (coset.kv.CodedKVStore): per row r of n = (B * H)
// rows x (D floats; head h = (r / ntok) % H, token t = r % ntok):
//   y = x - m, m = 0 (mean_mode 0), mu[h] (1) or mu[h] cos_p + rotate_half(mu[h]) sin_p (2; cs rows of
//   [cos_p | sin_p], p = pos0 + t); y /= chan[h] (when chan is not null); z = A[h] y (summed in double);
//   rms = |z| / sqrt(D); code = 0 for z = 0, else round(8 log2 max(rms, 2^-20) + 128) clamped to 1..255;
//   u = z / scale_tab[code]; stream[r] = the trellis stream of u (trellis_encode_vector), scale[r] = code.
// Returns 0, 1 for bad sizes, 2 when a row's rms is past limit or not finite (*bad_row = the first such row found;
// outputs then partly written).
int trellis_normalise_encode_cpu(const float* x, int64_t rows, int64_t ntok, int H, int D, int mean_mode,
                                 const float* mu, const float* cs, int64_t pos0, const float* chan, const float* A,
                                 const float* scale_tab, double limit, const uint8_t* ks, const float* cb, int L,
                                 uint8_t* stream, uint8_t* scale, int nbytes, int64_t* bad_row, int threads) {
  if (rows < 0 || ntok < 1 || H < 1 || mean_mode < 0 || mean_mode > 2 || pos0 < 0 || tr_bad(D, L, nbytes, ks))
    return 1;
  if (D % 2 || (rows && rows % (ntok * H))) return 1;
  const NormaliseEncodeArgs a{x, ntok, H, D, mean_mode, mu, cs, pos0, chan, A, scale_tab, limit, ks, cb, L,
                              stream, scale, nbytes, ntok, 0};
  *bad_row = normalise_encode_rows(a, rows, threads);
  return *bad_row >= 0 ? 2 : 0;
}

// A decoding step's append (coset.kv's CodedKVStore): trellis_normalise_encode_cpu of the keys (xk, its mean mode,
// mu_k, the [cos | sin] table cs, chan, A_k, code) and of the values (xv, mean mode 0 or 1, mu_v, A_v, code), both
// (BH * ntok) rows, written in place into a cache's buffers: row bh's token t at token t0 + t of cap (streams
// (BH, cap, nb), scale codes (BH, cap)). Returns 0, 1 for bad sizes, 2 when a row's rms is past limit or not
// finite (*bad_row = the first such flat row, keys before values; the outputs then partly written).
int trellis_append_cpu(const float* xk, int k_mean_mode, const float* mu_k, const float* cs, const float* chan,
                       const float* A_k, const uint8_t* kks, const float* kcb, int kL, int knb, uint8_t* kstream,
                       uint8_t* kscale, const float* xv, int v_mean_mode, const float* mu_v, const float* A_v,
                       const uint8_t* vks, const float* vcb, int vL, int vnb, uint8_t* vstream, uint8_t* vscale,
                       int64_t BH, int64_t ntok, int H, int D, int64_t pos0, const float* scale_tab, double limit,
                       int64_t cap, int64_t t0, int64_t* bad_row, int threads) {
  if (BH < 0 || ntok < 1 || H < 1 || BH % H || D % 2 || pos0 < 0 || t0 < 0 || cap < t0 + ntok) return 1;
  if (k_mean_mode < 0 || k_mean_mode > 2 || v_mean_mode < 0 || v_mean_mode > 1) return 1;
  if (tr_bad(D, kL, knb, kks) || tr_bad(D, vL, vnb, vks)) return 1;
  const int64_t rows = BH * ntok;
  const NormaliseEncodeArgs ak{xk, ntok, H, D, k_mean_mode, mu_k, cs, pos0, chan, A_k, scale_tab, limit, kks, kcb, kL,
                               kstream, kscale, knb, cap, t0};
  const NormaliseEncodeArgs av{xv, ntok, H, D, v_mean_mode, mu_v, nullptr, pos0, nullptr, A_v, scale_tab, limit,
                               vks, vcb, vL, vstream, vscale, vnb, cap, t0};
  *bad_row = normalise_encode_rows(ak, rows, threads);
  if (*bad_row < 0) {
    const int64_t b = normalise_encode_rows(av, rows, threads);
    if (b >= 0) *bad_row = rows + b;
  }
  return *bad_row >= 0 ? 2 : 0;
}

// out (BH, nq, D) is accumulated into (zeroed by the caller).
int trellis_values_cpu(const uint8_t* stream, const float* rho, const float* p, int64_t BH, int64_t L, int nq, int D,
                       const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, int threads) {
  return stream_kernel(true, stream, rho, p, BH, L, nq, D, ks, cb, LB, nbytes, out, threads);
}

// out (BH, nq, L) is written in full.
int trellis_scores_cpu(const uint8_t* stream, const float* rho, const float* q, int64_t BH, int64_t L, int nq, int D,
                       const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, int threads) {
  return stream_kernel(false, stream, rho, q, BH, L, nq, D, ks, cb, LB, nbytes, out, threads);
}

// Decode attention over trellis-coded keys and values, fused (one call per layer and step; coset.kv's
// CodedKVStore.attend). Per row bh of BH = batch x KV heads, query rows i < nq (rotated, D floats):
//   s[i, t] = scaling (rho_k[t] <q[i], u_k(t)> + bias[i, t]) over the L coded tokens, where bias is 0
//   (bias_mode 0), bias[bh, i] (1) or <bias[bh, i, :], tab[pos0 + t, :]> (2, rows of tdim floats: the scores of
//   the keys' rotary mean); one softmax over [extra[bh, i, :] (Le scores of the dense tokens, already scaled), s];
//   acc[bh, i, :] = sum_t p[i, t] rho_v[t] u_v(t) (rotated domain), pe[bh, i, :] = the dense tokens' weights,
//   psum[bh, i] = sum_t p[i, t]. Streams and 8-bit scale codes are read in place from the caches' buffers: row
//   bh starts at bh * stride (the buffers' capacity, not L). rho = scale_tab[code].
// Returns 0, 1 for bad sizes, 2 when a score is not finite (outputs then undefined).
int trellis_attend_cpu(const uint8_t* kstream, int64_t kstream_stride, const uint8_t* kscale, int64_t kscale_stride,
                       const uint8_t* kks, const float* kcb, int kLB, int knb, const uint8_t* vstream,
                       int64_t vstream_stride, const uint8_t* vscale, int64_t vscale_stride, const uint8_t* vks,
                       const float* vcb, int vLB, int vnb, const float* scale_tab, int64_t BH, int64_t L, int nq,
                       int D, const float* q, int bias_mode, const float* bias, const float* tab, int64_t pos0,
                       int tdim, float scaling, const float* extra, int64_t Le, float* acc, float* pe, float* psum,
                       int threads) {
  if (BH < 0 || L < 0 || Le < 0 || nq < 1 || L + Le < 1 || bias_mode < 0 || bias_mode > 2 || pos0 < 0) return 1;
  if (bias_mode == 2 && tdim < 1) return 1;
  if (L > 0 && (tr_bad(D, kLB, knb, kks) || tr_bad(D, vLB, vnb, vks))) return 1;
  if (kstream_stride < L * knb || vstream_stride < L * vnb || kscale_stride < L || vscale_stride < L) return 1;
  const TrellisAttendArgs a{{kstream, kstream_stride, kscale, kscale_stride, kks, kcb, kLB, knb},
                            {vstream, vstream_stride, vscale, vscale_stride, vks, vcb, vLB, vnb},
                            scale_tab, BH, L, nq, D, q, bias_mode, bias, tab, pos0, tdim, scaling, extra, Le, acc, pe,
                            psum};
  std::vector<uint8_t> ok((size_t)BH, 1);
  split_rows(BH, threads, [&](int64_t lo, int64_t hi) {
    const FlushDenormals ftz;  // per worker thread (MXCSR is per thread)
    attend_rows(a, lo, hi, ok.data());
  });
  for (int64_t bh = 0; bh < BH; ++bh)
    if (!ok[(size_t)bh]) return 2;
  return 0;
}


// A whole decoding step of one layer (coset.kv's CodedKVStore.attend for one query position): per row bh of BH =
// batch x KV heads (head h = bh % H) and query row i < nq (query (BH, nq, D) floats, as given to the layer):
//   [q' | qm] = query[bh, i] @ qmap[h] (qmap (H, D, qw), qw = D + 0 / 1 / tdim columns for bias_mode 0 / 1 / 2:
//   the query in the coded keys' domain, then the query of the key mean's scores);
//   the dense tokens' scores scaling * <query[bh, i], k_j> (sink then window tokens, DenseTokens);
//   trellis_attend_cpu's scores, softmax and value sums with q', qm as its bias and those dense scores;
//   out[bh, i] = [acc | psum] @ omap[h] (omap (H, orows, D), orows = D, or D + 1 with the value mean's row)
//                + sum_j pe_j v_j over the dense tokens.
// Returns 0, 1 for bad sizes, 2 when a score is not finite (out then undefined).
int trellis_attend_step_cpu(const uint8_t* kstream, int64_t kstream_stride, const uint8_t* kscale,
                            int64_t kscale_stride, const uint8_t* kks, const float* kcb, int kLB, int knb,
                            const uint8_t* vstream, int64_t vstream_stride, const uint8_t* vscale,
                            int64_t vscale_stride, const uint8_t* vks, const float* vcb, int vLB, int vnb,
                            const float* scale_tab, int64_t BH, int H, int64_t L, int nq, int D, const float* query,
                            const float* qmap, int qw, const float* omap, int orows, int bias_mode,
                            const float* tab, int64_t pos0, int tdim, float scaling, const float* sink_k,
                            const float* sink_v, int64_t sink_stride, int64_t Ls, const float* win_k,
                            const float* win_v, int64_t win_stride, int64_t Lw, float* out, int threads) {
  if (BH < 0 || H < 1 || BH % H || L < 0 || Ls < 0 || Lw < 0 || nq < 1 || L + Ls + Lw < 1) return 1;
  if (bias_mode < 0 || bias_mode > 2 || pos0 < 0 || (bias_mode == 2 && tdim < 1)) return 1;
  if (qw != D + (bias_mode == 1 ? 1 : bias_mode == 2 ? tdim : 0) || (orows != D && orows != D + 1)) return 1;
  if (sink_stride < Ls * D || win_stride < Lw * D) return 1;
  if (L > 0 && (tr_bad(D, kLB, knb, kks) || tr_bad(D, vLB, vnb, vks))) return 1;
  if (kstream_stride < L * knb || vstream_stride < L * vnb || kscale_stride < L || vscale_stride < L) return 1;
  const AttendStepArgs a{{{kstream, kstream_stride, kscale, kscale_stride, kks, kcb, kLB, knb},
                          {vstream, vstream_stride, vscale, vscale_stride, vks, vcb, vLB, vnb},
                          scale_tab, BH, L, nq, D, nullptr, bias_mode, nullptr, tab, pos0, tdim, scaling, nullptr, 0,
                          nullptr, nullptr, nullptr},
                         H, query, qmap, qw, omap, orows,
                         {{sink_k, sink_v, sink_stride, Ls}, {win_k, win_v, win_stride, Lw}},
                         out};
  std::vector<uint8_t> ok((size_t)BH, 1);
  split_rows(BH, threads, [&](int64_t lo, int64_t hi) {
    const FlushDenormals ftz;
    attend_step_rows(a, lo, hi, ok.data());
  });
  for (int64_t bh = 0; bh < BH; ++bh)
    if (!ok[(size_t)bh]) return 2;
  return 0;
}

}  // extern "C"
