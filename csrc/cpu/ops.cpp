// Host side of the fused CPU backend: the fused_optim::sgd_ / fused_optim::adam_ operators.
//
// One call updates every tensor of a bucket, across param groups (each tensor's group indexes
// the hyperparameter table, laid out as csrc/plan_layout.h says): the host turns the tensor lists into a task per
// tensor (addresses, dtypes, per-tensor scalars computed in fp64 as backends/reference.py does)
// and a chunk list over ALL tensors (kChunk elements each); the kernel runs one OpenMP parallel
// region over the chunk list. Tensors the kernel cannot walk in the param's memory order (a
// strided param, or a grad/state/master of another layout) are staged through a dense copy.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cmath>
#include <atomic>
#include <memory>
#include <cstdlib>
#include <optional>
#include <cstdint>
#include <limits>
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernel_api.h"

namespace fused_optim {
namespace cpu {
namespace {

constexpr int64_t kChunk = 16384;

using at::Tensor;
using at::TensorList;

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The kernel builds this CPU can run, in order of preference (last is best).
std::vector<std::string> supported_isas() {
  std::vector<std::string> isas{"base"};
  if (cpu_has_avx2()) isas.push_back("avx2");
  if (cpu_has_avx2() && cpu_has_avx512()) isas.push_back("avx512");
  return isas;
}

// FUSED_OPTIM_CPU_ISA: "base", "avx2" or "avx512" forces that build (an error if this CPU cannot
// run it); unset, empty or "auto" takes the best one the CPU supports.
std::string checked_isa(const std::string& wanted) {
  const std::vector<std::string> isas = supported_isas();
  if (wanted.empty() || wanted == "auto") return isas.back();
  for (const auto& isa : isas) {
    if (isa == wanted) return isa;
  }
  std::string known;
  for (const auto& isa : isas) known += (known.empty() ? "" : ", ") + isa;
  TORCH_CHECK(false, "FUSED_OPTIM_CPU_ISA=", wanted,
              " is not a kernel build this CPU can run (it can run: ", known, "; or auto)");
  return isas.back();  // not reached
}

enum class Isa { kBase, kAvx2, kAvx512 };

Isa isa_code(const std::string& name) {
  return name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kBase;
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "base";
}

// The build in use: chosen once from FUSED_OPTIM_CPU_ISA, changeable by set_isa (benchmarks and
// tests compare builds in one process).
std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{[] {
    const char* env = std::getenv("FUSED_OPTIM_CPU_ISA");
    return static_cast<int>(isa_code(checked_isa(env == nullptr ? "" : std::string(env))));
  }()};
  return slot;
}

Isa isa_in_use() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

std::string isa() { return isa_name(isa_in_use()); }

// Switches to another build this CPU can run ("auto": the best); returns the previous one.
std::string set_isa(const std::string& wanted) {
  const std::string previous = isa();
  isa_slot().store(static_cast<int>(isa_code(checked_isa(wanted))));
  return previous;
}

int8_t dtype_code(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kFloat32;
    case at::kDouble:
      return kFloat64;
    case at::kBFloat16:
      return kBFloat16;
    case at::kHalf:
      return kFloat16;
    default:
      TORCH_CHECK(false, "fused_optim cpu backend: unsupported dtype ", t.scalar_type(), " for ",
                  what);
  }
}

bool is_dense(const Tensor& t) { return t.is_non_overlapping_and_dense(); }

bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Tensors standing in for ones the kernel cannot address, copied back after the kernel.
struct Staging {
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (original, work)
  std::vector<Tensor> read_only;                      // kept alive until the kernel is done

  Tensor resolve(const Tensor& t, const Tensor& anchor, bool writes) {
    if (is_dense(t) && same_layout(t, anchor)) return t;
    Tensor work = at::empty_like(anchor, t.options());
    work.copy_(t);
    if (writes) {
      write_back.emplace_back(t, work);
    } else {
      read_only.push_back(work);
    }
    return work;
  }

  void finish() {
    for (auto& [original, work] : write_back) original.copy_(work);
    write_back.clear();
    read_only.clear();
  }
};

void check_cpu(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fused_optim cpu backend: ", what, " must be a CPU tensor");
  TORCH_CHECK(!t.is_sparse(), "fused_optim cpu backend: ", what, " must be dense");
}

double scalar_value(const Tensor& t) {
  TORCH_CHECK(t.numel() == 1, "fused_optim cpu backend: expected a one-element tensor");
  if (t.device().is_cpu()) {
    switch (t.scalar_type()) {
      case at::kFloat:
        return *static_cast<const float*>(t.const_data_ptr());
      case at::kDouble:
        return *static_cast<const double*>(t.const_data_ptr());
      case at::kLong:
        return static_cast<double>(*static_cast<const int64_t*>(t.const_data_ptr()));
      default:
        break;
    }
  }
  return t.item<double>();
}

uint32_t sr_key(int64_t seed, double step, int64_t index) {
  uint32_t key = mix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  key = mix32(key ^ static_cast<uint32_t>(static_cast<int64_t>(step)));
  return mix32(key ^ static_cast<uint32_t>(index));
}

// Tasks, chunks and stagings of one call.
struct Plan {
  std::vector<Task> tasks;
  std::vector<Chunk> chunks;
  Staging staging;

  // Adds tensor i: arrays[slot] points to the slot's tensor (nullptr: absent), writes[slot]
  // whether the kernel stores into it. The common case (every array dense, in the param's
  // layout) copies no tensor handle: only staged arrays are kept (in `staging`).
  Task& add(const Tensor* const* arrays, const bool* writes) {
    Task task{};
    const Tensor& param = *arrays[kParam];
    const int64_t numel = param.numel();
    task.numel = numel;
    for (int s = 0; s < kSlots; ++s) {
      task.data[s] = nullptr;
      task.dtype[s] = kNone;
    }
    if (numel > 0) {
      const bool param_dense = is_dense(param);
      const Tensor staged_param = param_dense ? Tensor() : staging.resolve(param, param, true);
      const Tensor& anchor = param_dense ? param : staged_param;
      for (int s = 0; s < kSlots; ++s) {
        if (arrays[s] == nullptr || !arrays[s]->defined()) continue;
        const Tensor& t = *arrays[s];
        TORCH_CHECK(t.numel() == numel,
                    "fused_optim cpu backend: a tensor's numel differs from its param's");
        if (s == kParam || (is_dense(t) && same_layout(t, anchor))) {
          const Tensor& used = s == kParam ? anchor : t;
          task.data[s] = used.data_ptr();
          task.dtype[s] = dtype_code(used, "a tensor");
        } else {
          const Tensor work = staging.resolve(t, anchor, writes[s]);
          task.data[s] = work.data_ptr();
          task.dtype[s] = dtype_code(work, "a tensor");
        }
      }
      for (int64_t start = 0; start < numel; start += kChunk) {
        chunks.push_back(
            {static_cast<int64_t>(tasks.size()), start, std::min(kChunk, numel - start)});
      }
    }
    tasks.push_back(task);
    return tasks.back();
  }

