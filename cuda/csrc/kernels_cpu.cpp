// kernels_cpu.cpp - multi-threaded CPU kernels around the per-vector logic of hnlq_core.h.
#include "kernels.h"

#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "fast_quant.h"
#include "hnlq_core.h"
#include "parallel.h"

namespace coset {

static int g_num_threads = [] {
  const char* env = std::getenv("COSET_NUM_THREADS");
  if (env) {
    int v = std::atoi(env);
    if (v > 0) return v;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? (int)hc : 1;
}();

int get_num_threads() { return g_num_threads; }
void set_num_threads(int n) { g_num_threads = n > 0 ? n : 1; }

// ------------------------------------------------------------------ the worker pool of parallel_for
namespace {

thread_local bool t_in_pool_task = false;  // a task calling parallel_for again runs it serially

std::exception_ptr guarded_task(const std::function<void(int64_t)>& task, int64_t i) {
  try {
    task(i);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

class Pool {
 public:
  void run(int64_t n, const std::function<void(int64_t)>& task, int64_t threads) {
    std::unique_lock<std::mutex> owner(run_m_, std::try_to_lock);
    if (t_in_pool_task || !owner.owns_lock()) {  // nested, or another thread holds the pool: serially here
      for (int64_t i = 0; i < n; ++i) task(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      try {
        while ((int64_t)workers_.size() < threads - 1) {
          const int64_t id = (int64_t)workers_.size();
          workers_.emplace_back([this, id] { work(id); });
        }
      } catch (const std::system_error&) {  // no more threads allowed: the caller and the existing workers do it all
      }
      task_ = &task;
      n_ = n;
      active_ = threads - 1;  // workers with a larger id sit this call out
      next_ = 0;
      done_ = 0;
      ++gen_;
    }
    cv_work_.notify_all();
    t_in_pool_task = true;
    for (;;) {  // the caller takes tasks too
      const int64_t i = next_.fetch_add(1);
      if (i >= n) break;
      std::exception_ptr e = guarded_task(task, i);
      std::lock_guard<std::mutex> lk(m_);
      if (e && !error_) error_ = e;
      ++done_;
    }
    t_in_pool_task = false;
    std::unique_lock<std::mutex> lk(m_);
    cv_done_.wait(lk, [&] { return done_ == n_; });  // no worker still uses `task` when run returns
    task_ = nullptr;
    std::exception_ptr e = error_;
    error_ = nullptr;
    if (e) std::rethrow_exception(e);  // the first task's exception, once every task has finished
  }

 private:
  void work(int64_t id) {
    t_in_pool_task = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_work_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      while (id < active_) {  // under m_: gen_, n_, task_ and the reset of next_ are seen together
        const int64_t i = next_.fetch_add(1);
        if (i >= n_) break;
        const std::function<void(int64_t)>* task = task_;
        lk.unlock();
        std::exception_ptr e = guarded_task(*task, i);
        lk.lock();
        if (e && !error_) error_ = e;
        if (++done_ == n_) cv_done_.notify_one();
      }
    }
  }

  std::exception_ptr error_;  // under m_
  std::mutex run_m_;  // one run at a time
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> workers_;  // never joined: the pool lives as long as the process
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t n_ = 0, done_ = 0, active_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t gen_ = 0;
};

Pool* g_pool = nullptr;
std::once_flag g_pool_once;

// The process's OpenMP team, when a GNU-ABI OpenMP runtime is loaded (torch's wheels load libgomp): its idle
// workers spin for a while after every torch op (GOMP_SPINCOUNT), holding the other cores, so a second pool's
// threads compete with them instead of running (measured: a 2-thread QAT step re-quantized in 3.5 ms, the
// same as 1 thread at twice the CPU; 2.1 ms with OMP_WAIT_POLICY=PASSIVE). Running the tasks on that same team
// uses the spinning threads instead. COSET_OPENMP=0 keeps the own pool.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
GompParallel g_gomp = nullptr;
std::atomic<bool> g_gomp_ok{false};

struct OmpJob {
  const std::function<void(int64_t)>* task;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::mutex m;
  std::exception_ptr error;
};

void omp_body(void* p) {  // every thread of the team, the caller included, takes tasks until none are left
  OmpJob& j = *(OmpJob*)p;
  const bool was = t_in_pool_task;
  t_in_pool_task = true;
  for (;;) {
    const int64_t i = j.next.fetch_add(1);
    if (i >= j.n) break;
    std::exception_ptr e = guarded_task(*j.task, i);
    if (e) {
      std::lock_guard<std::mutex> lk(j.m);
      if (!j.error) j.error = e;
    }
  }
  t_in_pool_task = was;
}

void new_pool_in_child() {
  g_pool = new Pool();  // the parent's threads do not exist here (its pool is leaked)
  g_gomp_ok = false;    // nor do its OpenMP team's: libgomp is not fork-safe, so the child uses its own pool
}

}  // namespace

static void init_pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();  // never destroyed: no join of sleeping workers at exit
    const char* env = std::getenv("COSET_OPENMP");
    if (!(env && env[0] == '0')) {
      g_gomp = (GompParallel)dlsym(RTLD_DEFAULT, "GOMP_parallel");
      g_gomp_ok = g_gomp != nullptr;
    }
    pthread_atfork(nullptr, nullptr, new_pool_in_child);
  });
}

const char* parallel_backend() {
  init_pool();
  return g_gomp_ok.load() ? "openmp" : "threads";
}

void pool_run(int64_t n, const std::function<void(int64_t)>& task, int64_t threads) {
  init_pool();
  const int64_t nt = threads > 0 ? std::min(threads, n) : n;
  if (g_gomp_ok.load(std::memory_order_relaxed) && !t_in_pool_task && nt > 1) {
    OmpJob job;
    job.task = &task;
    job.n = n;
    g_gomp(omp_body, &job, (unsigned)nt, 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  g_pool->run(n, task, nt);
}

constexpr int64_t kGrain = 2048;

template <typename In>
static inline void load_vec(const In* x, int d, double* out) {
  for (int i = 0; i < d; ++i) out[i] = (double)x[i];
}

// Row r of a float32 or float64 output (one rounding from double, like the reference's .to(dtype)).
static inline void store_vec(void* out, int out_is_double, int64_t r, int d, const double* y) {
  if (out_is_double) {
    double* o = (double*)out + r * d;
    for (int i = 0; i < d; ++i) o[i] = y[i];
  } else {
    float* o = (float*)out + r * d;
    for (int i = 0; i < d; ++i) o[i] = (float)y[i];
  }
}

int64_t encode_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                   int64_t N, uint8_t* b, uint8_t* T, uint8_t* clamped) {
  if (!x_is_double && fq::enabled() && fq::applicable(L, P, z)) {  // float32 + integer path (fast_quant.h)
    const int64_t e = fq::encode_f32(L, P, (const float*)x, N, b, T, clamped);
    if (e >= 0) return e;
  }
  std::atomic<int64_t> errors{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    const int d = L.d, Md = P.M * L.d;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      int64_t err = 0;
      double xv[kMaxDim];
      for (int64_t r = lo; r < hi; ++r) {
        if (x_is_double)
          load_vec((const double*)x + r * d, d, xv);
        else
          load_vec((const float*)x + r * d, d, xv);
        EncodeResult res = encode_vector<KIND, D>(L, P, xv, z ? z + r * d : nullptr, b + r * Md);
        T[r] = res.T;
        clamped[r] = res.clamped;
        err += res.error;
      }
      if (err) errors += err;
    });
  });
  return errors.load();
}

