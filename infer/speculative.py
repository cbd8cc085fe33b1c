"""Speculative decoding: a cheap drafter proposes k tokens, the model checks them in one pass.

Leviathan et al., 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et
al., 2023, "Accelerating Large Language Model Decoding with Speculative Sampling". Each round,
per row:

1. the drafter proposes d_1..d_k: a smaller `CausalLM` with the same vocabulary, decoding from
   its own KV cache with the request's sampler (distributions q_1..q_k; a drafter with the
   target's config, e.g. its own weights in int4, drafts on the target's cache instead:
   `shares_cache`), or "ngram", prompt
   lookup (Saxena, 2023): the tokens that followed the latest earlier occurrence of the
   row's last n tokens (n = 3, then 2), a point mass q;
2. the target scores its last token and the k drafts in one forward pass over its cache:
   distributions p_1..p_{k+1};
3. `accept`: d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)) while all before it were;
   at the first rejection a token is drawn from normalize(max(0, p_i - q_i)), and when all k
   are kept a bonus token from p_{k+1}. p and q are the *sampler's* distributions
   (temperature, top-k, top-p: `infer.sampling.filter_logits`), so every emitted token has
   exactly the target sampler's distribution. A greedy row (temperature 0) has one-hot p and q:
   drafts are kept while they equal the target's argmax, and the argmax follows: the same
   tokens as plain greedy decoding (up to float rounding between a k+1-token and a 1-token
   forward, which can only matter at exact ties);
4. both caches (one when shared) roll back to the tokens kept (per-row `lengths`; stale
   slots are overwritten later and never attended), EOS / stop sequences / stop strings /
   `max_new_tokens` are checked token by token as in `infer.decode`.

All of it runs in one jitted `lax.while_loop` per (target, drafter, plan, k). Seeds give each
row its own keys (as in `infer.decode`), but a sampled row's draws differ from plain
decoding's for the same seed: the distribution is the same, not the sample path.

The result (`SpeculativeResult`) also reports the acceptance rate (drafts kept / drafts
proposed) and the mean accepted length (drafts kept per round; each round emits that + 1).
The rule and the n-gram drafts are `infer.spec_rule`; `infer.stream(..., draft=...)` runs the
same jitted `start` and `round` from a Python loop (`setup` / `finish` are shared).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lmjax
from infer import decode, prefix_glue, results, sampling
from infer.requests import Request, is_int, round_up
from infer.spec_reads import reads_narrow, shares_cache, widened
from infer.spec_rule import NGRAM, accept, draw, ngram_propose, sampler_probs
from lmjax import packed as packed_lib

Array = jax.Array

__all__ = ["SpeculativeResult", "NGRAM", "accept", "ngram_propose", "sampler_probs", "run",
           "check", "setup", "finish", "shares_cache"]


@dataclasses.dataclass(frozen=True)
class SpeculativeResult(decode.GenerateResult):
  """A `GenerateResult` plus the drafter's statistics.

  Attributes:
    acceptance_rate: drafts kept / drafts proposed, over every row's rounds.
    mean_accepted_length: drafts kept per checked round (0..k); such a round emits this + 1.
    rounds: per sequence, the target's forward passes after the prefill (rounds that checked
      k drafts, and "ngram" rounds where no row had a match: one plain decoding step).
    accepted: per sequence, the drafts kept.
    drafted: per sequence, the drafts proposed (k per checked round).
  """

  acceptance_rate: float = 0.0
  mean_accepted_length: float = 0.0
  rounds: list[int] | None = None
  accepted: list[int] | None = None
  drafted: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class SpecPlan:
  plan: Any  # infer.requests.Plan
  k: int
  drafter: str  # "ngram" | "model"


# -------------------------------------------------------------------------- the loop


class SpecDecoder:
  """The jitted speculative loop of one target, drafter and plan (`run`)."""

  def __init__(self, model, draft_model, splan: SpecPlan):
    self.splan, self.plan = splan, splan.plan
    self.target = decode.decoder_for(model, splan.plan)
    self.draft = None if draft_model is None else decode.decoder_for(draft_model, splan.plan)
    self.shared = draft_model is not None and shares_cache(model, draft_model)
    self.run = jax.jit(self._run)
    self.start = jax.jit(self._start)  # `start` and `round`: the loop's parts, for `stream`
    self.round = jax.jit(self._round)
    self.widen_jit = jax.jit(widened)

  def widen(self, params):
    """The params the k + 1-token check reads (`reads_narrow`, `widened`), before the rounds."""
    return params if reads_narrow(params, self._check_rows) else self.widen_jit(params)

  @property
  def _check_rows(self) -> int:
    return self.plan.rows * (self.splan.k + 1)

  def _keys(self, consts, t, n):
    def one(s, r, j):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
          jax.random.key(s), r), j), t)
      return jax.random.split(key, n)
    return jax.vmap(one)(consts["seeds"], consts["ridx"], consts["sidx"])  # [R, n]

  def _record(self, state, cand, m, logits, consts):
    """Emits `cand[:, j]` for j < m (`[R]`), token by token, with the end checks."""
    p, rows = self.plan, jnp.arange(self.plan.rows)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lps = jnp.take_along_axis(logp, cand[..., None], axis=-1)[..., 0]
    s = dict(state)
    big = s["out"].shape[1] + s["hist"].shape[1]  # out of range: the write is dropped
    for j in range(cand.shape[1]):
      active = ~s["done"] & (j < m)
      tok = jnp.where(active, cand[:, j], consts["pad"])
      is_eos, is_stop, s["recent"], tail = decode.end_checks(p, consts, tok, active, s["recent"],
                                                             s.get("tail"))
      if tail is not None:
        s["tail"] = tail
      at_len = (s["n"] + 1 >= consts["max_new"]) & active & ~is_eos & ~is_stop
      s["reason"] = jnp.where(is_eos, results.EOS, jnp.where(is_stop, results.STOP, jnp.where(
          at_len, results.LENGTH, s["reason"]))).astype(jnp.int32)
      s["done"] = s["done"] | is_eos | is_stop | at_len
      at = jnp.where(active, s["n"], big)
      s["out"] = s["out"].at[rows, at].set(tok, mode="drop")
      s["lp"] = s["lp"].at[rows, at].set(lps[:, j], mode="drop")
      if p.return_logits:
        s["logits"] = s["logits"].at[rows, at].set(logits[:, j].astype(jnp.float32),
                                                   mode="drop")
      s["hist"] = s["hist"].at[rows, jnp.where(active, s["hlen"], big)].set(tok, mode="drop")
      s["hlen"] = s["hlen"] + active.astype(jnp.int32)
      s["n"] = s["n"] + active.astype(jnp.int32)
    return s

  def _start(self, params, dparams, inputs, consts):
    p, k = self.plan, self.splan.k
    r, n = p.rows, p.samples
    logits, cache = self.target._prefill(params, inputs)
    base = {x: inputs[x] for x in ("tokens", "segment_ids", "lengths")}
    toks = base["tokens"]
    hist = jnp.full((r, toks.shape[1] + p.buffer + k + 1), consts["pad"], jnp.int32)
    hist = hist.at[:, :toks.shape[1]].set(jnp.repeat(jnp.asarray(toks, jnp.int32), n, axis=0))
    state = {
        "t": jnp.int32(0), "cache": cache, "hist": hist,
        "hlen": jnp.repeat(jnp.asarray(base["lengths"], jnp.int32), n),
        "out": jnp.full((r, p.buffer + k + 1), consts["pad"], jnp.int32),
        "lp": jnp.zeros((r, p.buffer + k + 1), jnp.float32),
        "done": jnp.zeros((r,), bool), "reason": jnp.zeros((r,), jnp.int32),
        "n": jnp.zeros((r,), jnp.int32), "rounds": jnp.zeros((r,), jnp.int32),
        "accepted": jnp.zeros((r,), jnp.int32), "drafted": jnp.zeros((r,), jnp.int32),
        "recent": jnp.full((r, p.stop_shape[1]), -1, jnp.int32),
    }
    if self.draft is not None and not self.shared:
      state["dcache"] = self.draft._prefill(dparams, base)[1]
    if p.text_stops[0]:
      state["tail"] = jnp.full((r, p.text_stops[1]), -1, jnp.int32)
    if p.return_logits:
      state["logits"] = jnp.zeros((r, p.buffer + k + 1, logits.shape[-1]), jnp.float32)
    key = self._keys(consts, 0, 1)[:, 0]
    tok = sampling.sample_logits(logits, key, consts["temperature"], consts["top_k"],
                                 consts["top_p"], **dict(p.flags))
    state = self._record(state, tok[:, None], jnp.ones((r,), jnp.int32), logits[:, None], consts)
    state["t"] = jnp.int32(1)
    return state

  def _draft_model(self, dparams, state, consts, keys):
    """k drafts `[R, k]` and their filtered logits `[R, k, V]` (`spec_rule.draw`) from the
    draft model; its cache (with
    `shared`: the target's cache arrays, the drafts' slots written, the lengths moved)."""
    flags, rows = dict(self.plan.flags), self.plan.rows
    hist, hlen = state["hist"], state["hlen"]
    at = lambda i: jnp.take_along_axis(hist, jnp.maximum(i, 0)[:, None], 1)[:, 0]  # noqa: E731
    last, prev = at(hlen - 1), at(hlen - 2)

    def step(tokens, dc, **kw):  # one token per row; the weights read inside the loop
      p, tokens = decode.in_loop(dparams, rows, tokens[:, None])
      return self.draft._apply(p, tokens, cache=dc, **kw)
    if self.shared:  # the target's cache holds every kept token but the last (`shares_cache`)
      dc = state["cache"]
    else:
      dc = state["dcache"]
      two = hlen - 1 - dc.lengths == 1  # after a round that kept every draft: d_k not yet fed
      # One-token steps only (a two-token step of the rows that lag cost ~2.5 one-token steps):
      # first d_k alone where a row lags (segment 0 elsewhere: nothing written), then the last.
      dc = _once(jnp.any(two), lambda dc: step(
          prev, dc, segment_ids=two[:, None].astype(jnp.int32))[1], dc)
    logits, dc = step(last, dc)
    d, ql = draw(logits[:, 0], keys[:, 0], consts, flags)  # ql: filtered, for `sampler_probs`

    def body(carry, key):
      dc, d = carry
      logits, dc = step(d, dc)
      d2, ql2 = draw(logits[:, 0], key, consts, flags)
      return (dc, d2), (d2, ql2)
    (dc, _), (ds, qls) = jax.lax.scan(body, (dc, d), jnp.swapaxes(keys[:, 1:], 0, 1))
    drafts = jnp.concatenate([d[:, None], jnp.swapaxes(ds, 0, 1)], axis=1)
    qlogits = jnp.concatenate([ql[:, None], jnp.swapaxes(qls, 0, 1)], axis=1)
    return drafts, qlogits, dc

  def _round(self, params, wide, dparams, state, consts):
    """One round: drafts, then the target's check of all of them in one forward pass (`wide`:
    the target's params for that multi-token pass). With "ngram" drafting a round where no row
    found its n-gram is one plain decoding step (nothing to check, no k + 1-token pass)."""
    k = self.splan.k
    keys = self._keys(consts, state["t"], k + 2)
    hist, hlen = state["hist"], state["hlen"]
    if self.draft is not None:
      drafts, qlogits, dc = self._draft_model(dparams, state, consts, keys[:, :k])
      if self.shared:  # the check overwrites the drafts' slots: the same arrays, in place
        return self._verify(wide, dict(state, cache=dc.replace(
            lengths=state["cache"].lengths)), consts, keys, drafts, qlogits)
      s = self._verify(wide, state, consts, keys, drafts, qlogits)
      s["dcache"] = dc.replace(lengths=jnp.where(~state["done"], hlen + jnp.minimum(
          s["accepted"] - state["accepted"], k - 1), state["dcache"].lengths))
      return s
    drafts, found = ngram_propose(hist, hlen, k)
    check = jnp.any(found & ~state["done"])
    state = _once(check, lambda st: self._verify(wide, st, consts, keys, drafts, None), state)
    return _once(~check, lambda st: self._single(params, st, consts, keys[:, k + 1]), state)

  def _single(self, params, state, consts, key):
    """A plain decoding step (one token per row) inside the speculative loop."""
    p = self.plan
    last = jnp.take_along_axis(state["hist"], (state["hlen"] - 1)[:, None], 1)
    params, last = decode.in_loop(params, p.rows, last)
    logits, cache = self.target._apply(params, last, cache=state["cache"])
    tok = sampling.sample_logits(logits[:, 0], key, consts["temperature"], consts["top_k"],
                                 consts["top_p"], **dict(p.flags))
    old, alive = state["cache"].lengths, ~state["done"]
    s = dict(state, cache=cache.replace(lengths=jnp.where(alive, old + 1, old)))
    s["rounds"] = state["rounds"] + alive.astype(jnp.int32)
    s = self._record(s, tok[:, None], jnp.ones_like(old), logits, consts)
    s["t"] = state["t"] + 1
    return s

  def _verify(self, params, state, consts, keys, drafts, qlogits):
    """The target scores the last token and the k `drafts` in one pass; the rule keeps some."""
    p, k = self.plan, self.splan.k
    flags = dict(p.flags)
    hist, hlen, alive = state["hist"], state["hlen"], ~state["done"]
    last = jnp.take_along_axis(hist, (hlen - 1)[:, None], 1)[:, 0]
    old = state["cache"].lengths
    toks = jnp.concatenate([last[:, None], drafts], 1)
    if reads_narrow(params, self._check_rows):  # the check widens inside the loop (`in_loop`)
      tree, toks = packed_lib.loop_variant(params.tree, toks)
      params = params.replace(tree=tree)
    logits, cache = self.target._apply(params, toks, cache=state["cache"])
    if flags["greedy"]:
      best = sampling.argmax(logits)
      n = jnp.sum(jnp.cumprod((best[:, :k] == drafts).astype(jnp.int32), axis=1), axis=1)
      nxt = jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
    else:
      pr = sampler_probs(logits, consts, flags)
      if qlogits is None:
        q = jax.nn.one_hot(drafts, logits.shape[-1], dtype=jnp.float32)
      else:
        q = sampler_probs(qlogits, consts, flags, filtered=True)
      u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(keys[:, k])
      n, nxt = accept(pr, q, drafts, u, keys[:, k + 1])
    j = jnp.arange(k + 1)[None, :]
    padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
    cand = jnp.where(j < n[:, None], padded, nxt[:, None])
    s = dict(state, cache=cache.replace(lengths=jnp.where(alive, old + n + 1, old)))
    s["rounds"] = state["rounds"] + alive.astype(jnp.int32)
    s["drafted"] = state["drafted"] + jnp.where(alive, k, 0)
    s["accepted"] = state["accepted"] + jnp.where(alive, n, 0)
    s = self._record(s, cand, n + 1, logits, consts)
    s["t"] = state["t"] + 1
    return s

  def _run(self, params, dparams, inputs, consts):
    state = self._start(params, dparams, inputs, consts)
    wide = params if reads_narrow(params, self._check_rows) else widened(params)

    def cond(s):
      return (s["t"] <= consts["max_new"]) & ~jnp.all(s["done"])
    return jax.lax.while_loop(
        cond, lambda s: self._round(params, wide, dparams, s, consts), state)


def _once(pred: Array, fn, state: Any) -> Any:
  """`fn(state)` if `pred` else `state`: a `while_loop` of 0 or 1 trips, not a `lax.cond`.

  XLA gives a conditional's branches their own buffers: each branch of a `lax.cond` over the
  round's state copied every layer's KV cache (SmolLM2-135M: 35 MB per round), while a while
  loop updates its carry in place.
  """
  return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros_like(pred), fn(c[1])),
                            (pred, state))[1]


_DECODERS: dict = {}


def decoder_for(model, draft_model, splan: SpecPlan) -> SpecDecoder:
  key = (type(model), model.config, None if draft_model is None else draft_model.config, splan)
  dec = _DECODERS.pop(key, None) or SpecDecoder(model, draft_model, splan)
  _DECODERS[key] = dec
  while len(_DECODERS) > 16:
    _DECODERS.pop(next(iter(_DECODERS)))
  return dec


# ------------------------------------------------------------------------------ entry


def check_draft(model, draft, k, tokenizer=None):
  """`(draft_model, draft_params)` or ("ngram", None, None) after the checks (ValueError)."""
  if not is_int(k) or k < 1:
    raise ValueError(f"num_draft_tokens={k!r} must be an int >= 1")
  if not isinstance(model, lmjax.CausalLM):
    raise ValueError(f"speculative decoding needs an lmjax.CausalLM target, not "
                     f"{type(model).__name__}")
  if isinstance(draft, str):
    if draft != "ngram":
      raise ValueError(f"draft={draft!r}: give 'ngram' or a (draft_model, draft_params) pair")
    return "ngram", None
  if not isinstance(draft, tuple | list) or len(draft) not in (2, 3):
    raise ValueError("draft must be 'ngram', (draft_model, draft_params) or (draft_model, "
                     f"draft_params, draft_tokenizer), got {type(draft).__name__}")
  dmodel, dparams = draft[0], decode.unwrap_params(draft[1])
  if not isinstance(dmodel, lmjax.CausalLM):
    raise ValueError(f"the draft model must be an lmjax.CausalLM, not {type(dmodel).__name__}")
  dv, tv = dmodel.config.vocab_size, model.config.vocab_size
  if dv != tv:
    raise ValueError(f"the draft model's vocabulary ({dv} ids) is not the target's ({tv} ids); "
                     "a drafter must share the target's tokenizer")
  if len(draft) == 3 and tokenizer is not None and draft[2] is not tokenizer:
    from infer import stops
    if stops.vocab_bytes(draft[2], tv) != stops.vocab_bytes(tokenizer, tv):
      raise ValueError("the draft tokenizer's tokens differ from the target tokenizer's; a "
                       "drafter must share the target's tokenizer")
  return dmodel, dparams


def _with_room(model, req: Request, k: int, cache_size, draft_model) -> Request:
  """The request with a cache that holds k more slots (the last round's drafts)."""
  p = req.plan
  need = max(map(len, req.prompts)) + req.max_new_tokens + k
  for m in (model, draft_model):
    if m is not None and m.config.position == "learned" and need > m.config.max_len:
      raise ValueError(f"the longest prompt + max_new_tokens + num_draft_tokens = {need} passes "
                       f"a model's learned positions (max_len={m.config.max_len})")
  if p.cache_len >= need:
    return req
  if cache_size is not None:
    raise ValueError(f"cache_size={cache_size} is too small for speculative decoding: the "
                     f"longest prompt + max_new_tokens + num_draft_tokens need {need} slots")
  return dataclasses.replace(req, plan=dataclasses.replace(p, cache_len=round_up(need, 64)))


@dataclasses.dataclass(frozen=True)
class Setup:
  """A checked speculative request, ready to run (`setup`)."""

  decoder: SpecDecoder
  req: Request  # with room in the cache for the last round's drafts
  params: Any
  draft_params: Any  # None for "ngram"
  inputs: dict  # the loop's inputs (cached prefixes included)
  stash: prefix_glue.Stash | None  # for `prefix_glue.store`
  k: int


def check(model, req: Request, tokenizer, *, draft, k: int, prefix_cache=None,
          cache_size=None) -> tuple[Any, Any, Request]:
  """Checks the drafter and the prefix cache (ValueError, before compute); returns the draft
  model and params (("ngram", None) for prompt lookup) and the request with room in its cache
  for the last round's drafts."""
  dmodel, dparams = check_draft(model, draft, k, tokenizer)
  prefix_glue.check(model, prefix_cache)
  req = _with_room(model, req, k, cache_size, None if dmodel == "ngram" else dmodel)
  return dmodel, dparams, req


def setup(model, params, checked: tuple, k: int, prefix_cache=None) -> Setup:
  """The compiled loop and its inputs (cached prefixes found, shared ones prefilled) of a
  `check`ed request; shared by `run` and `infer.stream`."""
  dmodel, dparams, req = checked
  ngram = dmodel == "ngram"
  params = decode.unwrap_params(params)
  inputs, stash = prefix_glue.cached_inputs(model, params, req, prefix_cache)
  splan = SpecPlan(req.plan, int(k), "ngram" if ngram else "model")
  dec = decoder_for(model, None if ngram else dmodel, splan)
  return Setup(dec, req, params, None if ngram else dparams, inputs, stash, int(k))


def finish(run: Setup, state: dict, tokenizer) -> SpeculativeResult:
  """The result of a finished loop `state` (stored in the prefix cache, with statistics)."""
  result = decode.collect(run.req, state, tokenizer)
  prefix_glue.store(run.stash, run.req, state["cache"], result.tokens)
  rounds, acc, drafted = jax.device_get((state["rounds"], state["accepted"], state["drafted"]))
  k = run.k
  return SpeculativeResult(
      **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)},
      acceptance_rate=float(np.sum(acc)) / max(int(np.sum(drafted)), 1),
      mean_accepted_length=float(np.sum(acc)) * k / max(int(np.sum(drafted)), 1),
      rounds=[int(x) for x in rounds], accepted=[int(x) for x in acc],
      drafted=[int(x) for x in drafted])


def run(model, params, req: Request, tokenizer, *, draft, k: int = 4, prefix_cache=None,
        cache_size=None) -> SpeculativeResult:
  """`infer.generate`'s path with a drafter (arguments as there)."""
  checked = check(model, req, tokenizer, draft=draft, k=k, prefix_cache=prefix_cache,
                  cache_size=cache_size)
  r = setup(model, params, checked, k, prefix_cache)
  state = r.decoder.run(r.params, r.draft_params, r.inputs, r.req.consts)
  return finish(r, state, tokenizer)
