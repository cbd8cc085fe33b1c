"""The run-config sections every fine-tuning job shares (`train.sft`, `train.reward`,
`train.dpo`, `train.rl`): the model, PEFT, optimizer, mesh, checkpoint and loop sections.

A job's run config subclasses `FineTuneRun` and declares only what differs: its own fields
(what it starts from, its data, its loss) and `MODEL_FIELD` / `MODEL_KIND` for the checks
done here. The shared fields are keyword-only, so a subclass's required fields (`base`,
`policy`) stay first in its constructor; `to_dict` writes a job's own sections first.
A subclass's `__post_init__` calls `super().__post_init__()` (types, the model's name and
kind) and then checks its own sections.

    @dataclasses.dataclass(frozen=True)
    class MyConfig(FineTuneRun):
      MODEL_FIELD = "base"
      MODEL_KIND = "my job fine-tunes a decoder-only (CausalLM) model"
      base: str
      data: MyDataConfig = dataclasses.field(default_factory=MyDataConfig)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from lmjax.config import TransformerConfig
from train import config as config_lib
from train.overrides import check_types
from train.peft_config import PEFTConfig

SHARED = ("model", "peft", "quant", "optimizer", "mesh", "checkpoint", "train")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineTuneRun:
  """What every fine-tuning run config has.

  Attributes:
    model: the `TransformerConfig` of the model it starts from (read from it when the run is
      set up; only `train.sft_config.MODEL_MAY_CHANGE` fields may be set).
    peft: the parameter-efficient method (`train.peft_config`; "none" trains every weight).
    quant: quantization-aware training (`train.config.QuantConfig`, `train.qat`); it trains
      every weight, so it is refused beside a `peft` method (QLoRA: `peft.base_quant`).
    optimizer, mesh, checkpoint, train: as pretraining's (`train.config`).
  """

  MODEL_FIELD: ClassVar[str] = "base"  # the field naming the model the run starts from
  MODEL_FLAG: ClassVar[str] = "--model"  # its command-line flag
  MODEL_KIND: ClassVar[str] = "fine-tuning needs a decoder-only (CausalLM) model"

  model: TransformerConfig | None = None
  peft: PEFTConfig = dataclasses.field(default_factory=PEFTConfig)
  quant: config_lib.QuantConfig = dataclasses.field(default_factory=config_lib.QuantConfig)
  optimizer: config_lib.OptimizerConfig = dataclasses.field(
      default_factory=config_lib.OptimizerConfig)
  mesh: config_lib.MeshConfig = dataclasses.field(default_factory=config_lib.MeshConfig)
  checkpoint: config_lib.CheckpointConfig = dataclasses.field(
      default_factory=config_lib.CheckpointConfig)
  train: config_lib.TrainConfig = dataclasses.field(default_factory=config_lib.TrainConfig)

  def __post_init__(self):
    check_types(self)
    start = getattr(self, self.MODEL_FIELD)
    if not start:
      raise ValueError(f"{self.MODEL_FIELD} ({self.MODEL_FLAG}) must name a pretrained model "
                       "or a run dir")
    if self.model is not None and (self.model.num_encoder_layers
                                   or not self.model.num_decoder_layers):
      raise ValueError(f"{self.MODEL_KIND}; {start!r} is not one")
    if self.quant.enabled and self.peft.method != "none":
      raise ValueError(
          f"quant.qat={self.quant.qat!r} with peft.method={self.peft.method!r}: QAT trains "
          "every weight of the model as it will be served, a PEFT method trains an adapter "
          "on a frozen base; use one: quant.qat with peft.method=none, or peft.method=lora "
          "with peft.base_quant=nf4 for a quantized frozen base (QLoRA)")

  def check_seq_len(self, seq_len: int, what: str = "data.seq_len") -> None:
    """A row of `seq_len` tokens must fit the model's `max_len`."""
    if self.model is not None and seq_len > self.model.max_len:
      raise ValueError(f"{what}={seq_len} is above the model's max_len="
                       f"{self.model.max_len}; lower {what}")

  def to_dict(self) -> dict[str, Any]:
    """The JSON of the run (`config.json`): the job's own sections, then the shared ones."""
    d = json.loads(json.dumps(dataclasses.asdict(self)))
    own = [f.name for f in dataclasses.fields(self) if f.name not in SHARED]
    return {k: d[k] for k in own + list(SHARED)}
