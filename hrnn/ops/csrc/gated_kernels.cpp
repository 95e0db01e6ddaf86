// Fused CPU kernels for the leaky recurrence with per-sample activations and an event gate
// computed inside the time loop (hrnn/ops/reference.py has the contract and the equations):
//
//     g_t = sigmoid(g_b + x_t G_x^T + h_{t-1} G_h^T)   e_t = g_t (soft) or 1[g_t > thr_t] (hard)
//     a_t = w_t e_t                                      (B, M), one per sample and module
//     c_t = tanh(b + x_t W_x^T + h_{t-1} W_h^T)          h_t = lerp(h_{t-1}, c_t, a_t)
//
// Compiled once per CPU capability (setup.py), `default` included: there GCC's vectors are the
// baseline ISA's (16 bytes, SSE2 on x86-64), so one source serves every build and no vector is
// wider than a register of the capability it is built for. Everything lives in a namespace of its
// own per capability (see kernels.cpp).
//
// Design:
//  * Batch rows never interact, so each call runs the whole time loop for one slice of rows (one
//    slice per thread); the weight gradients are per-slice partials the bindings add up.
//  * Per step and row the M gate logits are M dot products of length H (1/16 of the candidate's
//    work at H = 128, M = 8), then a = w e. Per module m, the rows whose a[b, m] != 0 are gathered
//    and only their candidate block (rows x the module's H / M units, K = H) is computed, with a
//    register-blocked micro-kernel over row pointers; a closed (b, m) copies its state. When every
//    (b, m) of a step is computed, one full-width pass replaces the M module passes (same result,
//    the broadcast of h_{t-1}[k] then serves several tiles). On AVX-512, where a module of 16
//    float units is one vector, the module passes broadcast 4 consecutive h_{t-1}[k] at once
//    against a copy of W_h laid out to match (grouped-k blocks, below), and so does the gate's
//    product when its M logits are narrower than a register.
//  * The input projections are fused, as in the clock core's x-mode (kernels.cpp): a block's
//    accumulators start at b + x_t W_x^T (I FMAs per tile: I is the input width, 1 or 2 on the
//    benchmarks), and the backward adds the open blocks' x_t^T dz and dz into per-slice partials
//    of dW_x^T and db. A (B, T, H) u, written by torch and read by the kernel, then its (B, T, H)
//    gradient, written by the kernel and read twice by torch, cost every module at every step:
//    more than the dense forward's candidates at f = 0 (docs/models.md). The gate's projection,
//    g_b + x_t G_x^T, is formed the same way.
//  * What skipping can save. The straight-through gradient needs, for a CLOSED module too,
//        dL/de = w sum over the module's units of dL/dh_t (c_t - h_{t-1}),
//    i.e. its candidate. So:
//      - no gradient (torch.no_grad, evaluation): closed modules' candidates are skipped
//        entirely; the step costs about f of the dense one (f = fraction of (b, t, m) with
//        a != 0) plus the gate and the copies;
//      - a gradient with an event gate (or with waves that need one): the forward computes every
//        candidate, and the backward skips the closed blocks in all dz-dependent work (dz = 0
//        there: dL/dh_{t-1} += dz W_h, dW_h += dz^T h_{t-1}, dW_x^T += x_t^T dz, db += dz and
//        dx_t += dz W_x), so forward + backward
//        costs about (1 + 2f) / 3 of dense (three equal products per step, one of them dense).
//    The truncated gate (e = g where g > thr, exactly 0 elsewhere) has the true gradient, 0 where shut:
//    a shut module needs no candidate and no dL/da, so with a gradient too the forward computes the
//    open blocks only and the backward touches a shut block only to pass dL/dh_t through. What stays
//    dense is the gate: its M logits per row (M / H of a candidate product) forward, and dG_h and
//    dL/dh_{t-1} += dl G_h backward (where dl = 0 for every shut module).
//    With a support (a pseudo-derivative below the threshold, reference.py), a shut module within it
//    has its candidate computed in the forward (a = 0 holds its state through the lerp) and its dL/da
//    read in the backward, for its gate's weights' gradient only (not dL/dh_{t-1} or dx_t); it adds no
//    dz work (a = 0). Off its clock's tick (wave 0) a module is not within: the wave multiplies the
//    pseudo-derivative too, so it is 0 there, and a clock that shuts most steps keeps them free.
//    A soft gate never gives exact zeros (unless the sigmoid underflows): it runs dense, through
//    the same kernels.
//  * Evaluation of a last-state readout (P.last): the state runs in place in a (rows, H) buffer of
//    the slice, so nothing of size (B, T, H) is written and a closed module costs nothing at all;
//    only the activations (B, T, M) are written.
//  * Block connectivity: an open module's candidate reads h_{t-1} only over the input modules
//    whose block of W_h is nonzero (GatedProblem::reads, vectors.h's k_loop; exact, a zero block
//    adds exact zeros).
//    The backward stays dense (dL/dW_h of a zero block is still wanted), and the gate's product
//    G_h h_{t-1} is not block-gated.
//  * Float uses the rational tanh (tanh_rational.h) as kernels.cpp; double, libm tanh. The state
//    update is torch.lerp's formula: exact hold at a = 0, exact candidate at a = 1.
#include "gated_kernels.h"
#include "kernel_build.h"

#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define HRNN_NS HRNN_CAT(gated_, HRNN_CPU_CAPABILITY)