  // Runs the kernel build in use over every chunk, then writes the staged arrays back.
  template <typename Args>
  using Kernel = void (*)(const Task*, const Chunk*, int64_t, const Args&);

  template <typename Args>
  void run(const Args& args, Kernel<Args> base, Kernel<Args> avx2, Kernel<Args> avx512) {
    const int64_t num_chunks = static_cast<int64_t>(chunks.size());
    if (num_chunks > 0) {
      const Isa isa = isa_in_use();
      const Kernel<Args> kernel = isa == Isa::kAvx512 ? avx512 : isa == Isa::kAvx2 ? avx2 : base;
      kernel(tasks.data(), chunks.data(), num_chunks, args);
    }
    staging.finish();
  }
};

bool skipped(const std::optional<Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && scalar_value(*found_inf) != 0.0;
}

// GradScaler's unscale and gradient clipping's coefficient (kernel_api.h's GradArgs).
GradArgs grad_args(const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& grad_coef,
                   bool write_grads) {
  GradArgs a;
  a.has_scale = grad_scale.has_value() && grad_scale->defined();
  a.scale = a.has_scale ? scalar_value(*grad_scale) : 1.0;
  a.has_coef = grad_coef.has_value() && grad_coef->defined();
  a.coef = a.has_coef ? scalar_value(*grad_coef) : 1.0;
  a.write_back = a.has_scale || (a.has_coef && write_grads);
  return a;
}

double step_value(TensorList steps, size_t i) {
  return i < steps.size() ? scalar_value(steps[i]) : 0.0;
}

int64_t param_index(at::IntArrayRef indices, size_t i) {
  return i < indices.size() ? indices[i] : 0;
}

// The rows of the hyperparameter table (float64, kHyperColumns per group, on the CPU).
const double* hyper_rows(const Tensor& hyper, at::IntArrayRef groups) {
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble &&
                  hyper.is_contiguous() && hyper.dim() == 2 && hyper.size(1) == kHyperColumns,
              "fused_optim cpu backend: the hyperparameter table must be a contiguous CPU "
              "float64 tensor of ", kHyperColumns, " columns");
  for (int64_t g : groups) {
    TORCH_CHECK(g >= 0 && g < hyper.size(0), "fused_optim cpu backend: group ", g,
                " has no row in the hyperparameter table");
  }
  return hyper.const_data_ptr<double>();
}

void sgd_(TensorList params, TensorList grads, TensorList momentum_buffers,
          at::IntArrayRef new_buffer_flags, TensorList steps, TensorList master_params,
          const Tensor& hyper, at::IntArrayRef groups, bool has_momentum, bool nesterov,
          bool maximize, bool complex_arithmetic, const std::optional<Tensor>& grad_scale,
          const std::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t seed,
          at::IntArrayRef param_indices, const std::optional<Tensor>& grad_coef,
          bool write_grads) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && groups.size() == count,
              "fused_optim::sgd_: grads, groups and params differ in length");
  TORCH_CHECK(!has_momentum || momentum_buffers.size() == count,
              "fused_optim::sgd_: momentum_buffers and params differ in length");
  if (count == 0 || skipped(found_inf)) return;
  const double* rows = hyper_rows(hyper, groups);
  SgdArgs args{};
  args.has_momentum = has_momentum;
  args.nesterov = nesterov;
  args.maximize = maximize;
  args.complex_arithmetic = complex_arithmetic;
  args.grad = grad_args(grad_scale, grad_coef, write_grads);
  args.stochastic_rounding = stochastic_rounding;
  Plan plan;
  plan.tasks.reserve(count);
  const bool writes[kSlots] = {true, args.grad.write_back, true, true, true, true};
  for (size_t i = 0; i < count; ++i) {
    check_cpu(params[i], "params");
    check_cpu(grads[i], "grads");
    const Tensor* arrays[kSlots] = {};
    arrays[kParam] = &params[i];
    arrays[kGrad] = &grads[i];
    if (has_momentum) arrays[kState0] = &momentum_buffers[i];
    if (!master_params.empty()) arrays[kMaster] = &master_params[i];
    Task& task = plan.add(arrays, writes);
    task.hyper = rows + groups[i] * kHyperColumns;
    task.new_buffer = has_momentum && i < new_buffer_flags.size() && new_buffer_flags[i] != 0;
    if (stochastic_rounding) {
      task.sr_key = sr_key(seed, step_value(steps, i), param_index(param_indices, i));
    }
  }
  plan.run(args, sgd_base, sgd_avx2, sgd_avx512);
}

// How the scalar math around lr is rounded: fp64 for a Python float lr (torch.optim's host
// arithmetic); for a tensor lr, torch.optim's tensor arithmetic in the lr's dtype: fp32 (also
// for an integer lr, which it promotes to the default float dtype), or bf16/fp16, where each
// operation computes in fp32 and rounds to the lr's dtype.
enum LrKind : int64_t { kLrDouble = 0, kLrFloat = 1, kLrBFloat16 = 2, kLrHalf = 3 };

inline float round_to_lr(float x, int64_t lr_kind) {
  if (lr_kind == kLrBFloat16) return static_cast<float>(c10::BFloat16(x));
  if (lr_kind == kLrHalf) return static_cast<float>(c10::Half(x));
  return x;
}

// Adam's per-tensor scalars from its group's row of the hyperparameter table and its step,
// as backends/reference.py computes them: bias corrections in fp64 (Python's float ** is C's
// pow); the scalar math around lr as LrKind says. Consecutive tensors of one group at one step
// share the computation.
struct AdamScalarCache {
  double step = std::nan("");
  const double* row = nullptr;
  double neg_step_size = 0.0, bias_correction2_sqrt = 1.0, decay = 1.0;

