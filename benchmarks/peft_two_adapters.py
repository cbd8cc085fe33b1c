"""Two LoRA adapters on one base, swapped per request: the PEFT demo of `train.sft`.

1. `python -m train.sft`'s job trains two LoRA adapters (r=8, query and value) on
   SmolLM2-135M-Instruct, one per task of the embedded data: `chat` (the embedded English chat
   set) and `arithmetic` (`train.arithmetic` word problems with worked solutions, written as
   chat rows). Each run writes its adapter in Hugging Face PEFT's format (`WORKDIR/adapter/`).
2. Both adapters are loaded on one copy of the base (`lmjax.peft.stack`); every held-out
   figure comes from that bank with each row's adapter named (`lmjax.peft.with_rows`), one
   compiled program for all: held-out loss of each task under the base, adapter `chat` and
   adapter `arithmetic`.
3. One `infer.generate` call answers arithmetic test problems twice, each prompt once with
   each adapter (`adapter=[...]` per row, greedy), and chat prompts beside them: arithmetic
   accuracy per adapter (`train.arithmetic.is_correct`).

    python benchmarks/peft_two_adapters.py [--steps 30] [--workdir /tmp/peft-demo]

Writes benchmarks/results/peft_two_adapters.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import infer  # noqa: E402
import lmjax  # noqa: E402
from infer import prompts as prompt_lib  # noqa: E402
from lmjax import peft  # noqa: E402
from train import arithmetic, chat_data, objectives, sft  # noqa: E402

NAMES = ("chat", "arithmetic")


def arithmetic_rows(n: int, split: str) -> list[dict]:
  return [{"messages": [{"role": "user", "content": p["prompt"]},
                        {"role": "assistant", "content": p["solution"]}], "answer": p["answer"]}
          for p in arithmetic.problems(n, seed=0, split=split)]


def train_adapter(source: str, workdir: Path, steps: int, seq_len: int, batch: int) -> dict:
  sets = [f"data.source={source}", f"data.seq_len={seq_len}", f"data.batch_size={batch}",
          f"train.steps={steps}", "train.log_every=10", "train.progress_bar=false",
          "train.eval_batches=0", "optimizer.learning_rate=2e-3", "optimizer.warmup_steps=2",
          f"optimizer.decay_steps={steps}", "checkpoint.every=0", "report.replies=0",
          "mesh.data=1", "peft.method=lora", "peft.rank=8", "peft.alpha=16",
          "peft.targets=query,value"]
  config = sft.resolve_model(sft.PRESETS["demo"](), sets)
  t0 = time.perf_counter()
  sft.run(config, workdir)
  return {"train_s": time.perf_counter() - t0, "sets": sets}


def heldout_loss(loss_fn, bank, rows_of, config, tok, names) -> dict:
  """Mean held-out loss of each task under each adapter (None: the base), from the bank."""
  out = {}
  for task, rows in rows_of.items():
    examples, _ = chat_data.encode_rows(rows, tok, config.data.seq_len)
    out[task] = {}
    for name in (None, *names):
      total = count = 0.0
      for b in sft.make_batches(config, tok, "heldout", examples):
        s, n = loss_fn(peft.with_rows(bank, [name] * config.data.batch_size), b)
        total, count = total + float(s), count + float(n)
      out[task][name or "base"] = total / count
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--problems", type=int, default=16)
  ap.add_argument("--workdir", default=None)
  a = ap.parse_args()
  load_start = os.getloadavg()
  root = Path(a.workdir or tempfile.mkdtemp(prefix="peft-demo-"))
  root.mkdir(parents=True, exist_ok=True)
  data = root / "arithmetic.jsonl"
  data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                          for r in arithmetic_rows(400, "train")))
  runs = {"chat": train_adapter("chat", root / "chat", a.steps, a.seq_len, a.batch),
          "arithmetic": train_adapter(f"jsonl:{data}", root / "arithmetic", a.steps, a.seq_len,
                                      a.batch)}

  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.model_for(cfg)
  adapters = {n: peft.load_adapter(root / n / "adapter", cfg) for n in NAMES}
  bank = peft.stack(params, adapters)  # one base, both adapters
  config = sft.resolve_model(sft.PRESETS["demo"](), [f"data.seq_len={a.seq_len}",
                                                      f"data.batch_size={a.batch}"])
  pmodel = peft.PeftModel(model)
  loss_fn = jax.jit(lambda p, b: objectives.causal_lm_loss(pmodel, p, b, jax.random.key(0),
                                                           False)[:2])
  test = arithmetic_rows(a.problems * 4, "test")
  rows_of = {"chat": chat_data.load_rows("chat", "heldout"),
             "arithmetic": [chat_data.Row({"messages": r["messages"]}, f"test {i}")
                            for i, r in enumerate(test)]}
  losses = heldout_loss(loss_fn, bank, rows_of, config, tok, NAMES)

  # one generate call: each arithmetic problem under both adapters, and two chat prompts
  problems = test[:a.problems]
  asks = [prompt_lib.render_chat(r["messages"][:1], tok) for r in problems]
  chats = [prompt_lib.render_chat([{"role": "user", "content": q}], tok)
           for q in ("Hello, how are you?", "What is your favorite book?")]
  prompts = asks + asks + chats + chats
  rows = (["arithmetic"] * len(asks) + ["chat"] * len(asks) + ["chat"] * len(chats)
          + ["arithmetic"] * len(chats))
  t0 = time.perf_counter()
  out = infer.generate(model, bank, prompts, tokenizer=tok, adapter=rows, max_new_tokens=48,
                       sampler=infer.sampling.Greedy())
  gen_s = time.perf_counter() - t0
  acc = {}
  for j, name in enumerate(("arithmetic", "chat")):
    texts = out.text[j * len(asks):(j + 1) * len(asks)]
    acc[name] = float(np.mean([arithmetic.is_correct(t, r["answer"])
                               for t, r in zip(texts, problems)]))
  n = 2 * len(asks)
  samples = [{"adapter": rows[i], "prompt": prompts[i][-120:], "reply": out.text[i]}
             for i in (0, len(asks), n, n + 1, n + 2, n + 3)]
  better = all(losses[t][t] < min(v for k, v in losses[t].items() if k != t) for t in NAMES)
  print(json.dumps({"heldout_loss": losses, "arithmetic_accuracy_by_adapter": acc}, indent=2))
  for s in samples:
    print(f"[{s['adapter']}] {s['reply'][:100]!r}")
  print("each adapter is best on its own task:", better)
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          "(a shared 2-core machine)")
  path = common.write("peft_two_adapters", {
      "model": "SmolLM2-135M-Instruct", "runs": runs, "heldout_loss": losses,
      "arithmetic_accuracy_by_adapter": acc, "arithmetic_problems": len(problems),
      "each_adapter_best_on_its_task": better, "generate_s": gen_s,
      "generate_rows": len(prompts), "samples": samples, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
