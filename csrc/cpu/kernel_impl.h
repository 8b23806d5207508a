// The chunk loops of the fused CPU kernels. Included by each per-ISA translation unit inside an
// anonymous namespace (after csrc/math/update.h), so every ISA gets its own private copy of
// every function here and of the math: nothing can be merged across ISAs by the linker.
//
// Within a chunk, elements are processed in blocks of kBlock: every array whose dtype is the
// compute type is used in place; others (bf16/fp16, or another float width) are converted into a
// small local array, updated, and converted back once. The update loop itself runs over plain
// restrict pointers, so that the compiler vectorizes it.
//
// Requires: <cmath>, <cstdint>, <cstring>, <algorithm>, <c10/util/Half.h>, kernel_api.h and
// update.h included before, and fused_optim::math visible.

using ::fused_optim::cpu::AdamArgs;
using ::fused_optim::cpu::Chunk;
using ::fused_optim::cpu::DType;
using ::fused_optim::cpu::SgdArgs;
using ::fused_optim::cpu::Task;
namespace fcpu = ::fused_optim::cpu;
namespace fmath = fused_optim::math;

constexpr int64_t kBlock = 512;

template <typename T>
constexpr int8_t native_dtype() {
  return sizeof(T) == 8 ? fcpu::kFloat64 : fcpu::kFloat32;
}

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's conversion, branch-free).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + (0x7FFFu + ((u >> 16) & 1u))) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

inline float f16_to_float(uint16_t h) {
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline uint16_t float_to_f16(float f) {
  return c10::detail::fp16_ieee_from_fp32_value(f);
}

template <typename T>
inline void load_block(const void* base, int8_t dtype, int64_t offset, int64_t n,
                       T* __restrict out) {
  switch (dtype) {
    case fcpu::kFloat32: {
      const float* __restrict src = static_cast<const float*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(src[i]);
      break;
    }
    case fcpu::kFloat64: {
      const double* __restrict src = static_cast<const double*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(src[i]);
      break;
    }
    case fcpu::kBFloat16: {
      const uint16_t* __restrict src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(bf16_to_float(src[i]));
      break;
    }
    case fcpu::kFloat16: {
      const uint16_t* __restrict src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(f16_to_float(src[i]));
      break;
    }
    default:
      break;
  }
}

// Round-to-nearest-even store (a double goes through float for bf16/fp16, as torch's .to()).
template <typename T>
inline void store_block(const T* __restrict in, int8_t dtype, void* base, int64_t offset,
                        int64_t n) {
  switch (dtype) {
    case fcpu::kFloat32: {
      float* __restrict dst = static_cast<float*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(in[i]);
      break;
    }
    case fcpu::kFloat64: {
      double* __restrict dst = static_cast<double*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<double>(in[i]);
      break;
    }
    case fcpu::kBFloat16: {
      uint16_t* __restrict dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(static_cast<float>(in[i]));
      break;
    }
    case fcpu::kFloat16: {
      uint16_t* __restrict dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(static_cast<float>(in[i]));
      break;
    }
    default:
      break;
  }
}

// Asks for the next block of every array while this one is processed: the conversion passes walk
// one array at a time, which on their own keep too few cache misses in flight.
inline void prefetch_next(const Task& task, int64_t offset, int64_t end) {
  const int64_t n = std::min(kBlock, end - offset);
  if (n <= 0) return;
  static constexpr int kSize[4] = {4, 8, 2, 2};
  for (int slot = 0; slot < fcpu::kSlots; ++slot) {
    if (task.data[slot] == nullptr) continue;
    const int size = kSize[task.dtype[slot]];
    const char* start = static_cast<const char*>(task.data[slot]) + offset * size;
    for (int64_t byte = 0; byte < n * size; byte += 64) __builtin_prefetch(start + byte, 1, 3);
  }
}

// The block of one array in the compute type: in place when the dtypes agree, else converted
// into `local` (then `direct` is false and the caller stores it back).
template <typename T>
inline T* open_block(const Task& task, int slot, int64_t offset, int64_t n, T* local,
                     bool& direct) {
  direct = task.dtype[slot] == native_dtype<T>();
  if (direct) return static_cast<T*>(task.data[slot]) + offset;
  load_block(task.data[slot], task.dtype[slot], offset, n, local);
  return local;
}

// Stochastic rounding of fp32 values to bf16/fp16, bitwise as backends/reference.py.
inline void store_stochastic(const float* __restrict x, int8_t dtype, void* base, uint32_t key,
                             int64_t offset, int64_t n) {
  uint16_t* __restrict dst = static_cast<uint16_t*>(base) + offset;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t index = static_cast<uint64_t>(offset + i);
    const uint32_t bits = fcpu::mix32(fcpu::mix32(key ^ static_cast<uint32_t>(index >> 32)) ^
                                      static_cast<uint32_t>(index));
    const float v = x[i];
    if (dtype == fcpu::kBFloat16) {
      uint32_t u;
      std::memcpy(&u, &v, sizeof(u));
      const uint32_t rounded = (u + (bits & 0xFFFFu)) >> 16;
      dst[i] = static_cast<uint16_t>(v != v ? ((u >> 16) | 0x40u) : rounded);
    } else {
      const uint16_t nearest_bits = float_to_f16(v);
      const float nearest = f16_to_float(nearest_bits);
      const bool away_from_zero = std::fabs(nearest) < std::fabs(v);
      const uint16_t other_bits =
          static_cast<uint16_t>(away_from_zero ? nearest_bits + 1 : nearest_bits - 1);
      const float other = f16_to_float(other_bits);
      const float probability = (v - nearest) / (other - nearest);
      const float uniform = static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
      const bool take_other = (v != nearest) && (uniform < probability);
      dst[i] = take_other ? other_bits : nearest_bits;
    }
  }
}

