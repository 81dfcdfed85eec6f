// bucket_codec.cpp - the DDP bucket codec of coset.dist in one native call per bucket (see bucket_codec.h).
//
// The per-vector maths is hnlq_core.h (encode_vector, closest_point): the same float64 operations in the same
// order as the PyTorch reference, so payloads are bit-identical to coset.dist.codec's. Decoding uses a table
// of the per-layer coset representatives G b - q Q(G b / q) (Algorithm 2's summand), indexed by the layer's
// packed label bits: the reference computes exactly these float64 numbers per layer, so the sum over layers is
// bit-identical too, and costs M table reads per block instead of M matrix products and closest points.
// Threads: contiguous ranges of blocks whose bit offsets are byte (or int64 word) aligned; every reduction
// (the RMS) is summed in fixed segments, so results never depend on the number of threads.
#include "bucket_codec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace coset {
namespace {

// f(begin, end) over [0, n) in chunks of a multiple of `align` items, on up to get_num_threads() threads.
template <typename F>
void parallel_for_aligned(int64_t n, int64_t align, int64_t grain, F&& f) {
  if (n <= 0) return;
  int64_t nt = std::min<int64_t>(get_num_threads(), (n + grain - 1) / grain);
  if (nt <= 1) {
    f((int64_t)0, n);
    return;
  }
  int64_t chunk = (n + nt - 1) / nt;
  chunk = (chunk + align - 1) / align * align;
  std::vector<std::thread> pool;
  for (int64_t b = chunk; b < n; b += chunk) {
    const int64_t e = std::min(n, b + chunk);
    pool.emplace_back([&f, b, e] { f(b, e); });
  }
  f((int64_t)0, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

template <typename F>
void dispatch(int kind, int d, F&& f) {
  using std::integral_constant;
  if (kind == kDn && d == 4) return f(integral_constant<int, kDn>{}, integral_constant<int, 4>{});
  if (kind == kDn && d == 8) return f(integral_constant<int, kDn>{}, integral_constant<int, 8>{});
  if (kind == kE8) return f(integral_constant<int, kE8>{}, integral_constant<int, 8>{});
  if (kind == kZn && d == 4) return f(integral_constant<int, kZn>{}, integral_constant<int, 4>{});
  if (kind == kZn && d == 8) return f(integral_constant<int, kZn>{}, integral_constant<int, 8>{});
  if (kind == kDn) return f(integral_constant<int, kDn>{}, integral_constant<int, 0>{});
  return f(integral_constant<int, kZn>{}, integral_constant<int, 0>{});
}

int bits_of(int64_t q) {
  int k = 0;
  while ((int64_t(1) << k) < q) ++k;
  return k;
}

constexpr int64_t kGrain = 16384;  // blocks per thread at least

// Little-endian bit stream writer/reader starting at a byte boundary.
struct BitWriter {
  uint8_t* p;
  uint64_t acc = 0;
  int nbits = 0;
  explicit BitWriter(uint8_t* dst) : p(dst) {}
  inline void put(uint64_t v, int k) {
    acc |= v << nbits;
    nbits += k;
    while (nbits >= 8) {
      *p++ = (uint8_t)acc;
      acc >>= 8;
      nbits -= 8;
    }
  }
  inline void flush() {
    if (nbits > 0) *p++ = (uint8_t)acc;
    acc = 0;
    nbits = 0;
  }
};

struct BitReader {
  const uint8_t* p;
  uint64_t acc = 0;
  int nbits = 0;
  explicit BitReader(const uint8_t* src) : p(src) {}
  inline uint64_t get(int k) {  // k <= 56
    while (nbits < k) {
      acc |= (uint64_t)(*p++) << nbits;
      nbits += 8;
    }
    const uint64_t v = acc & ((uint64_t(1) << k) - 1);
    acc >>= k;
    nbits -= k;
    return v;
  }
};

// ---------------------------------------------------------------------------------------- representatives
// rep[idx * d + i] = (G b - q Q(G b / q))_i for the labels b packed in idx (label j at bits [j k, (j+1) k)).
struct RepTable {
  std::vector<double> rep;
  std::vector<uint8_t> valid;  // all labels < q
};

const RepTable* rep_table(const LatticeView& L, int q) {
  const int k = bits_of(q), d = L.d;
  if (k * d > 16) return nullptr;  // table too large: decode block by block instead
  using Key = std::tuple<int, int, int, std::vector<double>, std::vector<double>, bool>;
  static std::mutex mu;
  static std::map<Key, RepTable> cache;
  std::vector<double> G(L.G, L.G + d * d), eps;
  if (L.eps) eps.assign(L.eps, L.eps + d);
  Key key{L.kind, d, q, G, eps, L.eps != nullptr};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return &it->second;
  RepTable t;
  const int64_t size = int64_t(1) << (k * d);
  t.rep.assign(size * d, 0.0);
  t.valid.assign(size, 0);
  dispatch(L.kind, d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    uint8_t b[kMaxDim];
    for (int64_t idx = 0; idx < size; ++idx) {
      bool ok = true;
      for (int j = 0; j < d; ++j) {
        b[j] = (uint8_t)((idx >> (k * j)) & ((1 << k) - 1));
        ok &= b[j] < q;
      }
      t.valid[idx] = ok;
      if (ok) decode_lattice_units<KIND, D>(L, q, 1, b, &t.rep[idx * d]);
    }
  });
  return &cache.emplace(key, std::move(t)).first->second;
}

// T = 0 fast path of Algorithm 1 for one block g = x / scales[0] (float64, lattice units): lambda_0 = Q(g)
// by one closest-point search, then per layer b_m = G^{-1} lambda_m mod q and
// lambda_{m+1} = (lambda_m - rep[b_m]) / q, which equals Q(lambda_m / q) exactly (rep[b] = G b - q Q(G b / q)
// and Q(. + eps) is translation-equivariant on these dyadic points); the block overloads iff lambda_M != 0.
// Writes the M layer indices (packed label bits) and returns false on overload (the caller then runs the
// full ramp of hnlq_core.h, which gives the same labels for T = 0 and handles T > 0 and the clamp).
template <int KIND, int D>
inline bool fast_layers(const LatticeView& L, const QuantParams& P, const RepTable& tab, const double* g, int k,
                        uint64_t* idx_out) {
  const int d = D > 0 ? D : L.d;
  const double inv_q = pow2_inverse(P.q), qd = (double)P.q;
  double lam[kMaxDim];
  closest_point<KIND, D>(L, g, lam);
  for (int m = 0; m < P.M; ++m) {
    uint64_t idx = 0;
    for (int i = 0; i < d; ++i) idx |= (uint64_t)remainder_q(basis_coord<KIND>(L, lam, d, i), P.q) << (k * i);
    idx_out[m] = idx;
    const double* rep = &tab.rep[idx * d];
    for (int i = 0; i < d; ++i) lam[i] = div_q(lam[i] - rep[i], qd, inv_q);
  }
  bool zero = true;
  for (int i = 0; i < d; ++i) zero &= lam[i] == 0.0;
  return zero;
}

// Sum of squares of x (float32 -> float64) in fixed segments, so the result does not depend on threads.
double sum_squares(const float* x, int64_t n) {
  constexpr int64_t kSeg = 1 << 16;
  const int64_t nseg = (n + kSeg - 1) / kSeg;
  std::vector<double> part(nseg, 0.0);
  parallel_for_aligned(nseg, 1, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t b = s * kSeg, e = std::min(n, b + kSeg);
      double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      int64_t i = b;
      for (; i + 4 <= e; i += 4) {
        const double v0 = x[i], v1 = x[i + 1], v2 = x[i + 2], v3 = x[i + 3];
        a0 += v0 * v0;
        a1 += v1 * v1;
        a2 += v2 * v2;
        a3 += v3 * v3;
      }
      for (; i < e; ++i) a0 += (double)x[i] * (double)x[i];
      part[s] = (a0 + a1) + (a2 + a3);
    }
  });
  double s = 0.0;
  for (double p : part) s += p;
  return s;
}

