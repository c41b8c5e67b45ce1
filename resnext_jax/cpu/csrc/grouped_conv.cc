// Grouped 2D convolution for XLA:CPU as FFI custom calls: forward, input gradient, kernel gradient.
//
// Why: XLA:CPU lowers a grouped convolution to a dense one with a block-diagonal kernel (groups x the
// FLOPs) and its gradients are slower still; splitting channels into many small dense convolutions
// (resnext_jax.conv's 'blockdiag') costs more in slicing, concatenation and transposes than in arithmetic
// for the deep, narrow layers. These kernels compute the grouped conv directly on NHWC data.
//
// Layout: x [N, H, W, C], kernel [KH, KW, Cg, C] (HWIO with I = C / groups = Cg, O = C), y [N, Ho, Wo, C];
// input and output have the same channel count C. Each vector (vec.h: kLanes = 16, 8 or 4 floats) holds
// kLanes consecutive channels, a "block":
//  - Cg < kLanes (1, 2, 4, 8 dividing kLanes): a vector holds kLanes / Cg whole groups; input channel ci of
//    each lane's group is brought to the lane by a compile-time in-register shuffle (group_bcast: one
//    vpermilps / vpermps). "Small groups".
//  - Cg a multiple of kLanes: a vector lies inside one group; input channels are broadcast scalars. "Wide
//    groups". With kLanes 8, Cg 8 is a wide group; with kLanes 4, Cg 4 and 8 are.
// The input gradient is the same gather-convolution over dy with the kernel transposed per group
// (kernel_t[kh, kw, co, g*Cg + ci] = kernel[kh, kw, ci, g*Cg + co], made by the caller); the kernel gradient
// reduces x * dy over pixels in registers. Work is split over XLA's intra-op thread pool.
//
// One source for every vector width: register tiles are sized from vec.h's kLanes and kVectorRegisters (see
// "Register tiles" below). AVX-512 keeps the tile widths and data paths it was tuned with; kNarrowPaths
// (kLanes < 16: AVX2, NEON, SSE) selects the data paths measured faster on AVX2 (AMD Zen 3), which have not
// been timed on an AVX-512 machine.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "ffi_call.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace resnext_jax;  // NOLINT: ffi_call.h, parallel.h and vec.h helpers

