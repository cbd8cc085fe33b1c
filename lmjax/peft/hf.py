"""Adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

LoRA keys are PEFT's (adapter name stripped, as PEFT saves them):
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]` and
`....lora_B.weight` `[out, r]`, module names from the Llama weight map of
`lmjax.convert.layout` (in and out flattened in Hugging Face's `[out, in]` order: `A.T`,
`B.T`). Soft prompts are PEFT's prompt tuning (`prompt_embeddings` `[k, D]`). Bottleneck
adapters have no PEFT type (PEFT has none); they are saved with `peft_type` "LMJAX_BOTTLENECK"
and lmjax's own param paths, readable here only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax.config import TransformerConfig
from lmjax.convert import layout, safetensors_io
from lmjax.peft.config import LM_MODULES, AdapterConfig, LoRAConfig, PromptConfig
from lmjax.peft.lora import boxed_abstract, projections

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUPPORTED = ("LORA", "PROMPT_TUNING", "LMJAX_BOTTLENECK")
# lmjax path inside a layer (module) -> Hugging Face module name ("self_attn.q_proj").
_MODULES = {path[:-1]: suffix.rsplit(".", 1)[0] for suffix, path, kind in layout.LAYER_TENSORS
            if path[-1] == "kernel"}
_HF_TO_LM = {v: k for k, v in _MODULES.items()}
_LORA_KEY = re.compile(r"model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight")


def _layer_paths(path: tuple[str, ...], cfg: TransformerConfig) -> list[tuple[int, str]]:
  """(layer index, HF module) of a decoder module path (one per layer when scanned)."""
  mod = _MODULES.get(path[2:])
  if path[0] != "decoder" or mod is None:
    raise ValueError(f"{'/'.join(path)} has no Hugging Face PEFT name (only decoder "
                     "projections of a Llama-family model do)")
  if path[1] == "layers":
    return [(i, mod) for i in range(cfg.num_decoder_layers)]
  return [(int(path[1].split("_")[1]), mod)]


def _host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x), np.float32)


def save_adapter(folder: str | os.PathLike, config: TransformerConfig, adapter: Any, spec, *,
                 base_model: str | None = None, task_type: str = "CAUSAL_LM",
                 modules_to_save: dict[str, Any] | None = None) -> Path:
  """Writes an adapter as Hugging Face PEFT files (`folder/adapter_config.json`,
  `folder/adapter_model.safetensors`, float32).

  Args:
    folder: created if missing.
    config: the base's config (a Llama-family decoder for LoRA).
    adapter: the adapter's params (raw or boxed).
    spec: its `LoRAConfig` / `PromptConfig` / `AdapterConfig`.
    base_model: `base_model_name_or_path` (a pointer to the base).
    task_type: PEFT's task type ("SEQ_CLS" for a reward model).
    modules_to_save: whole modules trained beside the adapter, by Hugging Face tensor name
      (`{"score.weight": [1, D]}`); saved as PEFT saves `modules_to_save`
      (`base_model.model.score.weight`), the module names listed in the config.
  """
  folder = Path(folder)
  flat = flatten_dict(nn.meta.unbox(adapter))
  tensors: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {"base_model_name_or_path": base_model, "task_type": task_type,
                          "inference_mode": True, "revision": None}
  if isinstance(spec, LoRAConfig):
    layout.check_llama_family(config)
    modules = set()
    for path in sorted({p[:-1] for p in flat}):
      a, b = _host(flat[path + ("lora_a",)]), _host(flat[path + ("lora_b",)])
      places = _layer_paths(path, config)
      scanned = len(places) > 1 or path[1] == "layers"
      for i, mod in places:
        ai, bi = (a[i], b[i]) if scanned else (a, b)
        r = ai.shape[-1]
        key = f"{PREFIX}model.layers.{i}.{mod}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, r).T)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(r, -1).T)
        modules.add(mod.split(".")[-1])
    meta.update(peft_type="LORA", r=spec.rank, lora_alpha=spec.alpha,
                lora_dropout=spec.dropout, target_modules=sorted(modules),
                use_rslora=spec.rslora, use_dora=False, bias="none", fan_in_fan_out=False,
                init_lora_weights=True, modules_to_save=None, layers_to_transform=None,
                rank_pattern={}, alpha_pattern={})
  elif isinstance(spec, PromptConfig):
    p = _host(flat[("embed", "prompt_embeddings")])
    tensors["prompt_embeddings"] = p
    meta.update(peft_type="PROMPT_TUNING", num_virtual_tokens=p.shape[0],
                token_dim=config.model_dim, num_transformer_submodules=1,
                num_attention_heads=config.num_heads, num_layers=config.num_decoder_layers,
                prompt_tuning_init="TEXT" if spec.init_text else "RANDOM",
                prompt_tuning_init_text=spec.init_text,
                tokenizer_name_or_path=base_model if spec.init_text else None)
  elif isinstance(spec, AdapterConfig):
    tensors = {"/".join(p): _host(x) for p, x in flat.items()}
    meta.update(peft_type="LMJAX_BOTTLENECK", adapter_dim=spec.dim,
                placement=spec.placement, activation=spec.activation)
  else:
    raise TypeError(f"unknown PEFT spec {spec!r}")
  if modules_to_save:
    tensors.update({PREFIX + k: _host(v) for k, v in modules_to_save.items()})
    meta["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in modules_to_save})
  folder.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_file(folder / WEIGHTS_FILE, tensors, {"format": "pt"})
  (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
  return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  """The adapter's `adapter_config.json`, checked to be a type lmjax reads."""
  path = Path(folder) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no {CONFIG_FILE} in {str(folder)!r} (a Hugging Face PEFT adapter "
                            f"folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
  meta = json.loads(path.read_text())
  kind = meta.get("peft_type")
  if kind not in SUPPORTED:
    raise ValueError(f"{path}: peft_type {kind!r} is not supported; lmjax reads {SUPPORTED}")
  if kind == "LORA":
    for key in ("use_dora",):
      if meta.get(key):
        raise ValueError(f"{path}: {key}=true is not supported (plain LoRA and rsLoRA are)")
    for key in ("rank_pattern", "alpha_pattern"):
      if meta.get(key):
        raise ValueError(f"{path}: per-module {key} is not supported (one r and alpha)")
    if meta.get("fan_in_fan_out"):
      raise ValueError(f"{path}: fan_in_fan_out=true (GPT-2 Conv1D layers) is not supported")
  return meta


def spec_of(meta: dict[str, Any]):
  """The lmjax spec of a PEFT config dict."""
  kind = meta["peft_type"]
  if kind == "LORA":
    targets = meta.get("target_modules") or []
    if isinstance(targets, str):
      targets = [targets]
    return LoRAConfig(rank=int(meta["r"]), alpha=float(meta.get("lora_alpha", 8)),
                      dropout=float(meta.get("lora_dropout") or 0.0),
                      targets=tuple(LM_MODULES.get(t, t) for t in sorted(targets)),
                      rslora=bool(meta.get("use_rslora", False)))
  if kind == "PROMPT_TUNING":
    return PromptConfig(num_virtual_tokens=int(meta["num_virtual_tokens"]),
                        init_text=meta.get("prompt_tuning_init_text"))
  return AdapterConfig(dim=int(meta["adapter_dim"]), placement=meta["placement"],
                       activation=meta["activation"])


def load_adapter(folder: str | os.PathLike, config: TransformerConfig) -> tuple[dict, Any]:
  """Reads a Hugging Face PEFT adapter folder (ours or PEFT's) for a base of `config`.

  Returns:
    `(adapter, spec)`: the raw adapter tree in lmjax's layout and its spec.

  Raises:
    FileNotFoundError: no adapter files.
    ValueError: an unsupported PEFT type, or tensors that do not fit the base (another model's
      adapter: a layer it lacks, a module it lacks, a width it lacks), checked before any
      weight is read.
  """
  folder = Path(folder)
  meta = read_config(folder)
  spec = spec_of(meta)
  refs = safetensors_io.open_file(folder / WEIGHTS_FILE)
  saved = _saved_modules(refs, meta)
  refs = {k: v for k, v in refs.items() if k not in saved}  # read by load_modules_to_save
  where = f"adapter {str(folder)!r}"
  if isinstance(spec, PromptConfig):
    ref = refs.get("prompt_embeddings")
    want = (spec.num_virtual_tokens, config.model_dim)
    if ref is None or tuple(ref.shape) != want:
      raise ValueError(f"{where}: prompt_embeddings {None if ref is None else ref.shape}, the "
                       f"base (model_dim={config.model_dim}) needs {want}")
    return {"embed": {"prompt_embeddings": np.asarray(ref.load(), np.float32)}}, spec
  if isinstance(spec, AdapterConfig):
    boxed = boxed_abstract(config)
    out = {}
    for name, ref in refs.items():
      path = tuple(name.split("/"))
      site_ok = path[:-1] + ("query",) in projections(boxed) or path[-2] == "mlp"
      if not site_ok or path[-1] not in ("adapter_down", "adapter_down_bias", "adapter_up",
                                        "adapter_up_bias"):
        raise ValueError(f"{where}: {name} is not a bottleneck adapter param of this base")
      out[path] = np.asarray(ref.load(), np.float32)
    return unflatten_dict(out), spec
  return _load_lora(refs, config, spec, where), spec


def _saved_modules(refs, meta: dict[str, Any]) -> dict[str, str]:
  """`{file key: Hugging Face name}` of the tensors of the config's `modules_to_save`."""
  mods = meta.get("modules_to_save") or []
  mods = [mods] if isinstance(mods, str) else mods
  out = {}
  for key in refs:
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if any(name.startswith(m + ".") for m in mods):
      out[key] = name
  return out


def load_modules_to_save(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """The whole modules an adapter folder saved beside the adapter (its config's
  `modules_to_save`, e.g. a reward model's `{"score.weight": [1, D]}`), by Hugging Face name
  (PEFT's `modules_to_save.<adapter>` infixes removed); {} when none."""
  folder = Path(folder)
  refs = safetensors_io.open_file(folder / WEIGHTS_FILE)
  return {re.sub(r"\.modules_to_save\.\w+", "", name): np.asarray(refs[key].load(), np.float32)
          for key, name in _saved_modules(refs, read_config(folder)).items()}


def _load_lora(refs, config: TransformerConfig, spec: LoRAConfig, where: str) -> dict:
  layout.check_llama_family(config)
  projs = projections(boxed_abstract(config))
  scanned = config.scan_layers
  per_layer: dict[tuple[tuple[str, ...], str], dict[int, np.ndarray]] = {}
  for name, ref in refs.items():
    m = _LORA_KEY.fullmatch(name[len(PREFIX):] if name.startswith(PREFIX) else name)
    if m is None:
      raise ValueError(f"{where}: tensor {name!r} is not a LoRA weight of a Llama-family "
                       "decoder layer (lmjax reads q/k/v/o_proj and gate/up/down_proj)")
    i, mod, ab = int(m.group(1)), m.group(2), m.group(3)
    if i >= config.num_decoder_layers:
      raise ValueError(f"{where}: {name} is for layer {i}; the base has "
                       f"{config.num_decoder_layers} layers (an adapter of another model)")
    sub = _HF_TO_LM.get(mod)
    if sub is None:
      raise ValueError(f"{where}: module {mod!r} has no lmjax projection; modules are "
                       f"{sorted(_HF_TO_LM)}")
    path = ("decoder", "layers" if scanned else f"layers_{i}") + sub
    tg = projs[path]
    shape = (spec.rank, tg.fan_in) if ab == "A" else (tg.fan_out, spec.rank)
    if tuple(ref.shape) != shape:
      raise ValueError(f"{where}: {name} has shape {tuple(ref.shape)}; this base (r="
                       f"{spec.rank}) needs {shape} (an adapter made for another model)")
    per_layer.setdefault((path, ab), {})[i] = ref
  out = {}
  for (path, ab), refs_i in per_layer.items():
    tg = projs[path]
    r = spec.rank

    def lm(x, ab=ab, tg=tg, r=r):
      x = np.asarray(x, np.float32).T
      return x.reshape(tg.in_shape + (r,)) if ab == "A" else x.reshape((r,) + tg.out_shape)
    key = "lora_a" if ab == "A" else "lora_b"
    if scanned:
      missing = sorted(set(range(config.num_decoder_layers)) - set(refs_i))
      if missing:
        raise ValueError(f"{where}: {'/'.join(path)} lacks layers {missing[:5]}; a scanned "
                         "base needs every layer (load with scan_layers=False)")
      out[path + (key,)] = np.stack([lm(refs_i[i].load()) for i in sorted(refs_i)])
    else:
      out[path + (key,)] = lm(next(iter(refs_i.values())).load())
  if {p[-1] for p in out} != {"lora_a", "lora_b"}:
    raise ValueError(f"{where}: LoRA needs both lora_A and lora_B weights")
  return unflatten_dict(out)
