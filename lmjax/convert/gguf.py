"""GGUF files (llama.cpp's format): metadata to a `TransformerConfig`, tensors dequantized.

The format is specified in ggml's `docs/gguf.md` (https://github.com/ggml-org/ggml) and read
here with numpy alone (`read_file`: the header, metadata and tensor table in one pass over a
memory map, tens of milliseconds for SmolLM2's 49k-token vocabulary; each tensor's bytes only
when it is loaded). Only little-endian files of GGUF versions 2 and 3 exist in practice; others
are refused with a clear error. Tensor dims are listed fastest-first (`ne0, ne1`), so a Hugging
Face `[out, in]` weight is stored as `[in, out]` in GGUF terms and reads back as a numpy
`[out, in]` array: names change, layouts do not, except:

* Rotary order. llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) reorders the rows
  of `q_proj` / `k_proj` of the `llama` architecture, per head, from the half-split order of
  Hugging Face (pair i = rows (i, i + H/2)) to the interleaved order of llama.cpp's
  `LLAMA_ROPE_TYPE_NORM` (pair i = rows (2i, 2i + 1)). `unpermute_rotary` undoes it. `qwen2`
  uses `LLAMA_ROPE_TYPE_NEOX` (half-split) and is stored unpermuted.

Block formats dequantized here (ggml's `ggml-common.h` / `ggml-quants.c`, 32 values a block):

  ======  ================================  ======================================
  type    block bytes                       value j of the block
  ======  ================================  ======================================
  Q8_0    f16 d, int8 q[32]                 d * q[j]
  Q4_0    f16 d, u8 qs[16]                  d * (nibble_j - 8)
  Q4_1    f16 d, f16 m, u8 qs[16]           d * nibble_j + m
  ======  ================================  ======================================

where nibble_j is the low 4 bits of qs[j] for j < 16 and the high 4 bits of qs[j - 16]
otherwise. F32, F16 and BF16 are plain little-endian arrays. `dequantize` decodes all the
blocks of a tensor at once with numpy (each step one vectorized pass over the tensor, written
into one float32 output: under half a second for SmolLM2-135M's 135M values on a 2-core CPU).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lmjax.config import TransformerConfig
from lmjax.convert.tensors import TensorRef

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_VERSIONS = (2, 3)
_BLOCKS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 values
_QK = 32
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml's `enum ggml_type` (ggml.h): the type id stored per tensor -> its name.
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
              16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
              22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
              29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
# gguf.md `gguf_metadata_value_type`: scalar type id -> struct format (little-endian).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# GGUF tensor name (in block i) -> Hugging Face name (in layer i).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether `path` is a file starting with the GGUF magic bytes."""
  path = Path(path)
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == MAGIC


class _Cursor:
  """Reads gguf.md's little-endian values from a buffer, front to back."""

  def __init__(self, buf):
    self.buf, self.view, self.pos = buf, memoryview(buf), 0

  def scalar(self, fmt: str):
    (v,) = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += struct.calcsize(fmt)
    return v

  def string(self) -> str:
    n = self.scalar("<Q")
    end = self.pos + n
    if end > len(self.buf):
      raise ValueError(f"a string of {n} bytes runs past the end of the file")
    s = str(self.view[self.pos:end], "utf-8")
    self.pos = end
    return s

  def value(self, kind: int) -> Any:
    if kind == _STRING:
      return self.string()
    if kind in _SCALARS:
      return self.scalar(_SCALARS[kind])
    if kind != _ARRAY:
      raise ValueError(f"unknown metadata value type {kind}")
    item, n = self.scalar("<I"), self.scalar("<Q")
    if item in _SCALARS:  # one vectorized read
      a = np.frombuffer(self.buf, np.dtype(_SCALARS[item]), n, self.pos)
      self.pos += a.nbytes
      return a.tolist()
    if item == _STRING:  # tokens, merges: the hot loop of a header
      out, buf, view, pos = [], self.buf, self.view, self.pos
      unpack = struct.unpack_from
      for _ in range(n):
        (k,) = unpack("<Q", buf, pos)
        out.append(str(view[pos + 8:pos + 8 + k], "utf-8"))
        pos += 8 + k
      self.pos = pos
      return out
    return [self.value(item) for _ in range(n)]


