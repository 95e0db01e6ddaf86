// Fused CPU kernels for the leaky modular recurrence (see hrnn/ops/reference.py):
//
//     z_t = u_t + h_{t-1} W^T,   c_t = tanh(z_t),   h_t = lerp(h_{t-1}, c_t, a_t)
//
// This file is compiled once per x86-64 CPU capability (setup.py), with HRNN_CPU_CAPABILITY
// naming it and that capability's flags (-mavx2 -mfma; -mavx512f ...). Everything
// here lives in a namespace of its own per capability, so no two builds share a symbol; the
// bindings (leaky_scan.cpp) run the KernelTable of the capability capability.h chose.
//
// Design (each choice measured, see docs/performance.md):
//  * Each call runs the WHOLE time loop on one slice of batch rows (the bindings run one slice
//    per thread): batch rows never interact through time, so there is no per-step sync.
//  * The per-step products (rows x H @ H x H) are register-blocked kernels written with GCC
//    vector extensions, one vector = one register of this capability (never wider: GCC lowers a
//    too-wide vector type to memory operations, 10x slower), with the tanh / lerp epilogue fused.
//  * Register blocking is sized to the register file (Blocking below).
//  * Backward through time is hand-written; the weight gradient is accumulated per slice inside
//    the loop (rank-rows update per step touching only the active rows of dW).
//  * Hard clocks: at each step only tiles (vl consecutive units) that contain an active unit are
//    computed, forward and backward; the others copy the state.
//  * Block connectivity: in the forward's product each output tile makes FMAs only over the input
//    modules whose block of W_h is nonzero (Problem::reads, vectors.h's k_loop; exact, as a zero
//    block adds exact zeros). The backward stays dense: zero blocks occur in evaluation (learned
//    connectivity's hard gates) or in a fixed mask, and there dL/dW_h of a zero block is still wanted.
//  * x-mode fuses the input projection: u_t = b + x_t W_x^T is formed in the accumulator of the
//    step's product (active tiles only), and dW_x, db are accumulated in the backward loop.
#include "kernels.h"
#include "kernel_build.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#define HRNN_NS HRNN_CAT(cap_, HRNN_CPU_CAPABILITY)

namespace hrnn_cpu {
namespace HRNN_NS {

// ---------------------------------------------------------------- this capability
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kRegisters = 32;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32, kRegisters = 16;
#else
#error "register kernels are built for AVX2 or AVX-512 (the portable path is in leaky_scan.cpp)"
#endif

// Register blocking: a block keeps rows x tiles accumulators, plus one register per tile of W
// and one broadcast, in the register file. 32 registers: 6 rows x 4 tiles (24 + 4 + 1 = 29).
// 16 registers: 5 rows x 2 tiles (10 + 2 + 1 = 13), the fastest shape measured on AVX2 with one
// and with two threads (docs/performance.md); dW blocks are 4 rows x 3 tiles there, 4 x 4 with 32.
// The macros let a tuning build try other shapes without editing the file.
#ifndef HRNN_ROWS
#define HRNN_ROWS (kRegisters >= 32 ? 6 : 5)
#endif
#ifndef HRNN_TILES
#define HRNN_TILES (kRegisters >= 32 ? 4 : 2)
#endif
#ifndef HRNN_DW_ROWS
#define HRNN_DW_ROWS 4
#endif
#ifndef HRNN_DW_TILES
#define HRNN_DW_TILES (kRegisters >= 32 ? 4 : 3)
#endif
constexpr int kRows = HRNN_ROWS;         // batch rows per block (also R - 1 and R - 2 are built)
constexpr int kTiles = HRNN_TILES;       // column tiles per block
constexpr int kDwRows = HRNN_DW_ROWS;    // rows of dW per block (at most vl)
constexpr int kDwTiles = HRNN_DW_TILES;  // column tiles of dW per block
static_assert(kRows >= 3 && kTiles >= 1 && kDwRows >= 1 && kDwTiles >= 1, "bad blocking");

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------- vectors
#include "vectors.h"  // inside this capability's namespace: see the file

// Register-block height: kRows or kRows - 1, whichever pads the slice less (ties: taller);
// kRows - 2 only for a slice that short. Going lower to avoid padding costs more than the padding:
// with 4-row blocks, a 50-row slice (B = 100 on 2 threads) padded least with 2-row blocks, whose
// 6 accumulators cannot hide the FMA latency (AVX2 step at T = 784: 1.36x the FLOP floor, 1.15x
// after this rule).
inline int pick_rows(int64_t rows) {
  if (rows <= kRows - 2) return kRows - 2;
  const int64_t pad_full = (rows + kRows - 1) / kRows * kRows - rows;
  const int64_t pad_less = (rows + kRows - 2) / (kRows - 1) * (kRows - 1) - rows;
  return pad_less < pad_full ? kRows - 1 : kRows;
}

// Calls f(integral_constant<R>) for the block height pick_rows chose.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (kRows - pick_rows(rows)) {
    case 0: f(std::integral_constant<int, kRows>{}); break;
    case 1: f(std::integral_constant<int, kRows - 1>{}); break;
    default: f(std::integral_constant<int, kRows - 2>{}); break;
  }
}

