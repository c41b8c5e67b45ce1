// Grouped 2D convolution for XLA:CPU as FFI custom calls: forward, input gradient, kernel gradient.
//
// Why: XLA:CPU lowers a grouped convolution to a dense one with a block-diagonal kernel (groups x the
// FLOPs) and its gradients are slower still; splitting channels into many small dense convolutions
// (resnext_jax.conv's 'blockdiag') costs more in slicing, concatenation and transposes than in arithmetic
// for the deep, narrow layers. These kernels compute the grouped conv directly on NHWC data.
//
// Layout: x [N, H, W, C], kernel [KH, KW, Cg, C] (HWIO with I = C / groups = Cg, O = C), y [N, Ho, Wo, C];
// input and output have the same channel count C. Each 16-float vector holds 16 consecutive channels:
//  - Cg in {1, 2, 4, 8}: a vector holds 16 / Cg whole groups; input channel ci of each lane's group is
//    brought to the lane by a constant in-register shuffle (one vpermps / vpermilps).
//  - Cg a multiple of 16: a vector lies inside one group; input channels are broadcast scalars.
// The input gradient is the same gather-convolution over dy with the kernel transposed per group
// (kernel_t[kh, kw, co, g*Cg + ci] = kernel[kh, kw, ci, g*Cg + co], made by the caller); the kernel gradient
// reduces x * dy over pixels in registers. Work is split over XLA's intra-op thread pool.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace resnext_jax;  // NOLINT: parallel.h and vec.h helpers

namespace {

// Lane l of the result is lane (l / CG) * CG + ci of v: channel ci of the lane's own group.
template <int CG>
inline v16 group_bcast(v16 v, int ci) {
  i16 idx;
  for (int l = 0; l < kLanes; ++l) idx[l] = (l / CG) * CG + ci;
  return __builtin_shuffle(v, idx);
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }
inline int64_t pos_mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }

// Geometry of a gather-convolution out[n, r, c] = sum over taps of in[n, ir, ic] mixed by the tap's weights.
// Forward: ir = r*sh - pt + kh. Input gradient (transposed): ir = (r + pt - kh) / sh where that divides.
struct Geom {
  int64_t n, hin, win, hout, wout, c, cg, kh, kw, sh, sw, pt, pl;
  bool transposed;
};

struct Tap {
  const float* in;   // input pixel of the tile's first output column, at the block's channel offset
  const float* w;    // packed weights [ci][16] of this tap for the block
};

// T output pixels (in_step / out_step floats apart) of one 16-channel block; groups of CG < 16 channels.
template <int CG, int T>
void tile_small(const Tap* taps, int ntaps, int64_t in_step, float* out, int64_t out_step) {
  v16 acc[T] = {};
  for (int k = 0; k < ntaps; ++k) {
    v16 wv[CG];
    for (int ci = 0; ci < CG; ++ci) wv[ci] = load(taps[k].w + ci * kLanes);
    for (int t = 0; t < T; ++t) {
      v16 xv = load(taps[k].in + t * in_step);
      for (int ci = 0; ci < CG; ++ci) acc[t] += group_bcast<CG>(xv, ci) * wv[ci];
    }
  }
  for (int t = 0; t < T; ++t) store(out + t * out_step, acc[t]);
}

// The same for groups of cg = 16k channels: taps[k].in points at the group's first channel.
template <int T>
void tile_big(const Tap* taps, int ntaps, int64_t cg, int64_t in_step, float* out, int64_t out_step) {
  v16 acc[T] = {};
  for (int k = 0; k < ntaps; ++k) {
    const float* in = taps[k].in;
    for (int64_t ci = 0; ci < cg; ++ci) {
      v16 wv = load(taps[k].w + ci * kLanes);
      for (int t = 0; t < T; ++t) acc[t] += in[t * in_step + ci] * wv;
    }
  }
  for (int t = 0; t < T; ++t) store(out + t * out_step, acc[t]);
}

// The tile kernels behind one interface, so that `tiles` can run either with any tile width.
template <int CG>
struct SmallGroups {
  static constexpr int kTile = 8;
  template <int T>
  static void tile(const Tap* taps, int ntaps, int64_t, int64_t in_step, float* out, int64_t out_step) {
    tile_small<CG, T>(taps, ntaps, in_step, out, out_step);
  }
};
struct WideGroups {
  static constexpr int kTile = 14;
  template <int T>
  static void tile(const Tap* taps, int ntaps, int64_t cg, int64_t in_step, float* out, int64_t out_step) {
    tile_big<T>(taps, ntaps, cg, in_step, out, out_step);
  }
};

