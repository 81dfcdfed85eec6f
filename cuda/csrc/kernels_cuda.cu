// kernels_cuda.cu - CUDA kernels: one thread per vector around the __host__ __device__ logic of hnlq_core.h.
//
// * The small constants (G, G_inv, eps, the scale table) travel by value in the kernel parameters and are
//   copied to shared memory once per block.
// * Vector tiles are staged through shared memory so that global loads and stores are coalesced (a thread
//   owns a row of d elements, which would otherwise be a strided access).
// * Built with --fmad=false: the float64 arithmetic is the same as the CPU kernels and the PyTorch reference.
// * Two-sided LUT kernel: one thread per output element; the LUT goes to shared memory when it fits. (The
//   one-sided op runs on the GEMV kernel of lut_gemv_cuda.cu.)
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fast_quant.h"
#include "kernels.h"

namespace coset {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxScales = 65;

struct DevConsts {
  int kind, d, has_eps;
  int q, M, n_scales, single_pass, policy_error;
  double safe_radius;
  double G[kMaxDim * kMaxDim];
  double Ginv[kMaxDim * kMaxDim];
  double eps[kMaxDim];
  double scales[kMaxScales];
};

DevConsts pack(const LatticeView& L, const QuantParams& P) {
  DevConsts c{};
  c.kind = L.kind;
  c.d = L.d;
  c.has_eps = L.eps != nullptr;
  c.q = P.q;
  c.M = P.M;
  c.n_scales = P.n_scales;
  c.single_pass = P.single_pass;
  c.policy_error = P.policy_error;
  c.safe_radius = P.safe_radius;
  for (int i = 0; i < L.d * L.d; ++i) {
    c.G[i] = L.G[i];
    c.Ginv[i] = L.Ginv[i];
  }
  for (int i = 0; i < L.d; ++i) c.eps[i] = L.eps ? L.eps[i] : 0.0;
  for (int i = 0; i < P.n_scales && i < kMaxScales; ++i) c.scales[i] = P.scales[i];
  return c;
}

// Copy the constants to shared memory and build the views the core functions take.
__device__ void load_consts(const DevConsts& c, DevConsts& s, LatticeView& L, QuantParams& P) {
  const double* src = reinterpret_cast<const double*>(&c);
  double* dst = reinterpret_cast<double*>(&s);
  constexpr int n = (int)(sizeof(DevConsts) / sizeof(double));
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  __syncthreads();
  L = LatticeView{s.kind, s.d, s.G, s.Ginv, s.has_eps ? s.eps : nullptr};
  P = QuantParams{s.q, s.M, s.n_scales, s.scales, s.single_pass, s.policy_error, s.safe_radius};
}

// Coalesced load of a tile of rows [row0, row0 + blockDim) x d into shared memory (as double).
template <typename In>
__device__ void load_tile(const In* __restrict__ x, int64_t N, int d, int64_t row0, double* tile) {
  const int64_t base = row0 * d;
  const int64_t total = N * (int64_t)d;
  for (int i = threadIdx.x; i < blockDim.x * d; i += blockDim.x) {
    const int64_t g = base + i;
    tile[i] = g < total ? (double)x[g] : 0.0;
  }
  __syncthreads();
}

template <typename Out>
__device__ void store_tile(Out* __restrict__ out, int64_t N, int d, int64_t row0, const double* tile) {
  __syncthreads();
  const int64_t base = row0 * d;
  const int64_t total = N * (int64_t)d;
  for (int i = threadIdx.x; i < blockDim.x * d; i += blockDim.x) {
    const int64_t g = base + i;
    if (g < total) out[g] = (Out)tile[i];
  }
}

template <int KIND, int D, typename In>
__global__ void __launch_bounds__(kThreads) encode_kernel(const DevConsts c, const In* __restrict__ x,
                                                          const double* __restrict__ z, int64_t N,
                                                          uint8_t* __restrict__ b, uint8_t* __restrict__ T,
                                                          uint8_t* __restrict__ clamped, int32_t* errors) {
  __shared__ DevConsts sc;
  __shared__ double tile[kThreads * kMaxDim];
  LatticeView L;
  QuantParams P;
  load_consts(c, sc, L, P);
  const int d = L.d;
  const int64_t row0 = (int64_t)blockIdx.x * blockDim.x;
  load_tile(x, N, d, row0, tile);
  const int64_t r = row0 + threadIdx.x;
  if (r < N) {
    uint8_t bl[kMaxM * kMaxDim];
    EncodeResult res = encode_vector<KIND, D>(L, P, tile + threadIdx.x * d, z ? z + r * d : nullptr, bl);
    const int Md = P.M * d;
    for (int i = 0; i < Md; ++i) b[r * Md + i] = bl[i];
    T[r] = res.T;
    clamped[r] = res.clamped;
    if (res.error) atomicAdd(errors, 1);
  }
}

template <int KIND, int D, typename Out>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DevConsts c, const uint8_t* __restrict__ b,
                                                          const uint8_t* __restrict__ T,
                                                          const double* __restrict__ z, int64_t N,
                                                          Out* __restrict__ out, int32_t* bad) {
  __shared__ DevConsts sc;
  __shared__ double tile[kThreads * kMaxDim];
  LatticeView L;
  QuantParams P;
  load_consts(c, sc, L, P);
  const int d = L.d;
  const int64_t row0 = (int64_t)blockIdx.x * blockDim.x;
  const int64_t r = row0 + threadIdx.x;
  if (r < N) {
    const int Md = P.M * d;
    uint8_t bl[kMaxM * kMaxDim];
    const int t = T[r];
    bool ok = t < P.n_scales;
    for (int i = 0; i < Md; ++i) {
      bl[i] = b[r * Md + i];
      ok &= bl[i] < P.q;
    }
    if (ok) {
      decode_vector<KIND, D>(L, P, bl, t, z ? z + r * d : nullptr, tile + threadIdx.x * d);
    } else {
      for (int i = 0; i < d; ++i) tile[threadIdx.x * d + i] = 0.0;
      atomicAdd(bad, 1);
    }
  }
  store_tile(out, N, d, row0, tile);
}

