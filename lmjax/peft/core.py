"""Running a model with adapters: the `Adapted` params and the method interceptor.

PEFT never threads a flag through the layers. `apply(model, adapted, ...)` runs the unchanged
model under `flax.linen.intercept_methods`: the adapter's leaves are placed beside the base's
in the params tree at their module paths (so `nn.scan` slices them per layer like the kernels),
and the interceptor changes only the calls whose module holds them:

- an `Einsum` with `lora_a`/`lora_b` adds `s (x A) B` (Hu et al., 2021);
- a module whose weight is an NF4 `lmjax.quant.QArray` (an `Einsum` kernel, the token
  embedding, an untied head: a QLoRA base, Dettmers et al., 2023) is computed by
  `lmjax.quant`'s reader, the weight dequantized on the fly;
- a `MultiHeadAttention` / `FeedForward` with `adapter_down`/`adapter_up` adds a bottleneck
  adapter to its output (Houlsby et al., 2019);
- the `TokenEmbedding` with `prompt_embeddings` writes the soft prompt over the k positions
  `apply` prepended (Lester et al., 2021).

A *bank* (`stack`) holds M adapters of one method with a leading `[M]` axis (after `[L]` when
scanned); `with_rows` names each batch row's adapter (or None: the base), and one forward serves
a batch of mixed adapters. Swapping adapters of one shape never recompiles: they are arguments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax.attention import MultiHeadAttention
from lmjax.embeddings import TokenEmbedding
from lmjax.layers import Einsum, FeedForward, activation_fn, project_split
from lmjax.peft import lora
from lmjax.peft.config import LoRAConfig, PromptConfig, Spec
from lmjax.quant.apply import interceptor, read_quantized
from lmjax.quant.qarray import QArray
from lmjax.transformer import LMHead

Array = jax.Array
LORA_KEYS = ("lora_a", "lora_b")
ADAPTER_KEYS = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")
PROMPT_KEY = "prompt_embeddings"
_QUANT = interceptor(read_quantized)  # lmjax.quant's reader of QArray weights
_WEIGHT = {Einsum: "kernel", TokenEmbedding: "embedding", LMHead: "kernel"}


def _quantized(m: nn.Module) -> bool:
  """Whether `m`'s weight is a `QArray` (read by `lmjax.quant`'s interceptor)."""
  name = next((w for t, w in _WEIGHT.items() if isinstance(m, t)), None)
  return (name is not None and m.has_variable("params", name)
          and isinstance(m.get_variable("params", name), QArray))


@flax.struct.dataclass
class Adapted:
  """A base's params with one adapter, or a bank of M adapters (a pytree; pass it where a
  params tree goes: `apply`, `PeftModel.apply`, `infer.generate`).

  Attributes:
    base: the base model's raw params (kernels may be NF4 `QArray`s: QLoRA).
    adapter: the adapter's raw params, mirroring the model's module paths.
    scale: LoRA's `alpha / r` (`[]`), or one per adapter of a bank (`[M]`); 1 otherwise.
    spec: the method's config (static).
    rows: a bank's adapter index per batch row `[B]` (-1: the base), None for one adapter.
    names: a bank's adapter names (static); () for one adapter.
    merged: LoRA folded into `base` (`merge_adapted`): the LoRA branch is skipped (static).
  """

  base: Any
  adapter: Any
  scale: Array
  spec: Spec = flax.struct.field(pytree_node=False)
  rows: Array | None = None
  names: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  merged: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def stacked(self) -> bool:
    return bool(self.names)


def adapt(base: Any, adapter: Any, spec: Spec) -> Adapted:
  """The base with one adapter (raw trees; boxed leaves are unboxed)."""
  scale = spec.scale if isinstance(spec, LoRAConfig) else 1.0
  return Adapted(nn.meta.unbox(base), nn.meta.unbox(adapter), jnp.float32(scale), spec)


def merged_tree(adapted: Adapted) -> dict:
  """The base tree with the adapter's leaves beside the base's, at their module paths."""
  flat = flatten_dict(adapted.base)
  for path, leaf in flatten_dict(adapted.adapter).items():
    if path in flat:
      raise ValueError(f"adapter leaf {'/'.join(path)} would replace a base param")
    flat[path] = leaf
  return unflatten_dict(flat)


@dataclasses.dataclass
class _Interceptor:
  """The calls `apply` changes (see the module docstring)."""

  spec: Spec
  scale: Array
  rows: Array | None
  train: bool
  prompt_len: int  # positions `apply` prepended (0: none in this call)
  merged: bool = False

  def __call__(self, next_fun, args, kwargs, ctx):
    m, name = ctx.module, ctx.method_name
    if _quantized(m):  # a QLoRA base: lmjax.quant computes it from the NF4 weight
      base_fun = next_fun
      next_fun = lambda *a, **k: _QUANT(base_fun, a, k, ctx)  # noqa: E731
    if isinstance(m, Einsum) and name == "__call__":
      return self._einsum(m, next_fun, args, kwargs)
    if isinstance(m, (MultiHeadAttention, FeedForward)) and name == "__call__":
      out = next_fun(*args, **kwargs)
      if not m.has_variable("params", "adapter_down"):
        return out
      if isinstance(out, tuple):
        return (self._bottleneck(m, out[0]),) + tuple(out[1:])
      return self._bottleneck(m, out)
    if isinstance(m, TokenEmbedding) and name == "__call__" and self.prompt_len:
      return self._prompt(m, next_fun(*args, **kwargs))
    return next_fun(*args, **kwargs)

  def _row_ids(self, batch: int) -> Array:
    rows = self.rows
    if rows.shape[0] != batch:  # rows repeated per sample (generate's num_samples)
      if batch % rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} adapter rows for a batch of {batch}")
      rows = jnp.repeat(rows, batch // rows.shape[0])
    return rows

  def _per_row(self, w: Array, batch: int) -> Array:
    """A bank leaf `[M, ...]` gathered per row `[B, ...]` (a row of -1 reads adapter 0)."""
    return jnp.take(w, jnp.maximum(self._row_ids(batch), 0), axis=0)

  def _einsum(self, m: Einsum, next_fun, args, kwargs) -> Array:
    x = args[0]
    y = next_fun(*args, **kwargs)
    if self.merged or not m.has_variable("params", "lora_a"):
      return y
    a, b = (m.get_variable("params", k) for k in LORA_KEYS)
    k = project_split(m.eqn)
    lead = x.shape[:x.ndim - k]
    h = x.reshape(lead + (-1,))
    spec = self.spec
    if self.train and spec.dropout > 0:
      keep = jax.random.bernoulli(m.make_rng("dropout"), 1.0 - spec.dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - spec.dropout), 0).astype(h.dtype)
    dt = h.dtype
    if self.rows is None:
      r = a.shape[-1]
      d = (h @ a.reshape(-1, r).astype(dt)) @ b.reshape(r, -1).astype(dt)
      d = d * self.scale.astype(dt)
    else:
      bsz, r = x.shape[0], a.shape[-1]
      ar = self._per_row(a.reshape(a.shape[0], -1, r), bsz).astype(dt)
      br = self._per_row(b.reshape(b.shape[0], r, -1), bsz).astype(dt)
      s = jnp.where(self._row_ids(bsz) >= 0, self._per_row(self.scale, bsz), 0.0).astype(dt)
      h = h.reshape(bsz, -1, h.shape[-1])
      d = jnp.einsum("BTr,Bro->BTo", jnp.einsum("BTi,Bir->BTr", h, ar), br) * s[:, None, None]
    return y + d.reshape(y.shape).astype(y.dtype)

  def _bottleneck(self, m: nn.Module, y: Array) -> Array:
    down, bd, up, bu = (m.get_variable("params", k).astype(y.dtype) for k in ADAPTER_KEYS)
    act = activation_fn(self.spec.activation)
    if self.rows is None:
      lead = (1,) * (y.ndim - 1)
      z = act(y @ down + bd.reshape(lead + bd.shape)) @ up + bu.reshape(lead + bu.shape)
    else:
      bsz = y.shape[0]
      down, bd, up, bu = (self._per_row(w, bsz) for w in (down, bd, up, bu))
      h = act(jnp.einsum("BTD,BDm->BTm", y, down) + bd[:, None, :])
      z = jnp.einsum("BTm,BmD->BTD", h, up) + bu[:, None, :]
      z = jnp.where((self._row_ids(bsz) >= 0)[:, None, None], z, 0)
    return y + z

  def _prompt(self, m: TokenEmbedding, x: Array) -> Array:
    p = m.get_variable("params", PROMPT_KEY)
    k = self.prompt_len
    if self.rows is None:
      p = jnp.broadcast_to(p[None], (x.shape[0],) + p.shape)
    else:
      p = self._per_row(p, x.shape[0])
    return jnp.concatenate([p.astype(x.dtype), x[:, k:]], axis=1)


def _prompt_inputs(k: int, tokens: Array, kwargs: dict) -> tuple[Array, dict]:
  """k placeholder positions before `tokens` `[B, T]`, with segment ids and positions."""
  b = tokens.shape[0]
  tokens = jnp.concatenate([jnp.zeros((b, k), tokens.dtype), tokens], axis=1)
  kw = dict(kwargs)
  seg = kw.get("segment_ids")
  if seg is not None:
    kw["segment_ids"] = jnp.concatenate([jnp.broadcast_to(seg[:, :1], (b, k)), seg], axis=1)
  pos = kw.get("positions")
  if pos is not None:
    virt = jnp.broadcast_to(jnp.arange(k, dtype=pos.dtype)[None], (b, k))
    kw["positions"] = jnp.concatenate([virt, pos + k], axis=1)
  return tokens, kw


def prompt_length(adapted: Adapted) -> int:
  if not isinstance(adapted.spec, PromptConfig):
    return 0
  p = flatten_dict(adapted.adapter).get(("embed", PROMPT_KEY))
  return 0 if p is None else p.shape[-2]


def base_only(adapted: Adapted) -> Adapted:
  """The same base without its adapter: what the base model computes, from the same arrays
  (a DPO/RL reference at no extra memory; an NF4 base is still read as NF4).

  Raises:
    ValueError: the adapter is merged into the base (`merge_adapted`): unmerge first.
  """
  if not isinstance(adapted, Adapted):
    raise TypeError(f"base_only needs an Adapted (lmjax.peft.adapt), got {type(adapted)}")
  if adapted.merged:
    raise ValueError("this adapter is merged into the base; unmerge_adapted first")
  return Adapted(adapted.base, {}, jnp.zeros((), jnp.float32), adapted.spec)


def apply(model: nn.Module, adapted: Adapted, *args, **kwargs):
  """`model.apply` with the adapter(s) of `adapted`: same arguments and results.

  Args:
    model: the base's linen module (`lmjax.CausalLM`, ...), unchanged.
    adapted: an `Adapted` (`adapt`, `stack` + `with_rows`).
    *args, **kwargs: what `model.apply({"params": ...}, ...)` takes (`train=True` turns on
      LoRA dropout; `rngs={"dropout": key}` then).

  Returns:
    What the model returns (logits `[B, T, V]`, or `(logits, cache)`). With a soft prompt of
    k tokens, the k virtual positions are prepended to the tokens (and to the KV cache when
    filling one: a prefill, or a call without a cache) and their logits left out.
  """
  if not isinstance(adapted, Adapted):
    raise TypeError(f"apply needs an Adapted (lmjax.peft.adapt / stack), got {type(adapted)}")
  if adapted.stacked and adapted.rows is None:
    raise ValueError(f"a bank of adapters {list(adapted.names)} needs each row's adapter: "
                     "lmjax.peft.with_rows(bank, [name or None per row])")
  k = prompt_length(adapted)
  cache = kwargs.get("cache")
  prepend = k > 0 and (cache is None or kwargs.get("prefill", False))
  if prepend:
    tokens, kwargs = _prompt_inputs(k, args[0], kwargs)
    args = (tokens,) + tuple(args[1:])
  icpt = _Interceptor(adapted.spec, adapted.scale, adapted.rows, bool(kwargs.get("train")),
                      k if prepend else 0, adapted.merged)
  with nn.intercept_methods(icpt):
    out = model.apply({"params": merged_tree(adapted)}, *args, **kwargs)
  if not prepend:
    return out
  if isinstance(out, tuple):
    return (out[0][:, k:],) + tuple(out[1:])
  return out[:, k:]


def merge_adapted(adapted: Adapted) -> Adapted:
  """LoRA folded into the base kernels (float32 math, cast back), so each call is a plain
  forward; merging a merged `Adapted` changes nothing (idempotent). `unmerge_adapted` undoes it.

  Raises:
    ValueError: not one LoRA adapter (a bank, another method) or an NF4 base (merge into a
      dequantized copy instead: merging into 4-bit codes would round the update away).
  """
  _check_mergeable(adapted)
  if adapted.merged:
    return adapted
  return adapted.replace(base=lora.merge(adapted.base, adapted.adapter, adapted.spec),
                         merged=True)


def unmerge_adapted(adapted: Adapted) -> Adapted:
  """Inverse of `merge_adapted` (no-op when not merged)."""
  _check_mergeable(adapted)
  if not adapted.merged:
    return adapted
  return adapted.replace(base=lora.unmerge(adapted.base, adapted.adapter, adapted.spec),
                         merged=False)


def _check_mergeable(adapted: Adapted) -> None:
  if not isinstance(adapted.spec, LoRAConfig) or adapted.stacked:
    raise ValueError("only one LoRA adapter merges into its base (not a bank, a soft prompt or "
                     "a bottleneck adapter)")
  if any(isinstance(x, QArray) for x in jax.tree.leaves(
      adapted.base, is_leaf=lambda x: isinstance(x, QArray))):
    raise ValueError("the base is NF4: merge into a float copy (lmjax.quant.dequantize each "
                     "kernel) rather than into 4-bit codes, which would round the update away")


class PeftModel:
  """A base model that takes `Adapted` params: `PeftModel(model).apply({"params": adapted},
  ...)` is `apply(model, adapted, ...)`, so losses written for `model.apply` run unchanged."""

  def __init__(self, model: nn.Module):
    self.model = model
    self.config = model.config

  def apply(self, variables, *args, **kwargs):
    return apply(self.model, variables["params"], *args, **kwargs)

  def __repr__(self) -> str:
    return f"PeftModel({type(self.model).__name__})"


# --- banks: several adapters on one base -------------------------------------------------------


def stack(base: Any, adapters: Mapping[str, tuple[Any, Spec]]) -> Adapted:
  """A bank of named adapters of one method on one base (the leading `[M]` axis in name order).

  LoRA adapters of different ranks or targets are zero-padded to the largest rank and the union
  of targets (zero rows and columns add nothing, so each adapter computes exactly what it does
  alone); soft prompts must share their length, bottleneck adapters their config.

  Raises:
    ValueError: no adapters, mixed methods, or shapes that cannot share a bank.
  """
  if not adapters:
    raise ValueError("stack needs at least one named adapter")
  names = tuple(adapters)
  specs = [s for _, s in adapters.values()]
  methods = {s.method for s in specs}
  if len(methods) > 1:
    raise ValueError(f"a bank holds adapters of one method; got {sorted(methods)}")
  trees = [flatten_dict(nn.meta.unbox(a)) for a, _ in adapters.values()]
  spec0 = specs[0]
  if isinstance(spec0, LoRAConfig):
    rank = max(s.rank for s in specs)
    ref = {p: x for t in trees for p, x in t.items()}  # a leaf of each path, for its shape
    leaves = {}
    for p in sorted(ref):
      per = [t.get(p, jnp.zeros(ref[p].shape, ref[p].dtype)) for t in trees]
      leaves[p] = _stack_leaves([_pad_rank(x, p, rank) for x in per], p)
    spec = dataclasses.replace(spec0, rank=rank)
    scale = jnp.asarray([s.scale for s in specs], jnp.float32)
  else:
    if len(set(specs)) > 1 and not isinstance(spec0, PromptConfig):
      raise ValueError(f"bottleneck adapters of one bank must share their config; got {specs}")
    keys = [set(t) for t in trees]
    if any(k != keys[0] for k in keys):
      raise ValueError("the adapters of a bank must have the same params (same placement)")
    leaves = {}
    for p in trees[0]:
      per = [t[p] for t in trees]
      if len({x.shape for x in per}) > 1:
        raise ValueError(f"{'/'.join(p)}: shapes {[x.shape for x in per]} differ; a bank's "
                         "soft prompts / adapters must have one shape")
      leaves[p] = _stack_leaves(per, p)
    spec = spec0
    scale = jnp.ones((len(names),), jnp.float32)
  return Adapted(nn.meta.unbox(base), unflatten_dict(leaves), scale, spec, None, names)


def _layer_axes(p: tuple[str, ...]) -> int:
  return 1 if "layers" in p else 0  # scanned: [L, ...] first


def _pad_rank(x: Array, p: tuple[str, ...], rank: int) -> Array:
  """A LoRA leaf zero-padded to `rank` (lora_a: its last axis; lora_b: the axis after [L])."""
  axis = x.ndim - 1 if p[-1] == "lora_a" else _layer_axes(p)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, rank - x.shape[axis])
  return jnp.pad(x, widths)


def _stack_leaves(per: Sequence[Array], p: tuple[str, ...]) -> Array:
  return jnp.stack([jnp.asarray(x) for x in per], axis=_layer_axes(p))


def with_rows(bank: Adapted, rows: Sequence[str | None], *, batch: int | None = None
              ) -> Adapted:
  """The bank with each batch row's adapter named (None: the base model for that row).

  Raises:
    ValueError: an unknown name, None in a bank of soft prompts (every row needs one), or
      not `batch` names.
  """
  if not isinstance(bank, Adapted) or not bank.stacked:
    raise ValueError("per-row adapters need a bank of adapters as params (lmjax.peft.stack)")
  if isinstance(rows, str) or (batch is not None and len(rows) != batch):
    raise ValueError(f"give one adapter name (or None) per prompt: {batch} prompts, got "
                     f"{rows!r}")
  ids = []
  for r in rows:
    if r is None:
      if isinstance(bank.spec, PromptConfig):
        raise ValueError("in a bank of soft prompts every row needs a prompt (no None rows)")
      ids.append(-1)
    elif r in bank.names:
      ids.append(bank.names.index(r))
    else:
      raise ValueError(f"unknown adapter {r!r}; this bank has {list(bank.names)} (or None: "
                       "the base)")
  return bank.replace(rows=jnp.asarray(ids, jnp.int32))


def count(adapter: Any) -> int:
  """Number of trainable values of an adapter tree."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(adapter))))
