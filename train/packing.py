"""Packing variable-length examples into fixed-length rows, on grain.

Several examples share a row (first-fit, `grain.experimental.FirstFitPackIterDataset`); each
gets a segment id 1, 2, 3, ... in its row (0 marks padding) and positions that restart at 0.
The layout follows T5/MaxText packing (Raffel et al., 2020; https://github.com/google/maxtext):
attention must not cross segments, which the model enforces from `segment_ids`.

`finalize_*` turn grain's packed features (`<feature>_segment_ids`, `<feature>_positions`) into
the batch keys of each objective; `pad_batch` pads a short final eval batch with empty rows.
"""

from __future__ import annotations

import numpy as np
from grain import experimental as grain_exp

FlatMapTransform = grain_exp.FlatMapTransform


class Flatten(FlatMapTransform):
  """Each element is a list of examples; yields them one by one (checkpointable in grain)."""

  max_fan_out = 1 << 30

  def flat_map(self, element):
    return element


def pack(parent, length_struct: dict[str, int], *, num_bins: int, seed: int, shuffle: bool,
         max_per_row: int | None = None):
  """Packs an `IterDataset` of dicts of `[n]` arrays into rows of `length_struct` lengths.

  Args:
    parent: examples, every feature no longer than its length in `length_struct`.
    length_struct: feature -> row length. Features not named here are dropped.
    num_bins: rows filled at once (more bins: less padding, rows emitted in bursts).
    seed, shuffle: order of the rows of one burst.
    max_per_row: at most this many examples per row (1: no packing).

  Returns:
    An `IterDataset` of rows: each feature `[L]`, plus `<feature>_segment_ids` and
    `<feature>_positions` (`[L]` int32).
  """
  return grain_exp.FirstFitPackIterDataset(
      parent,
      length_struct=dict(length_struct),
      num_packing_bins=num_bins,
      seed=seed,
      shuffle_bins=shuffle,
      max_sequences_per_bin=max_per_row,
  )


def finalize_lm(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Causal / masked LM row: `inputs, targets, loss_mask, segment_ids, positions`, `[T]`."""
  segment_ids = row["inputs_segment_ids"].astype(np.int32)
  if "loss_mask" in row:  # Masked LM: only the chosen tokens count.
    loss_mask = row["loss_mask"].astype(np.float32) * (segment_ids > 0)
  else:
    loss_mask = (segment_ids > 0).astype(np.float32)
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "loss_mask": loss_mask,
      "segment_ids": segment_ids,
      "positions": row["inputs_positions"].astype(np.int32),
  }


def finalize_seq2seq(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Encoder-decoder row: the eight `encoder_*` / `decoder_*` keys, `[T_enc]` or `[T_dec]`."""
  dec_segments = row["decoder_targets_segment_ids"].astype(np.int32)
  return {
      "encoder_inputs": row["encoder_inputs"].astype(np.int32),
      "encoder_segment_ids": row["encoder_inputs_segment_ids"].astype(np.int32),
      "encoder_positions": row["encoder_inputs_positions"].astype(np.int32),
      "decoder_inputs": row["decoder_inputs"].astype(np.int32),
      "decoder_targets": row["decoder_targets"].astype(np.int32),
      "decoder_loss_mask": (dec_segments > 0).astype(np.float32),
      "decoder_segment_ids": dec_segments,
      "decoder_positions": row["decoder_targets_positions"].astype(np.int32),
  }


class PadBatch:
  """Pads a batch with fewer than `batch_size` rows with all-zero rows (loss mask 0)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = next(iter(batch.values())).shape[0]
    if n == self.batch_size:
      return batch
    return {
        k: np.concatenate([v, np.zeros((self.batch_size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }
