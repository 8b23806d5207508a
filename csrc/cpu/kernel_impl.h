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

// x rounded to a storage dtype and back (a double goes through float for bf16/fp16, as
// torch's .to()).
template <typename T>
inline T round_to_dtype(T x, int8_t dtype) {
  switch (dtype) {
    case fcpu::kFloat32:
      return static_cast<T>(static_cast<float>(x));
    case fcpu::kBFloat16:
      return static_cast<T>(bf16_to_float(float_to_bf16(static_cast<float>(x))));
    case fcpu::kFloat16:
      return static_cast<T>(f16_to_float(float_to_f16(static_cast<float>(x))));
    default:
      return x;
  }
}

// The gradient block the update reads (GradArgs): unscaled, then clipped, and stored into the
// grad only with write_back. A grad used in place (g_direct) is never modified without
// write_back: its values then go to `local`.
template <typename T>
inline T* prepare_grad(const Task& task, T* g, bool g_direct, int64_t offset, int64_t n,
                       const fcpu::GradArgs& a, T* local) {
  if (!a.has_scale && !a.has_coef) return g;
  T* out = (g_direct && !a.write_back) ? local : g;
  if (a.has_scale) {
    const T scale = static_cast<T>(a.scale);
    for (int64_t i = 0; i < n; ++i) out[i] = fmath::unscale(g[i], scale);
  } else if (out != g) {
    std::copy(g, g + n, out);
  }
  if (a.has_coef) {
    const int8_t dtype = task.dtype[fcpu::kGrad];
    const T coef = static_cast<T>(a.coef);  // torch multiplies by the coefficient's value
    if (dtype == native_dtype<T>()) {
      for (int64_t i = 0; i < n; ++i) out[i] = out[i] * coef;
    } else {
      for (int64_t i = 0; i < n; ++i) {
        out[i] = round_to_dtype(round_to_dtype(out[i], dtype) * coef, dtype);
      }
    }
  }
  if (a.write_back && !g_direct) {
    store_block(out, task.dtype[fcpu::kGrad], task.data[fcpu::kGrad], offset, n);
  }
  return out;
}

// ---------------------------------------------------------------------------- gradient norm

// Adds op(|g[i]|) into acc[i % kLanes] for a block (blocks start at a multiple of kLanes, so i
// is the element's lane), lane by lane: written as whole lane groups so that the compiler keeps
// acc in vector registers. Op: 0 squares, 1 absolute values, 2 maximum (NaN wins).
constexpr int kNormLanes = 8;

template <int Op, typename T>
inline void norm_block(const T* __restrict g, int64_t n, double* __restrict acc) {
  auto add = [](double a, double x) {
    if (Op == 0) return a + x * x;
    if (Op == 1) return a + std::fabs(x);
    return fmath::nan_maximum(a, std::fabs(x));
  };
  int64_t i = 0;
  for (; i + kNormLanes <= n; i += kNormLanes) {
    for (int j = 0; j < kNormLanes; ++j) acc[j] = add(acc[j], static_cast<double>(g[i + j]));
  }
  for (; i < n; ++i) acc[i % kNormLanes] = add(acc[i % kNormLanes], static_cast<double>(g[i]));
}

