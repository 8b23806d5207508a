// Host interface of the CUDA multi-tensor kernels (csrc/cuda/fused_cuda.cu).
//
// This header needs only the CUDA runtime: the torch binding (fused_cuda_ops.cpp) fills these
// structs from the op's arguments, and the kernels' translation unit can be compiled (and
// compile-checked in CI) without torch's CUDA headers.
//
// One launch updates every tensor of a (device, param dtype, state dtype) group. It walks:
//
// * tensor_table: int64, kTableColumns per tensor (column layout below): data pointers of the
//   param, up to three state tensors and the fp32 master weight, the element count, the step
//   (an offset below base_step, or the address of a step tensor), the new-momentum-buffer flag
//   (SGD), the param's index (stochastic-rounding key) and whether the step tensor is fp64.
// * grad_table: int64, one gradient data pointer per tensor (same dtype as the param).
// * block_table: int64 pairs (tensor, first element), one per CUDA block; every block covers
//   kChunk elements of one tensor (fewer at a tensor's end). Starts are multiples of kChunk.
//
// All tables live in device memory; nothing is read back to the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_optim {
namespace cuda {

enum TableColumn : int {
  kColParam = 0,
  kColState0 = 1,
  kColState1 = 2,
  kColState2 = 3,
  kColMaster = 4,
  kColNumel = 5,
  kColStep = 6,
  kColNewBuffer = 7,
  kColIndex = 8,
  kColStepIsDouble = 9,
  kTableColumns = 10,
};

// Elements per block-table entry and threads per block. kChunk is a multiple of every vector
// width times kThreads, and divides 2^32 (the stochastic-rounding hash splits the index there).
constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;

// Storage dtypes (the torch binding maps c10::ScalarType onto these).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// How the learning rate reaches the kernel.
enum class LrKind : int { kValue = 0, kFloat32Pointer = 1, kFloat64Pointer = 2 };

struct CommonLaunch {
  const int64_t* tensor_table = nullptr;
  const int64_t* grad_table = nullptr;
  const int64_t* block_table = nullptr;
  int64_t num_blocks = 0;
  DType param_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  LrKind lr_kind = LrKind::kValue;
  const void* lr_ptr = nullptr;       // device scalar (fp32/fp64) when lr_kind != kValue
  double lr_value = 0.0;              // the lr when lr_kind == kValue
  const float* grad_scale = nullptr;  // GradScaler's scale (fp32, device), or null
  const float* found_inf = nullptr;   // GradScaler's found_inf (fp32, device), or null
  bool maximize = false;
  bool has_master = false;            // column kColMaster holds fp32 master weights
  bool stochastic_rounding = false;   // only acted on for bf16/fp16 params
  bool step_from_pointer = false;     // kColStep holds step tensor addresses
  double base_step = 0.0;             // otherwise step = base_step - kColStep
  uint32_t seed = 0;
  bool aligned = false;               // every table address is 16-byte aligned
};

struct SgdLaunch : CommonLaunch {
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

struct AdamLaunch : CommonLaunch {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool amsgrad = false;
  bool decoupled_weight_decay = false;
  // torch.optim's host-side bias corrections at base_step (used by tensors at that step when
  // steps are not read from device memory): 1 - beta1^t and sqrt(1 - beta2^t).
  double base_bias_correction1 = 1.0;
  double base_bias_correction2_sqrt = 1.0;
};

// Enqueue one launch on `stream`. Returns cudaErrorInvalidValue for an unsupported
// (param, state) dtype pair, otherwise the launch's error (cudaGetLastError). Never syncs.
cudaError_t launch_sgd(const SgdLaunch& launch, cudaStream_t stream);
cudaError_t launch_adam(const AdamLaunch& launch, cudaStream_t stream);

// Whether the kernels support this (param, state) dtype pair: the state dtype is the param's,
// fp32 or bf16.
bool supports_dtypes(DType param, DType state);

}  // namespace cuda
}  // namespace fused_optim