namespace grouped_conv_kernels {  // named: build.py may compile the sources as one translation unit
namespace {

// ---------------------------------------------------------------------------------------------------------
// Register tiles: how many output pixels (or reduction pixels, or kernel taps) one tile keeps in vector
// registers. A tile's accumulators, the operands it reuses and its temporaries must fit the register file
// (kVectorRegisters): a spill adds a load and a store per FMA. With 2 FMA pipes of 4 cycles latency, 8 or
// more independent accumulators keep them busy.

// Forward / input gradient, small groups: T accumulators + CG weight vectors + the input vector + the
// shuffled input. AVX-512: 8 (8 + 8 + 2 <= 32 for CG = 8). AVX2: 8 (CG 4: 8 + 4 + 2 = 14 <= 16); measured on
// 56x56x128 / 32 groups against T = 6, 7 (5-15% slower) and 10 (within 3%, the register file full).
template <int CG>
constexpr int kSmallTile = std::min(8, kVectorRegisters - CG - 2);

// Forward / input gradient, wide groups: T pixels x V blocks of accumulators + V weight vectors + a
// broadcast temporary. AVX-512 folds the broadcast of an input scalar into its FMA ({1to16}): V = 1, T = 14.
// Elsewhere a broadcast is an instruction of its own, which V = 2 blocks of the same group share (groups of
// 2k blocks; others V = 1). AVX2: V = 2, T = 6 (12 + 2 + 1 registers): in L1 this tile runs at the FMA peak
// (6.3 G FMA/s on one Zen 3 core, T = 5: 6.3, T = 7 with a spill: 5.8, V = 1 T = 9..11: 5.4, T = 14: 4.4);
// per layer 1.2-1.4x faster than V = 1, T = 14 for Cg 16 (14x14x512, 28x28x512 / 2), even for Cg 32.
constexpr int kWideBlocks = kLanes == 16 ? 1 : 2;
template <int V>
constexpr int kWideTile = std::min(14, (kVectorRegisters - V - 1) / V);

// Kernel gradient, small groups, AVX-512 path: pixels per step, each with CG accumulators (2 * CG chains for
// CG <= 4; for CG = 8 two pixels would spill).
template <int CG>
[[maybe_unused]] constexpr int kWgradPixels = CG * 2 <= kVectorRegisters / 4 ? 2 : 1;

// Kernel gradient, small groups, kNarrowPaths (wgrad_rows_small): KC kernel columns reduced together, each
// with CG accumulators, sharing the CG rotated dy vectors of a pixel: KC * CG + CG + x + a spare. AVX2: CG 4
// -> 2 (KC 3: 5-17% slower on 28x28 and 56x56 maps of 64-128 channels, the registers overfull; KC 1: 20%
// slower), CG 2 and 1 -> 3 (capped at the usual kernel width).
template <int CG>
[[maybe_unused]] constexpr int kWgradColumns = std::max(1, std::min(3, (kVectorRegisters - CG - 2) / CG));

// Data paths measured on AVX2 (Zen 3) and used where kLanes < 16 (AVX2, NEON, SSE); AVX-512 keeps the ones
// it was tuned with (not timed on AVX-512 since):
//  - Wide groups' forward and input gradient work on pieces of one image and a few groups, each copied into a
//    zero-padded group-major buffer ([group][h][w][Cg], gather_conv_groups). In NHWC a tile's pixels lie
//    C * stride floats apart; for multiples of 1024 floats they all fall in one L1 set (3x slower tiles). The
//    copy makes a tile's input contiguous and every output row one run of tiles.
//  - Wide groups' kernel gradient reads the same kind of copies of x and dy (wgrad_block_big_copied).
//  - Small groups' kernel gradient goes row by row over all blocks (x and dy read once from memory rather
//    than once per block) and shares each pixel's shuffles among kernel columns (wgrad_rows_small): on
//    Zen 3 a vpermilps per FMA costs a third of the FMA throughput.
constexpr bool kNarrowPaths = kLanes < 16;

// ---------------------------------------------------------------------------------------------------------

// Calls f(std::integral_constant<int, cg>{}) and returns true if cg is a group size smaller than a vector
// (1, 2, 4 or 8, below kLanes): the groups whose tiles shuffle within registers. Wide groups (cg a multiple
// of kLanes) return false.
template <typename F>
bool with_small_groups(int64_t cg, const F& f) {
  bool found = false;
  static_for<4>([&](auto i) {
    constexpr int kCg = 1 << decltype(i)::value;
    if constexpr (kCg < kLanes) {
      if (cg == kCg) {
        f(std::integral_constant<int, kCg>{});
        found = true;
      }
    }
  });
  return found;
}

// Lane l of the result is lane (l / CG) * CG + (l + S) mod CG of v: each group of CG lanes rotated down by S.
template <int CG, int S, int... L>
inline vf group_rotate(vf v, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(v, v, ((L / CG) * CG + (L % CG + S) % CG)...);
}
template <int CG, int S>
inline vf group_rotate(vf v) {
  return group_rotate<CG, S>(v, std::make_integer_sequence<int, kLanes>{});
}

// acc + the sum over ci of group_bcast<CG, ci>(x) * w[ci], added in order of ci.
template <int CG, int... CI>
inline vf fma_groups(vf acc, vf x, const vf* w, std::integer_sequence<int, CI...>) {
  ((acc += group_bcast<CG, CI>(x) * w[CI]), ...);
  return acc;
}

// acc[ci] += group_bcast<CG, ci>(x) * d for every ci (x and d by value: they stay in registers).
template <int CG, int... CI>
inline void fma_group_bcast(vf* acc, vf x, vf d, std::integer_sequence<int, CI...>) {
  ((acc[CI] += group_bcast<CG, CI>(x) * d), ...);
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }
inline int64_t pos_mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }

// An uninitialized float buffer (the copies below write every element).
inline std::unique_ptr<float[]> buffer(int64_t size) { return std::unique_ptr<float[]>(new float[size]); }

// Geometry of a gather-convolution out[n, r, c] = sum over taps of in[n, ir, ic] mixed by the tap's weights.
// Forward: ir = r*sh - pt + kh. Input gradient (transposed): ir = (r + pt - kh) / sh where that divides.
// The input is NHWC (in_pixel = c, in_group = cg) or group-major [n][group][h][w][cg] (in_pixel = cg,
// in_group = h * w * cg): element (n, ir, ic, channel j of group q) lies at
// n * hin * win * c + (ir * win + ic) * in_pixel + q * in_group + j.
struct Geom {
  int64_t n, hin, win, hout, wout, c, cg, kh, kw, sh, sw, pt, pl;
  bool transposed;
  int64_t in_pixel, in_group;
};

Geom nhwc_geom(int64_t n, int64_t hin, int64_t win, int64_t hout, int64_t wout, int64_t c, int64_t cg, int64_t kh,
               int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl, bool transposed) {
  return Geom{n, hin, win, hout, wout, c, cg, kh, kw, sh, sw, pt, pl, transposed, c, cg};
}

struct Tap {
  const float* in;   // input pixel of the tile's first output column, at the block's first group
  const float* w;    // packed weights [ci][kLanes] of this tap for the block
};

// T output pixels (in_step / out_step floats apart) of one block; groups of CG < kLanes channels.
// The loops over pixels are unrolled (`#pragma GCC unroll`, clang too): otherwise GCC 12 zeroes the
// accumulators with a memset call and moves them through the stack around the tap loop.
template <int CG, int T>
__attribute__((noinline)) void tile_small(const Tap* taps, int ntaps, int64_t in_step, float* out,
                                          int64_t out_step) {
  vf acc[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) acc[t] = vf{};
  for (int k = 0; k < ntaps; ++k) {
    vf wv[CG];
#pragma GCC unroll 16
    for (int ci = 0; ci < CG; ++ci) wv[ci] = load(taps[k].w + ci * kLanes);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      acc[t] = fma_groups<CG>(acc[t], load(taps[k].in + t * in_step), wv, std::make_integer_sequence<int, CG>{});
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) store(out + t * out_step, acc[t]);
}

// The same for groups of cg = kLanes * k channels, V consecutive blocks of one group (their packed weights
// w_block floats apart): taps[k].in points at the group's first channel.
template <int T, int V>
__attribute__((noinline)) void tile_big(const Tap* taps, int ntaps, int64_t cg, int64_t in_step, int64_t w_block,
                                        float* out, int64_t out_step) {
  vf acc[T][V];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[t][v] = vf{};
  for (int k = 0; k < ntaps; ++k) {
    const float* in = taps[k].in;
    for (int64_t ci = 0; ci < cg; ++ci) {
      vf wv[V];
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) wv[v] = load(taps[k].w + v * w_block + ci * kLanes);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const vf xs = splat(in[t * in_step + ci]);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) acc[t][v] += xs * wv[v];
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) store(out + t * out_step + v * kLanes, acc[t][v]);
}

