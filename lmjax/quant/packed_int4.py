"""4-bit weights in the packed (output-major) layout of `lmjax.packed`: two codes per byte.

Each matrix is stored like the other packed formats, `[outputs, inputs]` per layer, as uint8
bytes of two 4-bit codes, with a float32 scale and offset per group of `group_size` (32)
consecutive inputs beside it (`<name>_scale` `[outputs, groups, 2]`): `w = code * scale +
offset`. Float params are rounded to nearest per group with the group's minimum as offset and
`(max - min) / 15` as scale (a GGUF Q4_1 block's arithmetic; SmolLM2-135M's GGUF weights are
Q4_1 blocks of 32, which this reproduces: perplexity 34.6 as float32, against 46.7 for
symmetric absmax / 7 codes, `symmetric=True`, a Q4_0 block). int4 / uint4 `QuantParams`
(`lmjax.quant.quantize(..., "int4")`, a GGUF's Q4_0 / Q4_1 blocks kept by
`load_pretrained(..., quant="keep")`) are packed as they are. The token embedding (and so a
tied output projection) is int8 per row as in `lmjax.quant.packed_int` (the embedding module
checks its param's shape, so half-width rows cannot stand in for it).

NF4 (`fmt="nf4"`, QLoRA's NormalFloat4, Dettmers et al., 2023) uses the same bytes and row
loop; only the code -> value map differs: `w = NF4_TABLE[code] * absmax` with one absmax per
group of 64 inputs (`<name>_scale` `[outputs, groups, 1]`; `lmjax.quant.nf4`'s table and
rounding, double-quantized scales undone when packing `QuantParams`). The 16-entry lookup is a
gather fused into the product's loop, about 3x the work per weight of int4's multiply-add
(the chain below: 6.3 ms against 2.1 ms; a tree of 15 selects on the code's bits 5.2-5.4 ms, a
compare-and-select per level 13 ms, a multilinear interpolation in the bits 9.5 ms, no faster
end to end), so packed NF4 decodes at ~0.4x packed int4 here, still ~5x the quantized reader.

Two codes per byte, split by row halves: byte `j` of a row holds input `j` in its low nibble
and input `j + K/2` in its high nibble, so each half is a plain elementwise function of the
byte array, and the product is two matrix-vector products:

    y[n] = sum_j x[j] * w(lo(b[n, j])) + x[j + K/2] * w(hi(b[n, j]))

XLA's CPU backend fuses each half's operand (mask or shift, widen, times the group's scale,
plus its offset) into that product's per-output loop. Formulations measured (a chain of 30
products 1536 x 576, groups of 32, a loaded 2-core CPU; against the int8 row loop, noisy):
this one 0.3-0.7x; the halves as one concatenated operand of one product 0.01x (XLA writes the
operand out as float32), a select on `concat([b, b])` 0.2-0.4x (the uint8 concatenation is
written out), nibbles interleaved (input k in byte k // 2) 0.1x, within-group halves as one
`[N, G, 2, g/2]` operand of a multi-axis product 0.01x, a fused multiply-reduce instead of a
product 0.05-0.1x, the two products summed directly 0.02x (XLA fuses the sum into the second
product and writes its operand out; a reduction between them, `flat_copy`, keeps each
operand fused). XLA's loop processes about as many weights per second at 4 bits as at 8
(the unpacking is extra work per weight and the loop is not purely memory bound), so int4
decoded slower than packed int8 (benchmarks/results/quant_packed_int4.json). With int8
activations (`pack(model, params, "int4", activations="int8")`) products of up to 16 rows
round their inputs to int8 per group and, on an x86-64 CPU with groups of a multiple of 32
inputs (GGUF Q4_0 / Q4_1 blocks, the default), go to a hand-written kernel
(`lmjax.quant.cpu_int4`: integer dot products, as llama.cpp's Q4 x Q8): 1.2-1.35x llama.cpp's
decode speed on SmolLM2 here, against ~0.9x for the weight-only loop above.

    packed = lmjax.packed.pack(model, params, "int4")   # groups of 32 with offsets
    packed = lmjax.quant.packed_int4.pack(model, params, group_size=64, symmetric=True)
    packed = lmjax.packed.pack(model, params, "nf4")    # NF4, an absmax per 64 inputs
    out = infer.generate(model, packed, prompts, ...)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax import packed as packed_lib
from lmjax import packed_rows
from lmjax.quant import cpu_int4, packed_int
from lmjax.quant.apply import QuantParams
from lmjax.quant.qarray import (
    NF4_TABLE,
    QArray,
    check_group,
    codes_of,
    dequantize,
    quantize_array,
    scales_of,
    ungrouped,
)

Array = jax.Array
FORMATS = packed_lib.NIBBLE_FORMATS
GROUP = 32  # int4: a GGUF block
NF4_GROUP = 64  # nf4: QLoRA's block (and lmjax.quant.quantize's)


def _check(path: tuple[str, ...], q: QArray, fmt: str) -> None:
  if fmt == "nf4":
    if q.fmt != "nf4":
      raise ValueError(f"{'/'.join(path)}: packed nf4 needs nf4 weights; got fmt={q.fmt!r}")
  elif q.fmt not in ("int4", "uint4") or q.scale2 is not None:
    raise ValueError(f"{'/'.join(path)}: packed int4 needs int4 or uint4 weights without "
                     f"double quantization; got fmt={q.fmt!r}, "
                     f"double_quant={q.scale2 is not None}")


def _layer_arrays(q: QArray, lead: int) -> tuple[np.ndarray, ...]:
  """(uint8 codes in [0, 15] of the weight's shape, float32 scales, float32 offsets) with
  `lead` layer dims; `w = codes * scale + offset` (symmetric int4: offset `-8 * scale`).
  nf4: (codes, absmax scales), `w = NF4_TABLE[code] * scale` (double quantization undone)."""
  def fn(q):
    scale = scales_of(q)
    if q.fmt == "nf4":
      return ungrouped(codes_of(q), q.axis), scale
    zero = -8.0 * scale if q.zero is None else q.zero.astype(jnp.float32)
    return ungrouped(codes_of(q), q.axis), scale, zero
  for _ in range(lead):
    fn = jax.vmap(fn)
  return tuple(np.asarray(a) for a in fn(q))


def pack_codes(codes: np.ndarray) -> np.ndarray:
  """uint8 codes `[..., K]` in [0, 15] -> bytes `[..., K/2]` (row halves, see docstring)."""
  half = codes.shape[-1] // 2
  return (codes[..., :half] | (codes[..., half:] << 4)).astype(np.uint8)


def unpack_codes(b: Array) -> Array:
  """Inverse of `pack_codes`: bytes `[..., K/2]` -> codes `[..., K]` (uint8 in [0, 15])."""
  return jnp.concatenate([b & 15, b >> 4], axis=-1)


def _quantized(model, params: Any, group_size: int, fmt: str) -> dict:
  """Flat tree of `params` with every kernel a `QArray` of `fmt` (uint4, int4 or nf4)."""
  flat, kernels = packed_lib.kernels_of(model, params)
  for path, (k, ndim) in kernels.items():
    lead = flat[path].ndim - ndim
    try:
      check_group(flat[path].shape[lead:], k - 1, group_size, fmt)
    except ValueError as e:
      raise ValueError(f"{'/'.join(path)}: {e}") from None
  for path, (k, ndim) in kernels.items():
    fn = functools.partial(quantize_array, fmt=fmt, group=group_size, axis=k - 1)
    for _ in range(flat[path].ndim - ndim):
      fn = jax.vmap(fn)
    flat[path] = fn(flat[path])
  return flat


def pack(model, params: Any, fmt: str = "int4", group_size: int | None = None,
         symmetric: bool = False) -> packed_lib.PackedParams:
  """4-bit `PackedParams` of `model` (`lmjax.packed.pack(model, params, "int4" | "nf4")`).

  Args:
    model: an `lmjax.CausalLM`, `MaskedLM` or `Seq2SeqLM` (scanned layers or not).
    params: its float params tree (or `{"params": tree}`), quantized here round to nearest
      per group of `group_size` inputs; or `QuantParams` with int4 / uint4 kernels (any
      group size: `lmjax.quant.quantize(..., "int4")`, a GGUF's Q4_0 / Q4_1 blocks kept by
      `load_pretrained(..., quant="keep")`), packed as they are; for "nf4", `QuantParams`
      with nf4 kernels (`lmjax.quant.quantize(..., "nf4")`, double quantization undone).
    fmt: "int4" or "nf4" (NormalFloat4 codes: `w = NF4_TABLE[code] * absmax` per group).
    group_size: inputs per scale when quantizing float params (it must divide each kernel's
      last contracted axis, e.g. 32 or 64 for SmolLM2); default 32 for int4 (a GGUF block),
      64 for nf4 (QLoRA's block).
    symmetric: quantize float params with absmax / 7 scales and codes `c - 8` (int4, a GGUF
      Q4_0 block) instead of a scale and a minimum per group (uint4, a Q4_1 block; default).

  Returns:
    `PackedParams` with fmt "int4": each kernel (an untied head too) uint8 `[layers?, outputs,
    inputs / 2]` with float32 `<name>_scale` `[layers?, outputs, groups, 2]` (the scale and
    the offset of each group: `w = code * scale + offset`; nf4: `[..., groups, 1]`, the
    group's absmax); the token embedding (and so a tied
    output projection) int8 `[V, D]` with `embedding_scale` `[V, 1]` (`lmjax.quant.packed_int`'s
    layout: the embedding module checks its param's shape, so half-width rows cannot stand in
    for it; a quantized embedding is dequantized and requantized); everything else as it was.

  Raises:
    ValueError: another format, a group size that does not fit, an odd input width, or
      `QuantParams` whose kernels are not int4 / uint4 (nf4 for "nf4").
  """
  if fmt not in FORMATS:
    raise ValueError(f"packed 4-bit formats are {FORMATS}, not {fmt!r}")
  if isinstance(params, QuantParams):
    flat = flatten_dict(params.tree, is_leaf=lambda _, x: isinstance(x, QArray))
  else:
    q_fmt = "nf4" if fmt == "nf4" else "int4" if symmetric else "uint4"
    group = group_size or (NF4_GROUP if fmt == "nf4" else GROUP)
    flat = _quantized(model, params, group, q_fmt)
  out, packed = {}, []
  for path, q in flat.items():
    scale_path = path[:-1] + (path[-1] + "_scale",)
    if path[-2:] == ("embed", "embedding"):  # int8, one scale per row
      e = dequantize(q, jnp.float32) if isinstance(q, QArray) else q
      e = quantize_array(e, "int8", None, axis=1)
      out[path], out[scale_path] = e.qvalue, e.scale.astype(jnp.float32)
      continue
    if not isinstance(q, QArray):
      packed_int.refuse_float_kernel(path, fmt)
      out[path] = q
      continue
    _check(path, q, fmt)
    lead = q.scale.ndim - len(q.shape)
    codes, *scales = _layer_arrays(q, lead)  # (scale, offset), nf4: (absmax,)
    lead_shape = codes.shape[:lead]
    k = q.axis + 1  # the group axis is the last contracted one
    order = (*range(lead), *range(lead + k, lead + len(q.shape)), *range(lead, lead + k))
    matrix = lead_shape + (math.prod(q.shape[k:]), math.prod(q.shape[:k]))
    if matrix[-1] % 2:
      raise ValueError(f"{'/'.join(path)}: packed int4 needs an even number of inputs, got "
                       f"{matrix[-1]}")
    out[path] = jnp.asarray(pack_codes(np.transpose(codes, order).reshape(matrix)))
    out[scale_path] = jnp.asarray(np.stack(
        [np.transpose(a, order).reshape(matrix[:-1] + (-1,)) for a in scales], -1))
    packed.append((path, k, lead, lead_shape + q.shape))
  if not packed:
    raise ValueError(f"no {fmt} weights to pack")
  return packed_lib.PackedParams(unflatten_dict(out), fmt, tuple(sorted(packed)))


def _weights(codes: Array, s: Array, z: Array | None) -> Array:
  """float32 weights of uint8 codes in [0, 15] and their groups' scales (and offsets), each
  `[..., N, K]`: `code * s + z`; nf4 (`z` None) `NF4_TABLE[code] * s`."""
  if z is None:
    return jnp.take(jnp.asarray(NF4_TABLE), codes.astype(jnp.int32)) * s
  return codes.astype(jnp.float32) * s + z


def _per_input(scale: Array, k: int) -> tuple[Array, Array | None]:
  """The scales (and offsets; None for nf4) `[..., N, G, 1 | 2]` repeated to `[..., N, k]`."""
  g = k // scale.shape[-2]
  s = jnp.repeat(scale[..., 0], g, axis=-1)
  return s, (jnp.repeat(scale[..., 1], g, axis=-1) if scale.shape[-1] == 2 else None)


def dequantized(b: Array, scale: Array) -> Array:
  """float32 `[..., N, K]` from bytes `[..., N, K/2]` and `[..., N, G, 2]` scales, offsets
  (nf4: `[..., N, G, 1]` absmax scales)."""
  codes = unpack_codes(b)
  return _weights(codes, *_per_input(scale, codes.shape[-1]))


def unpack(packed: packed_lib.PackedParams) -> Any:
  """The float32 params tree in the model's layout (the dequantized int4 weights)."""
  flat = flatten_dict(packed.tree)
  for path, *_ in packed.packed:
    flat[path] = dequantized(flat[path], flat.pop(path[:-1] + (path[-1] + "_scale",)))
  for path in [p for p in flat if p[-2:] == ("embed", "embedding")]:
    if flat[path].dtype == jnp.int8:
      flat[path] = flat[path].astype(jnp.float32) * flat.pop(path[:-1] + ("embedding_scale",))
  return packed_lib.unpack(packed_lib.PackedParams(unflatten_dict(flat), "float32",
                                                   packed.packed))


def matmul_t(x: Array, b: Array, scale: Array, streamed: bool,
             flat_copy: Callable[[Array], Array], acts: str | None = None) -> Array:
  """`x [M, K] @ dequantized(b [N, K/2], scale [N, G, 2]).T` in float32.

  `streamed` (batch-1 decoding): two matrix-vector products, one per nibble half, each with
  its unpacking and scaling fused into the per-output loop. A few rows
  (`lmjax.packed_rows.applies`): the same two products per row. SmolLM2-135M forward of
  2 / 5 / 9 tokens over a 256-token cache (a shared 2-core CPU): 14 / 30 / 41 ms, against
  160 ms with the dequantized matrix's matmul and 450-510 ms with `lmjax.packed_rows`'s fused
  reduction over the unpacked halves (one row: 8 ms). More rows: that matmul. With `acts`
  "w4a8" (`PackedParams.activations` "int8"), products of up to `cpu_int4.MAX_ROWS` rows
  round their inputs to int8 per group (`lmjax.quant.cpu_int4`: its kernel on an x86-64 CPU).
  """
  if acts == "w4a8" and x.shape[0] <= cpu_int4.MAX_ROWS and scale.shape[-1] == 2:
    return cpu_int4.matmul_t(x, b, scale, functools.partial(
        _xla_matmul_t, streamed=streamed, flat_copy=flat_copy))
  return _xla_matmul_t(x, b, scale, streamed, flat_copy)


def _xla_matmul_t(x: Array, b: Array, scale: Array, streamed: bool,
                  flat_copy: Callable[[Array], Array]) -> Array:
  """`matmul_t` in XLA's own code (all formats, every platform)."""
  half = b.shape[-1]
  if not streamed and not packed_rows.applies(x.shape[0]):
    return jnp.dot(x, dequantized(b, scale).T)
  s, z = _per_input(scale, 2 * half)  # [N, K]: index math once fused
  lo = _weights(b & 15, s[:, :half], None if z is None else z[:, :half])
  hi = _weights(b >> 4, s[:, half:], None if z is None else z[:, half:])

  def row(r: Array) -> Array:  # [1, K] -> [1, N]
    y_lo = jnp.dot(flat_copy(r[:, :half]), lo.T)
    y_hi = jnp.dot(flat_copy(r[:, half:]), hi.T)
    return flat_copy(y_lo) + flat_copy(y_hi)
  return jnp.concatenate([row(x[i:i + 1]) for i in range(x.shape[0])], axis=0)