// One chunk's share of a gradient norm (NormArgs), in a fixed order: element i of the chunk
// goes to accumulator i % 8 and the accumulators combine in a fixed tree, so every ISA build and
// every thread count gives the same bits.
template <typename T>
inline double norm_chunk(const Task& task, const Chunk& chunk, const fcpu::NormArgs& a) {
  static_assert(kBlock % kNormLanes == 0, "a block starts a lane group");
  double acc[kNormLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  alignas(64) T gb[kBlock];
  alignas(64) T ub[kBlock];
  const int8_t dtype = task.dtype[fcpu::kGrad];
  const T scale = static_cast<T>(a.scale);
  const int64_t end = chunk.start + chunk.length;
  for (int64_t offset = chunk.start; offset < end; offset += kBlock) {
    const int64_t n = std::min(kBlock, end - offset);
    bool gd;
    const T* g = open_block(task, fcpu::kGrad, offset, n, gb, gd);
    if (a.has_scale) {  // the unscaled gradient GradScaler would write
      for (int64_t i = 0; i < n; ++i) ub[i] = round_to_dtype(fmath::unscale(g[i], scale), dtype);
      g = ub;
    }
    switch (a.kind) {
      case fcpu::kNormSquares:
        norm_block<0>(g, n, acc);
        break;
      case fcpu::kNormAbs:
        norm_block<1>(g, n, acc);
        break;
      case fcpu::kNormPower:
        for (int64_t i = 0; i < n; ++i) {
          acc[i % kNormLanes] += std::pow(std::fabs(static_cast<double>(g[i])), a.p);
        }
        break;
      default:
        norm_block<2>(g, n, acc);
        break;
    }
  }
  if (a.kind == fcpu::kNormMax) {
    double m = acc[0];
    for (int j = 1; j < kNormLanes; ++j) m = fmath::nan_maximum(m, acc[j]);
    return m;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline void grad_norm_all(const Task* tasks, const Chunk* chunks, int64_t num_chunks,
                          const fcpu::NormArgs& a, double* partials) {
#pragma omp parallel for schedule(static) if (num_chunks > 1)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const Task& task = tasks[chunks[c].task];
    partials[c] = task.dtype[fcpu::kGrad] == fcpu::kFloat64
                      ? norm_chunk<double>(task, chunks[c], a)
                      : norm_chunk<float>(task, chunks[c], a);
  }
}

// ---------------------------------------------------------------------------------------- Adam

template <typename T, bool kAmsgrad, bool kMaximize, bool kDecoupled, bool kComplex>
inline void adam_loop(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                      T* __restrict vmax, int64_t n, const fmath::AdamScalars<T> scalars) {
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i], mi = m[i], vi = v[i];
    T xi = kAmsgrad ? vmax[i] : T(0);
    fmath::adam_update<T, kAmsgrad, kMaximize, kDecoupled, kComplex>(pi, g[i], mi, vi, xi,
                                                                     scalars);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (kAmsgrad) vmax[i] = xi;
  }
}

#ifdef FUSED_OPTIM_HAVE_AVX2
// ------------------------------------------------------- Adam, single-pass fast path (AVX2/512)
//
// fp32 compute over fp32/bf16 params, grads and states (no master, no amsgrad, no grad scale,
// round-to-nearest stores): every element is loaded, updated and stored in ONE pass over all
// arrays, a vector of lanes at a time, instead of converting each array into a local block and
// back. The arithmetic is adam_update's, operation by operation (IEEE add/mul/fma/div/sqrt give
// the same bits in any lane and at any vector width), and bf16 stores round as float_to_bf16
// does, so the results are bitwise those of the portable path. The loop is written once over a
// "lanes" type (Avx2Lanes: 8 floats in __m256; Avx512Lanes: 16 in __m512) that supplies the
// loads, stores and arithmetic; each ISA's translation unit picks its own as FastLanes.

struct Avx2Lanes {
  using V = __m256;
  static constexpr int kLanes = 8;
  // With seven streams, the hardware prefetchers of AVX2-era CPUs alone leave the loop waiting
  // (measured on an AVX2 EPYC: 3-5 ms of 35 per 64M-element step).
  static constexpr int64_t kPrefetchAhead = 1024;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V flip_sign(V a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static bool any_nan(V a) {
    return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0;
  }

  // 8 bf16 (or fp32) values as fp32. bf16: the 16 bytes go to both 128-bit lanes (a pure load),
  // and one in-lane byte shuffle puts value j in the upper half of dword j (the lower half zero).
  template <bool kBf16>
  static V load(const void* base, int64_t i) {
    if (kBf16) {
      const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
      const __m256i spread =
          _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, -1, -1, 8, 9,
                           -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
      return _mm256_castsi256_ps(_mm256_shuffle_epi8(raw, spread));
    }
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }

  // Stores 8 fp32 values known not to be NaN as bf16, rounded to nearest even (float_to_bf16's
  // formula; the upper halves of the rounded dwords are gathered by a byte shuffle), or as fp32.
  template <bool kBf16>
  static void store_finite(void* base, int64_t i, V x) {
    if (kBf16) {
      const __m256i u = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i t = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
      const __m256i gather =
          _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7,
                           10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, gather), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                       _mm256_castsi256_si128(packed));
    } else {
      _mm256_storeu_ps(static_cast<float*>(base) + i, x);
    }
  }

  // Stores 8 fp32 values, as bf16 rounded to nearest even (NaN -> 0x7FC0) or as fp32.
  template <bool kBf16>
  static void store(void* base, int64_t i, V x) {
    if (kBf16) {
      const __m256i u = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
      // Every lane is in [0, 0xFFFF]: the unsigned saturating pack is exact.
      const __m128i packed =
          _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), packed);
    } else {
      _mm256_storeu_ps(static_cast<float*>(base) + i, x);
    }
  }
};

