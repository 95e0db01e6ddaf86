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
//  * forward_x / backward_x fuse the input projection: u_t = b + x_t W_x^T is formed in
//    the accumulator of the step's product (active tiles only), and dW_x, db are
//    accumulated per thread in the backward loop, so neither u nor its gradient, (B, T, H)
//    each, is ever written. With u hoisted, writing it and reading its gradient twice cost
//    the hard clock as much as the dense one (6 of 19 ms at T = 784), halving the saving.
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
// Where z_t's input term comes from: u (B, T, H) precomputed, or, with the projection fused,
// x (B, T, I) and W_x^T (I, H) plus an optional bias (H): z_t = b + x_t W_x^T + h_{t-1} W_h^T,
// computed per step for the active tiles only, so a (B, T, H) u never exists.
template <typename T>
struct Input {
  const T* u = nullptr;
  const T* x = nullptr;
  const T* wxT = nullptr;
  const T* bias = nullptr;
  int64_t I = 0;
};

// One row block (R rows) x NV active tiles: z = u + h_prev W^T over the full K, then
// c = tanh(z), h = lerp(h_prev, c, a).
template <typename T, int VL, int R, int NV>
inline void fwd_block(const T* const* hp, const T* const* in, const Input<T>& src, T* const* ho,
                      T* const* co, const T* wt, int64_t H, const int32_t* cols, const T* a) {
  using VT = typename VecOf<T, VL>::type;
  VT acc[R][NV];
  if (src.x) {  // fused projection: in[r] is row r's x_t (I values)
    for (int v = 0; v < NV; ++v) {
      const VT bv = src.bias ? vload<VT>(src.bias + cols[v]) : vset<VT>(T(0));
      for (int r = 0; r < R; ++r) acc[r][v] = bv;
    }
    for (int64_t i = 0; i < src.I; ++i) {
      const T* wi = src.wxT + i * H;
      VT w[NV];
      for (int v = 0; v < NV; ++v) w[v] = vload<VT>(wi + cols[v]);
      for (int r = 0; r < R; ++r) {
        const VT xb = vset<VT>(in[r][i]);
        for (int v = 0; v < NV; ++v) acc[r][v] += xb * w[v];
      }
    }
  } else {  // in[r] is row r's u_t (H values)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = vload<VT>(in[r] + cols[v]);
  }
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
void fwd_slice(const Problem<T>& P, int64_t b0, int64_t b1, const Input<T>& src, const T* wt,
               const T* h0, T* hs, T* cs) {
  using VT = typename VecOf<T, VL>::type;
  const int64_t H = P.H, TT = P.T_;
  const T* hp[R];
  const T* in[R];
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
        in[r] = src.x ? src.x + (b * TT + t) * src.I : src.u + (b * TT + t) * H;
        ho[r] = hs + (b * TT + t) * H;
        co[r] = cs ? cs + (b * TT + t) * H : nullptr;
      }
      T* const* cop = cs ? co : nullptr;
      int i = 0;
      for (; i + 4 <= n_act; i += 4) fwd_block<T, VL, R, 4>(hp, in, src, ho, cop, wt, H, ac + i, at);
      switch (n_act - i) {
        case 3: fwd_block<T, VL, R, 3>(hp, in, src, ho, cop, wt, H, ac + i, at); break;
        case 2: fwd_block<T, VL, R, 2>(hp, in, src, ho, cop, wt, H, ac + i, at); break;
        case 1: fwd_block<T, VL, R, 1>(hp, in, src, ho, cop, wt, H, ac + i, at); break;
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

// What one backward call reads and writes; every pointer covers the whole batch.
template <typename T>
struct Grads {
  const T* g = nullptr;       // (B, T, H) gradient of the states, or nullptr when ...
  const T* g_last = nullptr;  // ... the loss read the last state only: its (B, H) gradient
  const T* hs = nullptr;      // (B, T, H) states
  const T* cs = nullptr;      // (B, T, H) candidates
  const T* h0 = nullptr;
  const T* w = nullptr;       // (H, H) W_h
  Input<T> src;               // the forward's input source (x-mode: x and W_x^T, for dx)
  T* du = nullptr;            // u-mode: (B, T, H) gradient of u
  T* dx = nullptr;            // x-mode, when x needs a gradient: (B, T, I)
  T* dh0 = nullptr;           // (B, H); also the running dL/dh_{t-1} ("carry")
  T* dw_parts = nullptr;      // (slices, H, H) per-slice partial dW_h
  T* dwx_parts = nullptr;     // x-mode: (slices, I + 1, H) partial dW_x^T, last row db
  T* da_parts = nullptr;      // optional (slices, T, H) partial gradient of a
};

template <typename T, int VL, int R>
void bwd_slice(const Problem<T>& P, int64_t b0, int64_t b1, int64_t slice, const Grads<T>& G,
               const std::vector<int32_t>& all_cols) {
  using VT = typename VecOf<T, VL>::type;
  constexpr int JB = VL < 4 ? VL : 4;
  const int64_t H = P.H, TT = P.T_, nrows = b1 - b0, I = G.src.I;
  const bool proj = G.src.x != nullptr;
  const T *g = G.g, *hs = G.hs, *cs = G.cs, *h0 = G.h0;
  T* dh0 = G.dh0;
  T* dw_part = G.dw_parts + slice * H * H;
  T* dwx_part = proj ? G.dwx_parts + slice * (I + 1) * H : nullptr;
  T* da_part = G.da_parts ? G.da_parts + slice * TT * H : nullptr;
  // x-mode: dz lives one step at a time in this scratch; u-mode: dz is du itself.
  std::vector<T> dz_scratch(proj ? nrows * H : 0);
  const T one = T(1);
  std::vector<const T*> hpr(nrows), dzr(nrows), xr(nrows), ones(nrows, &one);
  const int n_k = int(all_cols.size());
  T* carry_r[R];
  const T* dz_r[R];
  for (int64_t b = b0; b < b1; ++b) {
    if (g) std::memset(dh0 + b * H, 0, sizeof(T) * H);
    else std::memcpy(dh0 + b * H, G.g_last + b * H, sizeof(T) * H);
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
      T* dz = proj ? dz_scratch.data() + (b - b0) * H : G.du + row;
      hpr[b - b0] = hp;
      dzr[b - b0] = dz;
      if (proj) xr[b - b0] = G.src.x + (b * TT + t) * I;
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
            acc += vload<VT>(dzr[b - b0] + ac[ia]) * vload<VT>(G.src.wxT + i * H + ac[ia]);
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
        const int64_t b = std::min(rb + r, b1 - 1);
        carry_r[r] = dh0 + b * H;
        dz_r[r] = dzr[b - b0];
      }
      int i = 0;
      for (; i + 4 <= n_k; i += 4)
        bwd_carry_block<T, VL, R, 4>(carry_r, dz_r, G.w, H, all_cols.data() + i, ac, n_act);
      switch (n_k - i) {
        case 3: bwd_carry_block<T, VL, R, 3>(carry_r, dz_r, G.w, H, all_cols.data() + i, ac, n_act); break;
        case 2: bwd_carry_block<T, VL, R, 2>(carry_r, dz_r, G.w, H, all_cols.data() + i, ac, n_act); break;
        case 1: bwd_carry_block<T, VL, R, 1>(carry_r, dz_r, G.w, H, all_cols.data() + i, ac, n_act); break;
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
    if (!proj) continue;
    // Pass 4 (x-mode): dW_x^T[:, active] += x_t^T dz and db[active] += sum_b dz, the same
    // block kernel with x (and a column of ones) in the place of dz.
    for (int64_t i0 = 0; i0 <= I; ++i0) {
      const T* const* scal = i0 < I ? xr.data() : ones.data();
      const int64_t irow = i0 < I ? i0 : 0;
      T* dst = i0 < I ? dwx_part : dwx_part + I * H;
      int ia = 0;
      for (; ia + 4 <= n_act; ia += 4)
        bwd_dw_block<T, VL, 1, 4>(dst, scal, dzr.data(), nrows, H, irow, ac + ia);
      switch (n_act - ia) {
        case 3: bwd_dw_block<T, VL, 1, 3>(dst, scal, dzr.data(), nrows, H, irow, ac + ia); break;
        case 2: bwd_dw_block<T, VL, 1, 2>(dst, scal, dzr.data(), nrows, H, irow, ac + ia); break;
        case 1: bwd_dw_block<T, VL, 1, 1>(dst, scal, dzr.data(), nrows, H, irow, ac + ia); break;
        default: break;
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
void run_fwd(const Problem<T>& P, const Input<T>& src, const T* wt, const T* h0, T* hs, T* cs) {
  const int64_t ns = n_slices(P.B);
  at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b0 = P.B * s / ns, b1 = P.B * (s + 1) / ns;
      switch (pick_rows(b1 - b0)) {
        case 6: fwd_slice<T, VL, 6>(P, b0, b1, src, wt, h0, hs, cs); break;
        case 5: fwd_slice<T, VL, 5>(P, b0, b1, src, wt, h0, hs, cs); break;
        default: fwd_slice<T, VL, 4>(P, b0, b1, src, wt, h0, hs, cs); break;
      }
    }
  });
}

template <typename T, int VL>
void run_bwd(const Problem<T>& P, const Grads<T>& G) {
  const int64_t ns = n_slices(P.B), H = P.H, I = G.src.I;
  std::vector<int32_t> all_cols;
  for (int64_t k = 0; k < H; k += VL) all_cols.push_back(int32_t(k));
  at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b0 = P.B * s / ns, b1 = P.B * (s + 1) / ns;
      // First touch of the partials by the owning thread.
      std::memset(G.dw_parts + s * H * H, 0, sizeof(T) * H * H);
      if (G.dwx_parts) std::memset(G.dwx_parts + s * (I + 1) * H, 0, sizeof(T) * (I + 1) * H);
      if (G.da_parts) std::memset(G.da_parts + s * P.T_ * H, 0, sizeof(T) * P.T_ * H);
      switch (pick_rows(b1 - b0)) {
        case 6: bwd_slice<T, VL, 6>(P, b0, b1, s, G, all_cols); break;
        case 5: bwd_slice<T, VL, 5>(P, b0, b1, s, G, all_cols); break;
        default: bwd_slice<T, VL, 4>(P, b0, b1, s, G, all_cols); break;
      }
    }
  });
}

