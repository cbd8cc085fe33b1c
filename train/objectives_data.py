"""Per-example transforms for each objective, on numpy token arrays (no grain, no tokenizer).

- Causal LM: `causal_lm_examples` splits `[bos] + ids + [eos]` into (inputs, targets) pairs
  shifted by one token, in chunks of the row length (MaxText style: no target is lost).
- Masked LM (BERT, Devlin et al., 2019, https://arxiv.org/abs/1810.04805): `mask_tokens`.
- Span corruption (T5, Raffel et al., 2020, https://arxiv.org/abs/1910.10683, section 3.1.4;
  the noise mask follows `random_spans_noise_mask` of google-research/text-to-text-transfer-
  transformer): `span_corruption`, `span_corruption_lengths`, `span_corruption_raw_length`.
- Supervised seq2seq pairs: `seq2seq_example`.

Randomness comes from a `numpy.random.Generator` the caller seeds per example, so a pipeline
that seeds from (seed, example index) is deterministic and resumable without RNG state.
"""

from __future__ import annotations

import numpy as np

Example = dict[str, np.ndarray]


def _i32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.int32)


def chunks(tokens: np.ndarray, length: int) -> list[np.ndarray]:
  """Splits `[N]` tokens into pieces of at most `length` (the last may be shorter)."""
  return [tokens[i : i + length] for i in range(0, max(len(tokens), 1), length)]


