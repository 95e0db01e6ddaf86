// How the parts of the extension module hrnn.ops._C (module.cpp) add their Python functions: each
// scan's bindings file defines its own, beside the entry points it binds.
#pragma once

#include <torch/extension.h>

namespace hrnn_cpu {

void bind_leaky(pybind11::module_& m);  // leaky_scan.cpp: the clock core
void bind_gated(pybind11::module_& m);  // gated_scan.cpp: the event-gate core

}  // namespace hrnn_cpu
