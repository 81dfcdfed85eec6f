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
#include <cfloat>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fast_quant.h"
#include "kernels.h"
#include "parallel.h"

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
  pool_run((n + chunk - 1) / chunk, [&f, n, chunk](int64_t t) {  // the persistent workers of parallel.h
    const int64_t b = t * chunk;
    f(b, std::min(n, b + chunk));
  });
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

typedef double v4d __attribute__((vector_size(32)));
inline v4d ld4(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The modular codes' int64 words: F = 63 / width fields, field f of word w holds code w * F + f (codes < 2^width).
// For the usual widths the field positions are compile-time constants: independent shifts by immediates instead
// of a Horner chain of shifts by a register (the chain was a quarter of the encoder).
template <int WB>
struct Fields {
  static constexpr int F = 63 / WB;
  static uint64_t pack(const int32_t* c) {
    uint64_t w = 0;
    for (int f = 0; f < F; ++f) w |= (uint64_t)(uint32_t)c[f] << (f * WB);
    return w;
  }
  static void unpack(uint64_t w, int32_t* o, uint64_t mm) {
    for (int f = 0; f < F; ++f) o[f] = (int32_t)((w >> (f * WB)) & mm);
  }
};
template <>
struct Fields<0> {  // any width (F fields)
  static uint64_t pack(const int32_t* c, int F, int width) {
    uint64_t w = (uint32_t)c[F - 1];
    for (int f = F - 2; f >= 0; --f) w = (w << width) | (uint32_t)c[f];
    return w;
  }
};

// f(integral_constant<int, width>) for the widths with a specialised packer when fields == 63 / width, else
// f(integral_constant<int, 0>).
template <typename Fn>
void with_fields(int width, int fields, Fn&& f) {
  using std::integral_constant;
  if (fields == 63 / std::max(width, 1)) switch (width) {
      case 2: return f(integral_constant<int, 2>{});
      case 3: return f(integral_constant<int, 3>{});
      case 4: return f(integral_constant<int, 4>{});
      case 5: return f(integral_constant<int, 5>{});
      case 6: return f(integral_constant<int, 6>{});
      case 7: return f(integral_constant<int, 7>{});
      case 8: return f(integral_constant<int, 8>{});
      case 9: return f(integral_constant<int, 9>{});
      case 10: return f(integral_constant<int, 10>{});
      case 11: return f(integral_constant<int, 11>{});
      case 12: return f(integral_constant<int, 12>{});
      default: break;
    }
  return f(integral_constant<int, 0>{});
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

// Sum of squares of x (float32 -> float64, every square exact) in a fixed order, so the result depends on
// neither the number of threads nor the machine: segments of 2^16 values; in each, four lanes (value i goes
// to lane i mod 4) summed left to right, combined as (l0 + l1) + (l2 + l3); the segments summed left to
// right. coset.dist.codec.sum_squares computes the same order with torch.cumsum.
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
      double* lane[4] = {&a0, &a1, &a2, &a3};  // the tail keeps its lanes (as zero padding would)
      for (; i < e; ++i) *lane[(i - b) & 3] += (double)x[i] * (double)x[i];
      part[s] = (a0 + a1) + (a2 + a3);
    }
  });
  double s = 0.0;
  for (double p : part) s += p;
  return s;
}

// sum_squares of xe = x + resid (float32 add, as torch), fused with resid <- xe: one pass over the bucket.
double sum_squares_apply(const float* x, float* resid, int64_t n) {
  if (!resid) return sum_squares(x, n);
  constexpr int64_t kSeg = 1 << 16;
  const int64_t nseg = (n + kSeg - 1) / kSeg;
  std::vector<double> part(nseg, 0.0);
  parallel_for_aligned(nseg, 1, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t b = s * kSeg, e = std::min(n, b + kSeg);
      double a[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t i = b;
      for (; i + 4 <= e; i += 4) {
        for (int j = 0; j < 4; ++j) {
          const float v = x[i + j] + resid[i + j];
          resid[i + j] = v;
          a[j] += (double)v * (double)v;
        }
      }
      for (; i < e; ++i) {
        const float v = x[i] + resid[i];
        resid[i] = v;
        a[(i - b) & 3] += (double)v * (double)v;
      }
      part[s] = (a[0] + a[1]) + (a[2] + a[3]);
    }
  });
  double t = 0.0;
  for (double p : part) t += p;
  return t;
}

