// What the two per-capability kernel sources (kernels.cpp, gated_kernels.cpp) share: the check that
// the build names its capability (setup.py passes -DHRNN_CPU_CAPABILITY=default|avx2|avx512 with
// that capability's flags), the token helpers, and the definition of the build's table.
#pragma once

#ifndef HRNN_CPU_CAPABILITY
#error "compile with -DHRNN_CPU_CAPABILITY=<capability> and its flags (setup.py does)"
#endif
#define HRNN_CAT2(a, b) a##b
#define HRNN_CAT(a, b) HRNN_CAT2(a, b)
#define HRNN_STR2(a) #a
#define HRNN_STR(a) HRNN_STR2(a)

// Defines `const Table* getter()`: this build's table of `Table` type (kernels.h, gated_kernels.h),
// named after the capability, with the vector widths of namespace `ns` and its fwd / bwd entry points.
#define HRNN_DEFINE_KERNEL_TABLE(Table, getter, ns) \
  const Table* getter() {                           \
    static const Table table{                       \
        HRNN_STR(HRNN_CPU_CAPABILITY),              \
        ns::kVectorBytes / int(sizeof(float)),      \
        ns::kVectorBytes / int(sizeof(double)),     \
        &ns::fwd<float>,                            \
        &ns::fwd<double>,                           \
        &ns::bwd<float>,                            \
        &ns::bwd<double>,                           \
    };                                              \
    return &table;                                  \
  }
