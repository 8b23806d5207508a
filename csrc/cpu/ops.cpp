// Host side of the fused CPU backend: the fused_optim::sgd_ / fused_optim::adam_ operators.
//
// One call updates every tensor of a group: the host turns the tensor lists into a task per
// tensor (addresses, dtypes, per-tensor scalars computed in fp64 as backends/reference.py does)
// and a chunk list over ALL tensors (kChunk elements each); the kernel runs one OpenMP parallel
// region over the chunk list. Tensors the kernel cannot walk in the param's memory order (a
// strided param, or a grad/state/master of another layout) are staged through a dense copy.
#include <Python.h>

#include <cmath>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

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

double step_value(TensorList steps, size_t i) {
  return i < steps.size() ? scalar_value(steps[i]) : 0.0;
}

int64_t param_index(at::IntArrayRef indices, size_t i) {
  return i < indices.size() ? indices[i] : 0;
}

void sgd_(TensorList params, TensorList grads, TensorList momentum_buffers,
          at::IntArrayRef new_buffer_flags, TensorList steps, TensorList master_params,
          const std::optional<Tensor>& lr_tensor, double lr, double momentum, double dampening,
          double weight_decay, bool nesterov, bool maximize,
          const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
          bool stochastic_rounding, int64_t seed, at::IntArrayRef param_indices) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count, "fused_optim::sgd_: grads and params differ in length");
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || momentum_buffers.size() == count,
              "fused_optim::sgd_: momentum_buffers and params differ in length");
  if (count == 0 || skipped(found_inf)) return;
  SgdArgs args{};
  args.lr = lr_tensor.has_value() && lr_tensor->defined() ? scalar_value(*lr_tensor) : lr;
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.has_momentum = has_momentum;
  args.nesterov = nesterov;
  args.maximize = maximize;
  args.has_grad_scale = grad_scale.has_value() && grad_scale->defined();
  args.grad_scale = args.has_grad_scale ? scalar_value(*grad_scale) : 1.0;
  args.stochastic_rounding = stochastic_rounding;
  Plan plan;
  plan.tasks.reserve(count);
  const bool writes[kSlots] = {true, args.has_grad_scale, true, true, true, true};
  for (size_t i = 0; i < count; ++i) {
    check_cpu(params[i], "params");
    check_cpu(grads[i], "grads");
    const Tensor* arrays[kSlots] = {};
    arrays[kParam] = &params[i];
    arrays[kGrad] = &grads[i];
    if (has_momentum) arrays[kState0] = &momentum_buffers[i];
    if (!master_params.empty()) arrays[kMaster] = &master_params[i];
    Task& task = plan.add(arrays, writes);
    task.new_buffer = has_momentum && i < new_buffer_flags.size() && new_buffer_flags[i] != 0;
    if (stochastic_rounding) {
      task.sr_key = sr_key(seed, step_value(steps, i), param_index(param_indices, i));
    }
  }
  plan.run(args, sgd_base, sgd_avx2, sgd_avx512);
}

void adam_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
           TensorList max_exp_avg_sqs, TensorList steps, TensorList master_params,
           const std::optional<Tensor>& lr_tensor, double lr, double beta1, double beta2,
           double eps, double weight_decay, bool amsgrad, bool maximize,
           bool decoupled_weight_decay, bool tensor_bias_corrections,
           const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
           bool stochastic_rounding, int64_t seed, at::IntArrayRef param_indices) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count &&
                  exp_avg_sqs.size() == count && steps.size() == count,
              "fused_optim::adam_: tensor lists differ in length");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == count,
              "fused_optim::adam_: max_exp_avg_sqs and params differ in length");
  if (count == 0 || skipped(found_inf)) return;
  AdamArgs args{};
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.decoupled_weight_decay = decoupled_weight_decay;
  args.has_grad_scale = grad_scale.has_value() && grad_scale->defined();
  args.grad_scale = args.has_grad_scale ? scalar_value(*grad_scale) : 1.0;
  args.stochastic_rounding = stochastic_rounding;
  // The scalar math around lr runs in fp64 for a float lr (torch.optim's host arithmetic) and
  // in the lr tensor's dtype for a tensor lr (torch.optim's tensor arithmetic).
  const bool lr_is_tensor = lr_tensor.has_value() && lr_tensor->defined();
  const bool lr_in_float = lr_is_tensor && lr_tensor->scalar_type() != at::kDouble;
  const double lr_value = lr_is_tensor ? scalar_value(*lr_tensor) : lr;
  Plan plan;
  plan.tasks.reserve(count);
  const bool writes[kSlots] = {true, args.has_grad_scale, true, true, true, true};
  double cached_step = std::nan("");
  double neg_step_size = 0.0, bias_correction2_sqrt = 1.0, decay = 1.0;
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
    if (!(step == cached_step)) {
      // As backends/reference.py: bias corrections in fp64 (Python's float ** is C's pow).
      cached_step = step;
      const double bias_correction1 = 1.0 - std::pow(beta1, step);
      const double bc2 = 1.0 - std::pow(beta2, step);
      bias_correction2_sqrt = tensor_bias_corrections ? std::sqrt(bc2) : std::pow(bc2, 0.5);
      if (lr_in_float) {
        const float lr_f = static_cast<float>(lr_value);
        neg_step_size = static_cast<double>(-(lr_f / static_cast<float>(bias_correction1)));
        decay = static_cast<double>(1.0f - lr_f * static_cast<float>(weight_decay));
      } else {
        neg_step_size = -(lr_value / bias_correction1);
        decay = 1.0 - lr_value * weight_decay;
      }
    }
    task.scalar[0] = neg_step_size;
    task.scalar[1] = bias_correction2_sqrt;
    task.scalar[2] = decay;
    if (stochastic_rounding) task.sr_key = sr_key(seed, step, param_index(param_indices, i));
  }
  plan.run(args, adam_base, adam_avx2, adam_avx512);
}

}  // namespace
}  // namespace cpu
}  // namespace fused_optim

// A fragment, so that other extensions of this package may add operators to the namespace.
TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "int[] new_buffer_flags, Tensor[] steps, Tensor(d!)[] master_params, Tensor? lr_tensor, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, Tensor? grad_scale, Tensor? found_inf, bool stochastic_rounding, "
      "int seed, int[] param_indices) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] steps, "
      "Tensor(f!)[] master_params, Tensor? lr_tensor, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, bool tensor_bias_corrections, Tensor? grad_scale, "
      "Tensor? found_inf, bool stochastic_rounding, int seed, int[] param_indices) -> ()");
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
}

// The Python module only loads the library (the operators live in torch.ops.fused_optim).
static struct PyModuleDef fused_optim_cpu_module = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr,
                                                     -1, nullptr};

PyMODINIT_FUNC PyInit__C_cpu(void) { return PyModule_Create(&fused_optim_cpu_module); }