def read_file(path: str | os.PathLike) -> tuple[dict[str, Any], list[tuple], int]:
  """The metadata and tensor table of a GGUF file (gguf.md), without reading any tensor.

  Returns:
    `(metadata, tensors, data_start)`: key -> Python value (str, int, float, bool, or a list);
    per tensor `(name, numpy shape (GGUF dims reversed), type name or "type N", offset)`, the
    offset counted from `data_start`, the aligned start of the tensor data.

  Raises:
    ValueError: not a GGUF file, an unsupported version or byte order, or a damaged header.
  """
  path = Path(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if head[:4] != MAGIC:
      raise ValueError(f"{str(path)!r} is not a GGUF file: it starts with {head[:4]!r}, not "
                       f"{MAGIC!r} (lmjax loads GGUF files and Hugging Face folders of "
                       "config.json + *.safetensors)")
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  try:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
      swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
      what = ("a big-endian file" if swapped in SUPPORTED_VERSIONS
              else f"GGUF version {version}")
      raise ValueError(f"{str(path)!r} is {what}; lmjax reads little-endian GGUF versions "
                       f"{list(SUPPORTED_VERSIONS)}")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
      key = cur.string()
      meta[key] = cur.value(cur.scalar("<I"))
    tensors = []
    for _ in range(n_tensors):
      name = cur.string()
      dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
      kind, offset = cur.scalar("<I"), cur.scalar("<Q")
      tensors.append((name, tuple(reversed(dims)), GGML_TYPES.get(kind, f"type {kind}"),
                      offset))
    align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    return meta, tensors, -(-cur.pos // align) * align
  except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
    if isinstance(e, ValueError) and str(path) in str(e):
      raise
    raise ValueError(f"{str(path)!r} is not a valid GGUF file: its header is damaged "
                     f"({type(e).__name__}: {e})") from e
  finally:
    cur.view.release()
    del cur
    try:
      buf.close()
    except BufferError:  # an array still views it (an error's traceback): closed when freed
      pass


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
  """float32 values `[*shape]` of raw GGUF tensor bytes (module docstring), vectorized.

  Args:
    data: the tensor's bytes (any dtype/shape; reinterpreted as a flat little-endian buffer).
    qtype: one of `SUPPORTED_TYPES`.
    shape: the numpy shape (GGUF dims reversed); its last dim is a multiple of 32 when quantized.
  """
  if qtype not in SUPPORTED_TYPES:
    raise ValueError(f"GGUF tensor type {qtype!r} is not supported; supported: "
                     f"{list(SUPPORTED_TYPES)}")
  raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
  n = int(np.prod(shape, dtype=np.int64))
  if qtype == "F32":
    out = raw.view("<f4").astype(np.float32)
  elif qtype == "F16":
    out = raw.view("<f2").astype(np.float32)
  elif qtype == "BF16":
    out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
  else:
    if n % _QK or raw.size % _BLOCKS[qtype]:
      raise ValueError(f"{qtype} tensor of shape {shape} is not a whole number of 32-blocks")
    blocks = raw.reshape(-1, _BLOCKS[qtype])
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # [blocks, 1]
    out = np.empty((blocks.shape[0], _QK), np.float32)
    if qtype == "Q8_0":
      np.multiply(blocks[:, 2:].view(np.int8), d, out=out)
    else:
      qs = blocks[:, 2:] if qtype == "Q4_0" else blocks[:, 4:]
      np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")  # nibbles, in place
      np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
      if qtype == "Q4_0":
        out -= 8.0
        out *= d
      else:
        out *= d
        out += blocks[:, 2:4].copy().view("<f2").astype(np.float32)
  out = out.reshape(-1)
  if out.size != n:
    raise ValueError(f"{qtype} data holds {out.size} values; shape {shape} needs {n}")
  return out.reshape(shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's `permute` of q/k rows (interleaved -> half-split rotary pairs).

  Args:
    w: `[n_head * H, ...]` rows as stored in a `llama` GGUF (weight `[NH, D]` or bias `[NH]`).
    n_head: heads of this projection (query heads for q, kv heads for k).
  """
  h = w.shape[0] // n_head
  return w.reshape(n_head, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _short(x: float) -> float:
  """A float32 metadata value as its shortest decimal (9.99999974e-06 -> 1e-05): the same
  float32, and the number the model's own config.json states."""
  return float(str(np.float32(x)))


class GGUFCheckpoint:
  """One GGUF file: its metadata, a `TransformerConfig`, and tensors in the HF layout.

  Attributes:
    path: the file.
    metadata: key -> value of every metadata field (large arrays included).
    architecture: `general.architecture`.
    config: the `TransformerConfig` the metadata describes (float32).
    tensors: Hugging Face name -> `TensorRef` (dequantized, rotary order undone on `load`).
  """

  def __init__(self, path: str | os.PathLike):
    path = Path(path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    self.path = path
    self.metadata, table, self._data_start = read_file(path)
    self.architecture = self.metadata.get("general.architecture")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"{str(path)!r} holds a {self.architecture!r} model; supported GGUF "
                       f"architectures: {list(SUPPORTED_ARCHITECTURES)}")
    raw = {name: (shape, qtype, offset) for name, shape, qtype, offset in table}
    self._memmap = None
    self.config = self._config(raw)
    self.tensors = self._tensors(raw)

  def _bytes(self, offset: int, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The stored bytes of one tensor (a view of the file's memory map)."""
    if self._memmap is None:
      self._memmap = np.memmap(self.path, np.uint8, mode="r")
    n = int(np.prod(shape, dtype=np.int64))
    size = {"F32": 4, "F16": 2, "BF16": 2}.get(qtype)
    nbytes = n * size if size else n // _QK * _BLOCKS[qtype]
    start = self._data_start + offset
    if start + nbytes > self._memmap.size:
      raise ValueError(f"{str(self.path)!r} is truncated: a {qtype} tensor {shape} at byte "
                       f"{start} needs {nbytes} bytes, the file has {self._memmap.size}")
    return self._memmap[start:start + nbytes]

  def _key(self, name: str, default: Any = None, required: bool = False) -> Any:
    key = f"{self.architecture}.{name}"
    if key not in self.metadata:
      if required:
        raise ValueError(f"{str(self.path)!r} lacks the metadata key {key!r}")
      return default
    v = self.metadata[key]
    if isinstance(v, list):  # per-layer values (some GGUFs): only uniform ones are supported
      if len(set(v)) != 1:
        raise ValueError(f"{str(self.path)!r}: {key} varies per layer ({v[:8]}...); only "
                         "uniform layers are supported")
      v = v[0]
    return v

  def _config(self, raw: dict) -> TransformerConfig:
    where = repr(str(self.path))
    if (self._key("expert_count") or 0) > 0:
      raise ValueError(f"{where} is a mixture-of-experts model ({self.architecture}.expert_count"
                       f"={self._key('expert_count')}); only dense models are supported")
    scaling = self._key("rope.scaling.type")
    factor = self._key("rope.scaling.factor", 1.0)
    if (scaling not in (None, "none") and factor != 1.0) or "rope_freqs.weight" in raw:
      raise ValueError(f"{where} uses rotary scaling ({scaling!r}, factor {factor}"
                       f"{', rope_freqs.weight' if 'rope_freqs.weight' in raw else ''}); only "
                       "plain rotary positions are supported")
    if self._key("attention.sliding_window"):
      raise ValueError(f"{where} uses sliding-window attention "
                       f"({self._key('attention.sliding_window')}); not supported")
    d = int(self._key("embedding_length", required=True))
    n = int(self._key("attention.head_count", required=True))
    k = int(self._key("attention.head_count_kv", n))
    h = int(self._key("attention.key_length", d // n))
    if int(self._key("attention.value_length", h)) != h:
      raise ValueError(f"{where}: value_length != key_length; only equal head dims are "
                       "supported")
    rot = int(self._key("rope.dimension_count", h))
    if rot != h:
      raise ValueError(f"{where}: rotary over {rot} of {h} head dims; only full rotary is "
                       "supported")
    emb = raw.get("token_embd.weight")
    if emb is None:
      raise ValueError(f"{where} lacks the tensor 'token_embd.weight'")
    vocab = int(self._key("vocab_size", emb[0][0]))  # its numpy shape: [V, D]
    return TransformerConfig(
        vocab_size=vocab, model_dim=d, num_decoder_layers=int(self._key("block_count",
                                                                        required=True)),
        num_heads=n, num_kv_heads=k, head_dim=h,
        ffn_dim=int(self._key("feed_forward_length", required=True)), activation="swiglu",
        norm="rmsnorm", norm_placement="pre",
        norm_eps=_short(self._key("attention.layer_norm_rms_epsilon", 1e-5)),
        position="rotary", rope_theta=_short(self._key("rope.freq_base", 10_000.0)),
        max_len=int(self._key("context_length", 2048)), use_bias=False,
        qkv_bias="blk.0.attn_q.bias" in raw, tie_embeddings="output.weight" not in raw)

  def _tensors(self, raw: dict) -> dict[str, TensorRef]:
    cfg = self.config
    out = {}
    for name, (shape, qtype, offset) in raw.items():
      hf = _TOP_NAMES.get(name)
      if hf is None and name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        hf = f"model.layers.{i}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES else None
      if hf is None:
        hf = name  # unknown: reported by the layout check as unsupported
      if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {name!r} in {str(self.path)!r} is {qtype}; supported tensor "
                         f"types: {list(SUPPORTED_TYPES)}")
      if qtype in _BLOCKS and (not shape or shape[-1] % _QK):
        raise ValueError(f"{qtype} tensor {name!r} in {str(self.path)!r} has shape {shape}; "
                         "its rows must be whole 32-value blocks")
      heads = None
      if self.architecture == "llama":
        if ".attn_q." in name:
          heads = cfg.num_heads
        elif ".attn_k." in name:
          heads = cfg.resolved_num_kv_heads

      def load(qtype=qtype, shape=shape, offset=offset, heads=heads):
        w = dequantize(self._bytes(offset, qtype, shape), qtype, shape)
        return w if heads is None else unpermute_rotary(w, heads)

      out[hf] = TensorRef(hf, shape, qtype, str(self.path), load)
    return out

  def tokenizer_metadata(self) -> dict[str, Any]:
    """The `tokenizer.*` metadata fields, keys without the `tokenizer.` prefix."""
    return {k[len("tokenizer."):]: v for k, v in self.metadata.items()
            if k.startswith("tokenizer.")}
