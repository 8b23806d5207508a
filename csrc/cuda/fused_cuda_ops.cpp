// Torch binding of the CUDA multi-tensor kernels: ops fused_optim_cuda::sgd_, adam_ and norm_
// (a gradient norm for clipping), and the Python module fused_optim._C_cuda whose import registers them.
//
// Built only by setup.py against a CUDA build of torch (it needs c10's CUDA headers and links
// fused_cuda.cu). The ops take the launch tables of one bucket that fused_optim/backends/plan.py
// builds (tensor, grad, block and hyperparameter tables; layout in csrc/plan_layout.h) and
// enqueue one kernel on the current stream; they never synchronise with the host, so they can
// be captured in a CUDA graph.
//
// The tables hold raw addresses of the tensors the kernel writes: the schemas cannot name those
// tensors, so these ops are for eager use and CUDA graphs, not for torch.compile tracing (which
// goes through the custom ops torch.ops.fused_optim.cuda_sgd / cuda_adam of backends/cuda.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "fused_cuda.h"

namespace fused_optim {
namespace cuda {
namespace {

DType to_dtype(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float:
      return DType::kFloat32;
    case c10::ScalarType::Double:
      return DType::kFloat64;
    case c10::ScalarType::BFloat16:
      return DType::kBFloat16;
    case c10::ScalarType::Half:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "fused_optim_cuda: unsupported dtype ", type);
  }
}

// Gradient clipping's coefficient: one element in the compute dtype (fp64 for fp64 params, else
// fp32), on the tables' device.
const void* coefficient(const std::optional<at::Tensor>& t, const at::Tensor& table,
                        c10::ScalarType param_dtype) {
  if (!t.has_value() || !t->defined()) return nullptr;
  const c10::ScalarType compute =
      param_dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
  TORCH_CHECK(t->device() == table.device() && t->scalar_type() == compute && t->numel() == 1,
              "fused_optim_cuda: grad_coef must be a one-element ", compute, " tensor on ",
              table.device());
  return t->const_data_ptr();
}

const float* float_scalar(const std::optional<at::Tensor>& t, const at::Tensor& table,
                          const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == table.device(), "fused_optim_cuda: ", what, " is on ", t->device(),
              ", the tables on ", table.device());
  TORCH_CHECK(t->scalar_type() == c10::ScalarType::Float && t->numel() == 1, "fused_optim_cuda: ",
              what, " must be a one-element float32 tensor");
  return t->const_data_ptr<float>();
}

// The kind of the bucket's lr: a device tensor whose address the hyper table holds
// (lr_from_pointer), else the table's value, with the scalar math in lr_dtype.
LrKind to_lr_kind(bool lr_from_pointer, c10::ScalarType lr_dtype) {
  switch (lr_dtype) {
    case c10::ScalarType::Float:
      return lr_from_pointer ? LrKind::kFloat32Pointer : LrKind::kFloat32Value;
    case c10::ScalarType::Double:
      return lr_from_pointer ? LrKind::kFloat64Pointer : LrKind::kValue;
    case c10::ScalarType::BFloat16:
      return lr_from_pointer ? LrKind::kBFloat16Pointer : LrKind::kBFloat16Value;
    case c10::ScalarType::Half:
      return lr_from_pointer ? LrKind::kHalfPointer : LrKind::kHalfValue;
    default:
      TORCH_CHECK(false, "fused_optim_cuda: the lr dtype must be float32, float64, bfloat16 or "
                  "float16, got ", lr_dtype);
  }
}

void fill_common(CommonLaunch& launch, const at::Tensor& tensor_table,
                 const at::Tensor& grad_table, const at::Tensor& block_table,
                 const at::Tensor& hyper_table, c10::ScalarType param_dtype,
                 c10::ScalarType state_dtype, bool lr_from_pointer, c10::ScalarType lr_dtype,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, bool maximize, bool has_master,
                 bool stochastic_rounding, bool step_from_pointer, int64_t seed, bool aligned) {
  for (const at::Tensor* table : {&tensor_table, &grad_table, &block_table}) {
    TORCH_CHECK(table->is_cuda() && table->scalar_type() == c10::ScalarType::Long &&
                    table->is_contiguous(),
                "fused_optim_cuda: launch tables must be contiguous int64 CUDA tensors");
    TORCH_CHECK(table->device() == tensor_table.device(),
                "fused_optim_cuda: launch tables on different devices");
  }
  TORCH_CHECK(tensor_table.dim() == 2 && tensor_table.size(1) == kTableColumns,
              "fused_optim_cuda: tensor_table must have ", kTableColumns, " columns");
  TORCH_CHECK(grad_table.numel() == tensor_table.size(0),
              "fused_optim_cuda: one gradient pointer per tensor expected");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(1) == 2,
              "fused_optim_cuda: block_table must hold (tensor, start) pairs");
  // The group column is not read back (that would sync): the plan that built both tables
  // numbers groups by the rows of the hyper table.
  TORCH_CHECK(hyper_table.device() == tensor_table.device() &&
                  hyper_table.scalar_type() == c10::ScalarType::Double &&
                  hyper_table.is_contiguous() && hyper_table.dim() == 2 &&
                  hyper_table.size(1) == kHyperColumns && hyper_table.size(0) > 0,
              "fused_optim_cuda: hyper_table must be a contiguous float64 tensor of ",
              kHyperColumns, " columns on the tables' device");
  launch.tensor_table = tensor_table.const_data_ptr<int64_t>();
  launch.grad_table = grad_table.const_data_ptr<int64_t>();
  launch.block_table = block_table.const_data_ptr<int64_t>();
  launch.hyper_table = hyper_table.const_data_ptr<double>();
  launch.num_blocks = block_table.size(0);
  launch.param_dtype = to_dtype(param_dtype);
  launch.state_dtype = to_dtype(state_dtype);
  TORCH_CHECK(supports_dtypes(launch.param_dtype, launch.state_dtype),
              "fused_optim_cuda: states of dtype ", state_dtype, " with params of dtype ",
              param_dtype, " are not supported (states must be the param's dtype, fp32 or bf16)");
  launch.lr_kind = to_lr_kind(lr_from_pointer, lr_dtype);
  launch.grad_scale = float_scalar(grad_scale, tensor_table, "grad_scale");
  launch.found_inf = float_scalar(found_inf, tensor_table, "found_inf");
  launch.maximize = maximize;
  launch.has_master = has_master;
  launch.stochastic_rounding = stochastic_rounding;
  launch.step_from_pointer = step_from_pointer;
  launch.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull);
  launch.aligned = aligned;
}

