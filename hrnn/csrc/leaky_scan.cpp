// Bindings of the fused CPU kernels for the leaky modular recurrence (see hrnn/core.py):
//
//     z_t = u_t + h_{t-1} W^T,   c_t = tanh(z_t),   h_t = lerp(h_{t-1}, c_t, a_t)
//
// This file is built once, for the baseline ISA; the kernels (kernels.cpp) are built once per
// CPU capability and one build is chosen at run time (ATen's CPU_CAPABILITY scheme): the best
// one this CPU executes, or a lower one named by set_capability (HRNN_CPU_CAPABILITY, read in
// hrnn/fused.py). Here: argument checks, the buffer pool, the tile lists, the split of the batch
// into one slice per thread (one parallel region per call), and the reduction of the per-slice
// partial gradients. The big (B, T, H) buffers come from a small pool of reused blocks, so their
// pages are touched once per process rather than once per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <string>
#include <vector>

#include "kernels.h"
#include "gated_kernels.h"

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

using hrnn_cpu::Grads;
using hrnn_cpu::Input;
using hrnn_cpu::KernelTable;
using hrnn_cpu::Scratch;

// ---------------------------------------------------------------- the portable capability
// `default`, for any CPU: the time loop, tanh and lerp here (compiled for the baseline ISA), the
// per-step products through ATen's matmul, i.e. the BLAS torch ships, which picks its own ISA at
// run time. Register kernels compiled for SSE2 measured 1.5x slower than the PyTorch loop on an
// AVX2/AVX-512 machine (docs/performance.md): the loop's products are the BLAS's, at full width.
// The state hold at a = 0 is exact either way, so this path computes every unit (no skipping of
// idle modules, nor of W_h's zero blocks: the BLAS product is dense).
namespace portable {

constexpr int64_t kLoopInputs = 16;  // up to this many inputs, the projection is a loop, not a call

// Row-major (rows x cols) view of rows `stride` elements apart; no ownership.
template <typename T>
at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t stride) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {stride, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out (+)= a @ b, through ATen (beta 0: overwrite, 1: accumulate).
template <typename T>
void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool accumulate) {
  if (a.size(1) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  if (accumulate) at::addmm_out(out, out, a, b);
  else at::mm_out(out, a, b);
}

#include "tanh_rational.h"  // inside this namespace: see the file

// tanh as in the register kernels (libm in double), in a loop the compiler vectorizes.
inline void tanh_inplace(float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = tanh_rational(z[i]);
}
inline void tanh_inplace(double* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = std::tanh(z[i]);
}

// torch.lerp's formula: exact hold at a = 0, exact candidate at a = 1.
template <typename T>
inline T lerp(T start, T end, T w) {
  const T diff = end - start;
  return (w < T(0) ? -w : w) < T(0.5) ? start + w * diff : end - diff * (T(1) - w);
}

template <typename T>
void fwd(const hrnn_cpu::Problem<T>& P, int, int64_t b0, int64_t b1, const Input<T>& src,
         const T* wt, const T* h0, T* hs, T* cs, T* last) {
  const int64_t H = P.H, TT = P.T_, n = b1 - b0, I = src.I;
  std::vector<T> z_buf(n * H), run(hs ? 0 : 2 * n * H);
  // Row r of h_t (t = -1: h0) and the stride between rows: in hs, or (hs nullptr) in one of
  // two slice buffers, the last step in `last`.
  auto state = [&](int64_t t, int64_t& stride) -> T* {
    stride = H;
    if (t < 0) return const_cast<T*>(h0) + b0 * H;
    if (!hs) return t == TT - 1 ? last + b0 * H : run.data() + (t & 1) * n * H;
    stride = TT * H;
    return hs + (b0 * TT + t) * H;
  };
  at::Tensor z = view(z_buf.data(), n, H, H), w_t = view(wt, H, H, H);
  at::Tensor wx_t = src.x ? view(src.wxT, I, H, H) : at::Tensor();
  for (int64_t t = 0; t < TT; ++t) {
    int64_t hp_stride, ho_stride;
    const T* hp = state(t - 1, hp_stride);
    T* ho = state(t, ho_stride);
    if (src.x && I > kLoopInputs) {  // z = b + x_t W_x^T
      matmul<T>(view(src.x + (b0 * TT + t) * I, n, I, TT * I), wx_t, z, false);
      if (src.bias)
        for (int64_t r = 0; r < n; ++r)
          for (int64_t j = 0; j < H; ++j) z_buf[r * H + j] += src.bias[j];
    } else if (src.x) {  // a few inputs: one pass, no product call
      for (int64_t r = 0; r < n; ++r) {
        T* zr = &z_buf[r * H];
        const T* xr = src.x + ((b0 + r) * TT + t) * I;
        if (src.bias) std::copy_n(src.bias, H, zr);
        else std::fill_n(zr, H, T(0));
        for (int64_t i = 0; i < I; ++i)
          for (int64_t j = 0; j < H; ++j) zr[j] += xr[i] * src.wxT[i * H + j];
      }
    } else {
      for (int64_t r = 0; r < n; ++r) std::copy_n(src.u + ((b0 + r) * TT + t) * H, H, &z_buf[r * H]);
    }
    matmul<T>(view(hp, n, H, hp_stride), w_t, z, true);  // z += h_{t-1} W^T
    tanh_inplace(z_buf.data(), n * H);
    const T* at = P.a + t * H;
    for (int64_t r = 0; r < n; ++r) {
      const T* c = &z_buf[r * H];
      const T* h = hp + r * hp_stride;
      T* o = ho + r * ho_stride;
      if (cs) std::copy_n(c, H, cs + ((b0 + r) * TT + t) * H);
      for (int64_t j = 0; j < H; ++j) o[j] = lerp(h[j], c[j], at[j]);
    }
  }
}

template <typename T>
void bwd(const hrnn_cpu::Problem<T>& P, int, int64_t b0, int64_t b1, int64_t slice,
         const Grads<T>& G, const Scratch<T>& S) {
  const int64_t H = P.H, TT = P.T_, n = b1 - b0, I = G.src.I;
  const bool proj = G.src.x != nullptr;
  T* carry = G.dh0 + b0 * H;  // rows b0..b1 of dL/dh_{t-1}, contiguous
  for (int64_t r = 0; r < n; ++r) {
    if (G.g) std::fill_n(carry + r * H, H, T(0));
    else std::copy_n(G.g_last + (b0 + r) * H, H, carry + r * H);
  }
  at::Tensor carry_v = view(carry, n, H, H), w = view(G.w, H, H, H);
  at::Tensor dw = view(G.dw_parts + slice * H * H, H, H, H);
  at::Tensor wx_t = proj ? view(G.src.wxT, I, H, H) : at::Tensor();
  T* dwx_part = proj ? G.dwx_parts + slice * (I + 1) * H : nullptr;
  T* db = proj ? dwx_part + I * H : nullptr;
  at::Tensor dwx = proj ? view(dwx_part, I, H, H) : at::Tensor();
  T* da_part = G.da_parts ? G.da_parts + slice * TT * H : nullptr;
  for (int64_t t = TT - 1; t >= 0; --t) {
    const T* at = P.a + t * H;
    T* dz0 = proj ? S.dz : G.du + (b0 * TT + t) * H;
    const int64_t dz_stride = proj ? H : TT * H;
    const T* hp0 = t ? G.hs + (b0 * TT + t - 1) * H : G.h0 + b0 * H;
    const int64_t hp_stride = t ? TT * H : H;
    // dh = g + carry (carry holds dh); dz = dh a (1 - c^2); da += dh (c - h_{t-1});
    // carry = dh (1 - a). Branch-free inner loops, so that they vectorize.
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = ((b0 + r) * TT + t) * H;
      const T* c = G.cs + row;
      T* dz = dz0 + r * dz_stride;
      T* cr = carry + r * H;
      if (G.g)
        for (int64_t j = 0; j < H; ++j) cr[j] += G.g[row + j];
      if (da_part) {
        const T* hp = hp0 + r * hp_stride;
        T* da = da_part + t * H;
        for (int64_t j = 0; j < H; ++j) da[j] += cr[j] * (c[j] - hp[j]);
      }
      for (int64_t j = 0; j < H; ++j) {
        dz[j] = cr[j] * at[j] * (T(1) - c[j] * c[j]);
        cr[j] *= T(1) - at[j];
      }
    }
    at::Tensor dz = view(dz0, n, H, dz_stride);
    if (G.dx) matmul<T>(dz, wx_t.t(), view(G.dx + (b0 * TT + t) * I, n, I, TT * I), false);  // dx_t = dz W_x
    matmul<T>(dz, w, carry_v, true);                                       // carry += dz W
    matmul<T>(dz.t(), view(hp0, n, H, hp_stride), dw, true);               // dW += dz^T h_{t-1}
    if (!proj) continue;
    if (I > kLoopInputs)
      matmul<T>(view(G.src.x + (b0 * TT + t) * I, n, I, TT * I).t(), dz, dwx, true);  // dW_x^T += x_t^T dz
    for (int64_t r = 0; r < n; ++r) {
      const T* dzr = dz0 + r * dz_stride;
      const T* xr = G.src.x + ((b0 + r) * TT + t) * I;
      for (int64_t i = 0; i < (I > kLoopInputs ? 0 : I); ++i)
        for (int64_t j = 0; j < H; ++j) dwx_part[i * H + j] += xr[i] * dzr[j];
      for (int64_t j = 0; j < H; ++j) db[j] += dzr[j];
    }
  }
}

