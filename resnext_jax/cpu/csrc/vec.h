// The vector type of the machine the kernels are compiled for, and helpers shared by every kernel.
//
// One source serves every ISA: the build (resnext_jax/cpu/build.py) compiles for one target (-march=native,
// or an override such as x86-64-v3), and this header picks the vector width and the register count that the
// kernels size their register tiles by:
//   AVX-512         16 floats per vector, 32 vector registers
//   AVX2 + FMA       8 floats,            16 registers
//   NEON (aarch64)   4 floats,            32 registers
//   other (SSE2 ..)  4 floats,            16 registers
// An op's arithmetic is written once over `auto t` (float or vf) and `for_channels` runs it kLanes channels at
// a time with a scalar tail.
#ifndef RESNEXT_JAX_CSRC_VEC_H_
#define RESNEXT_JAX_CSRC_VEC_H_

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#define RESNEXT_JAX_LANES 16
#define RESNEXT_JAX_VECTOR_REGISTERS 32
#define RESNEXT_JAX_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define RESNEXT_JAX_LANES 8
#define RESNEXT_JAX_VECTOR_REGISTERS 16
#define RESNEXT_JAX_ISA "avx2"
#elif defined(__aarch64__) || defined(__ARM_NEON)
#define RESNEXT_JAX_LANES 4
#define RESNEXT_JAX_VECTOR_REGISTERS 32
#define RESNEXT_JAX_ISA "neon"
#else
#define RESNEXT_JAX_LANES 4
#define RESNEXT_JAX_VECTOR_REGISTERS 16
#define RESNEXT_JAX_ISA "generic"
#endif

namespace resnext_jax {

constexpr int kLanes = RESNEXT_JAX_LANES;                       // floats per vector
constexpr int kVectorRegisters = RESNEXT_JAX_VECTOR_REGISTERS;  // architectural vector registers
typedef float vf __attribute__((vector_size(4 * RESNEXT_JAX_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * RESNEXT_JAX_LANES)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline float load(const float* p, float) { return *p; }
inline vf load(const float* p, vf) { return load(p); }
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
namespace detail {
template <int... L>
inline vf splat(float v, std::integer_sequence<int, L...>) {
  const vf t = {v};
  return __builtin_shufflevector(t, t, (L * 0)...);
}
}  // namespace detail
// v in every lane: one broadcast (vbroadcastss, ld1r/dup). Not `vf{} + v`: that adds 0 first (the compiler may
// not drop it, -0 + 0 being +0), an instruction and a register more in the GEMM's inner loop.
inline vf splat(float v) { return detail::splat(v, std::make_integer_sequence<int, kLanes>{}); }

// body(j, T{}) for channel j with T = vf (channels j..j+kLanes-1) or float (the tail).
template <typename F>
inline void for_channels(int64_t c, const F& body) {
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes) body(j, vf{});
  for (; j < c; ++j) body(j, 0.f);
}

// Lane l of the result is lane (l / CG) * CG + CI of v: channel CI of the lane's own group of CG channels.
// A compile-time shuffle (__builtin_shufflevector: GCC >= 12 and clang), one permute instruction.
template <int CG, int CI, int... L>
inline vf group_bcast(vf v, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(v, v, ((L / CG) * CG + CI)...);
}
template <int CG, int CI>
inline vf group_bcast(vf v) {
  return group_bcast<CG, CI>(v, std::make_integer_sequence<int, kLanes>{});
}

// f(std::integral_constant<int, I>{}) for I = 0..N-1, unrolled at compile time.
template <int N, typename F, int... I>
inline void static_for(const F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void static_for(const F& f) {
  static_for<N>(f, std::make_integer_sequence<int, N>{});
}

}  // namespace resnext_jax

#endif  // RESNEXT_JAX_CSRC_VEC_H_
