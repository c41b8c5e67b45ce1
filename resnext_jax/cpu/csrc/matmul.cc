// 1x1 convolutions for XLA:CPU as FFI custom calls: a register-blocked float32 GEMM for the forward and the
// input gradient (y = x w, dx = dy w^T) and one for the kernel gradient (dw = x^T dy, summed over the batch).
//
// Why: a ResNeXt-50 train step spends about 60% of its CPU time in these products. XLA:CPU hands them to
// YNNPACK, which runs the step's shapes at ~440 GFLOP/s (forward, input gradient) and ~340 (kernel gradient)
// on two Zen 5 cores (peak ~560); these tiles reach ~490 and ~420 (benchmarks/gemm_shapes.py,
// docs/performance.md).
//
// Layout: x [N, H, W, K], w [K, C], y [N, H, W, C]; rows are the N*H*W pixels. C (the vector dimension)
// must be a multiple of kLanes (the Python side sends multiples of 16); K and the row count are arbitrary.
//
// The register tile (R rows x V vectors of accumulators) and the block sizes are functions of the vector width
// and register count (vec.h), one source for every ISA; `Gemm<R, V, ...>` takes them as template parameters.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "ffi_call.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace resnext_jax;  // NOLINT: ffi_call.h, parallel.h and vec.h helpers

namespace matmul_kernels {  // named: build.py may compile the sources as one translation unit
namespace {

using Array = ffi::Buffer<ffi::F32>;      // any rank
using Matrix = ffi::Buffer<ffi::F32, 2>;

// The register tile and block sizes per ISA, from kLanes and kVectorRegisters (vec.h):
//   AVX-512 (16 lanes, 32 registers): 6 rows x 4 vectors (6 x 64 floats): 24 accumulators + 4 vectors of w + 1
//     broadcast of x; kDepth 512, kRowBlock 96, kKernelGradRows 256 (tuned on Zen 5, panels then read in
//     place). Packed panels, on Zen 4 (one core on half the rows of the resnext50 train step's 13 shapes, a
//     scratch harness alternating both, three runs): 3,591-3,675 ms against 3,767-3,853 in place (-4.5%), -7
//     to -16% where C >= 1024; kDepth 256 or kRowBlock 192 with packing no better (3,661, 3,630 vs 3,614).
//   AVX2 and SSE (16 registers): 6 rows x 2 vectors (BLIS's Haswell 6x16 on AVX2): 12 accumulators + 2 + 1.
//     Measured single-threaded on AVX2 (Zen 3) over the resnext50 train step's 1x1 products against 4x3, 3x4,
//     5x2, 4x2 and 8x1 tiles (4x3 and 3x4 25-35% slower in the input and kernel gradients, 8x1 ~2x), and on
//     SSE (x86-64-v2) against 4x3, 4x2 and 3x3. Packed panels (see Gemm): forward -21%, input gradient -18%,
//     kernel gradient -16% on AVX2 (most for C >= 512), about even on SSE. kDepth 256 (a panel's slice, 256 x
//     16 floats, then fills half of L1) 2-4% faster than 512 before packing, even after; kRowBlock 48 or 192,
//     kKernelGradRows 512 no better, 128 ~8% slower.
//   NEON (4 lanes, 32 registers): 5 rows x 4 vectors (5 x 16 floats). GCC keeps each row's x in its own
//     register for fmla by element, so a tile needs R*V + V + R registers: 6 x 4 spills an accumulator every
//     step (GCC 12 at -O3), 5 x 4 (29) does not. Blocks and packing as AVX2's (the same 16-column panel).
//     Untuned: no aarch64 machine measured.
constexpr int kVecs = kVectorRegisters >= 32 ? 4 : 2;                 // V: vectors per tile row
constexpr int kRows = kVectorRegisters >= 32 && kLanes < 16 ? 5 : 6;  // R: output rows of one register tile
constexpr bool kWideTile = kLanes * kVecs >= 64;                      // AVX-512's 6 x 64 tile
constexpr int64_t kDepth = kWideTile ? 512 : 256;  // forward: reduction steps per pass over a row block
constexpr int64_t kRowBlock = 96;                  // forward: rows of x kept in L2 while w's panels pass
constexpr int64_t kKernelGradRows = 256;           // kernel gradient: pixels summed per pass over dw's tiles
static_assert(kRows * kVecs + kVecs + 1 <= kVectorRegisters, "the register tile must fit the registers");

// c[i, kLanes*v : +kLanes] (+)= sum_p a[i * a_row + p * a_step] * b[p * b_step + kLanes*v : +kLanes], i < R,
// v < V. The R x V accumulators live in registers for all `steps`: V vector loads of b and R broadcasts of a
// feed R * V fused multiply-adds.
template <int R, int V, bool kAccumulate>
inline void tile(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t b_step, float* c,
                 int64_t c_row, int64_t steps) {
  vf acc[R][V];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = kAccumulate ? load(c + i * c_row + kLanes * v) : vf{};
#ifdef __clang__
#pragma clang loop unroll(disable)  // clang unrolls this loop 4x and runs out of registers: 30-50% slower on AVX2
#endif
  for (int64_t p = 0; p < steps; ++p) {
    vf bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = load(b + p * b_step + kLanes * v);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const vf ai = splat(a[i * a_row + p * a_step]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] += ai * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) store(c + i * c_row + kLanes * v, acc[i][v]);
}

// A tile of `rows` <= R rows and `vecs` <= V vectors: the edge tiles too.
struct Tile {
  const float* a;
  int64_t a_row, a_step;
  const float* b;
  int64_t b_step;
  float* c;
  int64_t c_row, steps;
};

template <int R, int V, bool kAccumulate>
void run_rows(int rows, const Tile& t) {
  if constexpr (R > 1) {
    if (rows < R) return run_rows<R - 1, V, kAccumulate>(rows, t);
  }
  tile<R, V, kAccumulate>(t.a, t.a_row, t.a_step, t.b, t.b_step, t.c, t.c_row, t.steps);
}

template <int R, int V, bool kAccumulate>
void run_vecs(int rows, int vecs, const Tile& t) {
  if constexpr (V > 1) {
    if (vecs < V) return run_vecs<R, V - 1, kAccumulate>(rows, vecs, t);
  }
  run_rows<R, V, kAccumulate>(rows, t);
}

// Uninitialised float storage, 64-byte aligned: a vector must not straddle two cache lines (malloc aligns to
// 16 bytes, and split loads made packed panels slower than none).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n) : storage_(n > 0 ? new float[n + 16] : nullptr) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(storage_.get());
    data_ = storage_.get() + ((64 - p % 64) % 64) / sizeof(float);
  }
  float* data() { return data_; }

