// Decode attention that reads K/V where they lie in the paged cache (no gather copy).
//
// Called from engine/attention/cpu_native.py, which checks shapes, dtypes and strides
// before the call; here only the values (lengths, block ids) are checked, because a bad
// one would read outside the cache.
//
// One task is one decode row and a range of its kv heads (all of them when there are rows
// enough to keep the threads busy). Softmax is online over chunks of kChunk tokens: score
// the chunk, rescale the running sum and output, add the chunk's V. Within a chunk every
// kv head of the task is done before the next chunk, so a block's token rows (kv heads
// side by side) are read as one stretch; the query heads sharing a kv head are scored
// together, so each K and V row is read from memory once.
//
// Three chunk kernels: a generic one (any dtype and head_dim, compiler-vectorized); where
// the compiler targets AVX-512, one for float32/bfloat16 with head_dim 64 or 128 that keeps
// the query and output rows of up to 16 registers' worth of heads in registers; and where
// it targets AVX512-BF16, one for bfloat16 with head_dim 64 that scores with VDPBF16PS.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 32;  // tokens per online-softmax step

// The geometry of one call, in elements.
struct Geometry {
  int64_t num_kv_heads, group, head_dim, block_size, max_blocks;
  int64_t heads_per_task;  // kv heads one task takes (the last task of a row may take fewer)
  int64_t block_stride;    // from one block to the next (all layers, K and V)
  int64_t layer_offset;    // from a block's start to this layer's K
  int64_t kv_offset;       // from K to V within one block and layer
  int64_t token_stride;    // from one token to the next within a block
  int64_t q_row_stride, q_head_stride, out_row_stride, out_head_stride;
  float scale;
};

// The running softmax state of one chunk call: num_q query heads sharing one kv head.
// K row of token t: rows[t] + k_off; V row: rows[t] + v_off.
template <typename T>
struct ChunkArgs {
  const float* q;  // [num_q, head_dim], already scaled
  const T* qb;     // [num_q, head_dim], the query as given (read by the AVX512-BF16 kernel)
  float scale;
  const T* const* rows;
  int64_t n, k_off, v_off, num_q, head_dim;
  float* m;    // [num_q] running max
  float* l;    // [num_q] running sum of exp
  float* acc;  // [num_q, head_dim] running output, not yet divided by l
};

inline float to_f32(float x) { return x; }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }
inline float to_f32(c10::BFloat16 x) {
  // A shift rather than c10's helper, so the loops over head_dim vectorize.
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// exp(x) for x <= 0 (a score minus its running max): Cody-Waite reduction to
// r in [-ln2/2, ln2/2], a degree-6 polynomial, then times 2^n. Relative error about 2e-7.
constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // keeps 2^n a normal float; exp(-87) is 1.6e-38
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

// Turns head h's chunk scores s[0, n) into exp(s - new max) and rescales its state.
inline void softmax_update(float* s, int64_t n, int64_t head_dim, float& m, float& l,
                           float* acc) {
  float chunk_max = s[0];
  for (int64_t t = 1; t < n; ++t) chunk_max = std::max(chunk_max, s[t]);
  const float new_max = std::max(m, chunk_max);
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = exp_nonpositive(s[t] - new_max);
    sum += s[t];
  }
  const float correction = exp_nonpositive(m - new_max);  // ~0 on the first chunk
  l = l * correction + sum;
  m = new_max;
#pragma omp simd
  for (int64_t i = 0; i < head_dim; ++i) acc[i] *= correction;
}

