"""The models' limits: what a call past one raises, what it gives instead, and `checked`.

A model has two limits:

- `config.max_len` when positions are learned: the rows of the positions table. Rotary and
  sinusoidal positions have no table and no limit.
- A KV cache's slots per row: the `max_len` of `init_cache(config, batch, max_len)`.

At trace time (so also under `jax.jit`) a call whose shapes alone prove it passes one raises a
ValueError naming the limit: no `positions` or `segment_ids` given and more tokens than
`config.max_len`; more tokens in one step than the cache has slots; a Seq2SeqLM encoder input
of another length than the cache's `encoder_len`.

At run time, what only the values show (traced positions, the cache's `lengths`) cannot raise
inside a compiled function, so **rows that overflow get NaN logits**: every logit of a row one
of whose real tokens (segment id != 0) has a learned position outside `[0, max_len)` or would be
written past the cache's last slot. Other rows are unchanged. Such a row stays NaN while it is
decoded: its `lengths` keep counting (past the cache's size, see `KVCache.overflowed`) and a
Seq2SeqLM's overflowing encoder row is NaN in the cache.

Checked mode: for an error instead of NaN rows, pass `checks=True` to a model's call under
`jax.experimental.checkify` (eagerly it raises by itself), or call through `checked`, which
does both; the error names the row and the limit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from lmjax.cache import KVCache
from lmjax.config import TransformerConfig

Array = jax.Array


class Limits:
  """The rows of one call that pass a limit: `[B]` flags, made NaN by `guard`.

  `shapes` raises what the shapes prove; `values` flags what traced positions and cache lengths
  show; with `checks`, each flag is also a `checkify.check` naming the first flagged row.
  """

  def __init__(self, checks: bool):
    self.checks = checks
    self.rows: Array | None = None

  def add(self, bad: Array, msg: str, **values: Array) -> None:
    """Flags the rows of `bad` (`[B]`, or `[B, T]` per token); with checks, the first flagged
    row fails a `checkify.check` whose `msg` names `{row}` and its `values` (shaped as `bad`)."""
    rows = bad if bad.ndim == 1 else jnp.any(bad, axis=1)
    if self.checks:
      row = jnp.argmax(rows)
      at = {k: v[row] if bad.ndim == 1 else v[row, jnp.argmax(bad[row])]
            for k, v in values.items()}
      checkify.check(~jnp.any(rows), msg, row=row, **at)
    self.rows = rows if self.rows is None else self.rows | rows

  def guard(self, x: Array) -> Array:
    """`x` `[B, ...]` with every value of the rows flagged so far NaN."""
    if self.rows is None:
      return x
    return jnp.where(self.rows.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.nan, x)

  @staticmethod
  def shapes(cfg: TransformerConfig, name: str, t: int, derived: bool,
             cache: KVCache | None) -> None:
    """Raises when `t` tokens of input `name` pass a limit whatever their values: `derived`
    positions (none and no segment ids given) beyond learned `max_len`, or more than the
    cache's slots in one step."""
    if cfg.position == "learned" and derived and t > cfg.max_len:
      raise ValueError(f"{_what(name)} of {t} tokens exceeds max_len={cfg.max_len} (learned "
                       "positions); a longer input needs a model with a larger max_len")
    if cache is not None and t > cache.max_len:
      raise ValueError(f"a step of {t} tokens does not fit a KV cache of max_len={cache.max_len} "
                       "slots per row; make a larger one with "
                       "lmjax.init_cache(config, batch, max_len)")

  def values(self, cfg: TransformerConfig, name: str, pos: Array, segment_ids: Array | None,
             shape: tuple[int, int], derived: bool, cache: KVCache | None,
             n_new: Array | None) -> None:
    """Flags the rows of input `name` (`shape` `[B, T]`) that write `n_new` tokens past the
    cache's last slot, or whose real tokens have learned positions `pos` outside the table."""
    who = _what(name).replace("input", "")  # "encoder " / "decoder " / ""
    if cache is not None:
      s = cache.max_len
      self.add(cache.lengths + n_new > s, f"{who}row {{row}}: writing {{n}} tokens at length "
               f"{{length}} passes the KV cache of max_len={s} slots", n=n_new,
               length=cache.lengths)
    if cfg.position != "learned" or (derived and cache is None):
      return  # no table, or 0..T-1 with T <= max_len (`shapes`): nothing to flag
    pos_b = jnp.broadcast_to(pos, shape)
    bad = (pos_b < 0) | (pos_b >= cfg.max_len)
    if segment_ids is not None:
      bad = bad & (segment_ids != 0)  # a padding token's position is no overflow
    self.add(bad, f"{who}row {{row}}: position {{pos}} is outside the learned positions table "
             f"(max_len={cfg.max_len})", pos=pos_b)


def _what(name: str) -> str:
  """The input's name in messages: tokens -> input, encoder_tokens -> encoder input, ..."""
  return name.replace("_tokens", " input").replace("tokens", "input")


def check_encoder_len(se: int, cache: KVCache | None) -> None:
  """Raises when a Seq2SeqLM's encoder input of `se` tokens does not fit the cache's."""
  cached = None if cache is None else cache.encoder_len
  if cached is not None and se != cached:
    raise ValueError(f"encoder input of {se} tokens does not match the cache's "
                     f"encoder_len={cached}; make it with init_cache(..., encoder_len={se})")


def checked(fn):
  """`fn` with the models' limit checks on: a ValueError naming the row and the limit instead of
  NaN rows.

  `fn` is a model's `apply` (`checked(model.apply)(variables, tokens, cache=cache)`; any
  `method=` that takes `checks`), or a function that takes `checks` and passes it on to the
  model's call. The wrapper runs `fn(..., checks=True)` under `jax.experimental.checkify`, so
  `fn` may jit inside it; call the wrapper itself outside `jax.jit`. To keep a compiled loop,
  checkify it yourself: `err, out = checkify.checkify(jax.jit(step))(...)`, `err.throw()`, with
  `step` calling `model.apply(..., checks=True)`.
  """
  @functools.wraps(fn)
  def run(*args, **kwargs):
    err, out = checkify.checkify(functools.partial(fn, checks=True))(*args, **kwargs)
    msg = err.get()
    if msg is not None:
      raise ValueError(msg)
    return out
  return run
