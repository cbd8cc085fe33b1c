"""Data pipelines: a source, tokenized, packed and batched for each objective, on grain.

    config = DataConfig(source="shakespeare", objective="causal_lm", seq_len=1024, batch_size=8)
    tokenizer = build_tokenizer(config)             # trained once, then read from the cache
    it = make_pipeline(config, tokenizer, "train")  # endless; "validation": one pass
    batch = next(it)                                # dict of [B, T] numpy arrays
    state = it.get_state()                          # JSON-serializable; it.set_state(state)

Stages (grain `MapDataset`, then `IterDataset`): records of this host's shard (every
`process_count`-th record from `process_index`) -> shuffle with the seed (a new order each
epoch) -> repeat (train) -> per record: tokenize, split into chunks of the row length, apply the
objective (random choices seeded by (seed, record index), so they are reproducible and differ
per epoch) -> flatten -> pack several examples per row -> batch -> optional worker processes.

Batch keys (numpy, int32 unless noted; B = batch_size, T = seq_len, T_dec = decoder length):

- causal_lm, masked_lm: `inputs, targets, loss_mask` (float32), `segment_ids, positions`,
  all `[B, T]`. Causal: `targets[b, t]` is the token after `inputs[b, t]` in its document, so no
  target crosses a segment. Masked: `targets` holds the original token where `loss_mask` is 1.
- span_corruption, seq2seq: `encoder_inputs, encoder_segment_ids, encoder_positions` `[B, T]`;
  `decoder_inputs, decoder_targets, decoder_loss_mask` (float32), `decoder_segment_ids,
  decoder_positions` `[B, T_dec]`. `decoder_inputs` are the targets shifted right behind bos.

`segment_ids` count 1, 2, 3, ... per example in a row, 0 on padding; `positions` restart at 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_exp

from lmjax.tokenizer import SentencePieceTokenizer, Tokenizer, TokenizerConfig, train_tokenizer
from train import objectives_data as od
from train import packing
from train.sources import SourceSpec, resolve_source

OBJECTIVES = ("causal_lm", "masked_lm", "span_corruption", "seq2seq")
_RANDOM = ("masked_lm", "span_corruption")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What data a run reads, and how it is cut into batches.

  Attributes:
    source: a source spec (`train.sources`): "shakespeare", "tfds:lm1b", "txt:PATH",
      "jsonl:PATH:FIELDS".
    objective: one of OBJECTIVES.
    seq_len: row length T (the encoder length for span_corruption and seq2seq).
    target_seq_len: decoder length T_dec (seq2seq default: seq_len; span_corruption default:
      the most the corruption of a full chunk needs).
    batch_size: rows per batch on this host.
    seed: shuffling, packing order and masking.
    shuffle: shuffle the train split (other splits are read in order).
    num_epochs: passes over the train split (None: endless). Other splits: one pass.
    pack: several examples per row; False puts one per row.
    num_packing_bins: rows filled at once by the packer.
    add_bos, add_eos: wrap each causal-LM document in bos / eos.
    mlm_probability, mlm_mask_fraction, mlm_random_fraction: BERT masking rates.
    noise_density, mean_noise_span_length: T5 span corruption.
    tokenizer: settings for training a tokenizer (when tokenizer_path is None).
    tokenizer_path: a `.model` file to load instead of training.
    tokenizer_cache_dir: cache of trained tokenizers (None: `~/.cache/lmjax/tokenizers`).
    tfds_data_dir: tfds data folder, local or gs:// (None: tfds default).
    num_workers: grain worker processes (0: in this process). Each worker packs its own share
      of the records, so the worker count changes the batches and the saved data position: a
      run resumes only with the `num_workers` it started with.
    worker_buffer_size: batches each worker prepares ahead.
    read_threads, read_buffer_size: threads and records ahead for reading and tokenizing.
  """

  source: str = "shakespeare"
  objective: str = "causal_lm"
  seq_len: int = 1024
  target_seq_len: int | None = None
  batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  pack: bool = True
  num_packing_bins: int = 32
  add_bos: bool = True
  add_eos: bool = True
  mlm_probability: float = 0.15
  mlm_mask_fraction: float = 0.8
  mlm_random_fraction: float = 0.1
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
  tokenizer_path: str | None = None
  tokenizer_cache_dir: str | None = None
  tfds_data_dir: str | None = None
  num_workers: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 2
  read_buffer_size: int = 64

  def __post_init__(self):
    def check(ok: bool, what: str):
      if not ok:
        raise ValueError(f"DataConfig: {what}")

    check(self.objective in OBJECTIVES, f"objective={self.objective!r}; allowed: {OBJECTIVES}")
    SourceSpec.parse(self.source)  # Raises on a malformed spec.
    check(self.seq_len >= 4, f"seq_len={self.seq_len}; must be >= 4")
    check(self.target_seq_len is None or self.target_seq_len >= 2,
          f"target_seq_len={self.target_seq_len}; must be None or >= 2")
    check(self.batch_size >= 1, f"batch_size={self.batch_size}; must be >= 1")
    check(self.num_epochs is None or self.num_epochs >= 1,
          f"num_epochs={self.num_epochs}; must be None (endless) or >= 1")
    check(self.num_packing_bins >= 1, f"num_packing_bins={self.num_packing_bins}; must be >= 1")
    check(0 < self.mlm_probability < 1, f"mlm_probability={self.mlm_probability}; in (0, 1)")
    check(self.mlm_mask_fraction >= 0 and self.mlm_random_fraction >= 0
          and self.mlm_mask_fraction + self.mlm_random_fraction <= 1,
          "mlm_mask_fraction and mlm_random_fraction must be >= 0 with a sum <= 1")
    check(0 < self.noise_density < 1, f"noise_density={self.noise_density}; in (0, 1)")
    check(self.mean_noise_span_length >= 1,
          f"mean_noise_span_length={self.mean_noise_span_length}; must be >= 1")
    check(self.num_workers >= 0 and self.read_threads >= 1 and self.worker_buffer_size >= 1
          and self.read_buffer_size >= 1,
          "num_workers must be >= 0; read_threads and the buffer sizes >= 1")


