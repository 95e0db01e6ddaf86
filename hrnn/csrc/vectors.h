// Vector helpers shared by the register kernels (kernels.cpp, gated_kernels.cpp): GCC vector types
// of at most one register, loads and stores, tanh and torch.lerp per lane, and the compile-time
// loops over tiles and vector lengths.
//
// Included INSIDE each capability's namespace, after kVectorBytes is defined and <cmath>,
// <cstring> and <type_traits> are included, so every build compiles its own copy with its own
// flags (see tanh_rational.h): no include guard and no includes.

template <typename T, int VL>
struct VecOf {
  static_assert(sizeof(T) * VL <= kVectorBytes, "a vector wider than a register");
  typedef T type __attribute__((vector_size(sizeof(T) * VL)));
};

template <typename VT, typename T>
inline VT vload(const T* p) {
  VT v;
  std::memcpy(&v, p, sizeof(VT));
  return v;
}
template <typename VT, typename T>
inline void vstore(T* p, const VT& v) {
  std::memcpy(p, &v, sizeof(VT));
}
// A splat of x. Adding x to -0.0 (not to VT{}, +0.0) is the identity under IEEE rules, so GCC emits
// one broadcast load; 0.0 + x is not (0.0 + -0.0 = +0.0), and cost a scalar add plus a register
// broadcast in the products' inner loops, on the FP ports the FMAs need (AVX2 backward -10%,
// docs/performance.md).
template <typename VT, typename T>
inline VT vset(T x) {
  return -VT{} + x;
}

// Fetch n values from p into the cache, one line at a time. The time loops walk (B, T, H) rows a
// page apart, one stream per batch row: more streams than the hardware prefetcher follows.
template <typename T, int RW = 0>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * int64_t(sizeof(T)); i += 64) __builtin_prefetch(c + i, RW);
}

#include "tanh_rational.h"

// tanh per lane: the rational approximation in float, libm in double.
template <typename VT>
inline VT vtanh(VT x, float) {
  return tanh_rational(x);
}
template <typename VT>
inline VT vtanh(VT x, double) {
  constexpr int n = sizeof(VT) / sizeof(double);
  for (int i = 0; i < n; ++i) x[i] = std::tanh(x[i]);
  return x;
}

// torch.lerp's formula: exact state hold at a = 0 and exact candidate at a = 1.
template <typename VT, typename T>
inline VT vlerp(VT start, VT end, VT w) {
  const VT diff = end - start;
  const VT one = vset<VT>(T(1)), half = vset<VT>(T(0.5));
  const VT aw = w < vset<VT>(T(0)) ? -w : w;
  const VT lo = start + w * diff;
  const VT hi = end - diff * (one - w);
  return aw < half ? lo : hi;
}

// Independent accumulator sets a block of `acc` accumulators splits its K loop into, so that a
// short block (few rows or tiles: R x NV small) still has about 8 FMA chains in flight; measured on
// AVX-512 at f = 0.1 (5 open rows a module): without it the gated skipping forward took 55% of dense.
constexpr int k_split(int acc) { return acc >= 8 ? 1 : acc >= 4 ? 2 : acc >= 2 ? 4 : 8; }

// Calls f(integral_constant<NV>, i) over n tiles in blocks of NV, then once for the remainder.
template <int NV, typename F>
inline void tail_tiles(int rem, int i, F& f) {
  if constexpr (NV > 0) {
    if (rem == NV) f(std::integral_constant<int, NV>{}, i);
    else tail_tiles<NV - 1>(rem, i, f);
  }
}
template <int NV, typename F>
inline void for_tiles(int n, F&& f) {
  int i = 0;
  for (; i + NV <= n; i += NV) f(std::integral_constant<int, NV>{}, i);
  tail_tiles<NV - 1>(n - i, i, f);
}

// Calls f(integral_constant<VL>) for a runtime vl in 1, 2, 4, 8, 16 (at most one register).
template <typename T, typename F>
inline void with_vl(int vl, F&& f) {
  constexpr int max_vl = kVectorBytes / int(sizeof(T));
  switch (vl) {
    case 16: if constexpr (max_vl >= 16) { f(std::integral_constant<int, 16>{}); break; } [[fallthrough]];
    case 8: if constexpr (max_vl >= 8) { f(std::integral_constant<int, 8>{}); break; } [[fallthrough]];
    case 4: if constexpr (max_vl >= 4) { f(std::integral_constant<int, 4>{}); break; } [[fallthrough]];
    case 2: if constexpr (max_vl >= 2) { f(std::integral_constant<int, 2>{}); break; } [[fallthrough]];
    default: f(std::integral_constant<int, 1>{}); break;
  }
}
