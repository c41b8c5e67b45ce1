// Batch norm (with its ReLU and residual add) for XLA:CPU as FFI custom calls: statistics, apply, and the
// backward's two passes.
//
// Why: in XLA the per-channel sums are separate library reductions (one pass over the activation each), and
// XLA's fusion recomputes cheap elementwise chains (normalise, add, ReLU) inside every consumer, so a block's
// output is recomputed from the previous blocks' conv outputs again and again, forward and backward. On a
// 2-core CPU that made batch norm cost more than the 1x1 convolutions' gradients. Here each op is one pass
// over memory: the minimum is one read for the statistics, a read and a write to apply; in the backward a
// read of (g, y, x) for the two sums and one more, plus writes, for the input gradient.
//
// Layout: every activation is [M, C] row-major (NHWC flattened over N, H, W), float32; per-channel vectors
// are [C]. Sums are accumulated in float32 over 64 rows, then in double.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "ffi_call.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace resnext_jax;  // NOLINT: ffi_call.h, parallel.h and vec.h helpers

namespace batch_norm_kernels {  // named: build.py may compile the sources as one translation unit
namespace {

constexpr int64_t kBlockRows = 64;

// The two nonlinear steps, for one float or kLanes channels (see vec.h).
inline float relu(float v) { return v > 0.f ? v : 0.f; }
inline vf relu(vf v) { return v > 0.f ? v : vf{}; }
inline float where_positive(float y, float g) { return y > 0.f ? g : 0.f; }
inline vf where_positive(vf y, vf g) { return y > 0.f ? g : vf{}; }

struct Shape {
  int64_t m, c;
};

ffi::Error shape_of(const ffi::Buffer<ffi::F32>& x, Shape* s) {
  auto dims = x.dimensions();
  if (dims.size() < 1 || dims.back() < 1) return ffi::Error::InvalidArgument("batch_norm: empty channel axis");
  s->c = dims.back();
  s->m = x.element_count() / s->c;
  return ffi::Error::Success();
}

ffi::Error check_same(const Shape& s, const ffi::Buffer<ffi::F32>& b, const char* what) {
  if (static_cast<int64_t>(b.element_count()) != s.m * s.c)
    return ffi::Error::InvalidArgument(std::string("batch_norm: ") + what + " differs in size from x");
  return ffi::Error::Success();
}

ffi::Error check_channels(const Shape& s, const ffi::Buffer<ffi::F32>& v, const char* what) {
  if (static_cast<int64_t>(v.element_count()) != s.c)
    return ffi::Error::InvalidArgument(std::string("batch_norm: ") + what + " must have one value per channel");
  return ffi::Error::Success();
}

// sum1[c] = sum over rows of u, sum2[c] = sum over rows of u * v, where (u, v) = term(row, c).
template <typename Term>
void channel_sums(ffi::ThreadPool& pool, const Shape& s, const Term& term, float* sum1, float* sum2) {
  const int64_t chunks = std::max<int64_t>(1, std::min(s.m / kBlockRows, chunks_for(pool, 4)));
  std::vector<double> partial(chunks * 2 * s.c, 0.0);
  parallel_for(pool, chunks, chunks, [&](int64_t begin, int64_t end) {
    std::vector<float> a(s.c), b(s.c);
    for (int64_t k = begin; k < end; ++k) {
      double* pa = &partial[k * 2 * s.c];
      double* pb = pa + s.c;
      const int64_t r1 = (k + 1) * s.m / chunks;
      for (int64_t r0 = k * s.m / chunks; r0 < r1; r0 += kBlockRows) {
        std::fill(a.begin(), a.end(), 0.f);
        std::fill(b.begin(), b.end(), 0.f);
        for (int64_t r = r0; r < std::min(r1, r0 + kBlockRows); ++r) term(r, a.data(), b.data());
        for (int64_t j = 0; j < s.c; ++j) {
          pa[j] += a[j];
          pb[j] += b[j];
        }
      }
    }
  });
  for (int64_t j = 0; j < s.c; ++j) {
    double t1 = 0, t2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      t1 += partial[k * 2 * s.c + j];
      t2 += partial[k * 2 * s.c + s.c + j];
    }
    sum1[j] = static_cast<float>(t1);
    sum2[j] = static_cast<float>(t2);
  }
}

// Rows split into contiguous chunks over the pool; body(row) for each.
template <typename F>
void for_rows(ffi::ThreadPool& pool, int64_t m, const F& body) {
  parallel_for(pool, m, chunks_for(pool, 8), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(r);
  });
}