def build_tokenizer(config: DataConfig) -> SentencePieceTokenizer:
  """Loads `config.tokenizer_path`, or trains (or reuses from the cache) one on the train split.

  The corpus is the train split of `config.source` (both fields of a seq2seq source), read in
  order up to `config.tokenizer.max_corpus_chars` characters.
  """
  if config.tokenizer_path:
    return SentencePieceTokenizer.load(config.tokenizer_path)
  source = resolve_source(config.source, "train", data_dir=config.tfds_data_dir)
  texts = (text for i in range(len(source)) for text in source[i].values())
  return train_tokenizer(texts, config.tokenizer, cache_dir=config.tokenizer_cache_dir)


class _MakeExamples:
  """Record -> list of examples for the objective (a picklable callable for grain workers)."""

  def __init__(self, config: DataConfig, tokenizer: Tokenizer, raw_len: int, dec_len: int):
    self.config, self.tokenizer = config, tokenizer
    self.raw_len, self.dec_len = raw_len, dec_len
    special = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id]
    special += [i for i in [tokenizer.mask_id, *tokenizer.sentinel_ids] if i is not None]
    self.special_ids = np.asarray(sorted(set(special)), np.int32)
    self.random_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32),
                                   self.special_ids)

  def __call__(self, index: int, record: dict[str, str]) -> list[od.Example]:
    c, tok = self.config, self.tokenizer
    rng = np.random.default_rng([c.seed, index]) if c.objective in _RANDOM else None
    if c.objective == "seq2seq":
      src, tgt = tok.encode([record["input"], record["target"]])
      return [od.seq2seq_example(src, tgt, enc_len=c.seq_len, dec_len=self.dec_len,
                                 bos_id=tok.bos_id, eos_id=tok.eos_id)]
    ids = np.asarray(tok.encode(record["text"]), np.int32)
    if c.objective == "causal_lm":
      return od.causal_lm_examples(ids, c.seq_len, bos_id=tok.bos_id if c.add_bos else None,
                                   eos_id=tok.eos_id if c.add_eos else None)
    if c.objective == "masked_lm":
      seq = np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32)
      return [
          od.mask_tokens(chunk, rng, mask_id=tok.mask_id, random_ids=self.random_ids,
                         special_ids=self.special_ids, probability=c.mlm_probability,
                         mask_fraction=c.mlm_mask_fraction, random_fraction=c.mlm_random_fraction)
          for chunk in od.chunks(seq, c.seq_len)
      ]
    out = []
    for chunk in od.chunks(ids, self.raw_len) if len(ids) else []:
      enc, dec = od.span_corruption(chunk, rng, sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id,
                                    density=c.noise_density, mean_span=c.mean_noise_span_length)
      out.append({"encoder_inputs": enc, "decoder_inputs": od.shift_right(dec, tok.bos_id),
                  "decoder_targets": dec})
    return out