def causal_lm_examples(
    ids: np.ndarray, seq_len: int, *, bos_id: int | None, eos_id: int | None
) -> list[Example]:
  """Next-token pairs for one document, chunked to `seq_len`.

  Args:
    ids: `[N]` token ids of the document (no specials).
    seq_len: row length T.
    bos_id, eos_id: added around the document when not None.

  Returns:
    Examples with `inputs` and `targets` (`[<=T]` int32): `targets[t]` is the token after
    `inputs[t]` in the document, so every target stays inside its document.
  """
  seq = _i32(ids)
  if bos_id is not None:
    seq = np.concatenate([_i32([bos_id]), seq])
  if eos_id is not None:
    seq = np.concatenate([seq, _i32([eos_id])])
  if len(seq) < 2:
    return []
  inputs, targets = seq[:-1], seq[1:]
  return [
      {"inputs": i, "targets": t}
      for i, t in zip(chunks(inputs, seq_len), chunks(targets, seq_len))
  ]


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    random_ids: np.ndarray,
    special_ids: np.ndarray,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> Example:
  """BERT masking of one sequence.

  `round(probability * n)` of the n non-special tokens are chosen (at least one when n > 0);
  each chosen token becomes `mask_id` with probability `mask_fraction`, a token drawn uniformly
  from `random_ids` with probability `random_fraction`, and stays as it is otherwise.

  Args:
    tokens: `[T]` int token ids.
    rng: the generator for this sequence.
    mask_id: id of the mask token.
    random_ids: `[R]` ids a random replacement is drawn from (the non-special vocabulary).
    special_ids: ids never chosen (bos, eos, pad, ...).
    probability, mask_fraction, random_fraction: as above.

  Returns:
    `inputs` (`[T]` int32, corrupted), `targets` (`[T]` int32: the original token where chosen,
    0 elsewhere), `loss_mask` (`[T]` float32: 1 where chosen).
  """
  tokens = _i32(tokens)
  eligible = np.flatnonzero(~np.isin(tokens, special_ids))
  n_chosen = int(round(probability * len(eligible)))
  if len(eligible):
    n_chosen = max(1, n_chosen)
  chosen = np.sort(rng.choice(eligible, size=n_chosen, replace=False))
  u = rng.random(n_chosen)
  inputs = tokens.copy()
  to_mask = chosen[u < mask_fraction]
  to_random = chosen[(u >= mask_fraction) & (u < mask_fraction + random_fraction)]
  inputs[to_mask] = mask_id
  inputs[to_random] = rng.choice(random_ids, size=len(to_random))
  targets = np.zeros_like(tokens)
  targets[chosen] = tokens[chosen]
  loss_mask = np.zeros(len(tokens), np.float32)
  loss_mask[chosen] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def _noise_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) for a sequence of `length`, as T5 computes them."""
  num_noise = int(round(length * density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def span_corruption_lengths(raw_len: int, density: float, mean_span: float) -> tuple[int, int]:
  """(encoder length, decoder length) of `span_corruption` on `raw_len` tokens, eos included."""
  num_noise, num_spans = _noise_counts(raw_len, density, mean_span)
  return raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_raw_length(enc_len: int, density: float, mean_span: float) -> int:
  """The longest raw chunk whose corrupted encoder input fits in `enc_len` (T5's helper)."""
  raw = 2
  if span_corruption_lengths(raw, density, mean_span)[0] > enc_len:
    raise ValueError(f"encoder length {enc_len} is too short for span corruption; use >= 4")
  while span_corruption_lengths(raw + 1, density, mean_span)[0] <= enc_len:
    raw += 1
  return raw


def _random_segmentation(rng: np.random.Generator, num_items: int, num_segments: int):
  """`num_segments` positive lengths summing to `num_items`, uniformly at random."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
  """`[length]` bool, True on noise: alternating non-noise and noise spans, non-noise first.

  Exactly `round(length * density)` noise tokens (clipped to [1, length - 1]) in
  `round(noise / mean_span)` spans. Sequences shorter than 2 get no noise.
  """
  if length < 2:
    return np.zeros(length, bool)
  num_noise, num_spans = _noise_counts(length, density, mean_span)
  noise_lengths = _random_segmentation(rng, num_noise, num_spans)
  keep_lengths = _random_segmentation(rng, length - num_noise, num_spans)
  spans = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
  is_noise = np.tile([False, True], num_spans)
  return np.repeat(is_noise, spans)


def span_corruption(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    sentinel_ids: tuple[int, ...],
    eos_id: int,
    density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
  """T5 span corruption of one raw chunk.

  Args:
    tokens: `[N]` token ids (no eos).
    rng: the generator for this chunk.
    sentinel_ids: sentinel i replaces the i-th noise span.
    eos_id: appended to both outputs.
    density, mean_span: share of noise tokens; mean noise-span length.

  Returns:
    (encoder inputs `[E]`, decoder targets `[D]`), int32. The encoder input is the text with
    each noise span replaced by its sentinel; the target is each sentinel followed by its span.
  """
  tokens = _i32(tokens)
  noise = random_spans_noise_mask(len(tokens), density, mean_span, rng)
  starts = noise & ~np.concatenate([[False], noise[:-1]])
  num_spans = int(starts.sum())
  if num_spans > len(sentinel_ids):
    raise ValueError(
        f"{num_spans} noise spans need {num_spans} sentinels; the tokenizer has "
        f"{len(sentinel_ids)}: shorten seq_len, raise mean_noise_span_length, or num_sentinels"
    )
  if num_spans == 0:
    return np.append(tokens, eos_id).astype(np.int32), _i32([eos_id])
  span_index = np.cumsum(starts) - 1
  sentinels = _i32(sentinel_ids[:num_spans])
  enc = np.where(starts, sentinels[span_index], tokens)[~noise | starts]
  dec_parts = []
  for k in range(num_spans):
    dec_parts += [sentinels[k : k + 1], tokens[noise & (span_index == k)]]
  dec = np.concatenate(dec_parts)
  return np.append(enc, eos_id).astype(np.int32), np.append(dec, eos_id).astype(np.int32)


def seq2seq_example(
    source_ids: np.ndarray,
    target_ids: np.ndarray,
    *,
    enc_len: int,
    dec_len: int,
    bos_id: int,
    eos_id: int,
) -> Example:
  """One encoder-decoder example, truncated to (enc_len, dec_len), eos kept last.

  Returns:
    `encoder_inputs` `[<=enc_len]`: source + eos; `decoder_targets` `[<=dec_len]`: target + eos;
    `decoder_inputs`: the targets shifted right behind `bos_id` (teacher forcing). All int32.
  """
  enc = np.append(_i32(source_ids)[: enc_len - 1], eos_id).astype(np.int32)
  dec = np.append(_i32(target_ids)[: dec_len - 1], eos_id).astype(np.int32)
  return {"encoder_inputs": enc, "decoder_inputs": shift_right(dec, bos_id), "decoder_targets": dec}


def shift_right(targets: np.ndarray, start_id: int) -> np.ndarray:
  """`[start_id] + targets[:-1]`, int32."""
  return np.concatenate([_i32([start_id]), _i32(targets)[:-1]])
