// Multi-tensor SGD and Adam/AdamW kernels: one launch per bucket (every tensor of all the param
// groups that share a device, param dtype, state dtype and code flags) and step, no host
// synchronisation. Each block reads its tensor's group's hyperparameters from the hyper table.
//
// The per-element math is csrc/math/update.h (shared with the CPU backend); this file loads,
// unscales, stores, rounds and walks the launch tables described in fused_cuda.h (layout:
// csrc/plan_layout.h). It needs only the CUDA runtime (no torch headers), so CI compiles it
// without a CUDA build of torch.
//
// Compile with --fmad=false: update.h spells out torch.optim's fused multiply-adds and no
// others may appear.
//
// Kernels are templated on the storage dtypes, on the algorithm's structural flags (momentum /
// nesterov, amsgrad / decoupled weight decay) and on kVec (16-byte vector accesses). Flags that
// only change a few uniform branches (maximize, GradScaler, master weights, stochastic rounding,
// lr and step sources) are runtime values: a branch every thread of a block takes the same way
// costs nothing in these memory-bound kernels and keeps the number of instantiations small.
//
// FUSED_OPTIM_HOST_EMULATION (host C++ compiler, no GPU): the same kernels run on the CPU, one
// CUDA thread after another (they share nothing and never synchronise, so serial execution is
// exact). tests/test_cuda_sources.py builds it to check the kernels against the reference.
#include "fused_cuda.h"