// ---------------------------------------------------------------- forward
// One row block (R rows) x NV active tiles: z = u + h_prev W^T, then c = tanh(z),
// h = lerp(h_prev, c, a). SPARSE (W_h has zero blocks, P.reads): the tiles are adjacent (cols[0],
// cols[0] + vl, ...) and each tile's FMAs run only over the input modules its module reads
// (k_loop). Adjacent tiles address W from one column pointer (with a column offset per tile the
// masked loops spilled: AVX-512, 3/4 of the blocks, 1.30 of dense). A short block (R x NV < 8)
// splits its K loop over independent accumulators (k_split), so the order of the sums, not their
// value, depends on the block's shape (a zero block adds exact zeros); without the split, GCC
// compiled the masked loops to FMAs reloading W from memory (1.21 of dense at 3/4).
template <typename T, int VL, int R, int NV, bool SPARSE>
inline void fwd_block(const T* const* hp, const T* const* in, const Input<T>& src, T* const* ho,
                      T* const* co, const T* wt, int64_t H, const int32_t* cols_in, const T* a,
                      const Problem<T>& P) {
  using VT = typename VecOf<T, VL>::type;
  constexpr int KS = k_split(R * NV);
  int64_t cols[NV];
  for (int v = 0; v < NV; ++v) cols[v] = SPARSE ? cols_in[0] + v * VL : cols_in[v];
  VT acc[KS][R][NV];
  if (src.x) {  // fused projection: in[r] is row r's x_t (I values)
    for (int v = 0; v < NV; ++v) {
      const VT bv = src.bias ? vload<VT>(src.bias + cols[v]) : vset<VT>(T(0));
      for (int r = 0; r < R; ++r) acc[0][r][v] = bv;
    }
    for (int64_t i = 0; i < src.I; ++i) {
      const T* wi = src.wxT + i * H;
      VT w[NV];
      for (int v = 0; v < NV; ++v) w[v] = vload<VT>(wi + cols[v]);
      for (int r = 0; r < R; ++r) {
        const VT xb = vset<VT>(in[r][i]);
        for (int v = 0; v < NV; ++v) acc[0][r][v] += xb * w[v];
      }
    }
  } else {  // in[r] is row r's u_t (H values)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[0][r][v] = vload<VT>(in[r] + cols[v]);
  }
  for (int q = 1; q < KS; ++q)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[q][r][v] = vset<VT>(T(0));
  uint64_t tile_reads[NV];
  if (SPARSE)
    for (int v = 0; v < NV; ++v) tile_reads[v] = P.reads[cols[v] / P.S];
  k_loop<NV, KS>(H, P.S, SPARSE ? tile_reads : nullptr, [&](auto mask, int q, int64_t k) HRNN_ALWAYS_INLINE {
    constexpr int MASK = decltype(mask)::value;
    const T* wk = wt + k * H;
    VT w[NV];
    for (int v = 0; v < NV; ++v)  // every w[v] set: a partly set array was kept on the stack
      w[v] = (MASK >> v & 1) ? vload<VT>(wk + cols[v]) : vset<VT>(T(0));
    for (int r = 0; r < R; ++r) {
      const VT hb = vset<VT>(hp[r][k]);
      for (int v = 0; v < NV; ++v)
        if (MASK >> v & 1) acc[q][r][v] += hb * w[v];
    }
  });
  HRNN_SUM_SPLITS(acc, KS, R, NV);
  for (int v = 0; v < NV; ++v) {
    const VT av = vload<VT>(a + cols[v]);
    for (int r = 0; r < R; ++r) {
      const VT c = vtanh(acc[0][r][v], T(0));
      if (co) vstore(co[r] + cols[v], c);
      vstore(ho[r] + cols[v], vlerp<VT, T>(vload<VT>(hp[r] + cols[v]), c, av));
    }
  }
}

