// The portable capability, `default`, of the clock core's kernels (kernels.h), for any CPU: the
// time loop, tanh and lerp here (compiled for the baseline ISA, with the bindings), the per-step
// products through ATen's matmul, i.e. the BLAS torch ships, which picks its own ISA at run time.
// Register kernels compiled for SSE2 measured 1.5x slower than the PyTorch loop on an AVX2/AVX-512
// machine (docs/performance.md): the loop's products are the BLAS's, at full width. The state hold
// at a = 0 is exact either way, so this path computes every unit (no skipping of idle modules, nor
// of W_h's zero blocks: the BLAS product is dense).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace hrnn_cpu {
namespace {

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
void fwd(const Problem<T>& P, int, int64_t b0, int64_t b1, const Input<T>& src,
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
void bwd(const Problem<T>& P, int, int64_t b0, int64_t b1, int64_t slice,
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

}  // namespace

const KernelTable* kernels_default() {
  static const KernelTable t{"default", 16, 8, &fwd<float>, &fwd<double>, &bwd<float>, &bwd<double>};
  return &t;
}

}  // namespace hrnn_cpu
