// kv_cpu.cpp - CPU kernels of the coset.kv attention over HNLQ-coded keys and values (see kv_scores.h).
//
// Plain C ABI on raw pointers (contiguous float32 / uint8 buffers, shapes as ints), bound in the coset.cuda._C
// pybind11 module (bindings.cpp) and wrapped with validation in coset/cuda/kv.py. Shapes (BH = batch * kv_heads, L tokens, K blocks,
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

// Values are accumulated from the codes without decoding a vector: with w[t,k] the block factor,
//   out[i, 8k:8k+8] = sum_j a[j] h[k][j][i] - c s[k][i],
//   h[k][j][i] = sum_{t, m: idx[t,k,m] = j} 2^m p[i,t] w[t,k],   s[k][i] = sum_t p[i,t] w[t,k],
// so a token costs K*M scattered adds of n floats (not K*(8M + 8n) flops of decode + accumulate), and the
// (256 x 8) table product is done once per call.
int kv_values_cpu(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                  const float* p, const float* a, const float* c, float* out, int64_t BH, int64_t L, int K, int M,
                  int n, int threads) {
  if (BH < 0 || L < 0 || K < 1 || M < 1 || M > coset_kv::kMaxM || n < 1) return 1;
  if (t_bits != 0 && t_bits != 1 && t_bits != 2 && t_bits != 4) return 1;
  const int tb = (K * t_bits + 7) / 8;
  const int D = K * coset_kv::kBlock;
  const int64_t hsz = (int64_t)K * (coset_kv::kTable + 1) * n;  // h[k][j][i] for j < 256, s[k][i] at j = 256
  std::fill(out, out + BH * n * D, 0.f);
  const int64_t chunk = 256;
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int nt = std::max(1, std::min<int>(threads, (int)std::max<int64_t>(1, BH * nchunks)));
  std::vector<float> part((size_t)nt * BH * hsz, 0.f);  // per-thread histograms, reduced in a fixed order
  parallel_for(BH * nchunks, nt, [=, &part](int64_t lo, int64_t hi, int tid) {
    float* mine = part.data() + (size_t)tid * BH * hsz;
    std::vector<float> pw(n);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t bh = r / nchunks, t0 = (r % nchunks) * chunk, t1 = std::min(L, t0 + chunk);
      float* h = mine + bh * hsz;
      const float* pb = p + bh * n * L;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r2 = bh * L + t;
        const uint8_t* it = idx + r2 * K * M;
        for (int k = 0; k < K; ++k) {
          const float wk = coset_kv::block_factor(tpack + r2 * tb, t_bits, k, rho[r2], steps);
          float* hk = h + (int64_t)k * (coset_kv::kTable + 1) * n;
          for (int i = 0; i < n; ++i) pw[i] = pb[(int64_t)i * L + t] * wk;
          float lw = 1.f;
          for (int m = 0; m < M; ++m) {
            float* hj = hk + (int64_t)it[k * M + m] * n;
            for (int i = 0; i < n; ++i) hj[i] += lw * pw[i];
            lw *= 2.f;
          }
          float* sk = hk + (int64_t)coset_kv::kTable * n;
          for (int i = 0; i < n; ++i) sk[i] += pw[i];
        }
      }
    }
  });
  for (int t = 1; t < nt; ++t) {
    const float* src = part.data() + (size_t)t * BH * hsz;
    float* dst = part.data();
    for (int64_t e = 0; e < BH * hsz; ++e) dst[e] += src[e];
  }
  for (int64_t bh = 0; bh < BH; ++bh) {
    const float* h = part.data() + bh * hsz;
    for (int k = 0; k < K; ++k) {
      const float* hk = h + (int64_t)k * (coset_kv::kTable + 1) * n;
      for (int i = 0; i < n; ++i) {
        float acc[coset_kv::kBlock] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < coset_kv::kTable; ++j) {
          const float hv = hk[(int64_t)j * n + i];
          if (hv == 0.f) continue;  // most labels do not occur at small L
          const float* aj = a + j * coset_kv::kBlock;
          for (int d = 0; d < coset_kv::kBlock; ++d) acc[d] += hv * aj[d];
        }
        const float sv = hk[(int64_t)coset_kv::kTable * n + i];
        float* o = out + (bh * n + i) * D + k * coset_kv::kBlock;
        for (int d = 0; d < coset_kv::kBlock; ++d) o[d] = acc[d] - sv * c[d];
      }
    }
  }
  return 0;
}

}  // extern "C"