  void fill(Task& task, const double* group_row, double task_step, int64_t lr_kind,
            bool tensor_bias_corrections) {
    task.hyper = group_row;
    if (!(task_step == step) || group_row != row) {
      step = task_step;
      row = group_row;
      const double lr_value = row[kHyperLr], weight_decay = row[kHyperWeightDecay];
      const double bias_correction1 = 1.0 - std::pow(row[kHyperBeta1], step);
      const double bc2 = 1.0 - std::pow(row[kHyperBeta2], step);
      bias_correction2_sqrt = tensor_bias_corrections ? std::sqrt(bc2) : std::pow(bc2, 0.5);
      if (lr_kind != kLrDouble) {
        const float lr_f = static_cast<float>(lr_value);
        const float step_size = round_to_lr(lr_f / static_cast<float>(bias_correction1), lr_kind);
        const float product = round_to_lr(lr_f * static_cast<float>(weight_decay), lr_kind);
        neg_step_size = -static_cast<double>(step_size);
        decay = static_cast<double>(round_to_lr(1.0f - product, lr_kind));
      } else {
        neg_step_size = -(lr_value / bias_correction1);
        decay = 1.0 - lr_value * weight_decay;
      }
    }
    task.scalar[0] = neg_step_size;
    task.scalar[1] = bias_correction2_sqrt;
    task.scalar[2] = decay;
  }
};

void adam_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
           TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params,
           const Tensor& hyper, at::IntArrayRef groups, int64_t lr_kind, bool amsgrad,
           bool maximize, bool decoupled_weight_decay, bool tensor_bias_corrections,
           bool complex_arithmetic, const std::optional<Tensor>& grad_scale,
           const std::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t seed,
           at::IntArrayRef param_indices, const std::optional<Tensor>& grad_coef,
           bool write_grads) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count &&
                  exp_avg_sqs.size() == count && steps.size() == count && groups.size() == count,
              "fused_optim::adam_: tensor lists differ in length");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == count,
              "fused_optim::adam_: max_exp_avg_sqs and params differ in length");
  if (count == 0 || skipped(found_inf)) return;
  const double* rows = hyper_rows(hyper, groups);
  AdamArgs args{};
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.decoupled_weight_decay = decoupled_weight_decay;
  args.complex_arithmetic = complex_arithmetic;
  args.grad = grad_args(grad_scale, grad_coef, write_grads);
  args.stochastic_rounding = stochastic_rounding;
  Plan plan;
  plan.tasks.reserve(count);
  const bool writes[kSlots] = {true, args.grad.write_back, true, true, true, true};
  AdamScalarCache scalars;
  for (size_t i = 0; i < count; ++i) {
    check_cpu(params[i], "params");
    check_cpu(grads[i], "grads");
    const Tensor* arrays[kSlots] = {};
    arrays[kParam] = &params[i];
    arrays[kGrad] = &grads[i];
    arrays[kState0] = &exp_avgs[i];
    arrays[kState1] = &exp_avg_sqs[i];
    if (amsgrad) arrays[kState2] = &max_exp_avg_sqs[i];
    if (!master_params.empty()) arrays[kMaster] = &master_params[i];
    Task& task = plan.add(arrays, writes);
    const double step = scalar_value(steps[i]);
    scalars.fill(task, rows + groups[i] * kHyperColumns, step, lr_kind,
                 tensor_bias_corrections);
    if (stochastic_rounding) task.sr_key = sr_key(seed, step, param_index(param_indices, i));
  }
  plan.run(args, adam_base, adam_avx2, adam_avx512);
}