// Any dtype and head_dim.
template <typename T>
void chunk_generic(const ChunkArgs<T>& a) {
  const int64_t d = a.head_dim;
  float s[kChunk];
  for (int64_t h = 0; h < a.num_q; ++h) {
    const float* q = a.q + h * d;
    for (int64_t t = 0; t < a.n; ++t) {
      const T* k = a.rows[t] + a.k_off;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d; ++i) dot += q[i] * to_f32(k[i]);
      s[t] = dot;
    }
    float* acc = a.acc + h * d;
    softmax_update(s, a.n, d, a.m[h], a.l[h], acc);
    for (int64_t t = 0; t < a.n; ++t) {
      const T* v = a.rows[t] + a.v_off;
      const float p = s[t];
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) acc[i] += p * to_f32(v[i]);
    }
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// DV registers per row (head_dim = 16 * DV), NQ query heads: the NQ * DV output registers
// stay in registers for the whole chunk.
// The rest of a chunk once its scores s are in: online softmax, then the V rows into the
// NQ * DV output registers.
template <typename T, int DV, int NQ>
void finish_chunk(const ChunkArgs<T>& a, float (&s)[NQ][kChunk]);

template <typename T, int DV, int NQ>
void chunk_avx512(const ChunkArgs<T>& a) {
  alignas(64) float s[NQ][kChunk];
  for (int64_t t = 0; t < a.n; ++t) {
    __m512 k[DV];
    for (int i = 0; i < DV; ++i) k[i] = load16(a.rows[t] + a.k_off + 16 * i);
    for (int h = 0; h < NQ; ++h) {
      __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(a.q + h * 16 * DV), k[0]);
      for (int i = 1; i < DV; ++i) {
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(a.q + h * 16 * DV + 16 * i), k[i], dot);
      }
      s[h][t] = _mm512_reduce_add_ps(dot);
    }
  }
  finish_chunk<T, DV, NQ>(a, s);
}

template <typename T, int DV, int NQ>
void finish_chunk(const ChunkArgs<T>& a, float (&s)[NQ][kChunk]) {
  constexpr int kVecs = kChunk / 16;
  __m512 acc[NQ][DV];
  for (int h = 0; h < NQ; ++h) {
    __mmask16 valid[kVecs];
    __m512 sv[kVecs];
    float chunk_max = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < kVecs; ++j) {
      const int64_t left = std::clamp<int64_t>(a.n - 16 * j, 0, 16);
      valid[j] = static_cast<__mmask16>((1u << left) - 1u);
      sv[j] = _mm512_maskz_loadu_ps(valid[j], s[h] + 16 * j);
      if (left) chunk_max = std::max(chunk_max, _mm512_mask_reduce_max_ps(valid[j], sv[j]));
    }
    const float new_max = std::max(a.m[h], chunk_max);
    float sum = 0.0f;
    for (int j = 0; j < kVecs; ++j) {
      const __m512 e = exp16_nonpositive(_mm512_sub_ps(sv[j], _mm512_set1_ps(new_max)));
      _mm512_store_ps(s[h] + 16 * j, _mm512_maskz_mov_ps(valid[j], e));
      sum += _mm512_mask_reduce_add_ps(valid[j], e);
    }
    const float correction = exp_nonpositive(a.m[h] - new_max);  // ~0 on the first chunk
    a.l[h] = a.l[h] * correction + sum;
    a.m[h] = new_max;
    const __m512 c = _mm512_set1_ps(correction);
    for (int i = 0; i < DV; ++i) acc[h][i] = _mm512_mul_ps(load16(a.acc + h * 16 * DV + 16 * i), c);
  }
  for (int64_t t = 0; t < a.n; ++t) {
    __m512 v[DV];
    for (int i = 0; i < DV; ++i) v[i] = load16(a.rows[t] + a.v_off + 16 * i);
    for (int h = 0; h < NQ; ++h) {
      const __m512 p = _mm512_set1_ps(s[h][t]);
      for (int i = 0; i < DV; ++i) acc[h][i] = _mm512_fmadd_ps(p, v[i], acc[h][i]);
    }
  }
  for (int h = 0; h < NQ; ++h) {
    for (int i = 0; i < DV; ++i) _mm512_storeu_ps(a.acc + h * 16 * DV + 16 * i, acc[h][i]);
  }
}

#if defined(__AVX512BF16__)
// bfloat16 with head_dim 64: each score is two VDPBF16PS on the raw bf16 query and key
// (exact products, float32 sums), and the 16 partial-sum vectors of 16 tokens are folded
// into one vector of their 16 scores by a transpose-and-add tree (15 folds of 3
// instructions) instead of 16 horizontal reductions of ~8 each.
inline __m512bh load_bf16x32(const c10::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}