namespace hrnn_cpu {
namespace HRNN_NS {

// ---------------------------------------------------------------- this capability
// kAccumulators: vector accumulators a block keeps in registers (plus one register per tile of W
// and one broadcast). 32 registers (AVX-512): 24; 16 (AVX2, SSE2): 12.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kAccumulators = 24, kTiles = 4;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32, kAccumulators = 12, kTiles = 2;
#else
constexpr int kVectorBytes = 16, kAccumulators = 12, kTiles = 2;
#endif
// Rows per block at most (with one tile per block): each row's h_{t-1} is read through its own
// pointer, and 12 rows spilled pointers to the stack in the K loop (AVX-512, one 16-unit tile per
// module: a module's block cost 1.8x its share of the full-width pass); 8 keep them in registers.
constexpr int kMaxRows = 8;
constexpr int kDwRows = 4;    // rows of dW per block
// Grouped-k module blocks (below): on AVX-512 only. AVX2 already splits a 16-unit module into two
// 8-lane tiles, and with 16 registers a grouped block would hold 3 rows (not measured).
#if defined(__AVX512F__)
constexpr bool kGroupedK = true;
#else
constexpr bool kGroupedK = false;
#endif
// Rows per block for NV tiles: as many as the accumulators allow.
constexpr int rows_for(int nv) { return kAccumulators / nv < kMaxRows ? kAccumulators / nv : kMaxRows; }

// ---------------------------------------------------------------- vectors
#include "vectors.h"  // inside this capability's namespace: see the file

// Calls f(integral_constant<R>, i) over n rows in blocks of R, the remainder in blocks of R / 2,
// R / 4, ..., 1: a short list of rows (few open samples) is never padded to a full block.
template <int R, typename F>
inline void for_rows(int n, int i, F& f) {
  for (; i + R <= n; i += R) f(std::integral_constant<int, R>{}, i);
  if constexpr (R > 1) {
    if (i < n) for_rows<R / 2>(n, i, f);
  }
}

// A shut truncated gate's entry that its pseudo-derivative reaches: within the support below its threshold,
// and on the clock's tick (off it, w = 0, the pseudo-derivative is w times the open gate's: 0).
template <typename T>
inline bool within_support(T support, T g, T thr, T w) {
  return support > T(0) && g > thr - support && w != T(0);
}

// ---------------------------------------------------------------- forward
// Where the forward reads h_{t-1} and writes h_t and c_t: the (B, T, H) outputs, or, with P.last
// (evaluation of a last-state readout), the slice's running (rows, H) state, updated in place once
// the step's candidates are in `cand` (a closed module then costs nothing: no copy, no write).
template <typename T>
struct StateRows {
  const GatedProblem<T>& P;
  int64_t b0;
  T* run;   // (rows, H) states of the slice, or nullptr
  T* cand;  // (rows, H) this step's candidates (open blocks only), with run
  const T* prev(int64_t b, int64_t t) const {
    if (run) return run + (b - b0) * P.H;
    return t ? P.hs + (b * P.T_ + t - 1) * P.H : P.h0 + b * P.H;
  }
  T* out(int64_t b, int64_t t) const { return run ? nullptr : P.hs + (b * P.T_ + t) * P.H; }
  T* cands(int64_t b, int64_t t) const {
    if (run) return cand + (b - b0) * P.H;
    return P.cs ? P.cs + (b * P.T_ + t) * P.H : nullptr;
  }
};

// R rows x NV tiles from column col: z = b + x_t W_x^T + h_prev W^T (with P.reads, each tile's
// FMAs only over the input modules its module reads: k_loop), c = tanh(z) into co (if given),
// h = lerp(h_prev, c, a) into ho (if given), a the row's activation of the module the tile lies in.
template <typename T, int VL, int R, int NV>
inline void cand_block(const T* const* hp, const T* const* xp, const GatedProblem<T>& P, T* const* ho,
                       T* const* co, const T* const* ar, int64_t S, int64_t col) {
  using VT = typename VecOf<T, VL>::type;
  constexpr int KS = k_split(R * NV);
  const int64_t H = P.H;
  const T* wt = P.wt;
  VT acc[KS][R][NV];
  for (int v = 0; v < NV; ++v) {
    const VT b = P.bias ? vload<VT>(P.bias + col + v * VL) : vset<VT>(T(0));
    for (int r = 0; r < R; ++r) {
      acc[0][r][v] = b;
      for (int q = 1; q < KS; ++q) acc[q][r][v] = vset<VT>(T(0));
    }
  }
  for (int64_t i = 0; i < P.I; ++i) {
    VT w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<VT>(P.wxT + i * H + col + v * VL);
    for (int r = 0; r < R; ++r) {
      const T xb = xp[r][i];
      for (int v = 0; v < NV; ++v) acc[0][r][v] += xb * w[v];
    }
  }
  uint64_t tile_reads[NV];
  if (P.reads)
    for (int v = 0; v < NV; ++v) tile_reads[v] = P.reads[(col + v * VL) / S];
  k_loop<NV, KS>(H, S, P.reads ? tile_reads : nullptr, [&](auto mask, int q, int64_t k) HRNN_ALWAYS_INLINE {
    constexpr int MASK = decltype(mask)::value;
    const T* wk = wt + k * H + col;
    VT w[NV];
    for (int v = 0; v < NV; ++v)  // every w[v] set: a partly set array was kept on the stack
      w[v] = (MASK >> v & 1) ? vload<VT>(wk + v * VL) : vset<VT>(T(0));
    for (int r = 0; r < R; ++r) {
      const T hb = hp[r][k];  // a scalar operand: a broadcast load (AVX-512: folded into the FMA)
      for (int v = 0; v < NV; ++v)
        if (MASK >> v & 1) acc[q][r][v] += hb * w[v];
    }
  });
  HRNN_SUM_SPLITS(acc, KS, R, NV);
  for (int v = 0; v < NV; ++v) {
    const int64_t j = col + v * VL, m = j / S;
    for (int r = 0; r < R; ++r) {
      const VT c = vtanh(acc[0][r][v], T(0));
      if (co) vstore(co[r] + j, c);
      if (ho) vstore(ho[r] + j, vlerp<VT, T>(vload<VT>(hp[r] + j), c, vset<VT>(ar[r][m])));
    }
  }
}

// ---------------------------------------------------------------- grouped-k module blocks
// On AVX-512 a module of 16 float units is ONE vector, so a block of one module's candidates (what
// a step with some modules closed computes) gives each broadcast h_{t-1}[k] a single FMA: loads,
// not FMAs, bound it, at 1.2x the full-width pass's time per FMA with every row listed and 1.4x at
// f = 0.5 (a micro-benchmark of the product alone, AVX-512, B = 100, H = 128, M = 8). Instead, G =
// 16 bytes / sizeof(T) consecutive h_{t-1}[k .. k + G) are broadcast at once (one 128-bit
// broadcast), against a copy of W_h (`wg`) laid out so that a vector holds VL / G units x G
// consecutive k: a module's block is NV = S G / VL vectors wide, as wide as the full-width pass,
// and each broadcast serves NV FMAs (in the same micro-benchmark: 0.58 of the full-width time at f
// = 0.5, 0.31 at 0.25, 0.15 at 0.1, against 0.71, 0.42 and 0.23 for one-vector blocks). A unit's G
// partial sums are added at the end by log2 G levels of even/odd lane shuffles, which leave the
// units in their natural order.
template <typename T>
constexpr int kGroup = 16 / int(sizeof(T));

// Grouped blocks for this vector length and module width: NV (a multiple of G, at most kTiles),
// or 0 when they do not apply.
template <typename T, int VL>
int grouped_width(int64_t S) {
  if (!kGroupedK || VL * int(sizeof(T)) < 16 || S % VL) return 0;
  const int64_t nv = S / VL * kGroup<T>;
  return nv <= kTiles ? int(nv) : 0;
}

// wg[((m (H / G) + q) NV + v) VL + l] = W_h[m S + v VL / G + l / G, q G + l % G], from wt = W_h^T.
template <typename T, int VL>
T* grouped_weights(const GatedProblem<T>& P, int nv) {
  constexpr int G = kGroup<T>;
  const int64_t H = P.H, S = H / P.M;
  T* wg = new T[H * H];
  for (int64_t m = 0; m < P.M; ++m)
    for (int64_t q = 0; q < H / G; ++q)
      for (int v = 0; v < nv; ++v)
        for (int l = 0; l < VL; ++l)
          wg[((m * (H / G) + q) * nv + v) * VL + l] = P.wt[(q * G + l % G) * H + m * S + v * (VL / G) + l / G];
  return wg;
}

// NB / sizeof(T) consecutive values from p, repeated over the vector (one broadcast of NB bytes).
template <typename VT, typename T, int NB = 16>
inline VT broadcast_group(const T* p) {
  static_assert(NB == 16 || NB == int(sizeof(T)) || (NB == 8 && sizeof(T) == 4), "a group of 4, 8 or 16 bytes");
  if constexpr (NB == int(sizeof(T))) {
    return vset<VT>(*p);
  } else if constexpr (NB == 8) {  // two floats: one 64-bit broadcast
    double d;
    std::memcpy(&d, p, 8);
    typedef double DT __attribute__((vector_size(sizeof(VT))));
    const DT v = -DT{} + d;
    VT out;
    std::memcpy(&out, &v, sizeof(VT));
    return out;
  } else {
#if defined(__AVX512F__)
    if constexpr (sizeof(VT) == 64) {
      if constexpr (std::is_same_v<T, float>) return VT(_mm512_broadcast_f32x4(_mm_loadu_ps(p)));
      else return VT(_mm512_broadcast_f64x2(_mm_loadu_pd(p)));
    } else
#endif
#if defined(__AVX__)
    if constexpr (sizeof(VT) == 32) {
      if constexpr (std::is_same_v<T, float>) return VT(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)));
      else return VT(_mm256_broadcast_pd(reinterpret_cast<const __m128d*>(p)));
    } else
#endif
    {
      static_assert(sizeof(VT) == 16, "a group of 16 bytes is a whole vector here");
      return vload<VT>(p);
    }
  }
}

