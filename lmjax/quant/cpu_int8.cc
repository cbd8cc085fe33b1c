// A CPU product of a few float32 rows with packed int8 weights, as an XLA FFI custom call.
//
// `lmjax.quant.cpu_int8` builds this file on first use (the host's compiler) and registers it
// as the custom call target "lmjax_int8_matmul_t". Weights in the layout of
// `lmjax.quant.packed_int`: int8 codes `w [N, K]`, one row per output, one float32 scale per
// output. Each input row is rounded to int8 per group of 32 inputs (xq, sx = absmax / 127,
// half to even: llama.cpp's Q8_0 activations beside Q8_0 weights), and
//
//   y[m, n] = scale[n] * sum_g sx[m, g] * sum_{k in g} xq[m, k] * w[n, k]
//
// with exact int32 sums of 4 products per lane. vpdpbusd multiplies unsigned by signed bytes,
// so the codes are offset by 128 (w ^ 0x80 = w + 128) and each lane's accumulator starts at
// -128 times the sum of its 4 inputs (computed once per input row); AVX2 without VNNI takes
// |w| times the inputs with w's sign (vpmaddubsw cannot overflow then). The group's scale sx
// multiplies its lanes in float32. AVX-512 VNNI: 64 weights per instruction; else 32. Each
// weight row is read once for all M input rows; the rows are split between the calling thread
// and XLA's intra-op threads (`lmjax_cpu::Split`, cpu_kernels.h). Each thread reads four
// parts of its share side by side for one input row (decoding), with AVX-512 VNNI for up to
// four rows too, and two for more (`lmjax_cpu::RowPasses`).

#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using lmjax_cpu::Hsum;
using lmjax_cpu::Prefetch;

struct Job {
  const int8_t* w;       // [N, K]
  const float* scale;    // [N]
  const int8_t* xq;      // [M, K]: x rounded per group of 32, x ~ xq * sx
  const float* lane_sx;  // [M, K / 4]: the scale sx of each lane's group
  const int32_t* lane0;  // [M, K / 4]: -128 * the sum of each lane's 4 codes
  float* y;              // [M, N]
  int64_t m, n, k;
};

// Exact int32 sums of 4 products w * x per lane, 8 lanes (lane0: the offset term, VNNI only).
inline __m256i Dot8(__m256i w, __m256i x, __m256i lane0) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(lane0, _mm256_xor_si256(w, _mm256_set1_epi8(-128)), x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(lane0, _mm256_xor_si256(w, _mm256_set1_epi8(-128)), x);
#else
  (void)lane0;
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
                           _mm256_set1_epi16(1));
#endif
}

inline __m256i Load8(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// The 8 lanes of weights `v` (32 codes from input `at`) times input row `row`, each lane's
// exact integer sum as float32 times its group's scale.
inline __m256 Lanes8(const Job& j, __m256i v, int64_t row, int64_t at) {
  const int64_t lane = (row * j.k + at) / 4;
  const __m256i d = Dot8(v, Load8(j.xq + row * j.k + at), Load8(j.lane0 + lane));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(j.lane_sx + lane));
}

