"""int8 weights in the packed (output-major) layout of `lmjax.packed`: fast batch-1 CPU decoding.

`lmjax.quant.apply` reads int8 weights in the model's own layout and dequantizes each one
before its projection: inside a decode loop that is a float copy of the matrix per step
(or, hoisted by XLA, float weights read at 4 bytes each), slower than float32. Here the
same int8 codes and scales (`lmjax.quant.quantize(..., "int8")`: absmax per output channel,
LLM.int8() (Dettmers et al., 2022) without the outlier split; `per_output`, see Groups) are
laid out like `lmjax.packed`'s float formats: each matrix `[outputs, inputs]`, one contiguous
row of codes per output, its float32 scales `[outputs, groups]` beside it (`kernel_scale`,
`embedding_scale`). A batch-1 product streams each row once at 1 byte per weight, widens the
codes to float32 inside the row's loop and applies the scale to the row's (or group's) dot:

    y[n] = sum_G scale[n, G] * sum_g x[G, g] * code[n, G, g]

Groups: packing float params quantizes with `lmjax.quant.quantize(..., "int8",
per_output=True)`: one scale per output (`G = 1`, the fast path: one multiply per row), also
for the attention output `NHD` (absmax over N and H; SmolLM2-135M perplexity 35.68 against
34.84 with `quantize`'s default scale per head and output, float32 34.60). `QuantParams` whose
scales differ within an output (that default) keep them (`G = N`), computed as a batched
product: correct, but ~20x slower for that matrix on this CPU (0.4 ms vs 0.02 ms for 576 x
576). The packed forward equals the forward of the `QuantParams` it was packed from up to
float summation order.

    packed = lmjax.packed.pack(model, params, "int8")   # or pack(model, qparams, "int8")
    out = infer.generate(model, packed, prompts, ...)

int8 activations (opt-in, `pack(model, params, "int8", activations="int8")`): W8A8 with
dynamic per-token activation scales, as in LLM.int8() (Dettmers et al., 2022) and SmoothQuant
(Xiao et al., 2023) but with neither's outlier handling (no mixed-precision outlier columns, no
smoothing of activations into the weights). Products of at least `INT8_ACT_MIN_ROWS` rows (a
prompt's prefill) quantize each input row to int8 codes with its own scale (absmax / 127,
rounded half to even), multiply them with the weight codes into int32 (XLA's integer dot)
and scale the result by the row's and the output's (group's) scales:

    y[m, n] = sx[m] * sum_G scale[n, G] * sum_g xq[m, G, g] * code[n, G, g]

Fewer rows do not use XLA's integer product (a single row has no streamed loop there and ran
55-65x slower, `benchmarks/quant_int8_activations.py`): 1-16 rows with one scale per output
(decoding, speculative checks, small batches) go to a hand-written CPU kernel,
`lmjax.quant.cpu_int8`, inputs rounded per group of 32 as llama.cpp's Q8_0 (finer than per
row); weights with groups of scales, and other platforms, keep the weight-only paths above.
The threshold counts the rows of one product (batch x tokens, the prompt padded to its
bucket in `infer.generate`; a batch of 17 or more sequences decodes with int8 activations
too). Cost: SmolLM2-135M perplexity 1.065x float32's against 1.033x for int8 weights alone,
and greedy output that leaves float32's sooner (the benchmark above): without outlier
handling, a token whose activations hold one large value rounds its other inputs coarsely.
Prefill 1.4-2.5x faster than weight-only int8 (512 / 128 tokens), 1.15-1.4x faster than
float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax import packed as packed_lib
from lmjax.quant.apply import QuantParams
from lmjax.quant.qarray import QArray
from lmjax.quant.quantize import quantize

Array = jax.Array
ACTIVATIONS = ("int8",)  # `pack(..., activations=)`: None (weight-only) or one of these
# Products with at least this many rows take the int8 x int8 product when the packed params
# ask for int8 activations: past `lmjax.packed_rows.MAX_ROWS`, so the few-row reader
# (speculative checks, small batches) reads the weights as without the option. SmolLM2-135M
# prefill, int8 x int8 forced on against weight-only (benchmarks/quant_int8_activations.py):
# 1.6-2.4x at 8 rows, 1.5x at 16 (15-20 ms), 3.6-7x at 32 (the weight-only matmul dequantizes).
INT8_ACT_MIN_ROWS = 17


def _check(path: tuple[str, ...], q: QArray) -> None:
  if q.fmt != "int8" or q.scale2 is not None or q.group != q.shape[q.axis]:
    raise ValueError(f"{'/'.join(path)}: packed int8 needs per-channel int8 weights (one group "
                     f"over the whole axis, no double quantization); got fmt={q.fmt!r}, "
                     f"group={q.group} of {q.shape[q.axis]}, double_quant="
                     f"{q.scale2 is not None}")


def refuse_float_kernel(path: tuple[str, ...], fmt: str) -> None:
  """Raises for a projection kernel left in float among quantized ones (a GGUF's F32 matrix
  kept as it is): the packed readers take codes for every projection."""
  if path[-1] == "kernel":
    raise ValueError(f"{'/'.join(path)} is a float matrix among quantized ones: packed {fmt} "
                     "needs every projection quantized (lmjax.quant.quantize the float params, "
                     "or decode these params through the quantized reader)")


def pack(model, params: Any, fmt: str = "int8") -> packed_lib.PackedParams:
  """int8 `PackedParams` of `model` (`lmjax.packed.pack(model, params, "int8")` calls this).

  Args:
    model: an `lmjax.CausalLM`, `MaskedLM` or `Seq2SeqLM` (scanned layers or not).
    params: its float params tree (or `{"params": tree}`), quantized here with
      `lmjax.quant.quantize(model, params, "int8")`; or that `QuantParams` itself (int8 per
      channel, embeddings and head included).
    fmt: "int8".

  Returns:
    `PackedParams` with fmt "int8": each kernel int8 `[layers?, outputs, inputs]` with
    float32 `<name>_scale` `[layers?, outputs, groups]`; the embedding int8 `[V, D]` with
    `embedding_scale` `[V, 1]`; everything else as it was.

  Raises:
    ValueError: another format, or `QuantParams` that are not int8 per channel throughout.
  """
  if fmt != "int8":  # "int4": lmjax.quant.packed_int4
    raise ValueError(f"packed_int packs format 'int8', not {fmt!r}")
  qp = params if isinstance(params, QuantParams) else quantize(model, params, fmt,
                                                                per_output=True)
  flat = flatten_dict(qp.tree, is_leaf=lambda _, x: isinstance(x, QArray))
  out, packed = {}, []
  for path, q in flat.items():
    if not isinstance(q, QArray):
      refuse_float_kernel(path, fmt)
      out[path] = q
      continue
    _check(path, q)
    scale_path = path[:-1] + (path[-1] + "_scale",)
    if path[-2:] == ("embed", "embedding"):  # [V, D] grouped along D: already output-major
      out[path], out[scale_path] = q.qvalue, q.scale.astype(jnp.float32)
      continue
    shape, k = q.shape, q.axis + 1  # the group axis is the last contracted one
    lead = q.qvalue.ndim - len(shape)
    order = (*range(lead), *range(lead + k, lead + len(shape)), *range(lead, lead + k))
    lead_shape = q.qvalue.shape[:lead]
    outputs = math.prod(shape[k:])
    out[path] = jnp.transpose(q.qvalue, order).reshape(
        lead_shape + (outputs, math.prod(shape[:k])))
    scale = jnp.transpose(q.scale.astype(jnp.float32), order).reshape(
        lead_shape + (outputs, math.prod(shape[:k - 1])))
    if bool(jnp.all(scale == scale[..., :1])):  # one scale per output (`quantize`'s int8)
      scale = scale[..., :1]
    out[scale_path] = scale
    packed.append((path, k, lead, lead_shape + shape))
  if not packed:
    raise ValueError("no int8 weights to pack")
  return packed_lib.PackedParams(unflatten_dict(out), fmt, tuple(sorted(packed)))


def dequantized(codes: Array, scale: Array) -> Array:
  """float32 `[..., N, K]` from int8 codes `[..., N, K]` and scales `[..., N, G]`."""
  g = codes.shape[-1] // scale.shape[-1]
  w = codes.reshape(codes.shape[:-1] + (scale.shape[-1], g)).astype(jnp.float32)
  return (w * scale[..., None]).reshape(codes.shape)


def unpack(packed: packed_lib.PackedParams) -> Any:
  """The float32 params tree in the model's layout (the dequantized int8 weights)."""
  flat = flatten_dict(packed.tree)
  scaled = [p for p, *_ in packed.packed] + [p for p in flat if p[-2:] == ("embed", "embedding")]
  for path in scaled:
    flat[path] = dequantized(flat[path], flat.pop(path[:-1] + (path[-1] + "_scale",)))
  return packed_lib.unpack(packed_lib.PackedParams(unflatten_dict(flat), "float32",
                                                   packed.packed))


