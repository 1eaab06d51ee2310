// Fused CPU layer ops: RMSNorm (with the residual add), neox rotary embedding on q and k,
// SiLU-and-multiply, and the KV-cache write. Each replaces a handful of torch ops (and
// their temporaries) with one pass over the rows.
//
// Called from engine/cpu_ops.py, which checks shapes, dtypes and strides before
// the call; here only values that would index memory (positions, block ids) are checked.
//
// Every op rounds where its torch reference (engine/models/layers.py) rounds, so in half
// precision the results are the reference's bit for bit but for the order of a sum:
//   rms_norm: (x + residual) rounded to the dtype, the norm in float32, one rounding;
//   rotary:   cos and sin rounded to the dtype, then each product and the sum rounded;
//   silu_and_mul: silu(gate) rounded, then the product rounded.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }
inline float to_f32(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_f32(float x);
template <>
inline float from_f32<float>(float x) { return x; }
template <>
inline c10::Half from_f32<c10::Half>(float x) { return c10::Half(x); }
template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float x) {
  // Round to nearest even, as c10 does, written so loops vectorize; NaN stays NaN.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  c10::BFloat16 out;
  if (std::isnan(x)) {
    out.x = 0x7FC0;
  } else {
    out.x = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
  return out;
}

// The value a torch op of dtype T would hold after rounding a float result.
template <typename T>
inline float round_as(float x) { return to_f32(from_f32<T>(x)); }

#if defined(__AVX512F__)
// 16 lanes at a time, for float32 and bfloat16 (the compiler does not vectorize the scalar
// conversions above: measured 6x slower than torch for SiLU before these).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// Round to nearest even, NaN kept a quiet NaN: c10::BFloat16(float)'s rounding.
inline __m256i to_bf16x16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(c10::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(x));
}
inline __m512 round16(float*, __m512 x) { return x; }
inline __m512 round16(c10::BFloat16*, __m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(x)), 16));
}
template <typename T>
inline __m512 round16(__m512 x) { return round16(static_cast<T*>(nullptr), x); }

inline __m512 exp16(__m512 x) {  // the scalar fast_exp below, 16 at a time
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const float poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  __m512 p = _mm512_set1_ps(poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(poly[i]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

template <typename T>
constexpr bool kVector16 =
#if defined(__AVX512F__)
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

// Rows of work below this many elements run on one thread: a parallel region costs more.
constexpr int64_t kSerialElements = 1 << 14;

template <typename F>
void for_rows(int64_t num_rows, int64_t row_elements, const F& body) {
  if (num_rows * row_elements < kSerialElements || num_rows == 1) {
    body(0, num_rows);
  } else {
    at::parallel_for(0, num_rows, 1, body);
  }
}

#if defined(__AVX512F__)
template <typename T>
inline void norm_row16(const T* row, T* res, const T* w, T* dst, int64_t hidden, float eps) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < hidden; i += 16) {
    __m512 v = load16(row + i);
    if (res) {
      v = round16<T>(_mm512_add_ps(v, load16(res + i)));
      store16(res + i, v);
    }
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(sum) / static_cast<float>(hidden) + eps);
  const __m512 scale = _mm512_set1_ps(inv);
  const T* src = res ? res : row;
  for (int64_t i = 0; i < hidden; i += 16) {
    store16(dst + i, _mm512_mul_ps(_mm512_mul_ps(load16(src + i), scale), load16(w + i)));
  }
}
#else
template <typename T>
inline void norm_row16(const T*, T*, const T*, T*, int64_t, float) {}
#endif

// x, out: [num_rows, hidden] (rows strided, last dim contiguous; out may be x itself);
// residual likewise, or absent. With a residual: residual = x + residual (rounded), then
// out = norm(residual) * weight; without: out = norm(x) * weight.
template <typename T>
void rms_norm_impl(const torch::Tensor& x, torch::Tensor* residual, const torch::Tensor& weight,
                   double eps, torch::Tensor& out) {
  const int64_t num_rows = x.size(0), hidden = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* rp = residual ? residual->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0, os = out.stride(0);
  const T* wp = weight.data_ptr<T>();
  const float epsf = static_cast<float>(eps);
  for_rows(num_rows, hidden, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * xs;
      T* res = rp ? rp + r * rs : nullptr;
      T* dst = op + r * os;
      if constexpr (kVector16<T>) {
        if (hidden % 16 == 0) {
          norm_row16<T>(row, res, wp, dst, hidden, epsf);
          continue;
        }
      }
      float sum = 0.0f;
      if (res) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; ++i) {
          const float v = round_as<T>(to_f32(row[i]) + to_f32(res[i]));
          res[i] = from_f32<T>(v);
          sum += v * v;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; ++i) {
          const float v = to_f32(row[i]);
          sum += v * v;
        }
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(hidden) + epsf);
      const T* src = res ? res : row;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) {
        dst[i] = from_f32<T>(to_f32(src[i]) * inv * to_f32(wp[i]));
      }
    }
  });
}

void rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
              double eps, torch::Tensor out) {
  torch::Tensor* res = residual.has_value() ? &residual.value() : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: rms_norm_impl<float>(x, res, weight, eps, out); break;
    case at::kBFloat16: rms_norm_impl<c10::BFloat16>(x, res, weight, eps, out); break;
    case at::kHalf: rms_norm_impl<c10::Half>(x, res, weight, eps, out); break;
    default: TORCH_CHECK_VALUE(false, "rms_norm: unsupported dtype ", x.scalar_type());
  }
}

// One head row of neox rotary: the first rot/2 and the next rot/2 dims are rotated.
template <typename T>
inline void rotate_row(T* x, const float* cos, const float* sin, int64_t half) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (kVector16<T>) {
    for (; i + 16 <= half; i += 16) {
      const __m512 x1 = load16(x + i), x2 = load16(x + i + half);
      const __m512 c = _mm512_loadu_ps(cos + i), s = _mm512_loadu_ps(sin + i);
      const __m512 a = _mm512_sub_ps(round16<T>(_mm512_mul_ps(x1, c)),
                                     round16<T>(_mm512_mul_ps(x2, s)));
      const __m512 b = _mm512_add_ps(round16<T>(_mm512_mul_ps(x2, c)),
                                     round16<T>(_mm512_mul_ps(x1, s)));
      store16(x + i, a);
      store16(x + i + half, b);
    }
  }
#endif
  for (; i < half; ++i) {
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    const float c = cos[i], s = sin[i];
    const float a = round_as<T>(round_as<T>(x1 * c) - round_as<T>(x2 * s));
    const float b = round_as<T>(round_as<T>(x2 * c) + round_as<T>(x1 * s));
    x[i] = from_f32<T>(a);
    x[i + half] = from_f32<T>(b);
  }
}

// q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim] (heads and
// dims contiguous within a token); cos, sin: [max_positions, rot/2] float32. In place.
template <typename T>
void rotary_impl(const torch::Tensor& positions, torch::Tensor& q, torch::Tensor& k,
                 const torch::Tensor& cos, const torch::Tensor& sin, int64_t rotary_dim) {
  const int64_t num_tokens = q.size(0), nq = q.size(1), nk = k.size(1), d = q.size(2);
  const int64_t half = rotary_dim / 2, max_pos = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK_VALUE(pos[t] >= 0 && pos[t] < max_pos, "positions[", t, "] = ", pos[t],
                      " outside [0, ", max_pos, ")");
  }
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const int64_t qs = q.stride(0), ks = k.stride(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for_rows(num_tokens, (nq + nk) * d, [&](int64_t begin, int64_t end) {
    float c[256], s[256];  // rot/2 <= 256: head_dim <= 512, checked by the caller
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        c[i] = round_as<T>(cp[pos[t] * half + i]);  // the reference casts cos, sin first
        s[i] = round_as<T>(sp[pos[t] * half + i]);
      }
      for (int64_t h = 0; h < nq; ++h) rotate_row<T>(qp + t * qs + h * d, c, s, half);
      for (int64_t h = 0; h < nk; ++h) rotate_row<T>(kp + t * ks + h * d, c, s, half);
    }
  });
}

void rotary_embedding(torch::Tensor positions, torch::Tensor q, torch::Tensor k,
                      torch::Tensor cos, torch::Tensor sin, int64_t rotary_dim) {
  switch (q.scalar_type()) {
    case at::kFloat: rotary_impl<float>(positions, q, k, cos, sin, rotary_dim); break;
    case at::kBFloat16: rotary_impl<c10::BFloat16>(positions, q, k, cos, sin, rotary_dim); break;
    case at::kHalf: rotary_impl<c10::Half>(positions, q, k, cos, sin, rotary_dim); break;
    default: TORCH_CHECK_VALUE(false, "rotary_embedding: unsupported dtype ", q.scalar_type());
  }
}

// exp(x) by Cody-Waite reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial and a
// scale by 2^n, clamped to float's normal range: relative error about 2e-7, and unlike
// std::exp the loops that call it vectorize (SiLU over a batch's MLP rows is ~3M calls a
// step). Rounded to bf16 or fp16 it lands on torch's result, at most one unit off.
constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * kLog2e + 0.5f);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline float silu(float x) { return x / (1.0f + fast_exp(-x)); }