// Scratch buffers of the allgather encoder, kept between calls (a bucket's size repeats every step, and
// fresh pages would be faulted in and zeroed each time).
struct EncodeScratch {
  std::mutex mu;
  std::vector<float> xn;
  std::vector<uint8_t> b, T, cl;
};
EncodeScratch& encode_scratch() {
  static EncodeScratch s;
  return s;
}

}  // namespace

// -------------------------------------------------------------------------------------------- allgather
namespace {

int bit_length(uint64_t v) {
  int k = 0;
  while (v) {
    ++k;
    v >>= 1;
  }
  return k;
}

// Labels (N, M, d) uint8 -> the little-endian k-bit stream of pack_labels; blocks split on byte boundaries.
void pack_label_stream(const uint8_t* b, int64_t nb, int Md, int k, uint8_t* out) {
  parallel_for_aligned(nb, 8, kGrain, [&](int64_t lo, int64_t hi) {
    const uint8_t* src = b + lo * Md;
    const int64_t cnt = (hi - lo) * Md;
    uint8_t* dst = out + lo * Md * k / 8;
    if (k == 8) {
      std::memcpy(dst, src, (size_t)cnt);
    } else if (8 % k == 0) {  // k in {1, 2, 4}: 8 / k labels per byte
      const int per = 8 / k;
      const int64_t full = cnt / per;
      for (int64_t j = 0; j < full; ++j) {
        unsigned v = 0;
        for (int i = 0; i < per; ++i) v |= (unsigned)src[j * per + i] << (i * k);
        dst[j] = (uint8_t)v;
      }
      if (cnt % per) {
        unsigned v = 0;
        for (int64_t i = 0; i < cnt % per; ++i) v |= (unsigned)src[full * per + i] << (i * k);
        dst[full] = (uint8_t)v;
      }
    } else {
      BitWriter w(dst);
      for (int64_t j = 0; j < cnt; ++j) w.put(src[j], k);
      w.flush();
    }
  });
}

void write_word(uint8_t* p, float rho, uint32_t word) {
  std::memcpy(p, &rho, 4);
  std::memcpy(p + 4, &word, 4);
}

constexpr uint32_t kCodingZero = 0, kCodingDense = 1, kCodingSparse = 2;

}  // namespace

AllgatherLayout allgather_layout(int64_t n, int d, int M, int q, int max_T) {
  AllgatherLayout lay;
  lay.n_blocks = (n + d - 1) / d;
  lay.label_bytes = (lay.n_blocks * M * d * bits_of(q) + 7) / 8;
  lay.t_bytes = (lay.n_blocks * bit_length((uint64_t)max_T) + 7) / 8;
  lay.nbytes = lay.label_bytes + lay.t_bytes + 8;
  return lay;
}