// `count` output pixels: full tiles of T, then the remainder with the next narrower tile.
template <class Groups, int T = Groups::kTile>
void tiles(int64_t count, Tap* taps, int ntaps, int64_t cg, int64_t in_step, float* out, int64_t out_step) {
  if constexpr (T > 0) {
    for (; count >= T; count -= T) {
      Groups::template tile<T>(taps, ntaps, cg, in_step, out, out_step);
      for (int k = 0; k < ntaps; ++k) taps[k].in += T * in_step;
      out += T * out_step;
    }
    if (count > 0) tiles<Groups, T - 1>(count, taps, ntaps, cg, in_step, out, out_step);
  }
}

// Input row (or -1) that output row r reads through kernel row k.
int64_t source_index(const Geom& g, int64_t r, int64_t k, int64_t stride, int64_t pad, int64_t extent) {
  int64_t i;
  if (!g.transposed) {
    i = r * stride - pad + k;
  } else {
    int64_t num = r + pad - k;
    if (pos_mod(num, stride) != 0) return -1;
    i = num / stride;
  }
  return (i >= 0 && i < extent) ? i : -1;
}

// One kernel column's input columns along an output-column sequence u = 0..nu-1: ic = a + u*step.
struct ColTap {
  bool used;
  int64_t a, lo, hi;  // valid for u in [lo, hi)
};

// A run of output pixels of one row that read the same taps: what the tile kernels take, less the
// channel block's offsets. Offsets are in floats from the start of the input / kernel / output.
struct Segment {
  int64_t out, count, in_step, out_step;
  size_t tap_begin, tap_end;
};
struct TapOffset {
  int64_t in, w;
};

