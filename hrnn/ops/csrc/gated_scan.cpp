// The event-gate core's bindings (gated_kernels.cpp; the contract is hrnn/ops/reference.py's
// gated_leaky_rnn_reference): argument checks, the kernels of the capability that runs (capability.h:
// the same one as the clock core's), one slice of batch rows per thread, and the reduction of the
// per-slice partial gradients. Built once, for the baseline ISA; bind_gated adds the entry points to the
// extension module (module.cpp).
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "bindings.h"
#include "capability.h"
#include "gated_kernels.h"
#include "scan_common.h"

namespace hrnn_cpu {
namespace {

std::atomic<int64_t> last_blocks{-1};  // candidate blocks (b, t, m) the last forward computed

// The table's kernel for this dtype.
int64_t run_fwd(const GatedKernelTable* k, const GatedProblem<float>& P, int vl, int64_t b0, int64_t b1) {
  return k->fwd_float(P, vl, b0, b1);
}
int64_t run_fwd(const GatedKernelTable* k, const GatedProblem<double>& P, int vl, int64_t b0, int64_t b1) {
  return k->fwd_double(P, vl, b0, b1);
}
void run_bwd(const GatedKernelTable* k, const GatedProblem<float>& P, int vl, int64_t b0, int64_t b1, int64_t i) {
  k->bwd_float(P, vl, b0, b1, i);
}
void run_bwd(const GatedKernelTable* k, const GatedProblem<double>& P, int vl, int64_t b0, int64_t b1, int64_t i) {
  k->bwd_double(P, vl, b0, b1, i);
}

// Vectors dividing the module width (tiles never straddle modules), at most one register.
template <typename T>
int module_vl(const GatedKernelTable* k, int64_t units) {
  return pick_vl(units, units, max_vl<T>(k));
}

// One clear line per bad argument, naming what was given and what is allowed.
void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "hrnn gated: ", name, " is on ", t.device(), "; CPU tensors only");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "hrnn gated: ", name, " is ", t.scalar_type(),
              " but x is ", like.scalar_type(), "; give every tensor one dtype");
  TORCH_CHECK(t.sizes() == shape, "hrnn gated: ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.is_contiguous(), "hrnn gated: ", name, " is not contiguous");
}

const at::Tensor* opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

template <typename T>
const T* ptr(const at::Tensor* t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// The op's inputs, as both entry points take them (hrnn/ops/reference.py: gated_leaky_rnn_reference's arguments).
struct Inputs {
  const at::Tensor& x;
  const at::Tensor& w_x;
  const at::Tensor* bias;
  const at::Tensor* gate_x;
  const at::Tensor* gate_bias;
  const at::Tensor& w_h;
  const at::Tensor* gate_h;
  const at::Tensor* waves;
  const at::Tensor& h0;
  const at::Tensor* thr;  // (B, T, M), or one value (0-dim), for a hard or truncated gate; nullptr: soft
  bool truncated;         // with thr: e = g where g > thr, else 0 (the exact gradient)
  double support;         // truncated: shut entries with g > thr - support get the open gate's gradient
};

struct Shapes {
  int64_t B, T, I, H, M;
};

// Checks every input; returns the sizes.
Shapes check_inputs(const Inputs& in) {
  const at::Tensor& x = in.x;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "hrnn gated: x is ", x.scalar_type(), "; float32 or float64 only");
  TORCH_CHECK(x.dim() == 3, "hrnn gated: x has shape ", x.sizes(), ", expected (B, T, I)");
  TORCH_CHECK(in.w_h.dim() == 2, "hrnn gated: w_h has shape ", in.w_h.sizes(), ", expected (H, H)");
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), H = in.w_h.size(0);
  TORCH_CHECK(in.gate_x || in.waves, "hrnn gated: give waves, an event gate, or both");
  TORCH_CHECK(!in.gate_x == !in.gate_h && !in.gate_x == !in.gate_bias,
              "hrnn gated: gate_x, gate_bias and gate_h come together");
  const int64_t M = in.gate_x ? (in.gate_x->dim() == 2 ? in.gate_x->size(0) : 0)
                              : (in.waves->dim() ? in.waves->size(-1) : 0);
  TORCH_CHECK(M > 0 && H % M == 0, "hrnn gated: ", M, " modules do not divide H = ", H);
  TORCH_CHECK(T * H < (int64_t(1) << 31) && B * T < (int64_t(1) << 31), "hrnn gated: T * H or B * T too large");
  check_tensor(x, "x", {B, T, I}, x);
  check_tensor(in.w_x, "w_x", {H, I}, x);
  if (in.bias) check_tensor(*in.bias, "bias", {H}, x);
  check_tensor(in.w_h, "w_h", {H, H}, x);
  check_tensor(in.h0, "h0", {B, H}, x);
  if (in.gate_x) {
    check_tensor(*in.gate_x, "gate_x", {M, I}, x);
    check_tensor(*in.gate_bias, "gate_bias", {M}, x);
    check_tensor(*in.gate_h, "gate_h", {M, H}, x);
  }
  if (in.waves) {
    if (in.waves->dim() == 2) check_tensor(*in.waves, "waves", {T, M}, x);
    else check_tensor(*in.waves, "waves", {B, T, M}, x);
  }
  TORCH_CHECK(!in.truncated || in.thr, "hrnn gated: a truncated gate needs its thresholds");
  TORCH_CHECK(in.support == 0 || (in.truncated && in.support > 0 && in.support <= 1),
              "hrnn gated: support=", in.support, "; allowed: 0, or in (0, 1] with a truncated gate");
  if (in.thr) {
    TORCH_CHECK(in.gate_x, "hrnn gated: thresholds without an event gate");
    if (in.thr->dim() == 0) check_tensor(*in.thr, "thresholds", {}, x);
    else check_tensor(*in.thr, "thresholds", {B, T, M}, x);
  }
  return {B, T, I, H, M};
}

