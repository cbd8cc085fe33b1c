"""GGUF Q8_0 / Q4_0 / Q4_1 blocks kept as they are: the very values llama.cpp decodes.

A ggml block holds 32 consecutive values of one row (a row runs along a weight's inputs):
Q8_0 an f16 scale and 32 int8 codes, Q4_0 an f16 scale and 16 bytes of 4-bit codes minus 8,
Q4_1 an f16 scale, an f16 minimum and 16 bytes of 4-bit codes; byte j holds value j (low
nibble) and value j + 16 (high). That is `QArray`'s "int8", "int4" and "uint4" with groups of
32 and the same nibble order, so the codes and scales are copied, never requantized.

Placing them in the model's layout reuses the float importer (`lmjax.convert.layout`): codes,
scales (repeated over their block) and minimums go through `build_params` as if they were
weights (every step is a transpose, reshape or row permutation, exact on small integers and
f16 values held in float32), and each kernel's group axis then takes every 32nd scale.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax.convert import gguf as gguf_lib
from lmjax.convert.layout import build_params
from lmjax.convert.tensors import TensorRef
from lmjax.counting import model_for
from lmjax.packed import _kernels
from lmjax.quant.apply import QuantParams
from lmjax.quant.qarray import QArray, grouped, pack4, ungrouped

KEPT = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "uint4"}
BLOCK = 32


def _parts(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """float32 `[*shape]` arrays of the codes, the scale and (Q4_1) the minimum of each value."""
  size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]  # bytes per block
  blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(-1, size)
  d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
  if qtype == "Q8_0":
    codes = blocks[:, 2:].view(np.int8).astype(np.float32)
  else:
    qs = blocks[:, 2:] if qtype == "Q4_0" else blocks[:, 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
  out = {"codes": codes, "scale": np.repeat(d, BLOCK, axis=1),
         "kind": np.full(codes.shape, list(KEPT).index(qtype), np.float32)}
  if qtype == "Q4_1":
    out["zero"] = np.repeat(blocks[:, 2:4].copy().view("<f2").astype(np.float32), BLOCK, axis=1)
  return {k: v.reshape(shape) for k, v in out.items()}


def _refs(ckpt: gguf_lib.GGUFCheckpoint, part: str) -> dict[str, TensorRef]:
  """The checkpoint's tensors with each kept tensor's `part` in place of its values (NaN for
  tensors that are not kept, or that lack the part)."""
  out = {}
  for name, ref in ckpt.tensors.items():
    qtype, shape, offset, heads = ref._load.__defaults__

    def load(qtype=qtype, shape=shape, offset=offset, heads=heads):
      if qtype not in KEPT:
        return np.full(shape, np.nan, np.float32)
      w = _parts(ckpt._bytes(offset, qtype, shape), qtype, shape).get(part)
      if w is None:
        return np.full(shape, np.nan, np.float32)
      return w if heads is None else gguf_lib.unpermute_rotary(w, heads)
    out[name] = dataclasses.replace(ref, _load=load)
  return out


def load_kept(path, dtype: str = "float32"):
  """(config, `QuantParams`, checkpoint) of a GGUF file with its quantized blocks kept.

  Float tensors (norms, F32/F16 weights) load as `lmjax.load_pretrained` loads them, in
  `dtype`; Q8_0/Q4_0/Q4_1 tensors become `QArray`s that dequantize to `dtype`.

  Raises:
    ValueError: a block that does not fall inside one group axis.
  """
  ckpt = gguf_lib.GGUFCheckpoint(path)
  cfg = ckpt.config.replace(dtype=dtype, param_dtype=dtype)
  if cfg.scan_layers:
    raise ValueError("kept GGUF blocks need unscanned layers (scan_layers=False)")
  where = repr(str(path))
  floats = flatten_dict(build_params(cfg, ckpt.tensors, where=where))
  f32 = cfg.replace(param_dtype="float32")
  parts = {p: flatten_dict(build_params(f32, _refs(ckpt, p), where=where))
           for p in ("codes", "scale", "zero", "kind")}
  model = model_for(cfg)
  axes = {path: k - 1 for path, (k, _) in _kernels(model, unflatten_dict(floats)).items()}
  out = dict(floats)
  for path in floats:
    codes = np.asarray(parts["codes"][path])
    if codes.ndim < 2 or np.isnan(codes).any():
      continue
    axis = 1 if path[-2:] == ("embed", "embedding") else axes[path]
    if codes.shape[axis] % BLOCK:
      raise ValueError(f"{where}: {'/'.join(path)} has {codes.shape[axis]} values along its "
                       f"group axis, not whole {BLOCK}-blocks")
    scale = np.asarray(grouped(parts["scale"][path], axis, BLOCK)[..., 0])
    zero = np.asarray(parts["zero"][path])
    has_zero = not np.isnan(zero).any()
    fmt = list(KEPT.values())[int(np.asarray(parts["kind"][path]).flat[0])]
    if fmt == "int8":
      qvalue = codes.astype(np.int8)
    else:
      qvalue = np.asarray(ungrouped(pack4(grouped(codes.astype(np.uint8), axis, BLOCK)), axis))
    f16 = lambda x, axis=axis: jnp.asarray(np.moveaxis(x, -1, axis), jnp.float16)  # noqa: E731
    zero_g = f16(np.asarray(grouped(zero, axis, BLOCK)[..., 0])) if has_zero else None
    out[path] = QArray(jnp.asarray(qvalue), f16(scale), zero_g,
                       fmt=fmt, shape=codes.shape, dtype=dtype, axis=axis, group=BLOCK)
  return cfg, QuantParams(unflatten_dict(out), "gguf", ()), ckpt
