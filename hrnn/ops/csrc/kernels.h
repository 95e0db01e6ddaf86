// The interface between the bindings (leaky_scan.cpp, built once for the baseline ISA) and the
// register kernels (kernels.cpp, built once per CPU capability with that capability's flags).
//
// Plain structs and raw pointers only: a kernel object must not instantiate any standard-library
// template that the bindings also use, or the linker may keep the AVX-512 copy of that shared
// (weak) symbol for everyone, and a CPU without AVX-512 would die on it.
#pragma once

#include <cstdint>

namespace hrnn_cpu {

// The problem as the kernels see it: activations repeated over units and, per step, the tiles
// (runs of `vl` consecutive units) to compute and the tiles whose state is only copied.
template <typename T>
struct Problem {
  int64_t B, T_, H;
  const T* a;                   // (T, H)
  const int32_t* act_cols;      // per step: element offsets of computed tiles
  const int32_t* act_start;     // (T + 1) offsets into act_cols
  const int32_t* idle_cols;     // per step: offsets of skipped tiles
  const int32_t* idle_start;
  const int32_t* all_cols;      // 0, vl, 2 vl, ... < H
  int n_all;                    // H / vl
  // Block connectivity of W_h, read by the forward only: reads[i] has bit j set when module i
  // (units [i S, (i + 1) S), S a multiple of vl) reads module j, i.e. block (i, j) holds a nonzero;
  // the products skip the others. nullptr: W_h has no zero block (or more than 64 modules).
  const uint64_t* reads = nullptr;  // (M)
  int64_t S = 0;                    // units per module, with reads
};

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

// Per-slice scratch for the backward, owned by the caller (nrows * H each): dz of one step
// (x-mode only) and a copy of one step's h_{t-1}.
template <typename T>
struct Scratch {
  T* dz;
  T* h;
};

// One capability's kernels. Each call runs the whole time loop for batch rows [b0, b1) with
// vectors of `vl` elements (vl divides H, vl <= max_vl_*).
struct KernelTable {
  const char* name;
  int max_vl_float, max_vl_double;  // elements per vector register
  // The forward writes every state to hs (B, T, H), or, with hs nullptr, only the last one to
  // last (B, H): the states then live in two (b1 - b0, H) buffers of the slice (evaluation of a
  // last-state readout writes no (B, T, H) tensor).
  void (*fwd_float)(const Problem<float>&, int vl, int64_t b0, int64_t b1, const Input<float>&,
                    const float* wt, const float* h0, float* hs, float* cs, float* last);
  void (*fwd_double)(const Problem<double>&, int vl, int64_t b0, int64_t b1, const Input<double>&,
                     const double* wt, const double* h0, double* hs, double* cs, double* last);
  void (*bwd_float)(const Problem<float>&, int vl, int64_t b0, int64_t b1, int64_t slice,
                    const Grads<float>&, const Scratch<float>&);
  void (*bwd_double)(const Problem<double>&, int vl, int64_t b0, int64_t b1, int64_t slice,
                     const Grads<double>&, const Scratch<double>&);
};

// The portable capability, `default` (portable_kernels.cpp, built with the bindings for the
// baseline ISA): its products go through the BLAS torch ships.
const KernelTable* kernels_default();
// Register kernels, built on x86-64 (kernels.cpp).
const KernelTable* kernels_avx2();    // AVX2 + FMA
const KernelTable* kernels_avx512();  // AVX-512 F/BW/VL/DQ + FMA

}  // namespace hrnn_cpu
