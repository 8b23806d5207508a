// The per-element update of each algorithm, written once for host and device code.
//
// Included by the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda). Everything here works
// on one element in the compute type T (float for fp32/bf16/fp16 tensors, double for fp64),
// with the operation order and fused multiply-adds of torch.optim's for-loop path (the same
// order as the Triton kernels in fused_optim/backends/triton/kernels.py). Loading, storing,
// rounding to the storage dtype, GradScaler's skip and the loop over tensors belong to the
// callers. Compile with floating-point contraction off (-ffp-contract=off, nvcc --fmad=false):
// the fmas that torch's arithmetic has are spelled out below, and no others may appear.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSED_OPTIM_INLINE __host__ __device__ __forceinline__
#else
#define FUSED_OPTIM_INLINE inline
#endif

namespace fused_optim {
namespace math {

template <typename T>
FUSED_OPTIM_INLINE T fused_multiply_add(T a, T b, T c) {
  return std::fma(a, b, c);
}

// torch's base.add(x, alpha=alpha). On real tensors torch's CPU kernel is one fused multiply-add;
// on complex tensors (kComplexArithmetic: the real and imaginary parts of a complex param, each
// element of its real view) it multiplies by the complex alpha (alpha + 0i), rounding the
// product, then adds: two roundings.
template <typename T, bool kComplexArithmetic>
FUSED_OPTIM_INLINE T add_scaled(T base, T x, T alpha) {
  if (kComplexArithmetic) return base + x * alpha;
  return fused_multiply_add(x, alpha, base);
}

// NaN-propagating maximum, as torch.maximum.
template <typename T>
FUSED_OPTIM_INLINE T nan_maximum(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// Scalars of one SGD step, in the compute type (computed on the host in fp64, then cast).
template <typename T>
struct SgdScalars {
  T lr;
  T momentum;
  T one_minus_dampening;  // 1 - dampening
  T weight_decay;
};

// SGD on one element: g = (+/-)grad + weight_decay * p;
// buf = g (new buffer) or momentum * buf + (1 - dampening) * g;
// d = g + momentum * buf (nesterov) or buf (with momentum) or g; p = p - lr * d.
// Complex params (kComplexArithmetic) follow torch's complex arithmetic: see add_scaled.
template <typename T, bool kHasMomentum, bool kNesterov, bool kMaximize, bool kComplexArithmetic>
FUSED_OPTIM_INLINE void sgd_update(
    T& p, T g, T& buf, bool new_buffer, const SgdScalars<T>& s) {
  if (kMaximize) g = -g;
  if (s.weight_decay != T(0)) g = add_scaled<T, kComplexArithmetic>(g, p, s.weight_decay);
  if (kHasMomentum) {
    buf = new_buffer ? g
                     : add_scaled<T, kComplexArithmetic>(buf * s.momentum, g,
                                                         s.one_minus_dampening);
    g = kNesterov ? add_scaled<T, kComplexArithmetic>(g, buf, s.momentum) : buf;
  }
  p = add_scaled<T, kComplexArithmetic>(p, g, -s.lr);
}

// Scalars of one Adam step for one tensor, in the compute type. The host computes them in
// fp64 as torch.optim does: neg_step_size = -lr / (1 - beta1^t),
// bias_correction2_sqrt = sqrt(1 - beta2^t), decay = 1 - lr * weight_decay.
template <typename T>
struct AdamScalars {
  T neg_step_size;
  T bias_correction2_sqrt;
  T one_minus_beta1;  // 1 - beta1, rounded from fp64
  T beta2;
  T one_minus_beta2;  // 1 - beta2, rounded from fp64
  T eps;
  T weight_decay;
  T decay;
};

// Adam / AdamW on one element (Kingma & Ba, in torch.optim's order):
// g = (+/-)grad [+ weight_decay * p]; p *= decay (decoupled);
// m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g * g; vmax = max(vmax, v);
// p = p + neg_step_size * m / (sqrt(v or vmax) / bias_correction2_sqrt + eps).
// Complex params (kComplexArithmetic): torch adds the L2 term on the complex tensors (see
// add_scaled); everything after it runs on their real views, as for real params.
template <typename T, bool kAmsgrad, bool kMaximize, bool kDecoupledWeightDecay,
          bool kComplexArithmetic>
FUSED_OPTIM_INLINE void adam_update(
    T& p, T g, T& m, T& v, T& vmax, const AdamScalars<T>& s) {
  if (kMaximize) g = -g;
  if (kDecoupledWeightDecay) {
    p = p * s.decay;
  } else if (s.weight_decay != T(0)) {
    g = add_scaled<T, kComplexArithmetic>(g, p, s.weight_decay);
  }
  // torch.lerp(m, g, w): m + w * (g - m) for |w| < 0.5, else g - (1 - w) * (g - m).
  const T w = s.one_minus_beta1;
  const T diff = g - m;
  const bool small_weight = w < T(0.5) && w > T(-0.5);
  m = small_weight ? fused_multiply_add(w, diff, m) : fused_multiply_add(w - T(1), diff, g);
  // torch: v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
  v = fused_multiply_add(s.one_minus_beta2 * g, g, v * s.beta2);
  T second_moment = v;
  if (kAmsgrad) {
    vmax = nan_maximum(vmax, v);
    second_moment = vmax;
  }
  const T denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
  p = p + (s.neg_step_size * m) / denom;
}

// GradScaler's unscale, in the compute type: g / scale (the value written back to the grad).
template <typename T>
FUSED_OPTIM_INLINE T unscale(T g, T scale) {
  return g / scale;
}

}  // namespace math
}  // namespace fused_optim
