"""The `peft` section of a run config: which parameter-efficient method a job trains.

    --set peft.method=lora peft.rank=8 peft.targets=query,value
    --set peft.method=lora peft.base_quant=nf4                  # QLoRA
    --set peft.method=prompt peft.num_virtual_tokens=16 data.pack=false
    --set peft.method=adapter peft.adapter_dim=32

`method="none"` (the default) trains every weight. `PEFTConfig.spec()` is the library's spec
(`lmjax.peft.LoRAConfig` / `PromptConfig` / `AdapterConfig`); `train.peft_train` builds a job's
trainable adapter and frozen base from it.
"""

from __future__ import annotations

import dataclasses

from lmjax import peft
from train.overrides import check_types

METHODS = ("none", "lora", "prompt", "adapter")
BASE_QUANT = ("none", "nf4")


@dataclasses.dataclass(frozen=True)
class PEFTConfig:
  """Attributes:
    method: "none" (full fine-tuning), "lora", "prompt" (soft prompts) or "adapter"
      (bottleneck adapters).
    rank, alpha, dropout, targets, rslora: LoRA (`lmjax.peft.LoRAConfig`).
    num_virtual_tokens, prompt_init_text: soft prompts (`lmjax.peft.PromptConfig`; the text
      is encoded with the run's tokenizer).
    adapter_dim, adapter_placement, adapter_activation: bottleneck adapters
      (`lmjax.peft.AdapterConfig`).
    base_quant: "nf4" stores the frozen base's projections in NF4 (QLoRA); "none" keeps the
      base's dtype.
    nf4_block_size: NF4 block (64 in QLoRA).
    nf4_embedding: with `base_quant=nf4`, store the token embedding (the tied output
      projection) in NF4 too (QLoRA keeps it in 16 bits: false).
  """

  method: str = "none"
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("query", "value")
  rslora: bool = False
  num_virtual_tokens: int = 20
  prompt_init_text: str | None = None
  adapter_dim: int = 16
  adapter_placement: str = "both"
  adapter_activation: str = "relu"
  base_quant: str = "none"
  nf4_block_size: int = 64
  nf4_embedding: bool = True

  def __post_init__(self):
    check_types(self)
    if self.method not in METHODS:
      raise ValueError(f"peft.method={self.method!r}; choose one of {METHODS}")
    if self.base_quant not in BASE_QUANT:
      raise ValueError(f"peft.base_quant={self.base_quant!r}; choose one of {BASE_QUANT}")
    if self.base_quant != "none" and self.method == "none":
      raise ValueError("peft.base_quant=nf4 needs a PEFT method (the quantized base is frozen): "
                       "set peft.method=lora for QLoRA")
    if self.method != "none":
      self.spec()  # validates the method's own fields

  @property
  def enabled(self) -> bool:
    return self.method != "none"

  def spec(self) -> peft.Spec | None:
    """The library spec of this section (None for method "none")."""
    if self.method == "lora":
      return peft.LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                             targets=self.targets, rslora=self.rslora)
    if self.method == "prompt":
      return peft.PromptConfig(num_virtual_tokens=self.num_virtual_tokens,
                               init_text=self.prompt_init_text)
    if self.method == "adapter":
      return peft.AdapterConfig(dim=self.adapter_dim, placement=self.adapter_placement,
                                activation=self.adapter_activation)
    return None

  def nf4_options(self) -> dict:
    """`lmjax.peft.quantize_base`'s NF4 options of this section."""
    return {"block_size": self.nf4_block_size, "embeddings": self.nf4_embedding}
