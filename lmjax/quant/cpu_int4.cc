// A CPU product of a few float32 rows with packed 4-bit weights, as an XLA FFI custom call.
//
// `lmjax.quant.cpu_int4` builds this file on first use (the host's compiler, -march=native)
// and registers it as the custom call target "lmjax_int4_matmul_t". Weights in the layout of
// `lmjax.quant.packed_int4` (row halves): byte j of weight row n holds input j in its low
// nibble and input j + K/2 in its high one; each group of `gs` consecutive inputs (a multiple
// of 32, within one half) has a float32 scale and offset, `w = code * scale + offset`.
// Each input row is rounded to int8 per group (xq, scale sx = absmax / 127, half to even),
// as llama.cpp rounds its activations beside Q4_1 weights (Q8_1), and per group
//
//   y[m, n] += sx[m, g] * (scale[n, g] * sum_{k in g} xq[m, k] * code[n, k]
//                          + offset[n, g] * sum_{k in g} xq[m, k])
//
// with the integer dot product of unsigned codes and signed inputs (vpdpbusd: AVX-512 VNNI
// on 512-bit vectors, a 32-byte chunk's low and high nibbles side by side; AVX-VNNI or AVX2
// vpmaddubsw on 256-bit ones otherwise). Each weight row is read once for all M input rows.
// Weight rows are split into chunks taken from an atomic counter by the calling thread and
// by tasks on XLA's intra-op thread pool; a task that starts after the work is gone returns
// without touching it.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;  // input rows per pass over the weights
constexpr int64_t kAhead = 16;      // weight rows prefetched ahead
constexpr int64_t kMaxGroups = 256;  // groups per row of the 512-bit path

struct Job {
  const float* x;       // [M, K]
  const uint8_t* b;     // [N, K / 2]
  const float* scale;   // [N, G, 2]
  const int8_t* xq;     // [M, K]: x rounded per group, x ~ xq * sx
  const int8_t* xw;     // [M, K]: xq chunk by chunk (32 low-half inputs, 32 high-half)
  const float* sx;      // [M, G]
  const float* xsum;    // [M, G]: sx * sum of the group's xq
  float* y;             // [M, N]
  int64_t m, n, k, g, gs;
  int64_t rows_per_chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline __m256i Dot(__m256i acc, __m256i u, __m256i v) {  // acc += u8 x s8, 4 per lane
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, v);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, v);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, v),
                                                 _mm256_set1_epi16(1)));
#endif
}

// R weight rows from n against input rows [m0, m0 + M); the group's two scales applied in
// float32 to the 8 lanes of its integer dot product.
template <int M, int R>
void RowBlock(const Job& j, int64_t n, int64_t m0) {
  const int64_t half = j.k / 2, g2 = j.g / 2;
  const __m256i mask = _mm256_set1_epi8(15);
  __m256 acc[R][M];
  float off[R][M];
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r) acc[q][r] = _mm256_setzero_ps(), off[q][r] = 0.f;
  for (int64_t g = 0; g < g2; ++g) {  // group g of the low half, g + G/2 of the high one
    __m256i ilo[R][M], ihi[R][M];
    for (int q = 0; q < R; ++q)
      for (int r = 0; r < M; ++r) ilo[q][r] = ihi[q][r] = _mm256_setzero_si256();
    for (int64_t at = g * j.gs; at < (g + 1) * j.gs; at += 32) {
      for (int q = 0; q < R; ++q) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(j.b + (n + q) * half + at));
        const __m256i lo = _mm256_and_si256(v, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        for (int r = 0; r < M; ++r) {
          const int8_t* xr = j.xq + (m0 + r) * j.k;
          ilo[q][r] = Dot(ilo[q][r], lo,
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + at)));
          ihi[q][r] = Dot(ihi[q][r], hi, _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(xr + half + at)));
        }
      }
    }
    for (int q = 0; q < R; ++q) {
      const float* sc = j.scale + (n + q) * j.g * 2;
      for (int r = 0; r < M; ++r) {
        const float* sx = j.sx + (m0 + r) * j.g;
        const float* xs = j.xsum + (m0 + r) * j.g;
        acc[q][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ilo[q][r]),
                                    _mm256_set1_ps(sc[2 * g] * sx[g]), acc[q][r]);
        acc[q][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ihi[q][r]),
                                    _mm256_set1_ps(sc[2 * (g + g2)] * sx[g + g2]), acc[q][r]);
        off[q][r] += sc[2 * g + 1] * xs[g] + sc[2 * (g + g2) + 1] * xs[g + g2];
      }
    }
  }
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r) j.y[(m0 + r) * j.n + n + q] = hsum(acc[q][r]) + off[q][r];
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kWide = true;
inline __mmask16 Lanes(int64_t n) {  // the first n of 16 lanes
  return n >= 16 ? 0xffff : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}