// The reduction of a gradient norm over every grad (kernel_api.h's NormArgs), as a 0-dim fp64
// CPU tensor: the chunks' partials combine in chunk order, so the result depends on neither the
// thread count nor the ISA build.
Tensor grad_norm(TensorList grads, int64_t kind, double p,
                 const std::optional<Tensor>& grad_scale) {
  TORCH_CHECK(kind >= kNormSquares && kind <= kNormMax, "fused_optim::grad_norm: unknown kind ",
              kind);
  NormArgs args{};
  args.kind = static_cast<int>(kind);
  args.p = p;
  args.has_scale = grad_scale.has_value() && grad_scale->defined();
  args.scale = args.has_scale ? scalar_value(*grad_scale) : 1.0;
  Plan plan;
  plan.tasks.reserve(grads.size());
  const bool writes[kSlots] = {false, false, false, false, false, false};
  for (const Tensor& g : grads) {
    check_cpu(g, "grads");
    const Tensor* arrays[kSlots] = {&g, &g, nullptr, nullptr, nullptr, nullptr};
    plan.add(arrays, writes);
  }
  const int64_t num_chunks = static_cast<int64_t>(plan.chunks.size());
  std::vector<double> partials(num_chunks);
  if (num_chunks > 0) {
    const Isa isa = isa_in_use();
    const auto kernel = isa == Isa::kAvx512 ? grad_norm_avx512
                        : isa == Isa::kAvx2 ? grad_norm_avx2
                                            : grad_norm_base;
    kernel(plan.tasks.data(), plan.chunks.data(), num_chunks, args, partials.data());
  }
  double total = 0.0;
  for (double partial : partials) {
    if (kind != kNormMax) {
      total += partial;
    } else if (std::isnan(partial) || std::isnan(total)) {
      total = std::numeric_limits<double>::quiet_NaN();
    } else {
      total = std::max(total, partial);
    }
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

// ------------------------------------------------------------------------------------------
// The host plan: a bucket's tasks and chunks, built once and reused while every tensor keeps its
// address, shape, strides and dtype. Each run reads the grads from the params themselves (no
// tensor lists cross from Python), checks every tensor before touching any, and returns false,
// changing nothing, when a tensor moved or lost its grad (Python then rebuilds). Only buckets
// whose params, states and masters are dense in the param's layout get one; grads of any layout
// are staged per run.

// Whether test(i) holds for every i in [0, count): in parallel over the OpenMP threads when
// there are enough items to pay for waking them. The plans' checks read each tensor's objects
// (TensorImpl, StorageImpl, autograd meta), which a training step finds evicted by the forward
// and backward passes: the cache misses are the check's cost, and each core adds its own misses
// in flight. `test` may run for some items after another has failed. An exception (a tensor
// kind whose strides or sizes cannot be read) counts as a failed check and goes no further (it
// must not leave an OpenMP region): the full path then handles that tensor as torch.optim does.
template <typename Test>
bool all_hold(int64_t count, const Test& test) {
  constexpr int64_t kParallelItems = 256;
  bool holds = true;
#pragma omp parallel for schedule(static) reduction(&& : holds) if (count >= kParallelItems)
  for (int64_t i = 0; i < count; ++i) {
    if (!holds) continue;
    try {
      holds = test(i);
    } catch (...) {
      holds = false;
    }
  }
  return holds;
}

// Where a tensor's elements start, read from its TensorImpl and StorageImpl with inline
// accessors (no virtual call; a Signatures check runs this for every tensor of a plan each
// step): the storage's address plus the offset; 0 for a tensor without storage. Only compared
// with itself (a signature), never handed to a kernel.
inline uintptr_t start_address(const c10::TensorImpl& t) {
  const c10::StorageImpl* storage = t.unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr) return 0;
  return reinterpret_cast<uintptr_t>(storage->data()) +
         static_cast<uintptr_t>(t.storage_offset()) * t.itemsize();
}

// A param's grad as the optimizer reads it (`p.grad`), from its autograd metadata directly;
// nullptr where there is none.
inline const Tensor* grad_of(const c10::TensorImpl& param) {
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(param.autograd_meta());
  return meta == nullptr || !meta->grad_.defined() ? nullptr : &meta->grad_;
}

inline bool same_values(c10::IntArrayRef values, const int64_t* expected) {
  for (size_t d = 0; d < values.size(); ++d) {
    if (values[d] != expected[d]) return false;
  }
  return true;
}

// The signatures (address, numel, dtype, sizes, strides) of a list of tensors, in two flat
// arrays instead of a heap vector per tensor: check() walks them in order every step, so they
// stream from memory while the tensors' own objects (the cold part) cost their cache misses.
class Signatures {
 public:
  void add(const Tensor& tensor) {
    const c10::TensorImpl& t = *tensor.unsafeGetTensorImpl();
    const int64_t dim = t.dim();
    heads_.push_back(Head{start_address(t), t.numel(), dim, shapes_.size(), t.dtype()});
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    shapes_.insert(shapes_.end(), sizes.begin(), sizes.end());
    shapes_.insert(shapes_.end(), strides.begin(), strides.end());
  }

  // Whether tensor `t` still has the signature added `i`-th.
  bool holds(size_t i, const Tensor& tensor) const {
    const c10::TensorImpl& t = *tensor.unsafeGetTensorImpl();
    const Head& head = heads_[i];
    if (start_address(t) != head.address || t.numel() != head.numel || t.dtype() != head.dtype ||
        t.dim() != head.dim)
      return false;
    const int64_t* shape = shapes_.data() + head.offset;
    return same_values(t.sizes(), shape) && same_values(t.strides(), shape + head.dim);
  }

  // Whether tensor `t` has the sizes and strides of the signature added `i`-th (a grad in its
  // param's layout).
  bool same_shape(size_t i, const c10::TensorImpl& t) const {
    const Head& head = heads_[i];
    if (t.dim() != head.dim) return false;
    const int64_t* shape = shapes_.data() + head.offset;
    return same_values(t.sizes(), shape) && same_values(t.strides(), shape + head.dim);
  }

 private:
  struct Head {
    uintptr_t address;
    int64_t numel, dim;
    size_t offset;  // of the sizes, then the strides, in shapes_
    caffe2::TypeMeta dtype;
  };
  std::vector<Head> heads_;
  std::vector<int64_t> shapes_;
};

class HostPlan {
 public:
  static std::shared_ptr<HostPlan> create(
      std::vector<Tensor> params, std::vector<std::vector<Tensor>> states,
      std::vector<Tensor> masters, std::vector<Tensor> steps, std::vector<int64_t> groups,
      std::vector<int64_t> indices, bool adam, bool amsgrad_or_momentum, bool maximize,
      bool decoupled_or_nesterov, bool tensor_bias_corrections, int64_t lr_kind,
      bool stochastic_rounding, int64_t seed) {
    auto plan = std::shared_ptr<HostPlan>(new HostPlan());
    HostPlan& h = *plan;
    const size_t count = params.size();
    if (groups.size() != count || (!steps.empty() && steps.size() != count) ||
        (!masters.empty() && masters.size() != count))
      return nullptr;
    for (const auto& column : states)
      if (column.size() != count) return nullptr;
    h.adam_ = adam;
    h.lr_kind_ = lr_kind;
    h.tensor_bias_corrections_ = tensor_bias_corrections;
    h.seed_ = seed;
    h.stochastic_rounding_ = stochastic_rounding;
    h.adam_args_ = AdamArgs{};
    h.adam_args_.amsgrad = amsgrad_or_momentum;
    h.adam_args_.maximize = maximize;
    h.adam_args_.decoupled_weight_decay = decoupled_or_nesterov;
    h.adam_args_.stochastic_rounding = stochastic_rounding;
    h.sgd_args_ = SgdArgs{};
    h.sgd_args_.has_momentum = amsgrad_or_momentum;
    h.sgd_args_.nesterov = decoupled_or_nesterov;
    h.sgd_args_.maximize = maximize;
    h.sgd_args_.stochastic_rounding = stochastic_rounding;
    h.plan_.tasks.reserve(count);
    const bool writes[kSlots] = {true, false, true, true, true, true};
    for (size_t i = 0; i < count; ++i) {
      const Tensor& p = params[i];
      if (!p.device().is_cpu() || p.is_sparse() || !is_dense(p)) return nullptr;
      const Tensor* arrays[kSlots] = {};
      arrays[kParam] = &p;
      for (size_t s = 0; s < states.size(); ++s) {
        const Tensor& t = states[s][i];
        if (!t.defined() || !is_dense(t) || !same_layout(t, p)) return nullptr;
        arrays[kState0 + s] = &t;
      }
      if (!masters.empty()) {
        if (!is_dense(masters[i]) || !same_layout(masters[i], p)) return nullptr;
        arrays[kMaster] = &masters[i];
      }
      for (int s = 0; s < kSlots; ++s) {
        if (arrays[s] != nullptr) dtype_code(*arrays[s], "a tensor");  // throws if unsupported
      }
      h.plan_.add(arrays, writes);
      h.signatures_.add(p);
      // The grad dtype the full step checked (torch.optim's rules): another one takes the full
      // path again, which raises torch's error where torch would.
      h.grad_dtypes_.push_back(p.grad().defined() ? p.grad().scalar_type() : at::kFloat);
      for (const auto& column : states) h.held_.push_back(column[i]);
      if (!masters.empty()) h.held_.push_back(masters[i]);
    }
    for (const Tensor& t : h.held_) h.held_signatures_.add(t);
    // The step counts are read where they are: one moved by `.data` is no longer the view of
    // the step buffer that the optimizer advances (the full step gathers it again).
    for (const Tensor& t : steps) {
      if (t.numel() != 1 || !t.device().is_cpu()) return nullptr;
      h.step_addresses_.push_back(t.const_data_ptr());
      h.step_dtypes_.push_back(t.scalar_type());
    }
    h.params_ = std::move(params);
    h.steps_ = std::move(steps);
    h.groups_ = std::move(groups);
    h.indices_ = std::move(indices);
    return plan;
  }

  // Whether the plan still holds: every param and state keeps its signature and every param has
  // a dense CPU grad of its shape (any other shape is torch.optim's broadcast, or its error: the
  // full step decides). Changes nothing.
  // The grads it found are kept for the run() that follows in the same step.
  // What run() needs of each grad (its address and dtype, or that it must be staged) and of
  // each step (its address and dtype) is recorded here, so that run() walks these arrays and
  // not the tensors again: between steps the forward and backward passes evict the tensors'
  // objects, and every visit costs cache misses.
  bool check() const {
    const size_t count = params_.size();
    grads_.resize(count);
    grad_data_.resize(count);
    grad_codes_.resize(count);
    const size_t held_per_param = count == 0 ? 0 : held_.size() / count;
    return all_hold(static_cast<int64_t>(count), [&](int64_t i) {
      const Tensor& p = params_[i];
      if (!signatures_.holds(i, p)) return false;
      const Tensor* grad = grad_of(*p.unsafeGetTensorImpl());
      if (grad == nullptr) return false;
      const Tensor& g = *grad;
      if (g.is_sparse() || !g.device().is_cpu() || g.sizes() != p.sizes()) return false;
      if (g.scalar_type() != grad_dtypes_[i]) return false;  // supported: dtype_code can't throw
      grads_[i] = &g;
      const bool direct =
          signatures_.same_shape(i, *g.unsafeGetTensorImpl()) || (is_dense(g) && same_layout(g, p));
      grad_data_[i] = direct ? g.data_ptr() : nullptr;  // nullptr: staged by run()
      grad_codes_[i] = direct ? dtype_code(g, "a grad") : kNone;
      for (size_t k = i * held_per_param; k < (i + 1) * held_per_param; ++k) {
        if (!held_signatures_.holds(k, held_[k])) return false;
      }
      if (steps_.empty()) return true;
      const Tensor& step = steps_[i];
      return step.const_data_ptr() == step_addresses_[i] && step.scalar_type() == step_dtypes_[i];
    });
  }

  // The value of step i, at the address check() verified.
  double step_at(size_t i) const {
    switch (step_dtypes_[i]) {
      case at::kFloat:
        return *static_cast<const float*>(step_addresses_[i]);
      case at::kDouble:
        return *static_cast<const double*>(step_addresses_[i]);
      default:
        return scalar_value(steps_[i]);
    }
  }

  // One step of the bucket (after check() said the plan holds).
  void run(const Tensor& hyper, const std::optional<Tensor>& grad_scale,
           const std::optional<Tensor>& found_inf, const std::optional<Tensor>& grad_coef,
           bool write_grads) {
    const size_t count = params_.size();
    const double* rows = hyper_rows(hyper, groups_);
    if (skipped(found_inf)) return;
    const GradArgs grad = grad_args(grad_scale, grad_coef, write_grads);
    Staging& staging = plan_.staging;
    AdamScalarCache scalars;
    for (size_t i = 0; i < count; ++i) {
      Task& task = plan_.tasks[i];
      if (task.numel == 0) continue;
      if (grad_data_[i] != nullptr) {
        task.data[kGrad] = grad_data_[i];
        task.dtype[kGrad] = grad_codes_[i];
      } else {
        const Tensor& used = staging.resolve(*grads_[i], params_[i], grad.write_back);
        task.data[kGrad] = used.data_ptr();
        task.dtype[kGrad] = dtype_code(used, "a grad");
      }
      const double* row = rows + groups_[i] * kHyperColumns;
      const double step = steps_.empty() ? 0.0 : step_at(i);
      if (adam_) {
        scalars.fill(task, row, step, lr_kind_, tensor_bias_corrections_);
      } else {
        task.hyper = row;
      }
      if (stochastic_rounding_) {
        task.sr_key = sr_key(seed_, step, i < indices_.size() ? indices_[i] : 0);
      }
    }
    if (adam_) {
      AdamArgs args = adam_args_;
      args.grad = grad;
      plan_.run(args, adam_base, adam_avx2, adam_avx512);
    } else {
      SgdArgs args = sgd_args_;
      args.grad = grad;
      plan_.run(args, sgd_base, sgd_avx2, sgd_avx512);
    }
  }

  int64_t size() const { return static_cast<int64_t>(params_.size()); }

 private:
  HostPlan() = default;
  Plan plan_;
  std::vector<Tensor> params_, steps_, held_;
  Signatures signatures_, held_signatures_;
  std::vector<const void*> step_addresses_;
  std::vector<at::ScalarType> step_dtypes_;
  std::vector<at::ScalarType> grad_dtypes_;
  // Found by check(), read by run(): each grad, and its address and dtype code when the kernel
  // walks it in place (nullptr: it is staged).
  mutable std::vector<const Tensor*> grads_;
  mutable std::vector<void*> grad_data_;
  mutable std::vector<int8_t> grad_codes_;
  std::vector<int64_t> groups_, indices_;
  AdamArgs adam_args_{};
  SgdArgs sgd_args_{};
  bool adam_ = true, tensor_bias_corrections_ = false;
  int64_t lr_kind_ = kLrDouble;
  bool stochastic_rounding_ = false;
  int64_t seed_ = 0;
};

void advance_hyper_table(Tensor& table, Tensor& base_steps, bool adam);

// The per-step host work of a table-walking backend (Triton, CUDA): checks that every param and
// held tensor (states, masters, steps) kept its signature and that every param has a grad the
// kernel can walk in place (dense, the param's layout, device and the bucket's grad dtype), and
// writes the grads' addresses into a fresh host table. Grads needing staging fail the check (the
// full path stages them).
class GradTable {
 public:
  // `step_values`, where given: the host step counts (one contiguous CPU tensor of any real
  // dtype) whose values check() also compares with those the table expects, which start at
  // their values now and advance() moves by one per step.
  GradTable(std::vector<Tensor> params, std::vector<Tensor> held, at::ScalarType grad_dtype,
            std::optional<Tensor> step_values)
      : params_(std::move(params)),
        held_(std::move(held)),
        grad_dtype_(c10::scalarTypeToTypeMeta(grad_dtype)) {
    if (!params_.empty()) device_ = params_[0].device();
    for (const Tensor& p : params_) signatures_.add(p);
    for (const Tensor& t : held_) held_signatures_.add(t);
    last_.assign(params_.size(), nullptr);
    if (step_values.has_value()) {
      const Tensor& values = *step_values;
      TORCH_CHECK(values.device().is_cpu() && values.is_contiguous() && !values.is_complex() &&
                      values.scalar_type() != at::kBool,
                  "GradTable: step_values must be a contiguous CPU tensor of real numbers");
      step_values_ = values;
      step_signature_.add(values);
      expected_.resize(values.numel());
      for (int64_t i = 0; i < values.numel(); ++i) expected_[i] = step_value(values, i);
    }
  }

  // Also records the grads' addresses, for the pointers() call that follows.
  bool check() const {
    found_.resize(params_.size());
    has_found_ = false;
    has_found_ = all_hold(static_cast<int64_t>(params_.size()), [&](int64_t i) {
      const Tensor& p = params_[i];
      if (!signatures_.holds(i, p)) return false;
      const Tensor* grad = grad_of(*p.unsafeGetTensorImpl());
      if (grad == nullptr) return false;
      const c10::TensorImpl& g = *grad->unsafeGetTensorImpl();
      if (g.is_sparse() || g.dtype() != grad_dtype_ || g.device() != device_) return false;
      if (!signatures_.same_shape(i, g) && !(is_dense(*grad) && same_layout(*grad, p)))
        return false;
      found_[i] = grad->data_ptr();
      return true;
    }) && all_hold(static_cast<int64_t>(held_.size()), [&](int64_t k) {
      return held_signatures_.holds(k, held_[k]);
    }) && steps_hold();
    return has_found_;
  }

  // One host step taken: the step counts check() expects, every group's base step and the
  // hyperparameter table advance by one (advance_hyper_table).
  void advance(Tensor& table, Tensor& base_steps, bool adam) {
    advance_hyper_table(table, base_steps, adam);
    // Rounded to the counts' own dtype, as the optimizer's in-place add advances them.
    if (!step_values_.defined()) return;
    const auto dtype = step_values_.scalar_type();
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "GradTable.advance", [&] {
      using opmath = at::opmath_type<scalar_t>;
      for (double& value : expected_) {
        value = static_cast<double>(static_cast<scalar_t>(static_cast<opmath>(value) + 1));
      }
    });
  }

  // Writes the addresses of the grads the last check() found (read again without one) into
  // `out` (int64, contiguous, one per param) when any changed since the last call; returns
  // whether it did.
  bool pointers(Tensor& out) {
    if (!has_found_) {
      found_.resize(params_.size());
      for (size_t i = 0; i < params_.size(); ++i) found_[i] = params_[i].grad().data_ptr();
    }
    if (found_ == last_) return false;
    TORCH_CHECK(out.scalar_type() == at::kLong && out.is_contiguous() &&
                    out.numel() == static_cast<int64_t>(params_.size()) && out.device().is_cpu(),
                "GradTable.pointers: out must be a contiguous CPU int64 tensor, one per param");
    int64_t* table = out.data_ptr<int64_t>();
    for (size_t i = 0; i < params_.size(); ++i) {
      table[i] = reinterpret_cast<int64_t>(found_[i]);
    }
    last_ = found_;
    return true;
  }

  // Whether every address the last pointers() call wrote is a multiple of 16 bytes (the
  // kernels' vector loads).
  bool aligned() const {
    return std::all_of(last_.begin(), last_.end(), [](const void* address) {
      return reinterpret_cast<uintptr_t>(address) % 16 == 0;
    });
  }

  // Forget the last addresses (the next pointers() call writes the table).
  void reset() { last_.assign(params_.size(), nullptr); }

 private:
  static double step_value(const Tensor& values, int64_t i) {
    double value = 0.0;
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "GradTable", [&] {
      value = static_cast<double>(values.const_data_ptr<scalar_t>()[i]);
    });
    return value;
  }

  // Whether the host step counts are where they were, with the values expected (one dtype
  // dispatch for the whole buffer, not one per count).
  bool steps_hold() const {
    if (!step_values_.defined()) return true;
    if (!step_signature_.holds(0, step_values_)) return false;
    bool equal = true;
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, step_values_.scalar_type(), "GradTable",
                               [&] {
                                 const scalar_t* counts = step_values_.const_data_ptr<scalar_t>();
                                 for (size_t i = 0; i < expected_.size() && equal; ++i) {
                                   equal = static_cast<double>(counts[i]) == expected_[i];
                                 }
                               });
    return equal;
  }

  std::vector<Tensor> params_, held_;
  Signatures signatures_, held_signatures_;
  std::vector<const void*> last_;
  // The grads' addresses the last check() found (has_found_: it succeeded).
  mutable std::vector<const void*> found_;
  mutable bool has_found_ = false;
  caffe2::TypeMeta grad_dtype_;
  c10::Device device_{c10::kCPU};
  Tensor step_values_;
  Signatures step_signature_;
  std::vector<double> expected_;
};

