"""The converted-weights cache: a GGUF file's params, once converted, kept for the next load.

What: the params `load_pretrained` makes from a GGUF file (dequantized, transposed, cast and,
when asked, packed by `lmjax.packed`), so a later load reads them back instead of converting
again. Hugging Face folders are not cached (their tensors are already floats).

Where: one safetensors file per entry (written with `lmjax.convert.safetensors_io`; never pickle,
and no pickle is ever read) in `$LMJAX_WEIGHTS_CACHE` or `cache_root() / "weights"`
(`weights_cache_folder`).

The key: the file name is the GGUF file's SHA-256, the param dtype, the packed format (or raw),
the layer layout (scanned or unrolled) and a format version. The file also records the whole
config it was made for, and is used only for that config (else converted afresh and rewritten).

The bound: `$LMJAX_WEIGHTS_CACHE_MAX_BYTES` (default 4 GiB); past it, the least recently used
files (by modification time, touched on each read) are deleted after a write.

The opt-out: `load_pretrained(weights_cache=False)`, or `$LMJAX_WEIGHTS_CACHE=0` (which also
wins over `weights_cache=True`). A file that cannot be read or written is warned about and
passed by, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax import packed as packed_lib
from lmjax.compilation_cache import cache_root, folder_from_env
from lmjax.config import TransformerConfig
from lmjax.convert import safetensors_io

WEIGHTS_CACHE_ENV = "LMJAX_WEIGHTS_CACHE"
WEIGHTS_CACHE_MAX_BYTES_ENV = "LMJAX_WEIGHTS_CACHE_MAX_BYTES"
WEIGHTS_CACHE_MAX_BYTES = 4 * 2**30
_CACHE_FORMAT = "1"  # raise when what a cached file holds changes


def weights_cache_folder(setting: bool | str | os.PathLike | None) -> Path | None:
  """The cache folder `load_pretrained(weights_cache=setting)` uses, or None when the cache is
  off: False: off; a path: there; True: `$LMJAX_WEIGHTS_CACHE` or `cache_root() / "weights"`
  (off when the variable is 0); None: only where `$LMJAX_WEIGHTS_CACHE` is set."""
  if setting is False:
    return None
  if setting is None and not os.environ.get(WEIGHTS_CACHE_ENV, "").strip():
    return None
  if setting is None or setting is True:
    return folder_from_env(WEIGHTS_CACHE_ENV, cache_root() / "weights")
  return Path(setting).expanduser()


def load_or_convert(folder: Path | None, source: Path, cfg: TransformerConfig,
                    packed: str | None, convert: Callable[[], Any]):
  """The params of GGUF file `source` for `cfg` (raw, or packed in format `packed`): read from
  the cache in `folder` when there, else `convert()`ed and written there. `folder` None: no
  cache, just `convert()`."""
  if folder is None:
    return convert()
  entry = folder / _cache_name(source, cfg, packed)
  params = _read_cached(entry, cfg, packed)
  if params is None:
    params = convert()
    _write_cached(entry, cfg, params)
  return params


def file_sha256(path: str | os.PathLike) -> str:
  """The SHA-256 of a file's bytes, in hex."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_name(path: Path, cfg: TransformerConfig, packed: str | None) -> str:
  layers = "scan" if cfg.scan_layers else "unrolled"
  return (f"{file_sha256(path)}-{cfg.param_dtype}-{packed or 'raw'}-{layers}"
          f"-v{_CACHE_FORMAT}.safetensors")


def _config_text(cfg: TransformerConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)


def _read_cached(entry: Path, cfg: TransformerConfig, packed: str | None):
  """The params a cache file holds (placed on the default device), or None on a miss."""
  if not entry.is_file():
    return None
  try:
    header, _ = safetensors_io.read_header(entry)
    meta = header.get("__metadata__", {})
    if meta.get("config") != _config_text(cfg) or meta.get("packed_format", "") != (packed or ""):
      return None  # made for another config (an older lmjax): converted afresh, rewritten
    refs = safetensors_io.open_file(entry)
    flat = jax.block_until_ready({tuple(k.split("/")): jax.device_put(r.load())
                                  for k, r in refs.items()})
    os.utime(entry)  # most recently used
  except (OSError, ValueError, KeyError) as e:
    warnings.warn(f"lmjax weights cache: cannot read {str(entry)!r} ({e}); converting afresh",
                  stacklevel=4)
    return None
  tree = unflatten_dict(flat)
  if packed is None:
    return tree
  layout = tuple((tuple(p), k, lead, tuple(shape))
                 for p, k, lead, shape in json.loads(meta["packed"]))
  return packed_lib.PackedParams(tree, packed, layout)


def _write_cached(entry: Path, cfg: TransformerConfig, params) -> None:
  """Writes `params` (raw or packed) to `entry` (atomically), then keeps the folder within its
  size bound; a failure is a warning."""
  meta = {"format": _CACHE_FORMAT, "config": _config_text(cfg), "packed_format": ""}
  tree = params
  if isinstance(params, packed_lib.PackedParams):
    tree = params.tree
    meta["packed_format"] = params.fmt
    meta["packed"] = json.dumps([[list(p), k, lead, list(shape)]
                                 for p, k, lead, shape in params.packed])
  flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}
  partial = entry.with_name(f"{entry.name}.{os.getpid()}.partial")
  try:
    entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    safetensors_io.save_file(partial, flat, meta)
    os.replace(partial, entry)
    _evict(entry.parent, keep=entry)
  except OSError as e:
    partial.unlink(missing_ok=True)
    warnings.warn(f"lmjax weights cache: cannot write {str(entry)!r} ({e})", stacklevel=4)


def _evict(folder: Path, keep: Path) -> None:
  """Deletes the least recently used cache files while the folder is over its bound."""
  text = os.environ.get(WEIGHTS_CACHE_MAX_BYTES_ENV, "").strip()
  limit = int(text) if text.isdigit() else WEIGHTS_CACHE_MAX_BYTES
  files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
  total = sum(f.stat().st_size for f in files)
  for f in files:
    if total <= limit:
      break
    if f != keep:
      total -= f.stat().st_size
      f.unlink(missing_ok=True)
