"""Streaming generation: `stream` yields each step's tokens (and new text) as they come.

`stream` runs `generate`'s own jitted prefill and step functions (`infer.decode.Decoder`) from a
Python loop instead of a `while_loop`, so it gives the same tokens as `generate`. Text comes by
incremental detokenization: decode everything so far, emit what is new, hold back a partial
UTF-8 character until it is complete, and hold back an end of the text that begins a stop string
until the next tokens show whether the stop string follows. So no text at or past a stop string
is ever emitted, and with stop strings the steps' texts join to `generate`'s `text`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from infer import decode, prefix_glue, requests, sampling, stops


@dataclasses.dataclass(frozen=True)
class StreamStep:
  """One step of `stream`: what each of the R rows produced.

  Attributes:
    step: the index of this step; without a drafter also the index t of these tokens among the
      new tokens (with one, a round's kept tokens come as consecutive steps).
    tokens: `[R]` int32, pad for rows already done.
    log_probs: `[R]` float32 (0 for rows already done).
    active: `[R]` bool, the row produced `tokens[r]` at this step.
    stop_reason: per row: the reason it stopped at this step, else None.
    text: per row, the new text (with a tokenizer; EOS left out; a partial UTF-8 character, and
      an end that may begin a stop string, are held back until settled; nothing from a stop
      string on), else None.
  """

  step: int
  tokens: np.ndarray
  log_probs: np.ndarray
  active: np.ndarray
  stop_reason: list[str | None]
  text: list[str] | None = None


class _TextDelta:
  """Incremental detokenization: decode everything so far, emit what is new."""

  def __init__(self, tokenizer, req: requests.Request):
    self.tokenizer, self.req, self.eos = tokenizer, req, set(req.eos_ids)
    self.tokens: list[int] = []
    self.shown = ""

  def push(self, tok: int, reason: str | None) -> str:
    """The new text after token `tok`; `reason`: why the row ended here (None: it goes on)."""
    self.tokens.append(tok)
    text = decode.decode_text(self.tokenizer, [t for t in self.tokens if t not in self.eos])
    strings = self.req.stop_strings
    if reason is None:
      if text.endswith("\ufffd"):
        return ""
      if strings:
        text = text[:len(text) - stops.held_back(text, strings)]
    elif reason == "stop" and strings:
      cut = stops.cut(self.tokenizer, self.tokens, text, strings, self.req.vocab)
      text = text if cut is None else cut
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
           cache_size: int | None = None, cache_multiple: int = 64,
           prefix_cache=None, draft=None, num_draft_tokens: int = 4) -> Iterator[StreamStep]:
  """Like `generate`, but yields each step's tokens as they are produced (for notebooks).

  Runs `generate`'s own jitted prefill and step functions from a Python loop, so the tokens
  equal `generate`'s for the same arguments. Arguments as in `generate` (no best-of; a
  `prefix_cache` is used and filled as there). With `draft` (speculative decoding,
  `infer.speculative`), each round's kept tokens come as soon as the round is checked, one
  step per token, from the same jitted pieces as `generate(..., draft=...)`.

  Yields:
    A `StreamStep` per step, until every row is done. The generator's return value (the
    `value` of its `StopIteration`, or of `yield from`) is the `GenerateResult` (with `draft`,
    the `infer.speculative.SpeculativeResult`).

  Raises:
    ValueError: at the call, before any compute, for a bad request (as `generate`), drafter or
      prefix cache.
  """
  req = requests.prepare(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                sampler=sampler, seed=seed, stop=stop, eos_id=eos_id, ignore_eos=ignore_eos,
                num_samples=num_samples, add_bos=add_bos, decoder_start_id=decoder_start_id,
                cache_size=cache_size, cache_multiple=cache_multiple)
  if draft is not None:
    from infer import speculative
    checked = speculative.check(model, req, tokenizer, draft=draft, k=num_draft_tokens,
                                prefix_cache=prefix_cache, cache_size=cache_size)
    return _stream_rounds(lambda: speculative.setup(model, params, checked, num_draft_tokens,
                                                    prefix_cache), tokenizer)
  prefix_glue.check(model, prefix_cache)
  return _stream(model, params, req, tokenizer, prefix_cache)


def drain(steps: Iterator[StreamStep], on_step=None):
  """Runs a `stream` to its end, calling `on_step(step)` for each step; returns its
  `GenerateResult` (the generator's return value)."""
  while True:
    try:
      step = next(steps)
    except StopIteration as e:
      return e.value
    if on_step is not None:
      on_step(step)


def _texts(tokenizer, req: requests.Request):
  return None if tokenizer is None else [_TextDelta(tokenizer, req) for _ in range(req.plan.rows)]


def _stream(model, params, req: requests.Request, tokenizer, prefix_cache=None):
  dec = decode.decoder_for(model, req.plan)
  params = decode.unwrap_params(params)
  inputs, stash = prefix_glue.cached_inputs(model, params, req, prefix_cache)
  state = dec.start(params, inputs, req.consts)
  deltas = _texts(tokenizer, req)
  was_done = np.zeros((req.plan.rows,), bool)
  t = 0
  while True:
    h = jax.device_get({k: state[k] for k in ("out", "lp", "done", "reason")})
    tok = h["out"][:, t]
    active = ~was_done
    ended = h["done"] & active
    reasons = [decode.REASON_NAMES[int(h["reason"][r])] if ended[r] else None
               for r in range(req.plan.rows)]
    text = None
    if deltas is not None:
      text = [deltas[r].push(int(tok[r]), reasons[r]) if active[r] else ""
              for r in range(req.plan.rows)]
    yield StreamStep(step=t, tokens=tok, log_probs=h["lp"][:, t], active=active,
                     stop_reason=reasons, text=text)
    was_done = h["done"]
    t += 1
    if was_done.all() or t >= req.max_new_tokens:
      break
    state = dec.step(params, state, req.consts)
  result = decode.collect(req, state, tokenizer)
  prefix_glue.store(stash, req, state["cache"], result.tokens)
  return result


def _stream_rounds(setup, tokenizer):
  """`stream` with a drafter: the speculative loop's jitted `start` and `round` from Python;
  after each, the tokens the rows kept, one step per token (a row that kept fewer tokens than
  another is inactive in that round's later steps)."""
  run = setup()  # here, not at the call: it may prefill shared prefixes
  req, dec, rows = run.req, run.decoder, np.arange(run.req.plan.rows)
  state = dec.start(run.params, run.draft_params, run.inputs, req.consts)
  deltas, wide = _texts(tokenizer, req), None
  shown = np.zeros((req.plan.rows,), np.int64)  # tokens of each row yielded so far
  step = 0
  while True:
    h = jax.device_get({k: state[k] for k in ("out", "lp", "n", "done", "reason", "t")})
    n = h["n"].astype(np.int64)
    for j in range(int(np.max(n - shown, initial=0))):
      at = shown + j
      active = at < n
      idx = np.minimum(at, h["out"].shape[1] - 1)
      tok = np.where(active, h["out"][rows, idx], req.pad_id).astype(np.int32)
      ended = active & (at == n - 1) & h["done"]
      reasons = [decode.REASON_NAMES[int(h["reason"][r])] if ended[r] else None for r in rows]
      text = None
      if deltas is not None:
        text = [deltas[r].push(int(tok[r]), reasons[r]) if active[r] else "" for r in rows]
      yield StreamStep(step=step, tokens=tok, log_probs=np.where(active, h["lp"][rows, idx], 0.0),
                       active=active, stop_reason=reasons, text=text)
      step += 1
    shown = n
    if h["done"].all() or int(h["t"]) > req.max_new_tokens:
      break
    if wide is None:
      wide = dec.widen(run.params)
    state = dec.round(run.params, wide, run.draft_params, state, req.consts)
  from infer import speculative
  return speculative.finish(run, state, tokenizer)