#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(FUSED_OPTIM_HOST_EMULATION)
#include <cstring>
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define FUSED_OPTIM_ASSUME_GLOBAL(pointer) ((void)0)
namespace fused_optim {
namespace cuda {
namespace {
struct EmulatedIndex {
  unsigned int x = 0;
};
thread_local EmulatedIndex blockIdx, threadIdx;
inline uint32_t __float_as_uint(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline float __uint_as_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline long long __double_as_longlong(double x) {
  long long bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline double __longlong_as_double(long long bits) {
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
}  // namespace
}  // namespace cuda
}  // namespace fused_optim
#define FUSED_OPTIM_LAUNCH(kernel, grid, stream, launch)                      \
  do {                                                                       \
    (void)(stream);                                                          \
    for (unsigned int block = 0; block < (grid).x; ++block) {                \
      for (unsigned int thread = 0; thread < unsigned(kThreads); ++thread) { \
        blockIdx.x = block;                                                  \
        threadIdx.x = thread;                                                \
        kernel(launch);                                                      \
      }                                                                      \
    }                                                                        \
  } while (0)
#define FUSED_OPTIM_LAST_ERROR() cudaSuccess
#else
#include <cuda_runtime.h>
// Every address in the tables is device memory: telling the compiler so turns generic
// accesses into ld.global / st.global.
#define FUSED_OPTIM_ASSUME_GLOBAL(pointer) __builtin_assume(__isGlobal(pointer))
#define FUSED_OPTIM_LAUNCH(kernel, grid, stream, launch) \
  kernel<<<(grid), kThreads, 0, (stream)>>>(launch)
#define FUSED_OPTIM_LAST_ERROR() cudaGetLastError()
#endif

#include "../math/update.h"

namespace fused_optim {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Storage types and conversions.

struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

template <typename S>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ T widen(float x) {
  return static_cast<T>(x);
}
template <typename T>
__device__ __forceinline__ T widen(double x) {
  return static_cast<T>(x);
}
template <typename T>
__device__ __forceinline__ T widen(bf16_t x) {
  return static_cast<T>(__uint_as_float(static_cast<uint32_t>(x.x) << 16));
}
template <typename T>
__device__ __forceinline__ T widen(f16_t x) {
  return static_cast<T>(__half2float(__ushort_as_half(x.x)));
}

// Round-to-nearest-even fp32 -> bf16 on the bits (NaN stays a quiet NaN), as the Triton kernels.
__device__ __forceinline__ uint16_t bf16_bits_rn(float x) {
  const uint32_t bits = __float_as_uint(x);
  if (x != x) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16);
}

template <typename S>
struct Narrow;
template <>
struct Narrow<float> {
  template <typename T>
  static __device__ __forceinline__ float from(T x) {
    return static_cast<float>(x);
  }
};
template <>
struct Narrow<double> {
  template <typename T>
  static __device__ __forceinline__ double from(T x) {
    return static_cast<double>(x);
  }
};
template <>
struct Narrow<bf16_t> {
  template <typename T>
  static __device__ __forceinline__ bf16_t from(T x) {
    return bf16_t{bf16_bits_rn(static_cast<float>(x))};
  }
};
template <>
struct Narrow<f16_t> {
  template <typename T>
  static __device__ __forceinline__ f16_t from(T x) {
    return f16_t{__half_as_ushort(__float2half_rn(static_cast<float>(x)))};
  }
};

template <typename S, typename T>
__device__ __forceinline__ S narrow(T x) {
  return Narrow<S>::from(x);
}

// ---------------------------------------------------------------------------------------------
// Stochastic rounding: bitwise backends/reference.py's random_bits and round_stochastic.

__device__ __forceinline__ uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

__device__ __forceinline__ uint32_t tensor_key(uint32_t seed, double step, int64_t index) {
  uint32_t key = mix32(seed ^ 0x9E3779B9u);
  key = mix32(key ^ static_cast<uint32_t>(static_cast<int64_t>(step)));
  return mix32(key ^ static_cast<uint32_t>(index));
}

__device__ __forceinline__ uint32_t element_bits(uint32_t key, int64_t offset) {
  const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32);
  return mix32(mix32(key ^ high) ^ static_cast<uint32_t>(offset));
}

__device__ __forceinline__ bf16_t round_stochastic_bf16(float x, uint32_t bits) {
  const uint32_t x_bits = __float_as_uint(x);
  if (x != x) return bf16_t{static_cast<uint16_t>((x_bits >> 16) | 0x40u)};
  return bf16_t{static_cast<uint16_t>((x_bits + (bits & 0xFFFFu)) >> 16)};
}

__device__ __forceinline__ f16_t round_stochastic_f16(float x, uint32_t bits) {
  const __half nearest = __float2half_rn(x);
  const float nearest32 = __half2float(nearest);
  const uint32_t nearest_bits = __half_as_ushort(nearest);
  const bool away_from_zero = fabsf(nearest32) < fabsf(x);
  const uint32_t other_bits = (away_from_zero ? nearest_bits + 1u : nearest_bits - 1u) & 0xFFFFu;
  const float other32 = __half2float(__ushort_as_half(static_cast<unsigned short>(other_bits)));
  const float probability = __fdiv_rn(x - nearest32, other32 - nearest32);
  const float uniform = static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
  const bool take_other = (x != nearest32) && (uniform < probability);
  return f16_t{static_cast<uint16_t>(take_other ? other_bits : nearest_bits)};
}

template <typename PT, typename T>
__device__ __forceinline__ PT round_param(T x, bool stochastic, uint32_t key, int64_t offset) {
  if constexpr (std::is_same<PT, bf16_t>::value) {
    if (stochastic) return round_stochastic_bf16(static_cast<float>(x), element_bits(key, offset));
  } else if constexpr (std::is_same<PT, f16_t>::value) {
    if (stochastic) return round_stochastic_f16(static_cast<float>(x), element_bits(key, offset));
  }
  return narrow<PT>(x);
}

// ---------------------------------------------------------------------------------------------
// Loads and stores of N consecutive elements: one or two 16-byte accesses when N > 1 (the host
// checked that every address is 16-byte aligned; block starts are multiples of kChunk).

template <typename S, int N>
struct alignas(sizeof(S) * N >= 16 ? 16 : sizeof(S) * N) Pack {
  S v[N];
};

template <int N, typename T, typename S>
__device__ __forceinline__ void load(const S* base, int64_t i, T (&out)[N]) {
  FUSED_OPTIM_ASSUME_GLOBAL(base);
  const Pack<S, N> pack = *reinterpret_cast<const Pack<S, N>*>(base + i);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = widen<T>(pack.v[k]);
}

template <int N, typename S>
__device__ __forceinline__ void store(S* base, int64_t i, const S (&values)[N]) {
  FUSED_OPTIM_ASSUME_GLOBAL(base);
  Pack<S, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = values[k];
  *reinterpret_cast<Pack<S, N>*>(base + i) = pack;
}

template <int N, typename S, typename T>
__device__ __forceinline__ void store_rounded(S* base, int64_t i, const T (&values)[N]) {
  S out[N];
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = narrow<S>(values[k]);
  store<N>(base, i, out);
}

// ---------------------------------------------------------------------------------------------
// What every block reads first: its tensor, its range, its group's hyperparameters, its step.

struct Block {
  const int64_t* row;    // the tensor's tensor_table row
  const double* hyper;   // its group's hyper_table row
  int64_t tensor;
  int64_t start;
  int64_t end;  // one past the block's last element
  int64_t numel;
};

__device__ __forceinline__ Block locate(const CommonLaunch& a) {
  Block b;
  const int64_t pid = static_cast<int64_t>(blockIdx.x);
  b.tensor = a.block_table[2 * pid];
  b.start = a.block_table[2 * pid + 1];
  b.row = a.tensor_table + b.tensor * kTableColumns;
  b.hyper = a.hyper_table + b.row[kColGroup] * kHyperColumns;
  b.numel = b.row[kColNumel];
  b.end = b.start + kChunk < b.numel ? b.start + kChunk : b.numel;
  return b;
}

// GradScaler found an inf/NaN: the whole step stores nothing.
__device__ __forceinline__ bool skipped(const CommonLaunch& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0f;
}

// The tensor's step: read from its step tensor, or its offset below its group's base step.
__device__ __forceinline__ double step_of(const CommonLaunch& a, const Block& b) {
  if (a.step_from_pointer) {
    const void* address = reinterpret_cast<const void*>(b.row[kColStep]);
    return b.row[kColStepIsDouble] ? *static_cast<const double*>(address)
                                   : static_cast<double>(*static_cast<const float*>(address));
  }
  return b.hyper[kHyperBaseStep] - static_cast<double>(b.row[kColStep]);
}

// The device lr tensor whose address the group's row holds (pointer kinds of LrKind).
__device__ __forceinline__ const void* lr_address(const double* hyper) {
  return reinterpret_cast<const void*>(
      static_cast<intptr_t>(__double_as_longlong(hyper[kHyperLrAddress])));
}

// Whether the scalar math around lr runs in fp32 (an fp32, bf16 or fp16 tensor lr, each
// operation rounded to the lr's dtype: see round_lr), else in fp64.
__device__ __forceinline__ bool lr_is_float32(const CommonLaunch& a) {
  return a.lr_kind != LrKind::kValue && a.lr_kind != LrKind::kFloat64Pointer;
}

__device__ __forceinline__ float lr_as_float(const CommonLaunch& a, const double* hyper) {
  switch (a.lr_kind) {
    case LrKind::kFloat32Pointer:
      return *static_cast<const float*>(lr_address(hyper));
    case LrKind::kBFloat16Pointer:
      return widen<float>(*static_cast<const bf16_t*>(lr_address(hyper)));
    case LrKind::kHalfPointer:
      return widen<float>(*static_cast<const f16_t*>(lr_address(hyper)));
    default:
      return static_cast<float>(hyper[kHyperLr]);
  }
}

__device__ __forceinline__ double lr_as_double(const CommonLaunch& a, const double* hyper) {
  switch (a.lr_kind) {
    case LrKind::kValue:
      return hyper[kHyperLr];
    case LrKind::kFloat64Pointer:
      return *static_cast<const double*>(lr_address(hyper));
    default:
      return static_cast<double>(lr_as_float(a, hyper));
  }
}

// One operation of torch.optim's scalar math on a tensor lr, computed in fp32 (or fp64 for a
// Python float or fp64 lr), rounded to the lr's dtype.
__device__ __forceinline__ double round_lr(const CommonLaunch&, double x) { return x; }
__device__ __forceinline__ float round_lr(const CommonLaunch& a, float x) {
  if (a.lr_kind == LrKind::kBFloat16Pointer || a.lr_kind == LrKind::kBFloat16Value) {
    return widen<float>(narrow<bf16_t>(x));
  }
  if (a.lr_kind == LrKind::kHalfPointer || a.lr_kind == LrKind::kHalfValue) {
    return widen<float>(narrow<f16_t>(x));
  }
  return x;
}

// Walks the block's elements: full N-element vectors (kVec), then the tensor's last few
// elements one at a time; or every element one at a time. `body<N>(i)` does elements i..i+N-1.
template <bool kVec, int V, typename Body>
__device__ __forceinline__ void for_each_element(const Block& b, Body&& body) {
  const int64_t tid = threadIdx.x;
  int64_t scalar_start = b.start;
  if constexpr (kVec) {
    const int64_t full = b.start + ((b.end - b.start) / V) * V;
    for (int64_t i = b.start + tid * V; i < full; i += int64_t(kThreads) * V) {
      body.template operator()<V>(i);
    }
    scalar_start = full;
  }
  for (int64_t i = scalar_start + tid; i < b.end; i += kThreads) {
    body.template operator()<1>(i);
  }
}

// Elements per 16-byte access of the param dtype (fp64: 2, fp32: 4, bf16/fp16: 8).
template <typename PT>
struct VectorWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(PT));
};