inline __m512 dot_partial(__m512bh q0, __m512bh q1, const c10::BFloat16* k) {
  return _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q0, load_bf16x32(k)), q1,
                          load_bf16x32(k + 32));
}

// Folds: two vectors' lanes summed pairwise into one (per 128-bit lane: a, b, a, b), four
// into one (a, b, c, d per 128-bit lane), then across 128-bit lanes.
inline __m512 fold2(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
inline __m512 fold4(__m512 ab, __m512 cd) {
  const __m512d x = _mm512_castps_pd(ab), y = _mm512_castps_pd(cd);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
inline __m512 fold_lanes(__m512 e, __m512 f) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(e, f, 0x88), _mm512_shuffle_f32x4(e, f, 0xDD));
}

// Lane t: the unscaled score of token rows[t] (t < 16) against the query (q0, q1).
inline __m512 scores16(__m512bh q0, __m512bh q1, const c10::BFloat16* const* rows,
                       int64_t k_off) {
  __m512 eight[2];
  for (int half = 0; half < 2; ++half) {
    __m512 four[2];
    for (int quad = 0; quad < 2; ++quad) {
      const c10::BFloat16* const* r = rows + 8 * half + 4 * quad;
      four[quad] = fold4(fold2(dot_partial(q0, q1, r[0] + k_off), dot_partial(q0, q1, r[1] + k_off)),
                         fold2(dot_partial(q0, q1, r[2] + k_off), dot_partial(q0, q1, r[3] + k_off)));
    }
    eight[half] = fold_lanes(four[0], four[1]);
  }
  return fold_lanes(eight[0], eight[1]);
}

// Rows past n are padding (the caller repeats the last row), scored and then masked.
template <int NQ>
void chunk_bf16_dot(const ChunkArgs<c10::BFloat16>& a) {
  alignas(64) float s[NQ][kChunk];
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int h = 0; h < NQ; ++h) {
    const __m512bh q0 = load_bf16x32(a.qb + h * 64), q1 = load_bf16x32(a.qb + h * 64 + 32);
    for (int64_t j = 0; 16 * j < a.n; ++j) {
      _mm512_store_ps(s[h] + 16 * j,
                      _mm512_mul_ps(scores16(q0, q1, a.rows + 16 * j, a.k_off), scale));
    }
  }
  finish_chunk<c10::BFloat16, 4, NQ>(a, s);
}
#endif
#endif

template <typename T>
using ChunkFn = void (*)(const ChunkArgs<T>&);

// The chunk kernel for the next `num_q` query heads of a group, and how many it takes.
template <typename T>
std::pair<ChunkFn<T>, int64_t> pick_kernel([[maybe_unused]] int64_t head_dim, int64_t num_q) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (head_dim == 64) {
        static constexpr ChunkFn<T> fns[] = {chunk_bf16_dot<1>, chunk_bf16_dot<2>,
                                             chunk_bf16_dot<3>, chunk_bf16_dot<4>};
        const int64_t nq = std::min<int64_t>(num_q, 4);
        return {fns[nq - 1], nq};
      }
    }
#endif
    if (head_dim == 64) {
      static constexpr ChunkFn<T> fns[] = {chunk_avx512<T, 4, 1>, chunk_avx512<T, 4, 2>,
                                           chunk_avx512<T, 4, 3>, chunk_avx512<T, 4, 4>};
      const int64_t nq = std::min<int64_t>(num_q, 4);
      return {fns[nq - 1], nq};
    }
    if (head_dim == 128) {
      static constexpr ChunkFn<T> fns[] = {chunk_avx512<T, 8, 1>, chunk_avx512<T, 8, 2>};
      const int64_t nq = std::min<int64_t>(num_q, 2);
      return {fns[nq - 1], nq};
    }
  }
#endif
  return {chunk_generic<T>, num_q};
}