// The param (and master) write of one block: p holds the updated values in the compute type.
template <typename T>
inline void write_param(const Task& task, T* p, bool p_direct, int64_t offset, int64_t n,
                        bool stochastic_rounding) {
  const bool has_master = task.data[fcpu::kMaster] != nullptr;
  if (has_master && !p_direct) store_block(p, task.dtype[fcpu::kMaster], task.data[fcpu::kMaster],
                                           offset, n);
  if (!has_master && p_direct) return;  // updated in place
  const int8_t dtype = task.dtype[fcpu::kParam];
  if (stochastic_rounding && sizeof(T) == 4 &&
      (dtype == fcpu::kBFloat16 || dtype == fcpu::kFloat16)) {
    store_stochastic(reinterpret_cast<const float*>(p), dtype, task.data[fcpu::kParam],
                     task.sr_key, offset, n);
  } else {
    store_block(p, dtype, task.data[fcpu::kParam], offset, n);
  }
}

template <typename T>
inline void unscale_grad(const Task& task, T* g, bool g_direct, int64_t offset, int64_t n,
                         T scale) {
  for (int64_t i = 0; i < n; ++i) g[i] = fmath::unscale(g[i], scale);
  if (!g_direct) store_block(g, task.dtype[fcpu::kGrad], task.data[fcpu::kGrad], offset, n);
}

// ---------------------------------------------------------------------------------------- Adam

template <typename T, bool kAmsgrad, bool kMaximize, bool kDecoupled>
inline void adam_loop(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                      T* __restrict vmax, int64_t n, const fmath::AdamScalars<T> scalars) {
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i], mi = m[i], vi = v[i];
    T xi = kAmsgrad ? vmax[i] : T(0);
    fmath::adam_update<T, kAmsgrad, kMaximize, kDecoupled>(pi, g[i], mi, vi, xi, scalars);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (kAmsgrad) vmax[i] = xi;
  }
}

template <typename T, bool kAmsgrad, bool kMaximize, bool kDecoupled>
void adam_chunk(const Task& task, const Chunk& chunk, const AdamArgs& args) {
  fmath::AdamScalars<T> s;
  s.neg_step_size = static_cast<T>(task.scalar[0]);
  s.bias_correction2_sqrt = static_cast<T>(task.scalar[1]);
  s.one_minus_beta1 = static_cast<T>(1.0 - args.beta1);
  s.beta2 = static_cast<T>(args.beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - args.beta2);
  s.eps = static_cast<T>(args.eps);
  s.weight_decay = static_cast<T>(args.weight_decay);
  s.decay = static_cast<T>(task.scalar[2]);
  const T scale = static_cast<T>(args.grad_scale);
  const int p_slot = task.data[fcpu::kMaster] != nullptr ? fcpu::kMaster : fcpu::kParam;
  alignas(64) T pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock], xb[kBlock];
  const int64_t end = chunk.start + chunk.length;
  for (int64_t offset = chunk.start; offset < end; offset += kBlock) {
    const int64_t n = std::min(kBlock, end - offset);
    prefetch_next(task, offset + kBlock, end);
    bool pd, gd, md, vd, xd = true;
    T* p = open_block(task, p_slot, offset, n, pb, pd);
    T* g = open_block(task, fcpu::kGrad, offset, n, gb, gd);
    if (args.has_grad_scale) unscale_grad(task, g, gd, offset, n, scale);
    T* m = open_block(task, fcpu::kState0, offset, n, mb, md);
    T* v = open_block(task, fcpu::kState1, offset, n, vb, vd);
    T* x = kAmsgrad ? open_block(task, fcpu::kState2, offset, n, xb, xd) : xb;
    adam_loop<T, kAmsgrad, kMaximize, kDecoupled>(p, g, m, v, x, n, s);
    if (!md) store_block(m, task.dtype[fcpu::kState0], task.data[fcpu::kState0], offset, n);
    if (!vd) store_block(v, task.dtype[fcpu::kState1], task.data[fcpu::kState1], offset, n);
    if (kAmsgrad && !xd) {
      store_block(x, task.dtype[fcpu::kState2], task.data[fcpu::kState2], offset, n);
    }
    write_param(task, p, pd, offset, n, args.stochastic_rounding);
  }
}