// As RowBlock with 512-bit vectors: a 32-byte chunk's low nibbles in the lower half of a
// vector, its high ones in the upper, against the inputs stored chunk by chunk (`xw`: the
// chunk's 32 low-half inputs, then its 32 high-half ones); the groups' combined scales
// (scale * sx) are made 16 at a time per row before its dot products.
template <int M, int R>
void RowBlockWide(const Job& j, int64_t n, int64_t m0) {
  const int64_t half = j.k / 2, g2 = j.g / 2, per = j.gs / 32;  // chunks per group
  const __m512i mask = _mm512_set1_epi8(15);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                          28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  alignas(64) float cs[R][M][kMaxGroups];
  float off[R][M];
  for (int q = 0; q < R; ++q) {
    const float* sc = j.scale + (n + q) * j.g * 2;
    for (int r = 0; r < M; ++r) {
      const float* sx = j.sx + (m0 + r) * j.g;
      const float* xs = j.xsum + (m0 + r) * j.g;
      __m512 o = _mm512_setzero_ps();
      for (int64_t g = 0; g < j.g; g += 16) {
        const int64_t left = j.g - g;
        const __mmask16 live = Lanes(left);
        const __m512 a = _mm512_maskz_loadu_ps(Lanes(2 * left), sc + 2 * g);
        const __m512 b = _mm512_maskz_loadu_ps(Lanes(2 * left - 16), sc + 2 * g + 16);
        const __m512 sv = _mm512_permutex2var_ps(a, evens, b);
        const __m512 zv = _mm512_permutex2var_ps(a, odds, b);
        _mm512_mask_storeu_ps(cs[q][r] + g, live,
                              _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(live, sx + g)));
        o = _mm512_fmadd_ps(zv, _mm512_maskz_loadu_ps(live, xs + g), o);
      }
      off[q][r] = _mm512_reduce_add_ps(o);
    }
  }
  __m512 acc[R][M];
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r) acc[q][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < g2; ++g) {  // group g of the low half, g + G/2 of the high one
    __m512i d[R][M];
    for (int q = 0; q < R; ++q)
      for (int r = 0; r < M; ++r) d[q][r] = _mm512_setzero_si512();
    for (int64_t c = g * per; c < (g + 1) * per; ++c) {
      for (int q = 0; q < R; ++q) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(j.b + (n + q) * half + 32 * c));
        const __m512i codes = _mm512_and_si512(
            _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), mask);
        for (int r = 0; r < M; ++r)
          d[q][r] = _mm512_dpbusd_epi32(d[q][r], codes, _mm512_loadu_si512(
              j.xw + (m0 + r) * j.k + 64 * c));
      }
    }
    for (int q = 0; q < R; ++q)
      for (int r = 0; r < M; ++r) {
        const __m512 sv = _mm512_insertf32x8(
            _mm512_set1_ps(cs[q][r][g]), _mm256_set1_ps(cs[q][r][g + g2]), 1);
        acc[q][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[q][r]), sv, acc[q][r]);
      }
  }
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r)
      j.y[(m0 + r) * j.n + n + q] = _mm512_reduce_add_ps(acc[q][r]) + off[q][r];
}
#else
constexpr bool kWide = false;
template <int M, int R>
void RowBlockWide(const Job& j, int64_t n, int64_t m0) { RowBlock<M, R>(j, n, m0); }
#endif

// Rows [n0, n1) of the weights against input rows [m0, m0 + M).
template <int M>
void Rows(const Job& j, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int R = M == 1 ? 4 : M <= 3 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    if (n + kAhead < n1) {  // the hardware prefetcher alone left loads waiting
      for (int q = 0; q < R; ++q) {
        const char* row = reinterpret_cast<const char*>(j.b + (n + kAhead + q) * (j.k / 2));
        for (int64_t at = 0; at < j.k / 2; at += 64) _mm_prefetch(row + at, _MM_HINT_T0);
        const char* sc = reinterpret_cast<const char*>(j.scale + (n + kAhead + q) * j.g * 2);
        for (int64_t at = 0; at < j.g * 8; at += 64) _mm_prefetch(sc + at, _MM_HINT_T0);
      }
    }
    if (kWide && j.g <= kMaxGroups) RowBlockWide<M, R>(j, n, m0); else RowBlock<M, R>(j, n, m0);
  }
  for (; n < n1; ++n) RowBlock<M, 1>(j, n, m0);
}

