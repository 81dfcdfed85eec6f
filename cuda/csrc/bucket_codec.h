// bucket_codec.h - one native call per DDP gradient bucket for coset.dist (CPU, multi-threaded).
//
// Two wire formats, bit-exact with the Python codec in coset.dist.codec:
//   * allgather payload: [labels bit-packed at ceil(log2 q) bits | T bit-packed at t_bits | rho f32 | flag f32]
//     (encode_payload / decode_payload); decode averages the W payloads in rank order, in float64.
//   * modular: flat codes G^{-1} lam mod q^M of lam = Q_L(x / s_chunk), packed one per uint8 or in int64 words
//     of `fields` guard-bit fields of `width` bits (pack_sum_fields); decode = from_flat_code(sum) * s / W.
// Error feedback is fused: `resid` (float32, n) holds the residual on entry; encode replaces it by the
// corrected gradient x + resid (float32 add, as torch does), decode replaces that by x - (float)x_hat_own.
#pragma once
#include <cstdint>

#include "hnlq_core.h"

namespace coset {

struct BucketEncodeStats {
  double rho;            // allgather: the RMS used (1.0 for an all-zero or non-finite bucket)
  int nonfinite;         // the bucket held NaN/Inf (nothing encoded; labels and T are zero)
  int64_t overloaded;    // blocks with T > 0
  int64_t clamped;       // blocks clamped past the ramp
};

// Allgather encode of x (n float32) with optional fused error feedback (resid may be nullptr).
// rho_in > 0 forces the RMS (tests); otherwise it is computed in float64. payload: label_bytes + t_bytes + 8.
BucketEncodeStats bucket_encode_allgather(const LatticeView& L, const QuantParams& P, const float* x, float* resid,
                                          int64_t n, double rho_in, int t_bits, uint8_t* payload);

// Decode W payloads (payload_bytes each, contiguous, rank order) into out (n float32) = float(sum_r x_r / W).
// own >= 0 and resid != nullptr: resid <- resid - (float)x_own (resid holds x + old residual from encode).
// Returns 1 if some payload carries the non-finite flag (then out and resid are untouched), -1 if some label
// or T is out of range (corrupt payload; nothing written), else 0.
int bucket_decode_allgather(const LatticeView& L, const QuantParams& P, const uint8_t* payloads,
                            int64_t payload_bytes, int W, int own, int64_t n, int t_bits, float* out, float* resid);

// Modular, step 1: resid <- x + resid (if resid), norms[c] = largest block norm of chunk c (bpc blocks).
// Returns 1 if the bucket holds NaN/Inf.
int bucket_modular_norms(const float* x, float* resid, int64_t n, int d, int64_t bpc, double* norms);

// Modular, step 2: codes of lam = Q_L(xe / s_c) packed into `packed` (kind 0: uint8 per code; kind 1: int64
// words of `fields` fields of `width` bits); resid (holding xe) <- xe - (float)(lam * s_c).
void bucket_modular_encode(const LatticeView& L, int64_t modulus, const float* xe, float* resid, int64_t n,
                           const double* scales, int64_t bpc, int kind, int width, int fields, void* packed);

// Modular, step 3: out = float((from_flat_code(sum mod modulus) * s_c) / W).
void bucket_modular_decode(const LatticeView& L, int64_t modulus, const void* packed, int64_t n,
                           const double* scales, int64_t bpc, int kind, int width, int fields, int W, float* out);

}  // namespace coset
