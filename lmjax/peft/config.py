"""What a parameter-efficient adapter is: LoRA, soft prompts, or bottleneck adapters.

One frozen dataclass per method, validated on creation; `method` names it. These are the
library's specs (the run config's `peft` section, `train.peft_config.PEFTConfig`, turns into
one of them).

- `LoRAConfig`: `W x + s B A x` on targeted projections (Hu et al., 2021, "LoRA"), `s = alpha /
  rank`, or `alpha / sqrt(rank)` with rsLoRA (Kalajdzievski, 2023); A random, B zero.
- `PromptConfig`: k learned input vectors in front of the token embeddings (Lester et al.,
  2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").
- `AdapterConfig`: a bottleneck (down, nonlinearity, zero-initialized up, residual) after
  attention and/or the feed-forward (Houlsby et al., 2019; Pfeiffer et al., 2020 place it after
  the feed-forward only).
"""

from __future__ import annotations

import dataclasses
import math
import re

# lmjax projection names and the Hugging Face (Llama) module names they map to.
HF_MODULES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj",
              "wi_gate": "gate_proj", "wi_up": "up_proj", "wo": "down_proj"}
LM_MODULES = {v: k for k, v in HF_MODULES.items()}
# Shorthands for target lists.
TARGET_GROUPS = {"attention": ("query", "key", "value", "out"),
                 "mlp": ("wi_gate", "wi_up", "wo", "wi"),
                 "all-linear": ("query", "key", "value", "out", "wi_gate", "wi_up", "wo", "wi")}
PLACEMENTS = ("ffn", "attention", "both")
ADAPTER_ACTIVATIONS = ("relu", "gelu", "silu")


def _check_name(name: str) -> None:
  if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
    raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-'")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank updates of projections.

  Attributes:
    rank: r, the inner width of `B A` (1 <= r <= min(in, out) of every targeted projection).
    alpha: the scale numerator: `alpha / r` (or `alpha / sqrt(r)` with `rslora`).
    dropout: on the LoRA branch's input while training.
    targets: projection names (`query`, `key`, `value`, `out`, `wi_gate`, `wi_up`, `wo`, `wi`),
      their Hugging Face names (`q_proj`, ... `down_proj`), groups (`attention`, `mlp`,
      `all-linear`) or regular expressions matched against a module path such as
      `decoder/layers_3/self_attention/query` (`re.fullmatch`).
    rslora: rank-stabilized scaling `alpha / sqrt(r)`.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("query", "value")
  rslora: bool = False
  method: str = dataclasses.field(default="lora", init=False)

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoRA rank={self.rank!r} must be an int >= 1")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))
    if not self.targets:
      raise ValueError("LoRA targets is empty; name projections such as ('query', 'value')")
    object.__setattr__(self, "alpha", float(self.alpha))

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Soft prompts: `num_virtual_tokens` learned vectors before each row's tokens.

  Attributes:
    num_virtual_tokens: k >= 0 (0: the base model exactly).
    init_text: initialize from the embeddings of this text's tokens (repeated or cut to k);
      None: random normal(0.02)... scaled like the base's embeddings.
  """

  num_virtual_tokens: int = 20
  init_text: str | None = None
  method: str = dataclasses.field(default="prompt", init=False)

  def __post_init__(self):
    if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 0:
      raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be an int >= 0")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Bottleneck adapters `h + up(act(down(h)))` on sublayer outputs.

  Attributes:
    dim: the bottleneck width m (1 <= m).
    placement: "ffn" (Pfeiffer), "attention", or "both" (Houlsby).
    activation: the nonlinearity, one of `ADAPTER_ACTIVATIONS`.
  """

  dim: int = 16
  placement: str = "both"
  activation: str = "relu"
  method: str = dataclasses.field(default="adapter", init=False)

  def __post_init__(self):
    if not isinstance(self.dim, int) or self.dim <= 0:
      raise ValueError(f"adapter dim={self.dim!r} must be an int >= 1")
    if self.placement not in PLACEMENTS:
      raise ValueError(f"adapter placement={self.placement!r}; choose one of {PLACEMENTS}")
    if self.activation not in ADAPTER_ACTIVATIONS:
      raise ValueError(f"adapter activation={self.activation!r}; choose one of "
                       f"{ADAPTER_ACTIVATIONS}")


Spec = LoRAConfig | PromptConfig | AdapterConfig