const KernelTable* table() {
  static const KernelTable t{"default", 16, 8, &fwd<float>, &fwd<double>, &bwd<float>, &bwd<double>};
  return &t;
}

}  // namespace portable

// ---------------------------------------------------------------- dispatch
// The builds this extension holds that this CPU can execute, lowest first.
std::vector<const KernelTable*> executable_tables() {
  std::vector<const KernelTable*> out{portable::table()};
#if defined(HRNN_HAVE_AVX2)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    out.push_back(hrnn_cpu::kernels_avx2());
#endif
#if defined(HRNN_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    out.push_back(hrnn_cpu::kernels_avx512());
#endif
  return out;
}

const KernelTable*& active_table() {
  static const KernelTable* table = executable_tables().back();
  return table;
}

std::vector<std::string> capabilities() {
  std::vector<std::string> names;
  for (const KernelTable* t : executable_tables()) names.emplace_back(t->name);
  return names;
}

std::string capability() { return active_table()->name; }

void set_capability(const std::string& name) {
  std::string allowed;
  for (const KernelTable* t : executable_tables()) {
    if (name == t->name) {
      active_table() = t;
      return;
    }
    allowed += (allowed.empty() ? "" : ", ") + std::string(t->name);
  }
  TORCH_CHECK(false, "CPU capability '", name, "' is not available here; allowed on this CPU: ", allowed);
}