 private:
  std::unique_ptr<float[]> storage_;
  float* data_;
};

// The two products on R x V register tiles with the given block sizes (see kRows ... kKernelGradRows).
//
// The tiles read the column panels of w (forward) and dy (kernel gradient) from contiguous copies.
// Read in place, a panel's rows are C floats apart, so for C >= 256 they fall into a few cache sets and the
// panel cannot stay in L1 (for C >= 1024, nor in L2) however few its rows. w is packed whole, once per call
// (pack_w; packing each panel again for every block of rows cost more than it saved), dy a block of pixels
// and one panel at a time, where the K / R tiles of dw's rows that reuse it are 16 or more.
template <int R, int V, int64_t kDepthT, int64_t kRowBlockT, int64_t kKernelGradRowsT>
struct Gemm {
  static constexpr int64_t kPanel = kLanes * V;  // output columns of a full tile

  static void run_tile(bool accumulate, int rows, int vecs, const Tile& t) {
    if (accumulate) {
      run_vecs<R, V, true>(rows, vecs, t);
    } else {
      run_vecs<R, V, false>(rows, vecs, t);
    }
  }

  // Rows [0, n) of the panel of `vecs` vectors a row at b (rows b_step apart) into out, kPanel floats a row.
  static void copy_panel(const float* b, int64_t b_step, int64_t n, int vecs, float* out) {
    for (int64_t p = 0; p < n; ++p)
      for (int v = 0; v < vecs; ++v) store(out + p * kPanel + v * kLanes, load(b + p * b_step + v * kLanes));
  }

