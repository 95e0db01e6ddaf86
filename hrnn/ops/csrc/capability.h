// The CPU capabilities (ATen's CPU_CAPABILITY scheme, as in ATen/native/DispatchStub.h): which builds
// of the kernels exist, which this CPU executes, which one runs, and one table of kernel entry
// points per capability that both cores read (the clock core, leaky_scan.cpp, and the event-gate
// core, gated_scan.cpp), so the two always run the same capability.
//
// At load the best capability this CPU executes runs; HRNN_CPU_CAPABILITY (read by
// apply_environment) or set_capability names a lower one. No torch here: errors are messages
// the caller raises (hrnn/ops/cpu.py as a UserError, the bindings as a RuntimeError).
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include "gated_kernels.h"
#include "kernels.h"

namespace hrnn_cpu {

// Lowest first; a capability executes only where the ones below it do.
enum class Capability { kDefault, kAVX2, kAVX512 };

// One capability's builds of both cores.
struct CapabilityKernels {
  Capability capability;
  const char* name;
  const KernelTable* clock;       // leaky_scan.cpp's kernels
  const GatedKernelTable* gated;  // gated_scan.cpp's kernels
};

// The environment variable that names the capability to run.
constexpr const char* kCapabilityVariable = "HRNN_CPU_CAPABILITY";

// The kernels of the capability that runs.
const CapabilityKernels& active_kernels();
// Every capability's name, built here or not (default, avx2, avx512).
std::vector<std::string> known_capabilities();
// The capabilities built into this extension that this CPU executes, lowest first.
std::vector<std::string> capabilities();
// "" when `name` can run here; else one line naming what is wrong and what is allowed.
std::string capability_error(const std::string& name);
// Runs `name`'s kernels from now on; returns capability_error(name) (and changes nothing) if it cannot.
std::string set_capability(const std::string& name);
// HRNN_CPU_CAPABILITY, if set and not blank (surrounding white space ignored): set_capability's result.
std::string apply_environment();

// The widest vector (elements of T) of a table's kernels.
template <typename T, typename Table>
int max_vl(const Table* k) {
  return std::is_same<T, float>::value ? k->max_vl_float : k->max_vl_double;
}

}  // namespace hrnn_cpu
