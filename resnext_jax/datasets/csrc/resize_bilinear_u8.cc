// ResnextResizeBilinearU8: uint8 (h, w, 3), of which columns [first, first + count) -> uint8 (size, size, 3),
// mirrored left-right where `flip`.
//
// The pixels of the TensorFlow ops it replaces in the input pipeline (datasets/transforms.py),
//   saturate_cast<uint8>(round(ResizeBilinear(image, [size, size], half_pixel_centers=True))), reversed if flip,
// bit for bit: TF's interpolation weights and lerps in TF's order, round half to even, and built with
// -ffp-contract=off so that no multiply and add are fused (tests/test_resize_op.py compares them).
// Faster because it is one pass instead of four ops with a float32 image between them, each source row is
// interpolated along x once for the (one or two) output rows that use it, and the vertical pass, rounding and
// packing run 8 lanes wide with AVX2 where the host has it (TF's wheels are built for AVX, without AVX2).
// `columns` lets the JPEG decode start at an iMCU boundary left of the window (transforms.decode_window_columns):
// the resize reads the window in place, as if it were the whole image (its edges clamp at the window's).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__SSE4_1__)
#include <immintrin.h>
#endif

#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace resnext_jax_tf {

constexpr int kChannels = 3;

struct Tap {  // an output coordinate: the two source coordinates it reads and the weight of the second
  int64_t lower, upper;
  float lerp;
};

// TF's compute_interpolation_weights with its HalfPixelScaler, in output order (reversed when mirrored).
std::vector<Tap> taps(int64_t in_size, int64_t out_size, bool mirrored) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  std::vector<Tap> result(out_size);
  for (int64_t o = 0; o < out_size; ++o) {
    const int64_t i = mirrored ? out_size - 1 - o : o;
    const float in = (static_cast<float>(i) + 0.5f) * scale - 0.5f;
    const float in_f = std::floor(in);
    result[o] = {std::max(static_cast<int64_t>(in_f), int64_t{0}),
                 std::min(static_cast<int64_t>(std::ceil(in)), in_size - 1), in - in_f};
  }
  return result;
}

void to_float(const uint8_t* row, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(row[k]);
}

// One source row (as floats, plus one padding float) interpolated along x, TF's
// `top = top_left + (top_right - top_left) * x_lerp`, into `out` (two floats of room past the last column). With
// AVX2, two columns per 8-float vector (each column's 3 channels and a spare lane), packed to 6 floats before the
// store; the remainder, one 4-float SSE vector per column. The whole op on a 328 x 328 window to 224 x 224 (the
// eval transform's), quiet 2-core Zen 4, three alternations: 121.1-121.6 us per call, against 132.5-133.6 with
// SSE alone. The loads (taps and pixels), not the arithmetic, bound it.
void horizontal(const float* row, const std::vector<Tap>& xs, float* out) {
  size_t x = 0;
#if defined(__AVX2__)
  const __m256i pack = _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7);
  for (; x + 2 <= xs.size(); x += 2) {
    const Tap& a = xs[x];
    const Tap& b = xs[x + 1];
    const __m256 l = _mm256_loadu2_m128(row + b.lower * kChannels, row + a.lower * kChannels);
    const __m256 r = _mm256_loadu2_m128(row + b.upper * kChannels, row + a.upper * kChannels);
    const __m256 lerp = _mm256_setr_m128(_mm_set1_ps(a.lerp), _mm_set1_ps(b.lerp));
    const __m256 v = _mm256_add_ps(l, _mm256_mul_ps(_mm256_sub_ps(r, l), lerp));
    _mm256_storeu_ps(out + x * kChannels, _mm256_permutevar8x32_ps(v, pack));  // the next pair overwrites 6, 7
  }
#endif
  for (; x < xs.size(); ++x) {
    const float* left = row + xs[x].lower * kChannels;
    const float* right = row + xs[x].upper * kChannels;
    float* o = out + x * kChannels;
#if defined(__SSE4_1__)
    const __m128 l = _mm_loadu_ps(left), r = _mm_loadu_ps(right);
    _mm_storeu_ps(o, _mm_add_ps(l, _mm_mul_ps(_mm_sub_ps(r, l), _mm_set1_ps(xs[x].lerp))));
#else
    for (int c = 0; c < kChannels; ++c) o[c] = left[c] + (right[c] - left[c]) * xs[x].lerp;
#endif
  }
}

// TF's `top + (bottom - top) * y_lerp`, rounded half to even (tf.round) and saturated to uint8 (tf.saturate_cast).
void vertical(const float* top, const float* bottom, float y_lerp, int64_t n, uint8_t* out) {
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256 lerp = _mm256_set1_ps(y_lerp), low = _mm256_setzero_ps(), high = _mm256_set1_ps(255.0f);
  for (; k + 8 <= n; k += 8) {
    const __m256 t = _mm256_loadu_ps(top + k), b = _mm256_loadu_ps(bottom + k);
    const __m256 v = _mm256_round_ps(_mm256_add_ps(t, _mm256_mul_ps(_mm256_sub_ps(b, t), lerp)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, low), high));
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packus_epi16(words, words));
  }
