"""Few-row products of packed weights: each weight row read once for all rows (CPU verify steps).

Speculative decoding (Leviathan et al., 2023; Chen et al., 2023) has the target score k + 1
tokens in one forward pass; batched decoding of a few sequences does the same with one token
per row. Like one-token decoding, such a pass is memory bound: with T <= 16 rows it should
cost little more than one row if each weight is read once and applied to all T rows. XLA's
CPU backend does not do that for a plain `dot` of `T > 1` rows with the packed `[outputs,
inputs]` matrix (`lmjax.packed`): it hands the dot to its matmul library, which re-lays out
(packs) the weights on every call and, for a few rows, reads them at less than half the
bandwidth of the one-row loop (`benchmarks/packed_rows.py`).

Here the product is written as a broadcast multiply and a sum over the input axis,

    y[n, t] = sum_k widen(w[n, k]) * x[t, k]        (then transposed to [T, N])

with the weight as the outer operand: XLA:CPU emits it as one fused reduction (through its
YNNPACK fusion) that streams each weight row once, widens it inside the same fusion
(`astype`: bfloat16 and int8 codes are read at 2 and 1 bytes per weight, the int8 scale
applied after the row's sum) and keeps the T input rows in cache. The same sum in float32 as
the model's own `dot`, up to summation order. Formulations measured and dropped (2-core
CPU under load, so rough; 24 matrices 1536 x 576 float32, 2-16 rows, against one row's
streamed loop at 1.0x):
XLA's dot of `[T, K] x [N, K]^T` 2.5-7x, of the `[K, N]` layout 4-5x, the weight as the
dot's left operand (rows padded to 8) 2-3.5x, one matrix-vector loop per row 1.6-7x, a
`lax.map` over L2-sized blocks of rows 1.3-7x, batched matrix-vector dots (XLA writes the
broadcast rows out) 3-90x, slices of the matrix per fusion 30-100x; this reduction 1.5-2.5x.
It is not one row's cost: the reduction runs at ~half the one-row loop's bandwidth.

Two things the formulation needs on XLA:CPU: an `optimization_barrier` on `(x, w)`, or XLA
merges the equal broadcasts of one input read by two matrices (gate and up, key and value)
into one `[N, T, K]` array written to memory (a SmolLM2 verify step ran 100x slower); and
no dimension of extent 1 in the product (a `[1, N, K]` weight ran 20x slower).

On an x86-64 CPU, float32 and bfloat16 weights go to a hand-written kernel instead
(`lmjax.quant.cpu_float`, 1.35-3.9x this reduction); `reduction` is the XLA path, used for
int8 codes and on other platforms.

Products with `1 < rows <= max_rows()` take this path (one row keeps `lmjax.packed`'s
streamed matrix-vector loop; more rows, e.g. a prompt's prefill, keep XLA's matmul).
`limit(n)` changes the bound while a function is traced (`limit(1)`: the previous path), for
comparisons; it takes effect only in functions traced inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

Array = jax.Array

# Rows up to which the fused reduction is used. Measured at 2, 5, 9 and 16 rows (SmolLM2-135M,
# benchmarks/packed_rows.py, a shared 2-core CPU): faster than XLA's matmul at each, float32
# 1.2-2.5x, bfloat16 5-11x (that matmul widens the whole matrix first); not measured above 16.
MAX_ROWS = 16
_limit = [MAX_ROWS]


def max_rows() -> int:
  """The current bound: products with 1 < rows <= this use `matmul_t`."""
  return _limit[0]


@contextlib.contextmanager
def limit(rows: int) -> Iterator[None]:
  """Within this context, functions being traced use `matmul_t` for 1 < rows <= `rows`.

  Args:
    rows: the new bound, an int >= 1 (1: never, the previous path).
  """
  if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
    raise ValueError(f"rows={rows!r} must be an int >= 1")
  old, _limit[0] = _limit[0], rows
  try:
    yield
  finally:
    _limit[0] = old


def applies(rows: int) -> bool:
  """Whether a product of `rows` rows takes the few-row path."""
  return 1 < rows <= _limit[0]


def matmul_t(x: Array, w: Array, scale: Array | None = None) -> Array:
  """`x @ w.T` for a few rows, reading each row of `w` once: float32 and bfloat16 weights
  through `lmjax.quant.cpu_float`'s kernel on an x86-64 CPU, otherwise `reduction`.

  Args:
    x: `[M, K]` float32 activations (a few rows).
    w: `[N, K]` packed weights: float32, bfloat16 or int8 codes.
    scale: `[N, 1]` float32 scales of int8 codes (one per output), or None.

  Returns:
    `[M, N]` float32: `x @ (w * scale).T` with the weights widened exactly to float32.
  """
  if scale is None:
    from lmjax.quant import cpu_float  # (lmjax.quant imports lmjax.packed, which imports this)
    return cpu_float.matmul_t(x, w, reduction)
  return reduction(x, w, scale)


def reduction(x: Array, w: Array, scale: Array | None = None) -> Array:
  """`matmul_t` as XLA's fused reduction (the module docstring), on every platform."""
  # One broadcast of `x` per weight: XLA would merge equal ones (two matrices reading the same
  # input, e.g. the gate and up projections) into one array of N * M * K floats, written out.
  x, w = jax.lax.optimization_barrier((x, w))
  y = jnp.sum(w.astype(jnp.float32)[:, None, :] * x[None, :, :], axis=-1)  # [N, M]
  if scale is not None:
    y = y * scale
  return y.T
