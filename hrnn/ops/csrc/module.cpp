// The extension module hrnn.ops._C (setup.py builds it from this directory): the capability choice
// (capability.h), the clock core (leaky_scan.cpp) and the event-gate core (gated_scan.cpp).
// hrnn/ops/cpu.py is its one caller.
#include "bindings.h"
#include "capability.h"

namespace {

void set_capability(const std::string& name) {
  const std::string error = hrnn_cpu::set_capability(name);
  TORCH_CHECK(error.empty(), error);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hrnn's fused CPU kernels: the clock core (leaky scan) and the event-gate core";
  m.def("known_capabilities", &hrnn_cpu::known_capabilities, "every CPU capability's name, built here or not");
  m.def("capabilities", &hrnn_cpu::capabilities, "CPU capabilities built and executable here, lowest first");
  m.def("capability", [] { return std::string(hrnn_cpu::active_kernels().name); },
        "the CPU capability whose kernels run");
  m.def("capability_error", &hrnn_cpu::capability_error,
        "'' if the named capability can run here, else one line saying why not and what is allowed");
  m.def("set_capability", &set_capability, "run the kernels of this capability (one of capabilities())");
  m.def("apply_environment", &hrnn_cpu::apply_environment,
        "run the capability HRNN_CPU_CAPABILITY names, if set; '' or capability_error's line");
  hrnn_cpu::bind_leaky(m);
  hrnn_cpu::bind_gated(m);
}
