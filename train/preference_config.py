"""Run configs of `train.reward` and `train.dpo`: the data, loss and run sections, and presets.

`model` is the base model's `TransformerConfig`, read from the base when the run is set up
(`train.sft.resolve_model`); only `train.sft_config.MODEL_MAY_CHANGE` fields may be set.
The `head` field of a reward run ("reward") is what `lmjax.checkpoint.load_run` reads to
restore a `RewardModel` rather than a `CausalLM`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from train import config as config_lib
from train import preference_data
from train.overrides import check_types
from train.preference_losses import LOSS_TYPES
from train.run_sections import FineTuneRun
from train.sft_config import SFTDataConfig


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig(SFTDataConfig):
  """Where the pairs come from and how they become batches (fields as `SFTDataConfig`'s;
  `seq_len` is a row, each side of a pair at most half of it).

  Attributes:
    source: `arithmetic` or `chat` (embedded, `train.preference_data`), `jsonl:PATH`,
      `tfds:NAME`.
    num_pairs, heldout_pairs: pairs the `arithmetic` set generates per split.
    max_steps, max_value: the `arithmetic` problems' operations (1-3) and largest number.
  """

  source: str = "arithmetic"
  num_pairs: int = 2000
  heldout_pairs: int = 200
  max_steps: int = 2
  max_value: int = 20

  def __post_init__(self):
    check_types(self)
    if self.seq_len < 4 or self.batch_size < 1 or self.num_packing_bins < 1:
      raise ValueError("data: seq_len must be >= 4, batch_size and num_packing_bins >= 1")
    if not 0 <= self.heldout_fraction < 1:
      raise ValueError(f"data.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
    if self.num_pairs < 1 or self.heldout_pairs < 1:
      raise ValueError("data.num_pairs and data.heldout_pairs must be >= 1")
    if not 1 <= self.max_steps <= 3 or self.max_value < 2:
      raise ValueError(f"data.max_steps={self.max_steps} must be in [1, 3] and "
                       f"data.max_value={self.max_value} >= 2")
    kind, _, rest = self.source.partition(":")
    if self.source not in preference_data.EMBEDDED and not (kind in ("jsonl", "tfds") and rest):
      raise ValueError(f"data.source={self.source!r}: use {sorted(preference_data.EMBEDDED)} "
                       "(embedded), 'jsonl:PATH' or 'tfds:NAME'")


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
  """DPO's loss (`train.preference_losses.dpo_loss`).

  Attributes:
    beta: the KL strength (0.1 as in TRL).
    loss_type: `sigmoid` (DPO) or `ipo`.
    label_smoothing: the conservative-DPO label noise in [0, 0.5) (sigmoid only).
    precompute_reference: compute the reference's log-probs of every pair once before
      training (one forward pass over the data) instead of a reference forward each step:
      the reference model is then not held while training (TRL's
      `precompute_ref_log_probs`).
  """

  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  precompute_reference: bool = False

  def __post_init__(self):
    check_types(self)
    if self.beta <= 0:
      raise ValueError(f"dpo.beta={self.beta} must be > 0")
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"dpo.loss_type={self.loss_type!r}; types: {list(LOSS_TYPES)}")
    if not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")


@dataclasses.dataclass(frozen=True)
class _PreferenceRun(FineTuneRun):
  """What both jobs share: the base and the pairs (the other sections are `FineTuneRun`'s).

  `peft` (`train.peft_config`): train an adapter (LoRA, QLoRA with `peft.base_quant=nf4`,
  bottleneck adapters) on the frozen base instead of every weight; soft prompts are refused
  (a row packs both responses of a pair as separate segments, which a prompt before the row
  would not reach)."""

  MODEL_KIND = "preference training needs a decoder-only model"
  JOB: ClassVar[str] = "train.reward"

  base: str
  data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)

  def __post_init__(self):
    super().__post_init__()
    if self.peft.method == "prompt":
      raise ValueError(f"peft.method=prompt: soft prompts are not supported by {self.JOB} (a "
                       "row packs a pair's chosen and rejected responses as separate segments, "
                       "which a prompt before the row would not reach); use peft.method=lora "
                       "or peft.method=adapter")
    self.check_seq_len(self.data.seq_len)


@dataclasses.dataclass(frozen=True)
class RewardConfig(_PreferenceRun):
  """A reward-model run (`python -m train.reward`). `head` marks the run dir as a reward
  model's for `load_run`; it is always "reward". With `peft`, the fresh `score` head trains
  in full beside the adapter (Hugging Face PEFT's `modules_to_save=["score"]`)."""

  head: str = "reward"

  def __post_init__(self):
    super().__post_init__()
    if self.head != "reward":
      raise ValueError(f"head={self.head!r}: a reward run's head is 'reward'")


@dataclasses.dataclass(frozen=True)
class DPOConfig(_PreferenceRun):
  """A DPO run (`python -m train.dpo`); the reference model is the base, frozen (with `peft`:
  the base without the adapter, from the same arrays)."""

  JOB = "train.dpo"

  dpo: DPOLossConfig = dataclasses.field(default_factory=DPOLossConfig)


def _optimizer(lr: float, steps: int) -> config_lib.OptimizerConfig:
  return config_lib.OptimizerConfig(learning_rate=lr, warmup_steps=max(1, steps // 10),
                                    decay_steps=steps, final_lr_fraction=0.1, weight_decay=0.0)


def _train(steps: int) -> config_lib.TrainConfig:
  return config_lib.TrainConfig(steps=steps, eval_every=0, eval_batches=0, log_every=1,
                                eval_split="heldout")


def _demo_data() -> PreferenceDataConfig:
  # One-step problems on numbers up to 10: a pair is ~170 tokens (SmolLM2's chat template and
  # its default system prompt included), two pairs packed per 384-token row.
  return PreferenceDataConfig(source="arithmetic", seq_len=384, batch_size=2, num_pairs=400,
                              heldout_pairs=48, max_steps=1, max_value=10)


def _reward_demo() -> RewardConfig:
  # SmolLM2-135M-Instruct on the arithmetic pairs, sized for 2 CPU cores (about 10 minutes):
  # 50 steps of 4 pairs at 1e-4 (30 steps at 5e-5 left held-out accuracy at 0.60; the fresh
  # score head moves slowly at a small learning rate).
  return RewardConfig(
      base="smollm2-135m-instruct", data=_demo_data(), optimizer=_optimizer(1e-4, 50),
      checkpoint=config_lib.CheckpointConfig(every=25, keep=2), train=_train(50))


def _dpo_demo() -> DPOConfig:
  return DPOConfig(
      base="smollm2-135m-instruct", data=_demo_data(), optimizer=_optimizer(1e-5, 30),
      checkpoint=config_lib.CheckpointConfig(every=15, keep=2), train=_train(30))


def _smollm2(cls, lr):
  def make():
    return cls(base="smollm2-135m-instruct",
               data=PreferenceDataConfig(source="chat", seq_len=1024, batch_size=32),
               optimizer=config_lib.OptimizerConfig(learning_rate=lr, warmup_steps=50,
                                                    weight_decay=0.0),
               train=config_lib.TrainConfig(steps=1000, eval_every=100, eval_split="heldout"))
  return make


REWARD_PRESETS = {"demo": _reward_demo, "smollm2-135m": _smollm2(RewardConfig, 1e-5)}
DPO_PRESETS = {"demo": _dpo_demo, "smollm2-135m": _smollm2(DPOConfig, 5e-7)}
