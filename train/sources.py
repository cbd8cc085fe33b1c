"""Random-access text sources, named by a spec string.

Spec grammar (``FIELDS`` is one field name, or ``INPUT,TARGET`` for seq2seq pairs):

==========================================  ===================================================
spec                                        reads
==========================================  ===================================================
``shakespeare``                             the embedded corpus (`train.shakespeare_tfds`),
                                            prepared in `data_dir` on first use
``tfds:NAME[:VERSION][:FIELDS]``            a prepared tfds dataset in `data_dir` (a local
                                            folder or a gs:// bucket), e.g. ``tfds:lm1b``;
                                            NAME may carry a config, ``wmt14_translate/de-en``
``txt:PATH[:MODE]``                         text files (PATH may be a glob); MODE is
                                            ``paragraphs`` (blank-line separated, default),
                                            ``lines`` or ``file`` (one document per file)
``jsonl:PATH[:FIELDS]``                     JSON lines; FIELDS defaults to ``text``
==========================================  ===================================================

PATH may contain ``{split}``, replaced by the split name (``train.jsonl``, ``validation.jsonl``);
without it, every split reads the same files. tfds datasets without a ``validation`` split use
``test`` for it. Local files are read into memory.

Every source is a sequence of dicts of `str`: ``{"text": ...}``, or ``{"input": ...,
"target": ...}`` when two fields are named. A source that is missing or empty raises an error
saying what was looked for and where.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train import jsonl

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
TXT_MODES = ("paragraphs", "lines", "file")
KINDS = ("shakespeare", "tfds", "txt", "jsonl")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed spec string (see the module docstring)."""

  kind: str
  location: str = ""
  fields: tuple[str, ...] = ("text",)
  mode: str = "paragraphs"
  version: str | None = None

  @classmethod
  def parse(cls, spec: str) -> SourceSpec:
    kind, _, rest = spec.partition(":")
    if kind == "shakespeare" and not rest:
      return cls("shakespeare", "lmjax_shakespeare")
    if kind not in KINDS[1:] or not rest:
      raise ValueError(
          f"source spec {spec!r} not understood; allowed: 'shakespeare', "
          "'tfds:NAME[:VERSION][:FIELDS]', 'txt:PATH[:MODE]', 'jsonl:PATH[:FIELDS]'"
      )
    if kind == "tfds":
      parts = rest.split(":")
      fields = ("text",)
      if len(parts) > 1 and not _VERSION.match(parts[-1]):
        fields = tuple(parts.pop().split(","))
      version = parts.pop() if len(parts) > 1 and _VERSION.match(parts[-1]) else None
      return cls("tfds", ":".join(parts), fields, version=version)
    # A final ':OPTION' holds no '/', so 'gs://bucket/f.jsonl' stays whole.
    head, sep, option = rest.rpartition(":")
    if not (sep and head and "/" not in option):
      return cls(kind, rest)
    if kind == "txt":
      if option not in TXT_MODES:
        raise ValueError(f"source spec {spec!r}: txt MODE {option!r}; allowed: {TXT_MODES}")
      return cls("txt", head, mode=option)
    return cls("jsonl", head, tuple(option.split(",")))

  def __post_init__(self):
    if not 1 <= len(self.fields) <= 2 or not all(self.fields):
      raise ValueError(f"fields={self.fields}: name one text field, or 'INPUT,TARGET'")

  @property
  def keys(self) -> tuple[str, ...]:
    """The keys of each record: ('text',) or ('input', 'target')."""
    return ("text",) if len(self.fields) == 1 else ("input", "target")


class RecordSource(Sequence):
  """An in-memory list of records, with a description for messages."""

  def __init__(self, records: list[dict[str, str]], description: str):
    self._records = records
    self.description = description

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i):
    return self._records[i]


class TfdsTextSource(Sequence):
  """Reads text features of a tfds `data_source` as `str` records."""

  def __init__(self, data_source, fields: tuple[str, ...], keys: tuple[str, ...], description):
    self._ds = data_source
    self._fields = fields
    self._keys = keys
    self.description = description

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i):
    row = self._ds[i]
    return {k: _to_str(row[f]) for k, f in zip(self._keys, self._fields)}


