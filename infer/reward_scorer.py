"""A best-of-N scorer from a reward model: `infer.generate(..., best_of=N, scorer=...)`.

Best-of-N sampling (Nakano et al., 2021; Stiennon et al., 2020) draws N candidates per prompt
and keeps the one a reward model scores highest. `RewardScorer` scores every candidate of a
`generate` call in one batched forward of the `lmjax.RewardModel` (prompt tokens + candidate
tokens, right-padded to a bucket length; the reward read at each row's last real token), not
one call per candidate: `generate` hands it all candidates at once through `score_many`.

    cfg, params, tok = lmjax.load_reward_model("runs/reward-demo")
    scorer = infer.RewardScorer(lmjax.RewardModel(cfg), params, tok)
    out = infer.generate(policy, policy_params, prompts, tokenizer=tok, best_of=8,
                         scorer=scorer, sampler=infer.sampling.TopP(0.9, temperature=1.0))
    out.scores  # the reward of each returned sequence
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lmjax.heads import RewardModel, check_lm_params, is_reward_params, pad_rows


class RewardScorer:
  """Scores `(prompt, candidate)` pairs with a reward model, batched and compiled once per
  bucket shape.

  Args:
    model: an `lmjax.RewardModel`.
    params: its params (`lmjax.load_reward_model`).
    tokenizer: encodes string prompts (as `generate` does: a Hugging Face tokenizer's own BOS
      rule, else a BOS in front).
    bucket: row lengths are rounded up to a multiple of this (fewer compilations).
  """

  def __init__(self, model: RewardModel, params: Any, tokenizer=None, *, bucket: int = 64):
    if not isinstance(model, RewardModel) or not is_reward_params(params):
      raise ValueError("RewardScorer needs an lmjax.RewardModel and its params (with the "
                       "'score' head); a language model/policy was given "
                       "(lmjax.load_reward_model reads a reward model)")
    self.model, self.params, self.tokenizer, self.bucket = model, params, tokenizer, bucket
    self._forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s))
    self.calls = 0  # compiled forwards run (tests: one per generate call)

  def _prompt_ids(self, prompt) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("string prompts need a tokenizer: RewardScorer(..., tokenizer=...)")
      ids = [int(i) for i in self.tokenizer.encode(prompt)]
      bos = getattr(self.tokenizer, "bos_id", None)
      if (not hasattr(self.tokenizer, "add_bos_token") and bos is not None
          and (not ids or ids[0] != bos)):
        ids = [bos, *ids]
      if bos is not None and ids[:2] == [bos, bos]:  # as `generate`: a doubled BOS is one
        ids = ids[1:]
      return ids
    return [int(i) for i in prompt]

  def score_tokens(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Rewards `[N]` of whole token sequences, in one forward."""
    if not sequences or any(len(s) == 0 for s in sequences):
      raise ValueError("score_tokens needs non-empty token sequences")
    longest = max(len(s) for s in sequences)
    max_len = self.model.config.max_len
    if longest > max_len:
      raise ValueError(f"a sequence of {longest} tokens is longer than the reward model's "
                       f"max_len={max_len}")
    length = min(-(-longest // self.bucket) * self.bucket, max_len)
    rows = 1 << (len(sequences) - 1).bit_length()  # a power of two: few shapes
    tokens, seg = pad_rows([list(s) for s in sequences], length, rows)
    self.calls += 1
    return np.asarray(self._forward(self.params, tokens, seg))[:len(sequences)]

  def score_many(self, prompts: Sequence[Any], candidates: Sequence[Any]) -> list[float]:
    """Rewards of each `(prompts[i], candidates[i])` (`infer.decode.Candidate`s), batched."""
    seqs = [self._prompt_ids(p) + [int(t) for t in c.tokens]
            for p, c in zip(prompts, candidates, strict=True)]
    return [float(x) for x in self.score_tokens(seqs)]

  def __call__(self, prompt, candidate) -> float:
    return self.score_many([prompt], [candidate])[0]


def reward_scorer(path: str, *, mesh=None) -> RewardScorer:
  """A `RewardScorer` of a reward model on disk (`lmjax.load_reward_model`)."""
  import lmjax

  cfg, params, tok = lmjax.load_reward_model(path, mesh=mesh)
  return RewardScorer(RewardModel(cfg), params, tok)


__all__ = ["RewardScorer", "check_lm_params", "reward_scorer"]
