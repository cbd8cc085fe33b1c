"""The end-of-run report: validation perplexity beside a unigram baseline, and the prompts.

`report.prompts` are continued (causal LM), generated from (seq2seq, span corruption) or filled
in (masked LM): see `prompt_report`. `check_prompts` runs the same request checks before
training starts, so a prompt that cannot run fails before step 0, not after the last.

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

import infer
import lmjax
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
  return lmjax.sharding.to_host(params)


# --- the prompts: continued, generated from, or filled in -----------------------------------

# What the report does with `report.prompts`, per objective.
PROMPT_KINDS = {"causal_lm": "continuation", "masked_lm": "fill", "span_corruption": "spans",
                "seq2seq": "output"}


def _sampler(objective: str, rc):
  """The sampler of the report: top-p for a decoder-only LM, greedy for an encoder-decoder."""
  if objective == "causal_lm":
    return infer.sampling.TopP(p=rc.top_p, temperature=rc.temperature)
  return infer.sampling.Greedy()


def _special_ids(tokenizer) -> list[int]:
  ids = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id,
         tokenizer.mask_id, *tokenizer.sentinel_ids]
  return sorted({int(i) for i in ids if i is not None})


def _masked(tokenizer, prompt: str) -> list[int]:
  """`[bos] + ids + [eos]` of a masked-LM prompt: its `<mask>` tokens, or, when it writes none,
  its middle 15% of tokens (at least one) masked."""
  if tokenizer.mask_id is None:
    raise ValueError("report.prompts of a masked-LM run need a tokenizer with a mask token")
  ids = [int(i) for i in tokenizer.encode(prompt)]
  if not ids:
    raise ValueError(f"report.prompts: {prompt!r} has no tokens to fill")
  if tokenizer.mask_id not in ids:
    n = max(1, round(0.15 * len(ids)))
    start = (len(ids) - n) // 2
    ids[start:start + n] = [tokenizer.mask_id] * n
  return [tokenizer.bos_id, *ids, tokenizer.eos_id]


def model_inputs(objective: str, tokenizer, prompts: Sequence[str]) -> list:
  """What the model reads for each prompt.

  causal_lm: the string (`infer.generate` puts the BOS in front); seq2seq: the ids and EOS (as
  the encoder saw sources in training); span_corruption: the ids, plus the first sentinel at
  the end when the prompt writes none (the model fills that span), and EOS; masked_lm: see
  `_masked`.
  """
  if objective == "causal_lm":
    return list(prompts)
  if objective == "masked_lm":
    return [_masked(tokenizer, p) for p in prompts]
  out = []
  for p in prompts:
    ids = [int(i) for i in tokenizer.encode(p)]
    if objective == "span_corruption":
      if not tokenizer.sentinel_ids:
        raise ValueError("report.prompts of a span-corruption run need a tokenizer with "
                         "sentinels")
      if not set(ids) & set(tokenizer.sentinel_ids):
        ids.append(tokenizer.sentinel_ids[0])
    out.append([*ids, tokenizer.eos_id])
  return out


def check_prompts(model, tokenizer, objective: str, rc) -> None:
  """Raises ValueError when the report could not run `rc.prompts` (report settings) through
  `model` at the end: a prompt longer than the context, one that `rc.max_new_tokens` would push
  past it, bad sampler settings. Runs the same checks as `infer.generate`; computes nothing."""
  if not rc.prompts:
    return
  max_len = model.config.max_len
  try:
    inputs = model_inputs(objective, tokenizer, rc.prompts)
    if objective == "masked_lm":
      for prompt, ids in zip(rc.prompts, inputs):
        if len(ids) > max_len:
          raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens (with bos and eos), "
                           f"longer than the model's context max_len={max_len}")
    else:
      infer.requests.prepare(model, inputs, tokenizer=tokenizer,
                             max_new_tokens=rc.max_new_tokens, sampler=_sampler(objective, rc))
  except ValueError as e:
    raise ValueError(f"report.prompts={list(rc.prompts)} with report.max_new_tokens="
                     f"{rc.max_new_tokens} and model.max_len={max_len}: {e}. Shorten or drop "
                     "the prompts, lower report.max_new_tokens, or raise model.max_len") from e


def prompt_report(model, params, tokenizer, objective: str, rc, seed: int = 0) -> dict[str, Any]:
  """The report on `rc.prompts` (host params; run on one process).

  causal_lm: continuations sampled with top-p (Holtzman et al., 2020) by `infer.generate`;
  span_corruption and seq2seq: the decoder's output for the prompt as encoder input, greedy, by
  `infer.generate`; masked_lm: the argmax fill of the masked tokens (special tokens excluded).

  Returns:
    `samples` (prompt -> text: the continuation, the output, or the filled-in prompt),
    `sampler` (what ran), `sample_kind` (`PROMPT_KINDS`); for masked_lm and span_corruption
    also `sample_inputs` (prompt -> the model's input as text), and for masked_lm `fills`
    (prompt -> the text put in each masked span).
  """
  kind = PROMPT_KINDS[objective]
  inputs = model_inputs(objective, tokenizer, rc.prompts)
  out: dict[str, Any] = {"sample_kind": kind}
  if objective != "masked_lm":
    sampler = _sampler(objective, rc)
    result = infer.generate(model, params, inputs, tokenizer=tokenizer,
                            max_new_tokens=rc.max_new_tokens, seed=seed, sampler=sampler)
    out["samples"] = dict(zip(rc.prompts, result.text))
    out["sampler"] = f"infer.generate with infer.sampling.{type(sampler).__name__}"
    if objective == "span_corruption":
      out["sample_inputs"] = {p: tokenizer.decode(ids) for p, ids in zip(rc.prompts, inputs)}
    return out
  filled, fills = fill_masks(model, params, tokenizer, inputs)
  out["samples"] = {p: tokenizer.decode(ids) for p, ids in zip(rc.prompts, filled)}
  out["fills"] = dict(zip(rc.prompts, fills))
  out["sample_inputs"] = {p: tokenizer.decode(ids) for p, ids in zip(rc.prompts, inputs)}
  out["sampler"] = "argmax of the MaskedLM at each <mask>"
  return out


def fill_masks(model, params, tokenizer, inputs: Sequence[Sequence[int]]
               ) -> tuple[list[list[int]], list[list[str]]]:
  """Replaces each mask token of each row of ids by the model's most likely non-special token.

  Returns:
    (the filled ids per row, the decoded fill of each run of masked tokens per row).
  """
  length = max(len(x) for x in inputs)
  tokens = np.zeros((len(inputs), length), np.int32)
  segments = np.zeros((len(inputs), length), np.int32)
  for r, ids in enumerate(inputs):
    tokens[r, :len(ids)] = ids
    segments[r, :len(ids)] = 1
  logits = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s))(
      params, jnp.asarray(tokens), jnp.asarray(segments))
  logits = np.array(logits, np.float32)  # A writable copy.
  logits[..., _special_ids(tokenizer)] = -np.inf
  best = logits.argmax(-1)
  filled, fills = [], []
  for r, ids in enumerate(inputs):
    row, spans, current = list(ids), [], None
    for t, tok in enumerate(ids):
      if tok == tokenizer.mask_id:
        row[t] = int(best[r, t])
        if current is None:
          current = []
          spans.append(current)
        current.append(row[t])
      else:
        current = None
    filled.append(row)
    fills.append([tokenizer.decode(span) for span in spans])
  return filled, fills


def one_epoch(data_config):
  """The train split read once, in order (for counting)."""
  return dataclasses.replace(data_config, num_epochs=1, shuffle=False)
