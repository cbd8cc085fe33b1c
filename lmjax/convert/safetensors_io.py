"""Reading and writing the safetensors format with numpy alone (no pickle, no torch).

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian u64
`N`, then `N` bytes of UTF-8 JSON mapping each tensor name to
`{"dtype": "F32"|"F16"|"BF16"|..., "shape": [...], "data_offsets": [begin, end]}` (offsets into
the byte buffer that follows the header; an optional `"__metadata__"` entry maps str to str),
then the buffer, row-major little-endian. Reading memory-maps the file, so a tensor's bytes are
only read when it is loaded. bfloat16 goes through `ml_dtypes` (a JAX dependency).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from lmjax.convert.tensors import TensorRef

# safetensors dtype name -> numpy dtype (little-endian).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
  """The JSON header of a safetensors file and the offset where its data starts.

  Raises:
    ValueError: the file is not safetensors (too short, header length or JSON invalid).
  """
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{str(path)!r} is not a safetensors file: {size} bytes, shorter than "
                       "the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, _MAX_HEADER):
      raise ValueError(f"{str(path)!r} is not a safetensors file: its first 8 bytes give a header "
                       f"of {n} bytes but the file has {size} (safetensors: u64 header length, "
                       "JSON header, data)")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(
        f"{str(path)!r} is not a safetensors file: its header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{str(path)!r} is not a safetensors file: header is not a JSON object")
  return header, 8 + n


def open_file(path: str | os.PathLike) -> dict[str, TensorRef]:
  """Lazily readable tensors of one safetensors file, by name.

  Each `TensorRef.load()` returns a read-only memory-mapped numpy array in the stored dtype.

  Raises:
    ValueError: not a safetensors file, or a tensor whose dtype or offsets are invalid.
  """
  path = Path(path)
  header, start = read_header(path)
  size = path.stat().st_size
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dt = info.get("dtype")
    if dt not in DTYPES:
      raise ValueError(f"tensor {name!r} in {str(path)!r} has dtype {dt!r}; supported: "
                       f"{sorted(DTYPES)}")
    shape = tuple(int(s) for s in info["shape"])
    begin, end = (int(o) for o in info["data_offsets"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
    if end - begin != nbytes or start + end > size:
      raise ValueError(f"tensor {name!r} in {str(path)!r}: offsets [{begin}, {end}) do not hold "
                       f"{dt} {shape} ({nbytes} bytes) inside a {size}-byte file")

    def load(path=path, offset=start + begin, dtype=DTYPES[dt], shape=shape):
      if not shape or 0 in shape:
        return np.zeros(shape, dtype)
      return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    out[name] = TensorRef(name, shape, dt, str(path), load)
  return out


def save_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name -> numpy array) as one safetensors file, in name order.

  Raises:
    ValueError: an array's dtype has no safetensors name.
  """
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    dt = _NAMES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
    if dt is None:
      raise ValueError(f"tensor {name!r} has dtype {a.dtype}; safetensors supports "
                       f"{sorted(DTYPES)}")
    a = np.ascontiguousarray(a.astype(DTYPES[dt], copy=False))
    header[name] = {"dtype": dt, "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)
