// The bindings' shared helpers (scan_common.h). Built once, for the baseline ISA.
#include "scan_common.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
// torch::from_blob: the pooled tensors are made as torch's own factories make them.
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>

namespace hrnn_cpu {
namespace {

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

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
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

int64_t n_slices(int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
}

int pick_vl(int64_t H, int64_t group, int max_vl) {
  for (int vl = max_vl; vl > 1; vl /= 2)
    if (H % vl == 0 && group % vl == 0) return vl;
  return 1;
}

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