def matmul_t(x: Array, w: Array, scale: Array, streamed: bool,
             flat_copy: Callable[[Array], Array]) -> Array:
  """`x [M, K] @ dequantized(w [N, K], scale [N, G]).T` in float32.

  `streamed` (batch-1 decoding): one loop per output reads its row of codes, widened inside
  the loop, and the scale multiplies the row's (group's) sum; otherwise a matmul on the
  dequantized matrix. (A few rows with one scale per output never get here:
  `lmjax.packed_rows.matmul_t` reads the codes once for all rows.)
  """
  n, k = w.shape
  groups = scale.shape[-1]
  if not streamed:
    return jnp.dot(x, dequantized(w, scale).T)
  x = flat_copy(x)
  if groups == 1:
    return jnp.dot(x, w.astype(jnp.float32).T) * scale.T
  g = k // groups
  y = jnp.einsum("MGg,NGg->MNG", x.reshape(-1, groups, g),
                 w.reshape(n, groups, g).astype(jnp.float32))
  return jnp.sum(y * scale[None], axis=-1)


def quantize_rows(x: Array) -> tuple[Array, Array]:
  """Per-row symmetric int8 codes of `x [M, K]` float32: `(codes [M, K] int8, scale [M, 1])`,
  `scale = absmax / 127` (1 for an all-zero row), codes `round(x / scale)` half to even."""
  sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  sx = jnp.where(sx > 0, sx, 1.0)
  return jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8), sx


def matmul_int8_act(x: Array, w: Array, scale: Array) -> Array:
  """`x [M, K]` with its rows quantized to int8 (`quantize_rows`) times int8 codes `w [N, K]`,
  summed in int32, times both scales (`scale [N, G]`): `[M, N]` float32.

  One scale per output (`G = 1`): one integer dot; `G > 1`: one int32 sum per group, each
  times its group's scale (the row's scale spans all `K` inputs).
  """
  (m, k), (n, groups) = x.shape, scale.shape
  xq, sx = quantize_rows(x)
  if groups == 1:
    acc = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sx * scale.T
  g = k // groups
  acc = jax.lax.dot_general(xq.reshape(m, groups, g), w.reshape(n, groups, g),
                            (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)
  return jnp.einsum("GMN,NG->MN", acc.astype(jnp.float32), scale) * sx
