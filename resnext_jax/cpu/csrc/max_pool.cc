// Max pooling for XLA:CPU as FFI custom calls: forward, and a backward that routes each window's gradient
// to its first maximum in row-major order (PyTorch's rule).
//
// Why: XLA's reduce-window and our elementwise formulation of the backward (pooling.py) took 70 ms of a
// ResNeXt-50 train step for the stem's single 3x3/2 pool, PyTorch 10 ms; each op here is one pass.
//
// Layout: x and dx [N, H, W, C], y and g [N, Ho, Wo, C], float32; padding is -inf.

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ffi_call.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace resnext_jax;  // NOLINT: ffi_call.h, parallel.h and vec.h helpers

namespace max_pool_kernels {  // named: build.py may compile the sources as one translation unit
namespace {

// Steps of the pool for one float or kLanes channels (see vec.h).
inline float vmax(float a, float b) { return a > b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float splat(float v, float) { return v; }
inline vf splat(float v, vf) { return resnext_jax::splat(v); }
// Lanes of `x` equal to `y` not yet `taken`, as a mask; `taken` gains them.
inline bool first_equal(float x, float y, bool* taken) {
  const bool m = x == y && !*taken;
  *taken = *taken || m;
  return m;
}
inline vi first_equal(vf x, vf y, vi* taken) {
  const vi m = (x == y) & ~*taken;
  *taken |= m;
  return m;
}
inline float masked(bool m, float g) { return m ? g : 0.f; }
inline vf masked(vi m, vf g) { return m ? g : vf{}; }
inline bool no_lanes(float) { return false; }
inline vi no_lanes(vf) { return vi{}; }

struct Pool {
  int64_t n, h, w, ho, wo, c, kh, kw, sh, sw, pt, pl;
  // Valid window rows [r0, r1) and columns [c0, c1) of output (r, q).
  void window(int64_t r, int64_t q, int64_t* r0, int64_t* r1, int64_t* c0, int64_t* c1) const {
    *r0 = std::max<int64_t>(0, r * sh - pt);
    *r1 = std::min<int64_t>(h, r * sh - pt + kh);
    *c0 = std::max<int64_t>(0, q * sw - pl);
    *c1 = std::min<int64_t>(w, q * sw - pl + kw);
  }
};

ffi::Error make_pool(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out, int64_t kh, int64_t kw,
                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, Pool* p) {
  if (in.size() != 4 || out.size() != 4 || in[0] != out[0] || in[3] != out[3])
    return ffi::Error::InvalidArgument("max_pool: expected NHWC input and output with equal N and C");
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || pt < 0 || pl < 0 || pt >= kh || pl >= kw)
    return ffi::Error::InvalidArgument("max_pool: bad window, strides or padding");
  *p = Pool{in[0], in[1], in[2], out[1], out[2], in[3], kh, kw, sh, sw, pt, pl};
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                   int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  Pool p;
  if (auto e = make_pool(x.dimensions(), y->dimensions(), kh, kw, sh, sw, pt, pl, &p); e.failure()) return e;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t c = p.c;
  parallel_for(pool, p.n * p.ho, chunks_for(pool, 8), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / p.ho, r = i % p.ho;
      for (int64_t q = 0; q < p.wo; ++q) {
        int64_t r0, r1, c0, c1;
        p.window(r, q, &r0, &r1, &c0, &c1);
        float* out = yp + ((n * p.ho + r) * p.wo + q) * c;
        for_channels(c, [&](int64_t j, auto t) {
          auto m = splat(-std::numeric_limits<float>::infinity(), t);
          for (int64_t a = r0; a < r1; ++a)
            for (int64_t b = c0; b < c1; ++b) m = vmax(m, load(xp + ((n * p.h + a) * p.w + b) * c + j, t));
          store(out + j, m);
        });
      }
    }
  });
  return ffi::Error::Success();
}

// dx = sum over windows of g routed to the window's first element equal to its maximum y. Images are split
// over threads: windows overlap within an image, never across.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh,
                    int64_t sw, int64_t pt, int64_t pl) {
  Pool p;
  if (auto e = make_pool(x.dimensions(), y.dimensions(), kh, kw, sh, sw, pt, pl, &p); e.failure()) return e;
  if (g.element_count() != y.element_count() || dx->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("max_pool: gradient shapes differ from the output's and input's");
  const float *xp = x.typed_data(), *yp = y.typed_data(), *gp = g.typed_data();
  float* dp = dx->typed_data();
  const int64_t c = p.c, image = p.h * p.w * c;
  parallel_for(pool, p.n, p.n, [&](int64_t begin, int64_t end) {
    std::fill(dp + begin * image, dp + end * image, 0.f);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t r = 0; r < p.ho; ++r) {
        for (int64_t q = 0; q < p.wo; ++q) {
          int64_t r0, r1, c0, c1;
          p.window(r, q, &r0, &r1, &c0, &c1);
          const int64_t o = ((n * p.ho + r) * p.wo + q) * c;
          for_channels(c, [&](int64_t j, auto t) {
            const auto ym = load(yp + o + j, t), gv = load(gp + o + j, t);
            auto taken = no_lanes(t);
            for (int64_t a = r0; a < r1; ++a) {
              for (int64_t b = c0; b < c1; ++b) {
                const int64_t at = ((n * p.h + a) * p.w + b) * c + j;
                const auto m = first_equal(load(xp + at, t), ym, &taken);
                store(dp + at, load(dp + at, t) + masked(m, gv));
              }
            }
          });
        }
      }
    }
  });
  return ffi::Error::Success();
}

// The entry points: the generic FFI call (ffi_call.h) -> the typed ops above.
template <size_t kArgs, typename Op>
ffi::Error PoolCall(const char* name, const Op& op, FfiArgs args, FfiRets rets, FfiAttrs attrs) {
  auto in = f32_args<kArgs>(args);
  auto out = f32_rets<1>(rets);
  const auto kh = attr<int64_t>(attrs, "kh"), kw = attr<int64_t>(attrs, "kw"), sh = attr<int64_t>(attrs, "sh"),
             sw = attr<int64_t>(attrs, "sw"), pt = attr<int64_t>(attrs, "pt"), pl = attr<int64_t>(attrs, "pl");
  if (!(in && out && kh && kw && sh && sw && pt && pl)) return bad_call(name, args.size(), rets.size());
  return op(*in, (*out)[0], *kh, *kw, *sh, *sw, *pt, *pl);
}

ffi::Error ForwardCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs attrs) {
  return PoolCall<1>("max_pool forward", [&](auto& in, auto& y, auto... geometry) {
    return Forward(pool, in[0], y, geometry...);
  }, args, rets, attrs);
}

ffi::Error BackwardCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs attrs) {
  return PoolCall<3>("max_pool backward", [&](auto& in, auto& dx, auto... geometry) {
    return Backward(pool, in[0], in[1], in[2], dx, geometry...);
  }, args, rets, attrs);
}

}  // namespace
}  // namespace max_pool_kernels

RESNEXT_JAX_FFI_HANDLER(MaxPoolForward, max_pool_kernels::ForwardCall);
RESNEXT_JAX_FFI_HANDLER(MaxPoolBackward, max_pool_kernels::BackwardCall);