#endif
  for (; k < n; ++k) {
    const float v = std::nearbyint(top[k] + (bottom[k] - top[k]) * y_lerp);  // the default mode: half to even
    out[k] = static_cast<uint8_t>(std::min(std::max(v, 0.0f), 255.0f));
  }
}

// The window: `width` columns of rows `stride` bytes apart.
void resize(const uint8_t* image, int64_t height, int64_t width, int64_t stride, int64_t size, bool flip,
            uint8_t* out) {
  const std::vector<Tap> xs = taps(width, size, flip), ys = taps(height, size, false);
  const int64_t row_in = width * kChannels, row_out = size * kChannels, slot = row_out + 2;
  std::vector<float> source(row_in + 1), rows(2 * slot);  // rows: two interpolated source rows
  int64_t held[2] = {-1, -1};                              // which source row each slot holds
  auto slot_of = [&](int64_t y) { return held[0] == y ? 0 : held[1] == y ? 1 : -1; };
  auto interpolated = [&](int64_t y, int keep) {  // the slot holding row y, filled if needed, sparing `keep`
    int s = slot_of(y);
    if (s < 0) {
      s = keep == 0 ? 1 : 0;
      to_float(image + y * stride, row_in, source.data());
      horizontal(source.data(), xs, rows.data() + s * slot);
      held[s] = y;
    }
    return s;
  };
  for (int64_t o = 0; o < size; ++o) {
    const int top = interpolated(ys[o].lower, slot_of(ys[o].upper));
    const int bottom = interpolated(ys[o].upper, top);
    vertical(rows.data() + top * slot, rows.data() + bottom * slot, ys[o].lerp, row_out, out + o * row_out);
  }
}

class ResizeBilinearU8 : public ::tensorflow::OpKernel {
 public:
  explicit ResizeBilinearU8(::tensorflow::OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("size", &size_));
  }

  void Compute(::tensorflow::OpKernelContext* context) override {
    const ::tensorflow::Tensor& image = context->input(0);
    const ::tensorflow::Tensor& columns = context->input(1);
    const ::tensorflow::Tensor& flip = context->input(2);
    OP_REQUIRES(context,
                image.dims() == 3 && image.dim_size(0) > 0 && image.dim_size(1) > 0 &&
                    image.dim_size(2) == kChannels,
                absl::InvalidArgumentError("ResnextResizeBilinearU8 expects a non-empty (height, width, 3) uint8 "
                                           "image, got shape " + image.shape().DebugString()));
    OP_REQUIRES(context, columns.dims() == 1 && columns.dim_size(0) == 2,
                absl::InvalidArgumentError("ResnextResizeBilinearU8 expects columns [first, count], got shape " +
                                           columns.shape().DebugString()));
    const int64_t first = columns.vec<int32_t>()(0), count = columns.vec<int32_t>()(1);
    OP_REQUIRES(context, first >= 0 && count >= 1 && first + count <= image.dim_size(1),
                absl::InvalidArgumentError(absl::StrCat(
                    "ResnextResizeBilinearU8: columns [", first, ", ", first + count, ") are not a non-empty part ",
                    "of an image ", image.dim_size(1), " columns wide")));
    OP_REQUIRES(context, flip.dims() == 0,
                absl::InvalidArgumentError("ResnextResizeBilinearU8 expects a scalar flip, got shape " +
                                           flip.shape().DebugString()));
    ::tensorflow::Tensor* out = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, ::tensorflow::TensorShape({size_, size_, kChannels}), &out));
    const int64_t stride = image.dim_size(1) * kChannels;
    resize(image.flat<uint8_t>().data() + first * kChannels, image.dim_size(0), count, stride, size_,
           flip.scalar<bool>()(), out->flat<uint8_t>().data());
  }

 private:
  int size_;
};

REGISTER_KERNEL_BUILDER(Name("ResnextResizeBilinearU8").Device(::tensorflow::DEVICE_CPU), ResizeBilinearU8);

}  // namespace resnext_jax_tf

REGISTER_OP("ResnextResizeBilinearU8")
    .Input("image: uint8")
    .Input("columns: int32")
    .Input("flip: bool")
    .Attr("size: int >= 1")
    .Output("resized: uint8")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      int size;
      TF_RETURN_IF_ERROR(c->GetAttr("size", &size));
      c->set_output(0, c->MakeShape({size, size, resnext_jax_tf::kChannels}));
      return absl::OkStatus();
    });
