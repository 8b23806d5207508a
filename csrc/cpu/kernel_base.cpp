// The fused CPU kernels for any x86-64 (or other) CPU: baseline ISA, no extra target flags.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "kernel_api.h"

namespace {
#include "../math/update.h"
#include "kernel_impl.h"
}  // namespace

FUSED_OPTIM_CPU_ENTRY_POINTS(base)
