// The fused CPU kernels for x86-64 CPUs with AVX-512 F+BW+VL+DQ (and AVX2, FMA, F16C): Skylake-SP,
// Ice Lake, Sapphire Rapids, AMD Zen 4 and later. Chosen at run time by ops.cpp. As in
// kernel_avx2.cpp, every header outside the anonymous namespace is included BEFORE the target
// pragma, so that no inline function shared with the other translation units is compiled for
// AVX-512. The fast Adam loop runs 16 lanes (Avx512Lanes); the portable block loops are
// vectorized by the compiler at 512 bits. Same bits as the baseline build.
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
#define FUSED_OPTIM_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#endif

namespace {
#include "../math/update.h"
#include "kernel_impl.h"
}  // namespace

FUSED_OPTIM_CPU_ENTRY_POINTS(avx512)

#ifdef FUSED_OPTIM_HAVE_AVX512
#pragma GCC pop_options
#endif