#ifdef FUSED_OPTIM_HAVE_AVX512
// AVX-512 F+BW+VL. bf16 stores round with integer arithmetic, not AVX512-BF16's vcvtneps2bf16:
// that instruction flushes subnormal inputs and outputs to zero and keeps a NaN's payload, so
// its bits differ from float_to_bf16's (and torch's) for those values.
struct Avx512Lanes {
  using V = __m512;
  static constexpr int kLanes = 16;
  // No software prefetch: on an AVX-512 EPYC (Zen 4) it slowed the 64M-element step from parity
  // with torch's fused step to 0.77-0.92x of it (paired rounds, 3 runs each way).
  static constexpr int64_t kPrefetchAhead = 0;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V flip_sign(V a) {
    return _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  }
  static bool any_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }

  template <bool kBf16>
  static V load(const void* base, int64_t i) {
    if (kBf16) {
      const __m256i raw = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  }

  static __m512i round_bf16(V x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    return _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  }

  template <bool kBf16>
  static void store_finite(void* base, int64_t i, V x) {
    if (kBf16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i),
                          _mm512_cvtepi32_epi16(round_bf16(x)));
    } else {
      _mm512_storeu_ps(static_cast<float*>(base) + i, x);
    }
  }

  template <bool kBf16>
  static void store(void* base, int64_t i, V x) {
    if (kBf16) {
      const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      const __m512i r = _mm512_mask_mov_epi32(round_bf16(x), nan, _mm512_set1_epi32(0x7FC0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i),
                          _mm512_cvtepi32_epi16(r));
    } else {
      _mm512_storeu_ps(static_cast<float*>(base) + i, x);
    }
  }
};
using FastLanes = Avx512Lanes;
#else
using FastLanes = Avx2Lanes;
#endif

template <typename L, bool kPBf16, bool kGBf16, bool kMBf16, bool kVBf16, bool kMaximize,
          bool kDecoupled, bool kWeightDecay, bool kLerpLow>
