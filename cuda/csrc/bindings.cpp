// bindings.cpp - pybind11 module coset.cuda._C on raw pointers (no torch at build time).
//
// The Python side (coset/cuda/_ops.py) validates every argument and passes tensor.data_ptr() values;
// small constant arrays (G, G_inv, eps, scales) come as float64 numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fast_quant.h"
#include "kernels.h"
#include "lut_gemv.h"

namespace py = pybind11;

// coset.kv attention kernels (cuda/csrc/kv_cpu.cpp, kv_cuda.cu): plain C ABI
extern "C" {
int kv_scores_cpu(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                  const float* tab, const float* cy, float* out, int64_t BH, int64_t L, int K, int M, int n,
                  int threads);
int kv_values_cpu(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                  const float* p, const float* a, const float* c, float* out, int64_t BH, int64_t L, int K, int M,
                  int n, int threads);
int trellis_encode_cpu(const float* u, int64_t n, int D, const uint8_t* ks, const float* cb, int L, uint8_t* out,
                       int nbytes, int threads);
int trellis_values_cpu(const uint8_t* stream, const float* rho, const float* p, int64_t BH, int64_t L, int nq, int D,
                       const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, int threads);
int trellis_scores_cpu(const uint8_t* stream, const float* rho, const float* q, int64_t BH, int64_t L, int nq, int D,
                       const uint8_t* ks, const float* cb, int LB, int nbytes, float* out, int threads);
int trellis_normalise_encode_cpu(const float* x, int64_t rows, int64_t ntok, int H, int D, int mean_mode,
                                 const float* mu, const float* cs, int64_t pos0, const float* chan, const float* A,
                                 const float* scale_tab, double limit, const uint8_t* ks, const float* cb, int L,
                                 uint8_t* stream, uint8_t* scale, int nbytes, int64_t* bad_row, int threads);
int trellis_attend_cpu(const uint8_t* kstream, int64_t kstream_stride, const uint8_t* kscale, int64_t kscale_stride,
                       const uint8_t* kks, const float* kcb, int kLB, int knb, const uint8_t* vstream,
                       int64_t vstream_stride, const uint8_t* vscale, int64_t vscale_stride, const uint8_t* vks,
                       const float* vcb, int vLB, int vnb, const float* scale_tab, int64_t BH, int64_t L, int nq,
                       int D, const float* q, int bias_mode, const float* bias, const float* tab, int64_t pos0,
                       int tdim, float scaling, const float* extra, int64_t Le, float* acc, float* pe, float* psum,
                       int threads);
int trellis_attend_step_cpu(const uint8_t* kstream, int64_t kstream_stride, const uint8_t* kscale,
                            int64_t kscale_stride, const uint8_t* kks, const float* kcb, int kLB, int knb,
                            const uint8_t* vstream, int64_t vstream_stride, const uint8_t* vscale,
                            int64_t vscale_stride, const uint8_t* vks, const float* vcb, int vLB, int vnb,
                            const float* scale_tab, int64_t BH, int H, int64_t L, int nq, int D, const float* query,
                            const float* qmap, int qw, const float* omap, int orows, int bias_mode,
                            const float* tab, int64_t pos0, int tdim, float scaling, const float* sink_k,
                            const float* sink_v, int64_t sink_stride, int64_t Ls, const float* win_k,
                            const float* win_v, int64_t win_stride, int64_t Lw, float* out, int threads);
int trellis_append_cpu(const float* xk, int k_mean_mode, const float* mu_k, const float* cs, const float* chan,
                       const float* A_k, const uint8_t* kks, const float* kcb, int kL, int knb, uint8_t* kstream,
                       uint8_t* kscale, const float* xv, int v_mean_mode, const float* mu_v, const float* A_v,
                       const uint8_t* vks, const float* vcb, int vL, int vnb, uint8_t* vstream, uint8_t* vscale,
                       int64_t BH, int64_t ntok, int H, int D, int64_t pos0, const float* scale_tab, double limit,
                       int64_t cap, int64_t t0, int64_t* bad_row, int threads);
#ifdef COSET_WITH_CUDA
int kv_scores_cuda(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                   const float* tab, const float* cy, float* out, int64_t BH, int64_t L, int K, int M, int n,
                   std::uintptr_t stream);
int kv_values_cuda(const uint8_t* idx, const uint8_t* tpack, const float* rho, const float* steps, int t_bits,
                   const float* p, const float* a, const float* c, float* out, int64_t BH, int64_t L, int K, int M,
                   int n, std::uintptr_t stream);
#endif
}