void sgd_(const at::Tensor& tensor_table, const at::Tensor& grad_table,
          const at::Tensor& block_table, const at::Tensor& hyper_table,
          c10::ScalarType param_dtype, c10::ScalarType state_dtype, bool lr_from_pointer,
          c10::ScalarType lr_dtype, const std::optional<at::Tensor>& grad_scale,
          const std::optional<at::Tensor>& found_inf, bool momentum, bool nesterov,
          bool maximize, bool complex_arithmetic, bool has_master, bool stochastic_rounding,
          bool step_from_pointer, int64_t seed, bool aligned,
          const std::optional<at::Tensor>& grad_coef, bool write_grad) {
  SgdLaunch launch;
  fill_common(launch, tensor_table, grad_table, block_table, hyper_table, param_dtype,
              state_dtype, lr_from_pointer, lr_dtype, grad_scale, found_inf, maximize,
              has_master, stochastic_rounding, step_from_pointer, seed, aligned);
  launch.grad_coef = coefficient(grad_coef, tensor_table, param_dtype);
  launch.write_grad = write_grad;
  launch.momentum = momentum;
  launch.nesterov = nesterov;
  launch.complex_arithmetic = complex_arithmetic;
  const c10::cuda::CUDAGuard guard(tensor_table.device());
  const cudaError_t error = launch_sgd(launch, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == cudaSuccess, "fused_optim_cuda::sgd_ launch failed: ",
              cudaGetErrorString(error));
}

void adam_(const at::Tensor& tensor_table, const at::Tensor& grad_table,
           const at::Tensor& block_table, const at::Tensor& hyper_table,
           c10::ScalarType param_dtype, c10::ScalarType state_dtype, bool lr_from_pointer,
           c10::ScalarType lr_dtype, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf, bool amsgrad, bool maximize,
           bool decoupled_weight_decay, bool complex_arithmetic, bool has_master,
           bool stochastic_rounding, bool step_from_pointer, int64_t seed, bool aligned,
           const std::optional<at::Tensor>& grad_coef, bool write_grad) {
  AdamLaunch launch;
  fill_common(launch, tensor_table, grad_table, block_table, hyper_table, param_dtype,
              state_dtype, lr_from_pointer, lr_dtype, grad_scale, found_inf, maximize,
              has_master, stochastic_rounding, step_from_pointer, seed, aligned);
  launch.grad_coef = coefficient(grad_coef, tensor_table, param_dtype);
  launch.write_grad = write_grad;
  launch.amsgrad = amsgrad;
  launch.decoupled_weight_decay = decoupled_weight_decay;
  launch.complex_arithmetic = complex_arithmetic;
  const c10::cuda::CUDAGuard guard(tensor_table.device());
  const cudaError_t error = launch_adam(launch, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == cudaSuccess, "fused_optim_cuda::adam_ launch failed: ",
              cudaGetErrorString(error));
}