def _to_str(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if hasattr(x, "item"):
    x = x.item()
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
  return str(x)


def resolve_source(
    spec: str | SourceSpec, split: str, *, data_dir: str | None = None
) -> RecordSource | TfdsTextSource:
  """The records of `split` of the source named by `spec`.

  Args:
    spec: a spec string or a parsed `SourceSpec`.
    split: "train", "validation", ... (for tfds, any split string it accepts).
    data_dir: the tfds data folder (default: tfds's, `~/tensorflow_datasets`).

  Returns:
    A random-access sequence of records (dicts of str); never empty.
  """
  parsed = SourceSpec.parse(spec) if isinstance(spec, str) else spec
  text = spec if isinstance(spec, str) else str(parsed)
  if parsed.kind == "shakespeare":
    from train import shakespeare_tfds  # Deferred: imports tensorflow_datasets.

    shakespeare_tfds.prepare(data_dir)
    source = _tfds_source(parsed, split, data_dir, text)
  elif parsed.kind == "tfds":
    source = _tfds_source(parsed, split, data_dir, text)
  else:
    source = _file_source(parsed, split, text)
  if len(source) == 0:
    raise ValueError(f"source {text!r} split {split!r} has no records: {source.description}")
  return source


def _tfds_source(parsed: SourceSpec, split: str, data_dir, spec: str) -> TfdsTextSource:
  import tensorflow_datasets as tfds  # Deferred: slow import.

  name = parsed.location + (f":{parsed.version}" if parsed.version else "")
  where = f"data_dir={str(data_dir) if data_dir else tfds.core.constants.DATA_DIR!r}"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError, ...).
    raise ValueError(
        f"source {spec!r}: tfds dataset {name!r} is not known to tensorflow_datasets and not "
        f"found in {where} ({type(e).__name__}: {str(e).splitlines()[0]})"
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"source {spec!r}: tfds dataset {name!r} is not prepared in {where} (looked in "
        f"{builder.data_dir}); prepare it there first (`tfds build {parsed.location} "
        f"--data_dir=...`)"
    )
  splits = builder.info.splits
  base = re.split(r"[\[+]", split)[0]
  if base not in splits and base == "validation" and "test" in splits:
    split = "test" + split[len(base) :]
  elif base not in splits:
    raise ValueError(f"source {spec!r}: no split {split!r}; it has {sorted(splits)}")
  features = builder.info.features
  missing = [f for f in parsed.fields if f not in features]
  if missing:
    raise ValueError(f"source {spec!r}: no feature {missing}; features are {list(features)}")
  ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  description = f"tfds {name} split {split} in {builder.data_dir}"
  return TfdsTextSource(ds, parsed.fields, parsed.keys, description)


def _file_source(parsed: SourceSpec, split: str, spec: str) -> RecordSource:
  pattern = str(Path(parsed.location.replace("{split}", split)).expanduser())
  if "{split}" not in parsed.location and split != "train":
    logging.warning("source %r has no {split} in its path: split %r reads the same files as "
                    "'train'", spec, split)
  paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
  paths = [p for p in paths if Path(p).is_file()]
  if not paths:
    raise FileNotFoundError(f"source {spec!r}: no file matches {pattern!r}")
  records = []
  for path in paths:
    if parsed.kind == "txt":
      records += [{"text": d} for d in _split_text(Path(path).read_text("utf-8"), parsed.mode)]
    else:
      records += _read_jsonl(path, parsed, spec)
  return RecordSource(records, f"{len(paths)} file(s) matching {pattern!r}")


def _split_text(text: str, mode: str) -> list[str]:
  if mode == "file":
    docs = [text]
  elif mode == "lines":
    docs = text.split("\n")
  else:
    docs = re.split(r"\n[^\S\n]*\n", text)
  return [d.strip("\n") for d in docs if d.strip()]


def _read_jsonl(path: str, parsed: SourceSpec, spec: str) -> list[dict[str, str]]:
  try:
    rows = jsonl.read_objects(path, allow_empty=True)
  except ValueError as e:
    raise ValueError(f"source {spec!r}: {e}") from e
  records = []
  for where, row in rows:
    if any(f not in row for f in parsed.fields):
      raise ValueError(f"source {spec!r}: {where} lacks field(s) {parsed.fields}: {list(row)}")
    rec = {k: str(row[f]) for k, f in zip(parsed.keys, parsed.fields)}
    if any(v.strip() for v in rec.values()):
      records.append(rec)
  return records
