// The clock core's bindings (see hrnn/ops/reference.py for the recurrence):
//
//     z_t = u_t + h_{t-1} W^T,   c_t = tanh(z_t),   h_t = lerp(h_{t-1}, c_t, a_t)
//
// This file is built once, for the baseline ISA; the kernels (kernels.cpp, portable_kernels.cpp)
// are those of the capability that runs (capability.h). Here: argument checks, the tile lists, the
// split of the batch into one slice per thread (one parallel region per call), and the reduction
// of the per-slice partial gradients. The big (B, T, H) buffers come from the shared pool
// (scan_common.h). bind_leaky adds the entry points to the extension module (module.cpp).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bindings.h"
#include "capability.h"
#include "kernels.h"
#include "scan_common.h"

namespace hrnn_cpu {
namespace {

template <typename T>
struct ProblemData {
  Problem<T> view;
  std::vector<T> a;
  std::vector<int32_t> act_cols, act_start, idle_cols, idle_start, all_cols;
  std::vector<uint64_t> reads;  // W_h's nonzero blocks (forward only; block_reads)
};

template <typename T>
void fwd_call(const Problem<T>& P, int vl, int64_t b0, int64_t b1, const Input<T>& src,
              const T* wt, const T* h0, T* hs, T* cs, T* last) {
  const KernelTable* k = active_kernels().clock;
  if constexpr (std::is_same<T, float>::value) k->fwd_float(P, vl, b0, b1, src, wt, h0, hs, cs, last);
  else k->fwd_double(P, vl, b0, b1, src, wt, h0, hs, cs, last);
}

template <typename T>
void bwd_call(const Problem<T>& P, int vl, int64_t b0, int64_t b1, int64_t slice,
              const Grads<T>& G, const Scratch<T>& S) {
  const KernelTable* k = active_kernels().clock;
  if constexpr (std::is_same<T, float>::value) k->bwd_float(P, vl, b0, b1, slice, G, S);
  else k->bwd_double(P, vl, b0, b1, slice, G, S);
}

template <typename T>
void run_fwd(const Problem<T>& P, int vl, const Input<T>& src, const T* wt, const T* h0,
             T* hs, T* cs, T* last) {
  const int64_t ns = n_slices(P.B);
  at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      fwd_call<T>(P, vl, P.B * s / ns, P.B * (s + 1) / ns, src, wt, h0, hs, cs, last);
  });
}

template <typename T>
void run_bwd(const Problem<T>& P, int vl, const Grads<T>& G) {
  const int64_t ns = n_slices(P.B), H = P.H, I = G.src.I;
  at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t b0 = P.B * s / ns, b1 = P.B * (s + 1) / ns, nrows = b1 - b0;
      // First touch of the partials by the owning thread.
      std::memset(G.dw_parts + s * H * H, 0, sizeof(T) * H * H);
      if (G.dwx_parts) std::memset(G.dwx_parts + s * (I + 1) * H, 0, sizeof(T) * (I + 1) * H);
      if (G.da_parts) std::memset(G.da_parts + s * P.T_ * H, 0, sizeof(T) * P.T_ * H);
      std::vector<T> dz(G.src.x ? nrows * H : 0), h(nrows * H);
      bwd_call<T>(P, vl, b0, b1, s, G, Scratch<T>{dz.data(), h.data()});
    }
  });
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
void make_problem(ProblemData<T>& D, int64_t B, int64_t TT, int64_t H, const at::Tensor& waves,
                  int vl, bool skip) {
  const int64_t M = waves.size(1), S = H / M, n_tiles = H / vl;
  const T* wv = waves.data_ptr<T>();
  D.a.resize(TT * H);
  for (int64_t t = 0; t < TT; ++t)
    for (int64_t m = 0; m < M; ++m) std::fill_n(D.a.data() + t * H + m * S, S, wv[t * M + m]);
  // Per step, the tiles that hold an active unit (all of them without skipping) and the rest.
  D.act_start.assign(1, 0);
  D.idle_start.assign(1, 0);
  D.act_cols.reserve(TT * n_tiles);
  for (int64_t t = 0; t < TT; ++t) {
    const T* at = D.a.data() + t * H;
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      bool active = !skip;
      for (int i = 0; i < vl && !active; ++i) active = at[tile * vl + i] != T(0);
      (active ? D.act_cols : D.idle_cols).push_back(int32_t(tile * vl));
    }
    D.act_start.push_back(int32_t(D.act_cols.size()));
    D.idle_start.push_back(int32_t(D.idle_cols.size()));
  }
  for (int64_t k = 0; k < H; k += vl) D.all_cols.push_back(int32_t(k));
  D.view = {B, TT, H, D.a.data(), D.act_cols.data(), D.act_start.data(), D.idle_cols.data(),
            D.idle_start.data(), D.all_cols.data(), int(n_tiles)};
}

