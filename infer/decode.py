"""Generation: one-pass prefill and a compiled decode loop against the KV cache.

`generate` runs, for a batch of prompts of different lengths, under one `jax.jit`:

1. prefill: the right-padded prompts go through the model once with `prefill=True` (so the
   configured attention kernel runs) and fill an empty `lmjax.KVCache`; each row's cache length
   becomes its own prompt length, so each row continues at its own position. For `Seq2SeqLM`
   the encoder runs once, the cross-attention keys and values are cached, and decoding starts
   from a start token;
2. a `jax.lax.while_loop` that samples a token per row and feeds it back, one step per token.
   A row stops at its EOS, at the end of any token-id stop sequence, at the token whose text
   completes a stop string (matched on the decoded bytes, however the model split the string
   into tokens: `infer.stops`), or after `max_new_tokens`; from then on its outputs are padding
   (log-prob 0), and the loop exits as soon as every row is done.

The request is checked and its shapes bucketed first, before any compute (`infer.requests`).
A compiled loop is kept per (model, `Plan`): one executable per plan for `generate` (the
prefill and the `while_loop` together), two for `stream` (`start`, `step`). The plan holds only
bucketed shapes and static switches; which settings change it, and so compile again, is listed
in `infer.requests` (not: `max_new_tokens` within its bucket of 64, prompt lengths within
their bucket, seeds, sampler values, stop contents). Params, prompts and settings are arguments
of the jitted functions, never closed over, so `lmjax.compilation_cache` finds the executables
again in the next process.

Randomness, per row: the key of prompt i's sample j at step t is
`fold_in(fold_in(fold_in(key(seed_i), r_i), j), t)`, with `seed_i = seed, r_i = i` for an int
`seed`, and `seed_i = seed[i], r_i = 0` for a list of per-prompt seeds. A row's tokens thus
depend only on its prompt, its seed, and (for an int seed) its index — never on the other rows
of the batch: `generate(ps, seed=[s0, s1])` row 1 equals `generate([ps[1]], seed=[s1])`.

`infer.streaming.stream` runs the same jitted prefill and step functions from a Python loop
(also importable from here as `infer.decode.stream`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lmjax
from infer import results, sampling, stops
from infer.requests import MAX_SEED, Plan, Request, is_int, prepare, prompt_bucket, split_prompts
from infer.results import Candidate, GenerateResult, collect, mean_log_prob
from lmjax import packed as packed_lib

__all__ = ["STOP_REASONS", "REASON_NAMES", "MAX_SEED", "Candidate", "GenerateResult",
           "mean_log_prob", "completion_text", "decode_text", "collect", "Plan", "Request",
           "prepare", "prompt_bucket", "Decoder", "decoder_for", "generate"]

Array = jax.Array

# Also importable from here (`infer.results` defines them).
STOP_REASONS, REASON_NAMES = results.STOP_REASONS, results.REASON_NAMES
completion_text, decode_text = results.completion_text, results.decode_text

_FROM_STREAMING = ("stream", "StreamStep")


def __getattr__(name: str):
  # `stream` lives in infer.streaming, which imports this module; load it on first use.
  if name in _FROM_STREAMING:
    return getattr(importlib.import_module("infer.streaming"), name)
  raise AttributeError(f"module 'infer.decode' has no attribute {name!r}")


# --------------------------------------------------------------------------- compiled steps


def _repeat_cache(cache: lmjax.KVCache, n: int) -> lmjax.KVCache:
  return cache if n == 1 else cache.repeat_rows(n)


def end_checks(plan: Plan, consts: dict, tok: Array, active: Array, recent: Array,
               tail: Array | None) -> tuple[Array, Array, Array, Array | None]:
  """Whether the new token `tok` `[R]` ends each `active` row (also `infer.speculative`).

  Returns:
    `(is_eos, is_stop, recent, tail)`: `[R]` bool each (only active rows; an EOS is not also a
    stop), the last token-id window `recent` `[R, l]` and the stop-string byte tail `[R, W]`
    (None without stop strings), both advanced on the active rows only.
  """
  shifted = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
  recent = jnp.where(active[:, None], shifted, recent)
  is_eos = jnp.zeros_like(active)
  if plan.num_eos:
    is_eos = jnp.any(tok[:, None] == consts["eos"][None, :], axis=1) & active
  is_stop = jnp.zeros_like(active)
  if plan.stop_shape[0]:
    ok = (recent[:, None, :] == consts["stops"][None]) | ~consts["stop_valid"][None]
    is_stop = jnp.any(jnp.all(ok, axis=2), axis=1)
  if plan.text_stops[0]:
    hit, new_tail = stops.match(tail, tok, consts)
    is_stop = is_stop | hit
    tail = jnp.where(active[:, None], new_tail, tail)
  return is_eos, is_stop & active & ~is_eos, recent, tail


def in_loop(params, rows: int, tokens: Array) -> tuple[Any, Array]:
  """`(params, tokens)` as a one-token decode step inside a compiled loop should read them:
  packed rows (`rows` <= `lmjax.packed.MAX_STREAMED_ROWS`) and quantized weights tied to the
  step's input `tokens` by an optimization barrier, so XLA widens / dequantizes them inside the
  loop instead of hoisting float copies out of it (the step must read the returned tokens)."""
  if isinstance(params, packed_lib.PackedParams) and rows <= packed_lib.MAX_STREAMED_ROWS:
    tree, tokens = packed_lib.loop_variant(params.tree, tokens)
    return params.replace(tree=tree), tokens
  if isinstance(params, lmjax.quant.QuantParams):
    return lmjax.quant.loop_variant(params, tokens)
  return params, tokens


class Decoder:
  """The jitted pieces of one plan: `start` (prefill and the first token), `step` (one more
  token per row), `run` (start, then a `while_loop` of steps). Built by `decoder_for`."""

  def __init__(self, model, plan: Plan):
    self.model, self.plan = model, plan
    self.start = jax.jit(self._start)
    self.step = jax.jit(self._step)
    self.run = jax.jit(self._run)

  def _apply(self, params, *args, **kwargs):
    """`model.apply` with raw params, or with `lmjax.packed.PackedParams` through its reader."""
    if isinstance(params, packed_lib.PackedParams):
      return packed_lib.apply(self.model, params, *args, **kwargs)
    if isinstance(params, lmjax.quant.QuantParams):
      return lmjax.quant.apply(self.model, params, *args, **kwargs)
    if isinstance(params, lmjax.peft.Adapted):  # adapters (a bank: one per row)
      return lmjax.peft.apply(self.model, params, *args, **kwargs)
    return self.model.apply({"params": params}, *args, **kwargs)

  def _prefill(self, params, inputs) -> tuple[Array, lmjax.KVCache]:
    cfg, p = self.model.config, self.plan
    if "prefix_len" in inputs:  # the prompts' cached prefixes, then their suffixes
      from infer import prefix_glue
      return prefix_glue.prefill(self._apply, cfg, p, params, inputs)
    if p.seq2seq:
      cache = lmjax.init_cache(cfg, p.batch, p.cache_len, encoder_len=p.prompt_len)
      logits, cache = self._apply(
          params, inputs["tokens"], inputs["start"][:, None],
          encoder_segment_ids=inputs["segment_ids"], cache=cache, prefill=True)
      last = logits[:, 0]
    else:
      cache = lmjax.init_cache(cfg, p.batch, p.cache_len)
      logits, cache = self._apply(params, inputs["tokens"], segment_ids=inputs["segment_ids"],
                                  cache=cache, prefill=True)
      last = jnp.take_along_axis(logits, (inputs["lengths"] - 1)[:, None, None], axis=1)[:, 0]
    last = jnp.repeat(last, p.samples, axis=0)
    return last, _repeat_cache(cache, p.samples)

  def _emit(self, state: dict, logits: Array, consts: dict) -> dict:
    """Samples token t of every row from `logits` `[R, V]` and records it."""
    p = self.plan
    t, done = state["t"], state["done"]
    keys = jax.vmap(lambda s, r, j: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
        jax.random.key(s), r), j), t))(consts["seeds"], consts["ridx"], consts["sidx"])
    tok = sampling.sample_logits(logits, keys, consts["temperature"], consts["top_k"],
                                 consts["top_p"], **dict(p.flags))
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                             tok[:, None], axis=1)[:, 0]
    active = ~done
    tok = jnp.where(active, tok, consts["pad"])
    lp = jnp.where(active, lp, 0.0)
    new = dict(state)
    new["out"] = jax.lax.dynamic_update_slice(state["out"], tok[:, None], (0, t))
    new["lp"] = jax.lax.dynamic_update_slice(state["lp"], lp[:, None], (0, t))
    if p.return_logits:
      new["logits"] = jax.lax.dynamic_update_slice(
          state["logits"], logits.astype(jnp.float32)[:, None, :], (0, t, 0))
    is_eos, is_stop, new["recent"], tail = end_checks(p, consts, tok, active, state["recent"],
                                                      state.get("tail"))
    if tail is not None:
      new["tail"] = tail
    at_len = (t + 1 >= consts["max_new"]) & active & ~is_eos & ~is_stop
    reason = jnp.where(is_eos, results.EOS, jnp.where(is_stop, results.STOP, jnp.where(
        at_len, results.LENGTH, state["reason"])))
    new.update(reason=reason.astype(jnp.int32),
               done=done | is_eos | is_stop | at_len, n=state["n"] + active.astype(jnp.int32),
               t=t + 1)
    return new

  def _start(self, params, inputs, consts) -> dict:
    p = self.plan
    logits, cache = self._prefill(params, inputs)
    r = p.rows
    state = {
        "t": jnp.int32(0), "cache": cache,
        "out": jnp.full((r, p.buffer), consts["pad"], jnp.int32),
        "lp": jnp.zeros((r, p.buffer), jnp.float32),
        "done": jnp.zeros((r,), bool), "reason": jnp.zeros((r,), jnp.int32),
        "n": jnp.zeros((r,), jnp.int32),
        "recent": jnp.full((r, p.stop_shape[1]), -1, jnp.int32),
    }
    if p.text_stops[0]:
      state["tail"] = jnp.full((r, p.text_stops[1]), -1, jnp.int32)
    if p.return_logits:
      state["logits"] = jnp.zeros((r, p.buffer, logits.shape[-1]), jnp.float32)
    return self._emit(state, logits, consts)

  def _step(self, params, state, consts) -> dict:
    prev = jax.lax.dynamic_slice_in_dim(state["out"], state["t"] - 1, 1, axis=1)  # [R, 1]
    params, prev = in_loop(params, self.plan.rows, prev)
    if self.plan.seq2seq:
      logits, cache = self._apply(params, None, prev, cache=state["cache"])
    else:
      logits, cache = self._apply(params, prev, cache=state["cache"])
    return self._emit({**state, "cache": cache}, logits[:, 0], consts)

  def _run(self, params, inputs, consts) -> dict:
    state = self._start(params, inputs, consts)

    def cond(s):
      return (s["t"] < consts["max_new"]) & ~jnp.all(s["done"])
    return jax.lax.while_loop(cond, lambda s: self._step(params, s, consts), state)


_DECODERS: dict = {}
_MAX_DECODERS = 32


def decoder_for(model, plan: Plan) -> Decoder:
  """The (cached, least recently used dropped past 32) compiled `Decoder` of a model and plan."""
  key = (type(model), model.config, plan)
  dec = _DECODERS.pop(key, None)
  if dec is None:
    if model.config.attention == "flash":
      import infer.flash_attention  # noqa: F401  (registers attention="flash")
    dec = Decoder(model, plan)
  _DECODERS[key] = dec  # most recent last
  while len(_DECODERS) > _MAX_DECODERS:
    _DECODERS.pop(next(iter(_DECODERS)))
  return dec



# ------------------------------------------------------------------------------- public API


def unwrap_params(params):
  """The raw params tree, from the tree itself or from `{"params": tree}`; `PackedParams` as
  they are."""
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params



def generate(model, params, prompts, *, tokenizer=None, max_new_tokens: int = 64,
             sampler: sampling.BaseSampler | None = None, seed: int | Sequence[int] = 0,
             stop=None, eos_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
             num_samples: int = 1, best_of: int | None = None,
             scorer: Callable[[Any, Candidate], float] | None = None,
             add_bos: bool | None = None,
             decoder_start_id: int | None = None, cache_size: int | None = None,
             cache_multiple: int = 64, return_logits: bool = False, draft=None,
             num_draft_tokens: int = 4, prefix_cache=None, adapter=None) -> GenerateResult:
  """Generates continuations of a batch of prompts with a compiled, KV-cached decode loop.

  Args:
    model: an `lmjax.CausalLM` or `lmjax.Seq2SeqLM`.
    params: its params (the raw tree, or `{"params": tree}`), or `lmjax.packed.pack(model,
      params, fmt)` (bfloat16 or float32 weights laid out for fast batch-1 decoding on a CPU).
      Sharded params (`lmjax.init_sharded`, under `jax.set_mesh`) may span several
      processes (`jax.distributed`): call on every process; each gets all rows.
    prompts: a string, a list of token ids, or a list of either (B prompts of any lengths).
      Strings are encoded with `tokenizer`; a `Seq2SeqLM` source gets EOS at the end (as in
      training). Token-id prompts are used as given.
    tokenizer: encodes string prompts and stop strings, gives EOS / pad / BOS ids, decodes.
    max_new_tokens: at most this many new tokens per sequence (>= 1). Traced: another value
      within the same multiple of `cache_multiple` reuses the compiled loop.
    sampler: an `infer.sampling` sampler (default `Greedy()`); per-row parameters have one
      value per prompt.
    seed: an int, or one int per prompt (module docstring: how rows get their keys).
    stop: stop strings and/or token-id stop sequences (lists of ints), or one of either. A stop
      string ends a sequence at the token whose decoded text completes it, however the model
      split it into tokens ("\\n", "\\n" or one "\\n\\n" token; inside one token too); it needs
      the tokenizer, and is matched in the compiled loop on the new tokens' bytes (`infer.stops`).
      `text` is cut before the stop string; `tokens` keep the token that completed it. A
      token-id sequence ends a sequence when the new tokens end with it; `text` leaves it out.
    eos_id: token id(s) that end a sequence; default the tokenizer's EOS.
    ignore_eos: generate through EOS (until a stop sequence or `max_new_tokens`).
    num_samples: N sequences per prompt (B * N rows in one batch).
    best_of: generate this many candidates per prompt (>= num_samples) and return the
      `num_samples` best by `scorer`, best first.
    scorer: `scorer(prompt, candidate) -> float`, higher is better (a reward model, ...);
      default `mean_log_prob`. One with a `score_many(prompts, candidates)` method is given
      all candidates in one call (`infer.RewardScorer`: one batched forward).
    add_bos: put the BOS in front of a `CausalLM` string prompt (not twice). None: yes (as
      lmjax pretraining does), unless the tokenizer has an `add_bos_token` convention (Hugging
      Face tokenizers), which its `encode` has already applied. A doubled leading BOS (a
      template wrote one, `encode` added one) is always made single.
    decoder_start_id: the start token of a `Seq2SeqLM` decoder (default the tokenizer's BOS).
    cache_size: KV-cache slots per row (default: the padded prompt plus the output buffer,
      `max_new_tokens` rounded up to `cache_multiple`; at most the model's `max_len`; rounded up
      to `cache_multiple`: it changes only with the buckets); too small is a ValueError.
    return_logits: also return the logits each token was drawn from (for tests and analysis).
    draft: speculative decoding (`infer.speculative`): `(draft_model, draft_params)`, a smaller
      `CausalLM` with the same vocabulary, or "ngram" (prompt lookup). Greedy output is the
      same tokens; sampled output has the same distribution (not the same draws per seed).
    num_draft_tokens: k, tokens drafted per round (>= 1).
    prefix_cache: an `infer.PrefixCache`: prompts reuse the KV of cached prefixes and prefill
      only the rest; their own prefixes are stored for later calls.
    adapter: with `params` a bank of adapters (`lmjax.peft.stack`), each prompt's adapter
      name (None: the base); one compiled loop serves any mix.

  Returns:
    A `GenerateResult` with B * N sequences (prompt i's sample j at i * N + j); with `draft`,
    an `infer.speculative.SpeculativeResult` (also acceptance statistics).

  Raises:
    ValueError: before any compute, for an empty prompt, a prompt longer than `config.max_len`
      or one that `max_new_tokens` would push past it (or past `cache_size`), token ids outside
      the vocabulary, bad sampler settings (also top-k above the vocabulary), bad seeds.
  """
  n_gen = num_samples
  if best_of is not None:
    if not is_int(best_of) or best_of < 1:
      raise ValueError(f"best_of={best_of!r} must be an int >= 1")
    if is_int(num_samples) and best_of < num_samples:
      raise ValueError(f"best_of={best_of} must be >= num_samples={num_samples}")
    n_gen = best_of
  if scorer is not None and not callable(scorer):
    raise ValueError(f"scorer must be a callable (prompt, candidate) -> float, got {scorer!r}")
  req = prepare(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                sampler=sampler, seed=seed, stop=stop, eos_id=eos_id, ignore_eos=ignore_eos,
                num_samples=n_gen, add_bos=add_bos, decoder_start_id=decoder_start_id,
                cache_size=cache_size, cache_multiple=cache_multiple,
                return_logits=return_logits)
  if adapter is not None:
    params = lmjax.peft.with_rows(unwrap_params(params), adapter, batch=req.plan.batch)
  if draft is not None:
    from infer import speculative
    result = speculative.run(model, params, req, tokenizer, draft=draft, k=num_draft_tokens,
                             prefix_cache=prefix_cache, cache_size=cache_size)
  else:
    from infer import prefix_glue
    params = unwrap_params(params)
    inputs, stash = prefix_glue.cached_inputs(model, params, req, prefix_cache)
    state = decoder_for(model, req.plan).run(params, inputs, req.consts)
    result = collect(req, state, tokenizer)
    prefix_glue.store(stash, req, state["cache"], result.tokens)
  if best_of is None:
    return result
  return results.best(result, split_prompts(prompts), num_samples, scorer or mean_log_prob)