// ---------------------------------------------------------------------------------------------
// Gradient clipping's coefficient (CommonLaunch::grad_coef) and the gradient write-back.

template <typename PT>
struct GradPrep {
  using T = typename ComputeOf<PT>::type;
  bool clipped;
  T coef;      // the coefficient, in the compute type
  bool write;  // store the prepared gradient

  static __device__ __forceinline__ GradPrep of(const CommonLaunch& a) {
    const bool clipped = a.grad_coef != nullptr;
    return GradPrep{clipped, clipped ? *static_cast<const T*>(a.grad_coef) : T(1),
                    a.write_grad || a.grad_scale != nullptr};
  }

  // g = round(round(g) * coef), rounding to the grad's dtype PT each time.
  template <int N>
  __device__ __forceinline__ void clip(T (&g)[N]) const {
    if (!clipped) return;
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = widen<T>(narrow<PT>(widen<T>(narrow<PT>(g[k])) * coef));
  }
};

// ---------------------------------------------------------------------------------------------
// SGD.

template <typename PT, typename ST, bool kMomentum, bool kNesterov>
struct SgdBody {
  using T = typename ComputeOf<PT>::type;
  math::SgdScalars<T> s;
  bool maximize;
  bool complex_arithmetic;  // real views of complex params (math/update.h)
  bool unscale;
  bool stochastic;
  PT* param;
  PT* grad;
  ST* buffer;
  float* master;
  bool new_buffer;
  T grad_scale;
  uint32_t key;
  GradPrep<PT> prep;

