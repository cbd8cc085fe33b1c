"""Precomputed teacher logits: the teacher's top-k log-probs stored beside the data, so KD
trains without a live teacher (`kd.teacher=stored`).

`write_store` runs the teacher once over every row of a jsonl data file as the student will
see it (`train.chat_data.encode_example`: the same template, truncation and next-token pairs)
and keeps, at each trained position (`loss_mask` 1), the ids and log-probs (temperature 1,
float32) of the teacher's K likeliest next tokens. They go to `FILE.topk/` beside the file: a
`settings.json` (K, the teacher, the encoding) and shards `shard-NNNNN.npz` (row ids, and per
stored position its example position, ids `[N, K]` and log-probs `[N, K]`), each written
atomically after its batch of rows, so a crash loses at most one batch: a rerun computes only
the rows no shard holds (and loads no teacher when none is missing); other settings are
refused rather than mixed.

Training (`make_batches`) packs the examples as SFT does, carrying each trained position's
row in the table, and adds `topk_ids` / `topk_logprobs` `[B, T, K]` (zero where nothing is
stored) to every batch; `train.distill_losses.stored_kd_loss` reads them. The divergence is
then between the teacher's distribution renormalized over its top k and the student's over
the same k ids (both at temperature T): with K = V it is the live loss exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from train import chat_data, packing
from train.data import DataIterator

SHARD = "shard-{:05d}.npz"


def store_dir(data_path: str | os.PathLike) -> Path:
  """Where the top-k of the jsonl file `data_path` live: `data_path + ".topk"`."""
  p = Path(data_path)
  return p.with_name(p.name + ".topk")


def encoded_rows(rows: list[chat_data.Row], tokenizer, seq_len: int,
                 chat_template: str | None) -> list[tuple[str, dict[str, np.ndarray]]]:
  """`(row id, example)` of every row that encodes to a trained token (as the student sees
  it). Rows need a unique `id` (the synthetic set's rows have one)."""
  out, seen = [], set()
  for row in rows:
    rid = row.data.get("id")
    if not isinstance(rid, str) or rid in seen:
      raise chat_data.DataError(f"{row.where}: stored teacher logits need a unique string "
                                f"'id' per row (got {rid!r})")
    seen.add(rid)
    ex = chat_data.encode_example(chat_data.to_example(row), tokenizer, seq_len, chat_template)
    if ex is not None:
      out.append((rid, ex))
  return out


def _done(directory: Path) -> set[str]:
  done = set()
  for f in sorted(directory.glob("shard-*.npz")):
    with np.load(f) as z:
      done.update(str(r) for r in z["row_ids"])
  return done


def write_store(data_path: str | os.PathLike, examples: list[tuple[str, dict]], *, k: int,
                settings: dict[str, Any], load_teacher: Callable[[], tuple[Any, Any]],
                batch_size: int = 16, log=print) -> dict[str, Any]:
  """Writes (or completes) the teacher's top-`k` log-probs of `examples` beside `data_path`.

  Args:
    data_path: the jsonl file.
    examples: `encoded_rows` of all its rows (every split).
    k: how many of the teacher's likeliest next tokens to keep per position.
    settings: what the values depend on (teacher, seq_len, template), compared on resume.
    load_teacher: `() -> (model, params)`, called only when rows are missing.
    batch_size: rows per teacher forward (and per shard).

  Returns:
    `{"rows", "computed", "k", "directory"}`.
  """
  directory = store_dir(data_path)
  settings = {**settings, "k": int(k)}
  meta = directory / "settings.json"
  if meta.exists():
    old = json.loads(meta.read_text())
    if old != settings:
      diff = sorted(x for x in set(old) | set(settings) if old.get(x) != settings.get(x))
      raise ValueError(f"{directory} holds teacher logits of other settings ({', '.join(diff)} "
                       "differ); delete it or use another --workdir")
  directory.mkdir(parents=True, exist_ok=True)
  meta.write_text(json.dumps(settings, indent=2))
  done = _done(directory)
  todo = [(rid, ex) for rid, ex in examples if rid not in done]
  out = {"rows": len(done), "computed": 0, "k": int(k), "directory": str(directory)}
  if not todo:
    return out
  model, params = load_teacher()
  seq_len = max(len(ex["inputs"]) for _, ex in todo)

  @jax.jit
  def top(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"])
    vals, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), -1), k)
    return ids, vals

  n_shard = len(list(directory.glob("shard-*.npz")))
  log(f"teacher top-{k} log-probs of {len(todo)} rows into {directory}")
  for start in range(0, len(todo), batch_size):
    chunk = todo[start:start + batch_size]
    rows = [ex for _, ex in chunk]
    rows += [rows[0]] * (batch_size - len(rows))  # One compiled shape.
    ids, vals = jax.device_get(top(params, chat_data.pad_examples(rows, seq_len)))
    pos = [np.flatnonzero(ex["loss_mask"] > 0) for _, ex in chunk]
    shard = {"row_ids": np.array([rid for rid, _ in chunk]),
             "lengths": np.array([len(p) for p in pos], np.int32),
             "positions": np.concatenate(pos).astype(np.int32),
             "ids": np.concatenate([ids[i, p] for i, p in enumerate(pos)]).astype(np.int32),
             "logprobs": np.concatenate([vals[i, p] for i, p in enumerate(pos)])
             .astype(np.float32)}
    path = directory / SHARD.format(n_shard)
    tmp = directory / f".{path.name}.tmp.npz"
    np.savez(tmp, **shard)
    os.replace(tmp, path)
    n_shard += 1
    out["computed"] += len(chunk)
  out["rows"] = len(_done(directory))
  return out


