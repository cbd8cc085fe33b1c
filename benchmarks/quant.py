"""Weight quantization of SmolLM2-135M-Instruct: quality and batch-1 decode speed per format.

Formats: float32, bfloat16, packed float32/bfloat16 (`lmjax.packed`, the speed baselines),
`lmjax.quant` int8 (per channel), int4 and NF4 (groups of 64), packed int8 (the same int8
codes output-major, `lmjax.packed.pack(model, params, "int8")`), packed int4 (two codes per
byte output-major, a scale and an offset per 32 inputs, `pack(model, params, "int4")`;
`packed-int4-64`: groups of 64, `packed-int4-sym`: symmetric, no offset; the embedding int8
per row), packed NF4 (the same layout with QLoRA's NormalFloat4 codes, an absmax per 64
inputs, `pack(model, params, "nf4")`), the GGUF's own Q4_1 blocks kept as they are
(`load_pretrained(..., quant="keep")`) and those blocks packed (`packed-q4_1-kept`); a packed
int4 name ending in `-a8` (`packed-int4-a8`) with int8 activations (`lmjax.quant.cpu_int4`).

* Quality: perplexity on held-out text (the first 4 x 256 tokens of the embedded Shakespeare
  corpus, one forward each), and greedy agreement with float32 over 128 new tokens (the
  fraction of positions where the tokens match, up to the first difference and overall).
* Speed: batch 1, a 128-token prompt, 128 greedy tokens; decode tokens/s `127 / (t(128) -
  t(1))` as in benchmarks/pretrained_decode.py, best of `--repeats`, interleaved; each against
  packed float32 measured in the same run. Model bytes per format; load seconds (reading the
  file, quantizing and packing; the first format pays the imports).

    python benchmarks/quant.py [--repeats 2] [--formats float32,packed-int8,...]

Writes benchmarks/results/quant.json. CPU figures are relative only; the machine's load is
recorded.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import infer  # noqa: E402
import lmjax  # noqa: E402
import lmjax.peft  # noqa: E402,F401  (infer.decode checks lmjax.peft.Adapted)
import lmjax.quant.packed_int4  # noqa: E402,F401
from infer.sampling import Greedy  # noqa: E402

PROMPT, NEW, CACHE, PPL_LEN, PPL_ROWS = 128, 128, 256, 256, 4
CORPUS = Path(__file__).resolve().parents[1] / "train" / "corpora" / "shakespeare.txt.gz"


def load(fmt: str):
  if fmt.endswith("-a8"):  # packed int8 / int4 with int8 activations (lmjax.quant.cpu_int*)
    cfg, params, tok = load(fmt.removesuffix("-a8"))
    if getattr(params, "fmt", None) not in ("int8", "int4"):
      raise ValueError(f"{fmt}: -a8 (int8 activations) is for packed int8 / int4 formats")
    return cfg, params.replace(activations="int8"), tok
  if fmt in ("q4_1-kept", "packed-q4_1-kept"):
    cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct", quant="keep")
    if fmt.startswith("packed-"):  # the GGUF's Q4_1 codes, scales and minimums, packed
      params = lmjax.packed.pack(lmjax.CausalLM(cfg), params, "int4")
    return cfg, params, tok
  dtype = "bfloat16" if fmt == "bfloat16" else "float32"
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct", dtype=dtype)
  model = lmjax.CausalLM(cfg)
  if fmt.startswith("packed-int4"):  # packed-int4 (groups of 32), packed-int4-64, -sym
    parts = fmt.split("-")[2:]
    group = int(next((p for p in parts if p.isdigit()), 32))
    params = lmjax.quant.packed_int4.pack(model, params, group_size=group,
                                          symmetric="sym" in parts)
  elif fmt.startswith("packed-"):  # packed-float32, packed-bfloat16, packed-int8
    params = lmjax.packed.pack(model, params, fmt.split("-")[1])
  elif fmt in lmjax.quant.MODEL_FORMATS:
    params = lmjax.quant.quantize(model, params, fmt)
  return cfg, params, tok


def forward(model, params):
  if isinstance(params, lmjax.quant.QuantParams):
    return jax.jit(lambda p, t: lmjax.quant.apply(model, p, t))
  if isinstance(params, lmjax.packed.PackedParams):
    return jax.jit(lambda p, t: lmjax.packed.apply(model, p, t))
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


def perplexity(model, params, ids) -> float:
  f = forward(model, params)
  nll = []
  for r in range(PPL_ROWS):
    t = jnp.asarray(ids[r * PPL_LEN:(r + 1) * PPL_LEN])[None]
    lp = jax.nn.log_softmax(f(params, t)[0, :-1].astype(jnp.float32), -1)
    nll.append(-np.asarray(jnp.take_along_axis(lp, t[0, 1:, None], -1))[:, 0])
  return float(np.exp(np.mean(np.concatenate(nll))))


def chunked_perplexity(model, params, ids, chunk: int = 16) -> float:
  """`perplexity` with each row fed `chunk` tokens at a time through the KV cache: products of
  `chunk` rows, so the few-row decode paths (`lmjax.quant.cpu_int4`) compute every logit."""
  apply = (functools.partial(lmjax.packed.apply, model)
           if isinstance(params, lmjax.packed.PackedParams)
           else lambda p, *a, **k: model.apply({"params": p}, *a, **k))
  first = jax.jit(lambda p, t, c: apply(p, t, cache=c, prefill=True))
  step = jax.jit(lambda p, t, c: apply(p, t, cache=c))
  nll = []
  for r in range(PPL_ROWS):
    row = np.asarray(ids[r * PPL_LEN:(r + 1) * PPL_LEN])
    cache = lmjax.init_cache(model.config, 1, PPL_LEN)
    logits = []
    for i in range(0, PPL_LEN, chunk):
      out, cache = (first if i == 0 else step)(params, jnp.asarray(row[i:i + chunk])[None],
                                               cache)
      logits.append(out[0])
    lp = jax.nn.log_softmax(jnp.concatenate(logits)[:-1].astype(jnp.float32), -1)
    nll.append(-np.asarray(jnp.take_along_axis(lp, jnp.asarray(row[1:, None]), -1))[:, 0])
  return float(np.exp(np.mean(np.concatenate(nll))))


def decode_seconds(runs: dict, repeats: int) -> dict:
  """Best-of-`repeats` seconds of `NEW - 1` decode steps per run: `t(NEW) - t(1)` of each
  `run(n)`, every run interleaved so a load that changes weighs on all alike. Each run's best
  `t(1)` (the prompt's prefill and the first token: time to first token) is stored in
  `runs[f]["first_token_s"]`."""
  best = {f: float("inf") for f in runs}
  for r in runs.values():
    r["first_token_s"] = float("inf")
  for _ in range(repeats):
    for f, r in runs.items():
      t0 = time.perf_counter()
      r["run"](1)
      t1 = time.perf_counter()
      r["run"](NEW)
      t2 = time.perf_counter()
      best[f] = min(best[f], (t2 - t1) - (t1 - t0))
      r["first_token_s"] = min(r["first_token_s"], t1 - t0)
  return best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--formats", default="float32,bfloat16,packed-float32,packed-bfloat16,int8,"
                  "int4,nf4,q4_1-kept,packed-int8,packed-int4,packed-nf4,packed-q4_1-kept")
  ap.add_argument("--name", default="quant",
                  help="results file benchmarks/results/NAME.json (a --formats subset: another)")
  args = ap.parse_args()
  load0 = os.getloadavg()
  bandwidth = common.memory_bandwidth(256)
  text = gzip.open(CORPUS, "rt").read()
  text = text[len(text) // 2:]  # held out: the second half
  runs, rows = {}, []
  for fmt in args.formats.split(","):
    t0 = time.perf_counter()
    cfg, params, tok = load(fmt)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    model = lmjax.CausalLM(cfg)
    ids = tok.encode(text[:40_000])
    prompt = ids[:PROMPT]

    def run(n, model=model, params=params, prompt=prompt):
      return infer.generate(model, params, [prompt], max_new_tokens=n, sampler=Greedy(),
                            ignore_eos=True, add_bos=False, cache_size=CACHE)
    out = run(NEW).tokens[0]
    run(1)
    runs[fmt] = {"run": run, "tokens": out}
    rows.append({"format": fmt, "MB": lmjax.quant.nbytes(params) if not isinstance(
        params, lmjax.packed.PackedParams) else sum(x.nbytes for x in jax.tree.leaves(params)),
                 "perplexity": perplexity(model, params, ids[PROMPT:]), "load_s": load_s})
    rows[-1]["MB"] /= 1e6
    print(f"{fmt}: {rows[-1]['MB']:.1f} MB, perplexity {rows[-1]['perplexity']:.3f}", flush=True)
  best = decode_seconds(runs, args.repeats)
  ref = runs.get("float32", next(iter(runs.values())))["tokens"]
  base = (NEW - 1) / best.get("packed-float32", next(iter(best.values())))
  for row in rows:
    f = row["format"]
    toks = runs[f]["tokens"]
    same = [a == b for a, b in zip(toks, ref)]
    row["agree_prefix"] = (same + [False]).index(False) / len(ref)
    row["agree_all"] = float(np.mean(same))
    row["decode_tok_s"] = (NEW - 1) / best[f]
    row["first_token_s"] = runs[f]["first_token_s"]
    row["vs_packed_f32"] = row["decode_tok_s"] / base
    if "packed-bfloat16" in best:
      row["vs_packed_bf16"] = row["decode_tok_s"] * best["packed-bfloat16"] / (NEW - 1)
    row["roofline_tok_s"] = bandwidth / (row["MB"] * 1e6)
  cols = ["format", "MB", "load_s", "perplexity", "agree_prefix", "agree_all", "decode_tok_s",
          "first_token_s", "vs_packed_f32", "vs_packed_bf16", "roofline_tok_s"]
  print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; load {load0} -> {os.getloadavg()}")
  print(common.table(rows, cols))
  path = common.write(args.name, {"rows": rows, "bandwidth_bytes_per_s": bandwidth,
                                "load_start": load0, "load_end": os.getloadavg()})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
