// What lmjax's CPU kernels (cpu_int4.cc, cpu_int8.cc, cpu_float.cc, cpu_attention.cc) share:
// rounding input rows to int8 per group of 32 inputs, the dispatch over input-row counts, and
// splitting output rows (or other units of work) between the calling thread and XLA's intra-op
// thread pool.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace lmjax_cpu {

namespace ffi = xla::ffi;

constexpr int64_t kMaxRows = 8;  // input rows per pass over the weights
constexpr int64_t kAhead = 16;   // weight rows prefetched ahead

inline float Hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Float vectors of the widest width the build has (16 lanes with AVX-512, else 8), for the
// float kernels (cpu_float.cc, cpu_attention.cc): bfloat16 is loaded widened exactly (its bits
// shifted up 16 places); `Sum` adds a vector's lanes.
namespace vec {
#if defined(__AVX512F__)
using V = __m512;
constexpr int64_t kLanes = 16;
inline V Zero() { return _mm512_setzero_ps(); }
inline V Set(float a) { return _mm512_set1_ps(a); }
inline V Load(const float* p) { return _mm512_loadu_ps(p); }
inline V Load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V Add(V a, V b) { return _mm512_add_ps(a, b); }
inline V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V Max(V a, V b) { return _mm512_max_ps(a, b); }
inline float Sum(V v) { return _mm512_reduce_add_ps(v); }
#else
using V = __m256;
constexpr int64_t kLanes = 8;
inline V Zero() { return _mm256_setzero_ps(); }
inline V Set(float a) { return _mm256_set1_ps(a); }
inline V Load(const float* p) { return _mm256_loadu_ps(p); }
inline V Load(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V Add(V a, V b) { return _mm256_add_ps(a, b); }
inline V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V Max(V a, V b) { return _mm256_max_ps(a, b); }
inline float Sum(V v) { return Hsum(v); }
#endif
}  // namespace vec

// Prefetches `bytes` bytes from `p` into L1 (the hardware prefetcher alone left loads waiting).
inline void Prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(c + at, _MM_HINT_T0);
}

// Rounds `n` (a multiple of 32) floats to int8 with one scale: x * (127 / absmax), half to
// even (the CPU's default rounding); `*d` = absmax / 127, `*dsum` the scale times the codes'
// sum (both NaN if an input is NaN, so NaN reaches the outputs as in a float product).
inline void QuantizeGroup(const float* x, int64_t n, int8_t* q, float* d, float* dsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float a = _mm_cvtss_f32(m4);
  const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.f / a : 0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 32) {
    __m256i c[4];
    for (int t = 0; t < 4; ++t) {
      c[t] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * t), inv));
      sum = _mm256_add_epi32(sum, c[t]);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                         _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  *d = a / 127.f;
  *dsum = *d * static_cast<float>(_mm_cvtsi128_si32(s4));
  if (_mm256_movemask_ps(nan)) *d = *dsum = NAN;  // a NaN input: the group's outputs NaN
}

// Weight rows [n0, n1) against one pass of M input rows, in blocks: `block(std::integral_constant
// <int, R>{}, n, stride)` computes the R weight rows n, n + stride, ..., `fetch(n)` prefetches
// weight row n. With S streams (S > 1; by default kStreams for one input row, else 1): S rows at
// a time, one from each of S equal parts of [n0, n1), so that many streams run through memory
// at once (int8, one row, 150 matrices 1536 x 576 chained, two threads: one stream with
// software prefetch 35 GB/s, four 47-53; two, six, eight and four with prefetch slower; float32
// weights and 2-5 rows, SmolLM2's layers one product after another: four streams 1.5-1.9x R
// contiguous rows). One stream: R contiguous rows at a time, prefetched kAhead rows ahead
// (products that turn compute bound with more rows). The rows left over: one at a time.
constexpr int kStreams = 4;
template <int M, int R, int S = 0, class Block, class Fetch>
void RowPasses(int64_t n0, int64_t n1, Block&& block, Fetch&& fetch) {
  using std::integral_constant;
  constexpr int streams = S ? S : (M == 1 ? kStreams : 1);
  int64_t n = n0;
  if constexpr (streams > 1) {
    const int64_t part = (n1 - n0) / streams;
    for (; n < n0 + part; ++n) block(integral_constant<int, streams>{}, n, part);
    n = n0 + streams * part;
  } else {
    for (; n + R <= n1; n += R) {
      if (n + kAhead < n1)
        for (int q = 0; q < R; ++q) fetch(n + kAhead + q);
      block(integral_constant<int, R>{}, n, int64_t{1});
    }
  }
  for (; n < n1; ++n) block(integral_constant<int, 1>{}, n, int64_t{1});
}