  // The uniform runtime flags (maximize, complex arithmetic) as the update's template flags.
  __device__ __forceinline__ void update(T& p, T g, T& buf) const {
    if (maximize) {
      if (complex_arithmetic) {
        math::sgd_update<T, kMomentum, kNesterov, true, true>(p, g, buf, new_buffer, s);
      } else {
        math::sgd_update<T, kMomentum, kNesterov, true, false>(p, g, buf, new_buffer, s);
      }
    } else if (complex_arithmetic) {
      math::sgd_update<T, kMomentum, kNesterov, false, true>(p, g, buf, new_buffer, s);
    } else {
      math::sgd_update<T, kMomentum, kNesterov, false, false>(p, g, buf, new_buffer, s);
    }
  }

  template <int N>
  __device__ __forceinline__ void operator()(int64_t i) const {
    T p[N], g[N], buf[N];
    if (master != nullptr) {
      load<N>(master, i, p);
    } else {
      load<N>(param, i, p);
    }
    load<N>(grad, i, g);
    if (unscale) {
#pragma unroll
      for (int k = 0; k < N; ++k) g[k] = math::unscale(g[k], grad_scale);
    }
    prep.template clip<N>(g);
    if (prep.write) store_rounded<N>(grad, i, g);
    if (kMomentum && !new_buffer) {
      load<N>(buffer, i, buf);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) buf[k] = T(0);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) update(p[k], g[k], buf[k]);
    if (kMomentum) store_rounded<N>(buffer, i, buf);
    if (master != nullptr) store_rounded<N>(master, i, p);
    PT out[N];
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = round_param<PT>(p[k], stochastic, key, i + k);
    store<N>(param, i, out);
  }
};

template <typename PT, typename ST, bool kMomentum, bool kNesterov, bool kVec>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const SgdLaunch a) {
  using T = typename ComputeOf<PT>::type;
  if (skipped(a)) return;
  const Block b = locate(a);
  if (b.start >= b.end) return;
  // The group's scalars, computed in fp64 and cast (torch.optim's host arithmetic).
  math::SgdScalars<T> s;
  s.lr = static_cast<T>(lr_as_double(a, b.hyper));
  s.momentum = static_cast<T>(b.hyper[kHyperMomentum]);
  s.one_minus_dampening = static_cast<T>(1.0 - b.hyper[kHyperDampening]);
  s.weight_decay = static_cast<T>(b.hyper[kHyperWeightDecay]);
  uint32_t key = 0;
  if (a.stochastic_rounding) key = tensor_key(a.seed, step_of(a, b), b.row[kColIndex]);
  const SgdBody<PT, ST, kMomentum, kNesterov> body{
      s,
      a.maximize,
      a.complex_arithmetic,
      a.grad_scale != nullptr,
      a.stochastic_rounding,
      reinterpret_cast<PT*>(b.row[kColParam]),
      reinterpret_cast<PT*>(a.grad_table[b.tensor]),
      reinterpret_cast<ST*>(b.row[kColState0]),
      a.has_master ? reinterpret_cast<float*>(b.row[kColMaster]) : nullptr,
      b.row[kColNewBuffer] != 0,
      a.grad_scale != nullptr ? static_cast<T>(*a.grad_scale) : T(1),
      key,
      GradPrep<PT>::of(a)};
  for_each_element<kVec, VectorWidth<PT>::value>(b, body);
}

// ---------------------------------------------------------------------------------------------
// Adam / AdamW.