// Lanes [0, VL / 2) the sums of x's adjacent lane pairs, [VL / 2, VL) those of y's.
template <typename VT, typename T, std::size_t... I>
inline VT pair_sums(VT x, VT y, std::index_sequence<I...>) {
  using E = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef E IT __attribute__((vector_size(sizeof(VT))));
  return __builtin_shuffle(x, y, IT{E(2 * I)...}) + __builtin_shuffle(x, y, IT{E(2 * I + 1)...});
}

// cand_block's job for R rows of module m, in grouped-k form (wg from grouped_weights).
template <typename T, int VL, int R, int NV>
inline void cand_block_grouped(const T* const* hp, const T* const* xp, const GatedProblem<T>& P, const T* wg,
                               T* const* ho, T* const* co, const T* const* ar, int64_t S, int64_t m) {
  using VT = typename VecOf<T, VL>::type;
  constexpr int G = kGroup<T>, NO = NV / G;  // NO output vectors: S / VL
  constexpr int KS = k_split(R * NV);
  const int64_t H = P.H;
  const T* wm = wg + m * H * S;
  VT acc[KS][R][NV];
  for (int q = 0; q < KS; ++q)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[q][r][v] = vset<VT>(T(0));
  auto step = [&](int q, int64_t k) {
    const T* wk = wm + k / G * NV * VL;
    VT w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<VT>(wk + v * VL);
    for (int r = 0; r < R; ++r) {
      const VT hb = broadcast_group<VT>(hp[r] + k);
      for (int v = 0; v < NV; ++v) acc[q][r][v] += hb * w[v];
    }
  };
  auto range = [&](int64_t k0, int64_t k1) {
    int64_t k = k0;
    for (; k + KS * G <= k1; k += KS * G)
      for (int q = 0; q < KS; ++q) step(q, k + q * G);
    for (; k < k1; k += G) step(0, k);
  };
  if (P.reads) {  // only the input modules m reads, consecutive ones in one range
    const uint64_t rd = P.reads[m];
    for (int64_t j = 0; j < P.M;) {
      if (!(rd >> j & 1)) { ++j; continue; }
      int64_t j1 = j + 1;
      while (j1 < P.M && (rd >> j1 & 1)) ++j1;
      range(j * S, j1 * S);
      j = j1;
    }
  } else {
    range(0, H);
  }
  for (int r = 0; r < R; ++r) {
    VT o[NV];
    for (int v = 0; v < NV; ++v) {
      o[v] = acc[0][r][v];
      for (int q = 1; q < KS; ++q) o[v] += acc[q][r][v];
    }
    for (int n = NV; n > NO; n /= 2)
      for (int i = 0; i < n / 2; ++i) o[i] = pair_sums<VT, T>(o[2 * i], o[2 * i + 1], std::make_index_sequence<VL>{});
    const VT a = vset<VT>(ar[r][m]);
    for (int i = 0; i < NO; ++i) {
      const int64_t j = m * S + i * VL;
      VT z = o[i];
      if (P.bias) z += vload<VT>(P.bias + j);
      for (int64_t c = 0; c < P.I; ++c) z += xp[r][c] * vload<VT>(P.wxT + c * H + j);
      const VT cv = vtanh(z, T(0));
      if (co) vstore(co[r] + j, cv);
      if (ho) vstore(ho[r] + j, vlerp<VT, T>(vload<VT>(hp[r] + j), cv, a));
    }
  }
}

// Declares and fills, in a candidate block's body, the pointers its R listed rows (rows[i .. i + R))
// read and write at step t: each row's h_{t-1}, x_t and activations, its new state (or nullptr) and
// candidate (or nullptr). A macro, so that each block builds them in its own body as before: one
// helper for both callers, taking the block as a lambda, doubled the dense forward's time (GCC 12,
// AVX-512, T = 784: 16.6 -> 36 ms), and a helper struct changed the code GCC emits for the loops.
#define HRNN_BLOCK_ROWS(R)                             \
  const T* hp[R];                                      \
  const T* xp[R];                                      \
  const T* ar[R];                                      \
  T* ho[R];                                            \
  T* co[R];                                            \
  for (int r = 0; r < R; ++r) {                        \
    const int64_t b = rows[i + r], row = b * TT + t;   \
    hp[r] = St.prev(b, t);                             \
    xp[r] = P.x + row * P.I;                           \
    ar[r] = P.as + row * M;                            \
    ho[r] = St.out(b, t);                              \
    co[r] = St.cands(b, t);                            \
  }

// The listed rows' candidates of module m at step t in grouped-k blocks (`candidates` for one
// module, with wg).
template <typename T, int VL, int NV>
void candidates_grouped(const GatedProblem<T>& P, const StateRows<T>& St, int64_t t, const int32_t* rows, int n,
                        int64_t m, const T* wg) {
  const int64_t TT = P.T_, M = P.M, S = P.H / M;
  const bool with_c = St.run || P.cs, with_h = !St.run;
  auto block = [&](auto r_, int i) {
    constexpr int R = decltype(r_)::value;
    HRNN_BLOCK_ROWS(R)
    cand_block_grouped<T, VL, R, NV>(hp, xp, P, wg, with_h ? ho : nullptr, with_c ? co : nullptr, ar, S, m);
  };
  for_rows<rows_for(NV)>(n, 0, block);
}

