"""Evaluation metrics: generation matches, multiple-choice picks, perplexities, and their means.

Generation metrics compare a model's output text with a reference answer:

* `exact_match`: equal after `normalize` (lower case, surrounding whitespace and a final period
  removed, runs of whitespace made single), as lm-evaluation-harness's `exact_match` with
  `ignore_case` and `ignore_punctuation`-like trimming;
* `contains`: the normalized answer occurs in the normalized output;
* `numeric`: the output's answer number (`train.arithmetic.extract_answer`: the number after
  "The answer is", else the last number) equals the reference (an int, or a string of one).

Multiple choice (Brown et al., 2020; lm-evaluation-harness's `acc` / `acc_norm`): `acc` picks
the choice with the highest summed log-probability, `acc_norm` the highest log-probability per
character of the choice text (ties: the first). Perplexity metrics (`perplexity_metrics`)
follow lm-evaluation-harness's `loglikelihood_rolling` ones: token perplexity, word perplexity,
bits per byte.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from train import arithmetic

GENERATION_METRICS = ("exact_match", "contains", "numeric")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
  """Lower case, whitespace runs made single, trimmed, one final period dropped."""
  text = _SPACE.sub(" ", text).strip().lower()
  return text[:-1].rstrip() if text.endswith(".") else text


def score_generation(metric: str, output: str, answer) -> float:
  """1.0 when `output` matches `answer` by `metric` (one of `GENERATION_METRICS`), else 0.0."""
  if metric == "exact_match":
    return float(normalize(output) == normalize(str(answer)))
  if metric == "contains":
    return float(normalize(str(answer)) in normalize(output))
  if metric == "numeric":
    want = arithmetic.extract_answer(str(answer))
    return float(want is not None and arithmetic.is_correct(output, want))
  raise ValueError(f"unknown generation metric {metric!r}; metrics are {list(GENERATION_METRICS)}")


def pick(logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> int:
  """The index of the best choice: the highest log-prob, or per unit of `lengths`."""
  x = np.asarray(logprobs, np.float64)
  if lengths is not None:
    x = x / np.maximum(np.asarray(lengths, np.float64), 1.0)
  return int(np.argmax(x))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
  """The mean and its standard error (sample standard deviation / sqrt(n); 0 for n < 2)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("no values to average")
  err = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
  return float(np.mean(x)), err


def perplexity_metrics(logprob: float, tokens: int, words: int, chars_bytes: int
                       ) -> dict[str, float]:
  """Token and word perplexity and bits per byte of a total `logprob` (nats)."""
  return {"perplexity": math.exp(min(-logprob / max(tokens, 1), 700.0)),
          "word_perplexity": math.exp(min(-logprob / max(words, 1), 700.0)),
          "bits_per_byte": -logprob / max(chars_bytes, 1) / math.log(2),
          "nll_per_token": -logprob / max(tokens, 1)}
