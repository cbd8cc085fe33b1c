"""Run configs of `train.sft`: the data, report and run sections, and the presets.

`SFTConfig.model` is the base model's `TransformerConfig`, read from the base when the run is
set up (`train.sft.resolve_model`); only `MODEL_MAY_CHANGE` fields of it may be set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from train import chat_data
from train import config as config_lib
from train.overrides import check_types
from train.run_sections import FineTuneRun

# Model fields a fine-tuning run may change: how the model runs, not what it is.
MODEL_MAY_CHANGE = ("dropout_rate", "attention_dropout_rate", "remat_policy", "scan_layers",
                    "attention", "dtype", "param_dtype", "max_len")


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
  """Where the rows come from and how they become batches.

  Attributes:
    source: `chat` (embedded), `jsonl:PATH` (`.gz` allowed) or `tfds:NAME`.
    seq_len: tokens per row T; a longer example is cut at its end (counted, reported).
    batch_size: rows per step on this host.
    pack: several examples per row (each attends only inside itself); false: one per row.
    num_packing_bins: rows filled at once when packing.
    heldout_fraction: of a jsonl file's rows, held out for evaluation (by a hash of the row).
    chat_template: a Jinja2 chat template (or a path to a `.jinja` file) replacing the model's.
    shuffle, seed: the order of the train examples.
    tfds_data_dir: where `tfds:NAME` is prepared.
  """

  source: str = "chat"
  seq_len: int = 256
  batch_size: int = 8
  pack: bool = True
  num_packing_bins: int = 16
  heldout_fraction: float = 0.05
  chat_template: str | None = None
  shuffle: bool = True
  seed: int = 0
  tfds_data_dir: str | None = None

  def __post_init__(self):
    check_types(self)
    if self.seq_len < 2 or self.batch_size < 1 or self.num_packing_bins < 1:
      raise ValueError("data: seq_len must be >= 2, batch_size and num_packing_bins >= 1")
    if not 0 <= self.heldout_fraction < 1:
      raise ValueError(f"data.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
    kind, _, rest = self.source.partition(":")
    if self.source not in chat_data.EMBEDDED and not (kind in ("jsonl", "tfds") and rest):
      raise ValueError(f"data.source={self.source!r}: use 'chat' (the embedded chat set), "
                       "'jsonl:PATH' or 'tfds:NAME'")

  def template(self) -> str | None:
    t = self.chat_template
    if t and "{" not in t and Path(t).expanduser().is_file():
      return Path(t).expanduser().read_text(encoding="utf-8")
    return t


@dataclasses.dataclass(frozen=True)
class SFTReportConfig:
  """The before/after report: held-out loss, and greedy replies to `replies` held-out chats."""

  replies: int = 3
  max_new_tokens: int = 48

  def __post_init__(self):
    check_types(self)
    if self.replies < 0 or self.max_new_tokens < 1:
      raise ValueError("report: replies must be >= 0 and max_new_tokens >= 1")


@dataclasses.dataclass(frozen=True)
class SFTConfig(FineTuneRun):
  """A fine-tuning run. `base` is the model fine-tuned; `model` is its config (read from the
  base when the run is set up; only `MODEL_MAY_CHANGE` fields may be set). The `model`,
  `peft`, `optimizer`, `mesh`, `checkpoint` and `train` sections are `FineTuneRun`'s."""

  MODEL_KIND = "SFT fine-tunes a decoder-only (CausalLM) model"

  base: str
  data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
  report: SFTReportConfig = dataclasses.field(default_factory=SFTReportConfig)
  eval: config_lib.TaskEvalConfig = dataclasses.field(default_factory=config_lib.TaskEvalConfig)

  def __post_init__(self):
    super().__post_init__()
    if self.peft.method == "prompt" and self.data.pack:
      raise ValueError("peft.method=prompt puts the soft prompt before each row: set "
                       "data.pack=false (one example per row)")
    self.check_seq_len(self.data.seq_len)
    if (self.model is not None and self.report.replies
        and self.report.max_new_tokens > self.model.max_len - 2):
      raise ValueError(f"report.max_new_tokens={self.report.max_new_tokens} does not fit "
                       f"model.max_len={self.model.max_len}")


def _demo() -> SFTConfig:
  # Sized for 2 CPU cores: SmolLM2-135M at 8 x 128 tokens is ~8 s a step (fwd+bwd, fp32).
  return SFTConfig(
      base="smollm2-135m-instruct",
      data=SFTDataConfig(source="chat", seq_len=128, batch_size=8),
      optimizer=config_lib.OptimizerConfig(learning_rate=5e-5, warmup_steps=3, decay_steps=30,
                                           final_lr_fraction=0.1, weight_decay=0.0),
      checkpoint=config_lib.CheckpointConfig(every=10, keep=2),
      train=config_lib.TrainConfig(steps=30, eval_every=0, eval_batches=0, log_every=1,
                                   eval_split="heldout"),
      report=SFTReportConfig(replies=3, max_new_tokens=32))


def _smollm2() -> SFTConfig:
  # The shape of a real run: SmolLM2-135M-Instruct on a jsonl file, 2k-token rows.
  return SFTConfig(
      base="smollm2-135m-instruct",
      data=SFTDataConfig(source="chat", seq_len=2048, batch_size=32),
      optimizer=config_lib.OptimizerConfig(learning_rate=2e-5, warmup_steps=50,
                                           weight_decay=0.0),
      train=config_lib.TrainConfig(steps=2000, eval_every=200, eval_split="heldout"))


PRESETS = {"demo": _demo, "smollm2-135m": _smollm2}


