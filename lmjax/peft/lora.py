"""LoRA (Hu et al., 2021, arXiv:2106.09685): which projections, the adapter's params, merging.

A targeted projection with kernel `W` `[*in, *out]` (an `lmjax.layers.Einsum`: `[D, N, H]` for
a query, `[N, H, D]` for the attention output, `[D, F]` / `[F, D]` in the feed-forward) gets
`lora_a` `[*in, r]` (random, as Hugging Face PEFT: Kaiming-uniform) and `lora_b` `[r, *out]`
(zeros), so `y = x W + s (x A) B` equals the base at initialization. With `scan_layers` every
leaf has the leading `[L]` axis of its kernel. The adapter is a params tree of its own that
mirrors the model's module paths (`decoder/layers_0/self_attention/query/{lora_a, lora_b}`);
`lmjax.peft.apply` runs the model with it, `merge` folds it into the kernels (in float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax.config import TransformerConfig
from lmjax.counting import init_fn
from lmjax.peft.config import HF_MODULES, LM_MODULES, TARGET_GROUPS, LoRAConfig

Path = tuple[str, ...]
RANK_AXIS = None  # the rank dim: replicated (no logical name of its own)


@dataclasses.dataclass(frozen=True)
class Target:
  """One targeted projection: kernel `[*layers, *in_shape, *out_shape]` and its axis names."""

  path: Path
  lead: tuple[int, ...]  # (L,) when scanned (a leading layer axis), else ()
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  names: tuple[str | None, ...]

  @property
  def fan_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def fan_out(self) -> int:
    return math.prod(self.out_shape)

  def a_shape(self, rank: int) -> tuple[int, ...]:
    return self.lead + self.in_shape + (rank,)

  def b_shape(self, rank: int) -> tuple[int, ...]:
    return self.lead + (rank,) + self.out_shape


@functools.lru_cache(maxsize=16)
def boxed_abstract(config: TransformerConfig) -> Any:
  """The base model's boxed abstract params (shapes and logical names, no memory; traced once
  per config)."""
  return jax.eval_shape(init_fn(config))


def _in_dims(names: tuple[str | None, ...]) -> int:
  # [N, H, D] kernels (attention output) contract two dims; the others one.
  return 2 if tuple(names[:2]) == ("heads", "head_dim") else 1


def projections(boxed: Any) -> dict[Path, Target]:
  """Every `Einsum` kernel of a boxed abstract params tree, by module path."""
  out = {}
  for path, leaf in flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)
                                 ).items():
    if path[-1] != "kernel" or path[0] == "lm_head" or not isinstance(leaf, nn.Partitioned):
      continue
    names = tuple(leaf.names)
    shape = tuple(nn.meta.unbox(leaf).shape)
    lead = 1 if names and names[0] == "layers" else 0
    k = _in_dims(names[lead:])
    out[path[:-1]] = Target(path[:-1], shape[:lead], shape[lead:lead + k], shape[lead + k:],
                            names)
  return out


def select(boxed: Any, spec: LoRAConfig) -> dict[Path, Target]:
  """The projections `spec.targets` names, checked: every pattern matches a module and the
  rank fits every matched projection.

  Raises:
    ValueError: a target matches nothing (the error lists the projection names), or the rank
      is above a matched projection's width.
  """
  projs = projections(boxed)
  names = sorted({p[-1] for p in projs})
  chosen: dict[Path, Target] = {}
  for raw in spec.targets:
    group = raw in TARGET_GROUPS
    members = TARGET_GROUPS[raw] if group else (LM_MODULES.get(raw, raw),)
    hit = [p for p in projs for t in members if p[-1] == t or re.fullmatch(t, "/".join(p))]
    if not hit:
      raise ValueError(
          f"LoRA target {raw!r} matches no projection of this model; projections are "
          f"{names} (Hugging Face names {sorted(HF_MODULES.values())} work too), groups "
          f"{sorted(TARGET_GROUPS)}, or a regular expression over paths such as "
          f"{'/'.join(next(iter(projs)))!r}")
    chosen.update({p: projs[p] for p in hit})
  if not chosen:
    raise ValueError(f"LoRA targets {spec.targets} match no projection; projections are {names}")
  for tg in chosen.values():
    width = min(tg.fan_in, tg.fan_out)
    if spec.rank > width:
      raise ValueError(f"LoRA rank={spec.rank} is above the width {width} of "
                       f"{'/'.join(tg.path)} (in {tg.fan_in}, out {tg.fan_out}); use a rank "
                       f"<= {width}")
  return dict(sorted(chosen.items()))


def _kaiming_bound(fan_in: int) -> float:
  # Hugging Face PEFT's default: kaiming_uniform_(a=sqrt(5)) on [r, in] -> U(+-1/sqrt(in)).
  return 1.0 / math.sqrt(fan_in)


@functools.partial(jax.jit, static_argnames=("shapes", "bounds", "dtype"))
def _uniform_parts(key, shapes, bounds, dtype):
  """One uniform draw cut into `shapes`, part i in U(+-bounds[i]) (one small program: a
  threefry per part would compile for seconds)."""
  sizes = [math.prod(s) for s in shapes]
  u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out, start = [], 0
  for shape, size, bound in zip(shapes, sizes, bounds):
    out.append((u[start:start + size] * bound).reshape(shape).astype(dtype))
    start += size
  return out


def init(spec: LoRAConfig, boxed: Any, key: jax.Array, dtype: Any = jnp.float32) -> dict:
  """A fresh boxed adapter tree (`nn.Partitioned` leaves): A random, B zero.

  Args:
    spec: the LoRA config.
    boxed: the base's boxed abstract params (`boxed_abstract(config)`).
    key: PRNG key.
    dtype: the adapter's dtype (float32 whatever the base's).

  Returns:
    `{...module path...: {"lora_a": [*L, *in, r], "lora_b": [*L, r, *out]}}`, boxed.
  """
  chosen = list(select(boxed, spec).values())
  a_values = _uniform_parts(key, tuple(tg.a_shape(spec.rank) for tg in chosen),
                            tuple(_kaiming_bound(tg.fan_in) for tg in chosen),
                            jnp.dtype(dtype).name)
  out = {}
  for tg, a in zip(chosen, a_values):
    n = len(tg.lead)
    lead_names, in_names = tg.names[:n], tg.names[n:n + len(tg.in_shape)]
    out_names = tg.names[n + len(tg.in_shape):]
    b = jnp.zeros(tg.b_shape(spec.rank), dtype)
    out[tg.path + ("lora_a",)] = nn.LogicallyPartitioned(a, lead_names + in_names + (RANK_AXIS,))
    out[tg.path + ("lora_b",)] = nn.LogicallyPartitioned(b, lead_names + (RANK_AXIS,) + out_names)
  return unflatten_dict(out)


def delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale) -> jax.Array:
  """`scale * A B` in float32, in the kernel's shape (leading layer axes kept)."""
  lead = a.ndim + b.ndim - 2 - kernel_ndim  # 1 when scanned
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  a2 = a.astype(jnp.float32).reshape(a.shape[:lead] + (math.prod(in_shape), a.shape[-1]))
  b2 = b.astype(jnp.float32).reshape(b.shape[:lead] + (b.shape[lead], math.prod(out_shape)))
  d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
  return (d * scale).reshape(a.shape[:lead] + in_shape + out_shape)


