// Fused CPU kernels for the leaky modular recurrence (see hrnn/core.py):
//
//     z_t = u_t + h_{t-1} W^T,   c_t = tanh(z_t),   h_t = lerp(h_{t-1}, c_t, a_t)
//
// Design (each choice measured, see the README "Performance" section):
//  * Batch rows never interact through time, in either direction, so the batch is cut
//    into one slice per thread and each thread runs the WHOLE time loop on its slice:
//    one parallel region per call, no synchronisation per step.
//  * The per-step products (rows x H @ H x H, e.g. 50x128x128) are register-blocked
//    kernels written with GCC vector extensions (AVX-512 under -march=native), with
//    the tanh / lerp epilogue fused in; nothing goes through ATen dispatch per step.
//  * Backward through time is hand-written; the weight gradient is accumulated per
//    thread inside the loop (rank-rows update per step touching only the active rows of
//    dW) and the per-thread partials are summed once at the end.
//  * Hard clocks: at each step only "tiles" (VL consecutive units) that contain an
//    active unit are computed, forward and backward; the others copy the state.
//  * The big (B, T, H) buffers come from a small pool of reused blocks, so their
//    pages are touched once per process rather than once per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

// ---------------------------------------------------------------- buffer pool
// Blocks handed out as tensor storage; the storage deleter returns them here, so a
// block is reused only once every tensor viewing it is gone (safe by construction).
struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // size -> block
  size_t cached_bytes = 0;
  size_t limit_bytes = size_t(1) << 30;      // cached (idle) bytes kept at most
};

Pool& pool() {
  static Pool* p = new Pool;  // leaked on purpose: deleters may run at exit
  return *p;
}

void pool_release(void* ptr, size_t bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  if (bytes > p.limit_bytes) {
    std::free(ptr);
    return;
  }
  while (p.cached_bytes + bytes > p.limit_bytes && !p.free_blocks.empty()) {
    auto it = p.free_blocks.begin();  // drop the smallest idle blocks first
    p.cached_bytes -= it->first;
    std::free(it->second);
    p.free_blocks.erase(it);
  }
  p.free_blocks.emplace(bytes, ptr);
  p.cached_bytes += bytes;
}

at::Tensor pool_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  size_t bytes = size_t(std::max<int64_t>(numel, 1)) * opts.dtype().itemsize();
  bytes = (bytes + 63) / 64 * 64;
  void* ptr = nullptr;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free_blocks.find(bytes);  // exact size: sizes repeat every step
    if (it != p.free_blocks.end()) {
      ptr = it->second;
      p.cached_bytes -= bytes;
      p.free_blocks.erase(it);
    }
  }
  if (!ptr) {
    ptr = std::aligned_alloc(64, bytes);
    TORCH_CHECK(ptr, "hrnn fused: out of memory allocating ", bytes, " bytes");
  }
  return torch::from_blob(
      ptr, sizes, [bytes](void* q) { pool_release(q, bytes); }, opts);
}