// The tile kernels behind one interface, so that `tiles` can run either with any tile width.
template <int CG>
struct SmallGroups {
  static constexpr int kTile = kSmallTile<CG>;
  template <int T>
  static void tile(const Tap* taps, int ntaps, int64_t, int64_t in_step, int64_t, float* out, int64_t out_step) {
    tile_small<CG, T>(taps, ntaps, in_step, out, out_step);
  }
};
template <int V>
struct WideGroups {
  static constexpr int kTile = kWideTile<V>;
  template <int T>
  static void tile(const Tap* taps, int ntaps, int64_t cg, int64_t in_step, int64_t w_block, float* out,
                   int64_t out_step) {
    tile_big<T, V>(taps, ntaps, cg, in_step, w_block, out, out_step);
  }
};

// `count` output pixels: full tiles of T, then the remainder with the next narrower tile.
template <class Groups, int T = Groups::kTile>
void tiles(int64_t count, Tap* taps, int ntaps, int64_t cg, int64_t in_step, int64_t w_block, float* out,
           int64_t out_step) {
  if constexpr (T > 0) {
    for (; count >= T; count -= T) {
      Groups::template tile<T>(taps, ntaps, cg, in_step, w_block, out, out_step);
      for (int k = 0; k < ntaps; ++k) taps[k].in += T * in_step;
      out += T * out_step;
    }
    if (count > 0) tiles<Groups, T - 1>(count, taps, ntaps, cg, in_step, w_block, out, out_step);
  }
}

// Blocks that one wide-group tile computes together: kWideBlocks where they divide a group's blocks.
inline int64_t wide_blocks(int64_t cg) { return (cg / kLanes) % kWideBlocks == 0 ? kWideBlocks : 1; }

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
  const int64_t c = g.c, image = n * g.hin * g.win * c;
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
      Segment seg{((n * g.hout + r) * g.wout + p + u0 * out_cols) * c, cuts[s + 1] - u0, in_cols * g.in_pixel,
                  out_cols * c, taps->size(), 0};
      for (int64_t kr = 0; kr < g.kh; ++kr) {
        if (rows[kr] < 0) continue;
        for (int64_t kc = 0; kc < g.kw; ++kc) {
          const ColTap& t = cols[kc];
          if (!t.used || u0 < t.lo || u0 >= t.hi) continue;
          taps->push_back({image + (rows[kr] * g.win + t.a + u0 * in_cols) * g.in_pixel,
                           (kr * g.kw + kc) * g.cg * kLanes});
        }
      }
      seg.tap_end = taps->size();
      segs->push_back(seg);
    }
  }
}

// Block b (channels b * kLanes ...) of one segment's pixels; for wide groups blocks b .. b + wide_blocks - 1.
// `in` holds the groups from group_base on.
void run_segment(const Geom& g, const float* in, const float* w, float* out, const Segment& seg,
                 const TapOffset* offsets, int64_t b, Tap* taps, int64_t group_base = 0) {
  const int ntaps = static_cast<int>(seg.tap_end - seg.tap_begin);
  const int64_t group_first = (b * kLanes / g.cg - group_base) * g.in_group;  // the block's first group
  for (int k = 0; k < ntaps; ++k)
    taps[k] = {in + offsets[seg.tap_begin + k].in + group_first,
               w + offsets[seg.tap_begin + k].w + b * g.kh * g.kw * g.cg * kLanes};
  float* o = out + seg.out + b * kLanes;
  const int64_t w_block = g.kh * g.kw * g.cg * kLanes;
  const auto run = [&](auto groups) {
    tiles<decltype(groups)>(seg.count, taps, ntaps, g.cg, seg.in_step, w_block, o, seg.out_step);
  };
  if (with_small_groups(g.cg, [&](auto cg) { run(SmallGroups<decltype(cg)::value>{}); })) return;
  if (kWideBlocks > 1 && wide_blocks(g.cg) == kWideBlocks) {
    run(WideGroups<kWideBlocks>{});
  } else {
    run(WideGroups<1>{});
  }
}

