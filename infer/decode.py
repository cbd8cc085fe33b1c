"""Generation: one-pass prefill, a compiled decode loop against the KV cache, streaming.

`generate` runs, for a batch of prompts of different lengths, under one `jax.jit`:

1. prefill: the right-padded prompts go through the model once with `prefill=True` (so the
   configured attention kernel runs) and fill an empty `lmjax.KVCache`; each row's cache length
   becomes its own prompt length, so each row continues at its own position. For `Seq2SeqLM`
   the encoder runs once, the cross-attention keys and values are cached, and decoding starts
   from a start token;
2. a `jax.lax.while_loop` that samples a token per row and feeds it back, one step per token.
   A row stops at its EOS, at the end of any stop sequence, or after `max_new_tokens`; from then
   on its outputs are padding (log-prob 0), and the loop exits as soon as every row is done.

Shapes are static and bucketed to limit recompiles: prompts are padded to a power of two (at
least 16; multiples of 128 past 256), the cache holds `prompt + max_new_tokens` rounded up to a
multiple of `cache_multiple` (64), and the output buffer `max_new_tokens` rounded likewise.
`max_new_tokens` itself is a traced value. A compiled loop is kept per (model config, shapes).

Randomness, per row: the key of prompt i's sample j at step t is
`fold_in(fold_in(fold_in(key(seed_i), r_i), j), t)`, with `seed_i = seed, r_i = i` for an int
`seed`, and `seed_i = seed[i], r_i = 0` for a list of per-prompt seeds. A row's tokens thus
depend only on its prompt, its seed, and (for an int seed) its index — never on the other rows
of the batch: `generate(ps, seed=[s0, s1])` row 1 equals `generate([ps[1]], seed=[s1])`.

`stream` runs the same prefill and step functions (each jitted) from a Python loop and yields
each step's tokens as they come, so it gives the same tokens as `generate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lmjax
from infer import sampling

Array = jax.Array

STOP_REASONS = ("eos", "stop", "length")
_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3
_REASON_NAMES = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}
MAX_SEED = 2**31


# ----------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One generated sequence (what a best-of scorer sees).

  Attributes:
    tokens: the new tokens, through the EOS or stop sequence that ended it.
    log_probs: the model's log-probability of each token (raw logits, before the sampler's
      temperature and truncation), aligned with `tokens`.
    stop_reason: "eos", "stop" or "length".
    text: the decoded tokens without the closing EOS / stop sequence (None without tokenizer).
  """

  tokens: list[int]
  log_probs: list[float]
  stop_reason: str
  text: str | None = None


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  """What `generate` returns: per sequence lists, sequence `i * num_samples + j` is prompt i's
  sample j.

  Attributes:
    tokens: new tokens per sequence, through the EOS / stop sequence that ended it.
    log_probs: per-token model log-probs (see `Candidate`).
    stop_reason: "eos" | "stop" | "length" per sequence.
    text: decoded continuations (closing EOS / stop sequence removed), or None without tokenizer.
    prompt_tokens: the token ids of each prompt, as fed to the model.
    num_samples: sequences per prompt.
    scores: best-of only: the scorer's value of each returned sequence.
    logits: with `return_logits=True`: per sequence `[len(tokens), V]` float32, the logits each
      token was drawn from.
  """

  tokens: list[list[int]]
  log_probs: list[list[float]]
  stop_reason: list[str]
  text: list[str] | None
  prompt_tokens: list[list[int]]
  num_samples: int = 1
  scores: list[float] | None = None
  logits: list[np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.tokens)

  def candidate(self, i: int) -> Candidate:
    return Candidate(self.tokens[i], self.log_probs[i], self.stop_reason[i],
                     None if self.text is None else self.text[i])


def mean_log_prob(prompt: Any, candidate: Candidate) -> float:
  """The default best-of score: the candidate's mean per-token log-probability."""
  del prompt
  return float(np.mean(candidate.log_probs)) if candidate.log_probs else -math.inf


