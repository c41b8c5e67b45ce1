// 1x1 convolutions for XLA:CPU as FFI custom calls: a register-blocked float32 GEMM for the forward and the
// input gradient (y = x w, dx = dy w^T) and one for the kernel gradient (dw = x^T dy, summed over the batch).
//
// Why: a ResNeXt-50 train step spends about 60% of its CPU time in these products. XLA:CPU hands them to
// YNNPACK, which runs the step's shapes at ~440 GFLOP/s (forward, input gradient) and ~340 (kernel gradient)
// on two Zen 5 cores (peak ~560); these tiles reach ~490 and ~420 (benchmarks/gemm_shapes.py,
// docs/performance.md).
//
// Layout: x [N, H, W, K], w [K, C], y [N, H, W, C]; rows are the N*H*W pixels. C (the vector dimension)
// must be a multiple of 16; K and the row count are arbitrary.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace resnext_jax;  // NOLINT: parallel.h and vec.h helpers

namespace {

using Array = ffi::Buffer<ffi::F32>;      // any rank
using Matrix = ffi::Buffer<ffi::F32, 2>;

constexpr int kRows = 6;   // output rows of one register tile
constexpr int kVecs = 4;   // 16-float vectors per tile row: 6 x 64 accumulators in 24 of the 32 registers
constexpr int64_t kDepth = 512;        // forward: reduction steps per pass over a row block (y reloaded after)
constexpr int64_t kRowBlock = 96;      // forward: rows of x that stay in L2 while every column panel of w passes
constexpr int64_t kKernelGradRows = 256;  // kernel gradient: pixels summed per pass before dw's tile is stored

// c[i, 16v:16v+16] (+)= sum_p a[i * a_row + p * a_step] * b[p * b_step + 16v : +16], i < R, v < V.
// The R x 16V accumulators live in registers for all `steps`: one vector load of b and R broadcasts of a
// feed R * V fused multiply-adds.
template <int R, int V, bool kAccumulate>
inline void tile(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t b_step, float* c,
                 int64_t c_row, int64_t steps) {
  v16 acc[R][V];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = kAccumulate ? load(c + i * c_row + kLanes * v) : v16{};
  for (int64_t p = 0; p < steps; ++p) {
    v16 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = load(b + p * b_step + kLanes * v);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const v16 ai = v16{} + a[i * a_row + p * a_step];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] += ai * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) store(c + i * c_row + kLanes * v, acc[i][v]);
}

// A tile of `rows` <= kRows rows and `vecs` <= kVecs vectors: the edge tiles too.
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

template <int V, bool kAccumulate>
void run_vecs(int rows, int vecs, const Tile& t) {
  if constexpr (V > 1) {
    if (vecs < V) return run_vecs<V - 1, kAccumulate>(rows, vecs, t);
  }
  run_rows<kRows, V, kAccumulate>(rows, t);
}

void run_tile(bool accumulate, int rows, int vecs, const Tile& t) {
  if (accumulate) {
    run_vecs<kVecs, true>(rows, vecs, t);
  } else {
    run_vecs<kVecs, false>(rows, vecs, t);
  }
}

constexpr int64_t kPanel = kLanes * kVecs;  // output columns of a full tile

// y[m0:m1] = x[m0:m1] w for x [M, K], w [K, C], y [M, C]. A block of rows and depth stays in L2 while every
// column panel passes over it; w is read in place (rows of a panel are contiguous 256-byte runs).
void forward_rows(const float* x, const float* w, float* y, int64_t m0, int64_t m1, int64_t k, int64_t c) {
  for (int64_t r0 = m0; r0 < m1; r0 += kRowBlock) {
    const int64_t r1 = std::min(m1, r0 + kRowBlock);
    for (int64_t d0 = 0; d0 < k; d0 += kDepth) {
      const int64_t depth = std::min(kDepth, k - d0);
      for (int64_t j = 0; j < c; j += kPanel) {
        const int vecs = static_cast<int>(std::min(kPanel, c - j) / kLanes);
        for (int64_t r = r0; r < r1; r += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, r1 - r));
          run_tile(d0 > 0, rows, vecs, Tile{x + r * k + d0, k, 1, w + d0 * c + j, c, y + r * c + j, c, depth});
        }
      }
    }
  }
}

// dw = x[m0:m1]^T dy[m0:m1] for x [M, K], dy [M, C], dw [K, C]: the same tiles with the rows of dw as the
// tile rows and the pixels as the reduction. Each block of pixels of x is first copied into kRows-wide column
// strips (zero-padded), so that a tile's broadcasts read one contiguous strip instead of a line of x per
// pixel (~5% faster).
void kernel_grad_rows(const float* x, const float* dy, float* dw, int64_t m0, int64_t m1, int64_t k, int64_t c) {
  if (m0 >= m1) std::fill(dw, dw + k * c, 0.f);
  const int64_t strips = (k + kRows - 1) / kRows;
  std::vector<float> packed(strips * kKernelGradRows * kRows);
  for (int64_t p0 = m0; p0 < m1; p0 += kKernelGradRows) {
    const int64_t steps = std::min(m1, p0 + kKernelGradRows) - p0;
    for (int64_t s = 0; s < strips; ++s) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, k - s * kRows));
      float* strip = packed.data() + s * steps * kRows;
      for (int64_t p = 0; p < steps; ++p) {
        const float* src = x + (p0 + p) * k + s * kRows;
        for (int i = 0; i < kRows; ++i) strip[p * kRows + i] = i < rows ? src[i] : 0.f;
      }
    }
    for (int64_t j = 0; j < c; j += kPanel) {
      const int vecs = static_cast<int>(std::min(kPanel, c - j) / kLanes);
      for (int64_t s = 0; s < strips; ++s) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, k - s * kRows));
        run_tile(p0 > m0, rows, vecs,
                 Tile{packed.data() + s * steps * kRows, 1, kRows, dy + p0 * c + j, c, dw + s * kRows * c + j, c,
                      steps});
      }
    }
  }
}

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
    return ffi::Error::InvalidArgument("matmul: expected x [.., K], w [K, C], y [.., C] with C a multiple of 16");
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, m, chunks_for(pool, 2), [&](int64_t begin, int64_t end) {
    forward_rows(xp, wp, yp, begin, end, k, c);
  });
  return ffi::Error::Success();
}

// dw = x^T dy summed over all leading dimensions: each thread sums a share of the rows into its own buffer
// (the first into dw), then the buffers are added.
ffi::Error KernelGrad(ffi::ThreadPool pool, Array x, Array dy, ffi::Result<Matrix> dw) {
  const int64_t k = dw->dimensions()[0], c = dw->dimensions()[1], m = rows_of(x.dimensions(), k);
  if (m < 0 || rows_of(dy.dimensions(), c) != m || c % kLanes != 0)
    return ffi::Error::InvalidArgument("matmul: expected x [.., K], dy [.., C], dw [K, C] with C a multiple of 16");
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float* out = dw->typed_data();
  const int64_t shares = std::min<int64_t>(chunks_for(pool, 1), std::max<int64_t>(1, m / kKernelGradRows));
  std::vector<float> partial((shares - 1) * k * c);
  auto share_out = [&](int64_t s) { return s == 0 ? out : partial.data() + (s - 1) * k * c; };
  parallel_for(pool, shares, shares, [&](int64_t s, int64_t) {
    kernel_grad_rows(xp, gp, share_out(s), s * m / shares, (s + 1) * m / shares, k, c);
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatMulForward, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Array>().Arg<Matrix>().Ret<Array>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MatMulKernelGrad, KernelGrad,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Array>().Arg<Array>().Ret<Matrix>());
