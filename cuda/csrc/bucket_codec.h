// bucket_codec.h - one native call per DDP gradient bucket for coset.dist (CPU, multi-threaded).
//
// The wire formats, bit-exact with the Python codec in coset.dist.codec:
//   * modular: flat codes G^{-1} lam mod q^M of lam = Q_L(x / s_chunk), packed one per uint8 or in int64 words
//     of `fields` guard-bit fields of `width` bits (pack_sum_fields); decode = from_flat_code(sum) * s / W.
// Error feedback is fused: `resid` (float32, n) holds the residual on entry; encode replaces it by the
// corrected gradient x + resid (float32 add, as torch does), encode then leaves xe - (float)x_hat.
#pragma once
#include <cstdint>

#include "hnlq_core.h"

namespace coset {

// Allgather payload of one rank (coset.dist.codec.encode_payload's bytes):
//   [labels: pack_labels' k-bit stream of (n_blocks, M, d) | T section: pack_codes' T tensors (zero, dense or
//    sparse coding), zero-filled to t_bytes | rho (float32) | code word (uint32: flag | coding << 1 |
//    bits << 3 | sparse count << 7)].
// The bucket x (+ resid) is divided by its float32 RMS rho (sum of squares in the fixed order of
// sum_squares) in float32 and encoded by encode_cpu, i.e. exactly coset.quant.encode of those floats.
struct AllgatherLayout {
  int64_t n_blocks, label_bytes, t_bytes, nbytes;
};
AllgatherLayout allgather_layout(int64_t n, int d, int M, int q, int max_T);

struct AllgatherStats {
  float rho;
  int nonfinite;
  int64_t overloaded, clamped;  // blocks with T > 0, blocks clamped at the cap
};

// resid (if given) <- x + resid; payload (allgather_layout(...).nbytes) written.
AllgatherStats bucket_allgather_encode(const LatticeView& L, const QuantParams& P, const float* x, float* resid,
                                       int64_t n, uint8_t* payload);

// out = float(sum_r decode(payload_r) / W) in rank order; resid (if own >= 0) <- resid - float(decode(own)).
// Returns 0, 1 if some rank set the non-finite flag (nothing written), -1 for a damaged payload (nothing
// written; *why says what).
int bucket_allgather_decode(const LatticeView& L, const QuantParams& P, const uint8_t* payloads, int W, int own,
                            int64_t n, float* out, float* resid, const char** why);

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