template <int KIND, int D, typename In, typename Out>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const DevConsts c, const In* __restrict__ x,
                                                            const double* __restrict__ z, int64_t N,
                                                            Out* __restrict__ out, uint8_t* __restrict__ T,
                                                            uint8_t* __restrict__ clamped, int32_t* errors) {
  __shared__ DevConsts sc;
  __shared__ double tile[kThreads * kMaxDim];
  LatticeView L;
  QuantParams P;
  load_consts(c, sc, L, P);
  const int d = L.d;
  const int64_t row0 = (int64_t)blockIdx.x * blockDim.x;
  load_tile(x, N, d, row0, tile);
  const int64_t r = row0 + threadIdx.x;
  if (r < N) {
    double xv[kMaxDim];
    double* row = tile + threadIdx.x * d;
    for (int i = 0; i < d; ++i) xv[i] = row[i];
    const double* zr = z ? z + r * d : nullptr;
    EncodeResult res = quantize_vector<KIND, D>(L, P, xv, zr, row);  // labels never leave the thread
    if (T) T[r] = res.T;
    if (clamped) clamped[r] = res.clamped;
    if (res.error) atomicAdd(errors, 1);
  }
  store_tile(out, N, d, row0, tile);
}

// The float32 + integer path (fast_quant.h): quantize_one per thread, the float64 kernels for the vectors it
// hands back. The same per-vector code runs on the CPU in fq::quantize_f32_lanes1 (tests/test_fast_quant.py).
struct FastScales {
  float inv_s[kMaxScales];
  int lq;
};