// x -> (sum x, sum x^2) per channel.
ffi::Error Stats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> sum,
                 ffi::ResultBuffer<ffi::F32> sum_sq) {
  Shape s;
  if (auto e = shape_of(x, &s); e.failure()) return e;
  const float* xp = x.typed_data();
  const int64_t c = s.c;
  channel_sums(pool, s, [&](int64_t r, float* a, float* b) {
    const float* xr = xp + r * c;
    for_channels(c, [&](int64_t j, auto t) {
      const auto v = load(xr + j, t);
      store(a + j, load(a + j, t) + v);
      store(b + j, load(b + j, t) + v * v);
    });
  }, sum->typed_data(), sum_sq->typed_data());
  return ffi::Error::Success();
}

template <bool kRelu, bool kShortcut>
void apply_rows(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* sc, const float* scale,
                const float* shift, float* y) {
  const int64_t c = s.c;
  for_rows(pool, s.m, [&](int64_t r) {
    const float* xr = x + r * c;
    const float* sr = sc + r * c;
    float* yr = y + r * c;
    for_channels(c, [&](int64_t j, auto t) {
      auto v = load(xr + j, t) * load(scale + j, t) + load(shift + j, t);
      if constexpr (kShortcut) v += load(sr + j, t);
      if constexpr (kRelu) v = relu(v);
      store(yr + j, v);
    });
  });
}

// y = act(x * scale + shift [+ shortcut]); act is ReLU or the identity.
ffi::Error Apply(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> shortcut,
                 ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                 bool relu, bool add_shortcut) {
  Shape s;
  if (auto e = shape_of(x, &s); e.failure()) return e;
  if (add_shortcut)
    if (auto e = check_same(s, shortcut, "shortcut"); e.failure()) return e;
  if (auto e = check_channels(s, scale, "scale"); e.failure()) return e;
  if (auto e = check_channels(s, shift, "shift"); e.failure()) return e;
  auto run = relu ? (add_shortcut ? apply_rows<true, true> : apply_rows<true, false>)
                  : (add_shortcut ? apply_rows<false, true> : apply_rows<false, false>);
  run(pool, s, x.typed_data(), shortcut.typed_data(), scale.typed_data(), shift.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

// The gradient reaching batch norm's output: g where the ReLU passed (y > 0), else 0; g without a ReLU.
template <bool kRelu, typename T>
inline T masked(const float* g, const float* y, T t) {
  if constexpr (kRelu) return where_positive(load(y, t), load(g, t));
  return load(g, t);
}

template <bool kRelu>
void grad_sums(ffi::ThreadPool& pool, const Shape& s, const float* g, const float* y, const float* x,
               const float* mean, float* sum1, float* sum2) {
  const int64_t c = s.c;
  channel_sums(pool, s, [&](int64_t r, float* a, float* b) {
    const float *gr = g + r * c, *yr = y + r * c, *xr = x + r * c;
    for_channels(c, [&](int64_t j, auto t) {
      const auto gm = masked<kRelu>(gr + j, yr + j, t);
      store(a + j, load(a + j, t) + gm);
      store(b + j, load(b + j, t) + gm * (load(xr + j, t) - load(mean + j, t)));
    });
  }, sum1, sum2);
}

// (g, y, x, mean) -> (sum gm, sum gm * (x - mean)) per channel, gm the gradient at batch norm's output.
ffi::Error GradStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> y,
                     ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> sum,
                     ffi::ResultBuffer<ffi::F32> sum_centered, bool relu) {
  Shape s;
  if (auto e = shape_of(x, &s); e.failure()) return e;
  if (auto e = check_same(s, g, "g"); e.failure()) return e;
  if (relu)
    if (auto e = check_same(s, y, "y"); e.failure()) return e;
  if (auto e = check_channels(s, mean, "mean"); e.failure()) return e;
  (relu ? grad_sums<true> : grad_sums<false>)(pool, s, g.typed_data(), y.typed_data(), x.typed_data(),
                                              mean.typed_data(), sum->typed_data(), sum_centered->typed_data());
  return ffi::Error::Success();
}

template <bool kRelu, bool kWriteMasked>
void grad_rows(ffi::ThreadPool& pool, const Shape& s, const float* g, const float* y, const float* x,
               const float* mean, const float* a, const float* b, const float* k, float* dx, float* gm_out) {
  const int64_t c = s.c;
  for_rows(pool, s.m, [&](int64_t r) {
    const float *gr = g + r * c, *yr = y + r * c, *xr = x + r * c;
    float* dr = dx + r * c;
    float* mr = gm_out + r * c;
    for_channels(c, [&](int64_t j, auto t) {
      const auto gm = masked<kRelu>(gr + j, yr + j, t);
      store(dr + j, load(a + j, t) * gm + load(b + j, t) + load(k + j, t) * (load(xr + j, t) - load(mean + j, t)));
      if constexpr (kWriteMasked) store(mr + j, gm);
    });
  });
}

// dx = a * gm + b + k * (x - mean), the closed-form input gradient with per-channel a, b, k; with
// `write_masked`, also gm itself into `masked_grad` (the gradient of a shortcut added before the ReLU).
ffi::Error GradApply(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> y,
                     ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> a,
                     ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                     ffi::ResultBuffer<ffi::F32> masked_grad, bool relu, bool write_masked) {
  Shape s;
  if (auto e = shape_of(x, &s); e.failure()) return e;
  if (auto e = check_same(s, g, "g"); e.failure()) return e;
  if (relu)
    if (auto e = check_same(s, y, "y"); e.failure()) return e;
  for (auto* v : {&mean, &a, &b, &k})
    if (auto e = check_channels(s, *v, "a coefficient"); e.failure()) return e;
  if (write_masked && static_cast<int64_t>(masked_grad->element_count()) != s.m * s.c)
    return ffi::Error::InvalidArgument("batch_norm: masked_grad must be the size of x");
  auto run = relu ? (write_masked ? grad_rows<true, true> : grad_rows<true, false>)
                  : (write_masked ? grad_rows<false, true> : grad_rows<false, false>);
  run(pool, s, g.typed_data(), y.typed_data(), x.typed_data(), mean.typed_data(), a.typed_data(),
      b.typed_data(), k.typed_data(), dx->typed_data(), masked_grad->typed_data());
  return ffi::Error::Success();
}

// The entry points: the generic FFI call (ffi_call.h) -> the typed ops above.
ffi::Error StatsCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs) {
  auto in = f32_args<1>(args);
  auto out = f32_rets<2>(rets);
  if (!(in && out)) return bad_call("batch_norm stats", args.size(), rets.size());
  return Stats(pool, (*in)[0], (*out)[0], (*out)[1]);
}