// Calls `f(std::integral_constant<int, M>{}, m0)` for passes of M <= kMaxRows input rows
// from m0, covering rows [0, m): each weight row is read once per pass.
template <class F>
void ByRows(int64_t m, F&& f) {
  using std::integral_constant;
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, m - m0)) {
      case 1: f(integral_constant<int, 1>{}, m0); break;
      case 2: f(integral_constant<int, 2>{}, m0); break;
      case 3: f(integral_constant<int, 3>{}, m0); break;
      case 4: f(integral_constant<int, 4>{}, m0); break;
      case 5: f(integral_constant<int, 5>{}, m0); break;
      case 6: f(integral_constant<int, 6>{}, m0); break;
      case 7: f(integral_constant<int, 7>{}, m0); break;
      default: f(integral_constant<int, 8>{}, m0); break;
    }
  }
}

// Output rows [0, n) in `count` shares of `per` rows, taken from an atomic counter.
template <class F>
struct Shares {
  F rows;  // rows(n0, n1) computes outputs [n0, n1)
  int64_t n, per, count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  Shares(F f, int64_t n, int64_t per)
      : rows(std::move(f)), n(n), per(per), count((n + per - 1) / per) {}
  void Work() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= count) return;  // a task that starts after the work is gone touches nothing
      rows(c * per, std::min(n, (c + 1) * per));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs `rows(n0, n1)` over [0, n): one share (of at least `min_per` rows) for the calling
// thread and one for each of XLA's intra-op threads (at most `$LMJAX_CPU_THREADS` in all when
// set), then waits for them.
template <class F>
void Split(ffi::ThreadPool& pool, int64_t n, F rows, int64_t min_per = 16) {
  static const int64_t most = [] {
    const char* env = std::getenv("LMJAX_CPU_THREADS");
    return env ? std::max(1, std::atoi(env)) : 1 << 30;
  }();
  const int64_t threads = std::min(most, std::max<int64_t>(1, pool.num_threads()));
  auto s = std::make_shared<Shares<F>>(std::move(rows), n,
                                       std::max<int64_t>(min_per, (n + threads - 1) / threads));
  if (threads == 1 || s->count == 1) {
    s->Work();
    return;
  }
  const int64_t helpers = std::min<int64_t>(threads, s->count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s] { s->Work(); });
  s->Work();
  for (int spin = 0; s->done.load(std::memory_order_acquire) < s->count; ++spin) {
    if (spin < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();  // a pre-empted helper needs this core
    }
  }
}

// Runs `rows(std::integral_constant<int, M>{}, n0, n1, m0)` over output rows [0, n) split
// between threads (`Split`) and input rows [0, m) in passes of up to kMaxRows (`ByRows`).
template <class F>
void ForAll(ffi::ThreadPool& pool, int64_t m, int64_t n, F rows) {
  Split(pool, n, [m, rows](int64_t n0, int64_t n1) {
    ByRows(m, [&](auto pass, int64_t m0) { rows(pass, n0, n1, m0); });
  });
}

}  // namespace lmjax_cpu

// Defines the FFI handler `symbol` of `fn(pool, x [M, K] f32, weights, scale f32) -> y [M, N]
// f32`, the weights' element type `weight_type` (an `xla::ffi` data type).
#define LMJAX_CPU_MATMUL_HANDLER(symbol, fn, weight_type)                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                                 \
                                ::xla::ffi::Ffi::Bind()                     \
                                    .Ctx<::xla::ffi::ThreadPool>()          \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()   \
                                    .Arg<::xla::ffi::Buffer<weight_type>>()       \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()   \
                                    .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>())
