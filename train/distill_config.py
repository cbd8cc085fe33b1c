"""Run configs of `train.distill`: teacher, student, method, data, loss, generation, presets.

`DistillConfig.model` is the student's `TransformerConfig` and `teacher_model` the teacher's,
both read when the run is set up (`train.distill.resolve_models`). A student named by an
`lmjax.PRESETS` name is a new model (fresh init) given the teacher's vocabulary, and any
`model.*` key may be set; a pretrained student or a run dir keeps its shape (only
`train.sft_config.MODEL_MAY_CHANGE` keys), as does the teacher (`teacher_model.*`).

`peft` (`train.peft_config`, e.g. `--set peft.method=lora peft.rank=8`): the student trains an
adapter on its frozen pretrained weights (`train.distill_peft`). `check_method` checks what a
method needs before any work.
"""

from __future__ import annotations

import dataclasses

import lmjax
from lmjax.config import TransformerConfig
from train import config as config_lib
from train.distill_data import GenerateConfig
from train.distill_losses import KDConfig
from train.overrides import check_types
from train.run_sections import FineTuneRun
from train.sft_config import SFTDataConfig

METHODS = ("data", "kd", "on-policy")
SYNTHETIC = "synthetic"  # data.source: the teacher's generated set in WORKDIR/synthetic.jsonl
SYNTHETIC_FILE = "synthetic.jsonl"


@dataclasses.dataclass(frozen=True)
class DistillDataConfig(SFTDataConfig):
  """SFT's data section (`train.sft_config.SFTDataConfig`), whose `source` may also be
  `synthetic`: the teacher's own answers, generated first (`generate.*`)."""

  source: str = SYNTHETIC
  heldout_fraction: float = 0.1

  def __post_init__(self):
    if self.source == SYNTHETIC:  # Check every other field as SFT's section does.
      dataclasses.replace(self, source="chat")
    else:
      super().__post_init__()


@dataclasses.dataclass(frozen=True)
class DistillReportConfig:
  """The end-of-run comparison.

  Attributes:
    real_text: an SFT source whose held-out split is human text (`chat`: the embedded chat
      set), evaluated beside the data's own held-out split (teacher samples when synthetic).
    baseline: also train the same student with cross entropy only on the same batches
      (`WORKDIR/baseline`) and compare.
  """

  real_text: str = "chat"
  baseline: bool = False

  def __post_init__(self):
    check_types(self)
    SFTDataConfig(source=self.real_text)  # The same sources SFT reads.


@dataclasses.dataclass(frozen=True)
class DistillConfig(FineTuneRun):
  """A distillation run: `teacher` into `student` by `method` (the shared sections:
  `train.run_sections.FineTuneRun`; `model` is the student's config)."""

  MODEL_FIELD = "student"
  MODEL_FLAG = "--student"
  MODEL_KIND = "the student must be a decoder-only (CausalLM) model"

  teacher: str = "smollm2-135m-instruct"
  student: str = "smollm2-student"
  method: str = "kd"
  data: DistillDataConfig = dataclasses.field(default_factory=DistillDataConfig)
  generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
  kd: KDConfig = dataclasses.field(default_factory=KDConfig)
  teacher_model: TransformerConfig | None = None
  report: DistillReportConfig = dataclasses.field(default_factory=DistillReportConfig)

  def __post_init__(self):
    super().__post_init__()
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}; methods are {METHODS}")
    if not self.teacher:
      raise ValueError("teacher (--teacher) must name a pretrained model or a run dir")
    if self.teacher_model is not None and (self.teacher_model.num_encoder_layers
                                           or not self.teacher_model.num_decoder_layers):
      raise ValueError("the teacher must be a decoder-only (CausalLM) model")
    self.check_seq_len(self.data.seq_len)
    if self.teacher_model is not None and self.data.seq_len > self.teacher_model.max_len:
      raise ValueError(f"data.seq_len={self.data.seq_len} is above the teacher's max_len="
                       f"{self.teacher_model.max_len}; lower data.seq_len")
    if self.model is not None and self.teacher_model is not None:
      check_vocab(self.teacher_model.vocab_size, self.model.vocab_size)


