"""Tests of the embedded corpus, its tfds builder, and the text sources with their errors."""

import collections
import gzip
import json
import logging
import re
import sys

import pytest
import tensorflow_datasets as tfds

from train import shakespeare_tfds as shk
from train.sources import SourceSpec, resolve_source


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  shk.prepare(data_dir)
  return data_dir


def _read(data_dir, split):
  ds = tfds.data_source(shk.DATASET_NAME, split=split, data_dir=data_dir, download=False)
  return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in ds[i].items()}
          for i in range(len(ds))]


TFDS_NOISE = ("Downloading and preparing", "downloaded and prepared", "Generating", "Shuffling",
              "dataset_info.json", "examples/s")


def test_first_preparation_says_one_line_of_ours(tmp_path, capfd, caplog):
  """The first use prepares the corpus with one line of ours; tfds's own output (its download
  size line, progress bars, an absl warning about dataset_info.json) only when verbose."""
  capfd.readouterr()
  with caplog.at_level(logging.WARNING):
    resolve_source("shakespeare", "train", data_dir=tmp_path / "quiet")
  out, err = capfd.readouterr()
  where = tmp_path / "quiet" / shk.DATASET_NAME / "1.0.0"
  assert out == f"preparing the embedded Shakespeare corpus (once) in {where} ...\n"
  assert err == ""
  assert not [r for r in caplog.records if r.name == "absl"]
  assert len(resolve_source("shakespeare", "validation", data_dir=tmp_path / "quiet")) > 0
  assert capfd.readouterr() == ("", "")  # Prepared: nothing more is said.
  # Verbose (python -m train.pretrain -v turns on INFO logging of `train`): tfds's output.
  train_log = logging.getLogger("train")
  level = train_log.level
  train_log.setLevel(logging.INFO)
  try:
    shk.prepare(tmp_path / "loud")
  finally:
    train_log.setLevel(level)
  out, err = capfd.readouterr()
  assert "Downloading and preparing dataset" in out and "preparing the embedded" not in out
  assert "Shuffling" in err


def test_corpus_is_packaged():
  with gzip.open(shk.CORPUS_PATH, "rt") as f:
    text = f.read()
  assert len(text) == 5_055_611
  assert text.startswith("ALL'S WELL THAT ENDS WELL")


def test_builder_prepares_both_splits_without_tensorflow(tfds_dir):
  assert "tensorflow" not in sys.modules  # array_record needs no TensorFlow
  train, val = _read(tfds_dir, "train"), _read(tfds_dir, "validation")
  assert train and val
  train_works = {r["work"] for r in train}
  val_works = {r["work"] for r in val}
  assert not train_works & val_works

  # The works, found independently: the README says they are joined by two blank lines.
  corpus = shk.read_corpus()
  blocks = corpus.split("\n\n\n")
  titles = {b.split("\n", 1)[0].strip() for b in blocks}
  assert len(blocks) == 42 and train_works | val_works == titles
  assert 2 <= len(val_works) <= 5
  val_chars = sum(len(b) for b in blocks if b.split("\n", 1)[0] in val_works)
  assert 0.04 < val_chars / len(corpus) < 0.10

  # Every paragraph of the corpus is in exactly one example, in its own work.
  def paragraphs(text):
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]

  got = collections.Counter(p for r in train + val for p in paragraphs(r["text"]))
  assert got == collections.Counter(paragraphs(corpus))
  for r in val[:20]:
    block = next(b for b in blocks if b.startswith(r["work"]))
    assert r["text"] in block


def test_passages_respect_the_limit(tfds_dir):
  rows = _read(tfds_dir, "validation")
  long_paragraph = max(len(p) for r in rows for p in r["text"].split("\n\n"))
  assert all(len(r["text"]) <= max(shk.PASSAGE_CHARS, long_paragraph) for r in rows)
  assert max(len(r["text"]) for r in rows) > shk.PASSAGE_CHARS // 2