@dataclasses.dataclass(frozen=True)
class Table:
  """The stored top-k of a data file: row 0 is empty (positions with nothing stored)."""

  ids: np.ndarray  # [N + 1, K] int32
  logprobs: np.ndarray  # [N + 1, K] float32
  index: dict[str, tuple[np.ndarray, np.ndarray]]  # row id -> (positions, table rows)


def load_table(data_path: str | os.PathLike) -> Table:
  directory = store_dir(data_path)
  shards = sorted(directory.glob("shard-*.npz"))
  if not shards:
    raise FileNotFoundError(f"no stored teacher logits in {directory} (generate.store_topk)")
  ids, lps, index, n = [], [], {}, 1
  for f in shards:
    with np.load(f) as z:
      ids.append(z["ids"])
      lps.append(z["logprobs"])
      offsets = np.concatenate([[0], np.cumsum(z["lengths"])])
      for r, rid in enumerate(z["row_ids"]):
        a, b = offsets[r], offsets[r + 1]
        index[str(rid)] = (z["positions"][a:b], np.arange(n + a, n + b))
      n += int(offsets[-1])
  k = ids[0].shape[1]
  return Table(np.concatenate([np.zeros((1, k), np.int32), *ids]),
               np.concatenate([np.zeros((1, k), np.float32), *lps]), index)


def attach(examples: list[tuple[str, dict]], table: Table) -> list[dict[str, np.ndarray]]:
  """The examples with `topk_row` `[n]` (the table row of each trained position, 0 off them);
  a trained position with nothing stored is an error (the store is for other data)."""
  out = []
  for rid, ex in examples:
    if rid not in table.index:
      raise ValueError(f"row {rid!r} has no stored teacher logits: rerun to complete the store")
    pos, rows = table.index[rid]
    if not np.array_equal(pos, np.flatnonzero(ex["loss_mask"] > 0)):
      raise ValueError(f"row {rid!r}: the stored teacher logits are for another encoding")
    topk_row = np.zeros(len(ex["inputs"]), np.int32)
    topk_row[pos] = rows
    out.append({**ex, "topk_row": topk_row})
  return out


def make_batches(data, split: str, examples: list[dict], table: Table,
                 fingerprint: str) -> DataIterator:
  """SFT's batches (`train.sft.make_batches`: the same packing, shuffling and padding) of
  `attach`ed examples, plus `topk_ids` and `topk_logprobs` `[B, T, K]`.

  Args:
    data: the run's data section (seq_len, batch_size, pack, shuffle, seed, bins).
  """
  train = split == "train"
  ds = grain.MapDataset.source(examples)
  if train and data.shuffle:
    ds = ds.shuffle(seed=data.seed)
  if train:
    ds = ds.repeat(None)
  lengths = dict.fromkeys(("inputs", "targets", "loss_mask", "topk_row"), data.seq_len)
  it = packing.pack(ds.to_iter_dataset(), lengths, num_bins=data.num_packing_bins,
                    seed=data.seed, shuffle=train and data.shuffle,
                    max_per_row=None if data.pack else 1)

  def finalize(row):
    out = packing.finalize_lm(row)
    r = row["topk_row"].astype(np.int64)
    return {**out, "topk_ids": table.ids[r], "topk_logprobs": table.logprobs[r]}

  it = it.map(finalize).batch(data.batch_size, drop_remainder=train)
  if not train:
    it = it.map(packing.PadBatch(data.batch_size))
  blob = json.dumps([dataclasses.asdict(data), split, fingerprint, len(examples)],
                    sort_keys=True)
  return DataIterator(it, hashlib.sha256(blob.encode()).hexdigest()[:16])