// The problem's inputs; wxT and gxT (W_x^T, G_x^T) are the caller's, alive for the call.
template <typename T>
GatedProblem<T> problem(const Shapes& s, const Inputs& in, const at::Tensor& wxT, const at::Tensor& gxT) {
  GatedProblem<T> P;
  P.B = s.B;
  P.T_ = s.T;
  P.H = s.H;
  P.M = s.M;
  P.I = s.I;
  P.x = in.x.data_ptr<T>();
  P.wxT = wxT.data_ptr<T>();
  P.bias = ptr<T>(in.bias);
  P.gx = ptr<T>(in.gate_x);
  P.gxT = gxT.defined() ? gxT.data_ptr<T>() : nullptr;
  P.gb = ptr<T>(in.gate_bias);
  P.gh = ptr<T>(in.gate_h);
  P.waves = ptr<T>(in.waves);
  P.waves_stride = in.waves && in.waves->dim() == 3 ? s.T * s.M : 0;
  P.hard = in.thr != nullptr;
  P.truncated = in.truncated;
  P.support = T(in.support);
  P.thr = in.thr && in.thr->dim() ? in.thr->data_ptr<T>() : nullptr;
  P.thr_value = in.thr && !in.thr->dim() ? in.thr->item<T>() : T(0);
  P.h0 = in.h0.data_ptr<T>();
  return P;
}

at::Tensor transposed(const at::Tensor* t) { return t ? t->t().contiguous() : at::Tensor(); }

// gated_forward(x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0, thresholds, truncated, support,
//               all_candidates, save, last_only)
//   -> (states, candidates or empty, activations, gates (with save) or empty).
// bias: (H) or None; gate_x (M, I), gate_bias (M), gate_h (M, H): the event gate, or all None;
// waves: (T, M), (B, T, M) or None; thresholds: (B, T, M) or one value (0-dim) for a hard or
// truncated gate, None for a soft one; truncated (with thresholds): e = g where g > threshold, else 0;
// support (truncated, with save): the shut entries with g > threshold - support get their candidates too,
// which the backward's pseudo-derivative reads.
// all_candidates: also compute the candidates of closed modules (a gradient needs them); save: keep the candidates for the backward; last_only (not with save): the states
// are the last one, (B, H), and no (B, T, H) tensor is written.
std::vector<at::Tensor> gated_forward(const at::Tensor& x, const at::Tensor& w_x, const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& gate_x,
                                      const c10::optional<at::Tensor>& gate_bias, const at::Tensor& w_h,
                                      const c10::optional<at::Tensor>& gate_h,
                                      const c10::optional<at::Tensor>& waves, const at::Tensor& h0,
                                      const c10::optional<at::Tensor>& thresholds, bool truncated, double support,
                                      bool all_candidates, bool save, bool last_only) {
  const Inputs in{x, w_x, opt(bias), opt(gate_x), opt(gate_bias), w_h, opt(gate_h), opt(waves), h0, opt(thresholds),
                  truncated, save ? support : 0.0};
  const Shapes s = check_inputs(in);
  TORCH_CHECK(!(save && last_only), "hrnn gated: last_only is a forward-only mode (save=False)");
  at::NoGradGuard no_grad;
  const auto opts = x.options();
  const bool gated = gate_x.has_value();
  at::Tensor hs = last_only ? at::empty({s.B, s.H}, opts) : pooled_empty({s.B, s.T, s.H}, opts);
  at::Tensor cs = save ? pooled_empty({s.B, s.T, s.H}, opts) : at::empty({0}, opts);
  // Pooled too: fresh pages for these (B, T, M) outputs were 5% of the forward at f = 0.
  at::Tensor as = pooled_empty({s.B, s.T, s.M}, opts);
  at::Tensor gs = gated && save ? pooled_empty({s.B, s.T, s.M}, opts) : at::empty({0}, opts);
  at::Tensor wt = w_h.t().contiguous(), wxT = w_x.t().contiguous();
  at::Tensor ght = transposed(in.gate_h), gxT = transposed(in.gate_x);
  int64_t blocks = 0;
  std::vector<uint64_t> reads;
  const bool zero_blocks = block_reads(w_h, s.M, 1.0, reads);  // a gain at every density measured
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hrnn_gated_fwd", [&] {
    GatedProblem<scalar_t> P = problem<scalar_t>(s, in, wxT, gxT);
    P.wt = wt.data_ptr<scalar_t>();
    P.ght = gated ? ght.data_ptr<scalar_t>() : nullptr;
    P.all_candidates = all_candidates;
    if (zero_blocks) P.reads = reads.data();
    P.hs = last_only ? nullptr : hs.data_ptr<scalar_t>();
    P.last = last_only ? hs.data_ptr<scalar_t>() : nullptr;
    P.cs = save ? cs.data_ptr<scalar_t>() : nullptr;
    P.as = as.data_ptr<scalar_t>();
    P.gs = gated && save ? gs.data_ptr<scalar_t>() : nullptr;
    const GatedKernelTable* k = active_kernels().gated;
    const int vl = module_vl<scalar_t>(k, s.H / s.M);
    const int64_t ns = n_slices(s.B);
    std::vector<int64_t> counts(ns, 0);
    at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t i = s0; i < s1; ++i) {
        const int64_t b0 = s.B * i / ns, b1 = s.B * (i + 1) / ns;
        counts[i] = run_fwd(k, P, vl, b0, b1);
      }
    });
    for (int64_t c : counts) blocks += c;
  });
  last_blocks = blocks;
  return {hs, cs, as, gs};
}