// ---------------------------------------------------------------- problem
template <typename T>
struct ProblemData {
  hrnn_cpu::Problem<T> view;
  std::vector<T> a;
  std::vector<int32_t> act_cols, act_start, idle_cols, idle_start, all_cols;
  std::vector<uint64_t> reads;  // W_h's nonzero blocks (forward only; block_reads)
};

int pick_vl(int64_t H, int64_t group, int max_vl) {
  // Widest vector (at most one register) dividing H; for skipping, prefer one that also divides
  // the module width, so tiles never straddle two modules.
  for (int vl = max_vl; vl > 1; vl /= 2)
    if (H % vl == 0 && group % vl == 0) return vl;
  return 1;
}

template <typename T>
int max_vl() {
  const KernelTable* k = active_table();
  return std::is_same<T, float>::value ? k->max_vl_float : k->max_vl_double;
}

int64_t n_slices(int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
}

template <typename T>
void fwd_call(const hrnn_cpu::Problem<T>& P, int vl, int64_t b0, int64_t b1, const Input<T>& src,
              const T* wt, const T* h0, T* hs, T* cs, T* last) {
  const KernelTable* k = active_table();
  if constexpr (std::is_same<T, float>::value) k->fwd_float(P, vl, b0, b1, src, wt, h0, hs, cs, last);
  else k->fwd_double(P, vl, b0, b1, src, wt, h0, hs, cs, last);
}

template <typename T>
void bwd_call(const hrnn_cpu::Problem<T>& P, int vl, int64_t b0, int64_t b1, int64_t slice,
              const Grads<T>& G, const Scratch<T>& S) {
  const KernelTable* k = active_table();
  if constexpr (std::is_same<T, float>::value) k->bwd_float(P, vl, b0, b1, slice, G, S);
  else k->bwd_double(P, vl, b0, b1, slice, G, S);
}

template <typename T>
void run_fwd(const hrnn_cpu::Problem<T>& P, int vl, const Input<T>& src, const T* wt, const T* h0,
             T* hs, T* cs, T* last) {
  const int64_t ns = n_slices(P.B);
  at::parallel_for(0, ns, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      fwd_call<T>(P, vl, P.B * s / ns, P.B * (s + 1) / ns, src, wt, h0, hs, cs, last);
  });
}