  // Column panels [j0, j1) of w [K, C] into `packed` [ceil(C / kPanel) panels][K][kPanel] (the panel at
  // column j starts at j * K), for forward_rows.
  static void pack_w(const float* w, int64_t k, int64_t c, int64_t j0, int64_t j1, float* packed) {
    for (int64_t j = j0 * kPanel; j < std::min(c, j1 * kPanel); j += kPanel)
      copy_panel(w + j, c, k, static_cast<int>(std::min(kPanel, c - j) / kLanes), packed + j * k);
  }

  // y[m0:m1] = x[m0:m1] w for x [M, K], w [K, C] (packed by pack_w), y [M, C]. A block of rows and
  // depth stays in L2 while every column panel of w passes over it. C is a multiple of kLanes, not necessarily
  // of kPanel: the last panel may be narrower.
  static void forward_rows(const float* x, const float* w, float* y, int64_t m0, int64_t m1, int64_t k,
                           int64_t c) {
    for (int64_t r0 = m0; r0 < m1; r0 += kRowBlockT) {
      const int64_t r1 = std::min(m1, r0 + kRowBlockT);
      for (int64_t d0 = 0; d0 < k; d0 += kDepthT) {
        const int64_t depth = std::min(kDepthT, k - d0);
        for (int64_t j = 0; j < c; j += kPanel) {
          const int vecs = static_cast<int>(std::min(kPanel, c - j) / kLanes);
          const float* b = w + j * k + d0 * kPanel;
          for (int64_t r = r0; r < r1; r += R) {
            const int rows = static_cast<int>(std::min<int64_t>(R, r1 - r));
            run_tile(d0 > 0, rows, vecs, Tile{x + r * k + d0, k, 1, b, kPanel, y + r * c + j, c, depth});
          }
        }
      }
    }
  }

  // dw = x[m0:m1]^T dy[m0:m1] for x [M, K], dy [M, C], dw [K, C]: the same tiles with the rows of dw as the
  // tile rows and the pixels as the reduction. Each block of pixels of x is first copied into R-wide column
  // strips (zero-padded), so that a tile's broadcasts read one contiguous strip instead of a line of x per
  // pixel (~5% faster on AVX-512).
  static void kernel_grad_rows(const float* x, const float* dy, float* dw, int64_t m0, int64_t m1, int64_t k,
                               int64_t c) {
    if (m0 >= m1) std::fill(dw, dw + k * c, 0.f);
    const int64_t strips = (k + R - 1) / R;
    std::vector<float> packed(strips * kKernelGradRowsT * R);
    AlignedFloats panel(kKernelGradRowsT * kPanel);
    for (int64_t p0 = m0; p0 < m1; p0 += kKernelGradRowsT) {
      const int64_t steps = std::min(m1, p0 + kKernelGradRowsT) - p0;
      for (int64_t s = 0; s < strips; ++s) {
        const int rows = static_cast<int>(std::min<int64_t>(R, k - s * R));
        float* strip = packed.data() + s * steps * R;
        for (int64_t p = 0; p < steps; ++p) {
          const float* src = x + (p0 + p) * k + s * R;
          for (int i = 0; i < R; ++i) strip[p * R + i] = i < rows ? src[i] : 0.f;
        }
      }
      for (int64_t j = 0; j < c; j += kPanel) {
        const int vecs = static_cast<int>(std::min(kPanel, c - j) / kLanes);
        const float* b = dy + p0 * c + j;
        int64_t b_step = c;
        if (strips >= 16) {  // the copy's cost against the strided reads of the tiles that share it
          copy_panel(b, b_step, steps, vecs, panel.data());
          b = panel.data();
          b_step = kPanel;
        }
        for (int64_t s = 0; s < strips; ++s) {
          const int rows = static_cast<int>(std::min<int64_t>(R, k - s * R));
          run_tile(p0 > m0, rows, vecs,
                   Tile{packed.data() + s * steps * R, 1, R, b, b_step, dw + s * R * c + j, c, steps});
        }
      }
    }
  }
};

using Kernel = Gemm<kRows, kVecs, kDepth, kRowBlock, kKernelGradRows>;

