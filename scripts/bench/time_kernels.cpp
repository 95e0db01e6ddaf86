// Times one capability's clock-core kernels alone (hrnn/ops/csrc/kernels.cpp) on one thread: the
// forward and backward of one batch slice, the slice each thread owns in the real op, with
// learned (soft) waves on every unit, as a training step at B = 100 on 2 threads runs them.
// No torch, no Python: a tuning loop is a 10 s compile, not a 2-minute rebuild.
//
//     make time-kernels                          # avx2, 50 rows, T = 200 and 784
//     g++ -O3 -std=c++17 -ffp-contract=fast -mavx2 -mfma -DHRNN_CPU_CAPABILITY=avx2 \
//         scripts/bench/time_kernels.cpp -o /tmp/time_kernels && /tmp/time_kernels 50 784 10
//
// Arguments: rows T repeats. Prints the medians and their GFLOP/s (the backward does two
// products: dL/dh_{t-1} and dW_h); `perf record` on the binary shows where a kernel waits.
// A blocking macro (HRNN_ROWS, HRNN_TILES, HRNN_DW_ROWS, HRNN_DW_TILES) on the command line
// tries another register blocking (docs/performance.md).
#include "../../hrnn/ops/csrc/kernels.cpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace hrnn_cpu;

int main(int argc, char** argv) {
  const int64_t B = argc > 1 ? std::atoi(argv[1]) : 50, TT = argc > 2 ? std::atoi(argv[2]) : 200, H = 128, I = 1;
  const int reps = argc > 3 ? std::max(1, std::atoi(argv[3])) : 20;
  constexpr int VL = HRNN_NS::kVectorBytes / 4;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> small(-0.1f, 0.1f), wave(0.05f, 0.95f);
  std::vector<float> a(TT * H), x(B * TT * I), wxT(I * H), bias(H), w(H * H), wt(H * H), h0(B * H, 0.f);
  for (auto& v : a) v = wave(rng);
  for (auto& v : x) v = 10 * small(rng);
  for (auto* p : {&wxT, &bias, &w})
    for (auto& v : *p) v = small(rng);
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < H; ++j) wt[i * H + j] = w[j * H + i];
  // Every tile active at every step (learned waves are never exactly 0).
  std::vector<int32_t> act_cols, act_start{0}, idle_start(TT + 1, 0), all_cols;
  for (int32_t j = 0; j < H; j += VL) all_cols.push_back(j);
  for (int64_t t = 0; t < TT; ++t) {
    act_cols.insert(act_cols.end(), all_cols.begin(), all_cols.end());
    act_start.push_back(int32_t(act_cols.size()));
  }
  Problem<float> P{B, TT, H, a.data(), act_cols.data(), act_start.data(), nullptr, idle_start.data(),
                   all_cols.data(), int(all_cols.size())};
  Input<float> src;
  src.x = x.data(), src.wxT = wxT.data(), src.bias = bias.data(), src.I = I;
  std::vector<float> hs(B * TT * H), cs(B * TT * H), g_last(B * H), dh0(B * H), dw(H * H), dwx((I + 1) * H),
      da(TT * H), scratch_dz(B * H), scratch_h(B * H);
  for (auto& v : g_last) v = small(rng);
  Grads<float> G;  // the loss reads the last state, as the benchmark's and the tasks' heads do
  G.g_last = g_last.data(), G.hs = hs.data(), G.cs = cs.data(), G.h0 = h0.data(), G.w = w.data(), G.src = src;
  G.dh0 = dh0.data(), G.dw_parts = dw.data(), G.dwx_parts = dwx.data(), G.da_parts = da.data();
  const Scratch<float> S{scratch_dz.data(), scratch_h.data()};
  std::vector<double> fwd_s, bwd_s;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    HRNN_NS::fwd<float>(P, VL, 0, B, src, wt.data(), h0.data(), hs.data(), cs.data(), nullptr);
    const auto t1 = std::chrono::steady_clock::now();
    std::fill(dw.begin(), dw.end(), 0.f), std::fill(dwx.begin(), dwx.end(), 0.f), std::fill(da.begin(), da.end(), 0.f);
    HRNN_NS::bwd<float>(P, VL, 0, B, 0, G, S);
    const auto t2 = std::chrono::steady_clock::now();
    fwd_s.push_back(std::chrono::duration<double>(t1 - t0).count());
    bwd_s.push_back(std::chrono::duration<double>(t2 - t1).count());
  }
  std::sort(fwd_s.begin(), fwd_s.end()), std::sort(bwd_s.begin(), bwd_s.end());
  const double f = fwd_s[reps / 2], b = bwd_s[reps / 2], flop = 2.0 * B * TT * H * H;
  double checksum = 0;
  for (float v : dw) checksum += v;
  std::printf("%s rows %ld T %ld: forward %.3f ms (%.0f GFLOP/s), backward %.3f ms (%.0f GFLOP/s), dW_h sum %.6g\n",
              HRNN_STR(HRNN_CPU_CAPABILITY), long(B), long(TT), f * 1e3, flop / f / 1e9, b * 1e3, 2 * flop / b / 1e9,
              checksum);
  return 0;
}
