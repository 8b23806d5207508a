// Host interface of the CUDA multi-tensor kernels (csrc/cuda/fused_cuda.cu).
//
// This header needs only the CUDA runtime: the torch binding (fused_cuda_ops.cpp) fills these
// structs from the op's arguments, and the kernels' translation unit can be compiled (and
// compile-checked in CI) without torch's CUDA headers.
//
// One launch updates every tensor of a bucket (fused_optim/backends/contract.py): the tensors of
// all param groups that share a device, param dtype, state dtype and code flags. It walks the
// tables of fused_optim/backends/plan.py, whose column layout is csrc/plan_layout.h:
//
// * tensor_table: int64, kTableColumns per tensor: data pointers of the param, up to three state
//   tensors and the fp32 master weight, the element count, the step (an offset below its group's
//   base step, or the address of a step tensor), the new-momentum-buffer flag (SGD), the param's
//   index (stochastic-rounding key), whether the step tensor is fp64, and its group.
// * grad_table: int64, one gradient data pointer per tensor (same dtype as the param).
// * block_table: int64 pairs (tensor, first element), one per CUDA block; every block covers
//   kChunk elements of one tensor (fewer at a tensor's end). Starts are multiples of kChunk.
// * hyper_table: float64, kHyperColumns per group: lr, beta1 (SGD: momentum), beta2 (SGD:
//   dampening), eps, weight decay, the group's base step, torch.optim's bias corrections at it,
//   and the int64 bits of a device lr tensor's address (read when lr_kind is a pointer kind).
//
// All tables live in device memory; nothing is read back to the host. Per-group values are data
// (a scheduler changing one between steps recompiles nothing); only the flags below pick code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../plan_layout.h"

