"""GGUF Q8_0 / Q4_0 / Q4_1 blocks kept as they are: the very values llama.cpp decodes.

A ggml block holds 32 consecutive values of one row (a row runs along a weight's inputs):
Q8_0 an f16 scale and 32 int8 codes, Q4_0 an f16 scale and 16 bytes of 4-bit codes minus 8,
Q4_1 an f16 scale, an f16 minimum and 16 bytes of 4-bit codes; byte j holds value j (low
nibble) and value j + 16 (high). That is `QArray`'s "int8", "int4" and "uint4" with groups of
32 and the same nibble order, so the code bytes and scales are copied, never requantized or
even unpacked.

One pass over the file: each kept tensor's blocks are split into code bytes `[rows, inputs]`
(Q8_0) or `[rows, inputs / 2]` (4-bit), scales and minimums `[rows, inputs / 32]`, and each
goes through the float importer's own layout change (`lmjax.convert.layout.to_lmjax`: a
transpose and a split of one axis, which moves whole blocks when the blocks lie inside the
kernel's group axis, the axis the 32 inputs of a block run along); GGUF's permuted q/k rows
are undone on the rows of each part. Float tensors (norms, F32/F16 weights) load as
`lmjax.load_pretrained` loads them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from lmjax.convert import gguf as gguf_lib
from lmjax.convert.layout import check_tensors, to_lmjax
from lmjax.convert.tensors import TensorRef
from lmjax.quant.apply import QuantParams
from lmjax.quant.qarray import QArray

KEPT = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "uint4"}
BLOCK = 32
# The lmjax axis a tensor kind's GGUF rows run along (its kernel's last contracted axis; the
# embedding's model axis): `lmjax.convert.layout`'s kinds.
GROUP_AXIS = {"vector": 1, "in_proj": 0, "out_proj": 1, "linear": 0}


def _blocks(ckpt: gguf_lib.GGUFCheckpoint, ref: TensorRef) -> list[np.ndarray | None]:
  """[codes, scales, minimums (Q4_1; else None)] of a kept tensor, rows in the Hugging Face
  order: int8 codes `[rows, inputs]` (Q8_0) or bytes of two codes `[rows, inputs / 2]`, f16
  `[rows, inputs / 32]`."""
  qtype, shape, offset, heads = ref._load.__defaults__
  size = gguf_lib._BLOCKS[qtype]  # bytes per block
  rows = shape[0]
  blocks = np.asarray(ckpt._bytes(offset, qtype, shape)).reshape(-1, size)
  codes = blocks[:, 4 if qtype == "Q4_1" else 2:]
  parts = [codes.view(np.int8) if qtype == "Q8_0" else codes,
           blocks[:, 0:2].copy().view("<f2"),
           blocks[:, 2:4].copy().view("<f2") if qtype == "Q4_1" else None]
  parts = [None if p is None else p.reshape(rows, -1) for p in parts]
  if heads is not None:
    parts = [None if p is None else gguf_lib.unpermute_rotary(p, heads) for p in parts]
  return parts


def _kept(ckpt, ref: TensorRef, kind: str, lm_shape: tuple[int, ...], dtype: str,
          where: str, path: tuple[str, ...]) -> QArray:
  """A kept tensor as a `QArray` of the lmjax layout `lm_shape`, groups of 32 along the
  kind's group axis."""
  axis = GROUP_AXIS[kind]
  if lm_shape[axis] % BLOCK:
    raise ValueError(f"{where}: {'/'.join(path)} has {lm_shape[axis]} values along its "
                     f"group axis, not whole {BLOCK}-blocks")
  codes, scale, zero = _blocks(ckpt, ref)
  fmt = KEPT[ref.dtype]

  def placed(x: np.ndarray, per: int) -> np.ndarray:  # `per` values of the axis per entry
    shape = lm_shape[:axis] + (lm_shape[axis] // per,) + lm_shape[axis + 1:]
    return to_lmjax(kind, x, shape)
  qvalue = placed(codes, 1 if fmt == "int8" else 2)
  return QArray(jnp.asarray(qvalue), jnp.asarray(placed(scale, BLOCK)),
                None if zero is None else jnp.asarray(placed(zero, BLOCK)),
                fmt=fmt, shape=tuple(lm_shape), dtype=dtype, axis=axis, group=BLOCK)


def load_kept(path, dtype: str = "float32"):
  """(config, `QuantParams`, checkpoint) of a GGUF file with its quantized blocks kept.

  Float tensors (norms, F32/F16 weights) load as `lmjax.load_pretrained` loads them, in
  `dtype`; Q8_0/Q4_0/Q4_1 matrices become `QArray`s (groups of 32 along the kernel's last
  contracted axis, the embedding's model axis; f16 scales and minimums) that dequantize to
  `dtype`.

  Raises:
    ValueError: scanned layers, the checks of `lmjax.convert.layout.check_tensors` (names,
      shapes), or a block that does not fall inside one group axis (a head of the attention
      output narrower than a block).
  """
  ckpt = gguf_lib.GGUFCheckpoint(path)
  cfg = ckpt.config.replace(dtype=dtype, param_dtype=dtype)
  if cfg.scan_layers:
    raise ValueError("kept GGUF blocks need unscanned layers (scan_layers=False)")
  where = repr(str(path))
  out = {}
  for p, (names, kind, shape) in check_tensors(cfg, ckpt.tensors, where).items():
    ref = ckpt.tensors[names[0]]
    if ref.dtype in KEPT and len(shape) >= 2:
      out[p] = _kept(ckpt, ref, kind, tuple(shape), dtype, where, p)
    else:
      w = to_lmjax(kind, np.asarray(ref.load(), np.float32), tuple(shape))
      out[p] = jnp.asarray(w.astype(jnp.dtype(dtype)))
  return cfg, QuantParams(unflatten_dict(out), "gguf", ()), ckpt