// The dense blocks in a function of their own: inlined into fwd_slice beside the masked loops, they
// lost 14% in the training forward (register allocation follows the whole function); the masked
// loops, for their part, ran best inlined (out of line: 2.1x dense at 3/4 of the blocks).
template <typename T, int VL, int R, int NV>
__attribute__((noinline)) void fwd_block_dense(const T* const* hp, const T* const* in, const Input<T>& src,
                                               T* const* ho, T* const* co, const T* wt, int64_t H,
                                               const int32_t* cols, const T* a, const Problem<T>& P) {
  fwd_block<T, VL, R, NV, false>(hp, in, src, ho, co, wt, H, cols, a, P);
}

// hs nullptr: only the last state is kept, in `last`; the others alternate between two
// (rows, H) buffers of the slice, which stay in cache (no (B, T, H) write at all).
template <typename T, int VL, int R>
void fwd_slice(const Problem<T>& P, int64_t b0, int64_t b1, const Input<T>& src, const T* wt,
               const T* h0, T* hs, T* cs, T* last) {
  using VT = typename VecOf<T, VL>::type;
  const int64_t H = P.H, TT = P.T_;
  T* run = hs ? nullptr : new T[2 * (b1 - b0) * H];
  auto state = [&](int64_t b, int64_t t) -> T* {  // h_t of row b (t = -1: h0)
    if (t < 0) return const_cast<T*>(h0) + b * H;
    if (run) return t == TT - 1 ? last + b * H : run + ((t & 1) * (b1 - b0) + b - b0) * H;
    return hs + (b * TT + t) * H;
  };
  const T* hp[R];
  const T* in[R];
  T* ho[R];
  T* co[R];
  for (int64_t t = 0; t < TT; ++t) {
    const T* at = P.a + t * H;
    const int32_t* ac = P.act_cols + P.act_start[t];
    const int n_act = P.act_start[t + 1] - P.act_start[t];
    const int32_t* ic = P.idle_cols + P.idle_start[t];
    const int n_idle = P.idle_start[t + 1] - P.idle_start[t];
    for (int64_t rb = b0; rb < b1; rb += R) {
      for (int r = 0; r < R; ++r) {
        // Short last block: repeat the last row (identical writes, harmless).
        const int64_t b = imin(rb + r, b1 - 1);
        hp[r] = state(b, t - 1);
        in[r] = src.x ? src.x + (b * TT + t) * src.I : src.u + (b * TT + t) * H;
        ho[r] = state(b, t);
        co[r] = cs ? cs + (b * TT + t) * H : nullptr;
      }
      T* const* cop = cs ? co : nullptr;
      if (!P.reads) {
        for_tiles<kTiles>(n_act, [&](auto nv, int i) {
          fwd_block_dense<T, VL, R, decltype(nv)::value>(hp, in, src, ho, cop, wt, H, ac + i, at, P);
        });
      } else {  // runs of adjacent active tiles (all of them with soft waves)
        for (int i = 0; i < n_act;) {
          int j = i + 1;
          while (j < n_act && ac[j] == ac[j - 1] + VL) ++j;
          for_tiles<kTiles>(j - i, [&](auto nv, int q) {
            fwd_block<T, VL, R, decltype(nv)::value, true>(hp, in, src, ho, cop, wt, H, ac + i + q, at, P);
          });
          i = j;
        }
      }
      for (int j = 0; j < n_idle; ++j)
        for (int r = 0; r < R; ++r) vstore(ho[r] + ic[j], vload<VT>(hp[r] + ic[j]));
    }
  }
  delete[] run;
}