// Adam's bias corrections in a hyperparameter table (float64, kHyperColumns per group, CPU), from
// each row's betas and base step, in place: 1 - beta1^t and (1 - beta2^t)^0.5 with C's pow, which
// is what Python's float ** computes (backends/plan.py's hyper_rows writes the same bits).
void adam_bias_corrections(Tensor& table) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kDouble &&
                  table.is_contiguous() && table.dim() == 2 && table.size(1) == kHyperColumns,
              "adam_bias_corrections: expected a contiguous CPU float64 table of ", kHyperColumns,
              " columns");
  double* row = table.data_ptr<double>();
  const double* previous = nullptr;
  for (int64_t g = 0; g < table.size(0); ++g, row += kHyperColumns) {
    const double step = row[kHyperBaseStep];
    if (previous != nullptr && previous[kHyperBeta1] == row[kHyperBeta1] &&
        previous[kHyperBeta2] == row[kHyperBeta2] && previous[kHyperBaseStep] == step) {
      // Groups that differ in lr or weight decay only (one group per param, layer-wise lr):
      // the same bits, without three pow calls per group.
      row[kHyperBiasCorrection1] = previous[kHyperBiasCorrection1];
      row[kHyperBiasCorrection2Sqrt] = previous[kHyperBiasCorrection2Sqrt];
    } else {
      row[kHyperBiasCorrection1] = 1.0 - std::pow(row[kHyperBeta1], step);
      row[kHyperBiasCorrection2Sqrt] = std::pow(1.0 - std::pow(row[kHyperBeta2], step), 0.5);
    }
    previous = row;
  }
}