void coset_bind_bucket_codec(py::module_& m);  // bucket_codec_py.cpp (coset.dist's bucket codec)
using darr = py::array_t<double, py::array::c_style | py::array::forcecast>;

namespace {

struct Consts {
  darr G, Ginv, eps, scales;
  coset::LatticeView L;
  coset::QuantParams P;
};

Consts make_consts(int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales, int single_pass,
                   int policy_error, double safe_radius) {
  if (kind < 0 || kind > 2) throw std::invalid_argument("kind must be 0 (Z^n), 1 (D_n) or 2 (E8)");
  if (d < 1 || d > coset::kMaxDim) throw std::invalid_argument("d must be in [1, 16]");
  if (kind == coset::kE8 && d != 8) throw std::invalid_argument("E8 has d = 8");
  if (kind == coset::kDn && d < 3) throw std::invalid_argument("D_n needs d >= 3");
  if (q < 2 || q > 16) throw std::invalid_argument("q must be in [2, 16]");
  if (M < 1 || M > coset::kMaxM) throw std::invalid_argument("M must be in [1, 4]");
  if (G.size() != d * d || Ginv.size() != d * d) throw std::invalid_argument("G and G_inv must be (d, d)");
  if (scales.size() < 1 || scales.size() > 65) throw std::invalid_argument("scales must have 1..65 entries");
  Consts c{G, Ginv, darr(), scales, {}, {}};
  const double* eps_ptr = nullptr;
  if (!eps.is_none()) {
    c.eps = eps.cast<darr>();
    if (c.eps.size() != d) throw std::invalid_argument("eps must have d entries");
    eps_ptr = c.eps.data();
  }
  c.L = coset::LatticeView{kind, d, c.G.data(), c.Ginv.data(), eps_ptr};
  c.P = coset::QuantParams{q, M, (int)c.scales.size(), c.scales.data(), single_pass, policy_error, safe_radius};
  return c;
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

#ifdef COSET_WITH_CUDA
void check_cuda(int e, const char* what) {
  if (e != 0) throw std::runtime_error(std::string("coset.cuda: ") + what + " failed: " + coset::cuda_error_string(e));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "coset native HNLQ kernels (raw-pointer API; use coset.cuda instead)";
  m.def("get_num_threads", &coset::get_num_threads);
  m.def("set_num_threads", &coset::set_num_threads);
  m.def("parallel_backend", [] { return std::string(coset::parallel_backend()); });
  coset_bind_bucket_codec(m);
  // coset.kv attention from key/value codes (kv_cpu.cpp; per-token logic in kv_scores.h, shared with kv_cuda.cu)
  m.def("kv_scores_cpu", [](std::uintptr_t idx, std::uintptr_t t, std::uintptr_t rho, std::uintptr_t steps,
                            int t_bits, std::uintptr_t tab, std::uintptr_t cy, std::uintptr_t out, int64_t BH,
                            int64_t L, int K, int M, int n, int threads) {
    py::gil_scoped_release nogil;
    return kv_scores_cpu(ptr<const uint8_t>(idx), ptr<const uint8_t>(t), ptr<const float>(rho),
                         ptr<const float>(steps), t_bits, ptr<const float>(tab), ptr<const float>(cy),
                         ptr<float>(out), BH, L, K, M, n, threads);
  });
  m.def("kv_values_cpu", [](std::uintptr_t idx, std::uintptr_t t, std::uintptr_t rho, std::uintptr_t steps,
                            int t_bits, std::uintptr_t p, std::uintptr_t a, std::uintptr_t c, std::uintptr_t out,
                            int64_t BH, int64_t L, int K, int M, int n, int threads) {
    py::gil_scoped_release nogil;
    return kv_values_cpu(ptr<const uint8_t>(idx), ptr<const uint8_t>(t), ptr<const float>(rho),
                         ptr<const float>(steps), t_bits, ptr<const float>(p), ptr<const float>(a),
                         ptr<const float>(c), ptr<float>(out), BH, L, K, M, n, threads);
  });
  // coset.kv trellis value code (trellis_cpu.cpp; per-vector logic in trellis_core.inc, shared with trellis_cuda.cu)
  m.def("trellis_encode_cpu", [](std::uintptr_t u, int64_t n, int D, std::uintptr_t ks, std::uintptr_t cb, int L,
                                 std::uintptr_t out, int nbytes, int threads) {
    py::gil_scoped_release nogil;
    return trellis_encode_cpu(ptr<const float>(u), n, D, ptr<const uint8_t>(ks), ptr<const float>(cb), L,
                              ptr<uint8_t>(out), nbytes, threads);
  });
  m.def("trellis_values_cpu", [](std::uintptr_t stream, std::uintptr_t rho, std::uintptr_t p, int64_t BH, int64_t L,
                                 int nq, int D, std::uintptr_t ks, std::uintptr_t cb, int LB, int nbytes,
                                 std::uintptr_t out, int threads) {
    py::gil_scoped_release nogil;
    return trellis_values_cpu(ptr<const uint8_t>(stream), ptr<const float>(rho), ptr<const float>(p), BH, L, nq, D,
                              ptr<const uint8_t>(ks), ptr<const float>(cb), LB, nbytes, ptr<float>(out), threads);
  });
  m.def("trellis_scores_cpu", [](std::uintptr_t stream, std::uintptr_t rho, std::uintptr_t q, int64_t BH, int64_t L,
                                 int nq, int D, std::uintptr_t ks, std::uintptr_t cb, int LB, int nbytes,
                                 std::uintptr_t out, int threads) {
    py::gil_scoped_release nogil;
    return trellis_scores_cpu(ptr<const uint8_t>(stream), ptr<const float>(rho), ptr<const float>(q), BH, L, nq, D,
                              ptr<const uint8_t>(ks), ptr<const float>(cb), LB, nbytes, ptr<float>(out), threads);
  });
  // the encoder of a cache's new tokens: centring, scaling, rotation, 8-bit scale and Viterbi (trellis_cpu.cpp);
  // returns (status, first bad row)
  m.def("trellis_normalise_encode_cpu", [](std::uintptr_t x, int64_t rows, int64_t ntok, int H, int D, int mean_mode,
                                           std::uintptr_t mu, std::uintptr_t cs, int64_t pos0, std::uintptr_t chan,
                                           std::uintptr_t A, std::uintptr_t scale_tab, double limit, std::uintptr_t ks,
                                           std::uintptr_t cb, int L, std::uintptr_t stream, std::uintptr_t scale,
                                           int nbytes, int threads) {
    int64_t bad = -1;
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = trellis_normalise_encode_cpu(ptr<const float>(x), rows, ntok, H, D, mean_mode, ptr<const float>(mu),
                                        ptr<const float>(cs), pos0, ptr<const float>(chan), ptr<const float>(A),
                                        ptr<const float>(scale_tab), limit, ptr<const uint8_t>(ks),
                                        ptr<const float>(cb), L, ptr<uint8_t>(stream), ptr<uint8_t>(scale), nbytes,
                                        &bad, threads);
    }
    return py::make_tuple(rc, bad);
  });
  // the fused decode attention over trellis-coded keys and values (trellis_cpu.cpp)
  m.def("trellis_attend_cpu", [](std::uintptr_t kstream, int64_t kstream_stride, std::uintptr_t kscale,
                                 int64_t kscale_stride, std::uintptr_t kks, std::uintptr_t kcb, int kLB, int knb,
                                 std::uintptr_t vstream, int64_t vstream_stride, std::uintptr_t vscale,
                                 int64_t vscale_stride, std::uintptr_t vks, std::uintptr_t vcb, int vLB, int vnb,
                                 std::uintptr_t scale_tab, int64_t BH, int64_t L, int nq, int D, std::uintptr_t q,
                                 int bias_mode, std::uintptr_t bias, std::uintptr_t tab, int64_t pos0, int tdim,
                                 float scaling, std::uintptr_t extra, int64_t Le, std::uintptr_t acc,
                                 std::uintptr_t pe, std::uintptr_t psum, int threads) {
    py::gil_scoped_release nogil;
    return trellis_attend_cpu(ptr<const uint8_t>(kstream), kstream_stride, ptr<const uint8_t>(kscale), kscale_stride,
                              ptr<const uint8_t>(kks), ptr<const float>(kcb), kLB, knb, ptr<const uint8_t>(vstream),
                              vstream_stride, ptr<const uint8_t>(vscale), vscale_stride, ptr<const uint8_t>(vks),
                              ptr<const float>(vcb), vLB, vnb, ptr<const float>(scale_tab), BH, L, nq, D,
                              ptr<const float>(q), bias_mode, ptr<const float>(bias), ptr<const float>(tab), pos0,
                              tdim, scaling, ptr<const float>(extra), Le, ptr<float>(acc), ptr<float>(pe),
                              ptr<float>(psum), threads);
  });
  // a decoding step's append: keys and values encoded into a cache's buffers in place (trellis_cpu.cpp)
  m.def("trellis_append_cpu",
        [](std::uintptr_t xk, int k_mean_mode, std::uintptr_t mu_k, std::uintptr_t cs, std::uintptr_t chan,
           std::uintptr_t A_k, std::uintptr_t kks, std::uintptr_t kcb, int kL, int knb, std::uintptr_t kstream,
           std::uintptr_t kscale, std::uintptr_t xv, int v_mean_mode, std::uintptr_t mu_v, std::uintptr_t A_v,
           std::uintptr_t vks, std::uintptr_t vcb, int vL, int vnb, std::uintptr_t vstream, std::uintptr_t vscale,
           int64_t BH, int64_t ntok, int H, int D, int64_t pos0, std::uintptr_t scale_tab, double limit, int64_t cap,
           int64_t t0, int threads) {
          int64_t bad = -1;
          int rc;
          {
            py::gil_scoped_release nogil;
            rc = trellis_append_cpu(ptr<const float>(xk), k_mean_mode, ptr<const float>(mu_k), ptr<const float>(cs),
                                    ptr<const float>(chan), ptr<const float>(A_k), ptr<const uint8_t>(kks),
                                    ptr<const float>(kcb), kL, knb, ptr<uint8_t>(kstream), ptr<uint8_t>(kscale),
                                    ptr<const float>(xv), v_mean_mode, ptr<const float>(mu_v), ptr<const float>(A_v),
                                    ptr<const uint8_t>(vks), ptr<const float>(vcb), vL, vnb, ptr<uint8_t>(vstream),
                                    ptr<uint8_t>(vscale), BH, ntok, H, D, pos0, ptr<const float>(scale_tab), limit,
                                    cap, t0, &bad, threads);
          }
          return py::make_tuple(rc, bad);
        });
  // a whole decoding step of one layer: query maps, dense tokens, the fused attention, output map (trellis_cpu.cpp)
  m.def("trellis_attend_step_cpu",
        [](std::uintptr_t kstream, int64_t kstream_stride, std::uintptr_t kscale, int64_t kscale_stride,
           std::uintptr_t kks, std::uintptr_t kcb, int kLB, int knb, std::uintptr_t vstream, int64_t vstream_stride,
           std::uintptr_t vscale, int64_t vscale_stride, std::uintptr_t vks, std::uintptr_t vcb, int vLB, int vnb,
           std::uintptr_t scale_tab, int64_t BH, int H, int64_t L, int nq, int D, std::uintptr_t query,
           std::uintptr_t qmap, int qw, std::uintptr_t omap, int orows, int bias_mode, std::uintptr_t tab,
           int64_t pos0, int tdim, float scaling, std::uintptr_t sink_k, std::uintptr_t sink_v, int64_t sink_stride,
           int64_t Ls, std::uintptr_t win_k, std::uintptr_t win_v, int64_t win_stride, int64_t Lw, std::uintptr_t out,
           int threads) {
          py::gil_scoped_release nogil;
          return trellis_attend_step_cpu(
              ptr<const uint8_t>(kstream), kstream_stride, ptr<const uint8_t>(kscale), kscale_stride,
              ptr<const uint8_t>(kks), ptr<const float>(kcb), kLB, knb, ptr<const uint8_t>(vstream), vstream_stride,
              ptr<const uint8_t>(vscale), vscale_stride, ptr<const uint8_t>(vks), ptr<const float>(vcb), vLB, vnb,
              ptr<const float>(scale_tab), BH, H, L, nq, D, ptr<const float>(query), ptr<const float>(qmap), qw,
              ptr<const float>(omap), orows, bias_mode, ptr<const float>(tab), pos0, tdim, scaling,
              ptr<const float>(sink_k), ptr<const float>(sink_v), sink_stride, Ls, ptr<const float>(win_k),
              ptr<const float>(win_v), win_stride, Lw, ptr<float>(out), threads);
        });
  // float32 + integer fast path of encode/decode/quantize (fast_quant.h): on/off switch and the ISA in use
  m.def("set_fast_path", &coset::fq::set_enabled);
  m.def("fast_path_enabled", &coset::fq::enabled);
  // quantize through fast_quant.h's quantize_one, one vector at a time (the CUDA kernel's path; for tests)
  m.def("quantize_lanes1_cpu", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                                  double safe_radius, std::uintptr_t x, int64_t N, std::uintptr_t out,
                                  std::uintptr_t T, std::uintptr_t clamped) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, 0, 0, safe_radius);
    if (!coset::fq::applicable(c.L, c.P, nullptr)) throw std::invalid_argument("the fast path does not apply");
    py::gil_scoped_release nogil;
    return coset::fq::quantize_f32_lanes1(c.L, c.P, ptr<const float>(x), N, ptr<float>(out), ptr<uint8_t>(T),
                                          ptr<uint8_t>(clamped));
  });
  m.def("fast_path_isa", []() { return std::string(coset::fq::isa()); });
  m.def("fast_path_pext", &coset::fq::pext_enabled);  // decode indexes labels with BMI2 pext (see fast_quant.cpp)
  // GEMV on codes (lut_gemv.h); coset/cuda/lut_gemv.py validates every argument
  m.def("lut_build_tables_cpu", [](std::uintptr_t x, int64_t ldx, std::uintptr_t A, int B, int K, int d, int64_t Q,
                                   std::uintptr_t tab) {
    py::gil_scoped_release nogil;
    coset::lut_build_tables_cpu(ptr<const float>(x), ldx, ptr<const float>(A), B, K, d, Q, ptr<float>(tab));
  });
  m.def("lut_gemv_tables_cpu", [](std::uintptr_t idx, int idx_bytes, std::uintptr_t T, std::uintptr_t scale_of,
                                  int n_scales, std::uintptr_t sx, std::uintptr_t tab, int64_t n, int K, int M,
                                  int64_t Q, int q, int B, std::uintptr_t out) {
    py::gil_scoped_release nogil;
    coset::lut_gemv_tables_cpu(ptr<const void>(idx), idx_bytes, ptr<const uint8_t>(T), ptr<const float>(scale_of),
                               n_scales, ptr<const float>(sx), ptr<const float>(tab), n, K, M, Q, q, B,
                               ptr<float>(out));
  });
  m.def("lut_gemv_codebook_cpu", [](std::uintptr_t idx, int idx_bytes, std::uintptr_t T, std::uintptr_t scale_of,
                                    std::uintptr_t sx, std::uintptr_t A, int d, std::uintptr_t x, int64_t ldx, int64_t n,
                                    int K, int M, int q, int B, std::uintptr_t out, int n_scales, std::uintptr_t hc) {
    py::gil_scoped_release nogil;
    coset::lut_gemv_codebook_cpu(ptr<const void>(idx), idx_bytes, ptr<const uint8_t>(T), ptr<const float>(scale_of),
                                 ptr<const float>(sx), ptr<const int8_t>(A), d, ptr<const float>(x), ldx, n, K, M, q, B,
                                 ptr<float>(out), n_scales, ptr<const float>(hc));
  });
  // the CUDA GEMV's shared core in the GPU's order on the CPU (lut_gemv.h, lut_gemv_cuda.cu), for the tests
  m.def("lut_build_tables_core_cpu", [](std::uintptr_t x, int64_t ldx, std::uintptr_t A, int B, int K, int d,
                                        int64_t Q, std::uintptr_t tab) {
    py::gil_scoped_release nogil;
    coset::lut_build_tables_core_cpu(ptr<const float>(x), ldx, ptr<const float>(A), B, K, d, Q, ptr<float>(tab));
  });
  m.def("lut_gemv_core_cpu", [](std::uintptr_t idx, int idx_bytes, std::uintptr_t T, std::uintptr_t scale_of,
                                std::uintptr_t sx, std::uintptr_t A, int d, std::uintptr_t x, int64_t ldx,
                                std::uintptr_t tab, int64_t Q, int64_t n, int K, int M, int q, int B,
                                std::uintptr_t out, std::uintptr_t hc) {
    if (B != 1 && B != 2 && B != 4 && B != 8) throw std::invalid_argument("B must be 1, 2, 4 or 8");
    if (A && d != 4 && d != 8) throw std::invalid_argument("codebook: d must be 4 or 8");
    py::gil_scoped_release nogil;
    coset::lut_gemv_core_cpu(ptr<const void>(idx), idx_bytes, ptr<const uint8_t>(T), ptr<const float>(scale_of),
                             ptr<const float>(sx), ptr<const int8_t>(A), d, ptr<const float>(x), ldx,
                             ptr<const float>(tab), Q, n, K, M, q, B, ptr<float>(out), ptr<const float>(hc));
  });

  // ---------------------------------------------------------------------------------------------- CPU
  m.def("encode_cpu", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                         int single_pass, int policy_error, double safe_radius, std::uintptr_t x, int x_is_double,
                         std::uintptr_t z, int64_t N, std::uintptr_t b, std::uintptr_t T, std::uintptr_t clamped) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, single_pass, policy_error, safe_radius);
    py::gil_scoped_release nogil;
    return coset::encode_cpu(c.L, c.P, ptr<const void>(x), x_is_double, ptr<const double>(z), N, ptr<uint8_t>(b),
                             ptr<uint8_t>(T), ptr<uint8_t>(clamped));
  });
  m.def("decode_cpu", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                         std::uintptr_t b, std::uintptr_t T, std::uintptr_t z, int64_t N, std::uintptr_t out,
                         int out_is_double) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, 0, 0, 0.0);
    py::gil_scoped_release nogil;
    return coset::decode_cpu(c.L, c.P, ptr<const uint8_t>(b), ptr<const uint8_t>(T), ptr<const double>(z), N,
                      ptr<void>(out), out_is_double);
  });
  m.def("quantize_cpu", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                           int single_pass, int policy_error, double safe_radius, std::uintptr_t x, int x_is_double,
                           std::uintptr_t z, int64_t N, std::uintptr_t out, int out_is_double, std::uintptr_t T,
                           std::uintptr_t clamped) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, single_pass, policy_error, safe_radius);
    py::gil_scoped_release nogil;
    return coset::quantize_cpu(c.L, c.P, ptr<const void>(x), x_is_double, ptr<const double>(z), N, ptr<void>(out),
                               out_is_double, ptr<uint8_t>(T), ptr<uint8_t>(clamped));
  });
  // the fused per-row fake quantizer (fast_quant.h quantize_rows_f32): returns (errors, nonfinite, n_overloaded,
  // n_clamped), the counts -1 when it did not quantize; errors = -1
  // when the float32 + integer path does not apply to this code (the caller then composes the reference ops).
  // rms_scale > 0: rms betas (coset.quant.RmsBetas) written to betas_out, `betas` ignored; they are written
  // even when the fused path does not apply (errors = -1), for the caller's composition. prev_betas != 0: the
  // hint of quantize_rows_f32 (out and T hold the results of the call with those betas); ws: its workspace.
  m.def("quantize_rows_cpu", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                                int policy_error, double safe_radius, std::uintptr_t x, std::uintptr_t betas, int64_t R,
                                int64_t k, double lim, std::uintptr_t out, std::uintptr_t T, std::uintptr_t clamped,
                                double rms_scale, int rms_per_row, std::uintptr_t betas_out,
                                std::uintptr_t prev_betas, std::uintptr_t ws) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, 0, policy_error, safe_radius);
    if (R < 0 || k < 0) throw std::invalid_argument("R and k must be >= 0");
    const bool rms = rms_scale > 0.0;
    if (rms && R > 0 && !betas_out) throw std::invalid_argument("rms betas need betas_out");
    const coset::fq::RmsSpec spec{rms_scale, rms_per_row != 0, ptr<float>(betas_out)};
    int64_t nonfinite = 0, err = -1, counts[2] = {-1, -1};
    {
      py::gil_scoped_release nogil;
      if (coset::fq::enabled() && coset::fq::applicable(c.L, c.P, nullptr))
        err = coset::fq::quantize_rows_f32(c.L, c.P, ptr<const float>(x), ptr<const float>(betas), R, k,
                                           (float)std::min(lim, 3.4028234663852886e38), ptr<float>(out),
                                           ptr<uint8_t>(T), ptr<uint8_t>(clamped), &nonfinite, rms ? &spec : nullptr,
                                           ptr<const float>(prev_betas), ptr<int8_t>(ws), counts);
      if (err < 0 && rms)
        coset::fq::rms_betas_f32(ptr<const float>(x), R, k, rms_scale, rms_per_row != 0, ptr<float>(betas_out));
    }
    return py::make_tuple(err, nonfinite, counts[0], counts[1]);
  });
  // coset.quant.rms_betas on a float32 (R, k) matrix (float32 out), and the float64 sums of squares per row
  m.def("rms_betas_cpu", [](std::uintptr_t x, int64_t R, int64_t k, double scale, int per_row, std::uintptr_t out) {
    if (R < 0 || k < 0) throw std::invalid_argument("R and k must be >= 0");
    py::gil_scoped_release nogil;
    coset::fq::rms_betas_f32(ptr<const float>(x), R, k, scale, per_row != 0, ptr<float>(out));
  });
  m.def("row_sumsq_cpu", [](std::uintptr_t x, int64_t R, int64_t k, std::uintptr_t out) {
    if (R < 0 || k < 0) throw std::invalid_argument("R and k must be >= 0");
    py::gil_scoped_release nogil;
    coset::fq::row_sumsq_f32(ptr<const float>(x), R, k, ptr<double>(out));
  });
  m.def("add_modq_cpu", [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t n, int q) {
    py::gil_scoped_release nogil;
    coset::add_modq_cpu(ptr<const uint8_t>(a), ptr<const uint8_t>(b), ptr<uint8_t>(out), n, q);
  });

  // ---------------------------------------------------------------------------------------------- CUDA