// Appends the segments of output row r of image n. Columns are visited in `sw` phases for the input
// gradient (output columns p, p + sw, ... read consecutive dy columns) and in one for the forward.
void plan_row(const Geom& g, int64_t n, int64_t r, std::vector<Segment>* segs, std::vector<TapOffset>* taps) {
  const int64_t c = g.c;
  std::vector<int64_t> rows, cuts;
  for (int64_t k = 0; k < g.kh; ++k) rows.push_back(source_index(g, r, k, g.sh, g.pt, g.hin));
  std::vector<ColTap> cols(g.kw);
  const int64_t phases = g.transposed ? std::min(g.sw, g.wout) : 1;
  const int64_t in_cols = g.transposed ? 1 : g.sw;  // input columns between consecutive outputs
  const int64_t out_cols = g.transposed ? g.sw : 1;
  for (int64_t p = 0; p < phases; ++p) {
    const int64_t nu = g.transposed ? ceil_div(g.wout - p, g.sw) : g.wout;
    cuts.assign({0, nu});
    for (int64_t k = 0; k < g.kw; ++k) {
      ColTap& t = cols[k];
      t.used = !g.transposed || pos_mod(p + g.pl - k, g.sw) == 0;
      t.a = g.transposed ? floor_div(p + g.pl - k, g.sw) : k - g.pl;
      t.lo = std::clamp<int64_t>(ceil_div(-t.a, in_cols), 0, nu);
      t.hi = std::clamp<int64_t>(floor_div(g.win - 1 - t.a, in_cols) + 1, t.lo, nu);
      if (t.used) cuts.insert(cuts.end(), {t.lo, t.hi});
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    for (size_t s = 0; s + 1 < cuts.size(); ++s) {
      const int64_t u0 = cuts[s];
      Segment seg{((n * g.hout + r) * g.wout + p + u0 * out_cols) * c, cuts[s + 1] - u0, in_cols * c,
                  out_cols * c, taps->size(), 0};
      for (int64_t kr = 0; kr < g.kh; ++kr) {
        if (rows[kr] < 0) continue;
        for (int64_t kc = 0; kc < g.kw; ++kc) {
          const ColTap& t = cols[kc];
          if (!t.used || u0 < t.lo || u0 >= t.hi) continue;
          taps->push_back({((n * g.hin + rows[kr]) * g.win + t.a + u0 * in_cols) * c, (kr * g.kw + kc) * g.cg * kLanes});
        }
      }
      seg.tap_end = taps->size();
      segs->push_back(seg);
    }
  }
}

// All 16-channel blocks of one segment's pixels.
void run_segment(const Geom& g, const float* in, const float* w, float* out, const Segment& seg,
                 const TapOffset* offsets, int64_t b, Tap* taps) {
  const int ntaps = static_cast<int>(seg.tap_end - seg.tap_begin);
  const int64_t group_first = g.cg >= kLanes ? (b * kLanes / g.cg) * g.cg : b * kLanes;
  for (int k = 0; k < ntaps; ++k)
    taps[k] = {in + offsets[seg.tap_begin + k].in + group_first,
               w + offsets[seg.tap_begin + k].w + b * g.kh * g.kw * g.cg * kLanes};
  float* o = out + seg.out + b * kLanes;
  switch (g.cg) {
    case 1: tiles<SmallGroups<1>>(seg.count, taps, ntaps, g.cg, seg.in_step, o, seg.out_step); break;
    case 2: tiles<SmallGroups<2>>(seg.count, taps, ntaps, g.cg, seg.in_step, o, seg.out_step); break;
    case 4: tiles<SmallGroups<4>>(seg.count, taps, ntaps, g.cg, seg.in_step, o, seg.out_step); break;
    case 8: tiles<SmallGroups<8>>(seg.count, taps, ntaps, g.cg, seg.in_step, o, seg.out_step); break;
    default: tiles<WideGroups>(seg.count, taps, ntaps, g.cg, seg.in_step, o, seg.out_step);
  }
}

// Output rows are split over threads. Within a share, small groups go row by row (each input row is read
// for all channel blocks while in L1); wide groups go block by block, so that a block's weights (9 x Cg
// vectors) stay in L1 across rows rather than the whole kernel streaming from L2 for every row.
void gather_conv(ffi::ThreadPool& pool, const Geom& g, const float* in, const float* kernel, float* out) {
  const int64_t rows = g.n * g.hout, blocks = g.c / kLanes, ntaps = g.kh * g.kw;
  // Kernel repacked as [block][tap][ci][16]: a block's weights are contiguous. In the HWIO layout they lie C
  // floats apart, which for C >= 1024 maps all of them to one L1 set.
  std::vector<float> packed(ntaps * g.cg * g.c);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t tc = 0; tc < ntaps * g.cg; ++tc)
      std::memcpy(&packed[(b * ntaps * g.cg + tc) * kLanes], kernel + tc * g.c + b * kLanes, kLanes * sizeof(float));
  const float* w = packed.data();
  parallel_for(pool, rows, 8 * std::max<int64_t>(pool.num_threads(), 1), [&](int64_t begin, int64_t end) {
    std::vector<Segment> segs;
    std::vector<TapOffset> offsets;
    for (int64_t i = begin; i < end; ++i) plan_row(g, i / g.hout, i % g.hout, &segs, &offsets);
    std::vector<Tap> taps(g.kh * g.kw);
    if (g.cg < kLanes) {
      for (const Segment& seg : segs)
        for (int64_t b = 0; b < blocks; ++b) run_segment(g, in, w, out, seg, offsets.data(), b, taps.data());
    } else {
      for (int64_t b = 0; b < blocks; ++b)
        for (const Segment& seg : segs) run_segment(g, in, w, out, seg, offsets.data(), b, taps.data());
    }
  });
}

// Stride-1 forwards with output rows narrower than this run on a zero-padded copy of the input (see below).
// Measured per layer (benchmarks/conv_layers.py): 7x7x1024 6 -> 3 ms, 14x14x512 4.7 -> 4.0 ms; with stride 2
// the copy (of the 2x larger input) costs more than it saves.
constexpr int64_t kPadBelowWidth = 16;

// The forward on a zero-padded copy of x: every tap is then valid for every output pixel, so each output row
// is one run of tiles. Otherwise the border columns split a row into runs of 1 and Wo - 2 pixels, and on
// 7- and 14-wide maps those runs are too short to keep enough independent accumulators (a 3x slower conv).
void gather_conv_padded(ffi::ThreadPool& pool, const Geom& g, const float* x, const float* kernel, float* out) {
  Geom p = g;
  p.hin = std::max(g.hin + g.pt, (g.hout - 1) * g.sh + g.kh);
  p.win = std::max(g.win + g.pl, (g.wout - 1) * g.sw + g.kw);
  p.pt = p.pl = 0;
  std::vector<float> padded(p.n * p.hin * p.win * p.c, 0.f);
  parallel_for(pool, g.n * g.hin, chunks_for(pool, 4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / g.hin, r = i % g.hin;
      std::memcpy(&padded[((n * p.hin + r + g.pt) * p.win + g.pl) * g.c], x + i * g.win * g.c,
                  g.win * g.c * sizeof(float));
    }
  });
  gather_conv(pool, p, padded.data(), kernel, out);
}

