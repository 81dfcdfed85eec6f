// parallel.h - the CPU kernels' two helpers: a parallel_for over pool_run and a compile-time lattice dispatch.
//
// pool_run runs on the process's GNU OpenMP team when one is loaded (torch's libgomp, found with dlsym; its
// spinning workers would otherwise hold the cores against a second pool), else on a persistent std::thread pool.
// No OpenMP runtime of our own is linked: torch wheels bundle libgomp, and a second OpenMP runtime in the same
// process is a known source of oversubscription and fork problems.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

#include "hnlq_core.h"

namespace coset {

int get_num_threads();

// Run task(0 .. n-1) on the calling thread and the OpenMP team or the persistent worker threads (kernels_cpu.cpp),
// returning when all are done. The workers sleep between calls and keep their thread_local buffers: starting threads per call
// (and faulting in their fresh buffers) cost more than a 2-thread split saves on a 1M-element call. A call
// from inside a task, or while another thread is using the pool, runs its tasks serially on its own thread;
// a forked child starts a new pool.
// threads > 0: at most that many threads (the caller included) take the n tasks; 0: one per task.
void pool_run(int64_t n, const std::function<void(int64_t)>& task, int64_t threads = 0);

// Run f(begin, end) over [0, n) in contiguous chunks on up to get_num_threads() threads. The chunks depend on n,
// grain and the thread count only (not on which thread runs them), so results are as before. There are up to
// kChunksPerThread chunks per thread, taken in turn by whichever thread is free: a thread that shares its core
// with another process's (or torch's OpenMP threads', which spin for a while after each parallel region) gets
// fewer of them, instead of the whole call waiting for its one half (measured: a QAT step with 2 threads spent as
// long in re-quantization as with 1, at twice the CPU time).
constexpr int64_t kChunksPerThread = 4;
template <typename F>
static void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t threads = get_num_threads();
  const int64_t nt = std::min<int64_t>(threads * kChunksPerThread, (n + grain - 1) / grain);
  if (threads <= 1 || nt <= 1) {
    f((int64_t)0, n);
    return;
  }
  const int64_t chunk = (n + nt - 1) / nt;
  pool_run(
      nt,
      [&f, n, chunk](int64_t t) {
        const int64_t b = t * chunk, e = std::min(n, b + chunk);
        if (b < e) f(b, e);
      },
      threads);
}

// Call f(KIND, D) with compile-time constants for the common lattices, D = 0 (runtime d) otherwise.
template <typename F>
static void dispatch_lattice(int kind, int d, F&& f) {
  using std::integral_constant;
  if (kind == kZn) {
    if (d == 2) return f(integral_constant<int, kZn>{}, integral_constant<int, 2>{});
    if (d == 4) return f(integral_constant<int, kZn>{}, integral_constant<int, 4>{});
    if (d == 8) return f(integral_constant<int, kZn>{}, integral_constant<int, 8>{});
    return f(integral_constant<int, kZn>{}, integral_constant<int, 0>{});
  }
  if (kind == kDn) {
    if (d == 4) return f(integral_constant<int, kDn>{}, integral_constant<int, 4>{});
    if (d == 8) return f(integral_constant<int, kDn>{}, integral_constant<int, 8>{});
    return f(integral_constant<int, kDn>{}, integral_constant<int, 0>{});
  }
  return f(integral_constant<int, kE8>{}, integral_constant<int, 8>{});
}

}  // namespace coset
