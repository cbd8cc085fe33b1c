"""What generation returns: `GenerateResult` (and a sequence of it, `Candidate`), the text of
finished sequences, the result of a finished loop's state (`collect`), and best-of selection.

Shared by `infer.decode` (`generate`), `infer.streaming` and `infer.speculative`; importable
from `infer.decode` as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from infer import stops
from infer.requests import Request
from lmjax import sharding

__all__ = ["STOP_REASONS", "REASON_NAMES", "Candidate", "GenerateResult", "mean_log_prob",
           "completion_text", "decode_text", "collect", "best"]

STOP_REASONS = ("eos", "stop", "length")
RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3  # a row's `reason` in the loop's state
REASON_NAMES = {EOS: "eos", STOP: "stop", LENGTH: "length"}

@dataclasses.dataclass(frozen=True)
class Candidate:
  """One generated sequence (what a best-of scorer sees).

  Attributes:
    tokens: the new tokens, through the EOS, the token-id stop sequence, or the token whose text
      completed a stop string, that ended it.
    log_probs: the model's log-probability of each token (raw logits, before the sampler's
      temperature and truncation), aligned with `tokens`.
    stop_reason: "eos", "stop" or "length".
    text: the decoded tokens without the closing EOS / token-id stop sequence, and cut before
      the first occurrence of a stop string (None without tokenizer).
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
    tokens: new tokens per sequence, through the EOS / token-id stop sequence / token that
      completed a stop string that ended it (that token may hold text past the stop string).
    log_probs: per-token model log-probs (see `Candidate`).
    stop_reason: "eos" | "stop" | "length" per sequence.
    text: decoded continuations (closing EOS / token-id stop sequence removed; cut before the
      first stop string, which is left out), or None without tokenizer.
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


def completion_text(tokenizer, tokens: list[int], reason: str, req: Request) -> str:
  """The returned text of a sequence's new `tokens`: without a closing EOS or token-id stop
  sequence, and cut before the first stop string when a stop string ended it."""
  if reason == "eos":
    return decode_text(tokenizer, tokens[:-1])
  if reason == "stop":
    n = max((len(s) for s in req.stops if len(s) <= len(tokens) and tokens[-len(s):] == s),
            default=0)
    if n:
      return decode_text(tokenizer, tokens[:len(tokens) - n])
    text = decode_text(tokenizer, tokens)
    if req.stop_strings:
      cut = stops.cut(tokenizer, tokens, text, req.stop_strings, req.vocab)
      if cut is not None:
        return cut
    return text
  return decode_text(tokenizer, tokens)


def decode_text(tokenizer, ids: list[int]) -> str:
  """The text of `ids` ("" for none)."""
  return tokenizer.decode(ids) if ids else ""


def collect(req: Request, state: dict, tokenizer) -> GenerateResult:
  """The `GenerateResult` of a finished loop `state` (shared by `generate` and `stream`).
  Rows split over other hosts' devices (a model sharded across processes under
  `jax.set_mesh`) are gathered to every host: every process calls this."""
  host = sharding.to_host({k: v for k, v in state.items() if k != "cache"})
  toks, lps, reasons, logits = [], [], [], []
  for r in range(req.plan.rows):
    n = int(host["n"][r])
    toks.append([int(x) for x in host["out"][r, :n]])
    lps.append([float(x) for x in host["lp"][r, :n]])
    reasons.append(REASON_NAMES[int(host["reason"][r])])
    if req.plan.return_logits:
      logits.append(np.asarray(host["logits"][r, :n]))
  text = None
  if tokenizer is not None:
    text = [completion_text(tokenizer, t, s, req) for t, s in zip(toks, reasons)]
  return GenerateResult(tokens=toks, log_probs=lps, stop_reason=reasons, text=text,
                        prompt_tokens=[list(p) for p in req.prompts],
                        num_samples=req.plan.samples,
                        logits=logits if req.plan.return_logits else None)


def best(result: GenerateResult, prompts: list, keep: int, scorer) -> GenerateResult:
  """Per prompt, the `keep` highest-scoring of its candidates (ties: the lower sample index)."""
  n = result.num_samples
  picked, scores = [], []
  batched = None  # a scorer with `score_many(prompts, candidates)` scores all in one call
  if hasattr(scorer, "score_many"):
    batched = scorer.score_many([p for p in prompts for _ in range(n)],
                                [result.candidate(k) for k in range(len(prompts) * n)])
  for i, prompt in enumerate(prompts):
    cand = [(float(batched[i * n + j]) if batched is not None else
             float(scorer(prompt, result.candidate(i * n + j))), i * n + j) for j in range(n)]
    for score, idx in sorted(cand, key=lambda c: (-c[0], c[1]))[:keep]:
      picked.append(idx)
      scores.append(score)

  def take(xs):
    return None if xs is None else [xs[k] for k in picked]
  return dataclasses.replace(result, tokens=take(result.tokens),
                             log_probs=take(result.log_probs),
                             stop_reason=take(result.stop_reason), text=take(result.text),
                             num_samples=keep, scores=scores, logits=take(result.logits))
