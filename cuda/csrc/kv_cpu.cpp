// kv_cpu.cpp - CPU kernels of the coset.kv attention over HNLQ-coded keys and values (see kv_scores.h).
//
// Plain C ABI on raw pointers (contiguous float32 / uint8 buffers, shapes as ints) so that the file builds on
// its own (g++ -O3 -shared -fPIC kv_cpu.cpp, loaded with ctypes by coset.kv.native.load_library) and links
// into the coset.cuda._C pybind11 module unchanged. Shapes (BH = batch * kv_heads, L tokens, K blocks,
// M layers, n queries per KV head):
//   idx (BH, L, K, M) uint8, tpack (BH, L, tb) uint8 (tb = ceil(K t_bits / 8) packed T bytes per vector),
//   rho (BH, L) float32 (the per-vector scales), steps (2^t_bits) float32, tab (BH, K, 256, n), cy (BH, K, n),
//   p (BH, n, L), a (256, 8), c (8)
//   kv_scores_cpu -> out (BH, n, L);  kv_values_cpu -> out (BH, n, K*8)
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "kv_scores.h"

namespace {

template <typename F>
void parallel_for(int64_t total, int threads, F fn) {
  threads = std::max(1, std::min<int>(threads, (int)std::min<int64_t>(total, 64)));
  if (threads == 1) {
    fn(0, total, 0);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t step = (total + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t lo = t * step, hi = std::min(total, lo + step);
    if (lo >= hi) break;
    pool.emplace_back(fn, lo, hi, t);
  }
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for bad sizes (the Python side validates shapes; this is a last guard).
int kv_scores_cpu(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                  const float* tab, const float* cy, float* out, int64_t BH, int64_t L, int K, int M, int n,
                  int threads) {
  if (BH < 0 || L < 0 || K < 1 || M < 1 || M > coset_kv::kMaxM || n < 1) return 1;
  if (t_bits != 0 && t_bits != 1 && t_bits != 2 && t_bits != 4) return 1;
  const int tb = (K * t_bits + 7) / 8;
  // work item = (bh, token): each writes its own n outputs
  parallel_for(BH * L, threads, [=](int64_t lo, int64_t hi, int) {
    std::vector<float> acc(n);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t bh = r / L, t = r % L;
      std::fill(acc.begin(), acc.end(), 0.f);
      coset_kv::score_token(idx + r * K * M, tpack + r * tb, t_bits, rho[r], steps,
                            tab + bh * K * coset_kv::kTable * n, cy + bh * K * n, K, M, n, acc.data());
      float* o = out + bh * n * L + t;
      for (int i = 0; i < n; ++i) o[(int64_t)i * L] = acc[i];
    }
  });
  return 0;
}

int kv_values_cpu(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                  const float* p, const float* a, const float* c, float* out, int64_t BH, int64_t L, int K, int M,
                  int n, int threads) {
  if (BH < 0 || L < 0 || K < 1 || M < 1 || M > coset_kv::kMaxM || n < 1) return 1;
  if (t_bits != 0 && t_bits != 1 && t_bits != 2 && t_bits != 4) return 1;
  const int tb = (K * t_bits + 7) / 8;
  const int D = K * coset_kv::kBlock;
  std::fill(out, out + BH * n * D, 0.f);
  // work item = (bh, token chunk); partial sums per thread, reduced at the end (deterministic order)
  const int64_t chunk = 256;
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int nt = std::max(1, std::min<int>(threads, (int)std::max<int64_t>(1, BH * nchunks)));
  std::vector<float> part((size_t)nt * BH * n * D, 0.f);
  parallel_for(BH * nchunks, nt, [=, &part](int64_t lo, int64_t hi, int tid) {
    float* mine = part.data() + (size_t)tid * BH * n * D;
    float v[coset_kv::kBlock];
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t bh = r / nchunks, t0 = (r % nchunks) * chunk, t1 = std::min(L, t0 + chunk);
      float* o = mine + bh * n * D;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r2 = bh * L + t;
        const uint8_t* it = idx + r2 * K * M;
        for (int k = 0; k < K; ++k) {
          const float wk = coset_kv::block_factor(tpack + r2 * tb, t_bits, k, rho[r2], steps);
          coset_kv::decode_block(it + k * M, wk, a, c, M, v);
          for (int i = 0; i < n; ++i) {
            const float pi = p[(bh * n + i) * L + t];
            float* oi = o + (int64_t)i * D + k * coset_kv::kBlock;
            for (int d = 0; d < coset_kv::kBlock; ++d) oi[d] += pi * v[d];
          }
        }
      }
    }
  });
  for (int t = 0; t < nt; ++t) {
    const float* src = part.data() + (size_t)t * BH * n * D;
    for (int64_t e = 0; e < BH * n * D; ++e) out[e] += src[e];
  }
  return 0;
}

}  // extern "C"
