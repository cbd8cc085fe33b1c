"""`QArray`: a weight stored as small integer codes with per-group scales (and offsets).

One container for every weight format of `lmjax.quant`:

- "int8": signed 8-bit codes, `w ~ q * scale` (per channel: one group spans the whole axis);
- "int4": signed 4-bit codes in [-8, 7] stored as `q + 8`, `w ~ (c - 8) * scale`; the same
  arithmetic as a GGUF Q4_0 block, so Q4_0 files are kept as they are;
- "uint4": unsigned 4-bit codes with an offset, `w ~ c * scale + zero` (a GGUF Q4_1 block);
- "nf4": 4-bit NormalFloat (Dettmers et al., 2023, "QLoRA"), `w ~ NF4[c] * absmax`.

Groups (blocks) run along one axis of the weight (`axis`), `group` consecutive elements each.
`qvalue` keeps the weight's number of dims, with that axis shortened (halved for 4-bit codes,
two per byte), and `scale` keeps them too with that axis of length `n // group`: both can
carry the weight's own logical axis names and so shard like the float weight.

4-bit packing, within each group of `g` elements: byte `j < g/2` holds element `j` in its low
nibble and element `j + g/2` in its high nibble, so unpacking is two masks and a concatenation
per group (no interleaving).

Double quantization (QLoRA): `scale` itself may be stored as int8 codes of `scale - mean`
with one float32 scale per 256 consecutive scales (`scale2`) and the mean (`scale_mean`),
0.127 bits per weight instead of 0.5 for float32 scales of 64-element groups (QLoRA uses an
8-bit float for the codes; here they are linear int8).
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FORMATS = ("int8", "int4", "uint4", "nf4")
FOUR_BIT = ("int4", "uint4", "nf4")
DOUBLE_QUANT_BLOCK = 256

# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero, 8 positive
# and 7 negative levels (QLoRA, Appendix E; derived in `nf4.normal_float_table`).
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


@flax.struct.dataclass
class QArray:
  """A quantized array (see the module docstring).

  Attributes:
    qvalue: int8 codes (fmt "int8") or uint8 bytes of two 4-bit codes, the weight's shape with
      `shape[axis]` replaced by `shape[axis]` (int8) or `shape[axis] // 2` (4-bit).
    scale: float32 per-group scales, `shape[axis]` replaced by `shape[axis] // group`; int8
      codes when double-quantized.
    zero: float32 per-group offsets (fmt "uint4"), like `scale`; None otherwise.
    scale2: float32 `[ceil(scales / 256)]`, the second-level scales of double quantization.
    scale_mean: float32 `[]`, the mean subtracted before double quantization.
    fmt: one of `FORMATS`.
    shape: the weight's shape; dtype: its dtype's name; axis: the group axis; group: its size.
  """

  qvalue: Array
  scale: Array
  zero: Array | None = None
  scale2: Array | None = None
  scale_mean: Array | None = None
  fmt: str = flax.struct.field(pytree_node=False, default="int8")
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  dtype: str = flax.struct.field(pytree_node=False, default="float32")
  axis: int = flax.struct.field(pytree_node=False, default=0)
  group: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held (codes, scales, offsets)."""
    leaves = [self.qvalue, self.scale, self.zero, self.scale2, self.scale_mean]
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in leaves if x is not None)