def check_vocab(teacher: int, student: int) -> None:
  """Teacher and student must share the vocabulary (distributions over the same ids)."""
  if teacher != student:
    raise ValueError(f"the teacher's vocabulary has {teacher} ids and the student's {student}: "
                     "distillation compares distributions over the same token ids, so both "
                     "must use the teacher's tokenizer (a new student takes the teacher's "
                     "vocab_size; give a student with the same vocabulary)")


def with_source(config: DistillConfig, source: str) -> DistillConfig:
  """`config` reading `data.source=source`."""
  return dataclasses.replace(config, data=dataclasses.replace(config.data, source=source))


def is_new_student(student: str) -> bool:
  """A student named by an `lmjax.PRESETS` name is a new model (fresh init)."""
  return student in lmjax.PRESETS


def check_method(config: DistillConfig) -> None:
  """What the method (and the `peft` section) needs, checked before any work."""
  jsonl = config.data.source == SYNTHETIC or config.data.source.startswith("jsonl:")
  if config.method == "data" and not jsonl:
    raise ValueError(f"--method data trains on the teacher's answers: data.source must be "
                     f"'synthetic' (or a jsonl file of them), not {config.data.source!r}")
  if config.kd.teacher == "stored":
    if config.method != "kd":
      raise ValueError(f"kd.teacher=stored is for --method kd (on-policy samples need the live "
                       f"teacher), not --method {config.method}")
    if config.generate.store_topk < 1:
      raise ValueError("kd.teacher=stored needs generate.store_topk=K >= 1 (how many of the "
                       "teacher's log-probs per token to store beside the data)")
    if not jsonl:
      raise ValueError(f"kd.teacher=stored stores the teacher's top-k beside a jsonl file: "
                       f"data.source must be 'synthetic' or jsonl:PATH, not "
                       f"{config.data.source!r}")
  if not config.peft.enabled:
    return
  if is_new_student(config.student):
    raise ValueError(f"peft.method={config.peft.method} trains an adapter on a pretrained "
                     f"student's frozen weights; the student {config.student!r} is a new model "
                     "(give a pretrained name or path, or a run dir, or drop peft.method)")
  if config.peft.method == "prompt":
    if config.method == "on-policy":
      raise ValueError("peft.method=prompt is not supported with --method on-policy (the "
                       "virtual tokens shift the rollout's positions); use peft.method=lora "
                       "or adapter")
    if config.data.pack:
      raise ValueError("peft.method=prompt puts the soft prompt before each row: set "
                       "data.pack=false (one example per row)")


def _demo() -> DistillConfig:
  # Sized for 2 CPU cores (about 15 minutes when the machine is quiet): the teacher answers 48
  # chat and 48 arithmetic prompts (~2 min), then a ~17M student learns from its answers with KD
  # (~5 s a step: the teacher's forward dominates) and again with CE only (~1.5 s a step).
  return DistillConfig(
      data=DistillDataConfig(seq_len=128, batch_size=8),
      generate=GenerateConfig(prompts="chat+arithmetic", num_prompts=48, max_new_tokens=48),
      kd=KDConfig(alpha=0.5, temperature=1.0, beta=0.0),
      optimizer=config_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                           final_lr_fraction=0.1, weight_decay=0.01),
      checkpoint=config_lib.CheckpointConfig(every=50, keep=2),
      train=config_lib.TrainConfig(steps=80, eval_every=0, eval_batches=0, log_every=10,
                                   eval_split="heldout"),
      report=DistillReportConfig(real_text="chat", baseline=True))


def _smollm2() -> DistillConfig:
  # The shape of a real run: the whole chat set, longer answers and rows, more steps.
  return DistillConfig(
      data=DistillDataConfig(seq_len=512, batch_size=32),
      generate=GenerateConfig(prompts="chat", num_prompts=0, max_new_tokens=256),
      optimizer=config_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=100),
      train=config_lib.TrainConfig(steps=3000, eval_every=500, eval_split="heldout"))


PRESETS = {"demo": _demo, "smollm2": _smollm2}
