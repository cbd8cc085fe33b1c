"""What distillation trains and what it freezes: the student (in full, or a PEFT adapter on its
frozen pretrained weights) beside the frozen teacher.

    --set peft.method=lora peft.rank=8      # LoRA (Hu et al., 2021) on the student

Without `peft` the student's params train and the teacher is `train.trainer.Frozen`; the loss
gets `{"student": student, "teacher": teacher}` (`train.distill_losses.kd_loss`). With `peft`
(`train.peft_train`) only the adapter trains; the frozen tree holds the student's base and the
teacher, `{"student": base, "teacher": teacher}`, and the loss gets the student as the base
with the adapter (`lmjax.peft.Adapted`, run by the `PeftModel` the trainer holds). With the
teacher's top-k stored beside the data (`kd.teacher=stored`) there is no teacher in the step:
the frozen tree is the student's base alone, or nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lmjax
from train import peft_train
from train.distill_config import DistillConfig
from train.trainer import Frozen


def live_teacher(config: DistillConfig) -> bool:
  """Whether the teacher runs in the train step (not with its top-k stored beside the data)."""
  return config.kd.teacher != "stored"


@functools.lru_cache(maxsize=8)
def peft_setup(config: DistillConfig) -> peft_train.PeftSetup | None:
  """The `peft` section's adapter and frozen student base; None: the student trains in full."""
  if not config.peft.enabled:
    return None
  return peft_train.setup(config.peft, lmjax.model_for(config.model),
                          lmjax.peft.boxed_abstract(config.model))


def partition(config: DistillConfig) -> tuple[Callable | None, Frozen | None]:
  """`Job.partition`: `(init_params, frozen)` of the trainer (see the module docstring)."""
  ps = peft_setup(config)
  if not live_teacher(config):
    return (ps.init_params, ps.frozen) if ps else (None, None)
  teacher = lmjax.peft.boxed_abstract(config.teacher_model)
  if ps is None:
    return None, Frozen(teacher, lambda student, teacher: {"student": student,
                                                           "teacher": teacher})

  def combine(adapter, frozen):
    return {"student": ps.combine(adapter, frozen["student"]), "teacher": frozen["teacher"]}

  return ps.init_params, Frozen({"student": ps.abstract, "teacher": teacher}, combine)


def frozen_value(config: DistillConfig, load_student: Callable[[], Any],
                 load_teacher: Callable[[], Any]) -> Any:
  """`Job.frozen_params`: the values of `partition`'s frozen tree (the loaders are called only
  for what it holds)."""
  ps = peft_setup(config)
  student = ps.frozen_value(load_student()) if ps else None
  if not live_teacher(config):
    return student
  teacher = load_teacher()
  return teacher if ps is None else {"student": student, "teacher": teacher}


def student_params(config: DistillConfig, trainable: Any, frozen: Any) -> Any:
  """The student's params as `infer` and `lmjax.CausalLM` take them (to sample rollouts): the
  trainable params themselves, or with `peft` the base with the adapter (`Adapted`)."""
  ps = peft_setup(config)
  if ps is None:
    return trainable
  return ps.adapted(trainable, frozen["student"] if live_teacher(config) else frozen)