void adam_fast_loop(void* pp, const void* gp, void* mp, void* vp, int64_t start, int64_t end,
                    const fmath::AdamScalars<float>& s) {
  using V = typename L::V;
  constexpr int64_t kLanes = L::kLanes;
  const V decay = L::set1(s.decay);
  const V wd = L::set1(s.weight_decay);
  const V w = L::set1(kLerpLow ? s.one_minus_beta1 : s.one_minus_beta1 - 1.0f);
  const V beta2 = L::set1(s.beta2);
  const V omb2 = L::set1(s.one_minus_beta2);
  const V bc2 = L::set1(s.bias_correction2_sqrt);
  const V eps = L::set1(s.eps);
  const V nss = L::set1(s.neg_step_size);
  // One vector of lanes, loaded from / stored to the given bases at element index i.
  auto update = [&](void* pb, const void* gb, void* mb, void* vb, int64_t i)
                    __attribute__((always_inline)) {
    V p = L::template load<kPBf16>(pb, i);
    V g = L::template load<kGBf16>(gb, i);
    V m = L::template load<kMBf16>(mb, i);
    V v = L::template load<kVBf16>(vb, i);
    if (kMaximize) g = L::flip_sign(g);
    if (kDecoupled) {
      p = L::mul(p, decay);
    } else if (kWeightDecay) {
      g = L::fmadd(p, wd, g);
    }
    const V diff = L::sub(g, m);
    m = L::fmadd(w, diff, kLerpLow ? m : g);
    v = L::fmadd(L::mul(omb2, g), g, L::mul(v, beta2));
    const V denom = L::add(L::div(L::sqrt(v), bc2), eps);
    p = L::add(p, L::div(L::mul(nss, m), denom));
    // A NaN in m or v makes p NaN in the same lane: one test on p covers the three arrays.
    if (__builtin_expect(L::any_nan(p), 0)) {
      L::template store<kPBf16>(pb, i, p);
      L::template store<kMBf16>(mb, i, m);
      L::template store<kVBf16>(vb, i, v);
    } else {
      L::template store_finite<kPBf16>(pb, i, p);
      L::template store_finite<kMBf16>(mb, i, m);
      L::template store_finite<kVBf16>(vb, i, v);
    }
  };
  // Software prefetch L::kPrefetchAhead elements ahead (or none), one line per 32 elements of
  // each array (two for fp32 arrays).
  constexpr int64_t kAhead = L::kPrefetchAhead;
  auto prefetch = [](const void* base, int64_t i, bool bf16) __attribute__((always_inline)) {
    const uintptr_t a =
        reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(i) * (bf16 ? 2 : 4);
    __builtin_prefetch(reinterpret_cast<const void*>(a), 1, 3);
    if (!bf16) __builtin_prefetch(reinterpret_cast<const void*>(a + 64), 1, 3);
  };
  int64_t i = start;
  for (; i + 32 <= end; i += 32) {
    if (kAhead > 0) {
      prefetch(pp, i + kAhead, kPBf16);
      prefetch(gp, i + kAhead, kGBf16);
      prefetch(mp, i + kAhead, kMBf16);
      prefetch(vp, i + kAhead, kVBf16);
    }
    for (int64_t j = 0; j < 32; j += kLanes) update(pp, gp, mp, vp, i + j);
  }
  for (; i + kLanes <= end; i += kLanes) update(pp, gp, mp, vp, i);
  if (i < end) {
    // The tail (< kLanes elements) goes through the same vector code, via zero-padded local
    // copies: the scalar math could differ in the sign of a NaN (the compiler may fold a
    // negation).
    const int64_t n = end - i;
    alignas(64) float lp[kLanes] = {}, lg[kLanes] = {}, lm[kLanes] = {}, lv[kLanes] = {};
    const size_t pz = kPBf16 ? 2 : 4, gz = kGBf16 ? 2 : 4, mz = kMBf16 ? 2 : 4, vz = kVBf16 ? 2 : 4;
    std::memcpy(lp, static_cast<char*>(pp) + i * pz, n * pz);
    std::memcpy(lg, static_cast<const char*>(gp) + i * gz, n * gz);
    std::memcpy(lm, static_cast<char*>(mp) + i * mz, n * mz);
    std::memcpy(lv, static_cast<char*>(vp) + i * vz, n * vz);
    update(lp, lg, lm, lv, 0);
    std::memcpy(static_cast<char*>(pp) + i * pz, lp, n * pz);
    std::memcpy(static_cast<char*>(mp) + i * mz, lm, n * mz);
    std::memcpy(static_cast<char*>(vp) + i * vz, lv, n * vz);
  }
}

template <bool kMaximize, bool kDecoupled, bool kWeightDecay, bool kLerpLow>
inline bool adam_fast_flags(const Task& task, int64_t start, int64_t end,
                            const fmath::AdamScalars<float>& s) {
  // Index of the dtype combination: bit 3 param, 2 grad, 1 exp_avg, 0 exp_avg_sq are bf16.
  const int code = (task.dtype[fcpu::kParam] == fcpu::kBFloat16 ? 8 : 0) |
                   (task.dtype[fcpu::kGrad] == fcpu::kBFloat16 ? 4 : 0) |
                   (task.dtype[fcpu::kState0] == fcpu::kBFloat16 ? 2 : 0) |
                   (task.dtype[fcpu::kState1] == fcpu::kBFloat16 ? 1 : 0);
  using Fn = void (*)(void*, const void*, void*, void*, int64_t, int64_t,
                      const fmath::AdamScalars<float>&);
#define FUSED_OPTIM_FAST(P, G, M, V) \
  adam_fast_loop<FastLanes, P, G, M, V, kMaximize, kDecoupled, kWeightDecay, kLerpLow>
  static constexpr Fn table[16] = {
      FUSED_OPTIM_FAST(false, false, false, false), FUSED_OPTIM_FAST(false, false, false, true),
      FUSED_OPTIM_FAST(false, false, true, false),  FUSED_OPTIM_FAST(false, false, true, true),
      FUSED_OPTIM_FAST(false, true, false, false),  FUSED_OPTIM_FAST(false, true, false, true),
      FUSED_OPTIM_FAST(false, true, true, false),   FUSED_OPTIM_FAST(false, true, true, true),
      FUSED_OPTIM_FAST(true, false, false, false),  FUSED_OPTIM_FAST(true, false, false, true),
      FUSED_OPTIM_FAST(true, false, true, false),   FUSED_OPTIM_FAST(true, false, true, true),
      FUSED_OPTIM_FAST(true, true, false, false),   FUSED_OPTIM_FAST(true, true, false, true),
      FUSED_OPTIM_FAST(true, true, true, false),    FUSED_OPTIM_FAST(true, true, true, true),
  };
#undef FUSED_OPTIM_FAST
  table[code](task.data[fcpu::kParam], task.data[fcpu::kGrad], task.data[fcpu::kState0],
              task.data[fcpu::kState1], start, end, s);
  return true;
}

