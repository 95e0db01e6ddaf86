// Detection of the CPU's capabilities, the choice of the one that runs, and the table of each
// capability's kernels (capability.h). Built once, for the baseline ISA.
#include "capability.h"

#include <cstdlib>

namespace hrnn_cpu {
namespace {

const char* const kNames[] = {"default", "avx2", "avx512"};  // by Capability

// Whether this CPU executes `c` (the baseline ISA always).
bool executes(Capability c) {
  __builtin_cpu_init();
  switch (c) {
    case Capability::kDefault:
      return true;
    case Capability::kAVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Capability::kAVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
  }
  return false;
}

// The capabilities built into this extension (setup.py defines HRNN_HAVE_<NAME> for each register
// build that compiled) that this CPU executes, lowest first.
const std::vector<CapabilityKernels>& executable() {
  static const std::vector<CapabilityKernels> tables = [] {
    std::vector<CapabilityKernels> all{
        {Capability::kDefault, kNames[0], kernels_default(), gated_kernels_default()},
#if defined(HRNN_HAVE_AVX2)
        {Capability::kAVX2, kNames[1], kernels_avx2(), gated_kernels_avx2()},
#endif
#if defined(HRNN_HAVE_AVX512)
        {Capability::kAVX512, kNames[2], kernels_avx512(), gated_kernels_avx512()},
#endif
    };
    std::vector<CapabilityKernels> out;
    for (const CapabilityKernels& k : all)
      if (executes(k.capability)) out.push_back(k);
    return out;
  }();
  return tables;
}

const CapabilityKernels*& active() {
  static const CapabilityKernels* kernels = &executable().back();
  return kernels;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

std::string trimmed(const std::string& s) {
  const char* blank = " \t\n\r\f\v";
  const size_t first = s.find_first_not_of(blank);
  return first == std::string::npos ? "" : s.substr(first, s.find_last_not_of(blank) - first + 1);
}

}  // namespace

const CapabilityKernels& active_kernels() { return *active(); }

std::vector<std::string> known_capabilities() { return {std::begin(kNames), std::end(kNames)}; }

std::vector<std::string> capabilities() {
  std::vector<std::string> names;
  for (const CapabilityKernels& k : executable()) names.emplace_back(k.name);
  return names;
}

std::string capability_error(const std::string& name) {
  const std::vector<std::string> known = known_capabilities(), here = capabilities();
  const std::string variable = kCapabilityVariable;
  bool is_known = false, is_here = false;
  for (const std::string& n : known) is_known = is_known || n == name;
  for (const std::string& n : here) is_here = is_here || n == name;
  if (!is_known)
    return variable + "='" + name + "' is not a CPU capability; allowed: " + joined(known);
  if (!is_here)
    return variable + "=" + name + " cannot run on this CPU; allowed here: " + (here.empty() ? "none" : joined(here));
  return "";
}

std::string set_capability(const std::string& name) {
  const std::string error = capability_error(name);
  if (!error.empty()) return error;
  for (const CapabilityKernels& k : executable())
    if (name == k.name) active() = &k;
  return "";
}

std::string apply_environment() {
  const char* value = std::getenv(kCapabilityVariable);
  const std::string name = value ? trimmed(value) : "";
  return name.empty() ? "" : set_capability(name);
}

}  // namespace hrnn_cpu