// dw[kh, kw, ci, block b] += sum over image n's pixels of x(tap) * dy, for one 16-lane block.
template <int CG>
void wgrad_block_small(const Geom& g, const float* x, const float* dy, float* dw, int64_t n, int64_t b) {
  const int64_t c = g.c;
  for (int64_t kr = 0; kr < g.kh; ++kr) {
    for (int64_t kc = 0; kc < g.kw; ++kc) {
      const int64_t lo = std::max<int64_t>(0, ceil_div(g.pl - kc, g.sw));
      const int64_t hi = std::min<int64_t>(g.wout, floor_div(g.win - 1 + g.pl - kc, g.sw) + 1);
      v16 acc0[CG] = {}, acc1[CG] = {};
      for (int64_t r = 0; r < g.hout; ++r) {
        const int64_t ir = r * g.sh - g.pt + kr;
        if (ir < 0 || ir >= g.hin || lo >= hi) continue;
        const float* xr = x + ((n * g.hin + ir) * g.win + kc - g.pl) * c + b * kLanes;
        const float* dr = dy + (n * g.hout + r) * g.wout * c + b * kLanes;
        int64_t u = lo;
        // Two pixels at a time gives 2 * CG independent FMA chains; for CG = 8 that would spill registers.
        for (; CG <= 4 && u + 1 < hi; u += 2) {
          v16 d0 = load(dr + u * c), d1 = load(dr + (u + 1) * c);
          v16 x0 = load(xr + u * g.sw * c), x1 = load(xr + (u + 1) * g.sw * c);
          for (int ci = 0; ci < CG; ++ci) {
            acc0[ci] += group_bcast<CG>(x0, ci) * d0;
            acc1[ci] += group_bcast<CG>(x1, ci) * d1;
          }
        }
        for (; u < hi; ++u) {
          v16 d0 = load(dr + u * c), x0 = load(xr + u * g.sw * c);
          for (int ci = 0; ci < CG; ++ci) acc0[ci] += group_bcast<CG>(x0, ci) * d0;
        }
      }
      for (int ci = 0; ci < CG; ++ci) {
        float* o = dw + ((kr * g.kw + kc) * CG + ci) * c + b * kLanes;
        store(o, load(o) + acc0[ci] + acc1[ci]);
      }
    }
  }
}

void wgrad_block_big(const Geom& g, const float* x, const float* dy, float* dw, int64_t n, int64_t b) {
  const int64_t c = g.c, group_first = (b * kLanes / g.cg) * g.cg;
  for (int64_t kr = 0; kr < g.kh; ++kr) {
    for (int64_t kc = 0; kc < g.kw; ++kc) {
      const int64_t lo = std::max<int64_t>(0, ceil_div(g.pl - kc, g.sw));
      const int64_t hi = std::min<int64_t>(g.wout, floor_div(g.win - 1 + g.pl - kc, g.sw) + 1);
      for (int64_t c0 = 0; c0 < g.cg; c0 += kLanes) {
        v16 acc[kLanes] = {};
        for (int64_t r = 0; r < g.hout; ++r) {
          const int64_t ir = r * g.sh - g.pt + kr;
          if (ir < 0 || ir >= g.hin) continue;
          const float* xr = x + ((n * g.hin + ir) * g.win + kc - g.pl) * c + group_first + c0;
          const float* dr = dy + (n * g.hout + r) * g.wout * c + b * kLanes;
          for (int64_t u = lo; u < hi; ++u) {
            v16 d = load(dr + u * c);
            const float* xp = xr + u * g.sw * c;
            for (int j = 0; j < kLanes; ++j) acc[j] += xp[j] * d;
          }
        }
        for (int j = 0; j < kLanes; ++j) {
          float* o = dw + ((kr * g.kw + kc) * g.cg + c0 + j) * c + b * kLanes;
          store(o, load(o) + acc[j]);
        }
      }
    }
  }
}