#ifdef COSET_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_device_count", []() {
    int err = 0;
    int n = coset::cuda_device_count(&err);
    return py::make_tuple(n, std::string(coset::cuda_error_string(err)));
  });
  m.def("encode_cuda", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                          int single_pass, int policy_error, double safe_radius, std::uintptr_t x, int x_is_double,
                          std::uintptr_t z, int64_t N, std::uintptr_t b, std::uintptr_t T, std::uintptr_t clamped,
                          std::uintptr_t errors, std::uintptr_t stream) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, single_pass, policy_error, safe_radius);
    check_cuda(coset::encode_cuda(c.L, c.P, ptr<const void>(x), x_is_double, ptr<const double>(z), N,
                                  ptr<uint8_t>(b), ptr<uint8_t>(T), ptr<uint8_t>(clamped), ptr<int32_t>(errors),
                                  ptr<void>(stream)),
               "encode kernel");
  });
  m.def("decode_cuda", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                          std::uintptr_t b, std::uintptr_t T, std::uintptr_t z, int64_t N, std::uintptr_t out,
                          int out_is_double, std::uintptr_t bad, std::uintptr_t stream) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, 0, 0, 0.0);
    check_cuda(coset::decode_cuda(c.L, c.P, ptr<const uint8_t>(b), ptr<const uint8_t>(T), ptr<const double>(z), N,
                                  ptr<void>(out), out_is_double, ptr<int32_t>(bad), ptr<void>(stream)),
               "decode kernel");
  });
  m.def("quantize_cuda", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                            int single_pass, int policy_error, double safe_radius, std::uintptr_t x, int x_is_double,
                            std::uintptr_t z, int64_t N, std::uintptr_t out, int out_is_double, std::uintptr_t T,
                            std::uintptr_t clamped, std::uintptr_t errors, std::uintptr_t stream) {
    Consts c = make_consts(kind, d, G, Ginv, eps, q, M, scales, single_pass, policy_error, safe_radius);
    check_cuda(coset::quantize_cuda(c.L, c.P, ptr<const void>(x), x_is_double, ptr<const double>(z), N,
                                    ptr<void>(out), out_is_double, ptr<uint8_t>(T), ptr<uint8_t>(clamped),
                                    ptr<int32_t>(errors), ptr<void>(stream)),
               "quantize kernel");
  });
  // GEMV on codes (lut_gemv_cuda.cu); also the one-sided LUT op on CUDA tensors (int32 indices, float scales)
  m.def("lut_build_tables_cuda", [](std::uintptr_t x, int64_t ldx, std::uintptr_t A, int B, int K, int d, int64_t Q,
                                    std::uintptr_t tab, std::uintptr_t stream) {
    check_cuda(coset::lut_build_tables_cuda(ptr<const float>(x), ldx, ptr<const float>(A), B, K, d, Q,
                                            ptr<float>(tab), ptr<void>(stream)),
               "lut_build_tables kernel");
  });
  m.def("lut_gemv_cuda", [](std::uintptr_t idx, int idx_bytes, std::uintptr_t T, std::uintptr_t scale_of,
                            std::uintptr_t sx, std::uintptr_t A, int d, std::uintptr_t x, int64_t ldx,
                            std::uintptr_t tab, int64_t Q, int64_t n, int K, int M, int q, int B, std::uintptr_t out,
                            std::uintptr_t stream, std::uintptr_t hc) {
    check_cuda(coset::lut_gemv_cuda(ptr<const void>(idx), idx_bytes, ptr<const uint8_t>(T), ptr<const float>(scale_of),
                                    ptr<const float>(sx), ptr<const int8_t>(A), d, ptr<const float>(x), ldx,
                                    ptr<const float>(tab), Q, n, K, M, q, B, ptr<float>(out), ptr<void>(stream),
                                    ptr<const float>(hc)),
               "lut_gemv kernel");
  });
  m.def("lut_two_sided_cuda", [](std::uintptr_t ix, std::uintptr_t sx, std::uintptr_t iy, std::uintptr_t sy,
                                 std::uintptr_t lut, int lut_bytes, int64_t n, int64_t mm, int K, int M, int64_t Q,
                                 int q, std::uintptr_t out, std::uintptr_t stream) {
    check_cuda(coset::lut_two_sided_cuda(ptr<const int32_t>(ix), ptr<const float>(sx), ptr<const int32_t>(iy),
                                         ptr<const float>(sy), ptr<const void>(lut), lut_bytes, n, mm, K, M, Q, q,
                                         ptr<float>(out), ptr<void>(stream)),
               "lut_two_sided kernel");
  });
  m.def("add_modq_cuda", [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t n, int q,
                            std::uintptr_t stream) {
    check_cuda(coset::add_modq_cuda(ptr<const uint8_t>(a), ptr<const uint8_t>(b), ptr<uint8_t>(out), n, q,
                                    ptr<void>(stream)),
               "add_modq kernel");
  });
#else
  m.attr("with_cuda") = false;
#endif
}