AllgatherStats bucket_allgather_encode(const LatticeView& L, const QuantParams& P, const float* x, float* resid,
                                       int64_t n, uint8_t* payload) {
  const int d = L.d, M = P.M, k = bits_of(P.q), max_T = P.n_scales - 1;
  const AllgatherLayout lay = allgather_layout(n, d, M, P.q, max_T);
  const int64_t nb = lay.n_blocks;
  AllgatherStats st{1.0f, 0, 0, 0};
  uint8_t* header = payload + lay.label_bytes + lay.t_bytes;
  const double ss = sum_squares_apply(x, resid, n);
  const float* xe = resid ? resid : x;
  if (!std::isfinite(ss) || nb == 0) {  // float32 squares cannot overflow float64: only NaN/Inf get here
    st.nonfinite = nb > 0;
    std::memset(payload, 0, (size_t)(lay.label_bytes + lay.t_bytes));
    write_word(header, 1.0f, (uint32_t)st.nonfinite);
    return st;
  }
  float rho = (float)std::sqrt(ss / (double)n);
  if (!(rho > 0.0f)) rho = 1.0f;
  st.rho = rho;
  // the RMS-normalized, zero-padded float32 blocks, then coset.quant's encoder (kernels_cpu.cpp: the
  // certified float32 path where it applies, else the float64 kernels): the reference's codes of these floats
  EncodeScratch& sc = encode_scratch();
  std::lock_guard<std::mutex> lock(sc.mu);
  sc.xn.resize((size_t)(nb * d));
  sc.b.resize((size_t)(nb * M * d));
  sc.T.resize((size_t)nb);
  sc.cl.resize((size_t)nb);
  float* xn = sc.xn.data();
  const uint8_t* T = sc.T.data();
  const uint8_t* cl = sc.cl.data();
  parallel_for_aligned(nb * d, 64, kGrain * 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) xn[i] = i < n ? xe[i] / rho : 0.0f;
  });
  encode_cpu(L, P, xn, 0, nullptr, nb, sc.b.data(), sc.T.data(), sc.cl.data());
  pack_label_stream(sc.b.data(), nb, M * d, k, payload);
  // T with pack_codes' coding: the fewest bytes of zero / dense / sparse (ties to the earlier one)
  int tmax = 0;
  int64_t count = 0, clamped = 0;
  for (int64_t i = 0; i < nb; ++i) {
    tmax = T[i] > tmax ? T[i] : tmax;
    count += T[i] != 0;
    clamped += cl[i];
  }
  st.overloaded = count;
  st.clamped = clamped;
  uint8_t* ts = payload + lay.label_bytes;
  std::memset(ts, 0, (size_t)lay.t_bytes);
  uint32_t coding = kCodingZero, bits = 0;
  if (tmax > 0) {
    const int idx_bits = bit_length((uint64_t)(nb - 1)), val_bits = bit_length((uint64_t)(tmax - 1)),
              t_bits = bit_length((uint64_t)tmax);
    const int64_t dense_bytes = (nb * t_bits + 7) / 8;
    const int64_t sparse_bytes = (count * idx_bits + 7) / 8 + (count * val_bits + 7) / 8;
    if (dense_bytes <= sparse_bytes) {
      coding = kCodingDense;
      bits = (uint32_t)t_bits;
      parallel_for_aligned(nb, 8, kGrain, [&](int64_t lo, int64_t hi) {
        BitWriter w(ts + lo * t_bits / 8);
        for (int64_t i = lo; i < hi; ++i) w.put(T[i], t_bits);
        w.flush();
      });
    } else {
      coding = kCodingSparse;
      bits = (uint32_t)val_bits;
      BitWriter wi(ts), wv(ts + (count * idx_bits + 7) / 8);
      for (int64_t i = 0; i < nb; ++i) {
        if (!T[i]) continue;
        wi.put((uint64_t)i, idx_bits);
        if (val_bits) wv.put((uint64_t)(T[i] - 1), val_bits);
      }
      wi.flush();
      wv.flush();
    }
  }
  const uint32_t cnt = coding == kCodingSparse ? (uint32_t)count : 0u;
  write_word(header, rho, (coding << 1) | (bits << 3) | (cnt << 7));
  return st;
}