template <typename T>
void run_bwd(const hrnn_cpu::Problem<T>& P, int vl, const Grads<T>& G) {
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

}  // namespace

namespace hrnn_cpu {
// reads[i]: bit j set when block (i, j) of W_h (module i reads module j, H / M x H / M) holds a
// nonzero. Returns false, with nothing filled, when no block is all zero, or M > 64 (no skipping).
//
// Both cores find the zero blocks here, in the W_h the model passes, rather than taking a block
// mask: skipping is then exact by construction (only blocks that really are zero are skipped, so
// the result is the dense product's), it serves every source of zero blocks alike (learned
// connectivity's hard gates in evaluation, the slow-to-fast mask, a user's W_h), and no argument
// has to travel through every layer of the op. The cost is one read of the H x H weights per call.
// Above `max_nonzero` (a fraction of the M^2 blocks) it also returns false: the masked loops then
// cost more than the blocks they save (docs/performance.md, "Zero blocks of W_h").
bool block_reads(const at::Tensor& w, int64_t M, double max_nonzero, std::vector<uint64_t>& reads) {
  if (M > 64) return false;
  const int64_t H = w.size(0), S = H / M;
  std::vector<uint64_t> found(M, 0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "hrnn_block_reads", [&] {
    const scalar_t* p = w.data_ptr<scalar_t>();
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < H; ++c)
        if (p[r * H + c] != scalar_t(0)) found[r / S] |= uint64_t(1) << (c / S);
  });
  int64_t nonzero = 0;
  for (uint64_t f : found) nonzero += __builtin_popcountll(f);
  if (nonzero == M * M || double(nonzero) > max_nonzero * double(M * M)) return false;
  reads = found;
  return true;
}
}  // namespace hrnn_cpu

namespace {

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
  at::Tensor hs = last_only ? at::empty({B, H}, in.options()) : pool_empty({B, T, H}, in.options());
  at::Tensor cs = save ? pool_empty({B, T, H}, in.options()) : at::Tensor();
  at::Tensor wt = w.t().contiguous();
  at::Tensor wxT = proj ? w_x.t().contiguous() : at::Tensor();
  at::Tensor b = proj && bias.defined() ? bias.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "hrnn_leaky_fwd", [&] {
    ProblemData<scalar_t> D;
    // Zero blocks of W_h: tiles must not straddle modules, as for skipping.
    // Measured break-even near 2/3 of the blocks (AVX-512: 0.82 of dense at 1/2, 1.10 at 3/4).
    // Not in a training forward that also skips idle tiles (hard clocks): the Clockwork RNN's
    // step ran 2.4x slower with both than with the idle tiles skipped alone.
    const bool blocks = !(save && skip) && hrnn_cpu::block_reads(w, waves.size(1), 0.625, D.reads);
    const int vl = pick_vl(H, skip || blocks ? S : H, max_vl<scalar_t>());
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

// forward(u, w_h, waves, h0, skip, save, last_only) -> (states, candidates or empty);
// last_only (with save False): the states are the last one only, (B, H).
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
    const int vl = pick_vl(H, skip ? S : H, max_vl<scalar_t>());
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

namespace hrnn_cpu {
const char* active_capability() { return active_table()->name; }
// For gated_scan.cpp: the same pool for its (B, T, H) buffers.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) { return pool_empty(sizes, opts); }
void register_gated(pybind11::module_& m);  // gated_scan.cpp
}  // namespace hrnn_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hrnn fused leaky scan (CPU)";
  m.def("forward", &forward, "leaky scan forward");
  m.def("backward", &backward, "leaky scan backward through time");
  m.def("forward_x", &forward_x, "leaky scan forward with the input projection fused");
  m.def("backward_x", &backward_x, "backward of forward_x, projection gradients included");
  m.def("pool_stats", &pool_stats, "(cached bytes, cached blocks, limit bytes)");
  m.def("set_pool_limit", &set_pool_limit, "max idle bytes the buffer pool keeps");
  m.def("capabilities", &capabilities, "CPU capabilities built and executable here, lowest first");
  m.def("capability", &capability, "the CPU capability whose kernels run");
  m.def("set_capability", &set_capability, "run the kernels of this capability (one of capabilities())");
  hrnn_cpu::register_gated(m);
}