// R weight rows n, n + stride, ... against input rows [m0, m0 + M), 32 inputs at a time.
template <int M, int R>
void RowBlock(const Job& j, int64_t n, int64_t m0, int64_t stride) {
  __m256 acc[R][M];
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r) acc[q][r] = _mm256_setzero_ps();
  for (int64_t at = 0; at < j.k; at += 32) {
    for (int q = 0; q < R; ++q) {
      const __m256i v = Load8(j.w + (n + q * stride) * j.k + at);
      for (int r = 0; r < M; ++r) acc[q][r] = _mm256_add_ps(acc[q][r], Lanes8(j, v, m0 + r, at));
    }
  }
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r)
      j.y[(m0 + r) * j.n + n + q * stride] = j.scale[n + q * stride] * Hsum(acc[q][r]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kWide = true;
// As RowBlock with 512-bit vectors (64 inputs: two groups) and a 256-bit tail of 32.
template <int M, int R>
void RowBlockWide(const Job& j, int64_t n, int64_t m0, int64_t stride) {
  const __m512i flip = _mm512_set1_epi8(-128);
  __m512 acc[R][M];
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r) acc[q][r] = _mm512_setzero_ps();
  int64_t at = 0;
  for (; at + 64 <= j.k; at += 64) {
    for (int q = 0; q < R; ++q) {
      const __m512i v =
          _mm512_xor_si512(_mm512_loadu_si512(j.w + (n + q * stride) * j.k + at), flip);
      for (int r = 0; r < M; ++r) {
        const int64_t row = m0 + r, lane = (row * j.k + at) / 4;
        const __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(j.lane0 + lane), v,
                                              _mm512_loadu_si512(j.xq + row * j.k + at));
        acc[q][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(j.lane_sx + lane),
                                    acc[q][r]);
      }
    }
  }
  float tail[R][M] = {};
  if (at < j.k) {  // 32 inputs left
    for (int q = 0; q < R; ++q) {
      const __m256i v = Load8(j.w + (n + q * stride) * j.k + at);
      for (int r = 0; r < M; ++r) tail[q][r] = Hsum(Lanes8(j, v, m0 + r, at));
    }
  }
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r)
      j.y[(m0 + r) * j.n + n + q * stride] =
          j.scale[n + q * stride] * (_mm512_reduce_add_ps(acc[q][r]) + tail[q][r]);
}
#else
constexpr bool kWide = false;
template <int M, int R>
void RowBlockWide(const Job& j, int64_t n, int64_t m0, int64_t stride) {
  RowBlock<M, R>(j, n, m0, stride);
}
#endif

// Rows [n0, n1) of the weights against input rows [m0, m0 + M) (`lmjax_cpu::RowPasses`).
template <int M>
void Rows(const Job& j, int64_t n0, int64_t n1, int64_t m0) {
  // Streams measured with AVX-512 VNNI (32 registers); AVX2's 16 keep the earlier blocks.
  lmjax_cpu::RowPasses<M, M <= 3 ? 2 : 1, kWide ? (M <= 4 ? 4 : 2) : 0>(
      n0, n1,
      [&](auto r, int64_t n, int64_t stride) {
        RowBlockWide<M, decltype(r)::value>(j, n, m0, stride);
      },
      [&](int64_t n) { Prefetch(j.w + n * j.k, j.k); });
}

ffi::Error Int8MatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || sd[1] != 1)
    return ffi::Error::InvalidArgument("int8 matmul: x [M, K], w [N, K], scale [N, 1]");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  if (k <= 0 || k % 32 || wd[1] != k || sd[0] != n)
    return ffi::Error::InvalidArgument("int8 matmul: shapes do not fit (K a multiple of 32)");
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> lane_sx;
  thread_local std::vector<int32_t> lane0;
  xq.resize(m * k);
  lane_sx.resize(m * k / 4);
  lane0.resize(m * k / 4);
  const float* xs = x.typed_data();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t at = 0; at < k; at += 32) {
      float sx, unused;
      lmjax_cpu::QuantizeGroup(xs + r * k + at, 32, xq.data() + r * k + at, &sx, &unused);
      for (int64_t l = 0; l < 8; ++l) {
        const int8_t* c = xq.data() + r * k + at + 4 * l;
        lane_sx[(r * k + at) / 4 + l] = sx;
        lane0[(r * k + at) / 4 + l] = -128 * (c[0] + c[1] + c[2] + c[3]);
      }
    }
  const Job job{w.typed_data(), scale.typed_data(), xq.data(), lane_sx.data(), lane0.data(),
                y->typed_data(), m, n, k};
  lmjax_cpu::ForAll(pool, m, n, [&job](auto rows, int64_t n0, int64_t n1, int64_t m0) {
    Rows<decltype(rows)::value>(job, n0, n1, m0);
  });
  return ffi::Error::Success();
}

}  // namespace

LMJAX_CPU_MATMUL_HANDLER(LmjaxInt8MatmulT, Int8MatmulT, ffi::S8);