int bucket_allgather_decode(const LatticeView& L, const QuantParams& P, const uint8_t* payloads, int W, int own,
                            int64_t n, float* out, float* resid, const char** why) {
  const int d = L.d, M = P.M, q = P.q, k = bits_of(q), max_T = P.n_scales - 1;
  const AllgatherLayout lay = allgather_layout(n, d, M, q, max_T);
  const int64_t nb = lay.n_blocks, pb = lay.nbytes;
  *why = nullptr;
  std::vector<double> rhos(W);
  std::vector<uint8_t> Ts((size_t)(W * nb), 0);
  int flagged = 0;
  for (int r = 0; r < W; ++r) {  // headers and T sections first: a damaged payload writes nothing
    const uint8_t* p = payloads + r * pb;
    float rho;
    uint32_t word;
    std::memcpy(&rho, p + pb - 8, 4);
    std::memcpy(&word, p + pb - 4, 4);
    flagged |= (int)(word & 1);
    if (nb == 0) continue;
    if (!std::isfinite(rho) || !(rho > 0.0f)) return *why = "rho must be finite and > 0", -1;
    rhos[r] = (double)rho;
    const uint32_t coding = (word >> 1) & 3, bits = (word >> 3) & 15;
    const int64_t count = word >> 7;
    const uint8_t* ts = p + lay.label_bytes;
    uint8_t* T = &Ts[r * nb];
    if (coding == kCodingDense) {
      if (bits < 1 || bits > 8) return *why = "bad T width in the code word", -1;
      if ((nb * bits + 7) / 8 > lay.t_bytes) return *why = "the code word describes more T bytes than a payload holds", -1;
      BitReader rd(ts);
      for (int64_t i = 0; i < nb; ++i) {
        const int t = (int)rd.get((int)bits);
        if (t > max_T) return *why = "T exceeds max_scaling_iterations", -1;
        T[i] = (uint8_t)t;
      }
    } else if (coding == kCodingSparse) {
      const int ib = bit_length((uint64_t)(nb - 1));
      if (bits > 8 || count > nb) return *why = "bad sparse T fields in the code word", -1;
      const int64_t ibytes = (count * ib + 7) / 8, vbytes = (count * (int64_t)bits + 7) / 8;
      if (ibytes + vbytes > lay.t_bytes) return *why = "the code word describes more T bytes than a payload holds", -1;
      BitReader ri(ts), rv(ts + ibytes);
      int64_t prev = -1;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t i = ib ? (int64_t)ri.get(ib) : 0;
        const int t = (bits ? (int)rv.get((int)bits) : 0) + 1;
        if (i <= prev || i >= nb) return *why = "sparse T indices must increase and stay below the block count", -1;
        if (t > max_T) return *why = "T exceeds max_scaling_iterations", -1;
        T[i] = (uint8_t)t;
        prev = i;
      }
    } else if (coding != kCodingZero) {
      return *why = "bad T coding in the code word", -1;
    }
  }
  if (flagged) return 1;
  if (nb == 0) return 0;
  const RepTable* tab = k * d <= 16 ? rep_table(L, q) : nullptr;
  // labels >= q are possible only when q is not a power of two: validate them before writing anything
  if ((q & (q - 1)) != 0) {
    std::atomic<int> bad{0};
    parallel_for_aligned(nb, 8, kGrain, [&](int64_t lo, int64_t hi) {
      for (int r = 0; r < W; ++r) {
        BitReader rd(payloads + r * pb + lo * M * d * k / 8);
        for (int64_t j = 0; j < (hi - lo) * M * d; ++j)
          if ((int)rd.get(k) >= q) bad = 1;
      }
    });
    if (bad.load()) return *why = "a label >= q", -1;
  }
  const double inv_w = (W & (W - 1)) == 0 ? 1.0 / (double)W : 0.0;  // x / 2^j == x * 2^-j exactly
  dispatch(L.kind, d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    parallel_for_aligned(nb, 8, kGrain, [&](int64_t lo, int64_t hi) {
      std::vector<BitReader> rl;
      for (int r = 0; r < W; ++r) rl.emplace_back(payloads + r * pb + lo * M * d * k / 8);
      double acc[kMaxDim], y[kMaxDim], own_v[kMaxDim];
      uint8_t bl[kMaxM * kMaxDim];
      double wq[kMaxM];  // q^m, as decode_lattice_units accumulates it
      wq[0] = 1.0;
      for (int m = 1; m < M; ++m) wq[m] = wq[m - 1] * (double)q;
      const bool bytes = k * d == 8;  // one layer index per byte (D4 with q = 4): plain loads
      if constexpr (D == 4 || D == 8) {
        // the same float64 operations, element by element, on 4-double vectors (bit-identical: IEEE
        // arithmetic is per element and -ffp-contract=off forbids fused multiply-adds)
        if (tab) {
          constexpr int NV = D / 4;
          for (int64_t blk = lo; blk < hi; ++blk) {
            v4d acc[NV], ownv[NV];
            for (int v = 0; v < NV; ++v) acc[v] = v4d{} + 0.0, ownv[v] = acc[v];
            for (int r = 0; r < W; ++r) {
              const uint8_t* pb8 = payloads + r * pb + blk * M;
              v4d y[NV];
              for (int m = 0; m < M; ++m) {
                const double* a = &tab->rep[(bytes ? (uint64_t)pb8[m] : rl[r].get(k * d)) * d];
                for (int v = 0; v < NV; ++v) y[v] = m == 0 ? ld4(a + 4 * v) : y[v] + wq[m] * ld4(a + 4 * v);
              }
              const double s = P.scales[Ts[r * nb + blk]], rh = rhos[r];
              for (int v = 0; v < NV; ++v) {
                const v4d t = (y[v] * s) * rh;
                acc[v] = acc[v] + t;
                if (r == own) ownv[v] = t;
              }
            }
            const int64_t base = blk * d;
            for (int v = 0; v < NV; ++v) {
              const v4d o = inv_w != 0.0 ? acc[v] * inv_w : acc[v] / (double)W;  // div_q
              for (int l = 0; l < 4 && base + 4 * v + l < n; ++l) {
                out[base + 4 * v + l] = (float)o[l];
                if (resid && own >= 0) resid[base + 4 * v + l] = resid[base + 4 * v + l] - (float)ownv[v][l];
              }
            }
          }
          return;
        }
      }
      for (int64_t blk = lo; blk < hi; ++blk) {
        for (int i = 0; i < d; ++i) acc[i] = 0.0;
        for (int r = 0; r < W; ++r) {
          if (tab) {  // decode_lattice_units' per-layer summands, read from the table
            const uint8_t* pb8 = payloads + r * pb + blk * M;
            for (int m = 0; m < M; ++m) {
              const double* a = &tab->rep[(bytes ? (uint64_t)pb8[m] : rl[r].get(k * d)) * d];
              if (m == 0) {
                for (int i = 0; i < d; ++i) y[i] = a[i];
              } else {
                for (int i = 0; i < d; ++i) y[i] = y[i] + wq[m] * a[i];
              }
            }
          } else {
            for (int i = 0; i < M * d; ++i) bl[i] = (uint8_t)rl[r].get(k);
            decode_lattice_units<KIND, D>(L, q, M, bl, y);
          }
          const double s = P.scales[Ts[r * nb + blk]];
          for (int i = 0; i < d; ++i) {
            const double v = (y[i] * s) * rhos[r];  // decode(b, T) * rho, as coset.dist.codec.decode_payload
            acc[i] = acc[i] + v;
            if (r == own) own_v[i] = v;
          }
        }
        const int64_t base = blk * d;
        for (int i = 0; i < d && base + i < n; ++i) {
          out[base + i] = (float)div_q(acc[i], (double)W, inv_w);
          if (resid && own >= 0) resid[base + i] = resid[base + i] - (float)own_v[i];
        }
      }
    });
  });
  return 0;
}

