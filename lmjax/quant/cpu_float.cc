// A CPU product of a few float32 rows with packed float32 or bfloat16 weights, as XLA FFI
// custom calls.
//
// `lmjax.quant.cpu_float` builds this file on first use (the host's compiler) and registers
// "lmjax_f32_matmul_t" (float32 weights) and "lmjax_bf16_matmul_t" (bfloat16 weights). Weights
// in the layout of `lmjax.packed`: `w [N, K]`, one row per output. y = x @ w.T in float32
//
//   y[m, n] = sum_k x[m, k] * w[n, k]
//
// with bfloat16 widened exactly (its bits shifted up 16 places) and float32 fused multiply-adds
// in 16 lanes (AVX-512) or 8 (AVX2), summed across lanes at the end: the model's float32 dot
// up to summation order. Each weight row is read once for all M input rows (the product of a
// speculative check or a small batch is memory bound, like one row's); the rows are split
// between the calling thread and XLA's intra-op threads (`lmjax_cpu::Split`, cpu_kernels.h).
// Each thread reads several parts of its share side by side (`lmjax_cpu::RowPasses`; with
// AVX-512 four for up to 5 input rows, three for 6-7, two for 8; AVX2: four for one row).

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using lmjax_cpu::Prefetch;

using namespace lmjax_cpu::vec;  // NOLINT: the float vector wrappers

template <class W>
struct Job {
  const float* x;  // [M, K]
  const W* w;      // [N, K]: float32, or bfloat16 bits
  float* y;        // [M, N]
  int64_t m, n, k;
};

// R weight rows n, n + stride, ... against input rows [m0, m0 + M), kLanes inputs at a time.
template <int M, int R, class W>
void RowBlock(const Job<W>& j, int64_t n, int64_t m0, int64_t stride) {
  V acc[R][M];
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r) acc[q][r] = Zero();
  for (int64_t at = 0; at < j.k; at += kLanes) {
    V xv[M];
    for (int r = 0; r < M; ++r) xv[r] = Load(j.x + (m0 + r) * j.k + at);
    for (int q = 0; q < R; ++q) {
      const V w = Load(j.w + (n + q * stride) * j.k + at);
      for (int r = 0; r < M; ++r) acc[q][r] = Fma(w, xv[r], acc[q][r]);
    }
  }
  for (int q = 0; q < R; ++q)
    for (int r = 0; r < M; ++r) j.y[(m0 + r) * j.n + n + q * stride] = Sum(acc[q][r]);
}

// Rows [n0, n1) of the weights against input rows [m0, m0 + M) (`lmjax_cpu::RowPasses`).
template <int M, class W>
void Rows(const Job<W>& j, int64_t n0, int64_t n1, int64_t m0) {
  lmjax_cpu::RowPasses<M, (M <= 4 && kLanes == 16) || M <= 2 ? 2 : 1,
                       kLanes == 16 ? (M <= 5 ? 4 : M <= 7 ? 3 : 2) : 0>(
      n0, n1,
      [&](auto r, int64_t n, int64_t stride) {
        RowBlock<M, decltype(r)::value>(j, n, m0, stride);
      },
      [&](int64_t n) { Prefetch(j.w + n * j.k, j.k * sizeof(W)); });
}

template <class W>
ffi::Error MatmulT(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t m,
                   int64_t n, int64_t k) {
  const Job<W> job{x, w, y, m, n, k};
  lmjax_cpu::ForAll(pool, m, n, [&job](auto rows, int64_t n0, int64_t n1, int64_t m0) {
    Rows<decltype(rows)::value>(job, n0, n1, m0);
  });
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error Checked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("float matmul: x [M, K], w [N, K]");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  if (k <= 0 || k % 16 || wd[1] != k)
    return ffi::Error::InvalidArgument("float matmul: shapes do not fit (K a multiple of 16)");
  using W = std::conditional_t<T == ffi::DataType::F32, float, uint16_t>;
  return MatmulT(pool, x.typed_data(), reinterpret_cast<const W*>(w.untyped_data()),
                 y->typed_data(), m, n, k);
}

}  // namespace

#define LMJAX_FLOAT_HANDLER(symbol, type)                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, Checked<type>,                             \
                                ffi::Ffi::Bind()                                   \
                                    .Ctx<ffi::ThreadPool>()                        \
                                    .Arg<ffi::Buffer<ffi::F32>>()                  \
                                    .Arg<ffi::Buffer<type>>()                      \
                                    .Ret<ffi::Buffer<ffi::F32>>())

LMJAX_FLOAT_HANDLER(LmjaxF32MatmulT, ffi::F32);
LMJAX_FLOAT_HANDLER(LmjaxBf16MatmulT, ffi::BF16);