// The per-tensor scalars from its group's row, in fp64 (torch.optim's host arithmetic), the
// lr-dependent ones in the lr's dtype L (fp64 for a Python float lr, the tensor's dtype for a
// tensor lr).
template <typename T, typename L>
__device__ __forceinline__ math::AdamScalars<T> adam_scalars(
    const CommonLaunch& a, const double* hyper, L lr, double bias_correction1,
    double bias_correction2_sqrt) {
  math::AdamScalars<T> s;
  const double beta1 = hyper[kHyperBeta1];
  const double beta2 = hyper[kHyperBeta2];
  const double weight_decay = hyper[kHyperWeightDecay];
  const double neg_step_size =
      static_cast<double>(-round_lr(a, lr / static_cast<L>(bias_correction1)));
  const double decay = static_cast<double>(
      round_lr(a, L(1) - round_lr(a, lr * static_cast<L>(weight_decay))));
  s.neg_step_size = static_cast<T>(neg_step_size);
  s.bias_correction2_sqrt = static_cast<T>(bias_correction2_sqrt);
  s.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  s.beta2 = static_cast<T>(beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  s.eps = static_cast<T>(hyper[kHyperEps]);
  s.weight_decay = static_cast<T>(weight_decay);
  s.decay = static_cast<T>(decay);
  return s;
}

template <typename PT, typename ST, bool kAmsgrad, bool kDecoupled>
struct AdamBody {
  using T = typename ComputeOf<PT>::type;
  math::AdamScalars<T> s;
  bool maximize;
  bool complex_arithmetic;  // real views of complex params (math/update.h)
  bool unscale;
  bool stochastic;
  PT* param;
  PT* grad;
  ST* exp_avg;
  ST* exp_avg_sq;
  ST* max_exp_avg_sq;
  float* master;
  T grad_scale;
  uint32_t key;
  GradPrep<PT> prep;

  // The uniform runtime flags (maximize, complex arithmetic) as the update's template flags.
  __device__ __forceinline__ void update(T& p, T g, T& m, T& v, T& vmax) const {
    if (maximize) {
      if (complex_arithmetic) {
        math::adam_update<T, kAmsgrad, true, kDecoupled, true>(p, g, m, v, vmax, s);
      } else {
        math::adam_update<T, kAmsgrad, true, kDecoupled, false>(p, g, m, v, vmax, s);
      }
    } else if (complex_arithmetic) {
      math::adam_update<T, kAmsgrad, false, kDecoupled, true>(p, g, m, v, vmax, s);
    } else {
      math::adam_update<T, kAmsgrad, false, kDecoupled, false>(p, g, m, v, vmax, s);
    }
  }

  template <int N>
  __device__ __forceinline__ void operator()(int64_t i) const {
    T p[N], g[N], m[N], v[N], vmax[N];
    if (master != nullptr) {
      load<N>(master, i, p);
    } else {
      load<N>(param, i, p);
    }
    load<N>(grad, i, g);
    if (unscale) {
#pragma unroll
      for (int k = 0; k < N; ++k) g[k] = math::unscale(g[k], grad_scale);
    }
    prep.template clip<N>(g);
    if (prep.write) store_rounded<N>(grad, i, g);
    load<N>(exp_avg, i, m);
    load<N>(exp_avg_sq, i, v);
    if (kAmsgrad) {
      load<N>(max_exp_avg_sq, i, vmax);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) vmax[k] = T(0);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) update(p[k], g[k], m[k], v[k], vmax[k]);
    if (kAmsgrad) store_rounded<N>(max_exp_avg_sq, i, vmax);
    store_rounded<N>(exp_avg, i, m);
    store_rounded<N>(exp_avg_sq, i, v);
    if (master != nullptr) store_rounded<N>(master, i, p);
    PT out[N];
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = round_param<PT>(p[k], stochastic, key, i + k);
    store<N>(param, i, out);
  }
};

template <typename PT, typename ST, bool kAmsgrad, bool kDecoupled, bool kVec>
__global__ void __launch_bounds__(kThreads) adam_kernel(const AdamLaunch a) {
  using T = typename ComputeOf<PT>::type;
  if (skipped(a)) return;
  const Block b = locate(a);
  if (b.start >= b.end) return;
  // Bias corrections: torch.optim's host values for tensors at their group's base step, fp64
  // pow() on the device for the others and for steps read from device memory (capturable).
  const double step = step_of(a, b);
  double bias_correction1 = b.hyper[kHyperBiasCorrection1];
  double bias_correction2_sqrt = b.hyper[kHyperBiasCorrection2Sqrt];
  if (a.step_from_pointer || b.row[kColStep] != 0) {
    bias_correction1 = 1.0 - pow(b.hyper[kHyperBeta1], step);
    bias_correction2_sqrt = sqrt(1.0 - pow(b.hyper[kHyperBeta2], step));
  }
  math::AdamScalars<T> s;
  if (lr_is_float32(a)) {
    s = adam_scalars<T, float>(a, b.hyper, lr_as_float(a, b.hyper), bias_correction1,
                               bias_correction2_sqrt);
  } else {
    s = adam_scalars<T, double>(a, b.hyper, lr_as_double(a, b.hyper), bias_correction1,
                                bias_correction2_sqrt);
  }
  const uint32_t key =
      a.stochastic_rounding ? tensor_key(a.seed, step, b.row[kColIndex]) : uint32_t(0);
  const AdamBody<PT, ST, kAmsgrad, kDecoupled> body{
      s,
      a.maximize,
      a.complex_arithmetic,
      a.grad_scale != nullptr,
      a.stochastic_rounding,
      reinterpret_cast<PT*>(b.row[kColParam]),
      reinterpret_cast<PT*>(a.grad_table[b.tensor]),
      reinterpret_cast<ST*>(b.row[kColState0]),
      reinterpret_cast<ST*>(b.row[kColState1]),
      reinterpret_cast<ST*>(b.row[kColState2]),
      a.has_master ? reinterpret_cast<float*>(b.row[kColMaster]) : nullptr,
      a.grad_scale != nullptr ? static_cast<T>(*a.grad_scale) : T(1),
      key,
      GradPrep<PT>::of(a)};
  for_each_element<kVec, VectorWidth<PT>::value>(b, body);
}


// ---------------------------------------------------------------------------------------------
// Gradient norms (fused_cuda.h's NormLaunch). The kernel is written as phases separated by
// __syncthreads (each thread's share, the steps of the tree, the ticket, the finishing block's
// share of the partials, its tree, the finish); the host emulation runs the same phase
// functions for every thread in turn, phase after phase.

template <int kKind>
__device__ __forceinline__ double norm_combine(double x, double y) {
  if constexpr (kKind == 3) {
    if (x != x || y != y) return x != x ? x : y;  // NaN wins, as torch's max
    return x > y ? x : y;
  } else {
    return x + y;
  }
}