// Candidates (and, unless the state is running, new states) of the listed rows at step t, columns
// [c0, c1).
template <typename T, int VL>
void candidates(const GatedProblem<T>& P, const StateRows<T>& St, int64_t t, const int32_t* rows, int n,
                int64_t c0, int64_t c1) {
  const int64_t H = P.H, TT = P.T_, M = P.M, S = H / M;
  const int n_tiles = int((c1 - c0) / VL);
  const bool with_c = St.run || P.cs, with_h = !St.run;
  for_tiles<kTiles>(n_tiles, [&](auto nv, int tile) {
    constexpr int NV = decltype(nv)::value;
    const int64_t col = c0 + int64_t(tile) * VL;
    auto block = [&](auto r_, int i) {
      constexpr int R = decltype(r_)::value;
      HRNN_BLOCK_ROWS(R)
      cand_block<T, VL, R, NV>(hp, xp, P, with_h ? ho : nullptr, with_c ? co : nullptr, ar, S, col);
    };
    for_rows<rows_for(NV)>(n, 0, block);
  });
}

// The gate logits of the rows [b0, b1) at step t, out (n, M): g_b + x_t G_x^T + h_{t-1} G_h^T.
// With M a power of two that fits a register, M lanes are one vector and a block of 8 rows keeps
// 8 independent FMA chains over K = H (a small GEMM against G_h^T); otherwise one dot product per
// (row, module). Per-row dot products, each closed by a horizontal sum, made the gate cost as
// much as a third of the dense candidates (AVX-512, B = 100, T = 200, one thread: 1.8 ms of the
// forward at f = 0, against 5 ms dense).
template <typename T, int GL, int R>
inline void gate_block(const T* const* hp, const T* const* xp, const GatedProblem<T>& P, T* const* out) {
  using VT = typename VecOf<T, GL>::type;
  const int64_t H = P.H;
  const T* ght = P.ght;
  VT acc[R];
  const VT b = vload<VT>(P.gb);
  for (int r = 0; r < R; ++r) acc[r] = b;
  for (int64_t i = 0; i < P.I; ++i) {
    const VT w = vload<VT>(P.gxT + i * GL);
    for (int r = 0; r < R; ++r) acc[r] += xp[r][i] * w;
  }
  for (int64_t k = 0; k < H; ++k) {
    const VT w = vload<VT>(ght + k * GL);
    for (int r = 0; r < R; ++r) acc[r] += hp[r][k] * w;
  }
  for (int r = 0; r < R; ++r) vstore(out[r], acc[r]);
}

// The gate's product in grouped-k form, for M modules narrower than a register (AVX-512, float, M =
// 8: the logits are half a vector): a vector holds M modules x G = lanes / M consecutive k, against
// ght_g[q lanes + l] = G_h[l / G, q G + l % G], so each FMA is full width and a row takes H / G of
// them; the G partial sums per module are added at the end, as in cand_block_grouped.
template <typename T, int G, int R>
inline void gate_block_grouped(const T* const* hp, const T* const* xp, const GatedProblem<T>& P, const T* ght_g,
                               T* const* out) {
  constexpr int FL = kVectorBytes / int(sizeof(T)), GL = FL / G;  // GL = M
  using VT = typename VecOf<T, FL>::type;
  using GT = typename VecOf<T, GL>::type;
  const int64_t H = P.H;
  VT acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vset<VT>(T(0));
  for (int64_t q = 0; q < H / G; ++q) {
    const VT w = vload<VT>(ght_g + q * FL);
    for (int r = 0; r < R; ++r) acc[r] += broadcast_group<VT, T, G * int(sizeof(T))>(hp[r] + q * G) * w;
  }
  const GT b = vload<GT>(P.gb);
  for (int r = 0; r < R; ++r) {
    VT o = acc[r];
    for (int g = G; g > 1; g /= 2) o = pair_sums<VT, T>(o, o, std::make_index_sequence<FL>{});
    GT z;
    std::memcpy(&z, &o, sizeof(GT));
    z += b;
    for (int64_t i = 0; i < P.I; ++i) z += xp[r][i] * vload<GT>(P.gxT + i * GL);
    vstore(out[r], z);
  }
}

// ght_g for gate_block_grouped (G = lanes / M), or nullptr when it does not apply.
template <typename T>
T* grouped_gate_weights(const GatedProblem<T>& P) {
  constexpr int FL = kVectorBytes / int(sizeof(T));
  const int64_t H = P.H, M = P.M;
  if (!kGroupedK || !P.gx || (M & (M - 1)) || M >= FL || FL / M > 16 / int(sizeof(T)) || H % (FL / M))
    return nullptr;
  const int64_t G = FL / M;
  T* ght_g = new T[H * M];
  for (int64_t q = 0; q < H / G; ++q)
    for (int64_t l = 0; l < FL; ++l) ght_g[q * FL + l] = P.gh[l / G * H + q * G + l % G];
  return ght_g;
}

// Declares and fills, in a gate block's body, the pointers its R rows (b0 + i .. b0 + i + R) read and
// write at step t: each row's h_{t-1} and x_t, and its M logits in out. A macro for the reason
// HRNN_BLOCK_ROWS gives.
#define HRNN_GATE_ROWS(R)                 \
  const T* hp[R];                         \
  const T* xp[R];                         \
  T* o[R];                                \
  for (int r = 0; r < R; ++r) {           \
    const int64_t b = b0 + i + r;         \
    hp[r] = prev(b);                      \
    xp[r] = P.x + (b * TT + t) * P.I;     \
    o[r] = out + (i + r) * M;             \
  }

template <typename T, int VL>
void gate_logits(const GatedProblem<T>& P, const StateRows<T>& St, int64_t t, int64_t b0, int64_t b1, T* out,
                 const T* ght_g) {
  const int64_t H = P.H, TT = P.T_, M = P.M;
  auto prev = [&](int64_t b) { return St.prev(b, t); };
  constexpr int max_lanes = kVectorBytes / int(sizeof(T));
  if constexpr (kGroupedK) {
    if (ght_g) {
      auto grouped = [&](auto g_) {
        constexpr int G = decltype(g_)::value;
        auto block = [&](auto r_, int i) {
          constexpr int R = decltype(r_)::value;
          HRNN_GATE_ROWS(R)
          gate_block_grouped<T, G, R>(hp, xp, P, ght_g, o);
        };
        for_rows<8>(int(b1 - b0), 0, block);
      };
      if (max_lanes / M == 2) grouped(std::integral_constant<int, 2>{});
      else if constexpr (16 / sizeof(T) >= 4) grouped(std::integral_constant<int, 4>{});
      return;
    }
  }
  if ((M & (M - 1)) == 0 && M <= max_lanes) {
    with_vl<T>(int(M), [&](auto gl) {
      constexpr int GL = decltype(gl)::value;
      auto block = [&](auto r_, int i) {
        constexpr int R = decltype(r_)::value;
        HRNN_GATE_ROWS(R)
        gate_block<T, GL, R>(hp, xp, P, o);
      };
      for_rows<8>(int(b1 - b0), 0, block);
    });
    return;
  }
  using VT = typename VecOf<T, VL>::type;
  for (int64_t b = b0; b < b1; ++b) {
    const T* hp = prev(b);
    const T* xr = P.x + (b * TT + t) * P.I;
    for (int64_t m = 0; m < M; ++m) {
      VT acc = vset<VT>(T(0));
      for (int64_t k = 0; k < H; k += VL) acc += vload<VT>(hp + k) * vload<VT>(P.gh + m * H + k);
      T s = P.gb[m];
      for (int64_t i = 0; i < P.I; ++i) s += xr[i] * P.gx[m * P.I + i];
      for (int l = 0; l < VL; ++l) s += acc[l];
      out[(b - b0) * M + m] = s;
    }
  }
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// sigmoid over n values in place: float in vectors (vexp), double through libm. A scalar expf and
// divide per (row, module) were 15% of the forward at f = 0.5 with a thresholds tensor (AVX-512).
template <typename T, int VL>
inline void sigmoids(T* g, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    using VT = typename VecOf<T, VL>::type;
    const VT one = vset<VT>(T(1));
    for (; i + VL <= n; i += VL) vstore(g + i, one / (one + vexp(-vload<VT>(g + i))));
  }
  for (; i < n; ++i) g[i] = sigmoid(g[i]);
}