template <bool kMaximize, bool kDecoupled>
inline bool adam_fast_chunk_float(const Task& task, const Chunk& chunk, const AdamArgs& args,
                                  const fmath::AdamScalars<float>& f);

// Runs the chunk on the fast path and returns true, or returns false when it does not apply.
template <typename T, bool kAmsgrad, bool kMaximize, bool kDecoupled>
inline bool adam_fast_chunk(const Task& task, const Chunk& chunk, const AdamArgs& args,
                            const fmath::AdamScalars<T>& s) {
  if constexpr (sizeof(T) != 4 || kAmsgrad) {
    return false;
  } else {
    return adam_fast_chunk_float<kMaximize, kDecoupled>(task, chunk, args, s);
  }
}

template <bool kMaximize, bool kDecoupled>
inline bool adam_fast_chunk_float(const Task& task, const Chunk& chunk, const AdamArgs& args,
                                  const fmath::AdamScalars<float>& f) {
  if (args.grad.has_scale || args.grad.has_coef) return false;
  if (task.data[fcpu::kMaster] != nullptr) return false;
  for (int slot : {int(fcpu::kParam), int(fcpu::kGrad), int(fcpu::kState0), int(fcpu::kState1)}) {
    if (task.dtype[slot] != fcpu::kFloat32 && task.dtype[slot] != fcpu::kBFloat16) return false;
  }
  // fp32 params never round; bf16 params with stochastic rounding take the portable path.
  if (args.stochastic_rounding && task.dtype[fcpu::kParam] == fcpu::kBFloat16) return false;
  const int64_t start = chunk.start, end = chunk.start + chunk.length;
  const bool wd = f.weight_decay != 0.0f, low = f.one_minus_beta1 < 0.5f && f.one_minus_beta1 > -0.5f;
  if (low) {
    return wd ? adam_fast_flags<kMaximize, kDecoupled, true, true>(task, start, end, f)
              : adam_fast_flags<kMaximize, kDecoupled, false, true>(task, start, end, f);
  }
  return wd ? adam_fast_flags<kMaximize, kDecoupled, true, false>(task, start, end, f)
            : adam_fast_flags<kMaximize, kDecoupled, false, false>(task, start, end, f);
}
#endif  // FUSED_OPTIM_HAVE_AVX2