def test_shakespeare_and_tfds_specs(tfds_dir):
  val = resolve_source("shakespeare", "validation", data_dir=tfds_dir)
  same = resolve_source("tfds:lmjax_shakespeare:1.0.0:text", "validation", data_dir=tfds_dir)
  assert len(val) == len(same) == len(_read(tfds_dir, "validation"))
  assert val[3] == same[3] == {"text": _read(tfds_dir, "validation")[3]["text"]}
  pairs = resolve_source("tfds:lmjax_shakespeare:work,text", "train", data_dir=tfds_dir)
  assert set(pairs[0]) == {"input", "target"} and pairs[0]["target"].strip()


def test_text_and_jsonl_sources(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird\n")
  assert [r["text"] for r in resolve_source(f"txt:{tmp_path}/a.txt", "train")] == [
      "first doc\nstill first", "second doc", "third"]
  assert len(resolve_source(f"txt:{tmp_path}/a.txt:lines", "train")) == 4
  assert len(resolve_source(f"txt:{tmp_path}/*.txt:file", "train")) == 1
  for split in ("train", "validation"):
    rows = [{"q": f"{split} {i}", "a": str(i), "other": 1} for i in range(3)]
    (tmp_path / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
  src = resolve_source(f"jsonl:{tmp_path}/{{split}}.jsonl:q", "validation")
  assert [r["text"] for r in src] == ["validation 0", "validation 1", "validation 2"]
  src = resolve_source(f"jsonl:{tmp_path}/train.jsonl:q,a", "validation")
  assert src[2] == {"input": "train 2", "target": "2"}


def test_spec_parsing():
  assert SourceSpec.parse("tfds:lm1b") == SourceSpec("tfds", "lm1b")
  assert SourceSpec.parse("tfds:wmt/de-en:1.0.0:de,en") == SourceSpec(
      "tfds", "wmt/de-en", ("de", "en"), version="1.0.0")
  assert SourceSpec.parse("jsonl:gs://b/f.jsonl") == SourceSpec("jsonl", "gs://b/f.jsonl")
  assert SourceSpec.parse("jsonl:/d/f.jsonl:text").fields == ("text",)
  assert SourceSpec.parse("txt:/d/f.txt:lines").mode == "lines"
  with pytest.raises(ValueError, match="not understood.*allowed"):
    SourceSpec.parse("csv:/d/f.csv")
  with pytest.raises(ValueError, match="MODE 'words'"):
    SourceSpec.parse("txt:/d/f.txt:words")


def test_errors_say_what_was_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/missing.txt")):
    resolve_source(f"txt:{tmp_path}/missing.txt", "train")
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"no records.*empty\.jsonl"):
    resolve_source(f"jsonl:{tmp_path}/empty.jsonl", "train")
  (tmp_path / "blank.txt").write_text("  \n\n \n")
  with pytest.raises(ValueError, match=r"no records.*blank\.txt"):
    resolve_source(f"txt:{tmp_path}/blank.txt", "train")
  (tmp_path / "f.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"f\.jsonl:1 lacks field.*text.*body"):
    resolve_source(f"jsonl:{tmp_path}/f.jsonl", "train")
  with pytest.raises(ValueError, match=r"'no_such_dataset_xyz' is not known.*" + re.escape(
      str(tmp_path))):
    resolve_source("tfds:no_such_dataset_xyz", "train", data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match=r"'lm1b' is not prepared.*" + re.escape(
      str(tmp_path))):
    resolve_source("tfds:lm1b", "train", data_dir=tmp_path)


def test_tfds_split_and_feature_errors(tfds_dir):
  with pytest.raises(ValueError, match=r"no split 'dev'.*train.*validation"):
    resolve_source("shakespeare", "dev", data_dir=tfds_dir)
  with pytest.raises(ValueError, match=r"no feature \['body'\].*text"):
    resolve_source("tfds:lmjax_shakespeare:body", "train", data_dir=tfds_dir)