def check_group(shape: tuple[int, ...], axis: int, group: int, fmt: str) -> None:
  """Raises a ValueError unless `group` divides `shape[axis]` (and is even for 4-bit)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown quantization format {fmt!r}; formats are {FORMATS}")
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"group axis {axis} is out of range for shape {tuple(shape)}")
  n = shape[axis]
  if group <= 0 or n % group:
    raise ValueError(f"group size {group} does not divide axis {axis} of length {n} "
                     f"(shape {tuple(shape)}); pick a divisor of {n}")
  if fmt in FOUR_BIT and group % 2:
    raise ValueError(f"{fmt} packs two codes per byte within a group: group size {group} "
                     "must be even")


def grouped(x: Array, axis: int, group: int) -> Array:
  """`x` with `axis` moved last and split into `[..., n // group, group]`."""
  x = jnp.moveaxis(x, axis, -1)
  return x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))


def ungrouped(x: Array, axis: int) -> Array:
  """Inverse of `grouped`: `[..., G, g]` -> the axis back in place with length `G * g`."""
  x = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
  return jnp.moveaxis(x, -1, axis)


def pack4(codes: Array) -> Array:
  """uint8 codes in [0, 15] `[..., G, g]` -> bytes `[..., G, g // 2]` (see module docstring)."""
  half = codes.shape[-1] // 2
  codes = codes.astype(jnp.uint8)
  return codes[..., :half] | (codes[..., half:] << 4)


def unpack4(packed: Array) -> Array:
  """Bytes `[..., G, g // 2]` -> codes `[..., G, g]` (uint8 in [0, 15])."""
  return jnp.concatenate([packed & 15, packed >> 4], axis=-1)


def double_quantize(scale: Array) -> tuple[Array, Array, Array]:
  """float32 scales (any shape) -> (int8 codes of `scale - mean`, `scale2`, `mean`)."""
  mean = jnp.mean(scale)
  flat = (scale - mean).reshape(-1)
  n = flat.shape[0]
  blocks = -(-n // DOUBLE_QUANT_BLOCK)
  flat = jnp.pad(flat, (0, blocks * DOUBLE_QUANT_BLOCK - n)).reshape(blocks, -1)
  s2 = jnp.max(jnp.abs(flat), axis=-1) / 127.0
  s2 = jnp.where(s2 == 0, 1.0, s2)
  codes = jnp.clip(jnp.round(flat / s2[:, None]), -127, 127).astype(jnp.int8)
  return codes.reshape(-1)[:n].reshape(scale.shape), s2, mean


def scales_of(q: QArray) -> Array:
  """The float32 per-group scales of `q` (undoing double quantization)."""
  if q.scale2 is None:
    return q.scale.astype(jnp.float32)
  flat = q.scale.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  blocks = q.scale2.shape[0]
  flat = jnp.pad(flat, (0, blocks * DOUBLE_QUANT_BLOCK - n)).reshape(blocks, -1)
  flat = (flat * q.scale2[:, None]).reshape(-1)[:n]
  return flat.reshape(q.scale.shape) + q.scale_mean


def codes_of(q: QArray) -> Array:
  """The codes of `q` grouped, `[..., G, g]` (int8 for "int8", uint8 in [0, 15] for 4-bit)."""
  if q.fmt == "int8":
    return grouped(q.qvalue, q.axis, q.group)
  return unpack4(grouped(q.qvalue, q.axis, q.group // 2))


def levels(q: QArray, codes: Array) -> Array:
  """float32 code values before scaling (NF4 table lookup, `c - 8` for int4)."""
  if q.fmt == "nf4":
    return jnp.asarray(NF4_TABLE)[codes.astype(jnp.int32)]
  if q.fmt == "int4":
    return codes.astype(jnp.float32) - 8.0
  return codes.astype(jnp.float32)


def dequantize(q: QArray, dtype: Any = None) -> Array:
  """The weight back from a `QArray` (usable inside `jax.jit`).

  Args:
    q: a `QArray` of any format.
    dtype: the result dtype; default the quantized weight's original dtype.

  Returns:
    An array of `q.shape`.
  """
  s = scales_of(q)
  axis = q.axis % len(q.shape)
  w = levels(q, codes_of(q)) * jnp.moveaxis(s, axis, -1)[..., None]
  if q.zero is not None:
    w = w + jnp.moveaxis(q.zero.astype(jnp.float32), axis, -1)[..., None]
  return ungrouped(w, axis).astype(dtype or q.dtype)


def quantize_array(w: Array, fmt: str, group: int | None = None, axis: int = 0,
                   double_quant: bool = False) -> QArray:
  """Quantizes `w` to `fmt` with groups of `group` along `axis` (None: the whole axis).

  Scales are absmax: int8 `absmax / 127`, int4 `absmax / 7` (codes clipped to [-8, 7]),
  nf4 `absmax` (nearest of the 16 NF4 levels), uint4 `(max - min) / 15` with offset `min`.
  Error bound per element: half a step (`scale / 2`), for nf4 half the widest gap between
  neighbouring NF4 levels times absmax.
  """
  shape = tuple(w.shape)
  axis = axis % len(shape) if shape else 0
  group = shape[axis] if group is None else group
  check_group(shape, axis, group, fmt)
  dtype = jnp.dtype(w.dtype).name
  x = grouped(jnp.asarray(w, jnp.float32), axis, group)
  zero = None
  if fmt == "uint4":
    lo, hi = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    codes = jnp.clip(jnp.round((x - lo[..., None]) / scale[..., None]), 0, 15)
    zero = jnp.moveaxis(lo, -1, axis)
  else:
    absmax = jnp.max(jnp.abs(x), axis=-1)
    top = {"int8": 127.0, "int4": 7.0, "nf4": 1.0}[fmt]
    scale = jnp.where(absmax > 0, absmax / top, 1.0)
    y = x / scale[..., None]
    if fmt == "nf4":
      codes = nf4_index(y)
    elif fmt == "int4":
      codes = jnp.clip(jnp.round(y), -8, 7) + 8
    else:
      codes = jnp.clip(jnp.round(y), -127, 127)
  if fmt == "int8":
    qvalue = ungrouped(codes.astype(jnp.int8), axis)
  else:
    qvalue = ungrouped(pack4(codes.astype(jnp.uint8)), axis)
  scale = jnp.moveaxis(scale, -1, axis)
  s2 = mean = None
  if double_quant:
    scale, s2, mean = double_quantize(scale)
  return QArray(qvalue, scale, zero, s2, mean, fmt=fmt, shape=shape, dtype=dtype, axis=axis,
                group=group)


def nf4_index(y: Array) -> Array:
  """The index (uint8, 0..15) of the NF4 level nearest to each value of `y` (in [-1, 1])."""
  mids = jnp.asarray((NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2)
  return jnp.searchsorted(mids, jnp.asarray(y, jnp.float32)).astype(jnp.uint8)


def bits_per_weight(q: QArray) -> float:
  return 8.0 * q.nbytes / max(1, math.prod(q.shape))