// A gradient norm's launch for one gradient dtype (fused_cuda.h's NormLaunch; the host tables of
// fused_optim/backends/plan.py's NormPass).
void norm_(const at::Tensor& pointers, const at::Tensor& block_table, const at::Tensor& partials,
           const at::Tensor& counter, const std::optional<at::Tensor>& grad_scale,
           const at::Tensor& total_out, const std::optional<at::Tensor>& coef_out,
           c10::ScalarType grad_dtype, int64_t first_partial, int64_t num_partials,
           int64_t kind) {
  for (const at::Tensor* table : {&pointers, &block_table}) {
    TORCH_CHECK(table->is_cuda() && table->scalar_type() == c10::ScalarType::Long &&
                    table->is_contiguous() && table->device() == partials.device(),
                "fused_optim_cuda::norm_: tables must be contiguous int64 tensors on ",
                partials.device());
  }
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(1) == 3 && block_table.size(0) >= 1,
              "fused_optim_cuda::norm_: block_table must hold (tensor, start, numel) rows and "
              "a last row with max_norm");
  TORCH_CHECK(partials.is_cuda() && partials.scalar_type() == c10::ScalarType::Double &&
                  partials.is_contiguous() && partials.numel() == num_partials + 1,
              "fused_optim_cuda::norm_: partials must be a contiguous float64 tensor of "
              "num_partials + 1 elements");
  TORCH_CHECK(first_partial >= 0 && first_partial + block_table.size(0) - 1 <= num_partials,
              "fused_optim_cuda::norm_: the launch's partials lie outside the buffer");
  TORCH_CHECK(counter.device() == partials.device() &&
                  counter.scalar_type() == c10::ScalarType::Int && counter.numel() == 1,
              "fused_optim_cuda::norm_: counter must be one int32 on ", partials.device());
  TORCH_CHECK(kind == 0 || kind == 1 || kind == 3, "fused_optim_cuda::norm_: kind ", kind,
              " is not a sum of squares (0), of absolute values (1) or a maximum (3)");
  const c10::ScalarType compute = total_out.scalar_type() == c10::ScalarType::Double
                                      ? c10::ScalarType::Double
                                      : c10::ScalarType::Float;
  TORCH_CHECK(total_out.device() == partials.device() && total_out.numel() == 1,
              "fused_optim_cuda::norm_: total_out must be one element on ", partials.device());
  TORCH_CHECK(!coef_out.has_value() || !coef_out->defined() ||
                  (coef_out->device() == partials.device() && coef_out->numel() == 1 &&
                   coef_out->scalar_type() == compute),
              "fused_optim_cuda::norm_: coef_out must be one ", compute, " element on ",
              partials.device());
  NormLaunch launch;
  launch.pointers = pointers.const_data_ptr<int64_t>();
  launch.block_table = block_table.const_data_ptr<int64_t>();
  launch.partials = partials.data_ptr<double>();
  launch.counter = reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>());
  launch.grad_scale = float_scalar(grad_scale, partials, "grad_scale");
  launch.total_out = total_out.data_ptr();
  launch.coef_out = coef_out.has_value() && coef_out->defined() ? coef_out->data_ptr() : nullptr;
  launch.num_blocks = block_table.size(0) - 1;
  launch.first_partial = first_partial;
  launch.num_partials = num_partials;
  launch.grad_dtype = to_dtype(grad_dtype);
  launch.out_dtype = to_dtype(total_out.scalar_type());
  launch.kind = static_cast<NormKind>(kind);
  const c10::cuda::CUDAGuard guard(partials.device());
  const cudaError_t error = launch_norm(launch, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == cudaSuccess, "fused_optim_cuda::norm_ launch failed: ",
              cudaGetErrorString(error));
}

}  // namespace
}  // namespace cuda
}  // namespace fused_optim

TORCH_LIBRARY(fused_optim_cuda, m) {
  m.def(
      "sgd_(Tensor tensor_table, Tensor grad_table, Tensor block_table, Tensor hyper_table, "
      "ScalarType param_dtype, ScalarType state_dtype, bool lr_from_pointer, "
      "ScalarType lr_dtype, Tensor? grad_scale, Tensor? found_inf, bool momentum, "
      "bool nesterov, bool maximize, bool complex_arithmetic, bool has_master, "
      "bool stochastic_rounding, "
      "bool step_from_pointer, int seed, bool aligned, Tensor? grad_coef, bool write_grad) "
      "-> ()");
  m.def(
      "adam_(Tensor tensor_table, Tensor grad_table, Tensor block_table, Tensor hyper_table, "
      "ScalarType param_dtype, ScalarType state_dtype, bool lr_from_pointer, "
      "ScalarType lr_dtype, Tensor? grad_scale, Tensor? found_inf, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, bool complex_arithmetic, bool has_master, "
      "bool stochastic_rounding, "
      "bool step_from_pointer, int seed, bool aligned, Tensor? grad_coef, bool write_grad) "
      "-> ()");
  m.def(
      "norm_(Tensor pointers, Tensor block_table, Tensor partials, Tensor counter, "
      "Tensor? grad_scale, Tensor total_out, Tensor? coef_out, ScalarType grad_dtype, "
      "int first_partial, int num_partials, int kind) -> ()");
}

TORCH_LIBRARY_IMPL(fused_optim_cuda, CUDA, m) {
  m.impl("sgd_", &fused_optim::cuda::sgd_);
  m.impl("adam_", &fused_optim::cuda::adam_);
  m.impl("norm_", &fused_optim::cuda::norm_);
}

// Importing fused_optim._C_cuda runs the registrations above; the module itself is empty.
static struct PyModuleDef fused_optim_cuda_module = {
    PyModuleDef_HEAD_INIT,
    "_C_cuda",
    "CUDA kernels of fused_optim (ops in torch.ops.fused_optim_cuda)",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&fused_optim_cuda_module); }