template <typename T>
void fwd_typed(const Problem<T>& P, int VL, const Input<T>& src, const T* wt, const T* h0, T* hs, T* cs) {
  switch (VL) {
    case 16: if constexpr (std::is_same<T, float>::value) { run_fwd<T, 16>(P, src, wt, h0, hs, cs); break; } [[fallthrough]];
    case 8: run_fwd<T, 8>(P, src, wt, h0, hs, cs); break;
    case 4: run_fwd<T, 4>(P, src, wt, h0, hs, cs); break;
    default: run_fwd<T, 1>(P, src, wt, h0, hs, cs); break;
  }
}

template <typename T>
void bwd_typed(const Problem<T>& P, int VL, const Grads<T>& G) {
  switch (VL) {
    case 16: if constexpr (std::is_same<T, float>::value) { run_bwd<T, 16>(P, G); break; } [[fallthrough]];
    case 8: run_bwd<T, 8>(P, G); break;
    case 4: run_bwd<T, 4>(P, G); break;
    default: run_bwd<T, 1>(P, G); break;
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
  TORCH_CHECK(u.dim() == 3, "u (or x) must be (B, T, H) (or (B, T, I))");
  const int64_t B = u.size(0), T = u.size(1), H = w.size(0);
  TORCH_CHECK(w.sizes() == at::IntArrayRef({H, H}), "w_h must be (H, H)");
  TORCH_CHECK(waves.dim() == 2 && waves.size(0) == T && waves.size(1) > 0 &&
                  H % waves.size(1) == 0,
              "waves must be (T, M) with M dividing H");
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({B, H}), "h0 must be (B, H)");
  TORCH_CHECK(T * H < (int64_t(1) << 31), "hrnn fused: T * H too large");
}

