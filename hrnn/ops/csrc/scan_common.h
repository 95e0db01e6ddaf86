// What the bindings of both cores (leaky_scan.cpp, gated_scan.cpp) share: the buffer pool for their
// big outputs, the split of the batch into slices, the vector width, and the zero blocks of W_h.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace hrnn_cpu {

// An empty tensor whose storage comes from a small pool of reused blocks: the (B, T, H) buffers'
// pages are touched once per process rather than once per call (at T = 784, B = 100, H = 128 each
// is 40 MB: fresh pages cost more than the kernel's work there, AVX-512, one thread). The storage's
// deleter returns the block, so a block is reused only once every tensor viewing it is gone.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts);

// Slices of batch rows, one per thread (each kernel call runs the whole time loop for one slice).
int64_t n_slices(int64_t B);

// The widest vector (at most max_vl elements, one register) dividing H and `group`: with skipping,
// the module width, so that tiles never straddle two modules.
int pick_vl(int64_t H, int64_t group, int max_vl);

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
bool block_reads(const at::Tensor& w, int64_t M, double max_nonzero, std::vector<uint64_t>& reads);

}  // namespace hrnn_cpu
