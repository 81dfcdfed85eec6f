// hnlq_core.h - per-vector HNLQ logic shared by the C++ CPU kernels and the CUDA kernels.
//
// Every function is COSET_HD (= __host__ __device__ under nvcc) and works on float64 exactly like the
// PyTorch reference in coset.quant (encode.py / decode.py) and coset.lattice (zn.py, dn.py, e8.py):
//   * closest point of (x + eps) with the lattice's fixed tie offset eps (passed in, never recomputed);
//   * Z^n: floor(x + 0.5); D_n: Conway & Sloane with the FIRST maximal |delta| index; E8: D8 vs D8 + 1/2,
//     squared distances accumulated left to right, D8 wins ties (d0 <= d1);
//   * labels = fmod(round(G_inv lam), q) (G_inv is dyadic, so the products and sums are exact);
//   * u = x / scales[t] with the scale table from Python (no pow), dither added after the division;
//   * the clamp radius and the left-to-right norm of the reference.
// The build uses -ffp-contract=off (host) and --fmad=false (device) so that no FMA changes a rounding.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define COSET_HD __host__ __device__ __forceinline__
#else
#define COSET_HD inline
#endif

namespace coset {

constexpr int kMaxDim = 16;
constexpr int kMaxM = 4;

enum LatticeKind : int { kZn = 0, kDn = 1, kE8 = 2 };

// Lattice constants as seen by a kernel. G and Ginv are (d, d) row-major float64 (G has the basis as
// columns, as in coset.lattice); eps is (d,) or nullptr when the tie offset is disabled.
struct LatticeView {
  int kind;
  int d;
  const double* G;
  const double* Ginv;
  const double* eps;
};

struct QuantParams {
  int q;
  int M;
  int n_scales;          // len(config.scales) = max_scaling_iterations + 1
  const double* scales;  // config.scales
  int single_pass;       // disable_overload_protection: one pass with T = 0, labels kept even if overloaded
  int policy_error;      // overload_policy == "error": report instead of clamping
  double safe_radius;    // _safe_radius(lattice, q, M, dithered)
};

// ------------------------------------------------------------------------------------------ integer helpers
constexpr double kTwo53 = 9007199254740992.0;

// fmod(v, 2) != 0 for an integral double v: every double >= 2^53 in magnitude is even.
COSET_HD bool is_odd(double v) {
  const bool small = fabs(v) < kTwo53;
  return small & (bool)(((int64_t)(small ? v : 0.0)) & 1);
}

// torch.remainder(c, q) for an integral double c (q > 0): integer arithmetic where exact, else fmod.
COSET_HD double remainder_q(double c, int q) {
  if (fabs(c) < kTwo53) {
    if ((q & (q - 1)) == 0) return (double)(((int64_t)c) & (q - 1));  // two's complement: the floor mod
    int64_t r = ((int64_t)c) % q;
    if (r < 0) r += q;
    return (double)r;
  }
  double r = fmod(c, (double)q);
  if (r != 0.0 && r < 0.0) r += (double)q;
  return r;
}

// lam / q: when q is a power of two, lam * (1/q) is the same IEEE result (exact scaling), and faster.
COSET_HD double div_q(double v, double qd, double inv_q) { return inv_q != 0.0 ? v * inv_q : v / qd; }

COSET_HD double pow2_inverse(int q) { return (q & (q - 1)) == 0 ? 1.0 / (double)q : 0.0; }

// ------------------------------------------------------------------------------------------ closest point
template <int D>
COSET_HD int dim_of(const LatticeView& L) { return D > 0 ? D : L.d; }

// Q_{D_n} on x (already offset); y may not alias x.
template <int D>
COSET_HD void cp_dn(const double* x, double* y, int d_rt) {
  const int d = D > 0 ? D : d_rt;
  double sum = 0.0;
  double best = -1.0;
  int k = 0;
  for (int i = 0; i < d; ++i) {
    const double f = floor(x[i] + 0.5);
    y[i] = f;
    sum += f;
    const double a = fabs(x[i] - f);
    const bool gt = a > best;  // strict: the first maximal index, like torch.argmax (branch-free select)
    best = gt ? a : best;
    k = gt ? i : k;
  }
  if (is_odd(sum)) {
    const double dk = x[k] - y[k];
    y[k] = y[k] + (dk >= 0.0 ? 1.0 : -1.0);
  }
}

// Q_L(x + eps) for the lattice kind KIND; x is not modified, y receives the lattice point.
template <int KIND, int D>
COSET_HD void closest_point(const LatticeView& L, const double* xin, double* y) {
  const int d = dim_of<D>(L);
  double x[kMaxDim];
  if (L.eps) {
    for (int i = 0; i < d; ++i) x[i] = xin[i] + L.eps[i];
  } else {
    for (int i = 0; i < d; ++i) x[i] = xin[i];
  }
  if (KIND == kZn) {
    for (int i = 0; i < d; ++i) y[i] = floor(x[i] + 0.5);
  } else if (KIND == kDn) {
    cp_dn<D>(x, y, d);
  } else {  // E8
    double y0[8], y1[8], xm[8];
    cp_dn<8>(x, y0, 8);
    for (int i = 0; i < 8; ++i) xm[i] = x[i] - 0.5;
    cp_dn<8>(xm, y1, 8);
    for (int i = 0; i < 8; ++i) y1[i] = y1[i] + 0.5;
    double e = x[0] - y0[0];
    double d0 = e * e;
    for (int i = 1; i < 8; ++i) {
      e = x[i] - y0[i];
      d0 = d0 + e * e;
    }
    e = x[0] - y1[0];
    double d1 = e * e;
    for (int i = 1; i < 8; ++i) {
      e = x[i] - y1[i];
      d1 = d1 + e * e;
    }
    const bool take0 = d0 <= d1;
    for (int i = 0; i < 8; ++i) y[i] = take0 ? y0[i] : y1[i];
  }
}

// ------------------------------------------------------------------------------------------ encode
// Coordinate i of the lattice point lam in the basis: rint((G^-1 lam)_i), summed left to right (exact: G^-1 is
// dyadic), or lam_i itself on Z^n. The labels are these coordinates mod q.
template <int KIND>
COSET_HD double basis_coord(const LatticeView& L, const double* lam, int d, int i) {
  if (KIND == kZn) return lam[i];
  double s = L.Ginv[i * d] * lam[0];
  for (int j = 1; j < d; ++j) s = s + L.Ginv[i * d + j] * lam[j];
  return rint(s);
}

// Algorithm 1 on g (lattice units, float64). Writes M*d labels (as uint8, only if LABELS) and returns true
// on overload. lam0 (optional) receives lambda_0 = Q(g).
template <int KIND, int D, bool LABELS = true>
COSET_HD bool encode_layers(const LatticeView& L, int q, int M, const double* gin, uint8_t* b,
                            double* lam0 = nullptr) {
  const int d = dim_of<D>(L);
  const double qd = (double)q;
  const double inv_q = pow2_inverse(q);
  double g[kMaxDim], lam[kMaxDim];
  for (int i = 0; i < d; ++i) g[i] = gin[i];
  for (int m = 0; m < M; ++m) {
    closest_point<KIND, D>(L, g, lam);
    if (LABELS) {
      for (int i = 0; i < d; ++i) b[m * d + i] = (uint8_t)remainder_q(basis_coord<KIND>(L, lam, d, i), q);
    }
    if (m == 0 && lam0)
      for (int i = 0; i < d; ++i) lam0[i] = lam[i];
    for (int i = 0; i < d; ++i) g[i] = div_q(lam[i], qd, inv_q);
  }
  closest_point<KIND, D>(L, g, lam);
  bool ovl = false;
  for (int i = 0; i < d; ++i) ovl |= (lam[i] != 0.0);
  return ovl;
}

// Euclidean norm, accumulated left to right like the reference (_core._seq_norm). Above 2^500 the vector
// is first divided by the power of two of its largest entry (exact), so no square overflows: 1e200 has a
// finite norm. Below, the plain formula (the numbers of every existing test are unchanged).
COSET_HD double seq_norm(const double* u, int d) {
  double m = 0.0;
  for (int i = 0; i < d; ++i) m = fmax(m, fabs(u[i]));
  double e = 1.0;
  if (m > 0x1p500) {
    int ex = 0;
    frexp(m, &ex);
    e = ldexp(1.0, ex);
  }
  double v0 = u[0] / e;
  double sq = v0 * v0;
  for (int i = 1; i < d; ++i) {
    const double v = u[i] / e;
    sq = sq + v * v;
  }
  return sqrt(sq) * e;
}

// Result flags of one vector.
struct EncodeResult {
  uint8_t T;
  bool clamped;
  bool error;     // still overloaded at the cap with overload_policy "error"
  bool overload;  // the returned encoding overloads (only possible with single_pass, i.e. no protection)
};

// The whole overload ramp for one vector: x (d doubles), z dither (d doubles or nullptr).
// LABELS = false skips the labels (quantize's fast path) and only returns lambda_0 in lam0.
template <int KIND, int D, bool LABELS = true>
COSET_HD EncodeResult encode_vector(const LatticeView& L, const QuantParams& P, const double* x, const double* z,
                                    uint8_t* b, double* lam0 = nullptr) {
  const int d = dim_of<D>(L);
  EncodeResult res{0, false, false, false};
  double u[kMaxDim], g[kMaxDim];
  const int steps = P.single_pass ? 1 : P.n_scales;
  for (int t = 0; t < steps; ++t) {
    const double s = P.scales[t];
    for (int i = 0; i < d; ++i) {
      u[i] = x[i] / s;
      g[i] = z ? u[i] + z[i] : u[i];
    }
    const bool ovl = encode_layers<KIND, D, LABELS>(L, P.q, P.M, g, b, lam0);
    if (P.single_pass || !ovl) {
      res.T = (uint8_t)t;
      res.overload = ovl;
      return res;
    }
  }
  // still overloaded at the largest scale t = steps - 1 (u holds x / scales[cap])
  res.T = (uint8_t)(steps - 1);
  if (P.policy_error) {
    res.error = true;
    return res;
  }
  res.clamped = true;
  if (P.safe_radius > 0.0) {
    const double nrm = seq_norm(u, d);
    double factor = P.safe_radius / nrm;
    if (factor > 1.0) factor = 1.0;
    for (int i = 0; i < d; ++i) u[i] = u[i] * factor;
  } else {
    for (int i = 0; i < d; ++i) u[i] = 0.0;
  }
  for (int i = 0; i < d; ++i) g[i] = z ? u[i] + z[i] : u[i];
  if (encode_layers<KIND, D, LABELS>(L, P.q, P.M, g, b, lam0)) {
    // cannot happen by the sandwich bound; encode the origin (plus dither) like the reference
    for (int i = 0; i < d; ++i) g[i] = z ? z[i] : 0.0;
    res.overload = encode_layers<KIND, D, LABELS>(L, P.q, P.M, g, b, lam0);
  }
  return res;
}

// ------------------------------------------------------------------------------------------ decode
// Algorithm 2 without scaling: sum_m q^m (G b_m - q Q(G b_m / q)), exact in float64. out: d doubles.
template <int KIND, int D>
COSET_HD void decode_lattice_units(const LatticeView& L, int q, int M, const uint8_t* b, double* out) {
  const int d = dim_of<D>(L);
  const double qd = (double)q;
  const double inv_q = pow2_inverse(q);
  double Gb[kMaxDim], v[kMaxDim], Qv[kMaxDim];
  double w = 1.0;
  for (int m = 0; m < M; ++m) {
    const uint8_t* bm = b + m * d;
    for (int i = 0; i < d; ++i) {
      if (KIND == kZn) {
        Gb[i] = (double)bm[i];
      } else {
        double s = L.G[i * d] * (double)bm[0];
        for (int j = 1; j < d; ++j) s = s + L.G[i * d + j] * (double)bm[j];
        Gb[i] = s;
      }
      v[i] = div_q(Gb[i], qd, inv_q);
    }
    closest_point<KIND, D>(L, v, Qv);
    for (int i = 0; i < d; ++i) {
      const double a = Gb[i] - qd * Qv[i];
      out[i] = (m == 0) ? a : out[i] + w * a;
    }
    w *= qd;
  }
}

// Reconstruction of one vector: (point - z) * scales[T], in float64.
template <int KIND, int D>
COSET_HD void decode_vector(const LatticeView& L, const QuantParams& P, const uint8_t* b, int T, const double* z,
                            double* out) {
  const int d = dim_of<D>(L);
  decode_lattice_units<KIND, D>(L, P.q, P.M, b, out);
  const double s = P.scales[T];
  for (int i = 0; i < d; ++i) {
    const double y = z ? out[i] - z[i] : out[i];
    out[i] = y * s;
  }
}

// Fused encode + decode of one vector, without labels on the fast path. By the telescoping identity
// (paper.md §3) decode(encode(x)) = lambda_0 - q^M lambda_M, so with no overload (lambda_M = 0) the decoded
// lattice point is lambda_0 exactly: the reference's decoder sums exact integers (or halves) that add up to
// lambda_0, because Q(. + eps) is translation-equivariant on the points it meets. Only an overloaded
// encoding (possible with disable_overload_protection) or a lattice without the tie offset takes the label
// path, which repeats the reference decoder step by step.
template <int KIND, int D>
COSET_HD EncodeResult quantize_vector(const LatticeView& L, const QuantParams& P, const double* x, const double* z,
                                      double* out) {
  const int d = dim_of<D>(L);
  double lam0[kMaxDim];
  EncodeResult res{0, false, false, true};
  if (L.eps) res = encode_vector<KIND, D, false>(L, P, x, z, nullptr, lam0);
  if (res.overload) {  // (or no tie offset: then equivariance fails at ties and only the label path is exact)
    uint8_t bl[kMaxM * kMaxDim];
    res = encode_vector<KIND, D, true>(L, P, x, z, bl, nullptr);
    decode_vector<KIND, D>(L, P, bl, res.T, z, out);
    return res;
  }
  const double s = P.scales[res.T];
  for (int i = 0; i < d; ++i) {
    const double y = z ? lam0[i] - z[i] : lam0[i];
    out[i] = y * s;
  }
  return res;
}

// ------------------------------------------------------------------------------------------ LUT sums
// Two-sided: sum_k sx[k] sy[k] * sum_{m,l} q^(m+l) lut[ix[k,m], iy[k,l]]; the inner sum is exact (int64,
// a superset of the agreed int32, so it cannot overflow for q = 16, M = 4).
template <typename LutT, typename Acc>
COSET_HD Acc lut_two_sided_pair(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy,
                                const LutT* lut, int K, int M, int64_t Q, int q) {
  Acc acc = 0;
  for (int k = 0; k < K; ++k) {
    const int32_t* ik = ix + (int64_t)k * M;
    const int32_t* jk = iy + (int64_t)k * M;
    int64_t inner = 0;
    int64_t wm = 1;
    for (int m = 0; m < M; ++m) {
      const LutT* row = lut + (int64_t)ik[m] * Q;
      int64_t s = 0, wl = 1;
      for (int l = 0; l < M; ++l) {
        s += wl * (int64_t)row[jk[l]];
        wl *= q;
      }
      inner += wm * s;
      wm *= q;
    }
    acc += ((Acc)sx[k] * (Acc)sy[k]) * (Acc)inner;
  }
  return acc;
}

}  // namespace coset