// x-mode: x (B, T, I), w_x (H, I), bias (H) or undefined, all like x.
void check_projection(const at::Tensor& x, const at::Tensor& w_x, const at::Tensor& bias,
                      int64_t H) {
  for (const at::Tensor* t : {&w_x, &bias}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->device().is_cpu(), "hrnn fused: CPU tensors only");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "hrnn fused: mixed dtypes");
  }
  TORCH_CHECK(w_x.dim() == 2 && w_x.size(0) == H && w_x.size(1) == x.size(2),
              "w_x must be (H, I)");
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == H), "bias must be (H)");
}

template <typename T>
void make_problem(Problem<T>& P, int64_t B, int64_t TT, int64_t H, const at::Tensor& waves,
                  int VL, bool skip) {
  P.B = B;
  P.T_ = TT;
  P.H = H;
  const int64_t M = waves.size(1), S = P.H / M;
  const T* wv = waves.data_ptr<T>();
  P.a_buf.resize(P.T_ * P.H);
  for (int64_t t = 0; t < P.T_; ++t)
    for (int64_t m = 0; m < M; ++m)
      std::fill_n(P.a_buf.data() + t * P.H + m * S, S, wv[t * M + m]);
  P.a = P.a_buf.data();
  build_tiles(P, VL, skip);
}

// Shared by both entry points: `in` is u (B, T, H), or x (B, T, I) when w_x is defined.
std::vector<at::Tensor> forward_impl(const at::Tensor& in, const at::Tensor& w_x,
                                     const at::Tensor& bias, const at::Tensor& w,
                                     const at::Tensor& waves, const at::Tensor& h0, bool skip,
                                     bool save) {
  check_inputs(in, w, waves, h0);
  const bool proj = w_x.defined();
  if (proj) check_projection(in, w_x, bias, w.size(0));
  else TORCH_CHECK(in.size(2) == w.size(0), "u must be (B, T, H)");
  at::NoGradGuard no_grad;
  const int64_t B = in.size(0), T = in.size(1), H = w.size(0), S = H / waves.size(1);
  const int VL = pick_vl(H, skip ? S : H, in.scalar_type() == at::kFloat);
  at::Tensor hs = pool_empty({B, T, H}, in.options());
  at::Tensor cs = save ? pool_empty({B, T, H}, in.options()) : at::Tensor();
  at::Tensor wt = w.t().contiguous();
  at::Tensor wxT = proj ? w_x.t().contiguous() : at::Tensor();
  at::Tensor b = proj && bias.defined() ? bias.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "hrnn_leaky_fwd", [&] {
    Problem<scalar_t> P;
    make_problem<scalar_t>(P, B, T, H, waves, VL, skip);
    Input<scalar_t> src;
    if (proj) {
      src.x = in.data_ptr<scalar_t>();
      src.wxT = wxT.data_ptr<scalar_t>();
      src.bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      src.I = in.size(2);
    } else {
      src.u = in.data_ptr<scalar_t>();
    }
    fwd_typed<scalar_t>(P, VL, src, wt.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                        hs.data_ptr<scalar_t>(), save ? cs.data_ptr<scalar_t>() : nullptr);
  });
  return {hs, save ? cs : at::empty({0}, in.options())};
}

// forward(u, w_h, waves, h0, skip, save) -> (states, candidates or empty)
std::vector<at::Tensor> forward(const at::Tensor& u, const at::Tensor& w, const at::Tensor& waves,
                                const at::Tensor& h0, bool skip, bool save) {
  return forward_impl(u, at::Tensor(), at::Tensor(), w, waves, h0, skip, save);
}