// Thread t's share of block b: its elements start + t, start + t + kThreads, ... in order.
template <typename G, int kKind>
__device__ double norm_thread_share(const NormLaunch& a, int64_t b, int t) {
  using T = typename ComputeOf<G>::type;
  const int64_t* row = a.block_table + 3 * b;
  const G* grad = reinterpret_cast<const G*>(a.pointers[row[0]]);
  const int64_t start = row[1];
  const int64_t end = row[2] < start + kChunk ? row[2] : start + kChunk;
  const bool unscale = a.grad_scale != nullptr;
  const T scale = unscale ? static_cast<T>(*a.grad_scale) : T(1);
  double acc = 0.0;
  for (int64_t i = start + t; i < end; i += kThreads) {
    T g = widen<T>(grad[i]);
    if (unscale) g = widen<T>(narrow<G>(math::unscale(g, scale)));
    const double x = fabs(static_cast<double>(g));
    acc = norm_combine<kKind>(acc, kKind == 0 ? x * x : x);
  }
  return acc;
}

// The finishing block's thread t: the partials t, t + kThreads, ... in order.
template <int kKind>
__device__ double norm_partials_share(const NormLaunch& a, int t) {
  const volatile double* partials = a.partials;  // written by other blocks: not from L1
  double acc = 0.0;
  for (int64_t i = t; i < a.num_partials; i += kThreads) acc = norm_combine<kKind>(acc, partials[i]);
  return acc;
}

// One step of the tree over the block's shared values: thread t < width folds in t + width.
template <int kKind>
__device__ __forceinline__ void norm_tree_step(double* shared, int t, int width) {
  if (t < width) shared[t] = norm_combine<kKind>(shared[t], shared[t + width]);
}

// The whole tree, leaving the block's value in shared[0] (every thread of the block calls it;
// the emulation runs each step for every thread in turn).
template <int kKind>
__device__ void norm_tree(double* shared, int t) {
  for (int width = kThreads / 2; width > 0; width /= 2) {
#if defined(FUSED_OPTIM_HOST_EMULATION)
    for (t = 0; t < kThreads; ++t) norm_tree_step<kKind>(shared, t, width);
#else
    norm_tree_step<kKind>(shared, t, width);
    __syncthreads();
#endif
  }
}

template <typename T>
__device__ __forceinline__ T div_rn(T x, T y) {
  if constexpr (std::is_same<T, float>::value) {
    return __fdiv_rn(x, y);
  } else {
    return x / y;
  }
}

// f(T{}) with T the storage type of `dtype` (float, double, bf16_t or f16_t); false, calling
// nothing, for any other value. On the host (a launch's grad dtype) and on the device (the
// norm's output dtype).
template <typename F>
__host__ __device__ __forceinline__ bool with_storage_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      return true;
    case DType::kFloat64:
      f(double{});
      return true;
    case DType::kBFloat16:
      f(bf16_t{});
      return true;
    case DType::kFloat16:
      f(f16_t{});
      return true;
  }
  return false;
}

// The norm and torch's coefficient in the output dtype O, from the combined fp64 value.
template <typename O>
__device__ void norm_finish_as(const NormLaunch& a, double total64) {
  using T = typename ComputeOf<O>::type;
  const O total = std::is_same<O, double>::value ? narrow<O>(total64)
                                                 : narrow<O>(static_cast<float>(total64));
  *static_cast<O*>(a.total_out) = total;
  if (a.coef_out == nullptr) return;
  const double max_norm = __longlong_as_double(a.block_table[3 * a.num_blocks]);
  const T shifted = widen<T>(narrow<O>(widen<T>(total) + static_cast<T>(1e-6)));
  const T inverse = widen<T>(narrow<O>(div_rn(T(1), shifted)));
  T coef = widen<T>(narrow<O>(inverse * static_cast<T>(max_norm)));
  if (coef > T(1)) coef = T(1);  // NaN stays NaN, as torch's clamp
  *static_cast<T*>(a.coef_out) = coef;  // a value of O, held in the compute type
}

template <int kKind>
__device__ void norm_finish(const NormLaunch& a, double combined) {
  a.partials[a.num_partials] = combined;
  const double total = kKind == 0 ? sqrt(combined) : combined;
  with_storage_type(a.out_dtype, [&](auto out) { norm_finish_as<decltype(out)>(a, total); });
  *a.counter = 0u;
}

