"""Post-training weight quantization of a whole model: `quantize`, `dequantize_params`, `shard`.

Which weights: every projection (`Einsum` kernel), the token embedding (which is also the
output projection when tied) and an untied LM head; norms, biases and position tables stay
float. Groups run along each kernel's last contracted axis (D of `DNH`, H of `NHD`, D of `DF`,
F of `FD`), along D of the `[V, D]` embedding and of the `[D, V]` head, so a group is a run of
weights that one output's dot product reads, and the quantized arrays keep the kernel's
number of dims and logical axis names: they shard like the float params (`shard`).

Formats (Dettmers et al., 2022, "LLM.int8()" for per-channel absmax int8; Dettmers et al.,
2023, "QLoRA" for NF4; group-wise int4 as in GPTQ/AWQ's round-to-nearest baseline):
"int8" per output channel by default; "int4" and "nf4" in groups of 64 by default.

`per_output=True` (what the packed int8 layout uses, `lmjax.quant.packed_int`): int8 scales
strictly one per output over all of its inputs: for a kernel with two contracted axes (the
attention output `NHD`) the absmax runs over N and H (by default it runs over H: a scale per
head and output), stored along H with equal values across N.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmjax import packed as packed_lib
from lmjax.counting import example_inputs
from lmjax.quant.apply import QuantParams
from lmjax.quant.qarray import QArray, check_group, dequantize, double_quantize, quantize_array
from lmjax.sharding import LOGICAL_RULES, _fits

MODEL_FORMATS = ("int8", "int4", "nf4")
DEFAULT_GROUP = {"int8": None, "int4": 64, "nf4": 64}


def _targets(model: nn.Module, flat: dict, kernels: dict, embeddings, head) -> dict:
  """Path -> (group axis in one layer's array, leading layer dims, format or True)."""
  found = {}
  for path, (k, ndim) in kernels.items():
    w = flat[path]
    is_head = path[-2:] == ("head", "kernel") or (k == 1 and ndim == 2 and w.shape[-1]
                                                  == model.config.vocab_size)
    choice = head if is_head else True
    if choice:
      found[path] = (k - 1, w.ndim - ndim, choice)
  if embeddings:
    for path in flat:
      if path[-2:] == ("embed", "embedding"):
        found[path] = (1, 0, embeddings)
  return found


def per_output_int8(w: jax.Array, axis: int, double_quant: bool = False) -> QArray:
  """int8 codes of `w` with one absmax scale per output over all contracted axes
  `0..axis` (the group axis `axis` is the last contracted one), stored along `axis` like
  `quantize_array(w, "int8", None, axis)` stores its scales."""
  x = jnp.asarray(w, jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=tuple(range(axis + 1)), keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
  q = quantize_array(w, "int8", None, axis, double_quant)  # the container; scales replaced
  scale = jnp.broadcast_to(scale, q.scale.shape)
  if double_quant:
    s, s2, mean = double_quantize(scale)
    return q.replace(qvalue=codes, scale=s, scale2=s2, scale_mean=mean)
  return q.replace(qvalue=codes, scale=scale)


@functools.partial(jax.jit, static_argnames=("fmt", "group", "axis", "double_quant", "lead",
                                             "per_output"))
def _quantize_leaf(w, fmt, group, axis, double_quant, lead, per_output):
  fn = functools.partial(quantize_array, fmt=fmt, group=group, axis=axis,
                         double_quant=double_quant)
  if per_output and fmt == "int8" and axis > 0 and group == w.shape[lead + axis]:
    fn = functools.partial(per_output_int8, axis=axis, double_quant=double_quant)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(w)


def quantize(model: nn.Module, params: Any, fmt: str, group_size: int | None = -1, *,
             embeddings: bool | str = True, head: bool | str = True,
             double_quant: bool = False, per_output: bool = False) -> QuantParams:
  """Quantizes the weights of `model` (round to nearest, absmax scales).

  Args:
    model: an `lmjax.CausalLM`, `MaskedLM` or `Seq2SeqLM` (scanned layers or not).
    params: its raw float params tree (or `{"params": tree}`); left unchanged.
    fmt: "int8" (per output channel unless `group_size`), "int4" or "nf4" (groups).
    group_size: weights per group along each kernel's contracted axis; -1: the format's
      default (int8: the whole axis, int4/nf4: 64); None: the whole axis.
    embeddings: quantize the token embedding (and so a tied output projection): True (in
      `fmt`), False, or another format name (e.g. "int8" beside int4 layers).
    head: the same for an untied LM head.
    double_quant: quantize the group scales to int8 as well (QLoRA).
    per_output: int8 per channel: one scale per output over all contracted axes (the
      attention output: over heads too), as the packed int8 layout needs (module docstring).

  Returns:
    `QuantParams` for `lmjax.quant.apply`, `infer.generate` and the other decode functions.

  Raises:
    ValueError: an unknown format, or a group size that does not divide a weight's group axis
      (named), before anything is quantized.
  """
  if fmt not in MODEL_FORMATS:
    raise ValueError(f"unknown quantization format {fmt!r}; formats are {MODEL_FORMATS}")
  for name, v in (("embeddings", embeddings), ("head", head)):
    if isinstance(v, str) and v not in MODEL_FORMATS:
      raise ValueError(f"{name}={v!r}: give True, False or one of {MODEL_FORMATS}")
  if isinstance(params, QuantParams):
    raise ValueError("params are already quantized")
  flat, kernels = packed_lib.kernels_of(model, params)
  targets = _targets(model, flat, kernels, embeddings, head)
  plan = {}
  for path, (axis, lead, choice) in targets.items():
    f = fmt if choice is True else choice
    group = DEFAULT_GROUP[f] if group_size == -1 else group_size
    layer_shape = tuple(flat[path].shape[lead:])
    group = layer_shape[axis] if group is None else group
    try:
      check_group(layer_shape, axis, group, f)
    except ValueError as e:
      raise ValueError(f"{'/'.join(path)}: {e}") from None
    plan[path] = (f, group, axis, lead)
  out = dict(flat)
  for path, (f, group, axis, lead) in plan.items():
    out[path] = _quantize_leaf(flat[path], f, group, axis, double_quant, lead, per_output)
  layers = tuple(sorted(p for p, (_, _, _, lead) in plan.items() if lead))
  return QuantParams(unflatten_dict(out), fmt, layers)


def dequantize_params(qparams: QuantParams, dtype: Any = None) -> Any:
  """The float params tree back (each `QArray` dequantized; scanned layers per layer)."""
  flat = flatten_dict(qparams.tree, is_leaf=lambda _, x: isinstance(x, QArray))
  for path, x in flat.items():
    if isinstance(x, QArray):
      fn = functools.partial(dequantize, dtype=dtype)
      lead = x.qvalue.ndim - len(x.shape) if x.fmt == "int8" else x.scale.ndim - len(x.shape)
      for _ in range(lead):
        fn = jax.vmap(fn)
      flat[path] = fn(x)
  return unflatten_dict(flat)


def shardings(model: nn.Module, qparams: QuantParams, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for `qparams` (a `QuantParams` tree): codes, scales and offsets of a
  weight by the weight's own logical axis names; double-quantization scales replicated."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                            *example_inputs(model.config))["params"])
  specs = flatten_dict(nn.logical_to_mesh(nn.get_partition_spec(boxed), rules))
  replicated = NamedSharding(mesh, PartitionSpec())

  def named(spec, x):
    return NamedSharding(mesh, _fits(spec, x.shape, mesh))

  flat = flatten_dict(qparams.tree, is_leaf=lambda _, x: isinstance(x, QArray))
  out = {}
  for path, x in flat.items():
    spec = specs.get(path, PartitionSpec())
    if isinstance(x, QArray):
      out[path] = x.replace(
          qvalue=named(spec, x.qvalue), scale=named(spec, x.scale) if x.scale2 is None
          else replicated, zero=None if x.zero is None else named(spec, x.zero),
          scale2=None if x.scale2 is None else replicated,
          scale_mean=None if x.scale_mean is None else replicated)
    else:
      out[path] = named(spec, x)
  return qparams.replace(tree=unflatten_dict(out))


def shard(model: nn.Module, qparams: QuantParams, mesh: Mesh) -> QuantParams:
  """`qparams` placed on `mesh`, sharded like the float params (see `shardings`)."""
  return jax.device_put(qparams, shardings(model, qparams, mesh))


def nbytes(params: Any) -> int:
  """Bytes of a params tree (float or `QuantParams`)."""
  tree = params.tree if isinstance(params, QuantParams) else params
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
