"""The Hugging Face side of the training benchmarks: one set-up for every TRL trainer we time.

Each benchmark (sft.py, distill.py, preference.py) runs a TRL trainer on the very examples lmjax
trains on, in lmjax's order, with the same optimizer settings. What they share lives here: the
model loading (float32, eager attention: what lmjax's reference attention computes), a callback
that times each optimizer step and keeps the logged losses, a trainer subclass that reads the
dataset in order, and the training arguments they have in common.
"""

from __future__ import annotations

import time


def causal_lm(folder, kind: str = "causal"):
  """A transformers model from `folder` in float32 with eager attention (`kind`: causal|reward)."""
  import torch
  from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

  cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
  return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def step_timer():
  """A `TrainerCallback` keeping each step's seconds (`times`) and its logs (`logs[step]`)."""
  from transformers import TrainerCallback

  class Timer(TrainerCallback):
    def __init__(self):
      self.t, self.times, self.logs = None, [], {}

    def on_step_begin(self, args, state, control, **kw):
      self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      self.times.append(time.perf_counter() - self.t)

    def on_log(self, args, state, control, logs=None, **kw):
      if logs and "loss" in logs:
        self.logs[state.global_step] = dict(logs)

  return Timer()


def in_order(trainer_cls, *, pretokenized: bool = False):
  """`trainer_cls` reading its dataset in order (lmjax's order); `pretokenized` skips TRL's
  own tokenization (the rows already hold lmjax's token ids)."""
  from torch.utils.data import SequentialSampler

  class InOrder(trainer_cls):
    def _get_train_sampler(self, *a, **kw):
      return SequentialSampler(self.train_dataset)

    if pretokenized:
      def _prepare_dataset(self, dataset, *a, **kw):
        return dataset

  return InOrder


def args(config_cls, out: str, *, batch: int, steps: int, learning_rate: float, **extra):
  """`config_cls(...)` with the settings every benchmark shares: constant learning rate, AdamW
  (beta2 0.95, no weight decay), clipping at 1, a log each step, CPU float32, no saving."""
  return config_cls(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                    learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
                    adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0,
                    dataloader_num_workers=0, disable_tqdm=True, **extra)


def batch_lengths(trainer, n: int) -> list[int]:
  """Real (attended) tokens of the trainer's first `n` batches, as its data loader gives them."""
  lens = []
  for b in trainer.get_train_dataloader():
    lens.append(int(b["attention_mask"].sum()))
    if len(lens) == n:
      break
  return lens


def summary(timer, lens, steps: int, warmup: int) -> dict:
  """Tokens/s and seconds per step over the steps after `warmup`, with the thread count."""
  import torch

  t, n = sum(timer.times[warmup:]), sum(lens[warmup:])
  return {"tokens_per_s": n / t, "step_s": t / steps, "real_tokens_per_step": n / steps,
          "threads": torch.get_num_threads()}
