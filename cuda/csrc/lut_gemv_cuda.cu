// lut_gemv_cuda.cu - GEMV on HNLQ codes on the GPU: the CUDA twin of lut_gemv.cpp (y = W x, 1..8 queries).
//
// One warp per row: lane l adds blocks k = l, l + 32, ... with the __host__ __device__ block functions of
// lut_gemv.h (lane_codebook / lane_tables), then a __shfl_xor_sync butterfly adds the 32 lane sums in the fixed
// tree of lut::lane_tree. The CPU runs the same functions in the same order in lut_gemv_core_cpu, which the tests
// compare bit for bit with the torch spelling of that order (coset.cuda.lut_gemv.gemv_reference); nothing here
// has been run on a GPU (none was available), it is correct by construction through that shared code.
// Codes stream coalesced (consecutive lanes read consecutive blocks); the int8 codebook sits in shared memory
// when it fits (D4 q<=8, E8 q=2: <= 16 KiB), else it is read through the read-only cache (E8 q=4: 512 KiB); the
// queries (B x k floats) and the one-sided tables are read through L1/L2.
// Built with --fmad=false like every kernel here: no FMA may change a rounding of the shared order.
#include <cuda_runtime.h>

#include <cstdint>

#include "lut_gemv.h"

namespace coset {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block
constexpr int kThreads = kRowsPerBlock * lut::kWarp;
constexpr int64_t kSharedCodebook = 16 * 1024;  // bytes

template <int B>
__device__ __forceinline__ void warp_sum_store(float* a, int lane, float* out_row) {
  // butterfly: after step h lane i holds the tree's partial i mod h (float + is commutative bit for bit)
  for (int h = lut::kWarp / 2; h >= 1; h /= 2)
    for (int j = 0; j < B; ++j) a[j] = a[j] + __shfl_xor_sync(0xffffffffu, a[j], h);
  if (lane == 0)
    for (int j = 0; j < B; ++j) out_row[j] = a[j];
}

template <typename IdxT, int D, int B>
__global__ void __launch_bounds__(kThreads) gemv_codebook_kernel(const IdxT* __restrict__ idx,
                                                                 const uint8_t* __restrict__ T,
                                                                 const float* __restrict__ scale_of,
                                                                 const float* __restrict__ sx,
                                                                 const int8_t* __restrict__ A, int64_t A_bytes,
                                                                 const float* __restrict__ x, int64_t ldx, int64_t n,
                                                                 int K, int M, int q, float* __restrict__ out,
                                                                 const float* __restrict__ hc) {
  extern __shared__ int8_t sA[];
  const int8_t* tab = A;
  if (A_bytes <= kSharedCodebook) {  // block-uniform branch: every thread reaches the barrier
    for (int64_t i = threadIdx.x; i < A_bytes; i += blockDim.x) sA[i] = A[i];
    __syncthreads();
    tab = sA;
  }
  const int lane = threadIdx.x % lut::kWarp;
  const int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / lut::kWarp;
  if (r >= n) return;  // warp-uniform: the shuffles below see full warps
  float a[B];
  for (int j = 0; j < B; ++j) a[j] = 0.0f;
  lut::lane_codebook<IdxT, D, B>(idx + r * K * M, T ? T + r * K : nullptr, scale_of, sx ? sx + r * K : nullptr, tab, x,
                                 ldx, K, M, q, lane, a, hc);
  warp_sum_store<B>(a, lane, out + r * B);
}

template <typename IdxT, int B>
__global__ void __launch_bounds__(kThreads) gemv_tables_kernel(const IdxT* __restrict__ idx,
                                                               const uint8_t* __restrict__ T,
                                                               const float* __restrict__ scale_of,
                                                               const float* __restrict__ sx,
                                                               const float* __restrict__ tab, int64_t Q, int64_t n,
                                                               int K, int M, int q, float* __restrict__ out) {
  const int lane = threadIdx.x % lut::kWarp;
  const int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / lut::kWarp;
  if (r >= n) return;
  float a[B];
  for (int j = 0; j < B; ++j) a[j] = 0.0f;
  lut::lane_tables<IdxT, B>(idx + r * K * M, T ? T + r * K : nullptr, scale_of, sx ? sx + r * K : nullptr, tab, Q, K,
                            M, (float)q, lane, a);
  warp_sum_store<B>(a, lane, out + r * B);
}

// tab[k][i][j] = table_entry(A_i, x_j + k d): one thread per entry
__global__ void build_tables_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ A, int B,
                                    int64_t K, int d, int64_t Q, float* __restrict__ tab) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= K * Q * B) return;
  const int j = (int)(t % B);
  const int64_t i = (t / B) % Q, k = t / (B * Q);
  tab[t] = lut::table_entry(A + i * d, x + j * ldx + k * d, d);
}

