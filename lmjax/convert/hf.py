"""Hugging Face model folders: `config.json` <-> `TransformerConfig`, safetensors in and out.

A folder holds `config.json` (transformers' `PretrainedConfig.to_dict()`), the weights as
`model.safetensors` or as shards listed in `model.safetensors.index.json`
(`{"metadata": {...}, "weight_map": {tensor name: shard file}}`), and tokenizer files.
Supported: `LlamaForCausalLM` (Llama, SmolLM), `MistralForCausalLM` without a sliding window
below its context, `Qwen2ForCausalLM` (q, k, v biases), the fields as in transformers'
`configuration_llama.py` / `configuration_qwen2.py`. Pickled weights (`pytorch_model.bin`,
`*.pt`) are never loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lmjax.config import TransformerConfig
from lmjax.convert import safetensors_io
from lmjax.convert.layout import check_llama_family, natural_key
from lmjax.convert.tensors import TensorRef

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _rope(d: dict, where: str) -> dict[str, Any]:
  """The rotary fields of a `TransformerConfig`: the base, and Llama 3 scaling when the
  config has it; raises for other scaling types."""
  params = d.get("rope_parameters") or {}
  scaling = d.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  theta = float(params.get("rope_theta", d.get("rope_theta", 10_000.0)))
  if kind == "default":
    return {"rope_theta": theta}
  if kind != "llama3":
    raise ValueError(f"{where} uses rotary scaling {kind!r}; supported: plain ('default') and "
                     "'llama3'")
  s = {**scaling, **params}
  need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in need if k not in s]
  if missing:
    raise ValueError(f"{where}: rotary scaling 'llama3' without {missing}; it needs {list(need)}")
  return {"rope_theta": theta, "rope_scaling": "llama3",
          "rope_scaling_factor": float(s["factor"]),
          "rope_low_freq_factor": float(s["low_freq_factor"]),
          "rope_high_freq_factor": float(s["high_freq_factor"]),
          "rope_original_max_len": int(s["original_max_position_embeddings"])}


def _rope_to_hf(cfg: TransformerConfig) -> dict[str, Any]:
  """The rotary fields of a `config.json` (transformers 4's `rope_scaling` and 5's
  `rope_parameters`)."""
  if cfg.rope_scaling == "none":
    return {"rope_theta": cfg.rope_theta, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
  factor, low, high, original = cfg.rope_scaling_params
  scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
             "high_freq_factor": high, "original_max_position_embeddings": original}
  return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling,
          "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta}}


def config_from_hf(d: Mapping[str, Any], where: str = "config.json") -> TransformerConfig:
  """The `TransformerConfig` (float32) of a Hugging Face `config.json` dict.

  Raises:
    ValueError: an architecture or option (rotary scaling, sliding window, o_proj/MLP biases,
      activation other than SiLU) that lmjax's `CausalLM` does not implement.
  """
  archs = d.get("architectures") or []
  arch = archs[0] if archs else None
  if arch and arch.endswith("ForSequenceClassification"):
    raise ValueError(f"{where} is a reward model ({arch}), not a language model: read it with "
                     "lmjax.load_reward_model; give a language model here")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{where} is for architecture {arch!r} (model_type "
                     f"{d.get('model_type')!r}); supported: {list(SUPPORTED_ARCHITECTURES)}")
  if d.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={d['hidden_act']!r}; only 'silu' (SwiGLU) is "
                     "supported")
  if arch == "LlamaForCausalLM" and (d.get("attention_bias") or d.get("mlp_bias")):
    raise ValueError(f"{where}: attention_bias={d.get('attention_bias')}, mlp_bias="
                     f"{d.get('mlp_bias')}; only bias-free Llama models are supported (q/k/v "
                     "biases are supported as Qwen2ForCausalLM)")
  max_len = int(d.get("max_position_embeddings", 2048))
  if arch == "MistralForCausalLM" and d.get("sliding_window") not in (None, 0) and int(
      d["sliding_window"]) < max_len:
    raise ValueError(f"{where}: sliding_window={d['sliding_window']} < max_position_embeddings="
                     f"{max_len}; sliding-window attention is not supported")
  if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
    raise ValueError(f"{where}: use_sliding_window=true is not supported")
  n = int(d["num_attention_heads"])
  width = int(d["hidden_size"])
  return TransformerConfig(
      vocab_size=int(d["vocab_size"]), model_dim=width,
      num_decoder_layers=int(d["num_hidden_layers"]), num_heads=n,
      num_kv_heads=int(d.get("num_key_value_heads") or n),
      head_dim=int(d.get("head_dim") or width // n), ffn_dim=int(d["intermediate_size"]),
      activation="swiglu", norm="rmsnorm", norm_placement="pre",
      norm_eps=float(d.get("rms_norm_eps", 1e-6)), position="rotary",
      **_rope(dict(d), where), max_len=max_len, use_bias=False,
      qkv_bias=arch == "Qwen2ForCausalLM", tie_embeddings=bool(d.get("tie_word_embeddings",
                                                                     False)))


def config_to_hf(cfg: TransformerConfig, *, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
  """A `config.json` dict transformers loads (`LlamaForCausalLM`, or `Qwen2ForCausalLM`
  when the config has q/k/v biases), with both the transformers 4 and 5 rotary fields."""
  check_llama_family(cfg)
  qwen = cfg.resolved_qkv_bias
  d: dict[str, Any] = {
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen else "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.model_dim,
      "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.num_decoder_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.resolved_num_kv_heads,
      "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
      **_rope_to_hf(cfg),
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
      "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
  }
  if qwen:
    d.update(use_sliding_window=False, sliding_window=None,
             max_window_layers=cfg.num_decoder_layers)
  else:
    d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  return d


def read_folder(folder: str | os.PathLike) -> tuple[TransformerConfig, dict[str, TensorRef]]:
  """The config and the (lazy) tensors of a Hugging Face model folder.

  Raises:
    FileNotFoundError: no config.json, or no safetensors weights (with a word on pickle files).
    ValueError: an unsupported architecture, or an index naming a missing shard.
  """
  folder = Path(folder).expanduser()
  cfg_path = folder / "config.json"
  if not cfg_path.is_file():
    raise FileNotFoundError(f"{str(folder)!r} has no config.json; a Hugging Face model folder "
                            "holds config.json and *.safetensors")
  cfg = config_from_hf(json.loads(cfg_path.read_text(encoding="utf-8")), str(cfg_path))
  return cfg, read_folder_tensors(folder)


def read_folder_tensors(folder: Path) -> dict[str, TensorRef]:
  """The (lazy) tensors of a Hugging Face model folder, whatever its architecture."""
  index = folder / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    files = sorted(set(weight_map.values()))
    for f in files:
      if not (folder / f).is_file():
        raise FileNotFoundError(f"{INDEX_FILE} in {str(folder)!r} lists shard {f!r}, which is "
                                "missing")
  else:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
  if not files:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
      raise FileNotFoundError(
          f"{str(folder)!r} has only pickled weights {pickles}; lmjax never loads pickle files "
          "(they can run code). Convert them to safetensors first, e.g. with transformers: "
          "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
          "safe_serialization=True)")
    raise FileNotFoundError(f"{str(folder)!r} has no *.safetensors weights")
  tensors: dict[str, TensorRef] = {}
  for f in files:
    for name, ref in safetensors_io.open_file(folder / f).items():
      if ref.dtype not in safetensors_io.FLOAT_DTYPES:
        raise ValueError(f"tensor {name!r} in {ref.source} is {ref.dtype}; supported weight "
                         f"dtypes: {list(safetensors_io.FLOAT_DTYPES)}")
      tensors[name] = ref
  return tensors


def write_weights(folder: Path, tensors: Mapping[str, np.ndarray],
                  max_shard_bytes: int) -> list[Path]:
  """Writes `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus
  `model.safetensors.index.json` when the total passes `max_shard_bytes`."""
  names = sorted(tensors, key=natural_key)
  shards: list[list[str]] = [[]]
  size = 0
  for n in names:
    nb = tensors[n].nbytes
    if shards[-1] and size + nb > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(n)
    size += nb
  meta = {"format": "pt"}
  if len(shards) == 1:
    path = folder / "model.safetensors"
    safetensors_io.save_file(path, tensors, meta)
    return [path]
  paths, weight_map = [], {}
  for i, shard in enumerate(shards):
    path = folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors_io.save_file(path, {n: tensors[n] for n in shard}, meta)
    weight_map.update({n: path.name for n in shard})
    paths.append(path)
  total = sum(t.nbytes for t in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
  return [*paths, folder / INDEX_FILE]

