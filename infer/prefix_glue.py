"""How generation uses an `infer.PrefixCache`: before the loop, after it, and inside its prefill.

`generate`, `stream` and the speculative loop share these steps (the cache itself, its keys and
its counters are `infer.prefix_cache`; the design is vLLM's automatic prefix caching, Kwon et
al., 2023):

1. `cached_inputs` (before the loop): checks the cache serves the model, prefills once each
   prefix that several prompts of the batch share and the cache lacks (`_fill`, batch 1), and
   gives the loop's inputs with each prompt's cached blocks and its suffix;
2. `prefill` (inside the compiled loop's prefill, when the inputs carry `prefix_len`): the
   blocks into a fresh KV cache, then only the suffixes through the model;
3. `store` (after the loop): each prompt's blocks, and with one sample per prompt also those of
   its new tokens but the last, copied out of the final KV cache, so a chat's next turn, which
   starts with this prompt and answer, prefills only its own new text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import lmjax
from infer import prefix_cache as pc_lib
from infer.requests import Request, round_up

Array = jax.Array

__all__ = ["Stash", "check", "cached_inputs", "store", "prefill"]


@dataclasses.dataclass(frozen=True)
class Stash:
  """What `store` needs from `cached_inputs`: the cache, the model's salt, the keys used."""

  cache: pc_lib.PrefixCache
  salt: bytes
  used: set


def check(model, prefix_cache) -> None:
  """ValueError, before compute, for a `prefix_cache` that is not a `PrefixCache` for `model`."""
  if prefix_cache is not None:
    if not isinstance(prefix_cache, pc_lib.PrefixCache):
      raise ValueError(f"prefix_cache must be an infer.PrefixCache, got {prefix_cache!r:.60}")
    prefix_cache.check_model(model)


def cached_inputs(model, params, req: Request, prefix_cache) -> tuple[dict, Stash | None]:
  """The loop's inputs with the prompts' cached prefixes (shared prefixes of the batch
  prefilled once first), and the `Stash` for `store`; `(req.inputs, None)` without a cache.

  Raises:
    ValueError: (before compute) `prefix_cache` is not a `PrefixCache` for `model`.
  """
  if prefix_cache is None:
    return req.inputs, None
  check(model, prefix_cache)
  salt = pc_lib.salt(model, params)
  for ids in prefix_cache.shared_prefixes(salt, req.prompts):
    if not prefix_cache.has(salt, ids):
      _fill(model, params, prefix_cache, salt, ids, req)
  extra, used = prefix_cache.inputs(model.config, salt, req.prompts, req.pad_id)
  return dict(req.inputs, **(extra or {})), Stash(prefix_cache, salt, used)


def store(stash: Stash | None, req: Request, cache: lmjax.KVCache, tokens) -> None:
  """Stores each prompt's blocks from the loop's final KV `cache`, and with one sample per
  prompt also those of its new `tokens` but the last (their KV is in that cache too)."""
  if stash is None:
    return
  n = req.plan.samples
  ids = [list(p) + (list(tokens[i * n][:-1]) if n == 1 else [])
         for i, p in enumerate(req.prompts)]
  stash.cache.store(stash.salt, ids, cache, [i * n for i in range(req.plan.batch)], stash.used)


_FILLS: dict = {}


def _fill(model, params, cache, salt, ids, req: Request) -> None:
  """Prefills one shared prefix (batch 1) and stores its blocks."""
  from infer import decode
  plan = dataclasses.replace(req.plan, batch=1, samples=1,
                             cache_len=round_up(len(ids), 64), return_logits=False)
  dec = decode.decoder_for(model, plan)
  fn = _FILLS.get(id(dec))
  if fn is None or fn[0] is not dec:
    fn = (dec, jax.jit(dec._prefill))
    _FILLS[id(dec)] = fn
  tokens = np.full((1, max(16, round_up(len(ids), 16))), req.pad_id, np.int32)
  tokens[0, :len(ids)] = ids
  seg = (np.arange(tokens.shape[1]) < len(ids))[None].astype(np.int32)
  inputs = {"tokens": tokens, "segment_ids": seg, "lengths": np.asarray([len(ids)], np.int32)}
  extra, used = cache.inputs(model.config, salt, [ids], req.pad_id, count=False)
  _, kv = fn[1](params, dict(inputs, **(extra or {})))
  cache.store(salt, [ids], kv, [0], used)


def prefill(apply, cfg: lmjax.TransformerConfig, plan, params,
            inputs) -> tuple[Array, lmjax.KVCache]:
  """The compiled prefill with cached prefixes: blocks into a fresh cache, then the suffixes.

  Args:
    apply: `apply(params, tokens, **kwargs)` of the model.
    cfg, plan: the model's config and the request's `infer.requests.Plan`.
    params: the model's params.
    inputs: `PrefixCache.inputs`' arrays (`prefix_k/v` `[B, K, Ph, H]` per layer, `prefix_len`
      `[B]`, `suffix_tokens` / `suffix_segment_ids` `[B, Ts]`, `suffix_lengths` `[B]`).

  Returns:
    The last prompt token's logits `[R, V]` and the cache (rows repeated per sample).
  """
  cache = lmjax.init_cache(cfg, plan.batch, plan.cache_len)

  def put(c, x):
    return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0,) * c.ndim)
  cache = cache.replace(k=jax.tree.map(put, cache.k, inputs["prefix_k"]),
                        v=jax.tree.map(put, cache.v, inputs["prefix_v"]),
                        lengths=jnp.asarray(inputs["prefix_len"], jnp.int32))
  logits, cache = apply(params, inputs["suffix_tokens"],
                        segment_ids=inputs["suffix_segment_ids"], cache=cache)
  last = jnp.take_along_axis(logits, (inputs["suffix_lengths"] - 1)[:, None, None], axis=1)[:, 0]
  n = plan.samples
  return jnp.repeat(last, n, axis=0), (cache if n == 1 else cache.repeat_rows(n))