// ---------------------------------------------------------------- backward
// carry[r, k-tiles] += sum_{j in active tiles} dz[r, j] W[j, k-tiles]
template <typename T, int VL, int R, int NV>
inline void bwd_carry_block(T* const* carry, const T* const* dz, const T* w, int64_t H,
                            const int32_t* kcols, const int32_t* jcols, int n_j) {
  using VT = typename VecOf<T, VL>::type;
  VT acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload<VT>(carry[r] + kcols[v]);
  for (int jt = 0; jt < n_j; ++jt) {
    for (int jj = 0; jj < VL; ++jj) {
      const int64_t j = jcols[jt] + jj;
      const T* wj = w + j * H;
      VT wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = vload<VT>(wj + kcols[v]);
      for (int r = 0; r < R; ++r) {
        const VT d = vset<VT>(dz[r][j]);
        for (int v = 0; v < NV; ++v) acc[r][v] += d * wv[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(carry[r] + kcols[v], acc[r][v]);
}

// dW[j0 .. j0+JB, k-tiles] += sum_b s[b, j] m[b, k-tiles], rows of s and m a fixed stride apart
// (base + index addressing: no row-pointer loads in the inner loop, measured 10% of the backward).
template <typename T, int VL, int JB, int NV>
inline void bwd_dw_block(T* dw, const T* s, int64_t s_stride, const T* m, int64_t m_stride,
                         int64_t nrows, int64_t H, int64_t j0, const int32_t* kcols) {
  using VT = typename VecOf<T, VL>::type;
  VT acc[JB][NV];
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) acc[jj][v] = vload<VT>(dw + (j0 + jj) * H + kcols[v]);
  for (int64_t b = 0; b < nrows; ++b) {
    VT hv[NV];
    for (int v = 0; v < NV; ++v) hv[v] = vload<VT>(m + b * m_stride + kcols[v]);
    for (int jj = 0; jj < JB; ++jj) {
      const VT d = vset<VT>(s[b * s_stride + j0 + jj]);
      for (int v = 0; v < NV; ++v) acc[jj][v] += d * hv[v];
    }
  }
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) vstore(dw + (j0 + jj) * H + kcols[v], acc[jj][v]);
}

template <typename T, int VL, int R>
void bwd_slice(const Problem<T>& P, int64_t b0, int64_t b1, int64_t slice, const Grads<T>& G,
               const Scratch<T>& S) {
  using VT = typename VecOf<T, VL>::type;
  constexpr int JB = VL < kDwRows ? VL : kDwRows;
  const int64_t H = P.H, TT = P.T_, nrows = b1 - b0, I = G.src.I;
  const bool proj = G.src.x != nullptr;
  const T *g = G.g, *hs = G.hs, *cs = G.cs, *h0 = G.h0;
  T* dh0 = G.dh0;
  T* dw_part = G.dw_parts + slice * H * H;
  T* dwx_part = proj ? G.dwx_parts + slice * (I + 1) * H : nullptr;
  T* da_part = G.da_parts ? G.da_parts + slice * TT * H : nullptr;
  // x-mode: dz lives one step at a time in the scratch; u-mode: dz is du itself.
  const T one = T(1);
  const int32_t* all_cols = P.all_cols;
  const int n_k = P.n_all;
  T* carry_r[R];
  const T* dz_r[R];
  for (int64_t b = b0; b < b1; ++b) {
    if (g) std::memset(dh0 + b * H, 0, sizeof(T) * H);
    else std::memcpy(dh0 + b * H, G.g_last + b * H, sizeof(T) * H);
  }
  for (int64_t t = TT - 1; t >= 0; --t) {
    const T* at = P.a + t * H;
    const int32_t* ac = P.act_cols + P.act_start[t];
    const int n_act = P.act_start[t + 1] - P.act_start[t];
    const int32_t* ic = P.idle_cols + P.idle_start[t];
    const int n_idle = P.idle_start[t + 1] - P.idle_start[t];
    T* da_t = da_part ? da_part + t * H : nullptr;
    // This step's dz rows: the scratch (x-mode) or du itself (u-mode), a fixed stride apart.
    T* const dz0 = proj ? S.dz : G.du + (b0 * TT + t) * H;
    const int64_t dz_stride = proj ? H : TT * H;
    // Pass 1, elementwise: dh = g + carry; dz = dh a (1 - c^2); carry = dh (1 - a).
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = (b * TT + t) * H;
      const T* hp = t ? hs + row - H : h0 + b * H;
      T* dz = dz0 + (b - b0) * dz_stride;
      // Pass 3 streams every row's h_{t-1} once per block of dW: from a contiguous copy, not
      // from (B, T, H) rows a page apart (AVX2 backward 20 -> 17 ms, docs/performance.md).
      std::memcpy(S.h + (b - b0) * H, hp, sizeof(T) * H);
      // The next step's rows (the backward walks each batch row's (T, H) block backwards): 14%
      // of the AVX2 backward was waiting on them (docs/performance.md).
      if (t > 0) {
        if (g) prefetch(g + row - H, H);
        prefetch(cs + row - H, H);
        if (t > 1) prefetch(hs + row - 2 * H, H);
      }
      T* carry = dh0 + b * H;
      for (int i = 0; i < n_act; ++i) {
        const int32_t j = ac[i];
        const VT av = vload<VT>(at + j), c = vload<VT>(cs + row + j);
        const VT dh = g ? vload<VT>(g + row + j) + vload<VT>(carry + j) : vload<VT>(carry + j);
        vstore(dz + j, dh * av * (vset<VT>(T(1)) - c * c));
        if (da_t) vstore(da_t + j, vload<VT>(da_t + j) + dh * (c - vload<VT>(hp + j)));
        vstore(carry + j, dh * (vset<VT>(T(1)) - av));
      }
      for (int i = 0; i < n_idle; ++i) {
        const int32_t j = ic[i];
        if (g) vstore(carry + j, vload<VT>(g + row + j) + vload<VT>(carry + j));
        if (!proj) vstore(dz + j, vset<VT>(T(0)));  // du is an output; the scratch is not
      }
    }
    // dx_t = dz W_x over the active units (zero when none is active).
    if (G.dx) {
      for (int64_t b = b0; b < b1; ++b) {
        T* dxr = G.dx + (b * TT + t) * I;
        for (int64_t i = 0; i < I; ++i) {
          VT acc = vset<VT>(T(0));
          for (int ia = 0; ia < n_act; ++ia)
            acc += vload<VT>(dz0 + (b - b0) * dz_stride + ac[ia]) * vload<VT>(G.src.wxT + i * H + ac[ia]);
          T s = 0;
          for (int l = 0; l < VL; ++l) s += acc[l];
          dxr[i] = s;
        }
      }
    }
    if (n_act == 0) continue;
    // Pass 2: carry += dz[:, active] W[active, :]  (dL/dh_{t-1}).
    for (int64_t rb = b0; rb < b1; rb += R) {
      for (int r = 0; r < R; ++r) {
        const int64_t b = imin(rb + r, b1 - 1);
        carry_r[r] = dh0 + b * H;
        dz_r[r] = dz0 + (b - b0) * dz_stride;
      }
      for_tiles<kTiles>(n_k, [&](auto nv, int i) {
        bwd_carry_block<T, VL, R, decltype(nv)::value>(carry_r, dz_r, G.w, H, all_cols + i, ac, n_act);
      });
    }
    // Pass 3: dW[active rows, :] += dz^T h_prev over this slice's rows.
    for (int ia = 0; ia < n_act; ++ia) {
      for (int jj = 0; jj < VL; jj += JB) {
        const int64_t j0 = ac[ia] + jj;
        for_tiles<kDwTiles>(n_k, [&](auto nv, int i) {
          bwd_dw_block<T, VL, JB, decltype(nv)::value>(dw_part, dz0, dz_stride, S.h, H, nrows, H, j0,
                                                       all_cols + i);
        });
      }
    }
    if (!proj) continue;
    // Pass 4 (x-mode): dW_x^T[:, active] += x_t^T dz and db[active] += sum_b dz, the same
    // block kernel with x (and a column of ones) in the place of dz.
    for (int64_t i0 = 0; i0 <= I; ++i0) {
      const T* scal = i0 < I ? G.src.x + (b0 * TT + t) * I : &one;
      const int64_t scal_stride = i0 < I ? TT * I : 0, irow = i0 < I ? i0 : 0;
      T* dst = i0 < I ? dwx_part : dwx_part + I * H;
      for_tiles<kDwTiles>(n_act, [&](auto nv, int ia) {
        bwd_dw_block<T, VL, 1, decltype(nv)::value>(dst, scal, scal_stride, dz0, dz_stride, nrows, H,
                                                    irow, ac + ia);
      });
    }
  }
}

// ---------------------------------------------------------------- entry points
template <typename T>
void fwd(const Problem<T>& P, int vl, int64_t b0, int64_t b1, const Input<T>& src, const T* wt,
         const T* h0, T* hs, T* cs, T* last) {
  with_vl<T>(vl, [&](auto v) {
    with_rows(b1 - b0, [&](auto r) {
      fwd_slice<T, decltype(v)::value, decltype(r)::value>(P, b0, b1, src, wt, h0, hs, cs, last);
    });
  });
}

template <typename T>
void bwd(const Problem<T>& P, int vl, int64_t b0, int64_t b1, int64_t slice, const Grads<T>& G,
         const Scratch<T>& S) {
  with_vl<T>(vl, [&](auto v) {
    with_rows(b1 - b0, [&](auto r) {
      bwd_slice<T, decltype(v)::value, decltype(r)::value>(P, b0, b1, slice, G, S);
    });
  });
}

}  // namespace HRNN_NS

HRNN_DEFINE_KERNEL_TABLE(KernelTable, HRNN_CAT(kernels_, HRNN_CPU_CAPABILITY), HRNN_NS)

}  // namespace hrnn_cpu