// resid <- x + resid (float32, as torch); returns the effective input pointer.
const float* apply_residual(const float* x, float* resid, int64_t n) {
  if (!resid) return x;
  parallel_for_aligned(n, 64, kGrain * 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) resid[i] = x[i] + resid[i];
  });
  return resid;
}

}  // namespace

// -------------------------------------------------------------------------------------------- modular
int bucket_modular_norms(const float* x, float* resid, int64_t n, int d, int64_t bpc, double* norms) {
  const float* xe = apply_residual(x, resid, n);
  const int64_t nb = (n + d - 1) / d, nc = (nb + bpc - 1) / bpc;
  std::atomic<int> nonfinite{0};
  parallel_for_aligned(nc, 1, std::max<int64_t>(1, kGrain / bpc), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      double mx = 0.0;
      const int64_t b1 = std::min(nb, (c + 1) * bpc);
      for (int64_t blk = c * bpc; blk < b1; ++blk) {
        double s = 0.0;
        for (int i = 0; i < d; ++i) {
          const int64_t j = blk * d + i;
          const double v = j < n ? (double)xe[j] : 0.0;
          s = s + v * v;
        }
        if (!std::isfinite(s)) nonfinite = 1;
        const double nr = std::sqrt(s);
        mx = nr > mx ? nr : mx;
      }
      norms[c] = mx;
    }
  });
  return nonfinite.load();
}

