// kernels.h - entry points of the CPU (kernels_cpu.cpp) and CUDA (kernels_cuda.cu) kernels.
// All buffers are contiguous; the Python side validates shapes, dtypes and ranges before calling.
#pragma once
#include <cstdint>

#include "hnlq_core.h"

namespace coset {

int get_num_threads();
void set_num_threads(int n);
// "openmp" when parallel_for runs on the process's GNU OpenMP team (torch's libgomp), else "threads" (own pool).
const char* parallel_backend();

// x: (N, d) float32 (x_is_double = 0) or float64; z: (N, d) float64 or nullptr; b: (N, M, d); T, clamped: (N,).
// Returns the number of vectors still overloaded at the cap under overload_policy "error".
int64_t encode_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                   int64_t N, uint8_t* b, uint8_t* T, uint8_t* clamped);
// Returns the number of rows with a label >= q or T >= len(scales) (those rows are not decoded).
int64_t decode_cpu(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, const double* z,
                   int64_t N, void* out, int out_is_double);
int64_t quantize_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                     int64_t N, void* out, int out_is_double, uint8_t* T, uint8_t* clamped);
void add_modq_cpu(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, int q);

#ifdef COSET_WITH_CUDA
// The two-sided LUT op exists only on the GPU (on the CPU coset.lut's PyTorch path was faster); the one-sided
// op runs on the GEMV kernels (lut_gemv.h: lut_gemv_tables_cpu / lut_gemv_cuda).
// Device pointers; small constant arrays (G, Ginv, eps, scales) are host pointers copied by the launcher.
// Return a cudaError_t as int (0 = success). stream is a cudaStream_t.
int cuda_device_count(int* err);
const char* cuda_error_string(int e);
int encode_cuda(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                int64_t N, uint8_t* b, uint8_t* T, uint8_t* clamped, int32_t* errors, void* stream);
int decode_cuda(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, const double* z,
                int64_t N, void* out, int out_is_double, int32_t* bad, void* stream);
int quantize_cuda(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                  int64_t N, void* out, int out_is_double, uint8_t* T, uint8_t* clamped, int32_t* errors,
                  void* stream);
int lut_two_sided_cuda(const int32_t* ix, const float* sx, const int32_t* iy, const float* sy, const void* lut,
                       int lut_bytes, int64_t n, int64_t m, int K, int M, int64_t Q, int q, float* out,
                       void* stream);
int add_modq_cuda(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, int q, void* stream);
#endif

}  // namespace coset