def row_lengths(config: DataConfig, *, has_mask: bool = True,
                num_sentinels: int | None = None) -> tuple[int, int]:
  """(raw chunk length, decoder length) of the objective's rows.

  Args:
    config: the data settings.
    has_mask: the tokenizer has a mask token (masked LM needs one).
    num_sentinels: the tokenizer's sentinels (span corruption needs enough); None: not checked.

  Raises:
    ValueError: the tokenizer cannot serve the objective, or `target_seq_len` is too short.
  """
  c = config
  if c.objective == "masked_lm" and not has_mask:
    raise ValueError("objective 'masked_lm' needs a tokenizer with a mask token (mask_id)")
  if c.objective != "span_corruption":
    return c.seq_len, c.target_seq_len or c.seq_len
  raw = od.span_corruption_raw_length(c.seq_len, c.noise_density, c.mean_noise_span_length)
  dec_needed = od.span_corruption_lengths(raw, c.noise_density, c.mean_noise_span_length)[1]
  spans = dec_needed - 1 - int(round(raw * c.noise_density))
  if num_sentinels is not None and spans > num_sentinels:
    raise ValueError(
        f"span_corruption of {raw} tokens makes {spans} spans, but the tokenizer has "
        f"{num_sentinels} sentinels: lower seq_len, raise mean_noise_span_length, or train the "
        "tokenizer with more num_sentinels"
    )
  if c.target_seq_len is not None and c.target_seq_len < dec_needed:
    raise ValueError(f"target_seq_len={c.target_seq_len}; span corruption with seq_len="
                     f"{c.seq_len} needs decoder length >= {dec_needed} (or None)")
  return raw, c.target_seq_len or dec_needed


def _lengths(config: DataConfig, tokenizer: Tokenizer) -> tuple[int, int]:
  """(raw chunk length, decoder length) for the objective; checks the tokenizer fits it."""
  return row_lengths(config, has_mask=tokenizer.mask_id is not None,
                     num_sentinels=len(tokenizer.sentinel_ids))


class DataIterator:
  """Iterates batches; `get_state()`/`set_state()` save and restore the exact position."""

  def __init__(self, dataset: grain.IterDataset, fingerprint: str, num_workers: int = 0):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self.fingerprint = fingerprint
    self.num_workers = num_workers

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable state: the pipeline's fingerprint, its worker count and grain's
    iterator state."""
    state = json.loads(json.dumps(self._iterator.get_state(), default=_to_json))
    return {"fingerprint": self.fingerprint, "num_workers": self.num_workers, "grain": state}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a state from `get_state` of a pipeline with the same config, split and host
    (`num_workers` included: the batches depend on it)."""
    saved_workers = state.get("num_workers", self.num_workers)
    if saved_workers != self.num_workers:
      raise ValueError(
          f"data state was saved with data.num_workers={saved_workers}, this pipeline has "
          f"num_workers={self.num_workers}: each grain worker packs its own share of the "
          "records, so the batches and the saved position depend on the worker count. Resume "
          f"with data.num_workers={saved_workers} (a new run may use any number)")
    if state.get("fingerprint") != self.fingerprint:
      raise ValueError(
          "data state was saved by a different pipeline (config, split, tokenizer or host "
          f"differ): fingerprint {state.get('fingerprint')!r}, this one {self.fingerprint!r}"
      )
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    """Stops worker processes, if any."""
    if hasattr(self._iterator, "close"):
      self._iterator.close()


