// bucket_codec.h - one native call per DDP gradient bucket for coset.dist (CPU, multi-threaded).
//
// The modular mode's wire format, bit-exact with the Python codec in coset.dist.codec (the allgather payload
// stores T with coset.quant.pack_codes' coding and is written by the Python codec):
//   * modular: flat codes G^{-1} lam mod q^M of lam = Q_L(x / s_chunk), packed one per uint8 or in int64 words
//     of `fields` guard-bit fields of `width` bits (pack_sum_fields); decode = from_flat_code(sum) * s / W.
// Error feedback is fused: `resid` (float32, n) holds the residual on entry; encode replaces it by the
// corrected gradient x + resid (float32 add, as torch does), encode then leaves xe - (float)x_hat.
#pragma once
#include <cstdint>

#include "hnlq_core.h"

namespace coset {

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