// -------------------------------------------------------------------------------------------- modular
namespace {
typedef double v2d __attribute__((vector_size(16)));
typedef int64_t v2l __attribute__((vector_size(16)));

// max(0, max over blocks [b0, b1) of sum_i x_i^2) in float64, summed in coordinate order per block as the scalar
// loop does (0 + x_0^2 is x_0^2 exactly); two blocks per SSE2 vector (lanes = blocks), b1 - b0 even. bad |= a
// non-finite sum.
template <int D>
double max_sq_pairs(const float* xe, int64_t b0, int64_t b1, bool& bad) {
  v2d mx = {0.0, 0.0};
  v2l nf = {0, 0};
  for (int64_t blk = b0; blk < b1; blk += 2) {
    const float* p = xe + blk * D;
    v2d t = {(double)p[0], (double)p[D]};
    v2d s = t * t;
    for (int i = 1; i < D; ++i) {
      t = v2d{(double)p[i], (double)p[D + i]};
      s = s + t * t;
    }
    nf |= ~(s <= DBL_MAX);  // NaN compares false
    mx = s > mx ? s : mx;
  }
  bad = bad || nf[0] || nf[1];
  return mx[0] > mx[1] ? mx[0] : mx[1];
}
}  // namespace

int bucket_modular_norms(const float* x, float* resid, int64_t n, int d, int64_t bpc, double* norms) {
  // resid <- x + resid chunk by chunk, each chunk's norms read from L1 (a separate pass re-read 20 MB per 5M values)
  const int64_t nb = (n + d - 1) / d, nc = (nb + bpc - 1) / bpc;
  std::atomic<int> nonfinite{0};
  parallel_for_aligned(nc, 1, std::max<int64_t>(1, kGrain / bpc), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      double mx = 0.0;
      const int64_t b1 = std::min(nb, (c + 1) * bpc);
      if (resid)  // float32, as torch; the chunk is then read back from L1
        for (int64_t j = c * bpc * d, j1 = std::min(n, b1 * d); j < j1; ++j) resid[j] = x[j] + resid[j];
      const float* xe = resid ? resid : x;
      int64_t blk = c * bpc;
      // whole pairs of whole blocks: the vector loop (d = 4, 8); the rest below
      const int64_t bw = blk + ((std::min(b1, n / d) - blk) & ~int64_t(1));
      if ((d == 4 || d == 8) && bw > blk) {
        bool bad = false;
        const double m = d == 4 ? max_sq_pairs<4>(xe, blk, bw, bad) : max_sq_pairs<8>(xe, blk, bw, bad);
        if (bad) nonfinite = 1;
        mx = m > mx ? m : mx;
        blk = bw;
      }
      for (; blk < b1; ++blk) {
        double s = 0.0;
        for (int i = 0; i < d; ++i) {
          const int64_t j = blk * d + i;
          const double v = j < n ? (double)xe[j] : 0.0;
          s = s + v * v;
        }
        if (!std::isfinite(s)) nonfinite = 1;
        mx = s > mx ? s : mx;
      }
      // one sqrt per chunk: a correctly rounded sqrt is monotone, so sqrt(max s) == max sqrt(s) exactly
      norms[c] = std::sqrt(mx);
    }
  });
  return nonfinite.load();
}