template <int KIND, int D>
__global__ void __launch_bounds__(kThreads) fast_quantize_kernel(const DevConsts c, const fq::IntConsts C,
                                                                 const FastScales fs, const float* __restrict__ x,
                                                                 int64_t N, float* __restrict__ out,
                                                                 uint8_t* __restrict__ T,
                                                                 uint8_t* __restrict__ clamped, int32_t* errors) {
  __shared__ DevConsts sc;
  LatticeView L;
  QuantParams P;
  load_consts(c, sc, L, P);
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= N) return;
  float xv[D], o[D];
  for (int i = 0; i < D; ++i) xv[i] = x[r * D + i];
  uint8_t t = 0;
  if (fq::quantize_one<KIND, D>(C, xv, fs.inv_s, P.scales, P.n_scales, fs.lq, P.M, o, t)) {
    for (int i = 0; i < D; ++i) out[r * D + i] = o[i];
    if (T) T[r] = t;
    if (clamped) clamped[r] = 0;
    return;
  }
  double xd[D], y[D];
  for (int i = 0; i < D; ++i) xd[i] = (double)xv[i];
  const EncodeResult res = quantize_vector<KIND, D>(L, P, xd, nullptr, y);
  for (int i = 0; i < D; ++i) out[r * D + i] = (float)y[i];
  if (T) T[r] = res.T;
  if (clamped) clamped[r] = res.clamped;
  if (res.error) atomicAdd(errors, 1);
}

template <typename F>
void dispatch_lattice(int kind, int d, F&& f) {
  if (kind == kZn) {
    if (d == 2) return f(std::integral_constant<int, kZn>{}, std::integral_constant<int, 2>{});
    return f(std::integral_constant<int, kZn>{}, std::integral_constant<int, 0>{});
  }
  if (kind == kDn) {
    if (d == 4) return f(std::integral_constant<int, kDn>{}, std::integral_constant<int, 4>{});
    return f(std::integral_constant<int, kDn>{}, std::integral_constant<int, 0>{});
  }
  return f(std::integral_constant<int, kE8>{}, std::integral_constant<int, 8>{});
}

unsigned blocks_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// ------------------------------------------------------------------------------------------------ LUT
template <typename LutT, bool kShared>
__global__ void lut_two_sided_kernel(const int32_t* __restrict__ ix, const float* __restrict__ sx,
                                     const int32_t* __restrict__ iy, const float* __restrict__ sy,
                                     const LutT* __restrict__ lut, int64_t n, int64_t m, int K, int M, int64_t Q,
                                     int q, float* __restrict__ out) {
  extern __shared__ unsigned char smem[];
  const LutT* table = lut;
  if (kShared) {  // the whole Q x Q LUT in shared memory (e.g. D4 q=4 int8: 64 KiB)
    LutT* s = reinterpret_cast<LutT*>(smem);
    for (int64_t i = threadIdx.x; i < Q * Q; i += blockDim.x) s[i] = lut[i];
    __syncthreads();
    table = s;
  }
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n * m) return;
  const int64_t r = t / m, j = t % m;
  out[t] = lut_two_sided_pair<LutT, float>(ix + r * (int64_t)K * M, sx + r * (int64_t)K, iy + j * (int64_t)K * M,
                                           sy + j * (int64_t)K, table, K, M, Q, q);
}

template <typename LutT>
int launch_two_sided(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy, const LutT* lut,
                     int64_t n, int64_t m, int K, int M, int64_t Q, int q, float* out, cudaStream_t st) {
  const int threads = 256;
  const unsigned blocks = blocks_for(n * m, threads);
  const size_t bytes = (size_t)(Q * Q) * sizeof(LutT);
  int dev = 0, max_optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (bytes <= (size_t)max_optin) {
    if (bytes > 48 * 1024) {
      cudaFuncSetAttribute(lut_two_sided_kernel<LutT, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)bytes);
    }
    lut_two_sided_kernel<LutT, true><<<blocks, threads, bytes, st>>>(ix, sx, iy, sy, lut, n, m, K, M, Q, q, out);
  } else {
    lut_two_sided_kernel<LutT, false><<<blocks, threads, 0, st>>>(ix, sx, iy, sy, lut, n, m, K, M, Q, q, out);
  }
  return (int)cudaGetLastError();
}

__global__ void add_modq_kernel(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b,
                                uint8_t* __restrict__ out, int64_t n, int q) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = (uint8_t)(((int)a[i] + (int)b[i]) % q);
}

}  // namespace

// ---------------------------------------------------------------------------------------------- launchers
int cuda_device_count(int* err) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  *err = (int)e;
  if (e != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

const char* cuda_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }

int encode_cuda(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                int64_t N, uint8_t* b, uint8_t* T, uint8_t* clamped, int32_t* errors, void* stream) {
  if (N <= 0) return 0;
  const DevConsts c = pack(L, P);
  cudaStream_t st = (cudaStream_t)stream;
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    if (x_is_double)
      encode_kernel<KIND, D, double><<<blocks_for(N, kThreads), kThreads, 0, st>>>(c, (const double*)x, z, N, b, T,
                                                                                   clamped, errors);
    else
      encode_kernel<KIND, D, float><<<blocks_for(N, kThreads), kThreads, 0, st>>>(c, (const float*)x, z, N, b, T,
                                                                                  clamped, errors);
  });
  return (int)cudaGetLastError();
}

int decode_cuda(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, const double* z,
                int64_t N, void* out, int out_is_double, int32_t* bad, void* stream) {
  if (N <= 0) return 0;
  const DevConsts c = pack(L, P);
  cudaStream_t st = (cudaStream_t)stream;
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    if (out_is_double)
      decode_kernel<KIND, D, double><<<blocks_for(N, kThreads), kThreads, 0, st>>>(c, b, T, z, N, (double*)out, bad);
    else
      decode_kernel<KIND, D, float><<<blocks_for(N, kThreads), kThreads, 0, st>>>(c, b, T, z, N, (float*)out, bad);
  });
  return (int)cudaGetLastError();
}

int quantize_cuda(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                  int64_t N, void* out, int out_is_double, uint8_t* T, uint8_t* clamped, int32_t* errors,
                  void* stream) {
  if (N <= 0) return 0;
  if (x_is_double != out_is_double) return (int)cudaErrorInvalidValue;
  const DevConsts c = pack(L, P);
  cudaStream_t st = (cudaStream_t)stream;
  const unsigned blocks = blocks_for(N, kThreads);
  fq::IntConsts C;
  if (!x_is_double && fq::enabled() && fq::applicable(L, P, z) && fq::build_consts(L, C)) {
    FastScales fs{};
    while ((1 << fs.lq) < P.q) ++fs.lq;
    for (int t = 0; t < P.n_scales && t < kMaxScales; ++t) fs.inv_s[t] = (float)(1.0 / P.scales[t]);
    const float* xf = (const float*)x;
    float* of = (float*)out;
    if (L.kind == kE8)
      fast_quantize_kernel<kE8, 8><<<blocks, kThreads, 0, st>>>(c, C, fs, xf, N, of, T, clamped, errors);
    else if (L.d == 4)
      fast_quantize_kernel<kDn, 4><<<blocks, kThreads, 0, st>>>(c, C, fs, xf, N, of, T, clamped, errors);
    else
      fast_quantize_kernel<kDn, 8><<<blocks, kThreads, 0, st>>>(c, C, fs, xf, N, of, T, clamped, errors);
    return (int)cudaGetLastError();
  }
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    // the Python side always passes out dtype == in dtype (float32 or float64)
    if (x_is_double)
      quantize_kernel<KIND, D, double, double><<<blocks, kThreads, 0, st>>>(c, (const double*)x, z, N, (double*)out,
                                                                            T, clamped, errors);
    else
      quantize_kernel<KIND, D, float, float><<<blocks, kThreads, 0, st>>>(c, (const float*)x, z, N, (float*)out, T,
                                                                          clamped, errors);
  });
  return (int)cudaGetLastError();
}

int lut_two_sided_cuda(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy, const void* lut,
                       int lut_bytes, int64_t n, int64_t m, int K, int M, int64_t Q, int q, float* out,
                       void* stream) {
  if (n * m <= 0) return 0;
  cudaStream_t st = (cudaStream_t)stream;
  if (lut_bytes == 1) return launch_two_sided(ix, sx, iy, sy, (const int8_t*)lut, n, m, K, M, Q, q, out, st);
  if (lut_bytes == 2) return launch_two_sided(ix, sx, iy, sy, (const int16_t*)lut, n, m, K, M, Q, q, out, st);
  return launch_two_sided(ix, sx, iy, sy, (const int32_t*)lut, n, m, K, M, Q, q, out, st);
}

int add_modq_cuda(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, int q, void* stream) {
  if (n <= 0) return 0;
  const int threads = 256;
  add_modq_kernel<<<blocks_for(n, threads), threads, 0, (cudaStream_t)stream>>>(a, b, out, n, q);
  return (int)cudaGetLastError();
}

}  // namespace coset
