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
// Weight rows are split between the calling thread and XLA's intra-op threads
// (`lmjax_cpu::Split`, cpu_kernels.h).

#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using lmjax_cpu::Hsum;
using lmjax_cpu::kAhead;
using lmjax_cpu::Prefetch;

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
};

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
void RowBlock(const Job& j, int64_t n, int64_t m0, int64_t stride) {
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
            reinterpret_cast<const __m256i*>(j.b + (n + q * stride) * half + at));
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
      const float* sc = j.scale + (n + q * stride) * j.g * 2;
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
    for (int r = 0; r < M; ++r)
      j.y[(m0 + r) * j.n + n + q * stride] = Hsum(acc[q][r]) + off[q][r];
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
void RowBlockWide(const Job& j, int64_t n, int64_t m0, int64_t stride) {
  const int64_t half = j.k / 2, g2 = j.g / 2, per = j.gs / 32;  // chunks per group
  const __m512i mask = _mm512_set1_epi8(15);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                          28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  alignas(64) float cs[R][M][kMaxGroups];
  float off[R][M];
  for (int q = 0; q < R; ++q) {
    const float* sc = j.scale + (n + q * stride) * j.g * 2;
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
            reinterpret_cast<const __m256i*>(j.b + (n + q * stride) * half + 32 * c));
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
      j.y[(m0 + r) * j.n + n + q * stride] = _mm512_reduce_add_ps(acc[q][r]) + off[q][r];
}
#else
constexpr bool kWide = false;
template <int M, int R>
void RowBlockWide(const Job& j, int64_t n, int64_t m0, int64_t stride) {
  RowBlock<M, R>(j, n, m0, stride);
}
#endif

// Rows [n0, n1) of the weights against input rows [m0, m0 + M): one input row reads four parts
// of them side by side, more rows contiguous blocks (`lmjax_cpu::RowPasses`).
template <int M>
void Rows(const Job& j, int64_t n0, int64_t n1, int64_t m0) {
  lmjax_cpu::RowPasses<M, M <= 3 ? 2 : 1>(
      n0, n1,
      [&](auto r, int64_t n, int64_t stride) {
        constexpr int R = decltype(r)::value;
        if (kWide && j.g <= kMaxGroups) RowBlockWide<M, R>(j, n, m0, stride);
        else RowBlock<M, R>(j, n, m0, stride);
      },
      [&](int64_t n) {
        Prefetch(j.b + n * (j.k / 2), j.k / 2);
        Prefetch(j.scale + n * j.g * 2, j.g * 8);
      });
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
  Job job;
  job.x = x.typed_data();
  job.b = b.typed_data();
  job.scale = scale.typed_data();
  job.y = y->typed_data();
  job.m = m, job.n = n, job.k = k, job.g = g, job.gs = k / g;
  const int64_t gs = k / g;
  thread_local std::vector<int8_t> xq, xw;
  thread_local std::vector<float> sx, xsum;
  xq.resize(m * k);
  xw.resize(m * k);
  sx.resize(m * g);
  xsum.resize(m * g);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t q = 0; q < g; ++q)
      lmjax_cpu::QuantizeGroup(job.x + r * k + q * gs, gs, xq.data() + r * k + q * gs,
                               &sx[r * g + q], &xsum[r * g + q]);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k / 64; ++c) {
      std::memcpy(&xw[r * k + 64 * c], &xq[r * k + 32 * c], 32);
      std::memcpy(&xw[r * k + 64 * c + 32], &xq[r * k + k / 2 + 32 * c], 32);
    }
  job.xq = xq.data();
  job.xw = xw.data();
  job.sx = sx.data();
  job.xsum = xsum.data();
  lmjax_cpu::ForAll(pool, m, n, [&job](auto rows, int64_t n0, int64_t n1, int64_t m0) {
    Rows<decltype(rows)::value>(job, n0, n1, m0);
  });
  return ffi::Error::Success();
}

}  // namespace

LMJAX_CPU_MATMUL_HANDLER(LmjaxInt4MatmulT, Int4MatmulT, ffi::U8);