// gated_backward(grad_states, grad_activations, states, candidates, activations, gates, x, w_x, bias,
//                gate_x, gate_bias, w_h, gate_h, waves, h0, thresholds, truncated, support, need_dx, need_da,
//                need_dwaves)
//   -> (dx or empty, dw_x, db, dgate_x or empty, dgate_bias or empty, dw_h, dgate_h or empty,
//       dwaves (waves' shape) or empty, dh0).
// The inputs are the forward's. grad_states is (B, T, H), or (B, H) when the output was the last
// state only; grad_activations (B, T, M) or None. need_da must be true when the forward ran with
// all_candidates (it computes dL/da of closed modules from their candidates), and is required by
// a hard or soft gate or need_dwaves (a truncated gate reads dL/da of its open modules only, and of those
// within `support`, whose candidates a forward with the same support computed). dW_x,
// db, dG_x and dg_b are accumulated in the loop: no (B, T, H) du.
std::vector<at::Tensor> gated_backward(const at::Tensor& grad_states, const c10::optional<at::Tensor>& grad_acts,
                                       const at::Tensor& hs, const at::Tensor& cs, const at::Tensor& as,
                                       const at::Tensor& gs, const at::Tensor& x, const at::Tensor& w_x,
                                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& gate_x,
                                       const c10::optional<at::Tensor>& gate_bias, const at::Tensor& w_h,
                                       const c10::optional<at::Tensor>& gate_h,
                                       const c10::optional<at::Tensor>& waves, const at::Tensor& h0,
                                       const c10::optional<at::Tensor>& thresholds, bool truncated, double support,
                                       bool need_dx, bool need_da, bool need_dwaves) {
  const Inputs in{x, w_x, opt(bias), opt(gate_x), opt(gate_bias), w_h, opt(gate_h), opt(waves), h0, opt(thresholds),
                  truncated, support};
  const Shapes s = check_inputs(in);
  const bool gated = gate_x.has_value();
  TORCH_CHECK(need_da || !((gated && !truncated) || need_dwaves),
              "hrnn gated: a soft or hard event gate or a waves gradient needs need_da (and a forward with "
              "all_candidates)");
  TORCH_CHECK(!need_dwaves || waves.has_value(), "hrnn gated: need_dwaves without waves");
  at::Tensor g = grad_states.contiguous();
  const bool last_only = g.dim() == 2;
  check_tensor(g, "grad_states", last_only ? at::IntArrayRef{s.B, s.H} : at::IntArrayRef{s.B, s.T, s.H}, x);
  check_tensor(hs, "states", {s.B, s.T, s.H}, x);
  check_tensor(cs, "candidates", {s.B, s.T, s.H}, x);
  check_tensor(as, "activations", {s.B, s.T, s.M}, x);
  if (gated) check_tensor(gs, "gates", {s.B, s.T, s.M}, x);
  at::Tensor ga = grad_acts.has_value() ? grad_acts->contiguous() : at::Tensor();
  if (ga.defined()) check_tensor(ga, "grad_activations", {s.B, s.T, s.M}, x);
  at::NoGradGuard no_grad;
  const auto opts = x.options();
  const int64_t ns = n_slices(s.B), H = s.H, M = s.M, I = s.I;
  at::Tensor dx = need_dx ? at::empty({s.B, s.T, I}, opts) : at::empty({0}, opts);
  at::Tensor dwaves = need_dwaves ? at::empty({s.B, s.T, M}, opts) : at::empty({0}, opts);
  at::Tensor dh0 = at::empty({s.B, H}, opts);
  at::Tensor dw_parts = at::empty({ns, H, H}, opts);
  at::Tensor dwx_parts = at::empty({ns, I + 1, H}, opts);
  at::Tensor dgh_parts = gated ? at::empty({ns, M, H}, opts) : at::empty({0}, opts);
  at::Tensor dgx_parts = gated ? at::empty({ns, I + 1, M}, opts) : at::empty({0}, opts);
  at::Tensor wxT = w_x.t().contiguous(), gxT = transposed(in.gate_x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hrnn_gated_bwd", [&] {
    GatedProblem<scalar_t> P = problem<scalar_t>(s, in, wxT, gxT);
    P.w = w_h.data_ptr<scalar_t>();
    P.hs = hs.data_ptr<scalar_t>();
    P.cs = cs.data_ptr<scalar_t>();
    P.as = as.data_ptr<scalar_t>();
    P.gs = gated ? gs.data_ptr<scalar_t>() : nullptr;
    P.g = last_only ? nullptr : g.data_ptr<scalar_t>();
    P.g_last = last_only ? g.data_ptr<scalar_t>() : nullptr;
    P.ga = ga.defined() ? ga.data_ptr<scalar_t>() : nullptr;
    P.need_da = need_da;
    P.dx = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    P.dwaves = need_dwaves ? dwaves.data_ptr<scalar_t>() : nullptr;
    P.dh0 = dh0.data_ptr<scalar_t>();
    P.dw_parts = dw_parts.data_ptr<scalar_t>();
    P.dwx_parts = dwx_parts.data_ptr<scalar_t>();
    P.dgh_parts = gated ? dgh_parts.data_ptr<scalar_t>() : nullptr;
    P.dgx_parts = gated ? dgx_parts.data_ptr<scalar_t>() : nullptr;
    const GatedKernelTable* k = active_kernels().gated;
    const int vl = module_vl<scalar_t>(k, H / M);
    at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t i = s0; i < s1; ++i) {
        const int64_t b0 = s.B * i / ns, b1 = s.B * (i + 1) / ns;
        // First touch of the partials by the owning thread.
        std::memset(P.dw_parts + i * H * H, 0, sizeof(scalar_t) * H * H);
        std::memset(P.dwx_parts + i * (I + 1) * H, 0, sizeof(scalar_t) * (I + 1) * H);
        if (gated) {
          std::memset(P.dgh_parts + i * M * H, 0, sizeof(scalar_t) * M * H);
          std::memset(P.dgx_parts + i * (I + 1) * M, 0, sizeof(scalar_t) * (I + 1) * M);
        }
        run_bwd(k, P, vl, b0, b1, i);
      }
    });
  });
  // The partials hold W_x^T, then b (and G_x^T, then g_b): transposed back to the parameters' shapes.
  at::Tensor dwx_b = dwx_parts.sum(0);
  at::Tensor dgx_b = gated ? dgx_parts.sum(0) : dgx_parts;
  at::Tensor empty = at::empty({0}, opts);
  at::Tensor dgh = gated ? dgh_parts.sum(0) : empty;
  // Shared (T, M) waves: the per-sample gradients add up over the batch.
  if (need_dwaves && waves->dim() == 2) dwaves = dwaves.sum(0);
  return {dx,
          dwx_b.narrow(0, 0, I).t().contiguous(),
          dwx_b[I],
          gated ? dgx_b.narrow(0, 0, I).t().contiguous() : empty,
          gated ? dgx_b[I] : empty,
          dw_parts.sum(0),
          dgh,
          dwaves,
          dh0};
}

int64_t gated_candidate_blocks() { return last_blocks.load(); }

}  // namespace

void bind_gated(pybind11::module_& m) {
  m.def("gated_forward", &gated_forward, "event-gated leaky recurrence, forward");
  m.def("gated_backward", &gated_backward, "event-gated leaky recurrence, backward through time");
  m.def("gated_candidate_blocks", &gated_candidate_blocks,
        "candidate blocks (sample, step, module) the last gated_forward computed (-1 before any)");
}

}  // namespace hrnn_cpu