// One scratch allocation per call: per module, the rows computed at this step.
struct RowLists {
  int32_t* rows;  // M lists of up to n rows
  int* counts;    // M
  double* logits; // (n, M) gate logits of one step (room for double)
  RowLists(int64_t M, int64_t n) : rows(new int32_t[M * n]), counts(new int[M]), logits(new double[M * n]) {}
  ~RowLists() {
    delete[] rows;
    delete[] counts;
    delete[] logits;
  }
};

template <typename T, int VL>
int64_t fwd_slice(const GatedProblem<T>& P, int64_t b0, int64_t b1) {
  using VT = typename VecOf<T, VL>::type;
  const int64_t H = P.H, TT = P.T_, M = P.M, S = H / M, n = b1 - b0;
  RowLists lists(M, n);
  // P.last: the state runs in place in `run` (rows, H); the step's candidates go to `run + n H`.
  T* run = P.last ? new T[2 * n * H] : nullptr;
  if (run) std::memcpy(run, P.h0 + b0 * H, sizeof(T) * n * H);
  const StateRows<T> St{P, b0, run, run ? run + n * H : nullptr};
  // A hard gate whose value is not kept compares the logit with logit(threshold) instead of
  // g = sigmoid(logit) with the threshold (the same test, monotone): no exp per (row, module).
  const bool on_logits = P.gx && P.hard && !P.truncated && !P.gs && !P.thr;
  // (A threshold below 0 opens every gate: -inf, where the log would give NaN; above 1, NaN shuts them all.)
  const T logit_thr = !on_logits ? T(0)
                      : P.thr_value < T(0) ? -INFINITY
                                           : std::log(P.thr_value / (T(1) - P.thr_value));
  // Grouped-k blocks for the steps with some module closed; their weights are built once per call.
  const int group_nv = P.all_candidates ? 0 : grouped_width<T, VL>(S);
  T* wg = group_nv ? grouped_weights<T, VL>(P, group_nv) : nullptr;
  T* ght_g = grouped_gate_weights(P);
  const uint64_t all_open = M == 64 ? ~uint64_t(0) : (uint64_t(1) << M) - 1;
  int64_t blocks = 0;
  for (int64_t t = 0; t < TT; ++t) {
    bool every = true;  // every (b, m) of this step computed
    std::memset(lists.counts, 0, sizeof(int) * M);
    T* gates = reinterpret_cast<T*>(lists.logits);  // (n, M): the logits, then g
    if (P.gx) {
      gate_logits<T, VL>(P, St, t, b0, b1, gates, ght_g);
      // One loop of independent exps and divides: inside the per-module loop below each divide
      // waited for its exp (a quarter of the forward at f = 0, AVX-512, T = 784).
      if (!on_logits)
        sigmoids<T, VL>(gates, n * M);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b * TT + t;
      const T* hp = St.prev(b, t);
      T* ho = St.out(b, t);
      T* ar = P.as + row * M;
      // Each row's inputs and outputs are read or written once, a stride of T H (or T M) apart
      // from the next row's: more streams than the hardware prefetcher follows. So the next
      // step's are fetched now (AVX-512, one thread, B = 100, T = 200: dense forward 6.3 -> 5.2
      // ms; at f = 0, where most of it waited for the thresholds, 2.6 -> 1.8 ms).
      if (t + 1 < TT) {
        prefetch(P.x + (row + 1) * P.I, P.I);
        if (ho) prefetch<T, 1>(ho + H, H);
        prefetch<T, 1>(P.as + (row + 1) * M, M);
        if (P.gs) prefetch<T, 1>(P.gs + (row + 1) * M, M);
        if (P.thr) prefetch(P.thr + (row + 1) * M, M);
        if (P.waves && P.waves_stride) prefetch(P.waves + b * P.waves_stride + (t + 1) * M, M);
      }
      const T* gr = gates + (b - b0) * M;
      const T* thr = P.thr ? P.thr + row * M : nullptr;
      const T* wr = P.waves ? P.waves + b * P.waves_stride + t * M : nullptr;
      // One loop per case: `wr ? wr[m] * e : e` (or `thr ? thr[m] : ...`) inside one loop became a
      // masked load of wr with every lane masked off when wr is null, and AVX-512 (Zen 5) ran each
      // such load through a fault-suppression assist: 60% of the forward with one threshold and no
      // waves.
      if (on_logits)
        for (int64_t m = 0; m < M; ++m) ar[m] = gr[m] > logit_thr ? T(1) : T(0);
      else if (!P.gx)
        for (int64_t m = 0; m < M; ++m) ar[m] = T(1);
      else if (!P.hard)
        for (int64_t m = 0; m < M; ++m) ar[m] = gr[m];
      else if (P.truncated && thr)
        for (int64_t m = 0; m < M; ++m) ar[m] = gr[m] > thr[m] ? gr[m] : T(0);
      else if (P.truncated)
        for (int64_t m = 0; m < M; ++m) ar[m] = gr[m] > P.thr_value ? gr[m] : T(0);
      else if (thr)
        for (int64_t m = 0; m < M; ++m) ar[m] = gr[m] > thr[m] ? T(1) : T(0);
      else
        for (int64_t m = 0; m < M; ++m) ar[m] = gr[m] > P.thr_value ? T(1) : T(0);
      if (wr)
        for (int64_t m = 0; m < M; ++m) ar[m] *= wr[m];
      uint64_t open = 0;  // bit m: module m computes its candidate
      for (int64_t m = 0; m < M; ++m) open |= uint64_t(ar[m] != T(0)) << m;
      // Shut within the support (a = 0, held by the lerp): the backward reads the candidate, except off the
      // module's clock tick (wave 0), where the pseudo-derivative, which the wave multiplies, is 0 too.
      if (P.support > T(0) && wr)
        for (int64_t m = 0; m < M; ++m)
          open |= uint64_t(gr[m] > (thr ? thr[m] : P.thr_value) - P.support && wr[m] != T(0)) << m;
      else if (P.support > T(0))
        for (int64_t m = 0; m < M; ++m) open |= uint64_t(gr[m] > (thr ? thr[m] : P.thr_value) - P.support) << m;
      if (P.all_candidates) open = all_open;
      if (P.gs) std::memcpy(P.gs + row * M, gr, sizeof(T) * M);
      // The row goes to every module's list and counts where open: whether a module is open is a
      // coin flip at mid f, and a branch on it mispredicted (with it, the list loop took about a
      // third of the forward at f = 0.5, AVX-512, last state only).
      for (int64_t m = 0; m < M; ++m) {
        lists.rows[m * n + lists.counts[m]] = int32_t(b);
        lists.counts[m] += int(open >> m & 1);
      }
      if (open != all_open) {
        every = false;
        if (ho)  // closed: hold bit-for-bit (a running state is simply not touched)
          for (int64_t m = 0; m < M; ++m)
            if (!(open >> m & 1))
              for (int64_t j = m * S; j < (m + 1) * S; j += VL) vstore(ho + j, vload<VT>(hp + j));
      }
    }
    if (every) {  // one full-width pass: h_{t-1}[k] broadcast once for several tiles
      candidates<T, VL>(P, St, t, lists.rows, int(n), 0, H);
      blocks += n * M;
    } else {
      for (int64_t m = 0; m < M; ++m) {
        if (lists.counts[m] == 0) continue;
        const int32_t* rows = lists.rows + m * n;
        if constexpr (kGroupedK && VL * sizeof(T) >= 16) {
          if (group_nv == kGroup<T>)
            candidates_grouped<T, VL, kGroup<T>>(P, St, t, rows, lists.counts[m], m, wg);
          else if (group_nv == 2 * kGroup<T>)
            candidates_grouped<T, VL, (2 * kGroup<T> <= kTiles ? 2 * kGroup<T> : kGroup<T>)>(P, St, t, rows,
                                                                                         lists.counts[m], m, wg);
          else
            candidates<T, VL>(P, St, t, rows, lists.counts[m], m * S, (m + 1) * S);
        } else {
          candidates<T, VL>(P, St, t, rows, lists.counts[m], m * S, (m + 1) * S);
        }
        blocks += lists.counts[m];
      }
    }
    if (run) {  // every candidate of the step read h_{t-1}: now update the open blocks in place
      for (int64_t m = 0; m < M; ++m) {
        for (int i = 0; i < lists.counts[m]; ++i) {
          const int64_t b = lists.rows[m * n + i];
          T* h = run + (b - b0) * H;
          const T* c = St.cand + (b - b0) * H;
          const VT a = vset<VT>(P.as[(b * TT + t) * M + m]);
          for (int64_t j = m * S; j < (m + 1) * S; j += VL)
            vstore(h + j, vlerp<VT, T>(vload<VT>(h + j), vload<VT>(c + j), a));
        }
      }
    }
  }
  if (run) {
    std::memcpy(P.last + b0 * H, run, sizeof(T) * n * H);
    delete[] run;
  }
  delete[] wg;
  delete[] ght_g;
  return blocks;
}