def _ensure_absl_flags_parsed() -> None:
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _to_json(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, bytes):
    return x.decode("latin-1")
  raise TypeError(f"grain iterator state holds a {type(x).__name__}, not JSON-serializable")


def make_pipeline(
    config: DataConfig,
    tokenizer: Tokenizer,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
  """Builds the batch iterator of `split` for this host.

  Args:
    config: the data settings.
    tokenizer: from `build_tokenizer(config)` (or any `lmjax.tokenizer.Tokenizer`).
    split: "train" (shuffled, repeated per `num_epochs`, full batches only) or another split
      (in order, one pass, the last batch padded with empty rows).
    process_index, process_count: this host's shard (default `jax.process_index()`,
      `jax.process_count()`).

  Returns:
    A `DataIterator` of dicts of numpy arrays (keys and shapes in the module docstring).
  """
  if process_index is None or process_count is None:
    import jax  # Deferred: only multi-host runs need it here.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  spec = SourceSpec.parse(config.source)
  pairs = config.objective == "seq2seq"
  if pairs != (len(spec.fields) == 2):
    raise ValueError(
        f"objective {config.objective!r} needs a source with "
        + ("input and target fields, e.g. 'jsonl:PATH:input,target'" if pairs
           else f"one text field; {config.source!r} names {spec.fields}")
    )
  raw_len, dec_len = _lengths(config, tokenizer)
  source = resolve_source(spec, split, data_dir=config.tfds_data_dir)
  train = split == "train"

  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
    if len(ds) == 0:
      raise ValueError(f"host {process_index} of {process_count} gets no records of "
                       f"{source.description} ({len(source)} records)")
  if train and config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  if train:
    ds = ds.repeat(config.num_epochs)
  ds = ds.map_with_index(_MakeExamples(config, tokenizer, raw_len, dec_len))
  read = grain.ReadOptions(num_threads=config.read_threads,
                           prefetch_buffer_size=config.read_buffer_size)
  it = grain_exp.FlatMapIterDataset(ds.to_iter_dataset(read), packing.Flatten())
  if config.objective in ("causal_lm", "masked_lm"):
    lengths = {"inputs": config.seq_len, "targets": config.seq_len}
    if config.objective == "masked_lm":
      lengths["loss_mask"] = config.seq_len
    finalize = packing.finalize_lm
  else:
    lengths = {"encoder_inputs": config.seq_len, "decoder_inputs": dec_len,
               "decoder_targets": dec_len}
    finalize = packing.finalize_seq2seq
  it = packing.pack(it, lengths, num_bins=config.num_packing_bins, seed=config.seed,
                    shuffle=train and config.shuffle, max_per_row=None if config.pack else 1)
  it = it.map(finalize).batch(config.batch_size, drop_remainder=train)
  if not train:
    it = it.map(packing.PadBatch(config.batch_size))
  if config.num_workers > 0:
    _ensure_absl_flags_parsed()  # grain's workers read absl flags.
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
  return DataIterator(it, _fingerprint(config, tokenizer, split, process_index, process_count),
                      config.num_workers)


# Settings that do not change which data come in which order (`num_workers` does: it is in).
_NOT_IN_FINGERPRINT = ("tokenizer", "tokenizer_path", "tokenizer_cache_dir", "tfds_data_dir",
                       "worker_buffer_size", "read_threads", "read_buffer_size")


def _fingerprint(config, tokenizer, split, process_index, process_count) -> str:
  vocab = getattr(tokenizer, "model_proto", None) or repr(tokenizer).encode()
  fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_FINGERPRINT}
  blob = json.dumps([fields, split, process_index, process_count,
                     hashlib.sha256(vocab).hexdigest()], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