// forward_x(x, w_x, bias or None, w_h, waves, h0, skip, save) -> (states, candidates or empty):
// the same recurrence with u = x W_x^T + bias computed inside the loop.
std::vector<at::Tensor> forward_x(const at::Tensor& x, const at::Tensor& w_x,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& w,
                                  const at::Tensor& waves, const at::Tensor& h0, bool skip, bool save) {
  return forward_impl(x, w_x, bias.has_value() ? *bias : at::Tensor(), w, waves, h0, skip, save);
}

// Shared backward: u-mode when w_x is undefined (returns du), x-mode otherwise (returns dx
// when need_dx, dW_x and db). Result: (d input or empty, dw_x or empty, db or empty, dw_h,
// dwaves (T, M) or empty, dh0).
std::vector<at::Tensor> backward_impl(const at::Tensor& g_in, const at::Tensor& hs,
                                      const at::Tensor& cs, const at::Tensor& x,
                                      const at::Tensor& w_x, const at::Tensor& h0,
                                      const at::Tensor& w, const at::Tensor& waves, bool skip,
                                      bool need_dx, bool need_da) {
  at::Tensor g = g_in.contiguous();
  check_inputs(hs, w, waves, h0);
  const bool proj = w_x.defined();
  if (proj) {
    check_inputs(x, w, waves, h0);
    check_projection(x, w_x, at::Tensor(), w.size(0));
  }
  TORCH_CHECK(hs.size(2) == w.size(0), "states must be (B, T, H)");
  const bool last_only = g.dim() == 2;
  TORCH_CHECK((last_only ? g.sizes() == h0.sizes() : g.sizes() == hs.sizes()) &&
                  cs.sizes() == hs.sizes() &&
                  (!proj || (x.size(0) == hs.size(0) && x.size(1) == hs.size(1))),
              "hrnn fused: shape mismatch");
  TORCH_CHECK(g.scalar_type() == hs.scalar_type() && cs.scalar_type() == hs.scalar_type(),
              "hrnn fused: mixed dtypes");
  at::NoGradGuard no_grad;
  const int64_t B = hs.size(0), T = hs.size(1), H = hs.size(2), M = waves.size(1), S = H / M;
  const int64_t I = proj ? x.size(2) : 0;
  const int VL = pick_vl(H, skip ? S : H, hs.scalar_type() == at::kFloat);
  const int64_t ns = n_slices(B);
  const auto opts = hs.options();
  at::Tensor du = proj ? at::Tensor() : pool_empty({B, T, H}, opts);
  at::Tensor dx = proj && need_dx ? at::empty({B, T, I}, opts) : at::Tensor();
  at::Tensor dh0 = at::empty({B, H}, opts);
  at::Tensor dw = at::empty({H, H}, opts);
  at::Tensor dwx = proj ? at::empty({H, I}, opts) : at::Tensor();
  at::Tensor db = proj ? at::empty({H}, opts) : at::Tensor();
  at::Tensor da = need_da ? at::empty({T, M}, opts) : at::Tensor();
  at::Tensor dw_parts = pool_empty({ns, H, H}, opts);
  at::Tensor dwx_parts = proj ? pool_empty({ns, I + 1, H}, opts) : at::Tensor();
  at::Tensor da_parts = need_da ? pool_empty({ns, T, H}, opts) : at::Tensor();
  at::Tensor wxT = proj ? w_x.t().contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "hrnn_leaky_bwd", [&] {
    Problem<scalar_t> P;
    make_problem<scalar_t>(P, B, T, H, waves, VL, skip);
    Grads<scalar_t> G;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    G.g = last_only ? nullptr : gp;
    G.g_last = last_only ? gp : nullptr;
    G.hs = hs.data_ptr<scalar_t>();
    G.cs = cs.data_ptr<scalar_t>();
    G.h0 = h0.data_ptr<scalar_t>();
    G.w = w.data_ptr<scalar_t>();
    if (proj) {
      G.src.x = x.data_ptr<scalar_t>();
      G.src.wxT = wxT.data_ptr<scalar_t>();
      G.src.I = I;
      G.dx = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
      G.dwx_parts = dwx_parts.data_ptr<scalar_t>();
    } else {
      G.du = du.data_ptr<scalar_t>();
    }
    G.dh0 = dh0.data_ptr<scalar_t>();
    G.dw_parts = dw_parts.data_ptr<scalar_t>();
    G.da_parts = need_da ? da_parts.data_ptr<scalar_t>() : nullptr;
    bwd_typed<scalar_t>(P, VL, G);
    // Reduce the per-slice partials here, serially: they are small, and separate ATen ops
    // would each open another parallel region.
    const scalar_t* dwp = G.dw_parts;
    scalar_t* dwo = dw.data_ptr<scalar_t>();
    std::copy_n(dwp, H * H, dwo);
    for (int64_t s = 1; s < ns; ++s)
      for (int64_t i = 0; i < H * H; ++i) dwo[i] += dwp[s * H * H + i];
    if (proj) {  // partials hold dW_x^T (I rows) then db; dW_x is (H, I)
      scalar_t* dwxo = dwx.data_ptr<scalar_t>();
      scalar_t* dbo = db.data_ptr<scalar_t>();
      for (int64_t j = 0; j < H; ++j) {
        for (int64_t i = 0; i <= I; ++i) {
          scalar_t acc = 0;
          for (int64_t s = 0; s < ns; ++s) acc += G.dwx_parts[(s * (I + 1) + i) * H + j];
          (i < I ? dwxo[j * I + i] : dbo[j]) = acc;
        }
      }
    }
    if (need_da) {
      scalar_t* dao = da.data_ptr<scalar_t>();
      for (int64_t t = 0; t < T; ++t)
        for (int64_t m = 0; m < M; ++m) {
          scalar_t acc = 0;
          for (int64_t s = 0; s < ns; ++s) {
            const scalar_t* src = G.da_parts + (s * T + t) * H + m * S;
            for (int64_t i = 0; i < S; ++i) acc += src[i];
          }
          dao[t * M + m] = acc;
        }
    }
  });
  const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {or_empty(proj ? dx : du), or_empty(dwx), or_empty(db), dw, or_empty(da), dh0};
}