void wgrad(ffi::ThreadPool& pool, const Geom& g, const float* x, const float* dy, float* dw) {
  const int64_t size = g.kh * g.kw * g.cg * g.c, blocks = g.c / kLanes;
  const int64_t parts = std::max<int64_t>(1, std::min(g.n, std::max<int64_t>(pool.num_threads(), 1)));
  std::vector<std::vector<float>> partial(parts, std::vector<float>(size, 0.f));
  parallel_for(pool, parts, parts, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      float* acc = partial[part].data();
      for (int64_t n = part * g.n / parts; n < (part + 1) * g.n / parts; ++n) {
        for (int64_t b = 0; b < blocks; ++b) {
          switch (g.cg) {
            case 1: wgrad_block_small<1>(g, x, dy, acc, n, b); break;
            case 2: wgrad_block_small<2>(g, x, dy, acc, n, b); break;
            case 4: wgrad_block_small<4>(g, x, dy, acc, n, b); break;
            case 8: wgrad_block_small<8>(g, x, dy, acc, n, b); break;
            default: wgrad_block_big(g, x, dy, acc, n, b);
          }
        }
      }
    }
  });
  std::copy(partial[0].begin(), partial[0].end(), dw);
  for (int64_t part = 1; part < parts; ++part)
    for (int64_t i = 0; i < size; ++i) dw[i] += partial[part][i];
}

bool supported_group_size(int64_t cg) { return cg == 1 || cg == 2 || cg == 4 || cg == 8 || cg % kLanes == 0; }

// Checks the 4-D shapes and fills the geometry; x/y are NHWC, w is [KH, KW, Cg, C].
ffi::Error make_geom(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out, ffi::Span<const int64_t> w,
                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, bool transposed, Geom* g) {
  if (in.size() != 4 || out.size() != 4 || w.size() != 4)
    return ffi::Error::InvalidArgument("grouped_conv: expected 4-D NHWC activations and a 4-D HWIO kernel");
  if (in[0] != out[0] || in[3] != out[3] || w[3] != in[3])
    return ffi::Error::InvalidArgument("grouped_conv: batch or channel counts of the operands differ");
  if (in[3] % kLanes != 0 || !supported_group_size(w[2]) || in[3] % w[2] != 0)
    return ffi::Error::InvalidArgument("grouped_conv: channels must be a multiple of 16 and group size 1, 2, "
                                       "4, 8 or a multiple of 16");
  if (sh < 1 || sw < 1 || pt < 0 || pl < 0)
    return ffi::Error::InvalidArgument("grouped_conv: strides must be positive and paddings non-negative");
  *g = Geom{in[0], in[1], in[2], out[1], out[2], in[3], w[2], w[0], w[1], sh, sw, pt, pl, transposed};
  return ffi::Error::Success();
}

enum class Op { kForward, kInputGrad, kKernelGrad };

// One handler for the three ops: (a, b) -> out is (x, w) -> y, (dy, w_t) -> dx or (x, dy) -> dw, where
// w_t is the per-group transposed kernel and sh..pl are always the forward convolution's.
template <Op op>
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  constexpr bool kernel_grad = op == Op::kKernelGrad;
  Geom g;
  ffi::Error e = make_geom(a.dimensions(), kernel_grad ? b.dimensions() : out->dimensions(),
                           kernel_grad ? out->dimensions() : b.dimensions(), sh, sw, pt, pl,
                           op == Op::kInputGrad, &g);
  if (e.failure()) return e;
  if constexpr (kernel_grad) {
    wgrad(pool, g, a.typed_data(), b.typed_data(), out->typed_data());
  } else if (op == Op::kForward && g.wout < kPadBelowWidth && g.sh == 1 && g.sw == 1 && (g.pt > 0 || g.pl > 0)) {
    gather_conv_padded(pool, g, a.typed_data(), b.typed_data(), out->typed_data());
  } else {
    gather_conv(pool, g, a.typed_data(), b.typed_data(), out->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

#define BIND_CONV                       \
  ffi::Ffi::Bind()                      \
      .Ctx<ffi::ThreadPool>()           \
      .Arg<ffi::Buffer<ffi::F32>>()     \
      .Arg<ffi::Buffer<ffi::F32>>()     \
      .Ret<ffi::Buffer<ffi::F32>>()     \
      .Attr<int64_t>("sh")              \
      .Attr<int64_t>("sw")              \
      .Attr<int64_t>("pt")              \
      .Attr<int64_t>("pl")

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedConvForward, Run<Op::kForward>, BIND_CONV);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedConvInputGrad, Run<Op::kInputGrad>, BIND_CONV);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedConvKernelGrad, Run<Op::kKernelGrad>, BIND_CONV);
