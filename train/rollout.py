"""On-policy rollouts: completions of a batch of prompts sampled from the current params.

Shared by RL (`train.rl`: GRPO, RLOO, PPO) and on-policy distillation: both sample from the
policy being trained, score the samples, and train on them.

    ro = rollout.sample(model, state.params, prompt_ids, tokenizer=tok, num_samples=4,
                        max_new_tokens=64, length=192, seed=rollout.step_seed(0, step))
    ro.tokens           # [R, L] int32, R = len(prompt_ids) * num_samples (prompt i's sample j
                        # is row i * num_samples + j): prompt, then completion, right-padded
    ro.prompt_mask      # [R, L] bool, the prompt's tokens
    ro.completion_mask  # [R, L] bool, the completion through its EOS (inclusive), nothing after
    ro.log_probs        # [R, L] float32, the sampler's log-prob of each completion token (0 off it)
    ro.texts            # R completion texts (EOS left out)

Sampling runs `infer`'s compiled KV-cache decoder (`infer.decode.generate`: one jitted
prefill + `while_loop` per bucketed shape, reused across steps) directly on the params it is
given, the very (sharded) device arrays the learner updates: no copy of the weights goes
through the host, so a rollout after an optimizer step always samples the updated policy. Only
the sampled token ids and their log-probs come back to the host.

The sampler's log-probs are those of the model's raw logits (`infer.decode.Candidate`: before
the sampler's temperature and truncation), as float32 from the decode loop. A learner recomputes
its own log-probs for the importance ratio (`token_log_probs`); the two differ by numerics (the
KV-cached decode vs a full forward) and, with a temperature other than 1, by the temperature:
the difference is what RL reports as the sampler/learner mismatch.

Rows have a fixed width `length` (prompt budget + `max_new_tokens`), so a learner step over
them compiles once. A prompt longer than `length - max_new_tokens` is a ValueError before any
sampling.

Randomness: `seed` keys every row as `infer.decode` does (prompt i, sample j, token t); RL
derives the seed of step s from its run seed (`step_seed`), so a resumed run samples exactly
what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer import decode, sampling
from infer.requests import MAX_SEED

__all__ = ["Rollout", "sample", "step_seed", "token_log_probs", "layout"]


@dataclasses.dataclass(frozen=True)
class Rollout:
  """Sampled completions laid out for a learner (module docstring).

  Attributes:
    tokens: `[R, L]` int32: prompt i's tokens, then its completion, then `pad_id`.
    prompt_mask: `[R, L]` bool, True on the prompt's tokens.
    completion_mask: `[R, L]` bool, True on the completion's tokens, through the EOS that ended
      it (inclusive); False after it and on padding.
    log_probs: `[R, L]` float32, the sampler's log-prob of each completion token (raw logits),
      0 off the completion mask.
    prompt_index: `[R]` int32, which prompt each row samples (`i` for rows `i*G .. i*G+G-1`).
    completions: R lists of completion token ids (through the EOS).
    texts: R decoded completions without the closing EOS (None without a tokenizer).
    stop_reason: R of "eos" / "length".
    num_samples: G, samples per prompt.
  """

  tokens: np.ndarray
  prompt_mask: np.ndarray
  completion_mask: np.ndarray
  log_probs: np.ndarray
  prompt_index: np.ndarray
  completions: list[list[int]]
  texts: list[str] | None
  stop_reason: list[str]
  num_samples: int

  @property
  def completion_lengths(self) -> np.ndarray:
    """`[R]` tokens per completion (EOS included)."""
    return self.completion_mask.sum(axis=1)


def step_seed(seed: int, step: int) -> int:
  """The rollout seed of training step `step` of a run seeded `seed` (in [0, 2**31))."""
  return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0] % MAX_SEED)


def layout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
           num_samples: int, length: int, pad_id: int = 0):
  """`(tokens, prompt_mask, completion_mask)` `[R, L]` of prompt + completion rows.

  Row `i * num_samples + j` is `prompts[i] + completions[i * num_samples + j]`, right-padded
  with `pad_id` to `length`. Raises ValueError if a row does not fit.
  """
  r = len(completions)
  if r != len(prompts) * num_samples:
    raise ValueError(f"{r} completions for {len(prompts)} prompts x {num_samples} samples")
  tokens = np.full((r, length), pad_id, np.int32)
  pmask = np.zeros((r, length), bool)
  cmask = np.zeros((r, length), bool)
  for k, comp in enumerate(completions):
    p = prompts[k // num_samples]
    n, m = len(p), len(comp)
    if n + m > length:
      raise ValueError(f"row {k}: prompt ({n} tokens) + completion ({m}) exceeds length={length}")
    tokens[k, :n] = p
    tokens[k, n:n + m] = comp
    pmask[k, :n] = True
    cmask[k, n:n + m] = True
  return tokens, pmask, cmask


def sample(model, params, prompts: Sequence[Sequence[int]], *, tokenizer=None,
           num_samples: int = 1, max_new_tokens: int = 64, length: int | None = None,
           sampler: sampling.BaseSampler | None = None, seed: int = 0,
           eos_id: int | Sequence[int] | None = None) -> Rollout:
  """Samples `num_samples` completions of each prompt from `params` with the compiled decoder.

  Args:
    model: an `lmjax.CausalLM`.
    params: its raw params tree: the learner's current (sharded) arrays, used in place.
    prompts: B prompts, each a list of token ids (already rendered / encoded; BOS included if
      the model wants one).
    tokenizer: gives EOS and pad ids and decodes `texts` (None: give `eos_id`; no texts).
    num_samples: G completions per prompt (rows `i * G + j`).
    max_new_tokens: at most this many completion tokens (the EOS included).
    length: the row width L (default: longest prompt + `max_new_tokens`); every prompt must
      leave room for `max_new_tokens`.
    sampler: an `infer.sampling` sampler (default: `Random()`, the model's own distribution).
    seed: the rollout seed (`step_seed` for step s of a run).
    eos_id: id(s) ending a completion (default: the tokenizer's EOS).

  Returns:
    A `Rollout` with R = B * G rows.

  Raises:
    ValueError: before sampling, for an empty prompt list, a prompt that leaves fewer than
      `max_new_tokens` slots in `length`, or any bad generation setting (`infer.requests`).
  """
  if not prompts:
    raise ValueError("rollout.sample needs at least one prompt")
  prompts = [[int(t) for t in p] for p in prompts]
  longest = max(len(p) for p in prompts)
  length = longest + max_new_tokens if length is None else int(length)
  budget = length - max_new_tokens
  over = [i for i, p in enumerate(prompts) if len(p) > budget]
  if over:
    i = over[0]
    raise ValueError(f"prompt {i} has {len(prompts[i])} tokens; with max_new_tokens="
                     f"{max_new_tokens} and row length {length} prompts may have at most "
                     f"{budget} tokens (shorten the prompt or raise the prompt budget)")
  sampler = sampling.Random() if sampler is None else sampler
  out = decode.generate(model, params, prompts, tokenizer=tokenizer,
                        max_new_tokens=max_new_tokens, sampler=sampler, seed=int(seed),
                        num_samples=num_samples, eos_id=eos_id)
  pad = getattr(tokenizer, "pad_id", None) if tokenizer is not None else None
  tokens, pmask, cmask = layout(prompts, out.tokens, num_samples, length,
                                0 if pad is None else int(pad))
  lps = np.zeros((len(out.tokens), length), np.float32)
  for k, lp in enumerate(out.log_probs):
    start = len(prompts[k // num_samples])
    lps[k, start:start + len(lp)] = lp
  return Rollout(tokens=tokens, prompt_mask=pmask, completion_mask=cmask, log_probs=lps,
                 prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), num_samples),
                 completions=out.tokens, texts=out.text, stop_reason=out.stop_reason,
                 num_samples=num_samples)


def token_log_probs(logits: jax.Array, tokens: jax.Array,
                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs and entropies of a teacher-forced forward pass.

  Args:
    logits: `[B, T, V]`, position t predicting token t + 1.
    tokens: `[B, T]`, the same rows.
    temperature: the logits are divided by it first (1: the model's own distribution).

  Returns:
    `(log_probs, entropy)`, each `[B, T]` float32 and aligned with `tokens`: entry t is the
    log-prob of `tokens[:, t]` (and the entropy of the distribution it was drawn from) given
    the tokens before it; entry 0 (no prediction) is 0.
  """
  lg = logits[:, :-1].astype(jnp.float32) / temperature
  logp_all = jax.nn.log_softmax(lg, axis=-1)
  lp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  zero = jnp.zeros_like(lp[:, :1])
  return jnp.concatenate([zero, lp], axis=1), jnp.concatenate([zero, ent], axis=1)