// The kernel repacked as [block][tap][ci][kLanes]: a block's weights are contiguous. In the HWIO layout they
// lie C floats apart, which for C >= 1024 maps all of them to one L1 set.
std::vector<float> pack_kernel(const Geom& g, const float* kernel) {
  const int64_t blocks = g.c / kLanes, taps_ci = g.kh * g.kw * g.cg;
  std::vector<float> packed(taps_ci * g.c);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t tc = 0; tc < taps_ci; ++tc)
      std::memcpy(&packed[(b * taps_ci + tc) * kLanes], kernel + tc * g.c + b * kLanes, kLanes * sizeof(float));
  return packed;
}

// Output rows are split over threads. Within a share, small groups go row by row (each input row is read
// for all channel blocks while in L1); wide groups go block by block, so that a block's weights (9 x Cg
// vectors) stay in L1 across rows rather than the whole kernel streaming from L2 for every row.
void gather_conv(ffi::ThreadPool& pool, const Geom& g, const float* in, const float* kernel, float* out) {
  const int64_t rows = g.n * g.hout, blocks = g.c / kLanes;
  const std::vector<float> packed = pack_kernel(g, kernel);
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
      for (int64_t b = 0; b < blocks; b += wide_blocks(g.cg))
        for (const Segment& seg : segs) run_segment(g, in, w, out, seg, offsets.data(), b, taps.data());
    }
  });
}

// Rows [row_begin, row_end) of a copy of channel chunks [q_begin, q_end) of one NHWC image (h x w x c), laid
// out [chunk index - q_begin][hp][wp][chunk]: each chunk of channels' plane, with the image at row pt, column
// pl of it and zeros around it. chunk = c gives a zero-padded NHWC copy; chunk = cg a group-major one.
void copy_chunked(const float* in, int64_t h, int64_t w, int64_t c, int64_t chunk, int64_t hp, int64_t wp,
                  int64_t pt, int64_t pl, float* out, int64_t row_begin, int64_t row_end, int64_t q_begin = 0,
                  int64_t q_end = -1) {
  const int64_t plane = hp * wp * chunk, right = (wp - pl - w) * chunk;
  if (q_end < 0) q_end = c / chunk;
  for (int64_t q = q_begin; q < q_end; ++q) {
    for (int64_t rr = row_begin; rr < row_end; ++rr) {
      const int64_t r = rr - pt;
      float* o = out + (q - q_begin) * plane + rr * wp * chunk;
      if (r < 0 || r >= h) {
        std::memset(o, 0, wp * chunk * sizeof(float));
        continue;
      }
      std::memset(o, 0, pl * chunk * sizeof(float));
      o += pl * chunk;
      const float* i = in + r * w * c + q * chunk;
      if (chunk == c) {
        std::memcpy(o, i, w * c * sizeof(float));
      } else {  // chunk is a multiple of kLanes: vector copies (a memcpy call per pixel would cost more)
        for (int64_t col = 0; col < w; ++col)
          for (int64_t j = 0; j < chunk; j += kLanes) store(o + col * chunk + j, load(i + col * c + j));
      }
      std::memset(o + w * chunk, 0, right * sizeof(float));
    }
  }
}

// Stride-1 forwards with output rows narrower than this run on a zero-padded copy of the input (see below).
// Measured per layer on AVX-512 (benchmarks/conv_layers.py): 7x7x1024 6 -> 3 ms, 14x14x512 4.7 -> 4.0 ms;
// with stride 2 the copy (of the 2x larger input) costs more than it saves.
constexpr int64_t kPadBelowWidth = 16;

// The geometry of g on a zero-padded copy of its input with `top` zero rows and `left` zero columns before
// it: every tap is then valid for every output pixel (of a phase, for the input gradient), so each output row
// is one run of tiles. Otherwise the border columns split a row into runs of 1 and Wo - 2 pixels, and on 7-
// and 14-wide maps those runs are too short to keep enough independent accumulators (a 3x slower conv).
Geom padded_geom(const Geom& g, int64_t* top, int64_t* left) {
  Geom p = g;
  if (!g.transposed) {
    *top = g.pt, *left = g.pl;
    p.hin = std::max(g.hin + g.pt, (g.hout - 1) * g.sh + g.kh);
    p.win = std::max(g.win + g.pl, (g.wout - 1) * g.sw + g.kw);
    p.pt = p.pl = 0;
  } else {  // output row r reads input rows (r + pt - k) / sh: in range for every r and k
    *top = std::max<int64_t>(0, ceil_div(g.kh - 1 - g.pt, g.sh));
    *left = std::max<int64_t>(0, ceil_div(g.kw - 1 - g.pl, g.sw));
    p.pt = g.pt + *top * g.sh, p.pl = g.pl + *left * g.sw;
    p.hin = std::max(g.hin + *top, floor_div(g.hout - 1 + p.pt, g.sh) + 1);
    p.win = std::max(g.win + *left, floor_div(g.wout - 1 + p.pl, g.sw) + 1);
  }
  return p;
}

