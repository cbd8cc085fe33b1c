"""Generation requests: everything that runs before compute.

`prepare` checks a `generate` / `stream` request (every bad input raises ValueError here) and
builds its arrays: prompts (strings through the tokenizer, or token ids) to right-padded ids,
seeds, EOS ids, token-id stop sequences and the tables of stop strings (`infer.stops`), the
sampler's per-row values, and the `Plan`, the static shapes one compiled loop is built for.

Shapes are static and bucketed, so that one compiled loop serves many requests: the prompts
are padded to `prompt_bucket(longest)` (a power of two >= 16; a multiple of 128 past 256), the
output buffer holds `max_new_tokens` rounded up to a multiple of `cache_multiple` (64), and the
KV cache holds the padded prompt plus the buffer, rounded up to `cache_multiple` (at most the
model's `max_len`, rounded up likewise). The cache is sized from the buckets, not from the
exact lengths, and `max_new_tokens` itself is a traced value: a different `max_new_tokens`
within its bucket of 64, or a prompt of another length within its bucket, reuses the compiled
loop.

What does compile a new loop (a `Plan` differs; with `lmjax.compilation_cache` on, each only
once per machine): another prompt bucket (the longest prompt crossing 16, 32, 64, 128, 256,
384, ...), another bucket of `max_new_tokens` (crossing 64, 128, ...), another number of
prompts or `num_samples` / `best_of`, an explicit `cache_size` or `cache_multiple`, another
number of EOS ids, of token-id stop sequences or their longest length, of stop strings or their
byte window (`infer.stops`, in multiples of 8), another kind of sampler (greedy, temperature,
top-k, top-p: the sampler's static switches; its values are traced), `return_logits`, and of
course another model config or params structure (packed or not, dtype). Seeds, temperatures,
top-k / top-p values and the prompt and stop contents are traced: they never recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import lmjax
from infer import sampling
from infer import stops as stops_lib

MAX_SEED = 2**31


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
  stop_shape: tuple[int, int]  # token-id stop sequences: (how many, longest)
  flags: tuple[tuple[str, bool], ...]  # the sampler's static switches
  return_logits: bool = False
  text_stops: tuple[int, int] = (0, 0)  # stop strings: (how many, byte window W; infer.stops)

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
  stops: list[list[int]]  # token-id stop sequences
  eos_ids: list[int]
  pad_id: int
  stop_strings: list[str] = dataclasses.field(default_factory=list)
  vocab: int = 0  # the model's vocabulary size


def round_up(x: int, m: int) -> int:
  """The least multiple of `m` that is >= `x` (also used by `infer.flash_attention`)."""
  return -(-x // m) * m


def prompt_bucket(length: int) -> int:
  """Padded prompt length: a power of two >= 16, or a multiple of 128 past 256."""
  if length > 256:
    return round_up(length, 128)
  return max(16, 1 << (length - 1).bit_length())


def is_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _as_ids(x, what: str) -> list[int]:
  arr = np.asarray(x)
  if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
    raise ValueError(f"{what} must be a string or a 1-D sequence of int token ids, got {x!r:.80}")
  return [int(i) for i in arr]


def split_prompts(prompts) -> list:
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
  if all(is_int(p) for p in prompts):
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


def prepare(model, prompts, *, tokenizer=None, max_new_tokens: int = 64,
            sampler: sampling.BaseSampler | None = None, seed: int | Sequence[int] = 0,
            stop=None, eos_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
            num_samples: int = 1, add_bos: bool | None = None,
            decoder_start_id: int | None = None, cache_size: int | None = None,
            cache_multiple: int = 64, return_logits: bool = False) -> Request:
  """Checks a request and builds its arrays; every bad input raises ValueError here, before any
  compute. Arguments as in `infer.decode.generate`."""
  seq2seq = _model_kind(model)
  cfg: lmjax.TransformerConfig = model.config
  vocab = cfg.vocab_size
  if not is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
  if not is_int(num_samples) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} must be an int >= 1")
  if not is_int(cache_multiple) or cache_multiple < 1:
    raise ValueError(f"cache_multiple={cache_multiple!r} must be an int >= 1")
  sampler = sampling.Greedy() if sampler is None else sampler
  if not isinstance(sampler, sampling.BaseSampler):
    raise ValueError(f"sampler must be an infer.sampling sampler, got {sampler!r}")
  sampler = sampler.resolve()

  # Prompts to ids.
  ids = []
  for i, p in enumerate(split_prompts(prompts)):
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
  if is_int(seed):
    seeds, ridx = [int(seed)] * b, list(range(b))
  elif isinstance(seed, Sequence | np.ndarray) and len(seed) == b and all(map(is_int, seed)):
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
    eos_ids = [int(eos_id)] if is_int(eos_id) else _as_ids(eos_id, "eos_id")
  _check_vocab(eos_ids, vocab, "eos_id")
  stops, stop_strings = [], []
  if stop is not None:
    if isinstance(stop, str) or (isinstance(stop, Sequence) and stop and all(map(is_int, stop))):
      stop = [stop]
    for s in stop:
      if isinstance(s, str):  # matched on the decoded text (infer.stops), never encoded
        if tokenizer is None:
          raise ValueError(f"stop string {s!r} needs a tokenizer (or give token ids)")
        if not s:
          raise ValueError("stop string '' is empty; give at least one character")
        if s not in stop_strings:
          stop_strings.append(s)
        continue
      x = _as_ids(s, "a stop sequence")
      if not x:
        raise ValueError(f"stop sequence {s!r} is empty")
      _check_vocab(x, vocab, f"stop sequence {s!r}")
      stops.append(x)

  # Shapes.
  p_len = prompt_bucket(longest)
  buffer = round_up(max_new_tokens, cache_multiple)
  if seq2seq:
    need = max_new_tokens  # the start token and max_new_tokens - 1 fed-back tokens
    s_len = round_up(min(buffer, cfg.max_len), cache_multiple)
  else:
    need = longest + max_new_tokens
    # From the buckets alone, never the exact lengths: >= need, >= the padded prompt.
    s_len = round_up(min(p_len + buffer, max(cfg.max_len, p_len)), cache_multiple)
  if cache_size is not None:
    if not is_int(cache_size) or cache_size < need:
      raise ValueError(
          f"cache_size={cache_size!r} is too small: the longest prompt and max_new_tokens need "
          f"{need} slots")
    s_len = int(cache_size)
    if not seq2seq:
      p_len = min(p_len, s_len)
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
  text_stops = (0, 0)
  if stop_strings:
    consts.update(stops_lib.tables(tokenizer, vocab, stop_strings))
    text_stops = (len(stop_strings), stops_lib.window(stop_strings))
  plan = Plan(seq2seq=seq2seq, batch=b, samples=n, prompt_len=p_len, cache_len=s_len,
              buffer=buffer, num_eos=len(eos_ids), stop_shape=(n_stop, l_stop),
              flags=tuple(sorted(sampler.flags.items())), return_logits=return_logits,
              text_stops=text_stops)
  return Request(plan=plan, prompts=ids, inputs=inputs, consts=consts,
                 max_new_tokens=max_new_tokens, sampler=sampler, stops=stops, eos_ids=eos_ids,
                 pad_id=pad, stop_strings=stop_strings, vocab=vocab)

