// The plain-C++ interface between the host code (ops.cpp, which knows about torch tensors) and
// the per-ISA kernel translation units (kernel_base.cpp, kernel_avx2.cpp, kernel_avx512.cpp), which do not.
#pragma once

#include <cstdint>

#include "../plan_layout.h"

namespace fused_optim {
namespace cpu {

// Storage dtypes the kernels read and write.
enum DType : int8_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kNone = -1 };

// Arrays of one tensor, all walked in the param's memory order (same layout, dense).
enum Slot : int { kParam = 0, kGrad = 1, kState0 = 2, kState1 = 3, kState2 = 4, kMaster = 5 };
constexpr int kSlots = 6;

struct Task {
  void* data[kSlots];     // base addresses (nullptr: absent)
  int8_t dtype[kSlots];   // DType of each array
  int64_t numel;
  // The tensor's group's row of the hyperparameter table (kHyper* columns of plan_layout.h).
  const double* hyper;
  // Adam: neg_step_size, bias_correction2_sqrt, decay (fp64, computed on the host).
  double scalar[3];
  uint32_t sr_key;        // stochastic rounding key (seed, step, param index), see ops.cpp
  bool new_buffer;        // SGD: momentum buffer is new (not read, initialised to g)
};

// A piece of one tensor: elements [start, start + length) of tasks[task].
struct Chunk {
  int64_t task;
  int64_t start;
  int64_t length;
};

// What happens to a gradient before the update reads it: GradScaler's unscale (g / scale, in the
// compute type), then gradient clipping's coefficient (torch's grad.mul_(coef) on the CPU: the
// gradient rounded to its dtype times the coefficient's value in the compute type, the product
// rounded to the grad's dtype).
// The result is stored into the grad only with write_back; otherwise the grad's memory is only
// read.
struct GradArgs {
  bool has_scale = false;
  double scale = 1.0;
  bool has_coef = false;
  double coef = 1.0;
  bool write_back = false;
};

// Per-launch flags; the hyperparameters are per group (Task::hyper).
struct SgdArgs {
  bool has_momentum, nesterov, maximize;
  bool complex_arithmetic;  // the params are real views of complex ones (math/update.h)
  GradArgs grad;
  bool stochastic_rounding;
};

struct AdamArgs {
  bool amsgrad, maximize, decoupled_weight_decay;
  bool complex_arithmetic;  // the params are real views of complex ones (math/update.h)
  GradArgs grad;
  bool stochastic_rounding;
};

// A gradient norm's reduction over the kGrad arrays of the tasks (the grads unscaled first when
// has_scale, rounded to their dtype as GradScaler writes them): the sum of squares, of absolute
// values, or of |g|^p, or the largest |g| (NaN if any is NaN). In fp64, one partial per chunk.
enum NormKind : int { kNormSquares = 0, kNormAbs = 1, kNormPower = 2, kNormMax = 3 };

struct NormArgs {
  int kind;
  double p;  // kNormPower's exponent
  bool has_scale;
  double scale;
};

// One OpenMP parallel region over all chunks of all tasks.
void sgd_base(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const SgdArgs& args);
void adam_base(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const AdamArgs& args);
void sgd_avx2(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const SgdArgs& args);
void adam_avx2(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const AdamArgs& args);
void sgd_avx512(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const SgdArgs& args);
void adam_avx512(const Task* tasks, const Chunk* chunks, int64_t num_chunks,
                 const AdamArgs& args);
void grad_norm_base(const Task* tasks, const Chunk* chunks, int64_t num_chunks,
                    const NormArgs& args, double* partials);
void grad_norm_avx2(const Task* tasks, const Chunk* chunks, int64_t num_chunks,
                    const NormArgs& args, double* partials);
void grad_norm_avx512(const Task* tasks, const Chunk* chunks, int64_t num_chunks,
                      const NormArgs& args, double* partials);

// murmur3's 32-bit finalizer (backends/reference.py's mix32).
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

}  // namespace cpu
}  // namespace fused_optim
