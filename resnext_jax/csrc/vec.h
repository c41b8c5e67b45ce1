// 16-float vectors (GCC vector extensions) and loads/stores overloaded on float or v16, shared by the kernels:
// an op's arithmetic is written once over `auto t` and `for_channels` runs it 16 channels at a time with a
// scalar tail.
#ifndef RESNEXT_JAX_CSRC_VEC_H_
#define RESNEXT_JAX_CSRC_VEC_H_

#include <cstdint>
#include <cstring>

namespace resnext_jax {

constexpr int kLanes = 16;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline float load(const float* p, float) { return *p; }
inline v16 load(const float* p, v16) { return load(p); }
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// body(j, T{}) for channel j with T = v16 (channels j..j+15) or float (the tail).
template <typename F>
inline void for_channels(int64_t c, const F& body) {
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes) body(j, v16{});
  for (; j < c; ++j) body(j, 0.f);
}

}  // namespace resnext_jax

#endif  // RESNEXT_JAX_CSRC_VEC_H_