// The rows (product of the leading dimensions) of `dims` if its last dimension is `width`, else -1.
int64_t rows_of(ffi::Span<const int64_t> dims, int64_t width) {
  if (dims.size() == 0 || dims.back() != width) return -1;
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

// y = x w over the last dimension of x (the forward, and the input gradient with w transposed).
ffi::Error Forward(ffi::ThreadPool pool, Array x, Matrix w, ffi::Result<Array> y) {
  const int64_t k = w.dimensions()[0], c = w.dimensions()[1], m = rows_of(x.dimensions(), k);
  if (m < 0 || rows_of(y->dimensions(), c) != m || c % kLanes != 0)
    return ffi::Error::InvalidArgument(
        "matmul: expected x [.., K], w [K, C], y [.., C], C a multiple of the vector width (" RESNEXT_JAX_ISA ")");
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t panels = (c + Kernel::kPanel - 1) / Kernel::kPanel;
  AlignedFloats packed(panels * Kernel::kPanel * k);  // the last panel may be narrower
  parallel_for(pool, panels, chunks_for(pool, 1), [&](int64_t begin, int64_t end) {
    Kernel::pack_w(w.typed_data(), k, c, begin, end, packed.data());
  });
  parallel_for(pool, m, chunks_for(pool, 2), [&](int64_t begin, int64_t end) {
    Kernel::forward_rows(xp, packed.data(), yp, begin, end, k, c);
  });
  return ffi::Error::Success();
}

// dw = x^T dy summed over all leading dimensions: each thread sums a share of the rows into its own buffer
// (the first into dw), then the buffers are added.
ffi::Error KernelGrad(ffi::ThreadPool pool, Array x, Array dy, ffi::Result<Matrix> dw) {
  const int64_t k = dw->dimensions()[0], c = dw->dimensions()[1], m = rows_of(x.dimensions(), k);
  if (m < 0 || rows_of(dy.dimensions(), c) != m || c % kLanes != 0)
    return ffi::Error::InvalidArgument(
        "matmul: expected x [.., K], dy [.., C], dw [K, C], C a multiple of the vector width (" RESNEXT_JAX_ISA ")");
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float* out = dw->typed_data();
  const int64_t shares = std::min<int64_t>(chunks_for(pool, 1), std::max<int64_t>(1, m / kKernelGradRows));
  std::vector<float> partial((shares - 1) * k * c);
  auto share_out = [&](int64_t s) { return s == 0 ? out : partial.data() + (s - 1) * k * c; };
  parallel_for(pool, shares, shares, [&](int64_t s, int64_t) {
    Kernel::kernel_grad_rows(xp, gp, share_out(s), s * m / shares, (s + 1) * m / shares, k, c);
  });
  if (shares > 1) {
    parallel_for(pool, k * c, chunks_for(pool, 4), [&](int64_t begin, int64_t end) {
      for (int64_t s = 1; s < shares; ++s) {
        const float* p = share_out(s);
        for (int64_t i = begin; i < end; ++i) out[i] += p[i];
      }
    });
  }
  return ffi::Error::Success();
}

// The entry points: the generic FFI call (ffi_call.h) -> the typed ops above. The [K, C] weights (or their
// gradient) are the second operand (the result) and must be 2-D.
ffi::Error ForwardCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs) {
  const auto x = arg<Array>(args, 0);
  const auto w = arg<Matrix>(args, 1);
  auto y = f32_rets<1>(rets);
  if (args.size() != 2 || !(x && w && y)) return bad_call("matmul forward", args.size(), rets.size());
  return Forward(pool, *x, *w, (*y)[0]);
}

ffi::Error KernelGradCall(ffi::ThreadPool pool, FfiArgs args, FfiRets rets, FfiAttrs) {
  auto in = f32_args<2>(args);
  auto dw = ret<Matrix>(rets, 0);
  if (rets.size() != 1 || !(in && dw)) return bad_call("matmul kernel_grad", args.size(), rets.size());
  return KernelGrad(pool, (*in)[0], (*in)[1], *dw);
}

}  // namespace
}  // namespace matmul_kernels

RESNEXT_JAX_FFI_HANDLER(MatMulForward, matmul_kernels::ForwardCall);
RESNEXT_JAX_FFI_HANDLER(MatMulKernelGrad, matmul_kernels::KernelGradCall);