// One host step of a launch plan's hyperparameter table, in place: every group's base step
// (`base_steps`, float64, one per row) advances by one, and `table` (the groups' values,
// float64) gets the new base steps and, for Adam, the bias corrections at them.
void advance_hyper_table(Tensor& table, Tensor& base_steps, bool adam) {
  TORCH_CHECK(base_steps.device().is_cpu() && base_steps.scalar_type() == at::kDouble &&
                  base_steps.is_contiguous() && base_steps.dim() == 1 && table.dim() == 2 &&
                  base_steps.size(0) == table.size(0) && table.device().is_cpu() &&
                  table.is_contiguous() && table.scalar_type() == at::kDouble &&
                  table.size(1) == kHyperColumns,
              "advance_hyper_table: expected a contiguous CPU float64 table of ", kHyperColumns,
              " columns and one contiguous CPU float64 base step per row");
  double* base = base_steps.data_ptr<double>();
  double* row = table.data_ptr<double>();
  for (int64_t g = 0; g < table.size(0); ++g, row += kHyperColumns) {
    base[g] += 1.0;
    row[kHyperBaseStep] = base[g];
  }
  if (adam) adam_bias_corrections(table);
}

// Adds one to every step-count buffer in place, as torch's in-place add does (same bits, the
// version counter bumped), where every buffer is a contiguous CPU float32 or float64 tensor;
// returns false, changing nothing, otherwise (the caller adds with torch). One call per step
// instead of a torch operation's dispatch.
bool advance_steps(std::vector<Tensor> buffers) {
  for (const Tensor& b : buffers) {
    const auto dtype = b.scalar_type();
    if (!b.device().is_cpu() || !b.is_contiguous() || b.is_inference() || b.requires_grad() ||
        (dtype != at::kFloat && dtype != at::kDouble))
      return false;
  }
  for (Tensor& b : buffers) {
    const int64_t n = b.numel();
    if (b.scalar_type() == at::kFloat) {
      float* count = b.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) count[i] += 1.0f;
    } else {
      double* count = b.data_ptr<double>();
      for (int64_t i = 0; i < n; ++i) count[i] += 1.0;
    }
    b.unsafeGetTensorImpl()->bump_version();
  }
  return true;
}

