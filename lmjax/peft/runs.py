"""PEFT run dirs: the adapter a finished run writes (`WORKDIR/adapter/`, Hugging Face PEFT
files) and `lmjax.checkpoint.load_run` of such a run.

A PEFT run's checkpoints hold the adapter alone; its `adapter_config.json` names the base
(`base_model_name_or_path`: a pretrained name or path, or another run dir). Loading reads the
base, then the adapter: LoRA is merged into the base (float32 math; into the NF4-rounded
weights when the run trained on an NF4 base, so the merged model computes what was trained),
soft prompts and bottleneck adapters come back as `lmjax.peft.Adapted`, which
`infer.generate` runs as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lmjax.config import TransformerConfig
from lmjax.peft import hf, lora
from lmjax.peft.config import LoRAConfig
from lmjax.peft.core import adapt

ADAPTER_DIR = "adapter"


def save_run_adapter(workdir, config: TransformerConfig, adapter: Any, spec, *, base: str,
                     base_quant: str = "none", nf4: dict | None = None,
                     task_type: str = "CAUSAL_LM",
                     modules_to_save: dict[str, Any] | None = None) -> None:
  """Writes `workdir/adapter/` (Hugging Face PEFT format) pointing at `base`; a QLoRA run also
  records how its base was stored (`nf4`: `quantize_base`'s block_size and embeddings). A
  reward run saves its score head as `modules_to_save` (`task_type` "SEQ_CLS")."""
  folder = hf.save_adapter(os.path.join(os.fspath(workdir), ADAPTER_DIR), config, adapter,
                           spec, base_model=base, task_type=task_type,
                           modules_to_save=modules_to_save)
  if base_quant != "none":  # how the base was stored while training (for merging right)
    path = folder / hf.CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["lmjax_base_quant"] = base_quant
    meta["lmjax_nf4"] = dict(nf4 or {})
    path.write_text(json.dumps(meta, indent=2))


def is_peft_run(run_config: dict[str, Any]) -> bool:
  return (run_config.get("peft") or {}).get("method", "none") != "none"


def _nf4_rounded(params, config: TransformerConfig, nf4: dict):
  from lmjax.peft import qlora

  return qlora.dequantized(qlora.quantize_base(params, config, dtype=config.param_dtype,
                                               **nf4))


def load_peft_run(workdir, config: TransformerConfig, mesh=None, head: str = "lm"):
  """`(config, params, tokenizer)` of a PEFT run dir (see the module docstring); `head`
  "reward": a reward run's `RewardModel` params (the base's trunk, the saved score head).

  Raises:
    FileNotFoundError: the run has not written `adapter/` yet (it does at its end).
  """
  from lmjax import checkpoint, convert

  folder = os.path.join(os.fspath(workdir), ADAPTER_DIR)
  if not os.path.isfile(os.path.join(folder, hf.CONFIG_FILE)):
    raise FileNotFoundError(f"PEFT run {str(workdir)!r} has no {ADAPTER_DIR}/ (a PEFT run writes "
                            "its adapter there when it finishes)")
  meta = hf.read_config(folder)
  base = meta.get("base_model_name_or_path")
  if not base:
    raise ValueError(f"{folder}: adapter_config.json names no base_model_name_or_path")
  if os.path.isdir(os.path.join(base, checkpoint.CHECKPOINT_DIR)):
    _, params, _ = checkpoint.load_run(base, mesh=mesh)
  else:
    _, params, _ = convert.load_pretrained(base, config.param_dtype, mesh=mesh)
  adapter, spec = hf.load_adapter(folder, config)
  tokenizer = checkpoint.load_run_tokenizer(workdir)
  if isinstance(spec, LoRAConfig) and meta.get("lmjax_base_quant") == "nf4":
    params = _nf4_rounded(params, config, meta.get("lmjax_nf4") or {})
  if head == "reward":
    params = _reward_params(params, hf.load_modules_to_save(folder), config, folder)
  if isinstance(spec, LoRAConfig):
    return config, lora.merge(params, adapter, spec), tokenizer
  return config, adapt(params, adapter, spec), tokenizer


def _reward_params(lm_params, saved: dict, config: TransformerConfig, folder) -> dict:
  """A `RewardModel`'s params: the base's trunk and the score head the run saved."""
  from lmjax.convert.reward import SCORE_WEIGHT
  from lmjax.heads import SCORE

  if SCORE_WEIGHT not in saved:
    raise ValueError(f"{folder}: a reward run's adapter lacks {SCORE_WEIGHT} (its "
                     "modules_to_save)")
  score = saved[SCORE_WEIGHT].T.astype(config.param_dtype)
  return {"embed": lm_params["embed"], "decoder": lm_params["decoder"], SCORE: score}