// Index of each row's largest value (the first of ties, as torch's max), NaN aside.
template <typename T>
void row_argmax_impl(const torch::Tensor& x, torch::Tensor& out) {
  const int64_t num_rows = x.size(0), n = x.size(1), xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  int64_t* op = out.data_ptr<int64_t>();
  for_rows(num_rows, n, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * xs;
      // Two passes: the max (vectorized), then its first position.
      float best = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : best)
      for (int64_t i = 0; i < n; ++i) best = std::max(best, to_f32(row[i]));
      int64_t index = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (to_f32(row[i]) == best) {
          index = i;
          break;
        }
      }
      op[r] = index;
    }
  });
}

void row_argmax(torch::Tensor x, torch::Tensor out) {
  switch (x.scalar_type()) {
    case at::kFloat: row_argmax_impl<float>(x, out); break;
    case at::kBFloat16: row_argmax_impl<c10::BFloat16>(x, out); break;
    case at::kHalf: row_argmax_impl<c10::Half>(x, out); break;
    default: TORCH_CHECK_VALUE(false, "row_argmax: unsupported dtype ", x.scalar_type());
  }
}

// gate_up: [num_rows, 2 * inter] (gate, then up); out: [num_rows, inter] contiguous.
template <typename T>
void silu_and_mul_impl(const torch::Tensor& gate_up, torch::Tensor& out) {
  const int64_t num_rows = gate_up.size(0), inter = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t gs = gate_up.stride(0);
  for_rows(num_rows, inter, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * gs;
      const T* u = g + inter;
      T* o = op + r * inter;
      int64_t i = 0;
#if defined(__AVX512F__)
      if constexpr (kVector16<T>) {
        for (; i + 16 <= inter; i += 16) {
          const __m512 x = load16(g + i);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
          const __m512 s = round16<T>(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
          store16(o + i, _mm512_mul_ps(s, load16(u + i)));
        }
      }
#endif
      for (; i < inter; ++i) {
        o[i] = from_f32<T>(round_as<T>(silu(to_f32(g[i]))) * to_f32(u[i]));
      }
    }
  });
}

void silu_and_mul(torch::Tensor gate_up, torch::Tensor out) {
  switch (gate_up.scalar_type()) {
    case at::kFloat: silu_and_mul_impl<float>(gate_up, out); break;
    case at::kBFloat16: silu_and_mul_impl<c10::BFloat16>(gate_up, out); break;
    case at::kHalf: silu_and_mul_impl<c10::Half>(gate_up, out); break;
    default: TORCH_CHECK_VALUE(false, "silu_and_mul: unsupported dtype ", gate_up.scalar_type());
  }
}

// k, v: [num_tokens, num_kv_heads, head_dim] (a token's heads and dims contiguous);
// kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] contiguous;
// slot_block, slot_offset: [num_tokens] int64. Token t goes to block slot_block[t], row
// slot_offset[t], of layer layer_idx.
void reshape_and_cache(torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache,
                       torch::Tensor slot_block, torch::Tensor slot_offset, int64_t layer_idx) {
  const int64_t num_tokens = k.size(0), num_blocks = kv_cache.size(0);
  const int64_t num_layers = kv_cache.size(1), block_size = kv_cache.size(3);
  const int64_t row = kv_cache.size(4) * kv_cache.size(5);
  TORCH_CHECK_VALUE(layer_idx >= 0 && layer_idx < num_layers, "layer_idx ", layer_idx);
  const int64_t* blocks = slot_block.data_ptr<int64_t>();
  const int64_t* offsets = slot_offset.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK_VALUE(blocks[t] >= 0 && blocks[t] < num_blocks, "slot_block[", t, "] = ",
                      blocks[t], " outside [0, ", num_blocks, ")");
    TORCH_CHECK_VALUE(offsets[t] >= 0 && offsets[t] < block_size, "slot_offset[", t, "] = ",
                      offsets[t], " outside [0, ", block_size, ")");
  }
  const int64_t elem = kv_cache.element_size();
  char* cache = static_cast<char*>(kv_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * elem, vs = v.stride(0) * elem, bytes = row * elem;
  const int64_t block_stride = num_layers * 2 * block_size * bytes;
  const int64_t layer_offset = layer_idx * 2 * block_size * bytes;
  for_rows(num_tokens, 2 * row, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      char* dst = cache + blocks[t] * block_stride + layer_offset + offsets[t] * bytes;
      std::memcpy(dst, kp + t * ks, bytes);
      std::memcpy(dst + block_size * bytes, vp + t * vs, bytes);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm into out, after the residual add when given.");
  m.def("rotary_embedding", &rotary_embedding, "Neox rotary embedding of q and k, in place.");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up into out.");
  m.def("row_argmax", &row_argmax, "Index of each row's first largest value.");
  m.def("reshape_and_cache", &reshape_and_cache, "Write new K and V rows into the KV cache.");
}