// One layer (M = 1), no dither or centring, q^d too large for the representative table (E8 q = 8, 16): the label
// b is the flat code G^-1 a mod q of the DDP codec, so the codec's float32 + integer decoder (fq::modular_decode_f32:
// a = G b - q Q(G b / q + eps) in integers, then (float)(a * s)) gives decode_vector's floats bit for bit; blocks it
// cannot certify (near an E8 tie) and invalid labels / T take the float64 path below.
static int64_t decode_m1_modular(const LatticeView& L, const QuantParams& P, const fq::ModularPlan& plan,
                                 const uint8_t* b, const uint8_t* T, int64_t N, float* out) {
  std::atomic<int64_t> bad{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      constexpr int64_t kSpan = 512;
      int32_t codes[kSpan * kMaxDim];
      double sc[kSpan];
      bool okv[kSpan];
      std::vector<int64_t> rej;
      int64_t nbad = 0;
      double y[kMaxDim];
      for (int64_t r0 = lo; r0 < hi; r0 += kSpan) {
        const int64_t cnt = std::min(kSpan, hi - r0);
        rej.clear();
        int64_t span_bad = 0;
        for (int64_t l = 0; l < cnt; ++l) {
          const uint8_t* br = b + (r0 + l) * D;
          bool ok = T[r0 + l] < P.n_scales;
          for (int i = 0; i < D; ++i) ok &= br[i] < P.q;
          for (int i = 0; i < D; ++i) codes[l * D + i] = br[i];
          sc[l] = ok ? P.scales[T[r0 + l]] : 0.0;
          okv[l] = ok;
          span_bad += !ok;
        }
        fq::modular_decode_f32(plan, L, codes, sc, 1, 1, 0, cnt, cnt * D, out + r0 * D, rej);
        for (int64_t l : rej)  // the float64 kernel
          if (okv[l]) {
            decode_vector<KIND, D>(L, P, b + (r0 + l) * D, T[r0 + l], nullptr, y);
            for (int i = 0; i < D; ++i) out[(r0 + l) * D + i] = (float)y[i];
          }
        if (span_bad) {
          nbad += span_bad;
          for (int64_t l = 0; l < cnt; ++l)  // zeros, as the float64 path writes (+0.0, not the kernel's lam * 0)
            if (!okv[l])
              for (int i = 0; i < D; ++i) out[(r0 + l) * D + i] = 0.0f;
        }
      }
      if (nbad) bad += nbad;
    });
  });
  return bad.load();
}

