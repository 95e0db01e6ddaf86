// Vector helpers shared by the register kernels (kernels.cpp, gated_kernels.cpp): GCC vector types
// of at most one register, loads and stores, tanh and torch.lerp per lane, and the compile-time
// loops over tiles and vector lengths.
//
// Included INSIDE each capability's namespace, after kVectorBytes is defined and <cmath>,
// <cstring> and <type_traits> are included, so every build compiles its own copy with its own
// flags (see tanh_rational.h): no include guard and no includes.

// For the product loops and the lambdas they call: a K loop GCC left out of line (AVX-512, 24-unit
// modules: three 8-lane tiles of 8 rows) kept its accumulators in memory and stored all 24 at every k,
// and the sparse forward ran slower than AVX2's (an evaluation at 8% open: 10.3 against 7.2 ms).
#define HRNN_ALWAYS_INLINE __attribute__((always_inline))

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

// acc[0] += acc[q] for q = 1 .. KS-1: a block's KS partial sums over k (k_split, below) added into
// the first, for its R rows and NV tiles. A macro, expanded in each kernel's own body, so that no
// kernel's code changes for sharing it (a helper changed what GCC emitted for one: gated_kernels.cpp).
#define HRNN_SUM_SPLITS(acc, KS, R, NV)  \
  for (int q = 1; q < KS; ++q)           \
    for (int r = 0; r < R; ++r)          \
      for (int v = 0; v < NV; ++v) acc[0][r][v] += acc[q][r][v]

// Fetch every cache line that [p, p + n) touches (a module's block need not start on a line). The time
// loops walk (B, T, H) rows a page apart, one stream per batch row: more streams than the hardware
// prefetcher follows.
template <typename T, int RW = 0>
inline void prefetch(const T* p, int64_t n) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(a), RW);
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

// exp per lane in float (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, e^r by a degree-5 polynomial,
// 2^n through the exponent bits; within 2 ulp of libm over [-87, 88]). The argument is clamped to
// [-87.3, 88.7], where 2^n stays a normal float: below, the result is 1.2e-38 instead of smaller;
// above, 3.3e38 instead of inf.
template <typename VT>
inline VT vexp(VT x) {
  typedef int32_t IT __attribute__((vector_size(sizeof(VT))));
  const VT hi = vset<VT>(88.7228f), lo = vset<VT>(-87.3365f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const VT magic = vset<VT>(12582912.0f);  // 1.5 2^23: adding it rounds to an integer
  const VT n = (x * 1.44269504088896341f + magic) - magic;
  VT r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VT p = vset<VT>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const IT bits = (__builtin_convertvector(n, IT) + 127) << 23;
  VT scale;
  std::memcpy(&scale, &bits, sizeof(VT));
  return p * scale;
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

// Calls f(integral_constant<MASK>) for the runtime mask (1 <= mask < 2^NV).
template <int NV, int MASK = 1, typename F>
inline HRNN_ALWAYS_INLINE void with_mask(int mask, F& f) {
  if constexpr (MASK < (1 << NV)) {
    if (mask == MASK) f(std::integral_constant<int, MASK>{});
    else with_mask<NV, MASK + 1>(mask, f);
  }
}

// The K loop of a product block of NV output tiles: step(integral_constant<MASK>, q, k) for k in
// [0, K), q = k's accumulator set (KS of them, see k_split); a step makes the FMAs of tile v only
// where bit v of MASK is set. Block connectivity: tile_reads[v] has bit j set when tile v's module
// reads input module j (K range [j S, (j + 1) S)); a range no tile of the block reads is skipped,
// and one that some read runs with only their FMAs, so the broadcast of h_{t-1}[k] still serves
// every tile that needs it (blocks of one module's tiles lost that on AVX-512 and ran slower than
// dense at 3/4 of the blocks, docs/performance.md). tile_reads nullptr: every tile reads all of K.
template <int NV, int KS, typename F>
inline HRNN_ALWAYS_INLINE void k_loop(int64_t K, int64_t S, const uint64_t* tile_reads, F&& step) {
  auto range = [&](auto mask, int64_t k0, int64_t k1) HRNN_ALWAYS_INLINE {
    int64_t k = k0;
    for (; k + KS <= k1; k += KS)
      for (int q = 0; q < KS; ++q) step(mask, q, k + q);
    for (; k < k1; ++k) step(mask, 0, k);
  };
  if (!tile_reads) {
    range(std::integral_constant<int, (1 << NV) - 1>{}, 0, K);
    return;
  }
  auto mask_of = [&](int64_t j) {
    int mask = 0;
    for (int v = 0; v < NV; ++v) mask |= int((tile_reads[v] >> j) & 1) << v;
    return mask;
  };
  const int64_t M = K / S;
  for (int64_t j = 0; j < M;) {
    const int mask = mask_of(j);
    int64_t j1 = j + 1;
    while (j1 < M && mask_of(j1) == mask) ++j1;  // one loop over consecutive ranges alike
    if (mask) {
      auto run = [&](auto m) HRNN_ALWAYS_INLINE { range(m, j * S, j1 * S); };
      with_mask<NV>(mask, run);
    }
    j = j1;
  }
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