ffi::Error ApplyCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs attrs) {
  auto in = f32_args<4>(args);
  auto out = f32_rets<1>(rets);
  const auto relu = attr<bool>(attrs, "relu"), add_shortcut = attr<bool>(attrs, "add_shortcut");
  if (!(in && out && relu && add_shortcut)) return bad_call("batch_norm apply", args.size(), rets.size());
  auto& [x, shortcut, scale, shift] = *in;
  return Apply(pool, x, shortcut, scale, shift, (*out)[0], *relu, *add_shortcut);
}

ffi::Error GradStatsCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs attrs) {
  auto in = f32_args<4>(args);
  auto out = f32_rets<2>(rets);
  const auto relu = attr<bool>(attrs, "relu");
  if (!(in && out && relu)) return bad_call("batch_norm grad_stats", args.size(), rets.size());
  auto& [g, y, x, mean] = *in;
  return GradStats(pool, g, y, x, mean, (*out)[0], (*out)[1], *relu);
}

ffi::Error GradApplyCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs attrs) {
  auto in = f32_args<7>(args);
  auto out = f32_rets<2>(rets);
  const auto relu = attr<bool>(attrs, "relu"), write_masked = attr<bool>(attrs, "write_masked");
  if (!(in && out && relu && write_masked)) return bad_call("batch_norm grad_apply", args.size(), rets.size());
  auto& [g, y, x, mean, a, b, k] = *in;
  return GradApply(pool, g, y, x, mean, a, b, k, (*out)[0], (*out)[1], *relu, *write_masked);
}

}  // namespace
}  // namespace batch_norm_kernels

RESNEXT_JAX_FFI_HANDLER(BatchNormStats, batch_norm_kernels::StatsCall);
RESNEXT_JAX_FFI_HANDLER(BatchNormApply, batch_norm_kernels::ApplyCall);
RESNEXT_JAX_FFI_HANDLER(BatchNormGradStats, batch_norm_kernels::GradStatsCall);
RESNEXT_JAX_FFI_HANDLER(BatchNormGradApply, batch_norm_kernels::GradApplyCall);
