"""A hand-written CPU product for a few rows with packed float32 or bfloat16 weights.

Batch-1 decoding multiplies one row by each weight matrix; a speculative check (Leviathan et
al., 2023) scores k + 1 tokens in one forward pass and a small batch decodes a few rows at
once: products of 2-16 rows, memory bound like one row's if each weight is read once for all
rows. XLA's CPU loops stream one row at 44-64 GB/s here, and `lmjax.packed_rows`' fused
reduction for a few rows at about half that (bfloat16: a quarter). This module builds
`cpu_float.cc` (beside it; `lmjax.quant.cpu_build`) and calls it as an XLA FFI custom call:
float32 fused multiply-adds of each weight row (bfloat16 widened exactly) with all input rows,
summed across lanes at the end, so the model's float32 dot up to summation order; each
thread reads several parts of its share side by side (streams through memory: four for 1-5
rows with AVX-512, three for 6-7, two for 8). Streams for 2-8 rows (0.5.6) against contiguous
blocks before, SmolLM2 forwards over a 256-token cache, old and new kernels in alternating
processes (best of 25 calls each, a busy 2-core machine): float32 2 / 5 / 9 tokens 32-37 ->
21 ms, 29-39 -> 26-29, 55-61 -> 43-52; bfloat16 22 -> 11-12, 19-21 -> 16.5, 30-33 -> 29-31;
one token unchanged (float32 ~21, bfloat16 ~12).

Measured here (SmolLM2-sized matrices 1536 x 576 chained, each product feeding the next, the
same process; 141 MB float32, 141 MB bfloat16): float32 5 / 9 rows 2.9-3.1 / 4.7-4.8 ms
against the fused reduction's 5.3 / 6.4-6.5 (1.7x / 1.35x), bfloat16 2 / 5 / 9 rows 2.7 / 3.1-3.2
/ 4.7-4.8 against 9.1 / 12.2-12.3 / 15.5-16.2 (3.4-3.9x); one row bfloat16 2.3-2.5 ms against
XLA's loop 3.1-3.3, float32 1.9-2.7 against 2.2. SmolLM2-135M decoding in a compiled loop
(256-token cache): packed bfloat16 6.1-6.9 ms a step against 7.3-7.6 with XLA's loop, float32
9.2-12.3 against 11.6-13.5. SmolLM2 forwards over a 256-token cache
(benchmarks/results/packed_rows.json): float32 1 / 2 / 5 / 9 / 16 rows 1.15 / 1.10 / 1.43 /
1.15 / 0.94x the fused reduction (one row: XLA's loop), bfloat16 1.08 / 1.96 / 2.30 / 1.76 /
1.28x. So `lmjax.packed` sends it the products of 1-16 rows with bfloat16 weights and 1-9 rows
with float32 ones (`MAX_ROWS`) on an x86-64 CPU (a multiple of 16 inputs); elsewhere XLA's
loop (one row) or `lmjax.packed_rows.reduction` computes the same product."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lmjax.quant import cpu_build

Array = jax.Array
# Input rows per call. float32's products of more than 8 rows take two passes over the
# weights and turn compute bound: SmolLM2 forwards of 9 / 16 rows 1.15x / 0.94x the fused
# reduction (bfloat16: 1.76x / 1.28x; benchmarks/results/packed_rows.json).
MAX_ROWS = {jnp.dtype(jnp.float32): 9, jnp.dtype(jnp.bfloat16): 16}
TARGETS = {jnp.dtype(jnp.float32): ("LmjaxF32MatmulT", "lmjax_f32_matmul_t"),
           jnp.dtype(jnp.bfloat16): ("LmjaxBf16MatmulT", "lmjax_bf16_matmul_t")}
__all__ = ["MAX_ROWS", "available", "applies", "matmul_t"]


def available(dtype=jnp.float32) -> bool:
  """Whether the kernel for weights of `dtype` is built and registered."""
  symbol, target = TARGETS[jnp.dtype(dtype)]
  return cpu_build.load("cpu_float", symbol, target)


def applies(x: Array, w: Array) -> bool:
  """Whether the kernel computes `matmul_t(x, w, ...)`: weights `[N, K]` in float32 or
  bfloat16, at most `MAX_ROWS[w.dtype]` rows of a multiple of 16 inputs, JAX's default backend
  the CPU, the kernel available (built here on first use)."""
  m, k = x.shape
  dtype = jnp.dtype(w.dtype)
  return (dtype in TARGETS and m <= MAX_ROWS[dtype] and k > 0 and k % 16 == 0 and w.ndim == 2
          and w.shape[1] == k and jax.default_backend() == "cpu" and available(dtype))


def matmul_t(x: Array, w: Array, other: Callable[[Array, Array], Array]) -> Array:
  """`x [M, K] @ w [N, K].T` -> float32 `[M, N]`: the compiled kernel on a CPU where it
  `applies`, else `other(x, w)` (the same product in XLA)."""
  def cpu(x, w):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    target = TARGETS[jnp.dtype(w.dtype)][1]
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x.astype(jnp.float32), w)
  if not applies(x, w):
    return other(x, w)
  return jax.lax.platform_dependent(x, w, cpu=cpu, default=other)