namespace fused_optim {
namespace cuda {

// Elements per block-table entry and threads per block. kChunk is a multiple of every vector
// width times kThreads, and divides 2^32 (the stochastic-rounding hash splits the index there).
constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;

// Storage dtypes (the torch binding maps c10::ScalarType onto these).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Where each group's learning rate comes from and the dtype of the scalar math around it (fp64
// for a Python float lr, the tensor's dtype for a tensor lr, as torch.optim computes it). One
// kind holds for the whole launch (the optimizer buckets groups by the kind of their lr).
enum class LrKind : int {
  kValue = 0,           // hyper_table[kHyperLr], fp64 math
  kFloat32Pointer = 1,  // the fp32 scalar at hyper_table[kHyperLrAddress] (device tensor lr)
  kFloat64Pointer = 2,  // the fp64 scalar at hyper_table[kHyperLrAddress] (device tensor lr)
  kFloat32Value = 3,    // hyper_table[kHyperLr] rounded to fp32, fp32 math (host fp32 tensor lr,
                        // or an integer one, which torch promotes to the default float dtype)
  // bf16/fp16 tensor lrs: torch.optim's arithmetic on them computes each operation in fp32 and
  // rounds it to the lr's dtype.
  kBFloat16Pointer = 4,  // the bf16 scalar at hyper_table[kHyperLrAddress]
  kHalfPointer = 5,      // the fp16 scalar at hyper_table[kHyperLrAddress]
  kBFloat16Value = 6,    // hyper_table[kHyperLr] (a bf16 value), bf16 rounding
  kHalfValue = 7,        // hyper_table[kHyperLr] (an fp16 value), fp16 rounding
};

struct CommonLaunch {
  const int64_t* tensor_table = nullptr;
  const int64_t* grad_table = nullptr;
  const int64_t* block_table = nullptr;
  const double* hyper_table = nullptr;  // kHyperColumns per group (see above)
  int64_t num_blocks = 0;
  DType param_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  LrKind lr_kind = LrKind::kValue;
  const float* grad_scale = nullptr;  // GradScaler's scale (fp32, device), or null
  const float* found_inf = nullptr;   // GradScaler's found_inf (fp32, device), or null
  // Gradient clipping's coefficient, one element in the compute dtype (fp32; fp64 for fp64
  // params) on the device, or null: after the unscale, g = round(round(g) * coef), rounding to
  // the grad's dtype (torch's grad.mul_(coef) on the CPU).
  const void* grad_coef = nullptr;
  bool write_grad = false;            // store the prepared gradient (always with grad_scale)
  bool maximize = false;
  bool complex_arithmetic = false;    // params are real views of complex ones (math/update.h)
  bool has_master = false;            // column kColMaster holds fp32 master weights
  bool stochastic_rounding = false;   // only acted on for bf16/fp16 params
  bool step_from_pointer = false;     // kColStep holds step tensor addresses, else
                                      // step = hyper_table[kHyperBaseStep] - kColStep
  uint32_t seed = 0;
  bool aligned = false;               // every table address is 16-byte aligned
};

// Flags only: momentum, dampening, weight decay and lr are per-group rows of hyper_table.
struct SgdLaunch : CommonLaunch {
  bool momentum = false;  // the bucket's groups have momentum (kColState0: the buffers)
  bool nesterov = false;
};

// Flags only: betas, eps, weight decay, lr and the bias corrections at each group's base step
// (torch.optim's host fp64 values, used by tensors at that step when steps are not read from
// device memory) are per-group rows of hyper_table.
struct AdamLaunch : CommonLaunch {
  bool amsgrad = false;
  bool decoupled_weight_decay = false;
};

// Enqueue one launch on `stream`. Returns cudaErrorInvalidValue for an unsupported
// (param, state) dtype pair, otherwise the launch's error (cudaGetLastError). Never syncs.
cudaError_t launch_sgd(const SgdLaunch& launch, cudaStream_t stream);
cudaError_t launch_adam(const AdamLaunch& launch, cudaStream_t stream);

// A gradient norm for clipping (fused_optim/backends/clip.py), one launch per gradient dtype.
// Each block reduces kChunk elements of one gradient in fp64 (each thread its elements in order,
// then a fixed tree over the threads): the sum of squares (kSquares) or of absolute values
// (kAbs), or the largest absolute value, NaN if any is NaN (kMax), of the gradient (divided by
// grad_scale first when given, rounded to its dtype as GradScaler writes it), stored at
// partials[first_partial + block]. The block that takes the last ticket of `counter` (launches
// run in stream order, so it is in the last launch) combines the num_partials partials in the
// same fixed order, stores the fp64 result at partials[num_partials], the norm (the square root
// for kSquares) in out_dtype (through fp32, as torch converts fp64) at total_out and, when
// coef_out is set, torch's clipping coefficient clamp(max_norm / (total + 1e-6), max=1) at
// coef_out (held in the compute type), computed as torch does (reciprocal, then multiply), each operation in fp32 (fp64
// for an fp64 norm) and rounded to out_dtype. It then sets the counter back to 0. No atomics
// touch the values: two runs give the same bits.
enum class NormKind : int { kSquares = 0, kAbs = 1, kMax = 3 };

struct NormLaunch {
  const int64_t* pointers = nullptr;     // each gradient's address
  const int64_t* block_table = nullptr;  // (tensor, start, numel) per block, then one row whose
                                         // first entry holds max_norm's fp64 bits
  double* partials = nullptr;            // num_partials + 1 values
  unsigned int* counter = nullptr;       // 0 before the first launch of a norm
  const float* grad_scale = nullptr;     // GradScaler's scale (fp32, device), or null
  void* total_out = nullptr;             // one element of out_dtype
  void* coef_out = nullptr;              // one element of out_dtype's compute type (fp32; fp64
                                         // for fp64), which the update kernels read, or null
  int64_t num_blocks = 0;
  int64_t first_partial = 0;
  int64_t num_partials = 0;
  DType grad_dtype = DType::kFloat32;
  DType out_dtype = DType::kFloat32;
  NormKind kind = NormKind::kSquares;
};

cudaError_t launch_norm(const NormLaunch& launch, cudaStream_t stream);

// Whether the kernels support this (param, state) dtype pair: the state dtype is the param's,
// fp32 or bf16.
bool supports_dtypes(DType param, DType state);

}  // namespace cuda
}  // namespace fused_optim