# ------------------------------------------------------------------------- request checking


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shapes and switches one compiled loop is built for."""

  seq2seq: bool
  batch: int  # prompts B
  samples: int  # rows per prompt N; the loop runs R = B * N rows
  prompt_len: int  # P (the encoder length for Seq2SeqLM)
  cache_len: int  # S
  buffer: int  # output slots per row (>= max_new_tokens)
  num_eos: int
  stop_shape: tuple[int, int]  # (number of stop sequences, longest)
  flags: tuple[tuple[str, bool], ...]  # the sampler's static switches
  return_logits: bool = False

  @property
  def rows(self) -> int:
    return self.batch * self.samples


@dataclasses.dataclass
class Request:
  """A checked generation request: the plan plus its arrays (see `prepare`)."""

  plan: Plan
  prompts: list[list[int]]
  inputs: dict[str, np.ndarray]
  consts: dict[str, Any]
  max_new_tokens: int
  sampler: sampling.Sampler
  stops: list[list[int]]
  eos_ids: list[int]
  pad_id: int


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def prompt_bucket(length: int) -> int:
  """Padded prompt length: a power of two >= 16, or a multiple of 128 past 256."""
  if length > 256:
    return _round_up(length, 128)
  return max(16, 1 << (length - 1).bit_length())


def _is_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _as_ids(x, what: str) -> list[int]:
  arr = np.asarray(x)
  if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
    raise ValueError(f"{what} must be a string or a 1-D sequence of int token ids, got {x!r:.80}")
  return [int(i) for i in arr]


def _split_prompts(prompts) -> list:
  if isinstance(prompts, str):
    return [prompts]
  if isinstance(prompts, np.ndarray | jax.Array):
    arr = np.asarray(prompts)
    if arr.ndim == 1:
      return [arr]
    if arr.ndim == 2:
      return list(arr)
    raise ValueError(f"prompts as an array must be [T] or [B, T] ids, got shape {arr.shape}")
  if not isinstance(prompts, Sequence) or len(prompts) == 0:
    raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of "
                     f"those; got {prompts!r:.80}")
  if all(_is_int(p) for p in prompts):
    return [list(prompts)]
  return list(prompts)


def _encode(tokenizer, text: str) -> list[int]:
  return [int(i) for i in tokenizer.encode(text)]


def _check_vocab(ids: list[int], vocab: int, what: str) -> None:
  bad = [i for i in ids if not 0 <= i < vocab]
  if bad:
    raise ValueError(f"{what} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")


def _model_kind(model) -> bool:
  if isinstance(model, lmjax.Seq2SeqLM):
    return True
  if isinstance(model, lmjax.CausalLM):
    return False
  raise ValueError(f"generate needs an lmjax.CausalLM or lmjax.Seq2SeqLM, got "
                   f"{type(model).__name__} (a MaskedLM does not generate)")


def _unwrap(params):
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


def prepare(model, prompts, *, tokenizer=None, max_new_tokens: int = 64,
            sampler: sampling.BaseSampler | None = None, seed: int | Sequence[int] = 0,
            stop=None, eos_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
            num_samples: int = 1, add_bos: bool | None = None,
            decoder_start_id: int | None = None, cache_size: int | None = None,
            cache_multiple: int = 64, return_logits: bool = False) -> Request:
  """Checks a request and builds its arrays; every bad input raises ValueError here, before any
  compute. Arguments as in `generate`."""
  seq2seq = _model_kind(model)
  cfg: lmjax.TransformerConfig = model.config
  vocab = cfg.vocab_size
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
  if not _is_int(num_samples) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} must be an int >= 1")
  if not _is_int(cache_multiple) or cache_multiple < 1:
    raise ValueError(f"cache_multiple={cache_multiple!r} must be an int >= 1")
  sampler = sampling.Greedy() if sampler is None else sampler
  if not isinstance(sampler, sampling.BaseSampler):
    raise ValueError(f"sampler must be an infer.sampling sampler, got {sampler!r}")
  sampler = sampler.resolve()

  # Prompts to ids.
  ids = []
  for i, p in enumerate(_split_prompts(prompts)):
    if isinstance(p, str):
      if tokenizer is None:
        raise ValueError("string prompts need a tokenizer (or pass token ids)")
      if not p:
        raise ValueError(f"prompt {i} is the empty string; give at least one token "
                         "(e.g. [tokenizer.bos_id] to sample unconditionally)")
      x = _encode(tokenizer, p)
      bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
      want_bos = add_bos
      if want_bos is None:  # a tokenizer with its own convention applied it in `encode`
        want_bos = not hasattr(tokenizer, "add_bos_token")
      if not seq2seq and want_bos and bos is not None and (not x or x[0] != bos):
        x = [bos] + x
      if bos is not None and x[:2] == [bos, bos]:  # the text wrote a BOS and encode added one
        x = x[1:]
      if seq2seq and eos is not None and (not x or x[-1] != eos):
        x = x + [eos]  # the encoder saw source + eos in training
    else:
      x = _as_ids(p, f"prompt {i}")
    if not x:
      raise ValueError(f"prompt {i} is empty; give at least one token")
    _check_vocab(x, vocab, f"prompt {i}")
    ids.append(x)
  b = len(ids)
  lengths = [len(x) for x in ids]
  longest = max(lengths)
  for i, n in enumerate(lengths):
    if n > cfg.max_len:
      raise ValueError(f"prompt {i} has {n} tokens, longer than the model's context "
                       f"max_len={cfg.max_len}")
    if not seq2seq and n + max_new_tokens > cfg.max_len:
      raise ValueError(
          f"prompt {i} ({n} tokens) + max_new_tokens={max_new_tokens} passes the model's context "
          f"max_len={cfg.max_len}; use max_new_tokens <= {cfg.max_len - n}")
  if seq2seq and max_new_tokens > cfg.max_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} passes the decoder's context "
                     f"max_len={cfg.max_len}")

  sampler.check(vocab, None)
  rows = sampler.batch_size()
  if rows is not None and rows != b:
    raise ValueError(f"per-row sampler parameters have {rows} values but there are {b} prompts "
                     "(give one value per prompt, or a scalar)")

  # Seeds.
  if _is_int(seed):
    seeds, ridx = [int(seed)] * b, list(range(b))
  elif isinstance(seed, Sequence | np.ndarray) and len(seed) == b and all(map(_is_int, seed)):
    seeds, ridx = [int(s) for s in seed], [0] * b
  else:
    raise ValueError(f"seed must be an int or a list of {b} ints (one per prompt), got {seed!r}")
  if any(not 0 <= s < MAX_SEED for s in seeds):
    raise ValueError(f"seed(s) {seeds} must be in [0, 2**31)")

  # EOS and stop sequences.
  if ignore_eos:
    eos_ids = []
  elif eos_id is None:
    tok_eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    eos_ids = [] if tok_eos is None else [int(tok_eos)]
  else:
    eos_ids = [int(eos_id)] if _is_int(eos_id) else _as_ids(eos_id, "eos_id")
  _check_vocab(eos_ids, vocab, "eos_id")
  stops = []
  if stop is not None:
    if isinstance(stop, str) or (isinstance(stop, Sequence) and stop and all(map(_is_int, stop))):
      stop = [stop]
    for s in stop:
      if isinstance(s, str):
        if tokenizer is None:
          raise ValueError(f"stop string {s!r} needs a tokenizer (or give token ids)")
        x = _encode(tokenizer, s)
        bos = getattr(tokenizer, "bos_id", None)
        if x and bos is not None and x[0] == bos:
          x = x[1:]
      else:
        x = _as_ids(s, "a stop sequence")
      if not x:
        raise ValueError(f"stop sequence {s!r} is empty")
      _check_vocab(x, vocab, f"stop sequence {s!r}")
      stops.append(x)

  # Shapes.
  if seq2seq:
    p_len = prompt_bucket(longest)
    need = max_new_tokens  # the start token and max_new_tokens - 1 fed-back tokens
  else:
    need = longest + max_new_tokens
    p_len = prompt_bucket(longest)
  if cache_size is not None:
    if not _is_int(cache_size) or cache_size < need:
      raise ValueError(
          f"cache_size={cache_size!r} is too small: the longest prompt and max_new_tokens need "
          f"{need} slots")
    s_len = int(cache_size)
    if not seq2seq:
      p_len = min(p_len, s_len)
  else:
    s_len = _round_up(need if seq2seq else max(need, p_len), cache_multiple)
  buffer = _round_up(max_new_tokens, cache_multiple)
  n_stop, l_stop = len(stops), max([len(s) for s in stops], default=1)

  pad = getattr(tokenizer, "pad_id", None) if tokenizer is not None else None
  pad = 0 if pad is None else int(pad)
  tokens = np.full((b, p_len), pad, np.int32)
  seg = np.zeros((b, p_len), np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
    seg[i, :len(x)] = 1
  inputs = {"tokens": tokens, "segment_ids": seg, "lengths": np.asarray(lengths, np.int32)}
  if seq2seq:
    if decoder_start_id is None:
      decoder_start_id = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
    if decoder_start_id is None:
      raise ValueError("Seq2SeqLM needs decoder_start_id (or a tokenizer with a bos_id)")
    _check_vocab([int(decoder_start_id)], vocab, "decoder_start_id")
    inputs["start"] = np.full((b,), decoder_start_id, np.int32)

  stop_arr = np.full((n_stop, l_stop), -1, np.int32)
  stop_valid = np.zeros((n_stop, l_stop), bool)
  for i, s in enumerate(stops):  # right-aligned: compared with the last l_stop tokens
    stop_arr[i, l_stop - len(s):] = s
    stop_valid[i, l_stop - len(s):] = True
  n = num_samples
  consts = {
      "seeds": np.repeat(np.asarray(seeds, np.int32), n),
      "ridx": np.repeat(np.asarray(ridx, np.int32), n),
      "sidx": np.tile(np.arange(n, dtype=np.int32), b),
      **{k: np.repeat(np.asarray(v), n) for k, v in sampler.arrays(b).items()},
      "eos": np.asarray(eos_ids, np.int32),
      "stops": stop_arr, "stop_valid": stop_valid,
      "pad": np.int32(pad), "max_new": np.int32(max_new_tokens),
  }
  plan = Plan(seq2seq=seq2seq, batch=b, samples=n, prompt_len=p_len, cache_len=s_len,
              buffer=buffer, num_eos=len(eos_ids), stop_shape=(n_stop, l_stop),
              flags=tuple(sorted(sampler.flags.items())), return_logits=return_logits)
  return Request(plan=plan, prompts=ids, inputs=inputs, consts=consts,
                 max_new_tokens=max_new_tokens, sampler=sampler, stops=stops, eos_ids=eos_ids,
                 pad_id=pad)


# --------------------------------------------------------------------------- compiled steps


def _repeat_cache(cache: lmjax.KVCache, n: int) -> lmjax.KVCache:
  if n == 1:
    return cache

  def rep(x, axis):
    return None if x is None else jnp.repeat(x, n, axis=axis)
  return cache.replace(k=rep(cache.k, 1), v=rep(cache.v, 1), lengths=rep(cache.lengths, 0),
                       cross_k=rep(cache.cross_k, 1), cross_v=rep(cache.cross_v, 1),
                       cross_segment_ids=rep(cache.cross_segment_ids, 0))


class Decoder:
  """The jitted pieces of one plan: `start` (prefill and the first token), `step` (one more
  token per row), `run` (start, then a `while_loop` of steps). Built by `decoder_for`."""

  def __init__(self, model, plan: Plan):
    self.model, self.plan = model, plan
    self.start = jax.jit(self._start)
    self.step = jax.jit(self._step)
    self.run = jax.jit(self._run)

  def _prefill(self, params, inputs) -> tuple[Array, lmjax.KVCache]:
    cfg, p = self.model.config, self.plan
    variables = {"params": params}
    if p.seq2seq:
      cache = lmjax.init_cache(cfg, p.batch, p.cache_len, encoder_len=p.prompt_len)
      logits, cache = self.model.apply(
          variables, inputs["tokens"], inputs["start"][:, None],
          encoder_segment_ids=inputs["segment_ids"], cache=cache, prefill=True)
      last = logits[:, 0]
    else:
      cache = lmjax.init_cache(cfg, p.batch, p.cache_len)
      logits, cache = self.model.apply(variables, inputs["tokens"],
                                       segment_ids=inputs["segment_ids"], cache=cache,
                                       prefill=True)
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
    recent = jnp.concatenate([state["recent"][:, 1:], tok[:, None]], axis=1)
    is_eos = jnp.zeros_like(done)
    if p.num_eos:
      is_eos = jnp.any(tok[:, None] == consts["eos"][None, :], axis=1) & active
    is_stop = jnp.zeros_like(done)
    if p.stop_shape[0]:
      ok = (recent[:, None, :] == consts["stops"][None]) | ~consts["stop_valid"][None]
      is_stop = jnp.any(jnp.all(ok, axis=2), axis=1) & active & ~is_eos
    at_len = (t + 1 >= consts["max_new"]) & active & ~is_eos & ~is_stop
    reason = jnp.where(is_eos, _EOS, jnp.where(is_stop, _STOP, jnp.where(
        at_len, _LENGTH, state["reason"])))
    new.update(recent=recent, reason=reason.astype(jnp.int32),
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
    if p.return_logits:
      state["logits"] = jnp.zeros((r, p.buffer, logits.shape[-1]), jnp.float32)
    return self._emit(state, logits, consts)

  def _step(self, params, state, consts) -> dict:
    prev = jax.lax.dynamic_slice_in_dim(state["out"], state["t"] - 1, 1, axis=1)  # [R, 1]
    variables = {"params": params}
    if self.plan.seq2seq:
      logits, cache = self.model.apply(variables, None, prev, cache=state["cache"])
    else:
      logits, cache = self.model.apply(variables, prev, cache=state["cache"])
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


def _trim(tokens: list[int], reason: str, req: Request) -> list[int]:
  """Tokens without the closing EOS or stop sequence (for text)."""
  if reason == "eos":
    return tokens[:-1]
  if reason == "stop":
    n = max((len(s) for s in req.stops if tokens[-len(s):] == s), default=0)
    return tokens[:len(tokens) - n]
  return tokens


def _decode_text(tokenizer, ids: list[int]) -> str:
  return tokenizer.decode(ids) if ids else ""


def _collect(req: Request, state: dict, tokenizer) -> GenerateResult:
  host = jax.device_get({k: v for k, v in state.items() if k != "cache"})
  toks, lps, reasons, logits = [], [], [], []
  for r in range(req.plan.rows):
    n = int(host["n"][r])
    toks.append([int(x) for x in host["out"][r, :n]])
    lps.append([float(x) for x in host["lp"][r, :n]])
    reasons.append(_REASON_NAMES[int(host["reason"][r])])
    if req.plan.return_logits:
      logits.append(np.asarray(host["logits"][r, :n]))
  text = None
  if tokenizer is not None:
    text = [_decode_text(tokenizer, _trim(t, s, req)) for t, s in zip(toks, reasons)]
  return GenerateResult(tokens=toks, log_probs=lps, stop_reason=reasons, text=text,
                        prompt_tokens=[list(p) for p in req.prompts],
                        num_samples=req.plan.samples,
                        logits=logits if req.plan.return_logits else None)


def generate(model, params, prompts, *, tokenizer=None, max_new_tokens: int = 64,
             sampler: sampling.BaseSampler | None = None, seed: int | Sequence[int] = 0,
             stop=None, eos_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
             num_samples: int = 1, best_of: int | None = None,
             scorer: Callable[[Any, Candidate], float] | None = None,
             add_bos: bool | None = None,
             decoder_start_id: int | None = None, cache_size: int | None = None,
             cache_multiple: int = 64, return_logits: bool = False) -> GenerateResult:
  """Generates continuations of a batch of prompts with a compiled, KV-cached decode loop.

  Args:
    model: an `lmjax.CausalLM` or `lmjax.Seq2SeqLM`.
    params: its params (the raw tree, or `{"params": tree}`).
    prompts: a string, a list of token ids, or a list of either (B prompts of any lengths).
      Strings are encoded with `tokenizer`; a `Seq2SeqLM` source gets EOS at the end (as in
      training). Token-id prompts are used as given.
    tokenizer: encodes string prompts and stop strings, gives EOS / pad / BOS ids, decodes.
    max_new_tokens: at most this many new tokens per sequence (>= 1).
    sampler: an `infer.sampling` sampler (default `Greedy()`); per-row parameters have one
      value per prompt.
    seed: an int, or one int per prompt (module docstring: how rows get their keys).
    stop: stop sequences (strings, encoded with the tokenizer, or lists of token ids), or one.
      A sequence stops after generating any of them (matched as tokens).
    eos_id: token id(s) that end a sequence; default the tokenizer's EOS.
    ignore_eos: generate through EOS (until a stop sequence or `max_new_tokens`).
    num_samples: N sequences per prompt (B * N rows in one batch).
    best_of: generate this many candidates per prompt (>= num_samples) and return the
      `num_samples` best by `scorer`, best first.
    scorer: `scorer(prompt, candidate) -> float`, higher is better (a reward model, ...);
      default `mean_log_prob`.
    add_bos: put the BOS in front of a `CausalLM` string prompt (not twice). None: yes (as
      lmjax pretraining does), unless the tokenizer has an `add_bos_token` convention (Hugging
      Face tokenizers), which its `encode` has already applied. A doubled leading BOS (a
      template wrote one, `encode` added one) is always made single.
    decoder_start_id: the start token of a `Seq2SeqLM` decoder (default the tokenizer's BOS).
    cache_size: KV-cache slots per row (default the longest prompt + max_new_tokens rounded up
      to `cache_multiple`); too small is a ValueError.
    return_logits: also return the logits each token was drawn from (for tests and analysis).

  Returns:
    A `GenerateResult` with B * N sequences (prompt i's sample j at i * N + j).

  Raises:
    ValueError: before any compute, for an empty prompt, a prompt longer than `config.max_len`
      or one that `max_new_tokens` would push past it (or past `cache_size`), token ids outside
      the vocabulary, bad sampler settings (also top-k above the vocabulary), bad seeds.
  """
  n_gen = num_samples
  if best_of is not None:
    if not _is_int(best_of) or best_of < 1:
      raise ValueError(f"best_of={best_of!r} must be an int >= 1")
    if _is_int(num_samples) and best_of < num_samples:
      raise ValueError(f"best_of={best_of} must be >= num_samples={num_samples}")
    n_gen = best_of
  if scorer is not None and not callable(scorer):
    raise ValueError(f"scorer must be a callable (prompt, candidate) -> float, got {scorer!r}")
  req = prepare(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                sampler=sampler, seed=seed, stop=stop, eos_id=eos_id, ignore_eos=ignore_eos,
                num_samples=n_gen, add_bos=add_bos, decoder_start_id=decoder_start_id,
                cache_size=cache_size, cache_multiple=cache_multiple,
                return_logits=return_logits)
  dec = decoder_for(model, req.plan)
  state = dec.run(_unwrap(params), req.inputs, req.consts)
  result = _collect(req, state, tokenizer)
  if best_of is None:
    return result
  return _best(result, _split_prompts(prompts), num_samples, scorer or mean_log_prob)


def _best(result: GenerateResult, prompts: list, keep: int, scorer) -> GenerateResult:
  """Per prompt, the `keep` highest-scoring of its candidates (ties: the lower sample index)."""
  n = result.num_samples
  picked, scores = [], []
  for i, prompt in enumerate(prompts):
    cand = [(float(scorer(prompt, result.candidate(i * n + j))), i * n + j) for j in range(n)]
    for score, idx in sorted(cand, key=lambda c: (-c[0], c[1]))[:keep]:
      picked.append(idx)
      scores.append(score)

  def take(xs):
    return None if xs is None else [xs[k] for k in picked]
  return dataclasses.replace(result, tokens=take(result.tokens),
                             log_probs=take(result.log_probs),
                             stop_reason=take(result.stop_reason), text=take(result.text),
                             num_samples=keep, scores=scores, logits=take(result.logits))


@dataclasses.dataclass(frozen=True)
class StreamStep:
  """One step of `stream`: what each of the R rows produced.

  Attributes:
    step: the index t of these tokens among the new tokens.
    tokens: `[R]` int32, pad for rows already done.
    log_probs: `[R]` float32 (0 for rows already done).
    active: `[R]` bool, the row produced `tokens[r]` at this step.
    stop_reason: per row: the reason it stopped at this step, else None.
    text: per row, the new text (with a tokenizer; EOS left out; a partial UTF-8 character is
      held back until complete), else None.
  """

  step: int
  tokens: np.ndarray
  log_probs: np.ndarray
  active: np.ndarray
  stop_reason: list[str | None]
  text: list[str] | None = None


class _TextDelta:
  """Incremental detokenization: decode everything so far, emit what is new."""

  def __init__(self, tokenizer, eos_ids):
    self.tokenizer, self.eos = tokenizer, set(eos_ids)
    self.ids: list[int] = []
    self.shown = ""

  def push(self, tok: int, final: bool) -> str:
    if tok not in self.eos:
      self.ids.append(tok)
    text = _decode_text(self.tokenizer, self.ids)
    if text.endswith("\ufffd") and not final:
      return ""
    if text.startswith(self.shown):
      delta = text[len(self.shown):]
    else:  # the tokenizer rewrote earlier text (rare); what was shown stays shown
      k = 0
      while k < min(len(text), len(self.shown)) and text[k] == self.shown[k]:
        k += 1
      delta = text[k:]
    self.shown = text
    return delta


def stream(model, params, prompts, *, tokenizer=None, max_new_tokens: int = 64,
           sampler: sampling.BaseSampler | None = None, seed: int | Sequence[int] = 0,
           stop=None, eos_id=None, ignore_eos: bool = False, num_samples: int = 1,
           add_bos: bool | None = None, decoder_start_id: int | None = None,
           cache_size: int | None = None,
           cache_multiple: int = 64) -> Iterator[StreamStep]:
  """Like `generate`, but yields each step's tokens as they are produced (for notebooks).

  Runs `generate`'s own jitted prefill and step functions from a Python loop, so the tokens
  equal `generate`'s for the same arguments. Arguments as in `generate` (no best-of).

  Yields:
    A `StreamStep` per step, until every row is done. The generator's return value (the
    `value` of its `StopIteration`, or of `yield from`) is the `GenerateResult`.
  """
  req = prepare(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                sampler=sampler, seed=seed, stop=stop, eos_id=eos_id, ignore_eos=ignore_eos,
                num_samples=num_samples, add_bos=add_bos, decoder_start_id=decoder_start_id,
                cache_size=cache_size, cache_multiple=cache_multiple)
  return _stream(model, params, req, tokenizer)


def _stream(model, params, req: Request, tokenizer):
  dec = decoder_for(model, req.plan)
  params = _unwrap(params)
  state = dec.start(params, req.inputs, req.consts)
  deltas = None
  if tokenizer is not None:
    deltas = [_TextDelta(tokenizer, req.eos_ids) for _ in range(req.plan.rows)]
  was_done = np.zeros((req.plan.rows,), bool)
  t = 0
  while True:
    h = jax.device_get({k: state[k] for k in ("out", "lp", "done", "reason")})
    tok = h["out"][:, t]
    active = ~was_done
    ended = h["done"] & active
    reasons = [_REASON_NAMES[int(h["reason"][r])] if ended[r] else None
               for r in range(req.plan.rows)]
    text = None
    if deltas is not None:
      text = [deltas[r].push(int(tok[r]), bool(ended[r])) if active[r] else ""
              for r in range(req.plan.rows)]
    yield StreamStep(step=t, tokens=tok, log_probs=h["lp"][:, t], active=active,
                     stop_reason=reasons, text=text)
    was_done = h["done"]
    t += 1
    if was_done.all() or t >= req.max_new_tokens:
      break
    state = dec.step(params, state, req.consts)
  return _collect(req, state, tokenizer)