// ---------------------------------------------------------------- backward
// carry[r, kcol tiles] += sum_{j in [j0, j1)} dz[r, j] W[j, kcol tiles]   (dL/dh_{t-1})
template <typename T, int VL, int R, int NV>
inline void carry_block(T* const* carry, const T* const* dz, const T* w, int64_t H, int64_t kcol,
                        int64_t j0, int64_t j1) {
  using VT = typename VecOf<T, VL>::type;
  VT acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload<VT>(carry[r] + kcol + v * VL);
  for (int64_t j = j0; j < j1; ++j) {
    const T* wj = w + j * H + kcol;
    VT wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = vload<VT>(wj + v * VL);
    for (int r = 0; r < R; ++r) {
      const T d = dz[r][j];
      for (int v = 0; v < NV; ++v) acc[r][v] += d * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(carry[r] + kcol + v * VL, acc[r][v]);
}

// dW[j0 .. j0 + JB, kcol tiles] += sum_i dz_i[j] h_i[kcol tiles] over n gathered rows.
template <typename T, int VL, int JB, int NV>
inline void dw_block(T* dw, const T* const* dz, const T* const* hp, int n, int64_t H, int64_t j0,
                     int64_t kcol) {
  using VT = typename VecOf<T, VL>::type;
  VT acc[JB][NV];
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) acc[jj][v] = vload<VT>(dw + (j0 + jj) * H + kcol + v * VL);
  for (int i = 0; i < n; ++i) {
    VT hv[NV];
    for (int v = 0; v < NV; ++v) hv[v] = vload<VT>(hp[i] + kcol + v * VL);
    for (int jj = 0; jj < JB; ++jj) {
      const T d = dz[i][j0 + jj];
      for (int v = 0; v < NV; ++v) acc[jj][v] += d * hv[v];
    }
  }
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) vstore(dw + (j0 + jj) * H + kcol + v * VL, acc[jj][v]);
}

// For the listed rows at step t, with dz in the slice's scratch (row b at dz + (b - b0) H):
// carry += dz[:, j0:j1] W[j0:j1, :], dW[j0:j1, :] += dz[:, j0:j1]^T h_{t-1}, and the projection's
// dW_x^T[:, j0:j1] += x_t^T dz[:, j0:j1] (the same block kernel, x_t the scalar operand) and
// db[j0:j1] += the rows' sum of dz[:, j0:j1].
template <typename T, int VL>
void dz_products(const GatedProblem<T>& P, int64_t t, const int32_t* rows, int n, int64_t j0, int64_t j1,
                 int64_t b0, const T* dz, T* dw, T* dwx, const T** dz_ptr, const T** hp_ptr, const T** x_ptr) {
  using VT = typename VecOf<T, VL>::type;
  const int64_t H = P.H, TT = P.T_, I = P.I;
  for (int i = 0; i < n; ++i) {
    const int64_t b = rows[i], row = b * TT + t;
    dz_ptr[i] = dz + (b - b0) * H;
    hp_ptr[i] = t ? P.hs + (row - 1) * H : P.h0 + b * H;
    x_ptr[i] = P.x + row * I;
  }
  const int n_k = int(H / VL);
  for_tiles<kTiles>(n_k, [&](auto nv, int tile) {
    constexpr int NV = decltype(nv)::value;
    const int64_t kcol = int64_t(tile) * VL;
    auto block = [&](auto r_, int i) {
      constexpr int R = decltype(r_)::value;
      T* carry[R];
      for (int r = 0; r < R; ++r) carry[r] = P.dh0 + int64_t(rows[i + r]) * H;
      carry_block<T, VL, R, NV>(carry, dz_ptr + i, P.w, H, kcol, j0, j1);
    };
    for_rows<rows_for(NV)>(n, 0, block);
    int64_t j = j0;
    for (; j + kDwRows <= j1; j += kDwRows) dw_block<T, VL, kDwRows, NV>(dw, dz_ptr, hp_ptr, n, H, j, kcol);
    for (; j < j1; ++j) dw_block<T, VL, 1, NV>(dw, dz_ptr, hp_ptr, n, H, j, kcol);
  });
  for_tiles<kTiles>(int((j1 - j0) / VL), [&](auto nv, int tile) {
    constexpr int NV = decltype(nv)::value;
    const int64_t col = j0 + int64_t(tile) * VL;
    int64_t i = 0;
    for (; i + kDwRows <= I; i += kDwRows) dw_block<T, VL, kDwRows, NV>(dwx, x_ptr, dz_ptr, n, H, i, col);
    for (; i < I; ++i) dw_block<T, VL, 1, NV>(dwx, x_ptr, dz_ptr, n, H, i, col);
  });
  T* db = dwx + I * H;
  for (int64_t j = j0; j < j1; j += VL) {
    VT s = vload<VT>(db + j);
    for (int i = 0; i < n; ++i) s += vload<VT>(dz_ptr[i] + j);
    vstore(db + j, s);
  }
}