def _fold(base: dict, adapter: dict, scale: float, sign: float) -> dict:
  flat = flatten_dict(base)
  ad = flatten_dict(adapter)
  for path in {p[:-1] for p in ad}:
    k = flat.get(path + ("kernel",))
    if k is None or path + ("lora_b",) not in ad:
      raise ValueError(f"the adapter has LoRA weights for {'/'.join(path)}, which this base "
                       "does not have as a projection (an adapter made for another model)")
    d = delta(ad[path + ("lora_a",)], ad[path + ("lora_b",)], k.ndim, scale)
    if d.shape != k.shape:
      raise ValueError(f"LoRA weights of {'/'.join(path)} make a {d.shape} update for a "
                       f"{k.shape} kernel (an adapter made for another model)")
    flat[path + ("kernel",)] = (k.astype(jnp.float32) + sign * d).astype(k.dtype)
  return unflatten_dict(flat)


def merge(base: dict, adapter: dict, spec: LoRAConfig) -> dict:
  """The base params with `scale * A B` added to each targeted kernel (in float32, then cast to
  the kernel's dtype): a plain params tree the unwrapped model runs at base speed."""
  return _fold(base, adapter, spec.scale, 1.0)


def unmerge(merged: dict, adapter: dict, spec: LoRAConfig) -> dict:
  """Inverse of `merge` (exact up to the kernel dtype's rounding)."""
  return _fold(merged, adapter, spec.scale, -1.0)
