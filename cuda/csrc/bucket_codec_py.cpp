// bucket_codec_py.cpp - pybind11 bindings of bucket_codec.h (called from bindings.cpp's module init).
// Raw pointers as integers, like bindings.cpp; coset/cuda/bucket_codec.py validates every argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bucket_codec.h"

namespace py = pybind11;

namespace {
using darr = py::array_t<double, py::array::c_style | py::array::forcecast>;

struct View {
  darr G, Ginv, eps, scales;
  coset::LatticeView L;
  coset::QuantParams P;
};

View make_view(int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales, double safe_radius) {
  if (kind < 0 || kind > 2) throw std::invalid_argument("kind must be 0 (Z^n), 1 (D_n) or 2 (E8)");
  if (d < 1 || d > coset::kMaxDim) throw std::invalid_argument("d must be in [1, 16]");
  if (q < 2 || q > 16) throw std::invalid_argument("q must be in [2, 16]");
  if (M < 1 || M > coset::kMaxM) throw std::invalid_argument("M must be in [1, 4]");
  if (G.size() != d * d || Ginv.size() != d * d) throw std::invalid_argument("G and G_inv must be (d, d)");
  if (scales.size() < 1 || scales.size() > 65) throw std::invalid_argument("scales must have 1..65 entries");
  View v{G, Ginv, darr(), scales, {}, {}};
  const double* eps_ptr = nullptr;
  if (!eps.is_none()) {
    v.eps = eps.cast<darr>();
    if (v.eps.size() != d) throw std::invalid_argument("eps must have d entries");
    eps_ptr = v.eps.data();
  }
  v.L = coset::LatticeView{kind, d, v.G.data(), v.Ginv.data(), eps_ptr};
  v.P = coset::QuantParams{q, M, (int)v.scales.size(), v.scales.data(), 0, 0, safe_radius};
  return v;
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
// q^M of a QuantizationConfig (q <= 16, M <= 4): the modular codec keeps its codes in int32
void check_modulus(int64_t modulus) {
  if (modulus < 2 || modulus > (int64_t(1) << 16))
    throw std::invalid_argument("modulus must be in [2, 2^16] (q^M with q <= 16, M <= 4), got " + std::to_string(modulus));
}
// The kernels divide by bpc and W and index by n: the Python wrappers check these too, this keeps a direct
// call from dividing by zero (SIGFPE) or looping over a negative count
void check_at_least(const char* name, int64_t v, int64_t lo) {
  if (v < lo) throw std::invalid_argument(std::string(name) + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v));
}
}  // namespace

void coset_bind_bucket_codec(py::module_& m) {
  m.def("bucket_allgather_encode", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                                      double rad, std::uintptr_t x, std::uintptr_t resid, int64_t n,
                                      std::uintptr_t payload) {
    View v = make_view(kind, d, G, Ginv, eps, q, M, scales, rad);
    coset::AllgatherStats st;
    {
      py::gil_scoped_release nogil;
      st = coset::bucket_allgather_encode(v.L, v.P, ptr<const float>(x), ptr<float>(resid), n, ptr<uint8_t>(payload));
    }
    return py::make_tuple((double)st.rho, st.nonfinite, st.overloaded, st.clamped);
  });
  m.def("bucket_allgather_decode", [](int kind, int d, darr G, darr Ginv, py::object eps, int q, int M, darr scales,
                                      std::uintptr_t payloads, int W, int own, int64_t n, std::uintptr_t out,
                                      std::uintptr_t resid) {
    check_at_least("W", W, 1);
    check_at_least("n", n, 0);
    if (own >= W) throw std::invalid_argument("own must be < W, got " + std::to_string(own));
    View v = make_view(kind, d, G, Ginv, eps, q, M, scales, 0.0);
    const char* why = nullptr;
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = coset::bucket_allgather_decode(v.L, v.P, ptr<const uint8_t>(payloads), W, own, n, ptr<float>(out),
                                          ptr<float>(resid), &why);
    }
    return py::make_tuple(rc, why ? std::string(why) : std::string());
  });
  m.def("bucket_allgather_nbytes", [](int64_t n, int d, int M, int q, int max_T) {
    return coset::allgather_layout(n, d, M, q, max_T).nbytes;
  });
  m.def("bucket_modular_norms", [](std::uintptr_t x, std::uintptr_t resid, int64_t n, int d, int64_t bpc,
                                   std::uintptr_t norms) {
    check_at_least("n", n, 0);
    check_at_least("d", d, 1);
    check_at_least("blocks_per_chunk", bpc, 1);
    py::gil_scoped_release nogil;
    return coset::bucket_modular_norms(ptr<const float>(x), ptr<float>(resid), n, d, bpc, ptr<double>(norms));
  });
  m.def("bucket_modular_encode", [](int kind, int d, darr G, darr Ginv, py::object eps, int64_t modulus,
                                    std::uintptr_t xe, std::uintptr_t resid, int64_t n, std::uintptr_t scales,
                                    int64_t bpc, int pk, int width, int fields, std::uintptr_t packed) {
    check_modulus(modulus);
    check_at_least("n", n, 0);
    check_at_least("blocks_per_chunk", bpc, 1);
    View v = make_view(kind, d, G, Ginv, eps, 2, 1, darr(py::array_t<double>(1)), 0.0);
    py::gil_scoped_release nogil;
    coset::bucket_modular_encode(v.L, modulus, ptr<const float>(xe), ptr<float>(resid), n, ptr<const double>(scales),
                                 bpc, pk, width, fields, ptr<void>(packed));
  });
  m.def("bucket_modular_decode", [](int kind, int d, darr G, darr Ginv, py::object eps, int64_t modulus,
                                    std::uintptr_t packed, int64_t n, std::uintptr_t scales, int64_t bpc, int pk,
                                    int width, int fields, int W, std::uintptr_t out) {
    check_modulus(modulus);
    check_at_least("n", n, 0);
    check_at_least("blocks_per_chunk", bpc, 1);
    check_at_least("W", W, 1);
    View v = make_view(kind, d, G, Ginv, eps, 2, 1, darr(py::array_t<double>(1)), 0.0);
    py::gil_scoped_release nogil;
    coset::bucket_modular_decode(v.L, modulus, ptr<const void>(packed), n, ptr<const double>(scales), bpc, pk, width,
                                 fields, W, ptr<float>(out));
  });
}