// Asks for a row of the next chunk, into L2, before it is needed: blocks sit anywhere in
// the cache, so the hardware prefetcher loses the stream at every block boundary. Into L2
// (not L1) and spread over the chunk's work: a burst of L1 prefetches fills the miss
// buffers and stalls the loads the kernel is waiting on (measured: this way is ~20% faster
// cold, the burst no faster than none).
inline void prefetch_row(const void* start, int64_t num_bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t off = 0; off < num_bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

// Whether chunk_bf16_dot (which reads the raw query, Scratch::qb) is built for T.
template <typename T>
constexpr bool kHasBf16Dot =
#if defined(__AVX512BF16__)
    std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

// Per-thread buffers, sized once per call for a task of up to heads_per_task kv heads.
struct Scratch {
  std::vector<float> q, acc, m, l;
  std::vector<c10::BFloat16> qb;  // the task's query rows as given, for chunk_bf16_dot
  std::vector<const void*> rows;  // each token's row (at kv head 0), then kChunk repeats
  explicit Scratch(const Geometry& g)
      : q(g.heads_per_task * g.group * g.head_dim),
        acc(q.size()),
        qb(q.size()),
        m(g.heads_per_task * g.group),
        l(m.size()),
        rows(g.max_blocks * g.block_size + kChunk) {}
};

// Attention of one decode row over its kv heads [h0, h1) and their query heads.
template <typename T>
void attend_row(const T* q, T* out, const T* cache, const int64_t* blocks, int64_t seq_len,
                int64_t h0, int64_t h1, const Geometry& g, Scratch& w) {
  const int64_t d = g.head_dim, num_q = (h1 - h0) * g.group;
  for (int64_t h = 0; h < num_q; ++h) {
    const T* qh = q + (h0 * g.group + h) * g.q_head_stride;
    for (int64_t i = 0; i < d; ++i) w.q[h * d + i] = to_f32(qh[i]) * g.scale;
    if constexpr (kHasBf16Dot<T>) {
      if (d == 64) std::copy_n(qh, d, w.qb.data() + h * d);
    }
  }
  const T* qb = nullptr;
  if constexpr (kHasBf16Dot<T>) qb = w.qb.data();
  std::fill_n(w.acc.begin(), num_q * d, 0.0f);
  std::fill_n(w.m.begin(), num_q, -std::numeric_limits<float>::infinity());
  std::fill_n(w.l.begin(), num_q, 0.0f);
  auto** rows = reinterpret_cast<const T**>(w.rows.data());
  for (int64_t pos = 0, b = 0; pos < seq_len; ++b) {
    const T* block = cache + g.layer_offset + blocks[b] * g.block_stride;
    for (int64_t o = 0; o < g.block_size && pos < seq_len; ++o, ++pos) {
      rows[pos] = block + o * g.token_stride;
    }
  }
  std::fill(rows + seq_len, rows + seq_len + kChunk, rows[seq_len - 1]);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t start = 0; start < seq_len; start += kChunk) {
    const int64_t n = std::min(kChunk, seq_len - start);
    for (int64_t kv = h0; kv < h1; ++kv) {
      for (int64_t t = start + kChunk; t < start + kChunk + n; ++t) {
        prefetch_row(rows[t] + kv * d, row_bytes);
        prefetch_row(rows[t] + g.kv_offset + kv * d, row_bytes);
      }
      for (int64_t first = 0; first < g.group;) {
        const auto [kernel, num] = pick_kernel<T>(d, g.group - first);
        const int64_t j = (kv - h0) * g.group + first;  // first query head, in the task
        kernel({w.q.data() + j * d, qb == nullptr ? nullptr : qb + j * d, g.scale, rows + start,
                n, kv * d, g.kv_offset + kv * d, num, d, w.m.data() + j, w.l.data() + j,
                w.acc.data() + j * d});
        first += num;
      }
    }
  }
  for (int64_t h = 0; h < num_q; ++h) {
    const float inv = 1.0f / w.l[h];
    T* oh = out + (h0 * g.group + h) * g.out_head_stride;
    for (int64_t i = 0; i < d; ++i) oh[i] = static_cast<T>(w.acc[h * d + i] * inv);
  }
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& cache, const int64_t* tables,
         const int64_t* seq_lens, int64_t num_rows, const Geometry& g, torch::Tensor& out) {
  const T* q_ptr = q.data_ptr<T>();
  const T* cache_ptr = cache.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t tasks_per_row = (g.num_kv_heads + g.heads_per_task - 1) / g.heads_per_task;
  const int64_t num_tasks = num_rows * tasks_per_row;
  // Dynamic: rows differ in length, and a static split leaves one thread idle at the end.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    Scratch w(g);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; ++task) {
      const int64_t row = task / tasks_per_row;
      const int64_t h0 = task % tasks_per_row * g.heads_per_task;
      const int64_t h1 = std::min(h0 + g.heads_per_task, g.num_kv_heads);
      attend_row<T>(q_ptr + row * g.q_row_stride, out_ptr + row * g.out_row_stride, cache_ptr,
                    tables + row * g.max_blocks, seq_lens[row], h0, h1, g, w);
    }
  }
}