#if !defined(FUSED_OPTIM_HOST_EMULATION)
template <typename G, int kKind>
__global__ void __launch_bounds__(kThreads) norm_kernel(const NormLaunch a) {
  __shared__ double shared[kThreads];
  __shared__ bool last;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t b = blockIdx.x;
  shared[t] = norm_thread_share<G, kKind>(a, b, t);
  __syncthreads();
  norm_tree<kKind>(shared, t);
  if (t == 0) {
    a.partials[a.first_partial + b] = shared[0];
    __threadfence();  // the partial is visible before the ticket
    last = atomicAdd(a.counter, 1u) == static_cast<unsigned int>(a.num_partials - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  shared[t] = norm_partials_share<kKind>(a, t);
  __syncthreads();
  norm_tree<kKind>(shared, t);
  if (t == 0) norm_finish<kKind>(a, shared[0]);
}

#define FUSED_OPTIM_LAUNCH_NORM(G, KIND, grid, stream, launch) \
  norm_kernel<G, KIND><<<(grid), kThreads, 0, (stream)>>>(launch)
#else
// The same phases, every thread in turn.
template <typename G, int kKind>
void emulate_norm(const NormLaunch& a, dim3 grid) {
  double shared[kThreads];
  for (int64_t b = 0; b < static_cast<int64_t>(grid.x); ++b) {
    for (int t = 0; t < kThreads; ++t) shared[t] = norm_thread_share<G, kKind>(a, b, t);
    norm_tree<kKind>(shared, 0);
    a.partials[a.first_partial + b] = shared[0];
    if ((*a.counter)++ != static_cast<unsigned int>(a.num_partials - 1)) continue;
    for (int t = 0; t < kThreads; ++t) shared[t] = norm_partials_share<kKind>(a, t);
    norm_tree<kKind>(shared, 0);
    norm_finish<kKind>(a, shared[0]);
  }
}

#define FUSED_OPTIM_LAUNCH_NORM(G, KIND, grid, stream, launch) \
  ((void)(stream), emulate_norm<G, KIND>((launch), (grid)))
#endif

// ---------------------------------------------------------------------------------------------
// Host dispatch: dtype pair -> storage types, runtime flags -> template flags.

template <typename F>
bool dispatch_dtypes(DType param, DType state, F&& f) {
  // The state dtype is the param's, fp32 or bf16 (the plan stages anything else).
#define FUSED_OPTIM_CASE(P, S, PTYPE, STYPE) \
  if (param == DType::P && state == DType::S) { \
    f(PTYPE{}, STYPE{});                        \
    return true;                                \
  }
  FUSED_OPTIM_CASE(kFloat32, kFloat32, float, float)
  FUSED_OPTIM_CASE(kFloat32, kBFloat16, float, bf16_t)
  FUSED_OPTIM_CASE(kBFloat16, kBFloat16, bf16_t, bf16_t)
  FUSED_OPTIM_CASE(kBFloat16, kFloat32, bf16_t, float)
  FUSED_OPTIM_CASE(kFloat16, kFloat16, f16_t, f16_t)
  FUSED_OPTIM_CASE(kFloat16, kFloat32, f16_t, float)
  FUSED_OPTIM_CASE(kFloat16, kBFloat16, f16_t, bf16_t)
  FUSED_OPTIM_CASE(kFloat64, kFloat64, double, double)
  FUSED_OPTIM_CASE(kFloat64, kFloat32, double, float)
  FUSED_OPTIM_CASE(kFloat64, kBFloat16, double, bf16_t)
#undef FUSED_OPTIM_CASE
  return false;
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace

bool supports_dtypes(DType param, DType state) {
  return dispatch_dtypes(param, state, [](auto, auto) {});
}

cudaError_t launch_sgd(const SgdLaunch& launch, cudaStream_t stream) {
  if (launch.num_blocks <= 0) return cudaSuccess;
  if (launch.num_blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(launch.num_blocks));
  const bool momentum = launch.momentum;
  // Without momentum the state dtype plays no part: use the param's.
  const DType state = momentum ? launch.state_dtype : launch.param_dtype;
  const bool ok = dispatch_dtypes(launch.param_dtype, state, [&](auto p, auto st) {
    using PT = decltype(p);
    using ST = decltype(st);
    dispatch_bool(launch.aligned, [&](auto vec) {
      if (!momentum) {
        if constexpr (std::is_same<PT, ST>::value) {
          FUSED_OPTIM_LAUNCH((sgd_kernel<PT, PT, false, false, decltype(vec)::value>), grid,
                             stream, launch);
        }
        return;
      }
      dispatch_bool(launch.nesterov, [&](auto nesterov) {
        FUSED_OPTIM_LAUNCH(
            (sgd_kernel<PT, ST, true, decltype(nesterov)::value, decltype(vec)::value>), grid,
            stream, launch);
      });
    });
  });
  if (!ok) return cudaErrorInvalidValue;
  return FUSED_OPTIM_LAST_ERROR();
}

cudaError_t launch_adam(const AdamLaunch& launch, cudaStream_t stream) {
  if (launch.num_blocks <= 0) return cudaSuccess;
  if (launch.num_blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(launch.num_blocks));
  const bool ok = dispatch_dtypes(launch.param_dtype, launch.state_dtype, [&](auto p, auto st) {
    using PT = decltype(p);
    using ST = decltype(st);
    dispatch_bool(launch.aligned, [&](auto vec) {
      dispatch_bool(launch.amsgrad, [&](auto amsgrad) {
        dispatch_bool(launch.decoupled_weight_decay, [&](auto decoupled) {
          FUSED_OPTIM_LAUNCH((adam_kernel<PT, ST, decltype(amsgrad)::value,
                                          decltype(decoupled)::value, decltype(vec)::value>),
                             grid, stream, launch);
        });
      });
    });
  });
  if (!ok) return cudaErrorInvalidValue;
  return FUSED_OPTIM_LAST_ERROR();
}

cudaError_t launch_norm(const NormLaunch& launch, cudaStream_t stream) {
  if (launch.num_blocks <= 0) return cudaSuccess;
  if (launch.num_blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(launch.num_blocks));
  bool ok = true;
  const auto by_kind = [&](auto grad) {
    using G = decltype(grad);
    switch (launch.kind) {
      case NormKind::kSquares:
        FUSED_OPTIM_LAUNCH_NORM(G, 0, grid, stream, launch);
        break;
      case NormKind::kAbs:
        FUSED_OPTIM_LAUNCH_NORM(G, 1, grid, stream, launch);
        break;
      case NormKind::kMax:
        FUSED_OPTIM_LAUNCH_NORM(G, 3, grid, stream, launch);
        break;
      default:
        ok = false;
    }
  };
  if (!with_storage_type(launch.grad_dtype, by_kind) || !ok) return cudaErrorInvalidValue;
  return FUSED_OPTIM_LAST_ERROR();
}

}  // namespace cuda
}  // namespace fused_optim

#if defined(FUSED_OPTIM_HOST_EMULATION)
// C entry points of the emulation, for ctypes. pointers: tensor_table, grad_table, block_table,
// hyper_table, grad_scale, found_inf, grad_coef. ints: num_blocks, param_dtype, state_dtype,
// lr_kind, maximize, has_master, stochastic_rounding, step_from_pointer, seed, aligned, then SGD:
// momentum, nesterov; Adam: amsgrad, decoupled_weight_decay; then complex_arithmetic,
// write_grad.
namespace {
void fill_emulated(fused_optim::cuda::CommonLaunch& launch, const void* const* pointers,
                   const int64_t* ints) {
  using namespace fused_optim::cuda;
  launch.tensor_table = static_cast<const int64_t*>(pointers[0]);
  launch.grad_table = static_cast<const int64_t*>(pointers[1]);
  launch.block_table = static_cast<const int64_t*>(pointers[2]);
  launch.hyper_table = static_cast<const double*>(pointers[3]);
  launch.grad_scale = static_cast<const float*>(pointers[4]);
  launch.found_inf = static_cast<const float*>(pointers[5]);
  launch.grad_coef = pointers[6];
  launch.write_grad = ints[13] != 0;
  launch.num_blocks = ints[0];
  launch.param_dtype = static_cast<DType>(ints[1]);
  launch.state_dtype = static_cast<DType>(ints[2]);
  launch.lr_kind = static_cast<LrKind>(ints[3]);
  launch.maximize = ints[4] != 0;
  launch.has_master = ints[5] != 0;
  launch.stochastic_rounding = ints[6] != 0;
  launch.step_from_pointer = ints[7] != 0;
  launch.seed = static_cast<uint32_t>(ints[8]);
  launch.aligned = ints[9] != 0;
}
}  // namespace

extern "C" int fused_optim_emulated_sgd(const void* const* pointers, const int64_t* ints) {
  fused_optim::cuda::SgdLaunch launch;
  fill_emulated(launch, pointers, ints);
  launch.momentum = ints[10] != 0;
  launch.nesterov = ints[11] != 0;
  launch.complex_arithmetic = ints[12] != 0;
  return static_cast<int>(fused_optim::cuda::launch_sgd(launch, nullptr));
}

// pointers: pointers, block_table, partials, counter, grad_scale, total_out, coef_out. ints:
// num_blocks, first_partial, num_partials, grad_dtype, out_dtype, kind.
extern "C" int fused_optim_emulated_norm(void* const* pointers, const int64_t* ints) {
  using namespace fused_optim::cuda;
  NormLaunch launch;
  launch.pointers = static_cast<const int64_t*>(pointers[0]);
  launch.block_table = static_cast<const int64_t*>(pointers[1]);
  launch.partials = static_cast<double*>(pointers[2]);
  launch.counter = static_cast<unsigned int*>(pointers[3]);
  launch.grad_scale = static_cast<const float*>(pointers[4]);
  launch.total_out = pointers[5];
  launch.coef_out = pointers[6];
  launch.num_blocks = ints[0];
  launch.first_partial = ints[1];
  launch.num_partials = ints[2];
  launch.grad_dtype = static_cast<DType>(ints[3]);
  launch.out_dtype = static_cast<DType>(ints[4]);
  launch.kind = static_cast<NormKind>(ints[5]);
  return static_cast<int>(launch_norm(launch, nullptr));
}

extern "C" int fused_optim_emulated_adam(const void* const* pointers, const int64_t* ints) {
  fused_optim::cuda::AdamLaunch launch;
  fill_emulated(launch, pointers, ints);
  launch.amsgrad = ints[10] != 0;
  launch.decoupled_weight_decay = ints[11] != 0;
  launch.complex_arithmetic = ints[12] != 0;
  return static_cast<int>(fused_optim::cuda::launch_adam(launch, nullptr));
}
#endif  // FUSED_OPTIM_HOST_EMULATION
