// Attention of a few new query tokens over the filled slots of a KV cache, as an XLA FFI
// custom call (decoding and speculative checks on a CPU).
//
// `lmjax.quant.cpu_attention` builds this file on first use (the host's compiler) and registers
// "lmjax_cached_attention_f32" (a float32 cache) and "lmjax_cached_attention_bf16" (bfloat16).
// Shapes as `lmjax.attention_ops.grouped_attention` with the cache layout "BKSH":
//
//   q [B, T, N, H] float32, k and v [B, K, S, H], mask [B, T, S] bool, used [] int32
//   out[b, t, n] = sum_s p[b, t, n, s] v[b, n / G, s],  G = N / K,
//   p = softmax over the visible s of scale * q[b, t, n] . k[b, n / G, s]
//
// reading only slots s < used (the caller guarantees the mask is False beyond). A row that sees
// no slot gives zeros. Scores and sums in float32 (bfloat16 widened exactly); with a bfloat16
// cache p is rounded to bfloat16 before it weighs v, as the XLA function does. Work items of
// (b, kv head, a chunk of its query rows) are split between the calling thread and XLA's
// intra-op threads (`lmjax_cpu::Split`).

#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace lmjax_cpu::vec;  // NOLINT: the float vector wrappers

#if defined(__AVX512F__)
inline V Div(V a, V b) { return _mm512_div_ps(a, b); }
inline float MaxOf(V v) { return _mm512_reduce_max_ps(v); }
inline V Round(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
inline V Pow2(V n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline V ZeroWhereInf(V e, V x) {  // e, or 0 where x is -inf (a masked score)
  const __mmask16 m = _mm512_cmp_ps_mask(x, Set(-std::numeric_limits<float>::infinity()),
                                         _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(m, e, _mm512_setzero_ps());
}
inline __m256 Half(V v) {  // the two halves of the lanes added: 8 lanes
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
inline V ToBf16(V v) {  // rounded to the nearest bfloat16, ties to even (finite inputs)
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(~0xffff)));
}
#else
inline V Div(V a, V b) { return _mm256_div_ps(a, b); }
inline float MaxOf(V v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline V Round(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V Pow2(V n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline V ZeroWhereInf(V e, V x) {
  const V m = _mm256_cmp_ps(x, Set(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  return _mm256_andnot_ps(m, e);
}
inline __m256 Half(V v) { return v; }
inline V ToBf16(V v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(~0xffff)));
}
#endif

// e^x in float32 (Cody-Waite reduction by ln 2, a degree-6 polynomial: within 2 ulp of expf on
// [-87, 0], the range softmax needs; below -87 a tiny positive number instead of 0).
inline V Exp(V x) {
  x = Max(x, Set(-87.0f));
  const V n = Round(Mul(x, Set(1.44269504f)));
  V r = Fma(n, Set(-0.693359375f), x);
  r = Fma(n, Set(2.12194440e-4f), r);
  V p = Set(1.9875691500e-4f);
  p = Fma(p, r, Set(1.3981999507e-3f));
  p = Fma(p, r, Set(8.3334519073e-3f));
  p = Fma(p, r, Set(4.1665795894e-2f));
  p = Fma(p, r, Set(1.6666665459e-1f));
  p = Fma(p, r, Set(5.0000001201e-1f));
  p = Fma(p, Mul(r, r), Add(r, Set(1.0f)));
  return Mul(p, Pow2(n));
}

// The lane sums of eight 8-lane vectors: {sum(a[0]), ..., sum(a[7])}.
inline __m256 Sum8(const __m256* a) {
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

template <class KV>
struct Job {
  const float* q;     // [B, T, N, H]
  const KV* k;        // [B, K, S, H]: float32, or bfloat16 bits
  const KV* v;        // [B, K, S, H]
  const bool* mask;   // [B, T, S]
  float* out;         // [B, T, N, H]
  int64_t b, t, n, kh, s, h, used;
  float scale;
};

constexpr int kRows = 6;  // query rows weighing each value row at once (24 accumulators)

// Query rows [r0, r0 + R) of unit (bi, ki) (row r = t * G + g), their normalized p `[R, used]`
// at `p`: out rows = p @ v, H / kLanes vectors per row, 4 vectors at a time.
template <int R, class KV>
void Weigh(const Job<KV>& j, int64_t bi, int64_t ki, int64_t r0, const float* p) {
  const int64_t g = j.n / j.kh, hv = j.h / kLanes;
  const KV* v = j.v + (bi * j.kh + ki) * j.s * j.h;
  for (int64_t c0 = 0; c0 < hv; c0 += 4) {
    const int64_t cn = std::min<int64_t>(4, hv - c0);
    V acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = Set(0.f);
    for (int64_t s = 0; s < j.used; ++s) {
      V vs[4];
      for (int c = 0; c < cn; ++c) vs[c] = Load(v + s * j.h + (c0 + c) * kLanes);
      for (int r = 0; r < R; ++r) {
        const V w = Set(p[r * j.used + s]);
        for (int c = 0; c < cn; ++c) acc[r][c] = Fma(w, vs[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r, ti = row / g, n = ki * g + row % g;
      float* o = j.out + ((bi * j.t + ti) * j.n + n) * j.h;
      for (int c = 0; c < cn; ++c) Store(o + (c0 + c) * kLanes, acc[r][c]);
    }
  }
}

constexpr int kScoreRows = 3;  // query rows scored together (8 keys each: 24 accumulators)

// Scores of query rows [r0, r0 + R) of unit (bi, ki) against slots [0, used), scaled, into
// the R rows of `stride` floats at `sc`: 8 keys at a time, each key vector loaded once for the
// R rows, the 8 lane sums of a row taken together (`Sum8`).
template <int R, class KV>
void Scores(const Job<KV>& j, int64_t bi, int64_t ki, int64_t r0, float* sc, int64_t stride) {
  const int64_t g = j.n / j.kh, hv = j.h / kLanes;
  const KV* k = j.k + (bi * j.kh + ki) * j.s * j.h;
  const float* q[R];
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + r, ti = row / g, n = ki * g + row % g;
    q[r] = j.q + ((bi * j.t + ti) * j.n + n) * j.h;
  }
  int64_t s = 0;
  for (; s + 8 <= j.used; s += 8) {
    V acc[R][8];
    for (int r = 0; r < R; ++r)
      for (int e = 0; e < 8; ++e) acc[r][e] = Set(0.f);
    for (int64_t c = 0; c < hv; ++c) {
      V qc[R];
      for (int r = 0; r < R; ++r) qc[r] = Load(q[r] + c * kLanes);
      for (int e = 0; e < 8; ++e) {
        const V kv = Load(k + (s + e) * j.h + c * kLanes);
        for (int r = 0; r < R; ++r) acc[r][e] = Fma(qc[r], kv, acc[r][e]);
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256 half[8];
      for (int e = 0; e < 8; ++e) half[e] = Half(acc[r][e]);
      _mm256_storeu_ps(sc + r * stride + s,
                       _mm256_mul_ps(Sum8(half), _mm256_set1_ps(j.scale)));
    }
  }
  for (; s < j.used; ++s) {
    for (int r = 0; r < R; ++r) {
      V acc = Set(0.f);
      for (int64_t c = 0; c < hv; ++c)
        acc = Fma(Load(q[r] + c * kLanes), Load(k + s * j.h + c * kLanes), acc);
      sc[r * stride + s] = Sum(acc) * j.scale;
    }
  }
}

// Query rows [first, first + rows) (row r = t * G + g) of one (batch row, kv head) pair
// against slots [0, used).
template <class KV>
void Unit(const Job<KV>& j, int64_t bi, int64_t ki, int64_t first, int64_t rows,
          std::vector<float>& buf) {
  const int64_t g = j.n / j.kh, used = j.used;
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t stride = (used + kLanes - 1) / kLanes * kLanes;  // scores row, padded
  buf.assign(rows * stride, ninf);
  float* sc = buf.data();
  for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {  // scores, then the mask
    switch (std::min<int64_t>(kScoreRows, rows - r0)) {
      case 1: Scores<1>(j, bi, ki, first + r0, sc + r0 * stride, stride); break;
      case 2: Scores<2>(j, bi, ki, first + r0, sc + r0 * stride, stride); break;
      default: Scores<3>(j, bi, ki, first + r0, sc + r0 * stride, stride); break;
    }
  }
  for (int64_t row = 0; row < rows; ++row) {
    const bool* mask = j.mask + (bi * j.t + (first + row) / g) * j.s;
    float* out = sc + row * stride;
    for (int64_t s = 0; s < used; ++s)
      if (!mask[s]) out[s] = ninf;
  }
  for (int64_t row = 0; row < rows; ++row) {  // softmax in place
    float* x = sc + row * stride;
    V m = Set(ninf);
    for (int64_t s = 0; s < stride; s += kLanes) m = Max(m, Load(x + s));
    const float mx = MaxOf(m);
    if (mx == ninf) {  // sees no slot: zeros
      std::fill(x, x + stride, 0.f);
      continue;
    }
    V tot = Set(0.f);
    for (int64_t s = 0; s < stride; s += kLanes) {
      const V xs = Load(x + s);
      const V e = ZeroWhereInf(Exp(Add(xs, Set(-mx))), xs);
      Store(x + s, e);
      tot = Add(tot, e);
    }
    const V sum = Set(Sum(tot));
    for (int64_t s = 0; s < stride; s += kLanes) {
      V p = Div(Load(x + s), sum);  // as XLA's softmax (a reciprocal moved p across bfloat16 ties)
      if constexpr (std::is_same_v<KV, uint16_t>) p = ToBf16(p);
      Store(x + s, p);
    }
  }
  // Rows are padded to `stride` slots but Weigh reads p[row * used + s]: repack densely.
  if (stride != used)
    for (int64_t row = 1; row < rows; ++row)
      std::copy(sc + row * stride, sc + row * stride + used, sc + row * used);
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    switch (std::min<int64_t>(kRows, rows - r0)) {
      case 1: Weigh<1>(j, bi, ki, first + r0, sc + r0 * used); break;
      case 2: Weigh<2>(j, bi, ki, first + r0, sc + r0 * used); break;
      case 3: Weigh<3>(j, bi, ki, first + r0, sc + r0 * used); break;
      case 4: Weigh<4>(j, bi, ki, first + r0, sc + r0 * used); break;
      case 5: Weigh<5>(j, bi, ki, first + r0, sc + r0 * used); break;
      default: Weigh<6>(j, bi, ki, first + r0, sc + r0 * used); break;
    }
  }
}

template <class KV>
ffi::Error Attend(ffi::ThreadPool& pool, const Job<KV>& job) {
  if (job.used == 0) {
    std::fill(job.out, job.out + job.b * job.t * job.n * job.h, 0.f);
    return ffi::Error::Success();
  }
  // Work items: (batch row, kv head, a chunk of its query rows), at least two per thread where
  // there are rows enough (one decode token of SmolLM2: 3 kv heads of 3 rows, 2 threads: 6
  // items of 1-2 rows, not 3 items split 2:1); each item reads its pair's keys and values.
  const int64_t units = job.b * job.kh, rows = job.t * (job.n / job.kh);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_unit = std::min(rows, (2 * threads + units - 1) / units);
  const int64_t chunk = std::min<int64_t>(kRows, (rows + per_unit - 1) / per_unit);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  lmjax_cpu::Split(pool, units * chunks, [&job, rows, chunk, chunks](int64_t i0, int64_t i1) {
    std::vector<float> buf;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / chunks, first = i % chunks * chunk;
      Unit(job, u / job.kh, u % job.kh, first, std::min(chunk, rows - first), buf);
    }
  }, /*min_per=*/1);
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error Checked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<T> k,
                   ffi::Buffer<T> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> used,
                   ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions() != kd || md.size() != 3)
    return ffi::Error::InvalidArgument("cached attention: q [B, T, N, H], k / v [B, K, S, H]");
  const int64_t b = qd[0], t = qd[1], n = qd[2], h = qd[3], kh = kd[1], s = kd[2];
  if (kd[0] != b || kd[3] != h || kh <= 0 || n % kh || h % kLanes || h <= 0 ||
      md[0] != b || md[1] != t || md[2] != s)
    return ffi::Error::InvalidArgument("cached attention: shapes do not fit");
  const int64_t u = std::clamp<int64_t>(used.typed_data()[0], 0, s);
  using KV = std::conditional_t<T == ffi::DataType::F32, float, uint16_t>;
  const Job<KV> job{q.typed_data(), reinterpret_cast<const KV*>(k.untyped_data()),
                    reinterpret_cast<const KV*>(v.untyped_data()), mask.typed_data(),
                    out->typed_data(), b, t, n, kh, s, h, u, scale};
  return Attend(pool, job);
}

}  // namespace

#define LMJAX_ATTENTION_HANDLER(symbol, type)                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, Checked<type>,                             \
                                ffi::Ffi::Bind()                                   \
                                    .Ctx<ffi::ThreadPool>()                        \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Arg<ffi::Buffer<type>>()                      \
                                    .Arg<ffi::Buffer<type>>()                      \
                                    .Arg<ffi::Buffer<ffi::PRED>>()                 \
                                    .Arg<ffi::Buffer<ffi::S32>>()                  \
                                    .Ret<ffi::Buffer<ffi::F32>>()                  \
                                    .Attr<float>("scale"))

LMJAX_ATTENTION_HANDLER(LmjaxCachedAttentionF32, ffi::F32);
LMJAX_ATTENTION_HANDLER(LmjaxCachedAttentionBf16, ffi::BF16);
