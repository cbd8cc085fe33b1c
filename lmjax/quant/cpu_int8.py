"""A hand-written CPU product for a few rows with packed int8 weights and int8 activations
(W8A8, as llama.cpp's Q8_0 x Q8_0).

`lmjax.packed_rows` reads int8 codes once for 2-16 input rows, widening each to float32 and
multiplying in float32: compute-bound, about half the one-row loop's bytes per second. This
module builds `cpu_int8.cc` (beside it; `lmjax.quant.cpu_build`) and calls it as an XLA FFI
custom call: each input row is rounded to int8 per group of 32 inputs
(`cpu_int4.round_groups`: absmax / 127, half to even), multiplied with the weights' int8
codes in the CPU's integer dot product (AVX-512 VNNI `vpdpbusd`, 64 weights an instruction;
AVX2 `vpmaddubsw` otherwise), each group's sum scaled in float32, then the output's scale:

    y[m, n] = scale[n] * sum_g sx[m, g] * sum_{k in g} xq[m, k] * code[n, k]

Measured here (150 matrices 1536 x 576 int8, 132 MB, each product feeding the next): 5 rows
9.3 ms against `packed_rows`' 19.8 (2.1x), 9 rows 11.2 against 28.0 (2.5x). One row reads
four weight rows at a time from four far-apart parts of the thread's share (four streams
through memory): 2.5 ms, 53 GB/s, against 3.4 ms for XLA's streamed one-row loop of the
weight-only format (contiguous rows with software prefetch, last session: 3.8 ms, 35 GB/s);
SmolLM2-135M decoding 4.6 ms a step against 4.7-6.3 for that loop (its speed varies from one
process to the next, the kernel's does not). So `lmjax.packed` sends it 1-16 rows (decoding,
speculative checks, small batches) of packed int8 weights with one scale per output and int8
activations (`lmjax.packed.pack(model, params, "int8", activations="int8")`). Products of
more rows (a prompt) keep `packed_int.matmul_int8_act`'s per-row W8A8. Where the kernel does
not apply (other platforms, groups of scales, no compiler, `LMJAX_CPU_KERNELS=0`) the same
rounded inputs go through XLA's weight-only product: the same numbers up to float summation
order.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lmjax.quant import cpu_build
from lmjax.quant.cpu_int4 import MAX_ROWS, round_groups

Array = jax.Array
TARGET = "lmjax_int8_matmul_t"
GROUP = 32  # inputs per activation scale
__all__ = ["MAX_ROWS", "GROUP", "available", "applies", "reference", "matmul_t"]


def available() -> bool:
  """Whether the kernel is built and registered (`lmjax.quant.cpu_build.load`)."""
  return cpu_build.load("cpu_int8", "LmjaxInt8MatmulT", TARGET)


def applies(x: Array, w: Array, scale: Array) -> bool:
  """Whether the kernel computes `matmul_t(x, w, scale, ...)`: at most `MAX_ROWS` rows of a
  multiple of 32 inputs, int8 codes `[N, K]` with one float32 scale per output, JAX's default
  backend the CPU, the kernel available (built here on first use)."""
  m, k = x.shape
  return (m <= MAX_ROWS and k > 0 and k % GROUP == 0 and w.ndim == 2 and w.shape[1] == k
          and w.dtype == jnp.int8 and scale.shape == (w.shape[0], 1)
          and scale.dtype == jnp.float32 and jax.default_backend() == "cpu" and available())


def reference(x: Array, w: Array, scale: Array) -> Array:
  """What the kernel computes, in plain jnp: `round_groups(x)` times the dequantized weights,
  float32 `[M, N]`."""
  rounded = round_groups(x, x.shape[1] // GROUP)
  return jnp.dot(rounded, (w.astype(jnp.float32) * scale).T, precision=jax.lax.Precision.HIGHEST)


def matmul_t(x: Array, w: Array, scale: Array, other: Callable[..., Array]) -> Array:
  """`round_groups(x [M, K]) @ (w [N, K] * scale [N, 1]).T` -> float32 `[M, N]`: the compiled
  kernel on a CPU where it `applies`; elsewhere the same rounded inputs through
  `other(x, w, scale)`, a weight-only product."""
  def rounded(x, w, scale):
    return other(round_groups(x, x.shape[1] // GROUP), w, scale)

  def cpu(x, w, scale):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x.astype(jnp.float32), w, scale)
  if x.shape[1] % GROUP:
    raise ValueError(f"int8 activations round groups of {GROUP} inputs; got {x.shape[1]} inputs")
  if not applies(x, w, scale):
    return rounded(x, w, scale)
  return jax.lax.platform_dependent(x, w, scale, cpu=cpu, default=rounded)
