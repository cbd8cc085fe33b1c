"""A hand-written CPU product for packed 4-bit weights: integer dot products, as llama.cpp's.

XLA's CPU code for `lmjax.quant.packed_int4`'s products widens each 4-bit code to float32
and multiplies it with its input in a vectorized loop: about as many weights per second as
the int8 loop (`packed_int4`'s docstring), so 4-bit weights decoded no faster than 8-bit
ones. This module builds `cpu_int4.cc` (beside it) with the host's C++ compiler on first use
and calls it as an XLA FFI custom call: each input row is rounded to int8 per weight group
(absmax / 127, round half to even; llama.cpp's Q8_1 activations beside its Q4_1 weights),
and each group's 4-bit codes meet those int8 inputs in the CPU's integer dot product
(AVX-512 VNNI / AVX-VNNI `vpdpbusd`, else AVX2 `vpmaddubsw`), 64 weights in a few
instructions, then the group's two scales in float32:

    y[m, n] = sum_g sx[m, g] * (scale[n, g] * sum_{k in g} xq[m, k] * code[n, k]
                                + offset[n, g] * sum_{k in g} xq[m, k])

The output rows are split between the calling thread and XLA's intra-op threads (at most
`$LMJAX_CPU_THREADS` of them when set), one share each. Used by `packed_int4.matmul_t` for
products of up to 16 rows (batch-1 decoding, speculative checks) of packed int4 params with
int8 activations (`lmjax.packed.pack(model, params, "int4", activations="int8")`) whose
groups are a multiple of 32 inputs (a GGUF's Q4_0 / Q4_1 blocks; packing's default 32).
The kernel is built (`lmjax.quant.cpu_build`: on first use, for the host's CPU, cached) only on
an x86-64 Linux host with AVX2 and a C++20 compiler, and `LMJAX_CPU_KERNELS=0` turns it off;
elsewhere (other platforms, group sizes, no kernel) the same rounded inputs go through XLA's
weight-only loop, so the numbers differ only by float summation order (NaN inputs give NaN
outputs on both paths).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lmjax.quant import cpu_build

Array = jax.Array
TARGET = "lmjax_int4_matmul_t"
MAX_ROWS = 16  # input rows per call; more (a prompt) keep XLA's matmul


def available() -> bool:
  """Whether the kernel is built and registered (`lmjax.quant.cpu_build.load`)."""
  return cpu_build.load("cpu_int4", "LmjaxInt4MatmulT", TARGET)


def applies(x: Array, b: Array, scale: Array) -> bool:
  """Whether the kernel computes `matmul_t(x, b, scale, ...)`: a few rows, uint8 codes with
  float32 scales and offsets in groups of a multiple of 32 inputs lying within one nibble half,
  JAX's default backend the CPU, the kernel available (built here on first use)."""
  m, k = x.shape
  if scale.ndim != 3 or b.ndim != 2 or not k or not scale.shape[1]:
    return False
  n, g = scale.shape[0], scale.shape[1]
  gs = k // g
  return (m <= MAX_ROWS and scale.shape[-1] == 2 and b.shape == (n, k // 2) and k % 2 == 0
          and gs * g == k and gs % 32 == 0 and (k // 2) % gs == 0 and b.dtype == jnp.uint8
          and scale.dtype == jnp.float32 and jax.default_backend() == "cpu" and available())


def round_groups(x: Array, groups: int) -> Array:
  """float32 `x [M, K]` rounded to int8 per group of `K / groups` inputs (`x * (127 / absmax)`,
  half to even) and scaled back by `absmax / 127`: the inputs the kernel multiplies."""
  m, k = x.shape
  xg = x.astype(jnp.float32).reshape(m, groups, k // groups)
  amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
  codes = jnp.round(xg * jnp.where(amax > 0, 127.0 / amax, 0.0))  # the kernel's arithmetic
  return (codes * (amax / 127.0)).reshape(m, k)


def reference(x: Array, b: Array, scale: Array) -> Array:
  """What the kernel computes, in plain jnp: `round_groups(x)` times the dequantized weights
  (`packed_int4.dequantized`), float32."""
  from lmjax.quant.packed_int4 import dequantized
  return jnp.dot(round_groups(x, scale.shape[1]), dequantized(b, scale).T,
                 precision=jax.lax.Precision.HIGHEST)


def matmul_t(x: Array, b: Array, scale: Array, other: Callable[..., Array]) -> Array:
  """`round_groups(x [M, K]) @ dequantized(b [N, K/2], scale [N, G, 2]).T` -> float32 `[M, N]`:
  the compiled kernel on a CPU where it `applies`; elsewhere (other platforms, shapes, no
  kernel) the same rounded inputs through `other(x, b, scale)`, a weight-only product."""
  def rounded(x, b, scale):
    return other(round_groups(x, scale.shape[1]), b, scale)

  def cpu(x, b, scale):
    out = jax.ShapeDtypeStruct((x.shape[0], b.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        x.astype(jnp.float32), b, scale)
  if not applies(x, b, scale):
    return rounded(x, b, scale)
  return jax.lax.platform_dependent(x, b, scale, cpu=cpu, default=rounded)
