"""The end-of-run report: validation perplexity beside a unigram baseline, and samples.

The unigram baseline is the model that ignores context: p(token) from the train split's
target-token counts with add-one (Laplace) smoothing, scored on the same validation tokens and
loss mask as the model. A trained language model should beat it by a wide margin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.objectives import token_targets


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x)).sum(0)


def unigram_counts(batches: Iterator[dict[str, np.ndarray]], vocab_size: int) -> np.ndarray:
  """Counts `[V]` of the target tokens under the loss mask, over all hosts' batches."""
  counts = np.zeros(vocab_size, np.float64)
  for batch in batches:
    targets, mask = token_targets(batch)
    np.add.at(counts, np.asarray(targets)[np.asarray(mask) > 0], 1.0)
  return _sum_over_processes(counts)


def unigram_perplexity(counts: np.ndarray, batches: Iterator[dict[str, np.ndarray]],
                       max_batches: int = 0) -> dict[str, float]:
  """Perplexity of the add-one-smoothed unigram of `counts` on `batches` (loss-masked tokens).

  `max_batches` (0: all) must match the model's evaluation so both see the same tokens.
  """
  logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
  nll, n = np.zeros(1), np.zeros(1)
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    targets, mask = token_targets(batch)
    mask = np.asarray(mask, np.float64)
    nll -= (logp[np.asarray(targets)] * mask).sum()
    n += mask.sum()
  nll, n = _sum_over_processes(nll)[0], _sum_over_processes(n)[0]
  loss = nll / max(n, 1.0)
  return {"loss": float(loss), "perplexity": float(math.exp(loss)), "tokens": float(n)}


def gather_params(params: Any) -> Any:
  """The params as host numpy arrays on every process (gathered across hosts if needed)."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
    return jax.device_get(params)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(params, tiled=True)


def sample(model, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
           top_p: float, temperature: float, seed: int = 0) -> tuple[list[str], str]:
  """Continuations of `prompts` with nucleus sampling (Holtzman et al., 2020).

  Uses `infer.generate` (KV-cached) when the infer package provides it, else a small
  recompute-everything sampler here. Returns `(texts, which sampler ran)`.
  """
  try:
    import infer

    generate, top_p_sampler = infer.generate, infer.sampling.TopP
  except (ImportError, AttributeError):
    generate = None
  if generate is not None:
    out = generate(model, params, list(prompts), tokenizer=tokenizer,
                   max_new_tokens=max_new_tokens, seed=seed,
                   sampler=top_p_sampler(p=top_p, temperature=temperature))
    return list(out.text), "infer.generate with infer.sampling.TopP"
  return [_fallback_sample(model, params, tokenizer, p, max_new_tokens, top_p, temperature,
                           seed + i) for i, p in enumerate(prompts)], "train.report fallback"


def _fallback_sample(model, params, tokenizer, prompt: str, n: int, top_p: float,
                     temperature: float, seed: int) -> str:
  """Top-p sampling without a cache: one full forward pass per new token (fine for a demo)."""
  ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
  start = len(ids)
  max_len = model.config.max_len
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  key = jax.random.key(seed)
  for _ in range(n):
    window = ids[-max_len:]
    padded = np.zeros((1, max_len), np.int32)
    padded[0, :len(window)] = window
    logits = np.asarray(apply(params, jnp.asarray(padded))[len(window) - 1], np.float64)
    logits = logits / max(temperature, 1e-6)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.cumsum(probs[order]) - probs[order] < top_p
    p = np.zeros_like(probs)
    p[order[keep]] = probs[order[keep]]
    key, sub = jax.random.split(key)
    tok = int(jax.random.choice(sub, len(p), p=jnp.asarray(p / p.sum())))
    if tok == tokenizer.eos_id:
      break
    ids.append(tok)
  return tokenizer.decode(ids[start:])


def one_epoch(data_config):
  """The train split read once, in order (for counting)."""
  return dataclasses.replace(data_config, num_epochs=1, shuffle=False)
