"""Preference pairs: rows `{"prompt", "chosen", "rejected"}` as packed token batches.

Rows follow TRL's preference formats (https://huggingface.co/docs/trl/dataset_formats):

- explicit prompt, plain: `{"prompt": str, "chosen": str, "rejected": str}`;
- explicit prompt, conversational: the three are lists of messages (`chosen`/`rejected` hold
  the assistant reply);
- implicit prompt: `{"chosen", "rejected"}` only, each the whole text or conversation; the
  prompt is their common start (the shared messages; for text, up to the last space);
- an optional `margin` (a float, Bradley-Terry's `r_chosen - r_rejected` target offset).

Each side is rendered and tokenized as SFT renders a prompt and its response
(`train.chat_data.encode_example`: the model's chat template, response masks, EOS), and cut
after its response's last token (the template's end-of-turn token, where the reward is read
and where a generated reply stops). A pair is one packing unit of two segments, chosen then
rejected, each at most `seq_len // 2` tokens (longer ones lose their end, counted).

The embedded sets (no human preference data can be downloaded here), made by code:

- `arithmetic`: `train.arithmetic` problems (seeded); chosen = the correct worked solution,
  rejected = the same steps with one result off by 1 or 2, carried to a wrong answer. Held out:
  the `test` problems (disjoint by construction).
- `chat`: the embedded chat set (`train.chat_corpus`); the prompt is a conversation up to its
  last assistant turn, chosen = that true reply; rejected = (seeded, one in three each) a reply
  from another conversation, the true reply's words shuffled, or its first half.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from train import chat_data, packing
from train.chat_data import DataError, Row
from train.data import DataIterator

EMBEDDED = {"arithmetic": "seeded arithmetic problems, correct vs one-step-wrong solutions",
            "chat": "the embedded chat set, true reply vs another/shuffled/truncated reply"}
FORMAT = '{"prompt", "chosen", "rejected"} (prompt optional; strings or lists of messages)'


# --- the embedded sets -------------------------------------------------------------------------


def arithmetic_rows(n: int, seed: int, split: str, *, max_steps: int = 2,
                    max_value: int = 20) -> list[Row]:
  """`n` conversational pairs of `train.arithmetic` problems ("train" or "heldout") of at most
  `max_steps` operations on numbers up to `max_value`."""
  from train import arithmetic

  probs = arithmetic.problems(n, seed, "test" if split == "heldout" else "train",
                              max_steps=max_steps, max_value=max_value)
  return [Row({"prompt": [{"role": "user", "content": p["prompt"]}],
               "chosen": [{"role": "assistant", "content": p["solution"]}],
               "rejected": [{"role": "assistant", "content": p["wrong_solution"]}]},
              f"arithmetic[{split}][{i}]") for i, p in enumerate(probs)]


def chat_rows(split: str, seed: int) -> list[Row]:
  """Pairs from the embedded chat set's `split` (module docstring: how rejected is made)."""
  convs = chat_data.load_rows("chat", split)
  replies = [r.data["messages"][-1]["content"] for r in convs]
  rng = random.Random(f"chat-pairs-{seed}-{split}")
  out = []
  for i, r in enumerate(convs):
    msgs = r.data["messages"]
    last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
    true = msgs[last]["content"]
    words = true.split()
    how = rng.randrange(3) if len(words) >= 4 else 0
    if how == 1:
      shuffled = words[:]
      while shuffled == words:
        rng.shuffle(shuffled)
      bad = " ".join(shuffled)
    elif how == 2:
      bad = " ".join(words[: len(words) // 2])
    else:
      bad = true
      while bad.strip() == true.strip():
        bad = replies[rng.randrange(len(replies))]
    out.append(Row({"prompt": msgs[:last], "chosen": [msgs[last]],
                    "rejected": [{"role": "assistant", "content": bad}]},
                   f"chat-pairs[{split}][{i}]"))
  return out


def load_rows(source: str, split: str, *, num_pairs: int = 2000, heldout_pairs: int = 200,
              seed: int = 0, data_dir: str | None = None, heldout_fraction: float = 0.05,
              max_steps: int = 2, max_value: int = 20) -> list[Row]:
  """The preference rows of `split` ("train" or "heldout") of a source: `arithmetic`
  (`num_pairs` / `heldout_pairs` generated with `seed`, `max_steps` and `max_value`), `chat`,
  `jsonl:PATH` or `tfds:NAME` (split as `train.chat_data.load_rows`)."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  if source == "arithmetic":
    return arithmetic_rows(num_pairs if split == "train" else heldout_pairs, seed, split,
                           max_steps=max_steps, max_value=max_value)
  if source == "chat":
    return chat_rows(split, seed)
  kind, _, rest = source.partition(":")
  if kind not in ("jsonl", "tfds") or not rest:
    raise ValueError(f"unknown preference data source {source!r}: use {sorted(EMBEDDED)} "
                     "(embedded), 'jsonl:PATH' or 'tfds:NAME'")
  return chat_data.load_rows(source, split, data_dir=data_dir, heldout_fraction=heldout_fraction,
                             seed=seed)


# --- rows to pairs -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
  """One checked row: the chosen and rejected examples (`chat_data.to_example` forms)."""

  chosen: tuple[str, Any]
  rejected: tuple[str, Any]
  margin: float = 0.0


def _common_messages(a: list[dict], b: list[dict]) -> int:
  n = 0
  while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
    n += 1
  return n


def _split_implicit_text(c: str, r: str) -> tuple[str, str, str]:
  n = 0
  while n < min(len(c), len(r)) and c[n] == r[n]:
    n += 1
  cut = c.rfind(" ", 0, n) + 1 if n < len(c) or n < len(r) else 0
  return c[:cut], c[cut:], r[cut:]


def to_pair(row: Row) -> Pair:
  """A row as a `Pair`, checked (a `DataError` naming the row and what is allowed)."""
  d, where = row.data, row.where
  missing = [k for k in ("chosen", "rejected") if k not in d]
  if missing:
    raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected' (format {FORMAT}); "
                    f"this row lacks {missing} (keys {sorted(d)})")
  c, r, p = d["chosen"], d["rejected"], d.get("prompt")
  margin = d.get("margin", 0.0)
  if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not np.isfinite(margin):
    raise DataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
  if c == r:
    raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ")
  chat = any(isinstance(x, list) for x in (c, r, p))
  if not chat:
    if p is None:
      p, c, r = _split_implicit_text(chat_data._text(c, where, "chosen"),
                                     chat_data._text(r, where, "rejected"))
    pieces = [chat_data.Row({"prompt": p, "completion": x}, f"{where} ({name})")
              for name, x in (("chosen", c), ("rejected", r))]
  else:
    if p is None:
      cm = chat_data._messages(c, where, "chosen")
      rm = chat_data._messages(r, where, "rejected")
      n = _common_messages(cm, rm)
      p, c, r = cm[:n], cm[n:], rm[n:]
    pieces = [chat_data.Row({"prompt": p or [], "completion": x}, f"{where} ({name})")
              for name, x in (("chosen", c), ("rejected", r))]
    if not p:  # no prompt messages: the chat is the completion alone
      pieces = [chat_data.Row({"messages": x}, w.where) for x, w in zip((c, r), pieces)]
  chosen, rejected = (chat_data.to_example(x) for x in pieces)
  if chosen == rejected:
    raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ")
  return Pair(chosen, rejected, float(margin))


# --- pairs to token arrays ---------------------------------------------------------------------


@dataclasses.dataclass
class PairStats:
  """What encoding did to the pairs (reported by the jobs)."""

  pairs: int = 0
  tokens: int = 0
  truncated: int = 0
  dropped: int = 0

  def describe(self) -> str:
    return (f"{self.pairs:,} pairs, {self.tokens:,} tokens; {self.truncated:,} with a side cut "
            f"at seq_len/2, {self.dropped:,} dropped with no response token left")


def _side(example, tokenizer, side_len: int, template, shift: bool):
  """One side's arrays, cut after its last response token; None: no response token left."""
  stats = chat_data.EncodeStats()
  enc = chat_data.encode_example(example, tokenizer, side_len if shift else side_len - 1,
                                 template, stats)
  if enc is None:
    return None, False
  end = int(np.nonzero(enc["loss_mask"])[0][-1]) + 1
  enc = {k: v[:end] for k, v in enc.items()}
  if not shift:
    enc = {"inputs": np.append(enc["inputs"], enc["targets"][-1]).astype(np.int32)}
  return enc, bool(stats.truncated)


def encode_pair(pair: Pair, tokenizer, seq_len: int, *, shift: bool,
                chat_template: str | None = None, stats: PairStats | None = None
                ) -> dict[str, np.ndarray] | None:
  """A pair as one packing unit `[<= seq_len]`: chosen's tokens then rejected's, with `sign`
  (+1 / -1), `last` (1 at each side's last token) and `margin`; `shift` (DPO): `inputs`,
  `targets` and the response `loss_mask` of next-token prediction; else (reward models) the
  whole sequences as `inputs`."""
  stats = stats if stats is not None else PairStats()
  sides = [_side(ex, tokenizer, seq_len // 2, chat_template, shift)
           for ex in (pair.chosen, pair.rejected)]
  if any(s is None for s, _ in sides):
    stats.dropped += 1
    return None
  stats.truncated += any(t for _, t in sides)
  (c, _), (r, _) = sides
  out = {k: np.concatenate([c[k], r[k]]) for k in c}
  nc, nr = len(c["inputs"]), len(r["inputs"])
  out["sign"] = np.concatenate([np.ones(nc), -np.ones(nr)]).astype(np.float32)
  last = np.zeros(nc + nr, np.float32)
  last[[nc - 1, nc + nr - 1]] = 1.0
  out["last"] = last
  out["margin"] = np.full(nc + nr, pair.margin, np.float32)
  stats.pairs += 1
  stats.tokens += nc + nr
  return out


def encode_rows(rows: Sequence[Row], tokenizer, seq_len: int, *, shift: bool,
                chat_template: str | None = None) -> tuple[list[dict], PairStats]:
  """Checks every row (a `DataError` names the first bad one), then encodes the pairs."""
  pairs = [to_pair(r) for r in rows]
  stats = PairStats()
  out = []
  for row, p in zip(rows, pairs):
    try:
      enc = encode_pair(p, tokenizer, seq_len, shift=shift, chat_template=chat_template,
                        stats=stats)
    except DataError as e:
      raise DataError(f"{row.where}: {e}") from e
    if enc is not None:
      out.append(enc)
  return out, stats


# --- batches -----------------------------------------------------------------------------------


def positions_of(segment_ids: np.ndarray) -> np.ndarray:
  """Positions restarting at 0 in each segment (numpy, `[..., T]`)."""
  t = segment_ids.shape[-1]
  idx = np.broadcast_to(np.arange(t), segment_ids.shape)
  starts = np.concatenate([np.ones_like(segment_ids[..., :1], bool),
                           segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)).astype(np.int32)


def finalize(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row's batch keys: each pair k (grain's segment k) becomes segments 2k - 1
  (chosen) and 2k (rejected), so the two never attend to each other."""
  pair = row["inputs_segment_ids"].astype(np.int32)
  sign = row["sign"].astype(np.float32)
  seg = np.where(pair > 0, 2 * pair - (sign > 0), 0).astype(np.int32)
  out = {"inputs": row["inputs"].astype(np.int32), "segment_ids": seg,
         "positions": positions_of(seg), "pair": pair, "sign": sign,
         "last": row["last"].astype(np.float32), "margin": row["margin"].astype(np.float32)}
  if "targets" in row:
    out["targets"] = row["targets"].astype(np.int32)
    out["loss_mask"] = row["loss_mask"].astype(np.float32) * (pair > 0)
  if "ref_logp" in row:  # DPO with precomputed reference log-probs (train.dpo)
    out["ref_logp"] = row["ref_logp"].astype(np.float32) * (pair > 0)
  return out


def pad_pairs(examples: Sequence[Mapping[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """Unpacked rows, one pair each (tests, small evaluations): `finalize`'s keys `[N, T]`."""
  rows = []
  for ex in examples:
    n = len(ex["inputs"])
    row = {k: np.zeros(seq_len, v.dtype) for k, v in ex.items()}
    for k, v in ex.items():
      row[k][:n] = v
    row["inputs_segment_ids"] = np.zeros(seq_len, np.int32)
    row["inputs_segment_ids"][:n] = 1
    rows.append(finalize(row))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_batches(examples: list[dict], *, seq_len: int, batch_size: int, split: str, seed: int,
                 shuffle: bool = True, pack: bool = True, num_packing_bins: int = 16,
                 fingerprint: Any = None) -> DataIterator:
  """Batches of `split` ("train": shuffled, endless; "heldout": one pass, the last padded with
  empty rows), each `finalize`'s keys `[batch_size, seq_len]`."""
  if not examples:
    raise DataError(f"no {split} preference pair fits data.seq_len={seq_len}")
  train = split == "train"
  ds = grain.MapDataset.source(examples)
  if train and shuffle:
    ds = ds.shuffle(seed=seed)
  if train:
    ds = ds.repeat(None)
  lengths = {k: seq_len for k in examples[0]}
  it = packing.pack(ds.to_iter_dataset(), lengths, num_bins=num_packing_bins, seed=seed,
                    shuffle=train and shuffle, max_per_row=None if pack else 1)
  it = it.map(finalize).batch(batch_size, drop_remainder=train)
  if not train:
    it = it.map(packing.PadBatch(batch_size))
  blob = json.dumps([seq_len, batch_size, split, seed, shuffle, pack, num_packing_bins,
                     jax.process_index(), jax.process_count(), len(examples), fingerprint],
                    sort_keys=True, default=str)
  return DataIterator(it, hashlib.sha256(blob.encode()).hexdigest()[:16])