// The gate's share of step t for every row of the slice, with dL/dlogits in dls (row b at
// dls + (b - b0) M): carry += dl G_h (dL/dh_{t-1}) and dG_h += dl^T h_{t-1}, the dz kernels with
// the M logits in the place of dz. A loop per row (load, FMA and store of carry and of dG_h for
// each of M x H) was about a fifth of the backward at f = 0 (AVX-512, T = 784). The carry reads
// dls_carry, which is dls without the shut entries within a truncated gate's support (their
// pseudo-gradient reaches the gate's weights only); the same pointer without a support.
template <typename T, int VL>
void gate_products(const GatedProblem<T>& P, int64_t t, int64_t b0, int64_t b1, const T* dls, const T* dls_carry,
                   T* dgh, const T** dl_ptr, const T** dlc_ptr, const T** hp_ptr) {
  const int64_t H = P.H, TT = P.T_, M = P.M;
  const int n = int(b1 - b0);
  for (int i = 0; i < n; ++i) {
    const int64_t b = b0 + i, row = b * TT + t;
    dl_ptr[i] = dls + i * M;
    dlc_ptr[i] = dls_carry + i * M;
    hp_ptr[i] = t ? P.hs + (row - 1) * H : P.h0 + b * H;
  }
  for_tiles<kTiles>(int(H / VL), [&](auto nv, int tile) {
    constexpr int NV = decltype(nv)::value;
    const int64_t kcol = int64_t(tile) * VL;
    auto block = [&](auto r_, int i) {
      constexpr int R = decltype(r_)::value;
      T* carry[R];
      for (int r = 0; r < R; ++r) carry[r] = P.dh0 + (b0 + i + r) * H;
      carry_block<T, VL, R, NV>(carry, dlc_ptr + i, P.gh, H, kcol, 0, M);
    };
    for_rows<rows_for(NV)>(n, 0, block);
    int64_t m = 0;
    for (; m + kDwRows <= M; m += kDwRows) dw_block<T, VL, kDwRows, NV>(dgh, dl_ptr, hp_ptr, n, H, m, kcol);
    for (; m < M; ++m) dw_block<T, VL, 1, NV>(dgh, dl_ptr, hp_ptr, n, H, m, kcol);
  });
}

// gate_products for a step where few dL/dlogits are nonzero (a truncated gate's shut modules give exact
// zeros): each nonzero dl[b, m] adds dl G_h[m] to row b's carry and dl h_{t-1} to dG_h[m], two rows of H,
// so the step costs its open (b, m) and not M of them per row (at f = 0.1 the dense blocks were a
// quarter of the backward).
template <typename T, int VL>
void gate_products_sparse(const GatedProblem<T>& P, int64_t t, int64_t b0, int64_t b1, const T* dls,
                          const T* dls_carry, T* dgh) {
  using VT = typename VecOf<T, VL>::type;
  const int64_t H = P.H, TT = P.T_, M = P.M;
  for (int64_t b = b0; b < b1; ++b) {
    const T* dl = dls + (b - b0) * M;
    const T* dlc = dls_carry + (b - b0) * M;
    const T* hp = t ? P.hs + (b * TT + t - 1) * H : P.h0 + b * H;
    T* carry = P.dh0 + b * H;
    for (int64_t m = 0; m < M; ++m) {
      if (dl[m] == T(0)) continue;
      const VT d = vset<VT>(dl[m]), dc = vset<VT>(dlc[m]);
      const T* gm = P.gh + m * H;
      T* dg = dgh + m * H;
      for (int64_t k = 0; k < H; k += VL) {
        vstore(carry + k, vload<VT>(carry + k) + dc * vload<VT>(gm + k));
        vstore(dg + k, vload<VT>(dg + k) + d * vload<VT>(hp + k));
      }
    }
  }
}

// sum_k a[k] (c[k] - h[k]), or sum_k a[k] c[k] without h, over n, a multiple of VL.
template <typename T, int VL>
inline T dot(const T* a, const T* c, const T* h, int64_t n) {
  using VT = typename VecOf<T, VL>::type;
  VT acc = vset<VT>(T(0));
  for (int64_t k = 0; k < n; k += VL)
    acc += vload<VT>(a + k) * (h ? vload<VT>(c + k) - vload<VT>(h + k) : vload<VT>(c + k));
  T s = T(0);
  for (int l = 0; l < VL; ++l) s += acc[l];
  return s;
}

template <typename T, int VL>
void bwd_slice(const GatedProblem<T>& P, int64_t b0, int64_t b1, int64_t slice) {
  const int64_t H = P.H, TT = P.T_, M = P.M, S = H / M, I = P.I, n = b1 - b0;
  const bool gated = P.gx != nullptr;
  T* dw = P.dw_parts + slice * H * H;
  T* dwx = P.dwx_parts + slice * (I + 1) * H;
  T* dgh = gated ? P.dgh_parts + slice * M * H : nullptr;
  T* dgx = gated ? P.dgx_parts + slice * (I + 1) * M : nullptr;  // dG_x^T (I, M), then dg_b
  RowLists lists(M, n);
  T* dz_rows = new T[n * H];  // this step's dz, row b at (b - b0) H; read only where a != 0
  const T** dz_ptr = new const T*[n];
  const T** hp_ptr = new const T*[n];
  const T** x_ptr = new const T*[n];
  T* dls = gated ? new T[n * M] : nullptr;  // this step's dL/dlogits, row b at (b - b0) M
  // ... and those that pass on to h_{t-1} and x_t: without the shut entries within a support.
  const bool local = gated && P.truncated && P.support > T(0);
  T* dls_carry = local ? new T[n * M] : dls;
  const T** dl_ptr = new const T*[n];
  const T** dlc_ptr = new const T*[n];
  for (int64_t b = b0; b < b1; ++b) {
    if (P.g) std::memset(P.dh0 + b * H, 0, sizeof(T) * H);
    else std::memcpy(P.dh0 + b * H, P.g_last + b * H, sizeof(T) * H);
  }
  for (int64_t t = TT - 1; t >= 0; --t) {
    bool every = true;  // every (b, m) open: one full-width pass
    std::memset(lists.counts, 0, sizeof(int) * M);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b * TT + t;
      const T* hp = t ? P.hs + (row - 1) * H : P.h0 + b * H;
      const T* c = P.cs + row * H;
      const T* ar = P.as + row * M;
      const T* xr = P.x + row * I;
      T* carry = P.dh0 + b * H;  // dL/dh_t in, dL/dh_{t-1} out
      T* dz = dz_rows + (b - b0) * H;
      T* dxr = P.dx ? P.dx + row * I : nullptr;  // dx_t = dz W_x + dl G_x
      if (dxr) std::memset(dxr, 0, sizeof(T) * I);
      if (t > 0) {  // the previous step's rows, as in the forward (x: a fifth of the backward at f = 0)
        prefetch(P.x + (row - 1) * I, I);
        if (P.g) prefetch(P.g + (row - 1) * H, H);
        // Of c_{t-1} and h_{t-2}, only the blocks the next step reads: its open modules' and those within a
        // support (their activations and gates, fetched a step earlier, say which). Whole rows, where most
        // modules are shut, were a fifth of a truncated backward's time (AVX-512, sMNIST at 8% open).
        if (t > 1) {
          prefetch(P.as + (row - 2) * M, M);
          if (gated) prefetch(P.gs + (row - 2) * M, M);
          if (P.thr) prefetch(P.thr + (row - 2) * M, M);
        }
        const T* a_next = P.as + (row - 1) * M;
        const T* g_next = gated ? P.gs + (row - 1) * M : nullptr;
        const T* thr_next = P.thr ? P.thr + (row - 1) * M : nullptr;
        const T* w_next = P.waves ? P.waves + b * P.waves_stride + (t - 1) * M : nullptr;
        for (int64_t m = 0; m < M; ++m) {  // `within` below, a step earlier
          const bool read = a_next[m] != T(0) || P.need_da || !P.truncated ||
                            within_support(P.support, g_next[m], thr_next ? thr_next[m] : P.thr_value,
                                           w_next ? w_next[m] : T(1));
          if (!read) continue;
          prefetch(P.cs + (row - 1) * H + m * S, S);
          prefetch(t > 1 ? P.hs + (row - 2) * H + m * S : P.h0 + b * H + m * S, S);
        }
        if (P.ga) prefetch(P.ga + (row - 1) * M, M);
        if (P.dwaves) prefetch<T, 1>(P.dwaves + (row - 1) * M, M);
      }
      if (P.g)
        for (int64_t j = 0; j < H; ++j) carry[j] += P.g[row * H + j];
      for (int64_t m = 0; m < M; ++m) {
        const T a = ar[m];
        T* cm = carry + m * S;
        T da = P.ga ? P.ga[row * M + m] : T(0);
        // A truncated gate's open module (a != 0) has its candidate and needs dL/da; a shut one has neither,
        // unless it is within the support below the threshold (the pseudo-derivative's).
        // Off the clock's tick (w = 0) no entry is within: its pseudo-derivative is w times the open gate's, 0.
        const T w = P.waves ? P.waves[b * P.waves_stride + t * M + m] : T(1);
        T g = T(0), thr_m = T(0);
        bool open = true, within = false;
        if (gated) {
          g = P.gs[row * M + m];
          thr_m = P.thr ? P.thr[row * M + m] : P.thr_value;
          open = g > thr_m;
          within = P.truncated && !open && within_support(P.support, g, thr_m, w);
        }
        if (P.need_da || (P.truncated && (a != T(0) || within))) da += dot<T, VL>(cm, c + m * S, hp + m * S, S);
        if (a != T(0)) {
          for (int64_t j = 0; j < S; ++j) {
            const T cj = c[m * S + j];
            dz[m * S + j] = cm[j] * a * (T(1) - cj * cj);
            cm[j] *= T(1) - a;
          }
          if (dxr)
            for (int64_t i = 0; i < I; ++i) dxr[i] += dot<T, VL>(dz + m * S, P.wxT + i * H + m * S, nullptr, S);
          lists.rows[m * n + lists.counts[m]++] = int32_t(b);
        } else {  // closed: dz = 0 (never read), the carry passes through unchanged
          every = false;
        }
        T e = T(1);
        if (gated) {
          e = !P.hard ? g : P.truncated ? (open ? g : T(0)) : T(open);
          // Straight-through when hard: dL/dg = dL/de; truncated: the exact gradient, 0 where shut
          // (the open gate's within the support).
          const T dl = P.truncated && !open && !within ? T(0) : da * w * g * (T(1) - g);
          dls[(b - b0) * M + m] = dl;
          if (local) dls_carry[(b - b0) * M + m] = within ? T(0) : dl;
        }
        if (P.dwaves) P.dwaves[row * M + m] = da * e;
      }
      if (gated) {  // logits l = g_b + x_t G_x^T + h_{t-1} G_h^T; the h_{t-1} part: gate_products
        const T* dl = dls + (b - b0) * M;
        const T* dlc = dls_carry + (b - b0) * M;
        for (int64_t i = 0; i <= I; ++i) {
          const T xi = i < I ? xr[i] : T(1);  // row I: dg_b
          for (int64_t m = 0; m < M; ++m) dgx[i * M + m] += xi * dl[m];
        }
        if (dxr)
          for (int64_t m = 0; m < M; ++m)
            for (int64_t i = 0; i < I; ++i) dxr[i] += dlc[m] * P.gx[m * I + i];
      }
    }
    if (gated) {  // dense blocks unless most dL/dlogits are exact zeros (a truncated gate's shut modules)
      int64_t nonzero = 0;
      if (P.truncated)
        for (int64_t i = 0; i < n * M; ++i) nonzero += dls[i] != T(0);
      if (P.truncated && 4 * nonzero < n * M) gate_products_sparse<T, VL>(P, t, b0, b1, dls, dls_carry, dgh);
      else gate_products<T, VL>(P, t, b0, b1, dls, dls_carry, dgh, dl_ptr, dlc_ptr, hp_ptr);
    }
    if (every) {
      dz_products<T, VL>(P, t, lists.rows, int(n), 0, H, b0, dz_rows, dw, dwx, dz_ptr, hp_ptr, x_ptr);
    } else {
      for (int64_t m = 0; m < M; ++m)
        if (lists.counts[m])
          dz_products<T, VL>(P, t, lists.rows + m * n, lists.counts[m], m * S, (m + 1) * S, b0, dz_rows, dw, dwx,
                             dz_ptr, hp_ptr, x_ptr);
    }
  }
  delete[] dz_rows;
  delete[] dz_ptr;
  delete[] hp_ptr;
  delete[] x_ptr;
  delete[] dl_ptr;
  delete[] dlc_ptr;
  if (local) delete[] dls_carry;
  delete[] dls;
}

// ---------------------------------------------------------------- entry points
template <typename T>
int64_t fwd(const GatedProblem<T>& P, int vl, int64_t b0, int64_t b1) {
  int64_t blocks = 0;
  with_vl<T>(vl, [&](auto v) { blocks = fwd_slice<T, decltype(v)::value>(P, b0, b1); });
  return blocks;
}

template <typename T>
void bwd(const GatedProblem<T>& P, int vl, int64_t b0, int64_t b1, int64_t slice) {
  with_vl<T>(vl, [&](auto v) { bwd_slice<T, decltype(v)::value>(P, b0, b1, slice); });
}

}  // namespace HRNN_NS

HRNN_DEFINE_KERNEL_TABLE(GatedKernelTable, HRNN_CAT(gated_kernels_, HRNN_CPU_CAPABILITY), HRNN_NS)

}  // namespace hrnn_cpu