// Asks for the cache line at `address` (a hint: no fault, no effect on results).
inline void prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address);
#else
  (void)address;
#endif
}

// Whether the optimizer's state still holds what a step plan was built from: the same state
// dicts (in insertion order) and, in each of the dicts the plan uses, the same entries (in
// insertion order: a value replaced, added or deleted counts as a change). Identity checks on
// PyObject pointers, no hashing: no Tensor.__hash__ (a Python method) is called.
bool state_unchanged(const pybind11::dict& state, const std::vector<intptr_t>& dict_ids,
                     const pybind11::list& dicts, const std::vector<intptr_t>& entry_ids) {
  if (static_cast<size_t>(PyDict_Size(state.ptr())) != dict_ids.size()) return false;
  Py_ssize_t position = 0;
  PyObject *key = nullptr, *value = nullptr;
  size_t k = 0;
  while (PyDict_Next(state.ptr(), &position, &key, &value)) {
    if (reinterpret_cast<intptr_t>(value) != dict_ids[k++]) return false;
  }
  // entry_ids: for each dict, its number of entries, then the ids of its values.
  size_t e = 0;
  const Py_ssize_t count = PyList_GET_SIZE(dicts.ptr());
  // Each dict costs two dependent cache misses (the dict, then its table of entries) once the
  // forward and backward passes have evicted them: both are asked for ahead (the dicts are
  // ours, kept alive by the list, so the table pointer read ahead is a dict's).
  constexpr Py_ssize_t kAhead = 8;
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (i + 2 * kAhead < count) prefetch(PyList_GET_ITEM(dicts.ptr(), i + 2 * kAhead));
    if (i + kAhead < count) {
      PyObject* ahead = PyList_GET_ITEM(dicts.ptr(), i + kAhead);
      if (PyDict_Check(ahead)) {
        const char* table = reinterpret_cast<const char*>(
            reinterpret_cast<PyDictObject*>(ahead)->ma_keys);
        prefetch(table);
        prefetch(table + 64);
      }
    }
    PyObject* entries = PyList_GET_ITEM(dicts.ptr(), i);
    if (!PyDict_Check(entries) || e >= entry_ids.size()) return false;
    if (PyDict_Size(entries) != entry_ids[e++]) return false;
    position = 0;
    while (PyDict_Next(entries, &position, &key, &value)) {
      if (e >= entry_ids.size() || reinterpret_cast<intptr_t>(value) != entry_ids[e++]) {
        return false;
      }
    }
  }
  return e == entry_ids.size();
}

// Whether every param group still holds the very objects of `values` (one tuple of the group's
// values per group, in order): identity, so that any value written since counts as changed. A
// list value (betas given as a list) is recorded as a tuple of its items, compared item by item.
bool values_unchanged(const pybind11::list& groups, const pybind11::list& values) {
  const Py_ssize_t count = PyList_GET_SIZE(groups.ptr());
  if (count != PyList_GET_SIZE(values.ptr())) return false;
  for (Py_ssize_t g = 0; g < count; ++g) {
    PyObject* group = PyList_GET_ITEM(groups.ptr(), g);
    PyObject* expected = PyList_GET_ITEM(values.ptr(), g);
    if (!PyDict_Check(group) || !PyTuple_Check(expected)) return false;
    if (PyDict_Size(group) != PyTuple_GET_SIZE(expected)) return false;
    Py_ssize_t position = 0, k = 0;
    PyObject *key = nullptr, *value = nullptr;
    while (PyDict_Next(group, &position, &key, &value)) {
      PyObject* recorded = PyTuple_GET_ITEM(expected, k++);
      if (value == recorded) continue;
      if (!PyList_Check(value) || !PyTuple_Check(recorded)) return false;
      const Py_ssize_t n = PyList_GET_SIZE(value);
      if (n != PyTuple_GET_SIZE(recorded)) return false;
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (PyList_GET_ITEM(value, i) != PyTuple_GET_ITEM(recorded, i)) return false;
      }
    }
  }
  return true;
}

