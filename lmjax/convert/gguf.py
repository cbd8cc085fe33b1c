"""GGUF files (llama.cpp's format): metadata to a `TransformerConfig`, tensors dequantized.

The format is specified in ggml's `docs/gguf.md` (https://github.com/ggml-org/ggml); files are
read with the `gguf` package (`gguf.GGUFReader`, memory-mapped). Tensor dims are listed
fastest-first (`ne0, ne1`), so a Hugging Face `[out, in]` weight is stored as `[in, out]` in
GGUF terms and reads back as a numpy `[out, in]` array: names change, layouts do not, except:

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
otherwise. F32, F16 and BF16 are plain little-endian arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lmjax.config import TransformerConfig
from lmjax.convert.tensors import TensorRef

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_BLOCKS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 values
_QK = 32
MAGIC = b"GGUF"

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


def _gguf():
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
  return gguf


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether `path` is a file starting with the GGUF magic bytes."""
  path = Path(path)
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == MAGIC


def dequantize_numpy(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
  """float32 values `[*shape]` of raw GGUF tensor bytes, decoded with numpy (module docstring).

  Args:
    data: the tensor's bytes (any dtype/shape; reinterpreted as a flat little-endian buffer).
    qtype: one of `SUPPORTED_TYPES`.
    shape: the numpy shape (GGUF dims reversed); its last dim is a multiple of 32 when quantized.
  """
  raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
  n = int(np.prod(shape, dtype=np.int64))
  if qtype == "F32":
    out = raw.view("<f4")
  elif qtype == "F16":
    out = raw.view("<f2").astype(np.float32)
  elif qtype == "BF16":
    out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
  elif qtype in _BLOCKS:
    if n % _QK:
      raise ValueError(f"{qtype} tensor of shape {shape} is not a whole number of 32-blocks")
    blocks = raw.reshape(-1, _BLOCKS[qtype])
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # [blocks, 1]
    if qtype == "Q8_0":
      out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
    else:
      qs = blocks[:, 2:] if qtype == "Q4_0" else blocks[:, 4:]
      q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # [blocks, 32]
      if qtype == "Q4_0":
        out = d * (q - 8.0)
      else:
        out = d * q + blocks[:, 2:4].copy().view("<f2").astype(np.float32)
  else:
    raise ValueError(f"GGUF tensor type {qtype!r} is not supported; supported: "
                     f"{list(SUPPORTED_TYPES)}")
  out = out.reshape(-1)
  if out.size != n:
    raise ValueError(f"{qtype} data holds {out.size} values; shape {shape} needs {n}")
  return out.reshape(shape)


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
  """float32 values `[*shape]` of a GGUF tensor: `gguf.quants.dequantize` when the installed
  `gguf` has it (what transformers uses), else `dequantize_numpy`."""
  if qtype not in SUPPORTED_TYPES:
    raise ValueError(f"GGUF tensor type {qtype!r} is not supported; supported: "
                     f"{list(SUPPORTED_TYPES)}")
  try:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
  except ImportError:
    return dequantize_numpy(data, qtype, shape)
  out = gguf_dequantize(np.asarray(data), GGMLQuantizationType[qtype])
  return np.asarray(out, np.float32).reshape(shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's `permute` of q/k rows (interleaved -> half-split rotary pairs).

  Args:
    w: `[n_head * H, ...]` rows as stored in a `llama` GGUF (weight `[NH, D]` or bias `[NH]`).
    n_head: heads of this projection (query heads for q, kv heads for k).
  """
  h = w.shape[0] // n_head
  return w.reshape(n_head, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field_value(field) -> Any:
  """The Python value of a `gguf.ReaderField` (str, int, float, bool, or a list of them)."""
  if hasattr(field, "contents"):
    return field.contents()
  gguf = _gguf()  # older gguf packages: decode the parts by hand
  types = field.types
  def one(idx, t):
    part = field.parts[idx]
    if t == gguf.GGUFValueType.STRING:
      return bytes(part).decode("utf-8")
    return part.tolist()[0]
  if types[0] == gguf.GGUFValueType.ARRAY:
    return [one(i, types[-1]) for i in field.data]
  return one(field.data[0], types[0])


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
    if not is_gguf(path):
      with open(path, "rb") as f:
        head = f.read(4)
      raise ValueError(f"{str(path)!r} is not a GGUF file: it starts with {head!r}, not "
                       f"{MAGIC!r} (lmjax loads GGUF files and Hugging Face folders of "
                       "config.json + *.safetensors)")
    gguf = _gguf()
    self.path = path
    self._reader = gguf.GGUFReader(str(path))
    self.metadata = {k: field_value(f) for k, f in self._reader.fields.items()
                     if not k.startswith("GGUF.")}
    self.architecture = self.metadata.get("general.architecture")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"{str(path)!r} holds a {self.architecture!r} model; supported GGUF "
                       f"architectures: {list(SUPPORTED_ARCHITECTURES)}")
    raw = {t.name: t for t in self._reader.tensors}
    self.config = self._config(raw)
    self.tensors = self._tensors(raw)

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
    vocab = int(self._key("vocab_size", int(emb.shape[1])))
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
    for name, t in raw.items():
      qtype = t.tensor_type.name
      hf = _TOP_NAMES.get(name)
      if hf is None and name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        hf = f"model.layers.{i}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES else None
      if hf is None:
        hf = name  # unknown: reported by the layout check as unsupported
      if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {name!r} in {str(self.path)!r} is {qtype}; supported tensor "
                         f"types: {list(SUPPORTED_TYPES)}")
      shape = tuple(int(s) for s in reversed(list(t.shape)))
      heads = None
      if self.architecture == "llama":
        if ".attn_q." in name:
          heads = cfg.num_heads
        elif ".attn_k." in name:
          heads = cfg.resolved_num_kv_heads

      def load(t=t, qtype=qtype, shape=shape, heads=heads):
        w = dequantize(t.data, qtype, shape)
        return w if heads is None else unpermute_rotary(w, heads)

      out[hf] = TensorRef(hf, shape, qtype, str(self.path), load)
    return out

  def tokenizer_metadata(self) -> dict[str, Any]:
    """The `tokenizer.*` metadata fields, keys without the `tokenizer.` prefix."""
    return {k[len("tokenizer."):]: v for k, v in self.metadata.items()
            if k.startswith("tokenizer.")}
