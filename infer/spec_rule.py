"""The rule of speculative sampling, and prompt-lookup drafts (used by `infer.speculative`).

`accept` is the rejection rule of Leviathan et al., 2023 ("Fast Inference from Transformers via
Speculative Decoding") and Chen et al., 2023 ("Accelerating Large Language Model Decoding with
Speculative Sampling"): draft d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)) while all
before it were; at the first rejection the next token comes from normalize(max(0, p_i - q_i)),
after k kept drafts from p_{k+1}; every token then has exactly the law p. `sampler_probs` gives
p and q as the request's sampler sees them (temperature, top-k, top-p). `ngram_propose` is
prompt lookup (Saxena, 2023): the tokens after the latest earlier occurrence of a row's last n
tokens, a drafter with no model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infer import sampling

Array = jax.Array

__all__ = ["NGRAM", "NGRAM_MIN", "sampler_probs", "draw", "accept", "ngram_propose"]

NGRAM = 3  # longest n-gram "ngram" drafting matches
# Shortest: a lone repeated token predicts little (open-ended SmolLM2-135M text: drafts after
# 1-gram matches kept ~1 in 10), and a check of k + 1 tokens costs ~2 one-token steps on a CPU,
# so such rounds are plain steps. Simulated on benchmarks/speculative.py's greedy outputs
# (k = 4, checks / plain steps): edit 77 / 10 -> 66 / 23, open 178 / 124 -> 76 / 248, copy
# 17 / 3 -> 13 / 11; at 2.07 steps a check: edit 1.43x -> 1.51x, open 0.78x -> 0.95x, copy 1.5x.
NGRAM_MIN = 2


def sampler_probs(logits: Array, consts: dict, flags: dict, filtered: bool = False) -> Array:
  """The sampler's distributions of `[R, T, V]` logits: softmax of the temperature / top-k /
  top-p filtered logits, one-hot at the argmax in rows with temperature 0. `filtered`: the
  logits are `draw`'s, already filtered (the filter keeps each row's argmax)."""
  r, t, v = logits.shape
  flat = logits.reshape(r * t, v).astype(jnp.float32)
  temp = jnp.repeat(consts["temperature"], t)
  x = flat if filtered else sampling.filter_logits(
      flat, temp, jnp.repeat(consts["top_k"], t), jnp.repeat(consts["top_p"], t),
      use_top_k=flags["use_top_k"], use_top_p=flags["use_top_p"])
  onehot = jax.nn.one_hot(sampling.argmax(flat), v, dtype=jnp.float32)
  return jnp.where((temp > 0)[:, None], jax.nn.softmax(x, axis=-1), onehot).reshape(r, t, v)


def draw(logits: Array, keys: Array, consts: dict, flags: dict) -> tuple[Array, Array]:
  """A drafter's token per row `[R]` from `[R, V]` logits with the request's sampler (as
  `infer.sampling.sample_logits`, the same draws), and the filtered logits it drew from, for
  `sampler_probs(..., filtered=True)`: each draft's top-k / top-p filter (a sort of the
  vocabulary: SmolLM2's 49,152 logits, 4-6 ms a row on a busy 2-core CPU, about an int4 draft
  step) runs once, not again in the check (a sampled self:int4 round of k = 4 with top-k and
  top-p: 214 -> 173 ms). Greedy (`flags["greedy"]`): the argmax, and the logits as they are."""
  if flags["greedy"]:
    return sampling.argmax(logits), logits
  temp = consts["temperature"]
  x = sampling.filter_logits(logits, temp, consts["top_k"], consts["top_p"],
                             use_top_k=flags["use_top_k"], use_top_p=flags["use_top_p"])
  # x sampled as it is (temperature 1, no filter); rows with temperature 0 take its argmax,
  # the logits' own (the filter keeps it).
  unit = (temp > 0).astype(jnp.float32)
  token = sampling.sample_logits(x, keys, unit, consts["top_k"], consts["top_p"],
                                 use_top_k=False, use_top_p=False, greedy=False)
  return token, x


def accept(p: Array, q: Array, drafts: Array, u: Array, keys: Array) -> tuple[Array, Array]:
  """The rejection rule of speculative sampling, per row.

  Args:
    p: `[R, k + 1, V]` the target's distributions at the k drafts and after the last.
    q: `[R, k, V]` the drafter's distributions the drafts were drawn from.
    drafts: `[R, k]` int32.
    u: `[R, k]` uniforms in [0, 1).
    keys: `[R]` PRNG keys for the token after the kept drafts.

  Returns:
    `(n, token)`: `[R]` drafts kept (the leading run with u < p(d) / q(d)), and the next token:
    from normalize(max(0, p_{n+1} - q_{n+1})) after a rejection, from p_{k+1} when all were
    kept.
  """
  k = drafts.shape[1]
  pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  ok = u * qd < pd
  n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
  qx = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)
  pick = lambda x: jnp.take_along_axis(x, n[:, None, None], axis=1)[:, 0]  # noqa: E731
  res = pick(jnp.maximum(p - qx, 0.0))
  res = jnp.where(jnp.sum(res, axis=-1, keepdims=True) > 0, res, pick(p))
  token = jax.vmap(jax.random.categorical)(keys, jnp.log(res)).astype(jnp.int32)
  return n, token


def ngram_propose(hist: Array, hlen: Array, k: int, max_n: int = NGRAM,
                  min_n: int = NGRAM_MIN) -> tuple[Array, Array]:
  """Prompt-lookup drafts `[R, k]`: the k tokens after the latest earlier occurrence of each
  row's last n tokens in `hist` `[R, S]` (its first `hlen` `[R]` are real), the longest n in
  max_n..min_n that occurs; the last token repeated where none does. Also `[R]` bool: a match
  was found."""
  r, s = hist.shape
  pos = jnp.arange(s)[None, :]
  padded = jnp.pad(hist, ((0, 0), (0, max_n)), constant_values=-1)
  start = jnp.full((r,), -1, jnp.int32)
  for g in range(max_n, min_n - 1, -1):
    tail = jnp.take_along_axis(hist, jnp.clip(hlen[:, None] - g + jnp.arange(g)[None], 0, s - 1), 1)
    match = (pos + g < hlen[:, None]) & (hlen[:, None] > g)
    for i in range(g):
      match = match & (padded[:, i:i + s] == tail[:, i:i + 1])
    found = jnp.max(jnp.where(match, pos, -1), axis=1)
    start = jnp.where((start < 0) & (found >= 0), found + g, start)
  idx = jnp.where(start[:, None] >= 0, start[:, None] + jnp.arange(k)[None], hlen[:, None] - 1)
  return jnp.take_along_axis(hist, jnp.minimum(idx, hlen[:, None] - 1), axis=1), start >= 0