int64_t decode_cpu(const LatticeView& L, const QuantParams& P, const uint8_t* b, const uint8_t* T, const double* z,
                   int64_t N, void* out, int out_is_double) {
  if (!out_is_double && fq::enabled() && fq::decode_applicable(L, P, z))  // table path (fast_quant.h)
    return fq::decode_f32(L, P, b, T, N, (float*)out);
  if (!out_is_double && fq::enabled() && P.M == 1 && z == nullptr && L.eps != nullptr) {
    const fq::ModularPlan plan = fq::modular_plan(L, P.q);
    if (plan.ok) return decode_m1_modular(L, P, plan, b, T, N, (float*)out);
  }
  std::atomic<int64_t> bad{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    const int d = L.d, Md = P.M * L.d;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      int64_t nbad = 0;
      double y[kMaxDim];
      for (int64_t r = lo; r < hi; ++r) {
        const uint8_t* br = b + r * Md;
        bool ok = T[r] < P.n_scales;  // range checks here instead of a separate pass over the labels
        for (int i = 0; i < Md; ++i) ok &= br[i] < P.q;
        if (!ok) {
          ++nbad;
          for (int i = 0; i < d; ++i) y[i] = 0.0;
        } else {
          decode_vector<KIND, D>(L, P, br, T[r], z ? z + r * d : nullptr, y);
        }
        store_vec(out, out_is_double, r, d, y);
      }
      if (nbad) bad += nbad;
    });
  });
  return bad.load();
}

// ------------------------------------------------------------------------------------------------------
// Batched fast path of quantize: V vectors at a time, arrays laid out [i][v] so that every step is a loop
// over v (independent vectors: instruction-level parallelism and SSE/AVX lanes). Exactly the operations of
// hnlq_core.h, in the same order per vector; vectors that overload at t = 0 are redone by the scalar
// quantize_vector (identical results: the encoder is deterministic).
constexpr int kV = 8;

template <int KIND, int D>
static inline void cp_batch(const LatticeView& L, const double (*xin)[kV], double (*y)[kV]) {
  double x[D][kV];
  for (int i = 0; i < D; ++i)
    for (int v = 0; v < kV; ++v) x[i][v] = xin[i][v] + L.eps[i];
  auto dn = [](const double (*a)[kV], double (*o)[kV]) {
    double sum[kV], best[kV];
    int k[kV];
    for (int v = 0; v < kV; ++v) {
      sum[v] = 0.0;
      best[v] = -1.0;
      k[v] = 0;
    }
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) {
        const double f = floor(a[i][v] + 0.5);
        o[i][v] = f;
        sum[v] += f;
        const double ab = fabs(a[i][v] - f);
        const bool gt = ab > best[v];
        best[v] = gt ? ab : best[v];
        k[v] = gt ? i : k[v];
      }
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) {
        const bool flip = (i == k[v]) & is_odd(sum[v]);
        const double dk = a[i][v] - o[i][v];
        const double alt = o[i][v] + (dk >= 0.0 ? 1.0 : -1.0);
        o[i][v] = flip ? alt : o[i][v];
      }
  };
  if (KIND == kZn) {
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) y[i][v] = floor(x[i][v] + 0.5);
  } else if (KIND == kDn) {
    dn(x, y);
  } else {
    double y0[D][kV], y1[D][kV], xm[D][kV], d0[kV], d1[kV];
    dn(x, y0);
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) xm[i][v] = x[i][v] - 0.5;
    dn(xm, y1);
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) y1[i][v] = y1[i][v] + 0.5;
    for (int v = 0; v < kV; ++v) {
      double e = x[0][v] - y0[0][v];
      d0[v] = e * e;
      e = x[0][v] - y1[0][v];
      d1[v] = e * e;
    }
    for (int i = 1; i < D; ++i)
      for (int v = 0; v < kV; ++v) {
        double e = x[i][v] - y0[i][v];
        d0[v] = d0[v] + e * e;
        e = x[i][v] - y1[i][v];
        d1[v] = d1[v] + e * e;
      }
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) y[i][v] = d0[v] <= d1[v] ? y0[i][v] : y1[i][v];
  }
}