template <typename T, bool kAmsgrad, bool kMaximize, bool kDecoupled>
void adam_chunk(const Task& task, const Chunk& chunk, const AdamArgs& args) {
  fmath::AdamScalars<T> s;
  s.neg_step_size = static_cast<T>(task.scalar[0]);
  s.bias_correction2_sqrt = static_cast<T>(task.scalar[1]);
  const double* hyper = task.hyper;
  s.one_minus_beta1 = static_cast<T>(1.0 - hyper[::fused_optim::kHyperBeta1]);
  s.beta2 = static_cast<T>(hyper[::fused_optim::kHyperBeta2]);
  s.one_minus_beta2 = static_cast<T>(1.0 - hyper[::fused_optim::kHyperBeta2]);
  s.eps = static_cast<T>(hyper[::fused_optim::kHyperEps]);
  s.weight_decay = static_cast<T>(hyper[::fused_optim::kHyperWeightDecay]);
  s.decay = static_cast<T>(task.scalar[2]);
#ifdef FUSED_OPTIM_HAVE_AVX2
  if (!args.complex_arithmetic &&
      adam_fast_chunk<T, kAmsgrad, kMaximize, kDecoupled>(task, chunk, args, s)) {
    return;
  }
#endif
  const int p_slot = task.data[fcpu::kMaster] != nullptr ? fcpu::kMaster : fcpu::kParam;
  alignas(64) T pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock], xb[kBlock];
  const int64_t end = chunk.start + chunk.length;
  for (int64_t offset = chunk.start; offset < end; offset += kBlock) {
    const int64_t n = std::min(kBlock, end - offset);
    prefetch_next(task, offset + kBlock, end);
    bool pd, gd, md, vd, xd = true;
    T* p = open_block(task, p_slot, offset, n, pb, pd);
    T* g = open_block(task, fcpu::kGrad, offset, n, gb, gd);
    g = prepare_grad(task, g, gd, offset, n, args.grad, gb);
    T* m = open_block(task, fcpu::kState0, offset, n, mb, md);
    T* v = open_block(task, fcpu::kState1, offset, n, vb, vd);
    T* x = kAmsgrad ? open_block(task, fcpu::kState2, offset, n, xb, xd) : xb;
    if (args.complex_arithmetic) {
      adam_loop<T, kAmsgrad, kMaximize, kDecoupled, true>(p, g, m, v, x, n, s);
    } else {
      adam_loop<T, kAmsgrad, kMaximize, kDecoupled, false>(p, g, m, v, x, n, s);
    }
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

template <typename T, bool kMomentum, bool kNesterov, bool kMaximize, bool kComplex>
inline void sgd_loop(T* __restrict p, const T* __restrict g, T* __restrict buf, bool new_buffer,
                     int64_t n, const fmath::SgdScalars<T> scalars) {
  for (int64_t i = 0; i < n; ++i) {
    T pi = p[i];
    T bi = kMomentum ? buf[i] : T(0);
    fmath::sgd_update<T, kMomentum, kNesterov, kMaximize, kComplex>(pi, g[i], bi, new_buffer,
                                                                    scalars);
    p[i] = pi;
    if (kMomentum) buf[i] = bi;
  }
}

template <typename T, bool kMomentum, bool kNesterov, bool kMaximize>
void sgd_chunk(const Task& task, const Chunk& chunk, const SgdArgs& args) {
  fmath::SgdScalars<T> s;
  const double* hyper = task.hyper;
  s.lr = static_cast<T>(hyper[::fused_optim::kHyperLr]);
  s.momentum = static_cast<T>(hyper[::fused_optim::kHyperMomentum]);
  s.one_minus_dampening = static_cast<T>(1.0 - hyper[::fused_optim::kHyperDampening]);
  s.weight_decay = static_cast<T>(hyper[::fused_optim::kHyperWeightDecay]);
  const int p_slot = task.data[fcpu::kMaster] != nullptr ? fcpu::kMaster : fcpu::kParam;
  alignas(64) T pb[kBlock], gb[kBlock], bb[kBlock];
  const int64_t end = chunk.start + chunk.length;
  for (int64_t offset = chunk.start; offset < end; offset += kBlock) {
    const int64_t n = std::min(kBlock, end - offset);
    prefetch_next(task, offset + kBlock, end);
    bool pd, gd, bd = true;
    T* p = open_block(task, p_slot, offset, n, pb, pd);
    T* g = open_block(task, fcpu::kGrad, offset, n, gb, gd);
    g = prepare_grad(task, g, gd, offset, n, args.grad, gb);
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
    if (args.complex_arithmetic) {
      sgd_loop<T, kMomentum, kNesterov, kMaximize, true>(p, g, b, task.new_buffer, n, s);
    } else {
      sgd_loop<T, kMomentum, kNesterov, kMaximize, false>(p, g, b, task.new_buffer, n, s);
    }
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

// The two entry points a per-ISA translation unit exports (kernel_api.h declares them), written
// once: each unit includes this file in its anonymous namespace under its own target flags, then
// says FUSED_OPTIM_CPU_ENTRY_POINTS(base), (avx2) or (avx512) at file scope.
#define FUSED_OPTIM_CPU_ENTRY_POINTS(SUFFIX)                                                   \
  namespace fused_optim {                                                                      \
  namespace cpu {                                                                              \
  void sgd_##SUFFIX(const Task* tasks, const Chunk* chunks, int64_t n, const SgdArgs& args) {  \
    sgd_dispatch(tasks, chunks, n, args);                                                      \
  }                                                                                            \
  void adam_##SUFFIX(const Task* tasks, const Chunk* chunks, int64_t n, const AdamArgs& args) { \
    adam_dispatch(tasks, chunks, n, args);                                                     \
  }                                                                                            \
  void grad_norm_##SUFFIX(const Task* tasks, const Chunk* chunks, int64_t n,                  \
                          const NormArgs& args, double* partials) {                           \
    grad_norm_all(tasks, chunks, n, args, partials);                                          \
  }                                                                                           \
  }                                                                                            \
  }
