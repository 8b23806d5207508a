// The fused CPU kernels for x86-64 CPUs with AVX2 + FMA + F16C (Haswell and later), chosen at
// run time by ops.cpp. Every header outside the anonymous namespace is included BEFORE the
// target pragma, so that no inline function shared with the baseline translation unit is
// compiled for AVX2 (the linker could otherwise pick the AVX2 copy for the baseline path).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "kernel_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSED_OPTIM_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace {
#include "../math/update.h"
#include "kernel_impl.h"
}  // namespace

FUSED_OPTIM_CPU_ENTRY_POINTS(avx2)

#ifdef FUSED_OPTIM_HAVE_AVX2
#pragma GCC pop_options
#endif