// Kv heads per task: a whole row (its token rows are contiguous across kv heads) unless
// that leaves too few tasks to keep every thread busy, as with a handful of long rows.
int64_t heads_per_task(int64_t num_rows, int64_t num_kv_heads) {
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t splits = std::min(num_kv_heads, (wanted_tasks + num_rows - 1) / num_rows);
  return (num_kv_heads + splits - 1) / splits;
}

// q: [num_rows, num_heads, head_dim] (last dim contiguous)
// kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] contiguous
// block_tables: [num_rows, max_blocks] int64 contiguous
// seq_lens: [num_rows] int64 contiguous
// out: [num_rows, num_heads, head_dim] (last dim contiguous), written in place
void paged_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                  const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                  int64_t layer_idx, double scale, torch::Tensor out) {
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.is_contiguous(), "kv_cache layout");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q/out: last dim must be contiguous");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(), "tables layout");
  const int64_t num_rows = q.size(0), num_blocks = kv_cache.size(0);
  const int64_t num_layers = kv_cache.size(1), block_size = kv_cache.size(3);
  const int64_t num_kv_heads = kv_cache.size(4), head_dim = kv_cache.size(5);
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK_VALUE(layer_idx >= 0 && layer_idx < num_layers, "layer_idx ", layer_idx,
                    " out of range [0, ", num_layers, ")");
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  // Checked here, serially, because one bad value would read outside the cache.
  for (int64_t r = 0; r < num_rows; ++r) {
    TORCH_CHECK_VALUE(lens[r] >= 1 && lens[r] <= max_blocks * block_size, "seq_lens[", r,
                      "] = ", lens[r], " outside [1, ", max_blocks * block_size, "]");
    for (int64_t b = 0; b < (lens[r] + block_size - 1) / block_size; ++b) {
      const int64_t id = tables[r * max_blocks + b];
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "block_tables[", r, ", ", b, "] = ", id,
                        " outside [0, ", num_blocks, ")");
    }
  }
  if (num_rows == 0) return;
  const int64_t token_stride = num_kv_heads * head_dim;
  Geometry g{};
  g.num_kv_heads = num_kv_heads;
  g.group = q.size(1) / num_kv_heads;
  g.head_dim = head_dim;
  g.block_size = block_size;
  g.max_blocks = max_blocks;
  g.heads_per_task = heads_per_task(num_rows, num_kv_heads);
  g.block_stride = num_layers * 2 * block_size * token_stride;
  g.layer_offset = layer_idx * 2 * block_size * token_stride;
  g.kv_offset = block_size * token_stride;
  g.token_stride = token_stride;
  g.q_row_stride = q.stride(0);
  g.q_head_stride = q.stride(1);
  g.out_row_stride = out.stride(0);
  g.out_head_stride = out.stride(1);
  g.scale = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, kv_cache, tables, lens, num_rows, g, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, kv_cache, tables, lens, num_rows, g, out); break;
    case at::kHalf: run<c10::Half>(q, kv_cache, tables, lens, num_rows, g, out); break;
    default: TORCH_CHECK_VALUE(false, "q: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Decode attention over the paged KV cache, in place.");
}