void RowsAll(const Job& j, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < j.m; m0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, j.m - m0)) {
      case 1: Rows<1>(j, n0, n1, m0); break;
      case 2: Rows<2>(j, n0, n1, m0); break;
      case 3: Rows<3>(j, n0, n1, m0); break;
      case 4: Rows<4>(j, n0, n1, m0); break;
      case 5: Rows<5>(j, n0, n1, m0); break;
      case 6: Rows<6>(j, n0, n1, m0); break;
      case 7: Rows<7>(j, n0, n1, m0); break;
      default: Rows<8>(j, n0, n1, m0); break;
    }
  }
}

void Work(Job& j) {
  for (;;) {
    const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.chunks) return;
    const int64_t n0 = c * j.rows_per_chunk;
    RowsAll(j, n0, std::min(j.n, n0 + j.rows_per_chunk));
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// Rounds `n` (a multiple of 32) floats to int8 with one scale: x * (127 / absmax), half to
// even (the CPU's default rounding); `*d` = absmax / 127, `*dsum` the scale times the codes'
// sum (both NaN if an input is NaN, so NaN reaches the outputs as in a float product).
void QuantizeGroup(const float* x, int64_t n, int8_t* q, float* d, float* dsum) {
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

ffi::Error Int4MatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> b,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), bd = b.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || bd.size() != 2 || sd.size() != 3 || sd[2] != 2)
    return ffi::Error::InvalidArgument("int4 matmul: x [M, K], b [N, K/2], scale [N, G, 2]");
  const int64_t m = xd[0], k = xd[1], n = bd[0], g = sd[1];
  if (k <= 0 || bd[1] * 2 != k || sd[0] != n || g <= 0 || k % g || (k / g) % 32 ||
      (k / 2) % (k / g))
    return ffi::Error::InvalidArgument("int4 matmul: shapes do not fit (groups of a multiple "
                                       "of 32 inputs within each half)");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->b = b.typed_data();
  job->scale = scale.typed_data();
  job->y = y->typed_data();
  job->m = m, job->n = n, job->k = k, job->g = g, job->gs = k / g;
  const int64_t gs = k / g;
  thread_local std::vector<int8_t> xq, xw;
  thread_local std::vector<float> sx, xsum;
  xq.resize(m * k);
  xw.resize(m * k);
  sx.resize(m * g);
  xsum.resize(m * g);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t q = 0; q < g; ++q)
      QuantizeGroup(job->x + r * k + q * gs, gs, xq.data() + r * k + q * gs, &sx[r * g + q],
                    &xsum[r * g + q]);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k / 64; ++c) {
      std::memcpy(&xw[r * k + 64 * c], &xq[r * k + 32 * c], 32);
      std::memcpy(&xw[r * k + 64 * c + 32], &xq[r * k + k / 2 + 32 * c], 32);
    }
  job->xq = xq.data();
  job->xw = xw.data();
  job->sx = sx.data();
  job->xsum = xsum.data();
  static const int64_t most = [] {  // $LMJAX_CPU_THREADS: at most this many threads a call
    const char* env = std::getenv("LMJAX_CPU_THREADS");
    return env ? std::max(1, std::atoi(env)) : 1 << 30;
  }();
  const int64_t threads = std::min(most, std::max<int64_t>(1, pool.num_threads()));
  job->rows_per_chunk = std::max<int64_t>(16, (n + threads - 1) / threads);
  job->chunks = (n + job->rows_per_chunk - 1) / job->rows_per_chunk;
  if (threads == 1 || job->chunks == 1) {
    Work(*job);
  } else {
    const int64_t helpers = std::min<int64_t>(threads, job->chunks) - 1;
    for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { Work(*job); });
    Work(*job);
    for (int spin = 0; job->done.load(std::memory_order_acquire) < job->chunks; ++spin) {
      if (spin < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();  // a pre-empted helper needs this core
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxInt4MatmulT, Int4MatmulT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