void bucket_modular_encode(const LatticeView& L, int64_t modulus, const float* xe, float* resid, int64_t n,
                           const double* scales, int64_t bpc, int kind, int width, int fields, void* packed) {
  const int d = L.d;
  const int64_t nb = (n + d - 1) / d;
  const int F = kind == 0 ? 1 : fields;  // blocks per group: a group's F*d codes fill exactly d words
  const int64_t ngroups = (nb + F - 1) / F;
  const int64_t n_words = (nb * d + F - 1) / F;
  dispatch(L.kind, d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    parallel_for_aligned(ngroups, 1, std::max<int64_t>(1, kGrain / F), [&](int64_t lo, int64_t hi) {
      double g[kMaxDim], lam[kMaxDim];
      std::vector<int64_t> codes((size_t)F * d);
      for (int64_t grp = lo; grp < hi; ++grp) {
        for (int f = 0; f < F; ++f) {
          const int64_t blk = grp * F + f;
          if (blk >= nb) {
            for (int i = 0; i < d; ++i) codes[f * d + i] = 0;
            continue;
          }
          const double s = scales[blk / bpc];
          const int64_t base = blk * d;
          for (int i = 0; i < d; ++i) g[i] = (base + i < n ? (double)xe[base + i] : 0.0) / s;
          closest_point<KIND, D>(L, g, lam);
          for (int i = 0; i < d; ++i) {
            const double c = basis_coord<KIND>(L, lam, d, i);
            int64_t ci = (int64_t)c % modulus;
            if (ci < 0) ci += modulus;
            codes[f * d + i] = ci;
            if (base + i < n && resid) resid[base + i] = resid[base + i] - (float)(lam[i] * s);
          }
        }
        if (kind == 0) {
          uint8_t* o = static_cast<uint8_t*>(packed) + grp * d;
          for (int i = 0; i < d; ++i) o[i] = (uint8_t)codes[i];
        } else {
          // the buffer holds ceil(nb d / F) words (pack_sum_fields): the last group may have fewer
          int64_t* o = static_cast<int64_t*>(packed) + grp * d;
          for (int w = 0; w < d && grp * d + w < n_words; ++w) {
            int64_t word = 0;
            for (int f = 0; f < F; ++f) word += codes[w * F + f] << (f * width);
            o[w] = word;
          }
        }
      }
    });
  });
}

void bucket_modular_decode(const LatticeView& L, int64_t modulus, const void* packed, int64_t n,
                           const double* scales, int64_t bpc, int kind, int width, int fields, int W, float* out) {
  const int d = L.d;
  const int64_t nb = (n + d - 1) / d;
  const int F = kind == 0 ? 1 : fields;
  const int64_t ngroups = (nb + F - 1) / F;
  const int64_t n_words = (nb * d + F - 1) / F;
  const double md = (double)modulus;
  const double inv_m = (modulus & (modulus - 1)) == 0 ? 1.0 / md : 0.0;
  const int64_t mask = width >= 63 ? -1 : ((int64_t(1) << width) - 1);
  dispatch(L.kind, d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    parallel_for_aligned(ngroups, 1, std::max<int64_t>(1, kGrain / F), [&](int64_t lo, int64_t hi) {
      double Gc[kMaxDim], v[kMaxDim], Qv[kMaxDim];
      std::vector<int64_t> codes((size_t)F * d);
      for (int64_t grp = lo; grp < hi; ++grp) {
        if (kind == 0) {
          const uint8_t* p = static_cast<const uint8_t*>(packed) + grp * d;
          for (int i = 0; i < d; ++i) codes[i] = (int64_t)p[i] % modulus;
        } else {
          const int64_t* p = static_cast<const int64_t*>(packed) + grp * d;
          for (int w = 0; w < d; ++w)
            for (int f = 0; f < F; ++f) {
              const int64_t word = grp * d + w < n_words ? p[w] : 0;
              int64_t c = ((word >> (f * width)) & mask) % modulus;
              codes[w * F + f] = c < 0 ? c + modulus : c;
            }
        }
        for (int f = 0; f < F; ++f) {
          const int64_t blk = grp * F + f;
          if (blk >= nb) break;
          const int64_t* c = &codes[f * d];
          for (int i = 0; i < d; ++i) {
            double s = L.G[i * d] * (double)c[0];
            for (int j = 1; j < d; ++j) s = s + L.G[i * d + j] * (double)c[j];
            Gc[i] = s;
            v[i] = div_q(s, md, inv_m);
          }
          closest_point<KIND, D>(L, v, Qv);
          const double sc = scales[blk / bpc];
          const int64_t base = blk * d;
          for (int i = 0; i < d && base + i < n; ++i) {
            const double lam = Gc[i] - md * Qv[i];
            out[base + i] = (float)((lam * sc) / (double)W);
          }
        }
      }
    });
  });
}

}  // namespace coset