unsigned grid_rows(int64_t n) { return (unsigned)((n + kRowsPerBlock - 1) / kRowsPerBlock); }

template <typename IdxT, int B>
int launch(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx, const int8_t* A, int d,
           const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t n, int K, int M, int q, float* out,
           cudaStream_t st, const float* hc) {
  if (A == nullptr) {
    gemv_tables_kernel<IdxT, B><<<grid_rows(n), kThreads, 0, st>>>(idx, T, scale_of, sx, tab, Q, n, K, M, q, out);
  } else {
    const int64_t bytes = Q * d;
    const size_t shmem = bytes <= kSharedCodebook ? (size_t)bytes : 0;
    if (d == 4)
      gemv_codebook_kernel<IdxT, 4, B><<<grid_rows(n), kThreads, shmem, st>>>(idx, T, scale_of, sx, A, bytes, x, ldx,
                                                                             n, K, M, q, out, hc);
    else
      gemv_codebook_kernel<IdxT, 8, B><<<grid_rows(n), kThreads, shmem, st>>>(idx, T, scale_of, sx, A, bytes, x, ldx,
                                                                             n, K, M, q, out, hc);
  }
  return (int)cudaGetLastError();
}

template <typename IdxT>
int launch_B(const IdxT* idx, const uint8_t* T, const float* scale_of, const float* sx, const int8_t* A, int d,
             const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t n, int K, int M, int q, int B,
             float* out, cudaStream_t st, const float* hc) {
  switch (B) {
    case 1: return launch<IdxT, 1>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, n, K, M, q, out, st, hc);
    case 2: return launch<IdxT, 2>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, n, K, M, q, out, st, hc);
    case 4: return launch<IdxT, 4>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, n, K, M, q, out, st, hc);
    case 8: return launch<IdxT, 8>(idx, T, scale_of, sx, A, d, x, ldx, tab, Q, n, K, M, q, out, st, hc);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

int lut_build_tables_cuda(const float* x, int64_t ldx, const float* A, int B, int K, int d, int64_t Q, float* tab,
                          void* stream) {
  const int64_t total = (int64_t)K * Q * B;
  if (total <= 0) return 0;
  const int threads = 256;
  build_tables_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
      x, ldx, A, B, K, d, Q, tab);
  return (int)cudaGetLastError();
}

int lut_gemv_cuda(const void* idx, int idx_bytes, const uint8_t* T, const float* scale_of, const float* sx,
                  const int8_t* A, int d, const float* x, int64_t ldx, const float* tab, int64_t Q, int64_t n, int K,
                  int M, int q, int B, float* out, void* stream, const float* hc) {
  if (n <= 0) return 0;
  if (A != nullptr && d != 4 && d != 8) return (int)cudaErrorInvalidValue;
  cudaStream_t st = (cudaStream_t)stream;
  if (idx_bytes == 1)
    return launch_B((const uint8_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, n, K, M, q, B, out, st, hc);
  if (idx_bytes == 2)
    return launch_B((const int16_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, n, K, M, q, B, out, st, hc);
  return launch_B((const int32_t*)idx, T, scale_of, sx, A, d, x, ldx, tab, Q, n, K, M, q, B, out, st, hc);
}

}  // namespace coset
