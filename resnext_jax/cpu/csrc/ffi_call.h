// One FFI binding for every kernel: the thread pool, the operands and results by position, the attributes by
// name. Each kernel's entry point decodes them into its typed parameters with the helpers below.
//
// Why: a typed binding (`Ffi::Bind().Arg<...>().Ret<...>().Attr<...>(...)`) instantiates the FFI's decoding
// templates once per distinct signature, ~1.1 s of compile each (a file with one handler: 2.7 s, the header
// alone 1.55 s; g++ -O3, 2-core AVX2 EPYC); our 11 handlers had 9 signatures. This one is instantiated once per
// translation unit: the whole build took 15.8-18.4 CPU-seconds with it, 19.8-20.4 before (alternating runs).
#ifndef RESNEXT_JAX_CSRC_FFI_CALL_H_
#define RESNEXT_JAX_CSRC_FFI_CALL_H_

#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "xla/ffi/api/ffi.h"

// Defines the exported handler `symbol` for `fn(ThreadPool, RemainingArgs, RemainingRets, Dictionary)`.
#define RESNEXT_JAX_FFI_HANDLER(symbol, fn)                                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                                                          \
                                ::xla::ffi::Ffi::Bind()                                              \
                                    .Ctx<::xla::ffi::ThreadPool>()                                   \
                                    .RemainingArgs()                                                 \
                                    .RemainingRets()                                                 \
                                    .Attrs())

namespace resnext_jax {

using FfiArgs = xla::ffi::RemainingArgs;
using FfiRets = xla::ffi::RemainingRets;
using FfiAttrs = xla::ffi::Dictionary;

// What an FFI decoder returned, or nothing where it failed.
template <typename T>
std::optional<T> present(const xla::ffi::ErrorOr<T>& v) {
  if (v.has_error()) return std::nullopt;
  return *v;
}

// Operand i as T (an ffi::Buffer type), or nothing when it is missing or of another type or rank.
template <typename T>
std::optional<T> arg(const FfiArgs& args, size_t i) {
  return present(args.get<T>(i));
}

// Result i as ffi::Result<T>, or nothing.
template <typename T>
std::optional<xla::ffi::Result<T>> ret(const FfiRets& rets, size_t i) {
  return present(rets.get<T>(i));
}

using F32 = xla::ffi::Buffer<xla::ffi::F32>;    // float32, any rank
using F32Out = xla::ffi::Result<F32>;

// Entries [0, N) of `list` (the operands or the results) as T, got with get(list, i), or nothing unless `list`
// has exactly N entries and each is a T.
template <typename T, typename List, typename Get, size_t... I>
std::optional<std::array<T, sizeof...(I)>> exactly(const List& list, Get get, std::index_sequence<I...>) {
  const std::array<std::optional<T>, sizeof...(I)> v{get(list, I)...};
  if (list.size() != sizeof...(I) || !(v[I] && ...)) return std::nullopt;
  return std::array<T, sizeof...(I)>{*v[I]...};
}

// All N operands as float32 buffers, or nothing unless the call has exactly N of them.
template <size_t N>
std::optional<std::array<F32, N>> f32_args(const FfiArgs& args) {
  return exactly<F32>(args, arg<F32>, std::make_index_sequence<N>{});
}

// All N results as float32 buffers, or nothing unless the call has exactly N of them.
template <size_t N>
std::optional<std::array<F32Out, N>> f32_rets(const FfiRets& rets) {
  return exactly<F32Out>(rets, ret<F32>, std::make_index_sequence<N>{});
}

// Attribute `name` as T, or nothing.
template <typename T>
std::optional<T> attr(const FfiAttrs& attrs, std::string_view name) {
  return present(attrs.get<T>(name));
}

// The error for a call whose operands, results or attributes are not what `kernel` takes.
inline xla::ffi::Error bad_call(const char* kernel, size_t args, size_t rets) {
  return xla::ffi::Error::InvalidArgument(std::string(kernel) + ": called with " + std::to_string(args) +
                                          " operands and " + std::to_string(rets) +
                                          " results that are not the float32 buffers and attributes it takes");
}

}  // namespace resnext_jax

#endif  // RESNEXT_JAX_CSRC_FFI_CALL_H_
