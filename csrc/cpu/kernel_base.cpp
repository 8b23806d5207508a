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

namespace fused_optim {
namespace cpu {

void sgd_base(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const SgdArgs& args) {
  sgd_dispatch(tasks, chunks, num_chunks, args);
}

void adam_base(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const AdamArgs& args) {
  adam_dispatch(tasks, chunks, num_chunks, args);
}

}  // namespace cpu
}  // namespace fused_optim