// Returns a bit mask of the vectors that need the scalar path (overload at t = 0).
template <int KIND, int D, typename In>
static inline unsigned quantize_batch(const LatticeView& L, const QuantParams& P, const In* x, const double* z,
                                      double (*out)[kV]) {
  const double s = P.scales[0];
  const double qd = (double)P.q, inv_q = pow2_inverse(P.q);
  double g[D][kV], lam[D][kV], lam0[D][kV];
  for (int i = 0; i < D; ++i)
    for (int v = 0; v < kV; ++v) {
      const double u = (double)x[v * D + i] / s;
      g[i][v] = z ? u + z[v * D + i] : u;
    }
  for (int m = 0; m < P.M; ++m) {
    cp_batch<KIND, D>(L, g, lam);
    if (m == 0)
      for (int i = 0; i < D; ++i)
        for (int v = 0; v < kV; ++v) lam0[i][v] = lam[i][v];
    for (int i = 0; i < D; ++i)
      for (int v = 0; v < kV; ++v) g[i][v] = div_q(lam[i][v], qd, inv_q);
  }
  cp_batch<KIND, D>(L, g, lam);
  unsigned redo = 0;
  for (int v = 0; v < kV; ++v) {
    bool ovl = false;
    for (int i = 0; i < D; ++i) ovl |= (lam[i][v] != 0.0);
    redo |= (unsigned)ovl << v;
  }
  for (int i = 0; i < D; ++i)
    for (int v = 0; v < kV; ++v) {
      const double y = z ? lam0[i][v] - z[v * D + i] : lam0[i][v];
      out[i][v] = y * s;
    }
  return redo;
}

int64_t quantize_cpu(const LatticeView& L, const QuantParams& P, const void* x, int x_is_double, const double* z,
                     int64_t N, void* out, int out_is_double, uint8_t* T, uint8_t* clamped) {
  if (!x_is_double && !out_is_double && fq::enabled() && fq::applicable(L, P, z)) {  // fast_quant.h
    const int64_t e = fq::quantize_f32(L, P, (const float*)x, N, (float*)out, T, clamped);
    if (e >= 0) return e;
  }
  std::atomic<int64_t> errors{0};
  dispatch_lattice(L.kind, L.d, [&](auto KI, auto DI) {
    constexpr int KIND = decltype(KI)::value, D = decltype(DI)::value;
    const int d = L.d;
    // the batched fast path: compile-time d, tie offset on, overload protection on
    // (not E8: its larger state and frequent t > 0 make the batch slower there, measured)
    const bool batched = D > 0 && KIND != kE8 && L.eps != nullptr && !P.single_pass;
    parallel_for(N, kGrain, [&](int64_t lo, int64_t hi) {
      int64_t err = 0;
      double xv[kMaxDim], y[kMaxDim];  // labels never leave quantize_vector
      int64_t r = lo;
      if constexpr (D > 0) {
        if (batched) {
          double ob[D > 0 ? D : 1][kV];
          for (; r + kV <= hi; r += kV) {
            const double* zr = z ? z + r * D : nullptr;
            unsigned redo = x_is_double
                                ? quantize_batch<KIND, D>(L, P, (const double*)x + r * D, zr, ob)
                                : quantize_batch<KIND, D>(L, P, (const float*)x + r * D, zr, ob);
            for (int v = 0; v < kV; ++v) {
              const int64_t rv = r + v;
              if ((redo >> v) & 1u) {  // overloaded at t = 0: the scalar ramp
                if (x_is_double)
                  load_vec((const double*)x + rv * D, D, xv);
                else
                  load_vec((const float*)x + rv * D, D, xv);
                EncodeResult res = quantize_vector<KIND, D>(L, P, xv, z ? z + rv * D : nullptr, y);
                if (T) T[rv] = res.T;
                if (clamped) clamped[rv] = res.clamped;
                err += res.error;
              } else {
                for (int i = 0; i < D; ++i) y[i] = ob[i][v];
                if (T) T[rv] = 0;
                if (clamped) clamped[rv] = 0;
              }
              store_vec(out, out_is_double, rv, D, y);
            }
          }
        }
      }
      for (; r < hi; ++r) {
        if (x_is_double)
          load_vec((const double*)x + r * d, d, xv);
        else
          load_vec((const float*)x + r * d, d, xv);
        const double* zr = z ? z + r * d : nullptr;
        EncodeResult res = quantize_vector<KIND, D>(L, P, xv, zr, y);
        if (T) T[r] = res.T;
        if (clamped) clamped[r] = res.clamped;
        err += res.error;
        store_vec(out, out_is_double, r, d, y);
      }
      if (err) errors += err;
    });
  });
  return errors.load();
}

void add_modq_cpu(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, int q) {
  parallel_for(n, 1 << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int s = (int)a[i] + (int)b[i];
      out[i] = (uint8_t)(s % q);
    }
  });
}

}  // namespace coset
