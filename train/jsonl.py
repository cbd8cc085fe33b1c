"""JSON Lines files as the data readers see them: one object per line, each named `path:line`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def read_objects(path: str | Path, error: type[Exception] = ValueError, *,
                 allow_empty: bool = False, kind: str = "data") -> list[tuple[str, dict]]:
  """The objects of a `.jsonl` (or `.jsonl.gz`) file, blank lines skipped.

  Args:
    path: the file.
    error: the exception class raised for a bad line (a reader's own `ValueError` subclass).
    allow_empty: return `[]` for a file without rows (the caller reports it) instead of raising.
    kind: what the file holds, for the missing-file message ("no {kind} file ...").

  Returns:
    `[(where, row)]` with `where` = "path:line" for error messages downstream.

  Raises:
    FileNotFoundError: no such file. `error`: a line that is not JSON, or not an object, or
    a file without rows; the message names `path:line`.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no {kind} file {str(path)!r}")
  opener = gzip.open if path.suffix == ".gz" else open
  rows = []
  with opener(path, "rt", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{where}: not a JSON line ({e})") from e
      if not isinstance(row, dict):
        raise error(f"{where}: a row must be a JSON object, got {type(row).__name__}")
      rows.append((where, row))
  if not rows and not allow_empty:
    raise error(f"{path} holds no rows")
  return rows
