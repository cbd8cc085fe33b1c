"""Reward models as Hugging Face `LlamaForSequenceClassification` folders (`num_labels=1`).

The trunk's tensors are the causal model's (`model.*`, no `lm_head.weight`); the head is
`score.weight` `[1, D]` (bias-free), the transpose of `RewardModel`'s `score` `[D, 1]`.
transformers reads the reward at each row's last token that is not `pad_token_id`, so
`config.json` carries the tokenizer's pad id, unless it is the EOS (SmolLM2's pad is its
`<|im_end|>`, the very token a reply ends with and our reward is read at): then the BOS id,
never a sequence's last token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import TransformerConfig
from lmjax.convert import hf as hf_lib
from lmjax.convert.layout import build_params, params_to_hf

ARCHITECTURES = {"LlamaForSequenceClassification": "LlamaForCausalLM",
                 "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
                 "MistralForSequenceClassification": "MistralForCausalLM"}
SCORE_WEIGHT = "score.weight"


def _trunk_config(cfg: TransformerConfig) -> TransformerConfig:
  # The trunk's tensors are the tied model's (no lm_head), whatever the config says.
  return cfg.replace(tie_embeddings=True)


def reward_to_hf(cfg: TransformerConfig, params: dict) -> dict[str, np.ndarray]:
  """Hugging Face-layout tensors of a `RewardModel`'s params."""
  from lmjax.heads import SCORE

  trunk = {k: v for k, v in params.items() if k != SCORE}
  tensors = params_to_hf(_trunk_config(cfg), trunk)
  score = np.asarray(jax.device_get(params[SCORE]))
  if score.shape != (cfg.model_dim, 1):
    raise ValueError(f"score head of shape {score.shape}; the config needs ({cfg.model_dim}, 1)")
  tensors[SCORE_WEIGHT] = np.ascontiguousarray(score.T)
  return tensors


def reward_config_to_hf(cfg: TransformerConfig, ids: dict[str, int | None],
                        dtype: str) -> dict[str, Any]:
  """The `config.json` of a sequence-classification folder with one label."""
  d = hf_lib.config_to_hf(cfg, dtype=dtype, **ids)
  d["architectures"] = [d["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
  d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
           problem_type="regression")
  pad, eos, bos = d.get("pad_token_id"), ids.get("eos_id"), ids.get("bos_id")
  if (pad is None or pad == eos) and bos is not None and bos != eos:
    d["pad_token_id"] = bos
  elif pad is None:
    d["pad_token_id"] = eos
  return d


def is_reward_folder(folder: str | Path) -> bool:
  """Whether a folder holds a sequence-classification (reward) model's config.json."""
  path = Path(folder).expanduser() / "config.json"
  if not path.is_file():
    return False
  archs = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
  return bool(archs) and archs[0] in ARCHITECTURES


def read_reward_folder(folder: str | Path, dtype: str = "float32",
                       mesh: jax.sharding.Mesh | None = None) -> tuple[TransformerConfig, dict]:
  """`(config, params)` of a `*ForSequenceClassification` folder with `num_labels=1`."""
  folder = Path(folder).expanduser()
  d = json.loads((folder / "config.json").read_text(encoding="utf-8"))
  archs = d.get("architectures") or []
  if not archs or archs[0] not in ARCHITECTURES:
    raise ValueError(f"{str(folder)!r} is not a reward model (architectures {archs}); "
                     f"reward folders are {sorted(ARCHITECTURES)}")
  if d.get("num_labels", len(d.get("id2label") or {0: 0})) != 1:
    raise ValueError(f"{str(folder)!r} has num_labels={d.get('num_labels')}; a reward model "
                     "has one")
  causal = {**d, "architectures": [ARCHITECTURES[archs[0]]]}
  cfg = hf_lib.config_from_hf(causal, str(folder / "config.json"))
  cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  tensors = hf_lib.read_folder_tensors(folder)
  if SCORE_WEIGHT not in tensors:
    raise ValueError(f"{str(folder)!r} has no {SCORE_WEIGHT!r} tensor")
  score = tensors.pop(SCORE_WEIGHT)
  params = build_params(_trunk_config(cfg), tensors, where=repr(str(folder)), mesh=mesh)
  w = np.asarray(score.load(), np.float32)
  if w.shape != (1, cfg.model_dim):
    raise ValueError(f"{SCORE_WEIGHT} has shape {w.shape}; want (1, {cfg.model_dim})")
  params["score"] = jnp.asarray(w.T, jnp.dtype(dtype))
  return cfg, params