// Groups of F blocks are packed into d words (or d bytes); threads take contiguous ranges of groups and work
// through them in spans of kSpan groups: the codes of a span's whole blocks come from the float32 + integer path
// of fast_quant.h where it applies (8 blocks per pass, bit for bit the float64 kernels; blocks it cannot
// certify, and the zero-padded last block, go through closest_point below), then the span is packed.
constexpr int64_t kSpan = 512;

void bucket_modular_encode(const LatticeView& L, int64_t modulus, const float* xe, float* resid, int64_t n,
                           const double* scales, int64_t bpc, int kind, int width, int fields, void* packed) {
  const int d = L.d;
  const int64_t nb = (n + d - 1) / d, nfull = n / d;
  const int F = kind == 0 ? 1 : fields;  // blocks per group: a group's F*d codes fill exactly d words
  const int64_t ngroups = (nb + F - 1) / F;
  const int64_t n_words = (nb * d + F - 1) / F;
  const fq::ModularPlan plan = fq::modular_plan(L, modulus);
  dispatch(L.kind, d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    parallel_for_aligned(ngroups, 1, std::max<int64_t>(1, kGrain / F), [&](int64_t lo, int64_t hi) {
      double g[kMaxDim], lam[kMaxDim];
      std::vector<int32_t> codes((size_t)(kSpan * F * d));  // codes < q^M <= 2^16 (QuantizationConfig: q <= 16, M <= 4)
      std::vector<int64_t> rej;
      // the float64 kernels for one block: its codes at c, its residual
      auto exact_block = [&](int64_t blk, int32_t* c) {
        const double s = scales[blk / bpc];
        const int64_t base = blk * d;
        for (int i = 0; i < d; ++i) g[i] = (base + i < n ? (double)xe[base + i] : 0.0) / s;
        closest_point<KIND, D>(L, g, lam);
        for (int i = 0; i < d; ++i) {
          const double cb = basis_coord<KIND>(L, lam, d, i);
          c[i] = (int32_t)remainder_q(cb, (int)modulus);  // hnlq_core.h (a mask for 2^k: no idiv)
          if (base + i < n && resid) resid[base + i] = resid[base + i] - (float)(lam[i] * s);
        }
      };
      for (int64_t g0 = lo; g0 < hi; g0 += kSpan) {
        const int64_t g1 = std::min(hi, g0 + kSpan), b0 = g0 * F, b1 = std::min(nb, g1 * F);
        int32_t* cs = codes.data();
        std::fill(cs + (b1 - b0) * d, cs + (g1 - g0) * F * d, 0);  // blocks past nb (last group): zero codes
        rej.clear();
        const int64_t fe = plan.ok ? std::min(b1, nfull) : b0;
        if (fe > b0) fq::modular_encode_f32(plan, L, xe, resid, scales, bpc, b0, fe, cs, rej);
        for (int64_t blk = std::max(b0, fe); blk < b1; ++blk) rej.push_back(blk);
        for (int64_t blk : rej) exact_block(blk, cs + (blk - b0) * d);
        for (int64_t grp = g0; grp < g1; ++grp) {
          const int32_t* cg = cs + (grp - g0) * F * d;
          if (kind == 0) {
            uint8_t* o = static_cast<uint8_t*>(packed) + grp * d;
            for (int i = 0; i < d; ++i) o[i] = (uint8_t)cg[i];
          } else {
            // the buffer holds ceil(nb d / F) words (pack_sum_fields): the last group may have fewer
            int64_t* o = static_cast<int64_t*>(packed) + grp * d;
            const int nw = (int)std::min<int64_t>(d, n_words - grp * d);
            with_fields(width, F, [&](auto WB) {
              constexpr int wb = decltype(WB)::value;
              for (int w = 0; w < nw; ++w) {
                if constexpr (wb == 0)
                  o[w] = (int64_t)Fields<0>::pack(cg + w * F, F, width);
                else
                  o[w] = (int64_t)Fields<wb>::pack(cg + w * F);
              }
            });
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
  const bool pow2 = (modulus & (modulus - 1)) == 0;
  const int64_t mmask = modulus - 1;
  const double inv_w = (W & (W - 1)) == 0 ? 1.0 / (double)W : 0.0;  // x / 2^j == x * 2^-j exactly
  const fq::ModularPlan plan = fq::modular_plan(L, modulus);
  dispatch(L.kind, d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    parallel_for_aligned(ngroups, 1, std::max<int64_t>(1, kGrain / F), [&](int64_t lo, int64_t hi) {
      double Gc[kMaxDim], v[kMaxDim], Qv[kMaxDim];
      std::vector<int32_t> codes((size_t)(kSpan * F * d));  // codes mod q^M <= 2^16
      // local copies: the int32 code stores could alias the captured ints, which were then reloaded per code
      const int nf = F, wd = width;
      const uint64_t mm = (uint64_t)mmask, fm = (uint64_t)mask;
      std::vector<int64_t> rej;
      for (int64_t g0 = lo; g0 < hi; g0 += kSpan) {
        const int64_t g1 = std::min(hi, g0 + kSpan), b0 = g0 * F, b1 = std::min(nb, g1 * F);
        int32_t* cs = codes.data();
        // codes mod q^M (a mask when q^M is a power of two: an integer division per code costs more than the
        // rest of the decoder; the fields are at least log2(modulus) bits wide)
        if (kind == 0) {
          for (int64_t grp = g0; grp < g1; ++grp) {
            int32_t* cg = cs + (grp - g0) * d;
            const uint8_t* p = static_cast<const uint8_t*>(packed) + grp * d;
            for (int i = 0; i < d; ++i) cg[i] = (int32_t)(pow2 ? (int64_t)(p[i] & mmask) : (int64_t)p[i] % modulus);
          }
        } else {
          with_fields(pow2 ? wd : 0, nf, [&](auto WB) {
            constexpr int wb = decltype(WB)::value;
            for (int64_t grp = g0; grp < g1; ++grp) {
              int32_t* cg = cs + (grp - g0) * nf * d;
              const int64_t* p = static_cast<const int64_t*>(packed) + grp * d;
              for (int w = 0; w < d; ++w) {
                const uint64_t word = grp * d + w < n_words ? (uint64_t)p[w] : 0;
                int32_t* o = cg + w * nf;
                uint64_t rest = word;
                if constexpr (wb > 0)
                  Fields<wb>::unpack(word, o, mm);
                else if (pow2)
                  for (int f = 0; f < nf; ++f, rest >>= wd) o[f] = (int32_t)(rest & mm);
                else
                  for (int f = 0; f < nf; ++f, rest >>= wd) o[f] = (int32_t)((int64_t)(rest & fm) % modulus);
              }
            }
          });
        }
        rej.clear();
        if (plan.ok)
          fq::modular_decode_f32(plan, L, cs, scales, bpc, W, b0, b1, n, out, rej);
        else
          for (int64_t blk = b0; blk < b1; ++blk) rej.push_back(blk);
        for (int64_t blk : rej) {  // the float64 kernels
          const int32_t* c = cs + (blk - b0) * d;
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
            out[base + i] = (float)div_q(lam * sc, (double)W, inv_w);
          }
        }
      }
    });
  });
}

}  // namespace coset
