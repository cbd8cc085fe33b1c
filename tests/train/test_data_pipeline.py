"""Tests of the grain pipelines: packing, objectives end to end, resume, host sharding, errors."""

import collections
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmjax import tokenizer as tk
from train import data as data_lib
from train import objectives_data as od
from train.data import DataConfig, make_pipeline
from train.sources import resolve_source

REPO = Path(__file__).resolve().parents[2]
T, B = 64, 4
WORDS = "thou art the king and queen of night day sword crown love fair sweet lord".split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """60 unique documents of 1 to ~200 tokens (some longer than a row), and seq2seq pairs."""
  d = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  docs = [f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 3, 20, 90])))
          for i in range(60)]
  (d / "docs.txt").write_text("\n\n".join(docs) + "\n")
  pairs = [{"input": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))),
            "target": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))}
           for i in range(40)]
  (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  return d


@pytest.fixture(scope="module")
def tok(corpus_dir):
  text = (corpus_dir / "docs.txt").read_text()
  return tk.train_tokenizer([text] * 3, tk.TokenizerConfig(vocab_size=400, num_sentinels=16),
                            use_cache=False)


def config(corpus_dir, **kw):
  kw.setdefault("source", f"txt:{corpus_dir}/docs.txt")
  return DataConfig(**{"seq_len": T, "batch_size": B, "num_packing_bins": 8, **kw})


def one_pass(cfg, tok, split="validation", **kw):
  it = make_pipeline(cfg, tok, split, process_index=kw.pop("process_index", 0),
                     process_count=kw.pop("process_count", 1))
  batches = list(it)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def segments(rows, seg_key, *keys):
  """Per (row, segment): a tuple of the segment's values under each of `keys`."""
  out = []
  for r in range(len(rows[seg_key])):
    seg = rows[seg_key][r]
    for s in range(1, seg.max() + 1):
      out.append(tuple(tuple(rows[k][r][seg == s].tolist()) for k in keys))
  return out


def check_layout(seg, pos):
  """Segment ids 1, 2, 3, ... then padding 0; positions restart at 0 in each segment."""
  for s_row, p_row in zip(seg, pos):
    n = int((s_row > 0).sum())
    assert (s_row[n:] == 0).all() and (p_row[n:] == 0).all()
    assert n == 0 or (s_row[0] == 1 and set(np.diff(s_row[:n])) <= {0, 1})
    for s in range(1, s_row.max() + 1):
      assert p_row[s_row == s].tolist() == list(range((s_row == s).sum()))


def doc_ids(corpus_dir, tok):
  return [tok.encode(r["text"]) for r in resolve_source(f"txt:{corpus_dir}/docs.txt", "x")]


def test_causal_lm_packing(corpus_dir, tok):
  rows = one_pass(config(corpus_dir), tok)
  assert {k: (v.dtype.name, v.shape[1]) for k, v in rows.items()} == {
      "inputs": ("int32", T), "targets": ("int32", T), "loss_mask": ("float32", T),
      "segment_ids": ("int32", T), "positions": ("int32", T)}
  assert len(rows["inputs"]) % B == 0
  check_layout(rows["segment_ids"], rows["positions"])
  assert (rows["loss_mask"] == (rows["segment_ids"] > 0)).all()
  assert (rows["inputs"][rows["segment_ids"] == 0] == 0).all()
  got = segments(rows, "segment_ids", "inputs", "targets")
  for inputs, targets in got:  # each target is the next input of the same segment
    assert inputs[1:] == targets[:-1]
  # Expected, computed directly: [bos] + ids + [eos], shifted, cut every T tokens.
  expected = []
  for ids in doc_ids(corpus_dir, tok):
    inputs, targets = [tok.bos_id, *ids], [*ids, tok.eos_id]
    expected += [(tuple(inputs[i : i + T]), tuple(targets[i : i + T]))
                 for i in range(0, len(inputs), T)]
  assert collections.Counter(got) == collections.Counter(expected)
  assert max(len(i) for i, _ in expected) == T  # some documents were split
  assert rows["segment_ids"].max() > 2  # and rows do hold several documents


def test_masked_lm_pipeline(corpus_dir, tok):
  rows = one_pass(config(corpus_dir, objective="masked_lm"), tok)
  check_layout(rows["segment_ids"], rows["positions"])
  chosen = rows["loss_mask"] == 1
  assert (rows["segment_ids"][chosen] > 0).all()
  restored = np.where(chosen, rows["targets"], rows["inputs"])
  got = [s[0] for s in segments({**rows, "restored": restored}, "segment_ids", "restored")]
  expected = []
  for ids in doc_ids(corpus_dir, tok):
    seq = [tok.bos_id, *ids, tok.eos_id]
    expected += [tuple(seq[i : i + T]) for i in range(0, len(seq), T)]
  assert collections.Counter(got) == collections.Counter(expected)
  eligible = (rows["segment_ids"] > 0) & ~np.isin(restored, [tok.bos_id, tok.eos_id])
  assert chosen.sum() / eligible.sum() == pytest.approx(0.15, abs=0.02)
  assert (rows["inputs"][chosen] == tok.mask_id).mean() == pytest.approx(0.8, abs=0.06)


def undo_span_corruption(enc, dec, sentinels):
  spans, current = {}, None
  for t in dec:
    if t in sentinels:
      current = spans[t] = []
    elif t != 2:
      current.append(t)
  return [x for t in enc if t != 2 for x in (spans[t] if t in sentinels else [t])]


def test_span_corruption_pipeline(corpus_dir, tok):
  rows = one_pass(config(corpus_dir, objective="span_corruption"), tok)
  assert rows["encoder_inputs"].shape[1] == T
  dec_len = rows["decoder_targets"].shape[1]
  check_layout(rows["encoder_segment_ids"], rows["encoder_positions"])
  check_layout(rows["decoder_segment_ids"], rows["decoder_positions"])
  assert (rows["decoder_loss_mask"] == (rows["decoder_segment_ids"] > 0)).all()
  segs = segments(rows, "encoder_segment_ids", "encoder_inputs")
  dec = segments({**rows, "s": rows["decoder_segment_ids"]}, "s", "decoder_inputs",
                 "decoder_targets")
  assert len(segs) == len(dec)
  rebuilt = []
  for (enc,), (dec_in, dec_tgt) in zip(segs, dec):
    assert dec_in == (tok.bos_id, *dec_tgt[:-1])
    rebuilt.append(undo_span_corruption(enc, dec_tgt, set(tok.sentinel_ids)))
  ids = doc_ids(corpus_dir, tok)
  assert collections.Counter(t for r in rebuilt for t in r) == collections.Counter(
      t for d in ids for t in d)
  joined = [" ".join(map(str, d)) for d in ids]
  assert all(any(" ".join(map(str, r)) in j for j in joined) for r in rebuilt)
  noise = sum(len(d[1]) for d in dec) - 2 * len(dec)  # minus sentinels and eos, roughly
  assert 0.08 < noise / sum(map(len, ids)) < 0.2
  assert dec_len == od.span_corruption_lengths(
      od.span_corruption_raw_length(T, 0.15, 3.0), 0.15, 3.0)[1]


def test_seq2seq_pairs(corpus_dir, tok):
  cfg = config(corpus_dir, objective="seq2seq", source=f"jsonl:{corpus_dir}/pairs.jsonl:input,"
               "target", target_seq_len=16)
  rows = one_pass(cfg, tok)
  assert rows["decoder_targets"].shape[1] == 16
  enc = segments(rows, "encoder_segment_ids", "encoder_inputs")
  dec = segments({**rows, "s": rows["decoder_segment_ids"]}, "s", "decoder_targets")
  got = collections.Counter(zip([e[0] for e in enc], [d[0] for d in dec]))
  pairs = [json.loads(x) for x in (corpus_dir / "pairs.jsonl").read_text().splitlines()]
  expected = collections.Counter(
      (tuple(tok.encode(p["input"])[: T - 1] + [tok.eos_id]),
       tuple(tok.encode(p["target"])[:15] + [tok.eos_id])) for p in pairs)
  assert got == expected


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
def test_resume_gives_the_same_batches(corpus_dir, tok, objective):
  cfg = config(corpus_dir, objective=objective, seed=3)
  n = 30  # about one epoch, so the restored run crosses an epoch boundary
  whole = make_pipeline(cfg, tok, "train", process_index=0, process_count=1)
  reference = [next(whole) for _ in range(2 * n)]
  first = make_pipeline(cfg, tok, "train", process_index=0, process_count=1)
  for _ in range(n):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = make_pipeline(cfg, tok, "train", process_index=0, process_count=1)
  resumed.set_state(state)
  for want in reference[n:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  # The data really changes from batch to batch and epoch to epoch.
  assert not np.array_equal(reference[0]["inputs"], reference[n]["inputs"])
  other = make_pipeline(config(corpus_dir, objective=objective, seed=4), tok, "train",
                        process_index=0, process_count=1)
  with pytest.raises(ValueError, match="different pipeline"):
    other.set_state(state)


def test_resume_refuses_another_worker_count(corpus_dir, tok):
  """A data position saved without workers does not restore into a pipeline with workers."""
  cfg = config(corpus_dir, seed=3)
  first = make_pipeline(cfg, tok, "train", process_index=0, process_count=1)
  next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert state["num_workers"] == 0
  other = make_pipeline(dataclasses.replace(cfg, num_workers=2), tok, "train", process_index=0,
                        process_count=1)
  try:
    with pytest.raises(ValueError, match=r"saved with data.num_workers=0, this pipeline has "
                                         r"num_workers=2: each grain worker packs its own share"):
      other.set_state(state)
  finally:
    other.close()


@pytest.mark.parametrize("split", ["validation", "train"])
def test_hosts_see_disjoint_shards(corpus_dir, tok, split):
  # Batches of one row: the train split drops a last partial batch, which would hide rows.
  cfg = config(corpus_dir, num_epochs=1, batch_size=1)

  def segs(**kw):
    rows = one_pass(cfg, tok, split, **kw)
    return collections.Counter(segments(rows, "segment_ids", "inputs"))

  one = segs()
  h0, h1 = segs(process_index=0, process_count=2), segs(process_index=1, process_count=2)
  assert not set(h0) & set(h1)
  assert h0 + h1 == one


def test_worker_processes_deliver_the_same_data(corpus_dir, tok):
  rows0 = one_pass(config(corpus_dir), tok)
  cfg = config(corpus_dir, num_workers=2)
  it = make_pipeline(cfg, tok, "validation", process_index=0, process_count=1)
  batches = list(it)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  # The same rows, but each worker packs its own share of the records: other batches, and a
  # position that means nothing to another worker count, which refuses it by name.
  single = make_pipeline(config(corpus_dir), tok, "validation", process_index=0,
                         process_count=1)
  assert not all(np.array_equal(b["inputs"], s["inputs"]) for b, s in zip(batches, single))
  with pytest.raises(ValueError, match=r"saved with data.num_workers=2, this pipeline has "
                                       r"num_workers=0.*Resume with data.num_workers=2"):
    single.set_state(state)
  rows2 = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  seg0 = collections.Counter(segments(rows0, "segment_ids", "inputs", "targets"))
  assert collections.Counter(segments(rows2, "segment_ids", "inputs", "targets")) == seg0


def test_shakespeare_end_to_end(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("shk")
  cfg = DataConfig(seq_len=1024, batch_size=8, tfds_data_dir=str(tmp / "tfds"),
                   tokenizer_cache_dir=str(tmp / "tok"),
                   tokenizer=tk.TokenizerConfig(vocab_size=1024, num_sentinels=8))
  tok = data_lib.build_tokenizer(cfg)
  assert data_lib.build_tokenizer(cfg).model_proto == tok.model_proto  # from the cache
  assert len(list((tmp / "tok").glob("*.model"))) == 1
  rows = one_pass(cfg, tok)
  assert rows["inputs"].shape[1:] == (1024,) and len(rows["inputs"]) % 8 == 0
  val = resolve_source("shakespeare", "validation", data_dir=cfg.tfds_data_dir)
  want = sum(len(ids) + 1 for ids in tok.encode([val[i]["text"] for i in range(len(val))]))
  assert rows["loss_mask"].sum() == want
  # Rows decode to text of the held-out works (chunks cut tokens, so compare whole lines).
  passages = [tok.normalize(val[i]["text"]) for i in range(len(val))]
  seg = rows["segment_ids"][0]
  text = tok.decode(rows["inputs"][0][seg == 1])
  lines = text.split("\n")[1:-1]
  assert lines and all(any(line in p for p in passages) for line in lines)


def test_import_train_reaches_its_submodules():
  """`import train; train.data.make_pipeline` (as the README writes it), loaded on first use."""
  script = ("import sys, train\n"
            "assert 'train.data' not in sys.modules and 'grain' not in sys.modules\n"
            "assert train.data.make_pipeline is sys.modules['train.data'].make_pipeline\n"
            "assert train.sources.resolve_source\n"
            "try:\n  train.nope\nexcept AttributeError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout == "module 'train' has no attribute 'nope'\n"


def test_config_and_pipeline_errors(corpus_dir, tok):
  with pytest.raises(ValueError, match=r"objective='clm'.*causal_lm"):
    DataConfig(objective="clm")
  with pytest.raises(ValueError, match="not understood"):
    DataConfig(source="parquet:/x")
  with pytest.raises(ValueError, match="mlm_probability"):
    DataConfig(mlm_probability=1.5)
  with pytest.raises(ValueError, match="input and target fields"):
    make_pipeline(config(corpus_dir, objective="seq2seq"), tok, process_index=0,
                  process_count=1)
  few = tk.train_tokenizer([(corpus_dir / "docs.txt").read_text()],
                           tk.TokenizerConfig(vocab_size=400, num_sentinels=2), use_cache=False)
  with pytest.raises(ValueError, match="2 sentinels"):
    make_pipeline(config(corpus_dir, objective="span_corruption"), few, process_index=0,
                  process_count=1)
  with pytest.raises(ValueError, match="process_index=2"):
    make_pipeline(config(corpus_dir), tok, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="gets no records"):
    make_pipeline(config(corpus_dir), tok, process_index=70, process_count=80)
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    make_pipeline(config(corpus_dir, source=f"txt:{corpus_dir}/nope.txt"), tok,
                  process_index=0, process_count=1)
