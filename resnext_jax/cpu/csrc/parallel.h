// Work splitting over XLA's intra-op thread pool, shared by the FFI kernels.
#ifndef RESNEXT_JAX_CSRC_PARALLEL_H_
#define RESNEXT_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace resnext_jax {

// Runs body(begin, end) over [0, n) in `chunks` pieces on the caller and XLA's intra-op pool. Work is claimed
// from a shared counter, so the caller never waits on a task that has not started (no deadlock when it is
// itself a pool thread); tasks that start late find nothing left and touch nothing but the shared counters.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunks, const F& body) {
  // One out-of-line copy of the body for the caller and the pool's tasks: half the code, and compile time, of
  // inlining it into both.
  const auto call = [&body](int64_t begin, int64_t end) __attribute__((noinline)) { body(begin, end); };
  chunks = std::max<int64_t>(1, std::min(n, chunks));
  int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks) - 1;
  if (helpers <= 0) {
    call(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const auto* f = &call;
  auto run = [state, f, n, chunks] {
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      (*f)(i * n / chunks, (i + 1) * n / chunks);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run] { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Chunks for `parallel_for`: `per_thread` per pool thread, so that uneven chunks even out.
inline int64_t chunks_for(xla::ffi::ThreadPool& pool, int64_t per_thread) {
  return per_thread * std::max<int64_t>(pool.num_threads(), 1);
}

}  // namespace resnext_jax

#endif  // RESNEXT_JAX_CSRC_PARALLEL_H_
