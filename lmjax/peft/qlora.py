"""QLoRA's base (Dettmers et al., 2023, arXiv:2305.14314): weights stored NF4.

`quantize_base` stores every projection kernel (`Einsum`: attention and feed-forward), an
untied LM head and, by default, the token embedding (the tied output projection too) as NF4
`lmjax.quant.QArray`s, with `lmjax.quant.quantize` (one NF4 code for the library: blocks of
64 along each kernel's contracted axis and along D of the `[V, D]` embedding, double-quantized
scales); norms are cast to `dtype`. A scanned model's `[L, ...]` kernels keep the layer axis
first on every array and one layer's static shape, so `nn.scan` slices them like any param.
`lmjax.peft.apply` dequantizes each kernel on the fly inside the compiled step, where the layer
runs (the embedding lookup dequantizes only the rows it gathers); LoRA's float32 A and B sit on
top. QLoRA itself leaves the embedding in 16 bits; quantizing it too (`embeddings=True`, the
default) takes a 135M model with a tied 49152-row vocabulary from 0.42x to 0.26x of bfloat16.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax import quant
from lmjax.config import TransformerConfig
from lmjax.counting import model_for
from lmjax.quant.qarray import QArray

_ARRAYS = ("qvalue", "scale", "zero", "scale2", "scale_mean")


def quantize_base(params: Any, config: TransformerConfig, *, block_size: int = 64,
                  double_quant: bool = True, dtype: Any = jnp.bfloat16,
                  embeddings: bool = True) -> dict:
  """The base with its projection kernels (and embedding) NF4 and every other param in `dtype`.

  Args:
    params: the base's raw params.
    config: its config.
    block_size: NF4 block (64 in QLoRA); it must divide each kernel's contracted width.
    double_quant: quantize the block scales too (QLoRA's double quantization).
    dtype: the other params' dtype (and the dequantized weights').
    embeddings: NF4 for the token embedding (and so a tied output projection) too; False keeps
      it in `dtype`, as QLoRA does.

  Returns:
    A params tree whose kernels are `QArray`s (fmt "nf4"); run it with `lmjax.peft.apply`.

  Raises:
    ValueError: the block size does not divide a weight's block axis (the weight is named).
  """
  q = quant.quantize(model_for(config), nn.meta.unbox(params), "nf4", block_size,
                     embeddings=embeddings, head=True, double_quant=double_quant)
  name = jnp.dtype(dtype).name
  return jax.tree.map(lambda x: x.replace(dtype=name) if isinstance(x, QArray)
                      else jnp.asarray(x).astype(dtype), q.tree,
                      is_leaf=lambda x: isinstance(x, QArray))


def dequantized(params: Any) -> Any:
  """Every `QArray` of a params tree back in float (its stored dtype), per layer when scanned:
  the weights a QLoRA run trained on."""
  return quant.dequantize_params(quant.QuantParams(params, "nf4"))


def abstract(boxed: Any, config: TransformerConfig, *, block_size: int = 64,
             double_quant: bool = True, dtype: Any = jnp.bfloat16,
             embeddings: bool = True) -> Any:
  """The boxed abstract tree of `quantize_base` (for `train.trainer.Frozen`): codes and scales
  carry their kernel's logical names (the same number of dims), the double-quantization
  scales only the layer axis."""
  raw = jax.eval_shape(lambda p: quantize_base(p, config, block_size=block_size,
                                               double_quant=double_quant, dtype=dtype,
                                               embeddings=embeddings),
                       nn.meta.unbox(boxed))
  names = {p: x.names for p, x in flatten_dict(
      boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)).items()}
  out = {}
  for path, leaf in flatten_dict(raw, is_leaf=lambda _, x: isinstance(x, QArray)).items():
    n = names[path]
    if not isinstance(leaf, QArray):
      out[path] = nn.LogicallyPartitioned(leaf, n)
      continue
    lead = n[:1] if n and n[0] == "layers" else ()
    boxes = {}
    for k in _ARRAYS:
      x = getattr(leaf, k)
      if x is None:
        continue
      boxes[k] = nn.LogicallyPartitioned(x, n if k in ("qvalue", "scale", "zero")
                                         else lead + (None,) * (len(x.shape) - len(lead)))
    out[path] = leaf.replace(**boxes)
  return unflatten_dict(out)


def nbytes(tree: Any) -> int:
  """Bytes of a params tree (`QArray` codes and scales included)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