template <bool kAmsgrad, bool kMaximize, bool kDecoupled>
void adam_all(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const AdamArgs& args) {
#pragma omp parallel for schedule(static) if (num_chunks > 1)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Task& task = tasks[chunks[c].task];
    if (task.dtype[fcpu::kParam] == fcpu::kFloat64) {
      adam_chunk<double, kAmsgrad, kMaximize, kDecoupled>(task, chunks[c], args);
    } else {
      adam_chunk<float, kAmsgrad, kMaximize, kDecoupled>(task, chunks[c], args);
    }
  }
}

inline void adam_dispatch(const Task* tasks, const Chunk* chunks, int64_t num_chunks,
                          const AdamArgs& a) {
  using Fn = void (*)(const Task*, const Chunk*, int64_t, const AdamArgs&);
  static const Fn table[8] = {
      adam_all<false, false, false>, adam_all<false, false, true>,
      adam_all<false, true, false>,  adam_all<false, true, true>,
      adam_all<true, false, false>,  adam_all<true, false, true>,
      adam_all<true, true, false>,   adam_all<true, true, true>,
  };
  const int index = (a.amsgrad ? 4 : 0) + (a.maximize ? 2 : 0) + (a.decoupled_weight_decay ? 1 : 0);
  table[index](tasks, chunks, num_chunks, a);
}

// ----------------------------------------------------------------------------------------- SGD

template <typename T, bool kMomentum, bool kNesterov, bool kMaximize>
inline void sgd_loop(T* __restrict p, const T* __restrict g, T* __restrict buf, bool new_buffer,
                     int64_t n, const fmath::SgdScalars<T> scalars) {
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i];
    T bi = kMomentum ? buf[i] : T(0);
    fmath::sgd_update<T, kMomentum, kNesterov, kMaximize>(pi, g[i], bi, new_buffer, scalars);
    p[i] = pi;
    if (kMomentum) buf[i] = bi;
  }
}

template <typename T, bool kMomentum, bool kNesterov, bool kMaximize>
void sgd_chunk(const Task& task, const Chunk& chunk, const SgdArgs& args) {
  fmath::SgdScalars<T> s;
  s.lr = static_cast<T>(args.lr);
  s.momentum = static_cast<T>(args.momentum);
  s.one_minus_dampening = static_cast<T>(1.0 - args.dampening);
  s.weight_decay = static_cast<T>(args.weight_decay);
  const T scale = static_cast<T>(args.grad_scale);
  const int p_slot = task.data[fcpu::kMaster] != nullptr ? fcpu::kMaster : fcpu::kParam;
  alignas(64) T pb[kBlock], gb[kBlock], bb[kBlock];
  const int64_t end = chunk.start + chunk.length;
  for (int64_t offset = chunk.start; offset < end; offset += kBlock) {
    const int64_t n = std::min(kBlock, end - offset);
    prefetch_next(task, offset + kBlock, end);
    bool pd, gd, bd = true;
    T* p = open_block(task, p_slot, offset, n, pb, pd);
    T* g = open_block(task, fcpu::kGrad, offset, n, gb, gd);
    if (args.has_grad_scale) unscale_grad(task, g, gd, offset, n, scale);
    T* b = bb;
    if (kMomentum) {
      if (task.new_buffer) {
        // A new buffer holds uninitialised memory: never read it.
        bd = task.dtype[fcpu::kState0] == native_dtype<T>();
        b = bd ? static_cast<T*>(task.data[fcpu::kState0]) + offset : bb;
        std::fill(b, b + n, T(0));
      } else {
        b = open_block(task, fcpu::kState0, offset, n, bb, bd);
      }
    }
    sgd_loop<T, kMomentum, kNesterov, kMaximize>(p, g, b, task.new_buffer, n, s);
    if (kMomentum && !bd) {
      store_block(b, task.dtype[fcpu::kState0], task.data[fcpu::kState0], offset, n);
    }
    write_param(task, p, pd, offset, n, args.stochastic_rounding);
  }
}

template <bool kMomentum, bool kNesterov, bool kMaximize>
void sgd_all(const Task* tasks, const Chunk* chunks, int64_t num_chunks, const SgdArgs& args) {
#pragma omp parallel for schedule(static) if (num_chunks > 1)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Task& task = tasks[chunks[c].task];
    if (task.dtype[fcpu::kParam] == fcpu::kFloat64) {
      sgd_chunk<double, kMomentum, kNesterov, kMaximize>(task, chunks[c], args);
    } else {
      sgd_chunk<float, kMomentum, kNesterov, kMaximize>(task, chunks[c], args);
    }
  }
}

inline void sgd_dispatch(const Task* tasks, const Chunk* chunks, int64_t num_chunks,
                         const SgdArgs& a) {
  using Fn = void (*)(const Task*, const Chunk*, int64_t, const SgdArgs&);
  static const Fn table[8] = {
      sgd_all<false, false, false>, sgd_all<false, false, true>, sgd_all<false, true, false>,
      sgd_all<false, true, true>,   sgd_all<true, false, false>, sgd_all<true, false, true>,
      sgd_all<true, true, false>,   sgd_all<true, true, true>,
  };
  const int index = (a.has_momentum ? 4 : 0) + (a.nesterov ? 2 : 0) + (a.maximize ? 1 : 0);
  table[index](tasks, chunks, num_chunks, a);
}
