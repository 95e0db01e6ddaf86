// The interface between the event-gate bindings (gated_scan.cpp, built once for the baseline ISA)
// and the gated register kernels (gated_kernels.cpp, built once per CPU capability, `default`
// included). Plain structs and raw pointers only, for the reason kernels.h gives.
#pragma once

#include <cstdint>

namespace hrnn_cpu {

// One call's tensors (hrnn/ops/reference.py has the equations). The forward reads the inputs and writes
// hs, cs, as, gs; the backward reads those and writes the gradients. Every pointer covers the
// whole batch; each kernel call works on batch rows [b0, b1) only.
template <typename T>
struct GatedProblem {
  int64_t B, T_, H, M;
  // inputs. The projections are fused: z_t = b + x_t W_x^T + h_{t-1} W_h^T is formed per open
  // (sample, module) block and the gate logits as g_b + x_t G_x^T + h_{t-1} G_h^T, so no
  // (B, T, H) u (or (B, T, M) gate input) exists.
  int64_t I = 0;
  const T* x = nullptr;       // (B, T, I)
  const T* wxT = nullptr;     // (I, H)     W_x^T
  const T* bias = nullptr;    // (H) or nullptr
  const T* gx = nullptr;      // (M, I)     G_x; nullptr: no event gate (e = 1)
  const T* gxT = nullptr;     // (I, M)     G_x^T (forward)
  const T* gb = nullptr;      // (M)        g_b
  const T* wt = nullptr;      // (H, H)     W_h^T (forward)
  const T* w = nullptr;       // (H, H)     W_h (backward)
  const T* gh = nullptr;      // (M, H)     G_h
  const T* ght = nullptr;     // (H, M)     G_h^T (forward)
  const T* waves = nullptr;   // (T, M) or (B, T, M); nullptr: w = 1
  int64_t waves_stride = 0;   // between batch rows of waves: 0 (shared) or T * M
  bool hard = false;          // hard gate: e = 1[g > threshold]; else soft, e = g
  const T* thr = nullptr;     // (B, T, M) thresholds of a hard gate, or nullptr: ...
  T thr_value = T(0);         // ... one threshold for every (b, t, m)
  bool truncated = false;     // with hard's thresholds: e = g where g > thr, else exactly 0, and the exact
                              // gradient (0 where shut): no candidate of a shut module is ever needed, ...
  T support = T(0);           // ... except within `support` below the threshold, where a shut module gets the
                              // open gate's gradient (a pseudo-derivative): its candidate is computed, a = 0
  const T* h0 = nullptr;      // (B, H)
  bool all_candidates = false;  // forward: also the candidates of closed (a = 0) modules
  // Block connectivity of W_h, read by the forward's candidates (the gate's G_h is dense): reads[i]
  // has bit j set when module i reads module j (block (i, j) of W_h holds a nonzero); nullptr: dense.
  const uint64_t* reads = nullptr;  // (M)
  T* last = nullptr;  // forward without hs (evaluation of a last-state readout): the last state (B, H)
  // forward outputs (backward inputs)
  T* hs = nullptr;  // (B, T, H) states, or nullptr with `last`
  T* cs = nullptr;  // (B, T, H) candidates, or nullptr (not kept)
  T* as = nullptr;  // (B, T, M) activations a = w e
  T* gs = nullptr;  // (B, T, M) gate values g (gated, and kept for a backward), or nullptr
  // backward
  const T* g = nullptr;       // (B, T, H) gradient of the states, or nullptr when ...
  const T* g_last = nullptr;  // ... the loss read the last state only: (B, H)
  const T* ga = nullptr;      // (B, T, M) gradient of the activations, or nullptr
  bool need_da = false;       // dL/da of closed modules too (every candidate was computed); a truncated
                              // gate reads dL/da of its open modules whatever this says
  T* dx = nullptr;            // (B, T, I), or nullptr (x needs no gradient)
  T* dwaves = nullptr;        // (B, T, M) per sample, or nullptr
  T* dh0 = nullptr;           // (B, H); also the running dL/dh_t ("carry")
  T* dw_parts = nullptr;      // (slices, H, H) per-slice partial dW_h
  T* dgh_parts = nullptr;     // (slices, M, H) per-slice partial dG_h (gated only)
  T* dwx_parts = nullptr;     // (slices, I + 1, H) per-slice partial dW_x^T, last row db
  T* dgx_parts = nullptr;     // (slices, I + 1, M) per-slice partial dG_x^T, last row dg_b (gated only)
};

// One capability's gated kernels; vl divides H / M and is at most one register.
struct GatedKernelTable {
  const char* name;
  int max_vl_float, max_vl_double;
  // The forward returns the number of candidate blocks (b, t, m) it computed.
  int64_t (*fwd_float)(const GatedProblem<float>&, int vl, int64_t b0, int64_t b1);
  int64_t (*fwd_double)(const GatedProblem<double>&, int vl, int64_t b0, int64_t b1);
  void (*bwd_float)(const GatedProblem<float>&, int vl, int64_t b0, int64_t b1, int64_t slice);
  void (*bwd_double)(const GatedProblem<double>&, int vl, int64_t b0, int64_t b1, int64_t slice);
};

const GatedKernelTable* gated_kernels_default();  // baseline ISA (SSE2 on x86-64): any CPU
const GatedKernelTable* gated_kernels_avx2();     // AVX2 + FMA
const GatedKernelTable* gated_kernels_avx512();   // AVX-512 F/BW/VL/DQ + FMA

}  // namespace hrnn_cpu