// backward(grad_states, states, candidates, h0, w_h, waves, skip, need_dwaves)
//   -> (du, dw_h, dwaves (T, M) or empty, dh0). skip must be the forward's.
// grad_states is (B, T, H), or (B, H) when the output was the last state only.
std::vector<at::Tensor> backward(const at::Tensor& g, const at::Tensor& hs, const at::Tensor& cs,
                                 const at::Tensor& h0, const at::Tensor& w, const at::Tensor& waves,
                                 bool skip, bool need_da) {
  auto r = backward_impl(g, hs, cs, at::Tensor(), at::Tensor(), h0, w, waves, skip, false, need_da);
  return {r[0], r[3], r[4], r[5]};
}

// backward_x(grad_states, states, candidates, x, w_x, h0, w_h, waves, skip, need_dx, need_dwaves)
//   -> (dx or empty, dw_x, db, dw_h, dwaves or empty, dh0): forward_x's gradients; dW_x and
// db are accumulated inside the loop, so no (B, T, H) gradient of u is ever built.
std::vector<at::Tensor> backward_x(const at::Tensor& g, const at::Tensor& hs, const at::Tensor& cs,
                                   const at::Tensor& x, const at::Tensor& w_x, const at::Tensor& h0,
                                   const at::Tensor& w, const at::Tensor& waves, bool skip,
                                   bool need_dx, bool need_da) {
  return backward_impl(g, hs, cs, x.contiguous(), w_x, h0, w, waves, skip, need_dx, need_da);
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
  m.def("forward_x", &forward_x, "leaky scan forward with the input projection fused");
  m.def("backward_x", &backward_x, "backward of forward_x, projection gradients included");
  m.def("pool_stats", &pool_stats, "(cached bytes, cached blocks, limit bytes)");
  m.def("set_pool_limit", &set_pool_limit, "max idle bytes the buffer pool keeps");
}