// ---------------------------------------------------------------- vectors
template <typename T, int VL>
struct VecOf {
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
template <typename VT, typename T>
inline VT vset(T x) {
  return VT{} + x;
}

// tanh. float: rational minimax approximation (Eigen's single-precision coefficients,
// clamp at +-7.9053, beyond which tanh rounds to +-1 within 2.4e-7); max relative error
// measured 3.4e-7 against double tanh over [-12, 12]. double: libm tanh per lane.
template <typename VT>
inline VT vtanh(VT x, float) {
  const VT hi = vset<VT>(7.90531110763549805f), lo = vset<VT>(-7.90531110763549805f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const VT x2 = x * x;
  VT p = vset<VT>(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  VT q = vset<VT>(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
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

// ---------------------------------------------------------------- problem view
template <typename T>
struct Problem {
  int64_t B, T_, H;
  int64_t n_tiles;                 // H / VL
  const T* a;                      // (T, H) activations, repeated over module units
  std::vector<T> a_buf;
  std::vector<int32_t> act_cols;   // per step: element offsets of computed tiles
  std::vector<int32_t> act_start;  // (T + 1) offsets into act_cols
  std::vector<int32_t> idle_cols;  // per step: offsets of skipped tiles
  std::vector<int32_t> idle_start;
};

template <typename T>
void build_tiles(Problem<T>& P, int VL, bool skip) {
  P.n_tiles = P.H / VL;
  P.act_start.assign(1, 0);
  P.idle_start.assign(1, 0);
  P.act_cols.reserve(P.T_ * P.n_tiles);
  for (int64_t t = 0; t < P.T_; ++t) {
    const T* at = P.a + t * P.H;
    for (int64_t tile = 0; tile < P.n_tiles; ++tile) {
      bool active = !skip;
      if (skip)
        for (int i = 0; i < VL; ++i) active = active || at[tile * VL + i] != T(0);
      (active ? P.act_cols : P.idle_cols).push_back(int32_t(tile * VL));
    }
    P.act_start.push_back(int32_t(P.act_cols.size()));
    P.idle_start.push_back(int32_t(P.idle_cols.size()));
  }
}

// ---------------------------------------------------------------- forward
// One row block (R rows) x NV active tiles: z = u + h_prev W^T over the full K, then
// c = tanh(z), h = lerp(h_prev, c, a).
template <typename T, int VL, int R, int NV>
inline void fwd_block(const T* const* hp, const T* const* u, T* const* ho, T* const* co,
                      const T* wt, int64_t H, const int32_t* cols, const T* a) {
  using VT = typename VecOf<T, VL>::type;
  VT acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload<VT>(u[r] + cols[v]);
  for (int64_t k = 0; k < H; ++k) {
    const T* wk = wt + k * H;
    VT w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload<VT>(wk + cols[v]);
    for (int r = 0; r < R; ++r) {
      const VT hb = vset<VT>(hp[r][k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += hb * w[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    const VT av = vload<VT>(a + cols[v]);
    for (int r = 0; r < R; ++r) {
      const VT c = vtanh(acc[r][v], T(0));
      if (co) vstore(co[r] + cols[v], c);
      vstore(ho[r] + cols[v], vlerp<VT, T>(vload<VT>(hp[r] + cols[v]), c, av));
    }
  }
}

template <typename T, int VL, int R>
void fwd_slice(const Problem<T>& P, int64_t b0, int64_t b1, const T* u, const T* wt,
               const T* h0, T* hs, T* cs) {
  using VT = typename VecOf<T, VL>::type;
  const int64_t H = P.H, TT = P.T_;
  const T* hp[R];
  const T* ur[R];
  T* ho[R];
  T* co[R];
  for (int64_t t = 0; t < TT; ++t) {
    const T* at = P.a + t * H;
    const int32_t* ac = P.act_cols.data() + P.act_start[t];
    const int n_act = P.act_start[t + 1] - P.act_start[t];
    const int32_t* ic = P.idle_cols.data() + P.idle_start[t];
    const int n_idle = P.idle_start[t + 1] - P.idle_start[t];
    for (int64_t rb = b0; rb < b1; rb += R) {
      for (int r = 0; r < R; ++r) {
        // Short last block: repeat the last row (identical writes, harmless).
        const int64_t b = std::min(rb + r, b1 - 1);
        hp[r] = t ? hs + (b * TT + t - 1) * H : h0 + b * H;
        ur[r] = u + (b * TT + t) * H;
        ho[r] = hs + (b * TT + t) * H;
        co[r] = cs ? cs + (b * TT + t) * H : nullptr;
      }
      T* const* cop = cs ? co : nullptr;
      int i = 0;
      for (; i + 4 <= n_act; i += 4) fwd_block<T, VL, R, 4>(hp, ur, ho, cop, wt, H, ac + i, at);
      switch (n_act - i) {
        case 3: fwd_block<T, VL, R, 3>(hp, ur, ho, cop, wt, H, ac + i, at); break;
        case 2: fwd_block<T, VL, R, 2>(hp, ur, ho, cop, wt, H, ac + i, at); break;
        case 1: fwd_block<T, VL, R, 1>(hp, ur, ho, cop, wt, H, ac + i, at); break;
        default: break;
      }
      for (int j = 0; j < n_idle; ++j)
        for (int r = 0; r < R; ++r) vstore(ho[r] + ic[j], vload<VT>(hp[r] + ic[j]));
    }
  }
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

// dW[j0 .. j0+JB, k-tiles] += sum_b dz[b, j] h_prev[b, k-tiles]
template <typename T, int VL, int JB, int NV>
inline void bwd_dw_block(T* dw, const T* const* dzr, const T* const* hpr, int64_t nrows,
                         int64_t H, int64_t j0, const int32_t* kcols) {
  using VT = typename VecOf<T, VL>::type;
  VT acc[JB][NV];
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) acc[jj][v] = vload<VT>(dw + (j0 + jj) * H + kcols[v]);
  for (int64_t b = 0; b < nrows; ++b) {
    VT hv[NV];
    for (int v = 0; v < NV; ++v) hv[v] = vload<VT>(hpr[b] + kcols[v]);
    for (int jj = 0; jj < JB; ++jj) {
      const VT d = vset<VT>(dzr[b][j0 + jj]);
      for (int v = 0; v < NV; ++v) acc[jj][v] += d * hv[v];
    }
  }
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) vstore(dw + (j0 + jj) * H + kcols[v], acc[jj][v]);
}

template <typename T, int VL, int R>
void bwd_slice(const Problem<T>& P, int64_t b0, int64_t b1, const T* g, const T* g_last, const T* hs,
               const T* cs, const T* h0, const T* w, T* du, T* dh0, T* dw_part, T* da_part,
               const std::vector<int32_t>& all_cols) {
  using VT = typename VecOf<T, VL>::type;
  constexpr int JB = VL < 4 ? VL : 4;
  const int64_t H = P.H, TT = P.T_, nrows = b1 - b0;
  std::vector<const T*> hpr(nrows), dzr(nrows);
  const int n_k = int(all_cols.size());
  T* carry_r[R];
  const T* dz_r[R];
  // g == nullptr: the loss reads the last state only, g_last (B, H) is its gradient and
  // seeds the carry; no (B, T, H) gradient exists.
  for (int64_t b = b0; b < b1; ++b) {
    if (g) std::memset(dh0 + b * H, 0, sizeof(T) * H);
    else std::memcpy(dh0 + b * H, g_last + b * H, sizeof(T) * H);
  }
  for (int64_t t = TT - 1; t >= 0; --t) {
    const T* at = P.a + t * H;
    const int32_t* ac = P.act_cols.data() + P.act_start[t];
    const int n_act = P.act_start[t + 1] - P.act_start[t];
    const int32_t* ic = P.idle_cols.data() + P.idle_start[t];
    const int n_idle = P.idle_start[t + 1] - P.idle_start[t];
    T* da_t = da_part ? da_part + t * H : nullptr;
    // Pass 1, elementwise: dh = g + carry; dz = dh a (1 - c^2); carry = dh (1 - a).
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = (b * TT + t) * H;
      const T* hp = t ? hs + row - H : h0 + b * H;
      hpr[b - b0] = hp;
      dzr[b - b0] = du + row;
      T* carry = dh0 + b * H;
      for (int i = 0; i < n_act; ++i) {
        const int32_t j = ac[i];
        const VT av = vload<VT>(at + j), c = vload<VT>(cs + row + j);
        const VT dh = g ? vload<VT>(g + row + j) + vload<VT>(carry + j) : vload<VT>(carry + j);
        vstore(du + row + j, dh * av * (vset<VT>(T(1)) - c * c));
        if (da_t) vstore(da_t + j, vload<VT>(da_t + j) + dh * (c - vload<VT>(hp + j)));
        vstore(carry + j, dh * (vset<VT>(T(1)) - av));
      }
      for (int i = 0; i < n_idle; ++i) {
        const int32_t j = ic[i];
        if (g) vstore(carry + j, vload<VT>(g + row + j) + vload<VT>(carry + j));
        vstore(du + row + j, vset<VT>(T(0)));
      }
    }
    if (n_act == 0) continue;
    // Pass 2: carry += dz[:, active] W[active, :]  (dL/dh_{t-1}).
    for (int64_t rb = b0; rb < b1; rb += R) {
      for (int r = 0; r < R; ++r) {
        const int64_t b = std::min(rb + r, b1 - 1);
        carry_r[r] = dh0 + b * H;
        dz_r[r] = du + (b * TT + t) * H;
      }
      int i = 0;
      for (; i + 4 <= n_k; i += 4)
        bwd_carry_block<T, VL, R, 4>(carry_r, dz_r, w, H, all_cols.data() + i, ac, n_act);
      switch (n_k - i) {
        case 3: bwd_carry_block<T, VL, R, 3>(carry_r, dz_r, w, H, all_cols.data() + i, ac, n_act); break;
        case 2: bwd_carry_block<T, VL, R, 2>(carry_r, dz_r, w, H, all_cols.data() + i, ac, n_act); break;
        case 1: bwd_carry_block<T, VL, R, 1>(carry_r, dz_r, w, H, all_cols.data() + i, ac, n_act); break;
        default: break;
      }
    }
    // Pass 3: dW[active rows, :] += dz^T h_prev over this slice's rows.
    for (int ia = 0; ia < n_act; ++ia) {
      for (int jj = 0; jj < VL; jj += JB) {
        const int64_t j0 = ac[ia] + jj;
        int i = 0;
        for (; i + 4 <= n_k; i += 4)
          bwd_dw_block<T, VL, JB, 4>(dw_part, dzr.data(), hpr.data(), nrows, H, j0, all_cols.data() + i);
        switch (n_k - i) {
          case 3: bwd_dw_block<T, VL, JB, 3>(dw_part, dzr.data(), hpr.data(), nrows, H, j0, all_cols.data() + i); break;
          case 2: bwd_dw_block<T, VL, JB, 2>(dw_part, dzr.data(), hpr.data(), nrows, H, j0, all_cols.data() + i); break;
          case 1: bwd_dw_block<T, VL, JB, 1>(dw_part, dzr.data(), hpr.data(), nrows, H, j0, all_cols.data() + i); break;
          default: break;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- dispatch
int pick_vl(int64_t H, int64_t group, bool is_float) {
  // Widest vector dividing H; for skipping, prefer one that also divides the module
  // width, so tiles never straddle two modules.
  const int cands_f[] = {16, 8, 4, 1};
  const int cands_d[] = {8, 4, 1};
  const int* c = is_float ? cands_f : cands_d;
  const int n = is_float ? 4 : 3;
  for (int i = 0; i < n; ++i)
    if (H % c[i] == 0 && group % c[i] == 0) return c[i];
  return 1;
}

int pick_rows(int64_t rows) {
  // Register-block height with the least padding (ties go to the taller block).
  int best = 6;
  int64_t best_pad = -1;
  for (int r : {6, 5, 4}) {
    const int64_t pad = (rows + r - 1) / r * r - rows;
    if (best_pad < 0 || pad < best_pad) best = r, best_pad = pad;
  }
  return best;
}

int64_t n_slices(int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
}

template <typename T, int VL>
void run_fwd(const Problem<T>& P, const T* u, const T* wt, const T* h0, T* hs, T* cs) {
  const int64_t ns = n_slices(P.B);
  at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b0 = P.B * s / ns, b1 = P.B * (s + 1) / ns;
      switch (pick_rows(b1 - b0)) {
        case 6: fwd_slice<T, VL, 6>(P, b0, b1, u, wt, h0, hs, cs); break;
        case 5: fwd_slice<T, VL, 5>(P, b0, b1, u, wt, h0, hs, cs); break;
        default: fwd_slice<T, VL, 4>(P, b0, b1, u, wt, h0, hs, cs); break;
      }
    }
  });
}

template <typename T, int VL>
void run_bwd(const Problem<T>& P, const T* g, const T* g_last, const T* hs, const T* cs, const T* h0,
             const T* w, T* du, T* dh0, T* dw_parts, T* da_parts) {
  const int64_t ns = n_slices(P.B), H = P.H;
  std::vector<int32_t> all_cols;
  for (int64_t k = 0; k < H; k += VL) all_cols.push_back(int32_t(k));
  at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b0 = P.B * s / ns, b1 = P.B * (s + 1) / ns;
      T* dwp = dw_parts + s * H * H;
      T* dap = da_parts ? da_parts + s * P.T_ * H : nullptr;
      std::memset(dwp, 0, sizeof(T) * H * H);  // first touch by the owning thread
      if (dap) std::memset(dap, 0, sizeof(T) * P.T_ * H);
      switch (pick_rows(b1 - b0)) {
        case 6: bwd_slice<T, VL, 6>(P, b0, b1, g, g_last, hs, cs, h0, w, du, dh0, dwp, dap, all_cols); break;
        case 5: bwd_slice<T, VL, 5>(P, b0, b1, g, g_last, hs, cs, h0, w, du, dh0, dwp, dap, all_cols); break;
        default: bwd_slice<T, VL, 4>(P, b0, b1, g, g_last, hs, cs, h0, w, du, dh0, dwp, dap, all_cols); break;
      }
    }
  });
}

template <typename T>
void fwd_typed(const Problem<T>& P, int VL, const T* u, const T* wt, const T* h0, T* hs, T* cs) {
  switch (VL) {
    case 16: if constexpr (std::is_same<T, float>::value) { run_fwd<T, 16>(P, u, wt, h0, hs, cs); break; } [[fallthrough]];
    case 8: run_fwd<T, 8>(P, u, wt, h0, hs, cs); break;
    case 4: run_fwd<T, 4>(P, u, wt, h0, hs, cs); break;
    default: run_fwd<T, 1>(P, u, wt, h0, hs, cs); break;
  }
}

template <typename T>
void bwd_typed(const Problem<T>& P, int VL, const T* g, const T* g_last, const T* hs, const T* cs, const T* h0,
               const T* w, T* du, T* dh0, T* dwp, T* dap) {
  switch (VL) {
    case 16: if constexpr (std::is_same<T, float>::value) { run_bwd<T, 16>(P, g, g_last, hs, cs, h0, w, du, dh0, dwp, dap); break; } [[fallthrough]];
    case 8: run_bwd<T, 8>(P, g, g_last, hs, cs, h0, w, du, dh0, dwp, dap); break;
    case 4: run_bwd<T, 4>(P, g, g_last, hs, cs, h0, w, du, dh0, dwp, dap); break;
    default: run_bwd<T, 1>(P, g, g_last, hs, cs, h0, w, du, dh0, dwp, dap); break;
  }
}

void check_inputs(const at::Tensor& u, const at::Tensor& w, const at::Tensor& waves,
                  const at::Tensor& h0) {
  for (const at::Tensor* x : {&u, &w, &waves, &h0}) {
    TORCH_CHECK(x->device().is_cpu(), "hrnn fused: CPU tensors only");
    TORCH_CHECK(x->scalar_type() == u.scalar_type(), "hrnn fused: mixed dtypes");
    TORCH_CHECK(x->is_contiguous(), "hrnn fused: contiguous tensors only");
  }
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "hrnn fused: float32/float64 only");
  TORCH_CHECK(u.dim() == 3, "u must be (B, T, H)");
  const int64_t B = u.size(0), T = u.size(1), H = u.size(2);
  TORCH_CHECK(w.sizes() == at::IntArrayRef({H, H}), "w_h must be (H, H)");
  TORCH_CHECK(waves.dim() == 2 && waves.size(0) == T && waves.size(1) > 0 &&
                  H % waves.size(1) == 0,
              "waves must be (T, M) with M dividing H");
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({B, H}), "h0 must be (B, H)");
  TORCH_CHECK(T * H < (int64_t(1) << 31), "hrnn fused: T * H too large");
}

template <typename T>
void make_problem(Problem<T>& P, const at::Tensor& u, const at::Tensor& waves, int VL,
                  bool skip) {
  P.B = u.size(0);
  P.T_ = u.size(1);
  P.H = u.size(2);
  const int64_t M = waves.size(1), S = P.H / M;
  const T* wv = waves.data_ptr<T>();
  P.a_buf.resize(P.T_ * P.H);
  for (int64_t t = 0; t < P.T_; ++t)
    for (int64_t m = 0; m < M; ++m)
      std::fill_n(P.a_buf.data() + t * P.H + m * S, S, wv[t * M + m]);
  P.a = P.a_buf.data();
  build_tiles(P, VL, skip);
}

// forward(u, w_h, waves, h0, skip, save) -> (states, candidates or empty)
std::vector<at::Tensor> forward(const at::Tensor& u, const at::Tensor& w,
                                const at::Tensor& waves, const at::Tensor& h0, bool skip,
                                bool save) {
  check_inputs(u, w, waves, h0);
  at::NoGradGuard no_grad;
  const int64_t B = u.size(0), T = u.size(1), H = u.size(2), S = H / waves.size(1);
  const int VL = pick_vl(H, skip ? S : H, u.scalar_type() == at::kFloat);
  at::Tensor hs = pool_empty({B, T, H}, u.options());
  at::Tensor cs = save ? pool_empty({B, T, H}, u.options()) : at::Tensor();
  at::Tensor wt = w.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "hrnn_leaky_fwd", [&] {
    Problem<scalar_t> P;
    make_problem<scalar_t>(P, u, waves, VL, skip);
    fwd_typed<scalar_t>(P, VL, u.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
                        h0.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                        save ? cs.data_ptr<scalar_t>() : nullptr);
  });
  return {hs, save ? cs : at::empty({0}, u.options())};
}

// backward(grad_states, states, candidates, h0, w_h, waves, skip, need_dwaves)
//   -> (du, dw_h, dwaves (T, M) or empty, dh0). skip must be the forward's.
// grad_states is (B, T, H), or (B, H) when the output was the last state only.
std::vector<at::Tensor> backward(const at::Tensor& g_in, const at::Tensor& hs,
                                 const at::Tensor& cs, const at::Tensor& h0,
                                 const at::Tensor& w, const at::Tensor& waves, bool skip,
                                 bool need_da) {
  at::Tensor g = g_in.contiguous();
  check_inputs(hs, w, waves, h0);
  const bool last_only = g.dim() == 2;
  TORCH_CHECK((last_only ? g.sizes() == h0.sizes() : g.sizes() == hs.sizes()) &&
                  cs.sizes() == hs.sizes(),
              "hrnn fused: shape mismatch");
  TORCH_CHECK(g.scalar_type() == hs.scalar_type() && cs.scalar_type() == hs.scalar_type(),
              "hrnn fused: mixed dtypes");
  at::NoGradGuard no_grad;
  const int64_t B = hs.size(0), T = hs.size(1), H = hs.size(2), M = waves.size(1), S = H / M;
  const int VL = pick_vl(H, skip ? S : H, hs.scalar_type() == at::kFloat);
  const int64_t ns = n_slices(B);
  at::Tensor du = pool_empty({B, T, H}, hs.options());
  at::Tensor dh0 = at::empty({B, H}, hs.options());
  at::Tensor dw = at::empty({H, H}, hs.options());
  at::Tensor da = need_da ? at::empty({T, M}, hs.options()) : at::empty({0}, hs.options());
  at::Tensor dw_parts = pool_empty({ns, H, H}, hs.options());
  at::Tensor da_parts = need_da ? pool_empty({ns, T, H}, hs.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "hrnn_leaky_bwd", [&] {
    Problem<scalar_t> P;
    make_problem<scalar_t>(P, hs, waves, VL, skip);
    scalar_t* dap = need_da ? da_parts.data_ptr<scalar_t>() : nullptr;
    scalar_t* dwp = dw_parts.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    bwd_typed<scalar_t>(P, VL, last_only ? nullptr : gp, last_only ? gp : nullptr,
                        hs.data_ptr<scalar_t>(),
                        cs.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                        du.data_ptr<scalar_t>(), dh0.data_ptr<scalar_t>(), dwp, dap);
    // Reduce the per-slice partials here, serially: they are small, and separate ATen ops
    // would each open another parallel region.
    scalar_t* dwo = dw.data_ptr<scalar_t>();
    std::copy_n(dwp, H * H, dwo);
    for (int64_t s = 1; s < ns; ++s)
      for (int64_t i = 0; i < H * H; ++i) dwo[i] += dwp[s * H * H + i];
    if (need_da) {
      scalar_t* dao = da.data_ptr<scalar_t>();
      for (int64_t t = 0; t < T; ++t)
        for (int64_t m = 0; m < M; ++m) {
          scalar_t acc = 0;
          for (int64_t s = 0; s < ns; ++s) {
            const scalar_t* src = dap + (s * T + t) * H + m * S;
            for (int64_t i = 0; i < S; ++i) acc += src[i];
          }
          dao[t * M + m] = acc;
        }
    }
  });
  return {du, dw, da, dh0};
}

// An uninitialised tensor of `sizes` with like's dtype, its storage from the buffer pool.
at::Tensor pool_tensor(std::vector<int64_t> sizes, const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "hrnn fused: CPU tensors only");
  return pool_empty(sizes, like.options());
}

std::vector<int64_t> pool_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return {int64_t(p.cached_bytes), int64_t(p.free_blocks.size()), int64_t(p.limit_bytes)};
}

void set_pool_limit(int64_t bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  p.limit_bytes = size_t(std::max<int64_t>(bytes, 0));
  while (p.cached_bytes > p.limit_bytes && !p.free_blocks.empty()) {
    auto it = p.free_blocks.begin();
    p.cached_bytes -= it->first;
    std::free(it->second);
    p.free_blocks.erase(it);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hrnn fused leaky scan (CPU)";
  m.def("forward", &forward, "leaky scan forward");
  m.def("backward", &backward, "leaky scan backward through time");
  m.def("empty", &pool_tensor, "uninitialised tensor (sizes, like) from the buffer pool");
  m.def("pool_stats", &pool_stats, "(cached bytes, cached blocks, limit bytes)");
  m.def("set_pool_limit", &set_pool_limit, "max idle bytes the buffer pool keeps");
}