// Shared by both entry points: `in` is u (B, T, H), or x (B, T, I) when w_x is defined.
std::vector<at::Tensor> forward_impl(const at::Tensor& in, const at::Tensor& w_x,
                                     const at::Tensor& bias, const at::Tensor& w,
                                     const at::Tensor& waves, const at::Tensor& h0, bool skip,
                                     bool save, bool last_only) {
  check_inputs(in, w, waves, h0);
  TORCH_CHECK(!(save && last_only), "hrnn fused: last_only is a forward-only mode (save=False)");
  const bool proj = w_x.defined();
  if (proj) check_projection(in, w_x, bias, w.size(0));
  else TORCH_CHECK(in.size(2) == w.size(0), "u must be (B, T, H)");
  at::NoGradGuard no_grad;
  const int64_t B = in.size(0), T = in.size(1), H = w.size(0), S = H / waves.size(1);
  // last_only: the (B, H) last state, and no (B, T, H) write (the kernels keep the others in cache).
  at::Tensor hs = last_only ? at::empty({B, H}, in.options()) : pooled_empty({B, T, H}, in.options());
  at::Tensor cs = save ? pooled_empty({B, T, H}, in.options()) : at::Tensor();
  at::Tensor wt = w.t().contiguous();
  at::Tensor wxT = proj ? w_x.t().contiguous() : at::Tensor();
  at::Tensor b = proj && bias.defined() ? bias.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "hrnn_leaky_fwd", [&] {
    ProblemData<scalar_t> D;
    // Zero blocks of W_h: tiles must not straddle modules, as for skipping.
    // Measured break-even near 2/3 of the blocks (AVX-512: 0.82 of dense at 1/2, 1.10 at 3/4).
    // Not in a training forward that also skips idle tiles (hard clocks): the Clockwork RNN's
    // step ran 2.4x slower with both than with the idle tiles skipped alone.
    const bool blocks = !(save && skip) && block_reads(w, waves.size(1), 0.625, D.reads);
    const int vl = pick_vl(H, skip || blocks ? S : H, max_vl<scalar_t>(active_kernels().clock));
    make_problem<scalar_t>(D, B, T, H, waves, vl, skip);
    if (blocks) {
      D.view.reads = D.reads.data();
      D.view.S = S;
    }
    Input<scalar_t> src;
    if (proj) {
      src.x = in.data_ptr<scalar_t>();
      src.wxT = wxT.data_ptr<scalar_t>();
      src.bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      src.I = in.size(2);
    } else {
      src.u = in.data_ptr<scalar_t>();
    }
    scalar_t* out = hs.data_ptr<scalar_t>();
    run_fwd<scalar_t>(D.view, vl, src, wt.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                      last_only ? nullptr : out, save ? cs.data_ptr<scalar_t>() : nullptr,
                      last_only ? out : nullptr);
  });
  return {hs, save ? cs : at::empty({0}, in.options())};
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
  const int64_t ns = n_slices(B);
  const auto opts = hs.options();
  at::Tensor du = proj ? at::Tensor() : pooled_empty({B, T, H}, opts);
  at::Tensor dx = proj && need_dx ? at::empty({B, T, I}, opts) : at::Tensor();
  at::Tensor dh0 = at::empty({B, H}, opts);
  at::Tensor dw = at::empty({H, H}, opts);
  at::Tensor dwx = proj ? at::empty({H, I}, opts) : at::Tensor();
  at::Tensor db = proj ? at::empty({H}, opts) : at::Tensor();
  at::Tensor da = need_da ? at::empty({T, M}, opts) : at::Tensor();
  at::Tensor dw_parts = pooled_empty({ns, H, H}, opts);
  at::Tensor dwx_parts = proj ? pooled_empty({ns, I + 1, H}, opts) : at::Tensor();
  at::Tensor da_parts = need_da ? pooled_empty({ns, T, H}, opts) : at::Tensor();
  at::Tensor wxT = proj ? w_x.t().contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "hrnn_leaky_bwd", [&] {
    const int vl = pick_vl(H, skip ? S : H, max_vl<scalar_t>(active_kernels().clock));
    ProblemData<scalar_t> D;
    make_problem<scalar_t>(D, B, T, H, waves, vl, skip);
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
    run_bwd<scalar_t>(D.view, vl, G);
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

// forward(u, w_h, waves, h0, skip, save, last_only) -> (states, candidates or empty);
// save: keep the candidates (for the backward); last_only (with save False): the states are the
// last one only, (B, H).
std::vector<at::Tensor> forward(const at::Tensor& u, const at::Tensor& w, const at::Tensor& waves,
                                const at::Tensor& h0, bool skip, bool save, bool last_only) {
  return forward_impl(u, at::Tensor(), at::Tensor(), w, waves, h0, skip, save, last_only);
}

// forward_x(x, w_x, bias or None, w_h, waves, h0, skip, save, last_only) -> (states, candidates
// or empty): the same recurrence with u = x W_x^T + bias computed inside the loop.
std::vector<at::Tensor> forward_x(const at::Tensor& x, const at::Tensor& w_x,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& w,
                                  const at::Tensor& waves, const at::Tensor& h0, bool skip, bool save,
                                  bool last_only) {
  return forward_impl(x, w_x, bias.has_value() ? *bias : at::Tensor(), w, waves, h0, skip, save, last_only);
}

// backward(grad_states, states, candidates, h0, w_h, waves, skip, need_dwaves)
//   -> (du, dw_h, dwaves (T, M) or empty, dh0).
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

}  // namespace

void bind_leaky(pybind11::module_& m) {
  m.def("forward", &forward, "leaky scan forward");
  m.def("backward", &backward, "leaky scan backward through time");
  m.def("forward_x", &forward_x, "leaky scan forward with the input projection fused");
  m.def("backward_x", &backward_x, "backward of forward_x, projection gradients included");
}

}  // namespace hrnn_cpu