// The conv on a zero-padded NHWC copy of its input.
void gather_conv_padded(ffi::ThreadPool& pool, const Geom& g, const float* in, const float* kernel, float* out) {
  int64_t top, left;
  const Geom p = padded_geom(g, &top, &left);
  const int64_t image = p.hin * p.win * g.c;
  auto copy = buffer(g.n * image);
  parallel_for(pool, g.n * p.hin, chunks_for(pool, 4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / p.hin, stop = std::min(end, (n + 1) * p.hin);
      copy_chunked(in + n * g.hin * g.win * g.c, g.hin, g.win, g.c, g.c, p.hin, p.win, top, left,
                   copy.get() + n * image, i - n * p.hin, stop - n * p.hin);
      i = stop;
    }
  });
  gather_conv(pool, p, copy.get(), kernel, out);
}

// Groups per piece of work of the group-major paths: enough to fill a cache line of every pixel they read.
inline int64_t groups_per_piece(const Geom& g) {
  int64_t q = std::max<int64_t>(1, 16 / g.cg);
  while ((g.c / g.cg) % q != 0) --q;
  return q;
}

// Wide groups, kNarrowPaths: the work is split into pieces of one image and groups_per_piece groups. Each
// piece copies its groups' input planes into a zero-padded group-major buffer ([group][hp][wp][cg],
// L2-resident) and computes every output pixel of its channels from it, block by block. (One copy of the
// whole batch before the conv was 1.4-1.6x slower for Cg 8 at batch 8: it goes to memory and back.)
[[maybe_unused]] void gather_conv_groups(ffi::ThreadPool& pool, const Geom& g, const float* in, const float* kernel,
                                         float* out) {
  int64_t top, left;
  Geom p = padded_geom(g, &top, &left);
  const int64_t gq = groups_per_piece(g), pieces = g.n * (g.c / g.cg / gq), plane = p.hin * p.win * g.cg;
  const int64_t blocks = gq * g.cg / kLanes, step = wide_blocks(g.cg);
  p.n = 1, p.in_pixel = g.cg, p.in_group = plane;
  const std::vector<float> packed = pack_kernel(g, kernel);
  parallel_for(pool, pieces, chunks_for(pool, 8), [&](int64_t begin, int64_t end) {
    std::vector<Segment> segs;  // every output row of one image, on the buffer
    std::vector<TapOffset> offsets;
    for (int64_t r = 0; r < g.hout; ++r) plan_row(p, 0, r, &segs, &offsets);
    std::vector<Tap> taps(g.kh * g.kw);
    auto buf = buffer(gq * plane);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / (pieces / g.n), q0 = i % (pieces / g.n) * gq;
      copy_chunked(in + n * g.hin * g.win * g.c, g.hin, g.win, g.c, g.cg, p.hin, p.win, top, left, buf.get(), 0,
                   p.hin, q0, q0 + gq);
      float* o = out + n * g.hout * g.wout * g.c;
      for (int64_t b = q0 * g.cg / kLanes; b < q0 * g.cg / kLanes + blocks; b += step)
        for (const Segment& seg : segs)
          run_segment(p, buf.get(), packed.data(), o, seg, offsets.data(), b, taps.data(), q0);
    }
  });
}

