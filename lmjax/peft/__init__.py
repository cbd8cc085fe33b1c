"""Parameter-efficient fine-tuning: LoRA, QLoRA, soft prompts, bottleneck adapters.

Adapters are wrappers, never flags threaded through the layers: `apply` runs the unchanged
model under `flax.linen.intercept_methods` with the adapter's params in their own tree.

    spec = lmjax.peft.LoRAConfig(rank=8, alpha=16, targets=("query", "value"))
    adapter = lmjax.peft.init(spec, cfg, jax.random.key(0))          # boxed, trainable
    adapted = lmjax.peft.adapt(params, adapter, spec)
    logits = lmjax.peft.apply(model, adapted, tokens)                # or PeftModel(model)
    ref = lmjax.peft.base_only(adapted)                              # the base, same arrays
    merged = lmjax.peft.merge(params, adapter, spec)                 # a plain params tree
    lmjax.peft.save_adapter(folder, cfg, adapter, spec)              # Hugging Face PEFT files
    bank = lmjax.peft.stack(params, {"a": (ad_a, spec), "b": (ad_b, spec)})
    logits = lmjax.peft.apply(model, lmjax.peft.with_rows(bank, ["a", None, "b"]), tokens)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from lmjax.config import TransformerConfig
from lmjax.peft import bottleneck, lora, prompt
from lmjax.peft.config import AdapterConfig, LoRAConfig, PromptConfig, Spec
from lmjax.peft.core import (
    Adapted,
    PeftModel,
    adapt,
    apply,
    base_only,
    count,
    merge_adapted,
    stack,
    unmerge_adapted,
    with_rows,
)
from lmjax.peft.hf import load_adapter, save_adapter
from lmjax.peft.lora import boxed_abstract, merge, unmerge
from lmjax.peft.qlora import quantize_base

__all__ = ["Adapted", "AdapterConfig", "LoRAConfig", "PeftModel", "PromptConfig", "Spec",
           "adapt", "apply", "base_only", "boxed_abstract", "count", "init", "load_adapter",
           "merge", "merge_adapted", "quantize_base", "save_adapter", "stack", "unmerge",
           "unmerge_adapted", "with_rows"]


def init(spec: Spec, config: TransformerConfig, key: jax.Array, *, boxed: Any = None,
         embedding: Any = None, text_ids: Sequence[int] | None = None) -> dict:
  """A fresh boxed adapter (`nn.Partitioned` leaves carrying logical axis names) for a base of
  `config`; `nn.meta.unbox` gives the raw tree.

  Args:
    spec: `LoRAConfig`, `PromptConfig` or `AdapterConfig`.
    config: the base model's config.
    key: PRNG key.
    boxed: the base's boxed abstract params (default: traced from `config`).
    embedding, text_ids: a soft prompt's initialization (`lmjax.peft.prompt.init`).

  Raises:
    ValueError: a target that matches nothing, a rank above a projection's width.
  """
  if isinstance(spec, PromptConfig):
    return prompt.init(spec, config, key, embedding=embedding, text_ids=text_ids)
  boxed = boxed_abstract(config) if boxed is None else boxed
  if isinstance(spec, LoRAConfig):
    return lora.init(spec, boxed, key)
  if isinstance(spec, AdapterConfig):
    return bottleneck.init(spec, boxed, key)
  raise TypeError(f"unknown PEFT spec {spec!r}; use LoRAConfig, PromptConfig or AdapterConfig")