// Whether the param groups (the optimizer's list of group dicts) still list the same params
// (`ids`, flat over the groups) and those recorded without a grad still have none. The params
// recorded with one are in a bucket whose host step (HostPlan, GradTable) checks their grads
// next (the fast path exists only where every bucket has one): reading them here too would
// visit every param's autograd metadata once more.
bool params_unchanged(const pybind11::list& param_groups, const std::vector<intptr_t>& ids,
                      const std::vector<bool>& with_grad) {
  size_t k = 0;
  const Py_ssize_t groups = PyList_GET_SIZE(param_groups.ptr());
  for (Py_ssize_t g = 0; g < groups; ++g) {
    PyObject* group = PyList_GET_ITEM(param_groups.ptr(), g);
    if (!PyDict_Check(group)) return false;
    static PyObject* const params_key = PyUnicode_InternFromString("params");
    PyObject* params = PyDict_GetItem(group, params_key);  // borrowed
    if (params == nullptr || !PyList_Check(params)) return false;
    const Py_ssize_t n = PyList_GET_SIZE(params);
    for (Py_ssize_t i = 0; i < n; ++i, ++k) {
      PyObject* p = PyList_GET_ITEM(params, i);
      if (k >= ids.size() || reinterpret_cast<intptr_t>(p) != ids[k]) return false;
      // The same object as recorded (StepChecks keeps them alive, so no other object has its
      // id): a tensor, read only where it must still have no grad.
      if (!with_grad[k] && (!THPVariable_Check(p) || THPVariable_Unpack(p).grad().defined()))
        return false;
    }
  }
  return k == ids.size();
}

// What the optimizer's compiled fast path checks before each step, recorded once per step
// plan (no list converted per step): the params of every group (`params`, flat over the
// groups: identity, and which have a grad), the state dicts and their entries (see
// params_unchanged and state_unchanged). It keeps the params and dicts alive, so that an
// identity it compares with stays theirs.
class StepChecks {
 public:
  StepChecks(pybind11::list params, std::vector<bool> with_grad, std::vector<intptr_t> dict_ids,
             pybind11::list dicts, std::vector<intptr_t> entry_ids)
      : params_(std::move(params)), with_grad_(std::move(with_grad)),
        dict_ids_(std::move(dict_ids)), dicts_(std::move(dicts)),
        entry_ids_(std::move(entry_ids)) {
    for (const auto& p : params_) param_ids_.push_back(reinterpret_cast<intptr_t>(p.ptr()));
  }

  bool holds(const pybind11::list& param_groups, const pybind11::dict& state) const {
    return params_unchanged(param_groups, param_ids_, with_grad_) &&
           state_unchanged(state, dict_ids_, dicts_, entry_ids_);
  }

 private:
  pybind11::list params_;
  std::vector<intptr_t> param_ids_;
  std::vector<bool> with_grad_;
  std::vector<intptr_t> dict_ids_;
  pybind11::list dicts_;
  std::vector<intptr_t> entry_ids_;
};

}  // namespace
}  // namespace cpu
}  // namespace fused_optim

// A fragment, so that other extensions of this package may add operators to the namespace.
TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "int[] new_buffer_flags, Tensor[] steps, Tensor(d!)[] master_params, Tensor hyper, "
      "int[] groups, bool has_momentum, bool nesterov, bool maximize, bool complex_arithmetic, "
      "Tensor? grad_scale, Tensor? found_inf, bool stochastic_rounding, int seed, "
      "int[] param_indices, Tensor? grad_coef=None, bool write_grads=False) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] steps, "
      "Tensor(f!)[] master_params, Tensor hyper, int[] groups, int lr_kind, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, bool tensor_bias_corrections, "
      "bool complex_arithmetic, Tensor? grad_scale, Tensor? found_inf, "
      "bool stochastic_rounding, int seed, int[] param_indices, Tensor? grad_coef=None, "
      "bool write_grads=False) -> ()");
  m.def("grad_norm(Tensor[] grads, int kind, float p, Tensor? grad_scale) -> Tensor");
  m.def("cpu_isa() -> str", [] { return fused_optim::cpu::isa(); });
  m.def("cpu_set_isa(str isa) -> str",
        [](std::string isa) { return fused_optim::cpu::set_isa(isa); });
  m.def("cpu_supported_isas() -> str[]", [] {
    return c10::List<std::string>(fused_optim::cpu::supported_isas());
  });
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("sgd_", &fused_optim::cpu::sgd_);
  m.impl("adam_", &fused_optim::cpu::adam_);
  m.impl("grad_norm", &fused_optim::cpu::grad_norm);
}

// The Python module: loading it registers the operators (torch.ops.fused_optim); it also holds
// the host plan and the step checks of the optimizer's compiled fast path.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using fused_optim::cpu::HostPlan;
  py::class_<HostPlan, std::shared_ptr<HostPlan>>(m, "HostPlan")
      .def_static("create", &HostPlan::create)
      .def("check", &HostPlan::check)
      .def("run", &HostPlan::run)
      .def("__len__", &HostPlan::size);
  py::class_<fused_optim::cpu::GradTable, std::shared_ptr<fused_optim::cpu::GradTable>>(
      m, "GradTable")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, at::ScalarType,
                    std::optional<at::Tensor>>(),
           py::arg("params"), py::arg("held"), py::arg("grad_dtype"),
           py::arg("step_values") = py::none())
      .def("check", &fused_optim::cpu::GradTable::check)
      .def("advance", &fused_optim::cpu::GradTable::advance)
      .def("pointers", &fused_optim::cpu::GradTable::pointers)
      .def("aligned", &fused_optim::cpu::GradTable::aligned)
      .def("reset", &fused_optim::cpu::GradTable::reset);
  m.def("advance_steps", &fused_optim::cpu::advance_steps);
  py::class_<fused_optim::cpu::StepChecks, std::shared_ptr<fused_optim::cpu::StepChecks>>(
      m, "StepChecks")
      .def(py::init<py::list, std::vector<bool>, std::vector<intptr_t>, py::list,
                    std::vector<intptr_t>>())
      .def("holds", &fused_optim::cpu::StepChecks::holds);
  m.def("adam_bias_corrections", &fused_optim::cpu::adam_bias_corrections);
  m.def("values_unchanged", &fused_optim::cpu::values_unchanged);
}