// Forward and input gradient.
void conv(ffi::ThreadPool& pool, const Geom& g, const float* in, const float* kernel, float* out) {
  if constexpr (kNarrowPaths) {
    if (g.cg % kLanes == 0) return gather_conv_groups(pool, g, in, kernel, out);
  }
  if (!g.transposed && g.wout < kPadBelowWidth && g.sh == 1 && g.sw == 1 && (g.pt > 0 || g.pl > 0)) {
    gather_conv_padded(pool, g, in, kernel, out);
  } else {
    gather_conv(pool, g, in, kernel, out);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernel gradient: dw[kh, kw, ci, co] = sum over images and output pixels of x(tap) * dy, per block of co.

// Small groups, AVX-512 path: dw[kh, kw, ci, block b] += image n's sum, one tap at a time.
template <int CG>
void wgrad_block_small(const Geom& g, const float* x, const float* dy, float* dw, int64_t n, int64_t b) {
  const int64_t c = g.c;
  for (int64_t kr = 0; kr < g.kh; ++kr) {
    for (int64_t kc = 0; kc < g.kw; ++kc) {
      const int64_t lo = std::max<int64_t>(0, ceil_div(g.pl - kc, g.sw));
      const int64_t hi = std::min<int64_t>(g.wout, floor_div(g.win - 1 + g.pl - kc, g.sw) + 1);
      constexpr int P = kWgradPixels<CG>;
      vf acc[P][CG] = {};
      for (int64_t r = 0; r < g.hout; ++r) {
        const int64_t ir = r * g.sh - g.pt + kr;
        if (ir < 0 || ir >= g.hin || lo >= hi) continue;
        const float* xr = x + ((n * g.hin + ir) * g.win + kc - g.pl) * c + b * kLanes;
        const float* dr = dy + (n * g.hout + r) * g.wout * c + b * kLanes;
        int64_t u = lo;
        // P pixels at a time: P * CG independent FMA chains.
        for (; u + P <= hi; u += P)
          for (int p = 0; p < P; ++p)
            fma_group_bcast<CG>(acc[p], load(xr + (u + p) * g.sw * c), load(dr + (u + p) * c),
                                std::make_integer_sequence<int, CG>{});
        for (; u < hi; ++u)
          fma_group_bcast<CG>(acc[0], load(xr + u * g.sw * c), load(dr + u * c), std::make_integer_sequence<int, CG>{});
      }
      for (int ci = 0; ci < CG; ++ci) {
        float* o = dw + ((kr * g.kw + kc) * CG + ci) * c + b * kLanes;
        vf sum = load(o);
        for (int p = 0; p < P; ++p) sum += acc[p][ci];
        store(o, sum);
      }
    }
  }
}

// Small groups, kNarrowPaths: KC kernel columns kc0.. of one kernel row over output pixels [u0, u1) of one
// row. The pixel's dy is rotated within groups (CG - 1 shuffles) once for all KC columns: acc[j][s] lane
// q*CG + ci accumulates x[ci] * dy[(ci + s) mod CG] of group q, i.e. dw[tap][ci][(ci + s) mod CG].
// acc is [KC][CG][kLanes] floats, loaded and stored once per call.
template <int CG, int KC>
void wgrad_columns(float* acc, const float* xr, int64_t x_step, int64_t x_col, const float* dr, int64_t d_step,
                   int64_t u0, int64_t u1) {
  if (u0 >= u1) return;
  vf a[KC][CG];
  for (int j = 0; j < KC; ++j)
    for (int s = 0; s < CG; ++s) a[j][s] = load(acc + (j * CG + s) * kLanes);
  for (int64_t u = u0; u < u1; ++u) {
    vf d[CG];
    d[0] = load(dr + u * d_step);
    static_for<CG - 1>([&](auto s) { d[s + 1] = group_rotate<CG, decltype(s)::value + 1>(d[0]); });
    for (int j = 0; j < KC; ++j) {
      const vf xv = load(xr + u * x_step + j * x_col);
      for (int s = 0; s < CG; ++s) a[j][s] += xv * d[s];
    }
  }
  for (int j = 0; j < KC; ++j)
    for (int s = 0; s < CG; ++s) store(acc + (j * CG + s) * kLanes, a[j][s]);
}

// Image n's sums into acc_all [block][kh * kw][CG][kLanes] (rotated as in wgrad_columns), output row by
// output row, all blocks of a row while its x and dy rows are in cache. Per kernel row, the pixels where all
// of a group of KC kernel columns are in the image go through wgrad_columns<KC> together, the border pixels
// column by column.
template <int CG>
void wgrad_rows_small(const Geom& g, const float* x, const float* dy, float* acc_all, int64_t n) {
  constexpr int KC = kWgradColumns<CG>;
  const int64_t c = g.c, blocks = c / kLanes;
  for (int64_t rb = 0; rb < g.hout * blocks; ++rb) {
    const int64_t r = rb / blocks, b = rb % blocks;
    float* acc = acc_all + b * g.kh * g.kw * CG * kLanes;
    const float* dr = dy + (n * g.hout + r) * g.wout * c + b * kLanes;
    for (int64_t kr = 0; kr < g.kh; ++kr) {
      const int64_t ir = r * g.sh - g.pt + kr;
      if (ir < 0 || ir >= g.hin) continue;
      const float* xr = x + ((n * g.hin + ir) * g.win - g.pl) * c + b * kLanes;  // + (u * sw + kc) * c
      for (int64_t kc0 = 0; kc0 < g.kw; kc0 += KC) {
        const int kcs = static_cast<int>(std::min<int64_t>(KC, g.kw - kc0));
        // Output columns where column kc reads inside the image: [lo(kc), hi(kc)).
        const auto lo = [&](int64_t kc) { return std::clamp<int64_t>(ceil_div(g.pl - kc, g.sw), 0, g.wout); };
        const auto hi = [&](int64_t kc) {
          return std::clamp<int64_t>(floor_div(g.win - 1 + g.pl - kc, g.sw) + 1, lo(kc), g.wout);
        };
        int64_t all_lo = 0, all_hi = g.wout;
        for (int64_t kc = kc0; kc < kc0 + kcs; ++kc) {
          all_lo = std::max(all_lo, lo(kc));
          all_hi = std::min(all_hi, hi(kc));
        }
        float* a = acc + (kr * g.kw + kc0) * CG * kLanes;
        const float* xk = xr + kc0 * c;
        if (all_lo < all_hi) {
          static_for<KC>([&](auto j) {
            constexpr int kKc = decltype(j)::value + 1;
            if (kcs == kKc) wgrad_columns<CG, kKc>(a, xk, g.sw * c, c, dr, c, all_lo, all_hi);
          });
        } else {
          all_lo = all_hi = lo(kc0);
        }
        for (int j = 0; j < kcs; ++j) {  // the border pixels, one column at a time
          float* aj = a + j * CG * kLanes;
          wgrad_columns<CG, 1>(aj, xk + j * c, g.sw * c, c, dr, c, lo(kc0 + j), std::min(hi(kc0 + j), all_lo));
          wgrad_columns<CG, 1>(aj, xk + j * c, g.sw * c, c, dr, c, std::max(lo(kc0 + j), all_hi), hi(kc0 + j));
        }
      }
    }
  }
}

// Wide groups, AVX-512 path: dw[kh, kw, ci, block b] += image n's sum, on NHWC x and dy.
[[maybe_unused]] void wgrad_block_big(const Geom& g, const float* x, const float* dy, float* dw, int64_t n, int64_t b) {
  const int64_t c = g.c, group_first = (b * kLanes / g.cg) * g.cg;
  for (int64_t kr = 0; kr < g.kh; ++kr) {
    for (int64_t kc = 0; kc < g.kw; ++kc) {
      const int64_t lo = std::max<int64_t>(0, ceil_div(g.pl - kc, g.sw));
      const int64_t hi = std::min<int64_t>(g.wout, floor_div(g.win - 1 + g.pl - kc, g.sw) + 1);
      for (int64_t c0 = 0; c0 < g.cg; c0 += kLanes) {
        vf acc[kLanes] = {};
        for (int64_t r = 0; r < g.hout; ++r) {
          const int64_t ir = r * g.sh - g.pt + kr;
          if (ir < 0 || ir >= g.hin) continue;
          const float* xr = x + ((n * g.hin + ir) * g.win + kc - g.pl) * c + group_first + c0;
          const float* dr = dy + (n * g.hout + r) * g.wout * c + b * kLanes;
          for (int64_t u = lo; u < hi; ++u) {
            vf d = load(dr + u * c);
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

// Wide groups, kNarrowPaths: the same on copies of some of one image's groups (see wgrad): xg group-major
// and zero-padded ([group - q0][hp][wp][cg], every tap valid for every output pixel), db block-major
// ([block - b0][hout][wout][kLanes]).
[[maybe_unused]] void wgrad_block_big_copied(const Geom& g, int64_t hp, int64_t wp, const float* xg, int64_t q0,
                                             const float* db, int64_t b0, float* dw, int64_t b) {
  const int64_t c = g.c, cg = g.cg;
  const float* xq = xg + (b * kLanes / cg - q0) * hp * wp * cg;
  const float* d = db + (b - b0) * g.hout * g.wout * kLanes;
  for (int64_t kr = 0; kr < g.kh; ++kr) {
    for (int64_t kc = 0; kc < g.kw; ++kc) {
      for (int64_t c0 = 0; c0 < cg; c0 += kLanes) {
        vf acc[kLanes] = {};
        for (int64_t r = 0; r < g.hout; ++r) {
          const float* xr = xq + ((r * g.sh + kr) * wp + kc) * cg + c0;
          const float* dr = d + r * g.wout * kLanes;
          for (int64_t u = 0; u < g.wout; ++u) {
            const vf dv = load(dr + u * kLanes);
            const float* xp = xr + u * g.sw * cg;
            for (int j = 0; j < kLanes; ++j) acc[j] += xp[j] * dv;
          }
        }
        for (int j = 0; j < kLanes; ++j) {
          float* o = dw + ((kr * g.kw + kc) * cg + c0 + j) * c + b * kLanes;
          store(o, load(o) + acc[j]);
        }
      }
    }
  }
}

// Images are split over threads, each summing into its own partial dw, added up at the end.
void wgrad(ffi::ThreadPool& pool, const Geom& g, const float* x, const float* dy, float* dw) {
  const int64_t size = g.kh * g.kw * g.cg * g.c, blocks = g.c / kLanes, ntaps = g.kh * g.kw;
  const int64_t parts = std::max<int64_t>(1, std::min(g.n, std::max<int64_t>(pool.num_threads(), 1)));
  const bool small = g.cg < kLanes, rotated = small && kNarrowPaths, copied = !small && kNarrowPaths;
  // Partial sums: dw's layout, or for `rotated` [block][tap][s][kLanes] (see wgrad_columns).
  std::vector<std::vector<float>> partial(parts, std::vector<float>(size, 0.f));
  // `copied`: per image, groups_per_piece groups at a time, x's planes and dy's blocks are copied (L2-resident).
  int64_t top, left;
  const Geom p = padded_geom(g, &top, &left);
  const int64_t hp = p.hin, wp = p.win, gq = groups_per_piece(g), qb = gq * g.cg / kLanes;
  parallel_for(pool, parts, parts, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> xg, db;
    if (copied) xg = buffer(gq * hp * wp * g.cg), db = buffer(qb * g.hout * g.wout * kLanes);
    for (int64_t part = begin; part < end; ++part) {
      float* acc = partial[part].data();
      for (int64_t n = part * g.n / parts; n < (part + 1) * g.n / parts; ++n) {
        if constexpr (kNarrowPaths) {
          if (rotated) {
            with_small_groups(g.cg, [&](auto cg) { wgrad_rows_small<decltype(cg)::value>(g, x, dy, acc, n); });
            continue;
          }
          for (int64_t q0 = 0; q0 < g.c / g.cg; q0 += gq) {
            const int64_t b0 = q0 * g.cg / kLanes;
            copy_chunked(x + n * g.hin * g.win * g.c, g.hin, g.win, g.c, g.cg, hp, wp, top, left, xg.get(), 0, hp, q0,
                         q0 + gq);
            copy_chunked(dy + n * g.hout * g.wout * g.c, g.hout, g.wout, g.c, kLanes, g.hout, g.wout, 0, 0, db.get(),
                         0, g.hout, b0, b0 + qb);
            for (int64_t b = b0; b < b0 + qb; ++b)
              wgrad_block_big_copied(g, hp, wp, xg.get(), q0, db.get(), b0, acc, b);
          }
        } else {
          for (int64_t b = 0; b < blocks; ++b) {
            if (!with_small_groups(g.cg, [&](auto cg) { wgrad_block_small<decltype(cg)::value>(g, x, dy, acc, n, b); }))
              wgrad_block_big(g, x, dy, acc, n, b);
          }
        }
      }
    }
  });
  for (int64_t part = 1; part < parts; ++part)
    for (int64_t i = 0; i < size; ++i) partial[0][i] += partial[part][i];
  const float* sum = partial[0].data();
  if (!rotated) {
    std::copy(sum, sum + size, dw);
    return;
  }
  // [block][tap][s][lane q * cg + ci] -> dw[tap][ci][block * kLanes + q * cg + (ci + s) mod cg].
  const int64_t cg = g.cg;
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t t = 0; t < ntaps; ++t)
      for (int64_t s = 0; s < cg; ++s)
        for (int64_t l = 0; l < kLanes; ++l)
          dw[(t * cg + l % cg) * g.c + b * kLanes + (l / cg) * cg + (l % cg + s) % cg] =
              sum[((b * ntaps + t) * cg + s) * kLanes + l];
}

// ---------------------------------------------------------------------------------------------------------

bool supported_group_size(int64_t cg) { return cg == 1 || cg == 2 || cg == 4 || cg == 8 || cg % kLanes == 0; }

// Checks the 4-D shapes and fills the geometry; x/y are NHWC, w is [KH, KW, Cg, C].
ffi::Error make_geom(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out, ffi::Span<const int64_t> w,
                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, bool transposed, Geom* g) {
  if (in.size() != 4 || out.size() != 4 || w.size() != 4)
    return ffi::Error::InvalidArgument("grouped_conv: expected 4-D NHWC activations and a 4-D HWIO kernel");
  if (in[0] != out[0] || in[3] != out[3] || w[3] != in[3])
    return ffi::Error::InvalidArgument("grouped_conv: batch or channel counts of the operands differ");
  if (in[3] % kLanes != 0 || !supported_group_size(w[2]) || in[3] % w[2] != 0)
    return ffi::Error::InvalidArgument("grouped_conv: channels must be a multiple of the vector width and group "
                                       "size 1, 2, 4, 8 or a multiple of the vector width");
  if (sh < 1 || sw < 1 || pt < 0 || pl < 0)
    return ffi::Error::InvalidArgument("grouped_conv: strides must be positive and paddings non-negative");
  *g = nhwc_geom(in[0], in[1], in[2], out[1], out[2], in[3], w[2], w[0], w[1], sh, sw, pt, pl, transposed);
  return ffi::Error::Success();
}

enum class Op { kForward, kInputGrad, kKernelGrad };

// One entry for the three ops: (a, b) -> out is (x, w) -> y, (dy, w_t) -> dx or (x, dy) -> dw, where
// w_t is the per-group transposed kernel and sh..pl are always the forward convolution's.
template <Op op>
ffi::Error Run(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs attrs) {
  constexpr bool kernel_grad = op == Op::kKernelGrad;
  auto in = f32_args<2>(args);
  auto out = f32_rets<1>(rets);
  const auto sh = attr<int64_t>(attrs, "sh"), sw = attr<int64_t>(attrs, "sw"), pt = attr<int64_t>(attrs, "pt"),
             pl = attr<int64_t>(attrs, "pl");
  if (!(in && out && sh && sw && pt && pl)) return bad_call("grouped_conv", args.size(), rets.size());
  auto& [a, b] = *in;
  auto& [y] = *out;
  Geom g;
  ffi::Error e = make_geom(a.dimensions(), kernel_grad ? b.dimensions() : y->dimensions(),
                           kernel_grad ? y->dimensions() : b.dimensions(), *sh, *sw, *pt, *pl, op == Op::kInputGrad,
                           &g);
  if (e.failure()) return e;
  if constexpr (kernel_grad) {
    wgrad(pool, g, a.typed_data(), b.typed_data(), y->typed_data());
  } else {
    conv(pool, g, a.typed_data(), b.typed_data(), y->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace grouped_conv_kernels

RESNEXT_JAX_FFI_HANDLER(GroupedConvForward, grouped_conv_kernels::Run<grouped_conv_kernels::Op::kForward>);
RESNEXT_JAX_FFI_HANDLER(GroupedConvInputGrad, grouped_conv_kernels::Run<grouped_conv_kernels::Op::kInputGrad>);
RESNEXT_JAX_FFI_HANDLER(GroupedConvKernelGrad, grouped_conv_kernels::Run<grouped_conv_kernels::Op::kKernelGrad>);
