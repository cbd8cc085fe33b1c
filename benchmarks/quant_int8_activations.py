"""int8 activations (dynamic, per token) against packed int8 weight-only products on XLA:CPU.

LLM.int8() / SmoothQuant-style W8A8 (Dettmers et al., 2022; Xiao et al., 2023) quantizes each
activation row to int8 with its own absmax scale and multiplies int8 x int8 into int32, which
pays where the hardware has fast integer dot products and the backend emits them. This times,
on SmolLM2-135M-shaped matrices (a chain of `LAYERS` products `[M, 576] x [1536, 576]^T`, each
input depending on the last output), per row count M:

- `weight_only`: the packed int8 reader (`lmjax.packed._matmul_t` on int8 codes with one
  scale per output: one streamed loop per output at M = 1, `lmjax.packed_rows` at 2-16 rows,
  a float32 matmul on the dequantized matrix beyond);
- `int8_x_int8`: each row quantized to int8 (absmax / 127), `jax.lax.dot_general(...,
  preferred_element_type=int32)` with the same int8 codes `[N, K]`, rescaled by both scales;
- `float32`: `x @ w.T` on the float32 matrix (for scale).

SmolLM2-135M (`--sections smollm2`), the opt-in `lmjax.packed.pack(model, params, "int8",
activations="int8")` against packed int8 weight-only and the float32 params, in one process:

- prefill seconds (a forward of the prompt into an empty KV cache, logits of every position,
  as `infer.generate` prefills) of a 128- and a 512-token prompt, interleaved, best of
  `--prefill-iters`;
- the crossover: prefills of 8, 16 and 32 tokens with the int8 x int8 product forced on at any
  row count (`INT8_ACT_MIN_ROWS` set to 1 while tracing) against weight-only;
- perplexity on held-out text (`benchmarks/quant.py`'s: 256-token windows of the second half of
  the Shakespeare corpus, `--ppl-windows` of them) and greedy agreement with float32 over 64 new
  tokens after each of 4 128-token prompts, decoded one at a time (`infer.generate`; the
  int8-activation prompt is prefilled int8 x int8, its decode steps are weight-only): the mean
  fraction before the first difference, and of all positions.

    python benchmarks/quant_int8_activations.py [--rows 1,16,32,64,128] [--sections chain,smollm2]

Measured (2026-11-30, a 2-core AVX-512 VNNI CPU under load ~5-6; an earlier run at ~9-11
agreed): at one row XLA's integer product is ~55x slower than the packed int8 row loop (48 ms
against 0.9 ms: no streamed loop for an int32 product), so batch-1 decoding keeps weight-only
int8; at 16 / 32 / 64 / 128 rows it is 1.7x / 7.6x / 5.0x / 3.0x faster than the weight-only
reader (which dequantizes the matrix for more than 16 rows) and 1.4-2.2x faster than a float32
matmul. SmolLM2-135M (`--sections smollm2`, load ~4.1 -> 6.3): prefill of 128 tokens 222 ms
with int8 activations against 553 ms packed int8 weight-only (2.5x) and 313 ms float32 (1.4x);
512 tokens 1068 ms against 1472 ms (1.4x) and 1224 ms (1.15x: the LM head `[512, 576] x
[49152, 576]` and the float attention weigh more, and XLA's int8 dot is only ~1.3x a float32
one at the head's size); a run before, at load ~5.5: 3.1x / 1.6x and 1.4x / 1.1x. Crossover
(int8 x int8 forced on): 2.4x at 8 tokens, 1.5x at 16, 7.1x at 32 (the first run: 1.6x, 1.5x,
3.6x), so `INT8_ACT_MIN_ROWS` = 17 costs ~20 ms on short prompts and leaves
`lmjax.packed_rows` as it is. Perplexity over 2048 held-out tokens: float32 39.75, int8
weight-only 41.08 (1.033x), int8 activations 42.32 (1.065x). Greedy, 4 prompts x 64 tokens:
weight-only matches float32 for 30% of the tokens before the first difference on average (42%
of all positions), int8 activations for 6% (15%): the quantized prefill moves the first
tokens' logits.

Writes benchmarks/results/quant_int8_activations.json (best of `--iters`, the machine's load
before and after; CPU figures are relative only); a section not run keeps its earlier results.
"""

from __future__ import annotations

import argparse
import json
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
from infer.sampling import Greedy  # noqa: E402
from lmjax import packed  # noqa: E402
from lmjax.quant import packed_int  # noqa: E402

K, N, LAYERS = 576, 1536, 30


def int8_x_int8(x, w, scale):
  """`x [M, K]` float32 per-row int8 times int8 codes `w [N, K]` (scales `[N, 1]`) -> float32
  (the product `pack(..., activations="int8")` uses)."""
  return packed_int.matmul_int8_act(x, w, scale)


def weight_only(x, w, scale):
  return packed._matmul_t(x, w, scale)


def float32(x, w, _):
  return jnp.dot(x, w.T)


def chain(product):
  def run(ws, x):
    acc = jnp.zeros((x.shape[0], N), jnp.float32)
    for w, s in ws:
      acc = acc + product(x + 1e-3 * acc[:, :K], w, s)
    return acc
  return jax.jit(run)


def best(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def chain_rows(row_counts, iters):
  rng = np.random.default_rng(0)
  w8 = [jnp.asarray(rng.integers(-127, 128, (N, K), dtype=np.int8)) for _ in range(LAYERS)]
  s8 = [jnp.asarray(rng.random((N, 1), dtype=np.float32) / 500) for _ in range(LAYERS)]
  wf = [(w.astype(jnp.float32) * s, None) for w, s in zip(w8, s8)]
  rows = []
  for m in row_counts:
    x = jnp.asarray(rng.standard_normal((m, K), dtype=np.float32))
    t = {name: best(chain(fn), ws, x, iters=iters)
         for name, fn, ws in (("weight_only", weight_only, list(zip(w8, s8))),
                              ("int8_x_int8", int8_x_int8, list(zip(w8, s8))),
                              ("float32", float32, wf))}
    row = {"rows": m, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
           "int8_x_int8_speedup": t["weight_only"] / t["int8_x_int8"]}
    rows.append(row)
    print(common.table([row], list(row)), flush=True)
  return rows


PREFILL, CROSSOVER, PROMPT, NEW, GREEDY_PROMPTS = (128, 512), (8, 16, 32), 128, 64, 4


def prefill_fn(model, min_rows=None):
  """A jitted prefill `(params, tokens) -> (logits, cache)` into an empty cache; `min_rows`:
  `INT8_ACT_MIN_ROWS` while it is traced (the first call)."""
  def f(p, t):
    cache = lmjax.init_cache(model.config, t.shape[0], t.shape[1])
    if isinstance(p, packed.PackedParams):
      return packed.apply(model, p, t, cache=cache, prefill=True)
    return model.apply({"params": p}, t, cache=cache, prefill=True)
  jitted, traced = jax.jit(f), []

  def run(p, t):
    if not traced and min_rows is not None:
      old, packed_int.INT8_ACT_MIN_ROWS = packed_int.INT8_ACT_MIN_ROWS, min_rows
      try:
        jax.block_until_ready(jitted(p, t))
      finally:
        packed_int.INT8_ACT_MIN_ROWS = old
    traced.append(1)
    return jitted(p, t)
  return run


def smollm2(iters: int, windows: int) -> dict:
  import quant as quant_bench  # benchmarks/quant.py: held-out text, perplexity
  quant_bench.PPL_ROWS = windows
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  variants = {"float32": params, "int8_weight_only": packed.pack(model, params, "int8"),
              "int8_activations": packed.pack(model, params, "int8", activations="int8")}
  text = quant_bench.gzip.open(quant_bench.CORPUS, "rt").read()
  ids = tok.encode(text[len(text) // 2:][:60_000])
  # Timed runs: (name, params, tokens, prefill fn), all interleaved, best of `iters`.
  runs = {}
  for n in PREFILL:
    t = jnp.asarray([ids[:n]])
    for v, p in variants.items():
      runs[(v, n)] = (p, t, prefill_fn(model))
  for n in CROSSOVER:
    t = jnp.asarray([ids[:n]])
    runs[("int8_weight_only", n)] = (variants["int8_weight_only"], t, prefill_fn(model))
    runs[("int8_activations_forced", n)] = (variants["int8_activations"], t, prefill_fn(model, 1))
  for p, t, f in runs.values():
    jax.block_until_ready(f(p, t))  # compile
  times = {k: float("inf") for k in runs}
  for _ in range(iters):
    for k, (p, t, f) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(p, t))
      times[k] = min(times[k], time.perf_counter() - t0)
  prefill = [{"tokens": n, **{f"{v}_ms": times[(v, n)] * 1e3 for v in variants},
              "int8_act_vs_weight_only": times[("int8_weight_only", n)]
              / times[("int8_activations", n)],
              "int8_act_vs_float32": times[("float32", n)] / times[("int8_activations", n)]}
             for n in PREFILL]
  crossover = [{"tokens": n, "int8_weight_only_ms": times[("int8_weight_only", n)] * 1e3,
                "int8_x_int8_forced_ms": times[("int8_activations_forced", n)] * 1e3,
                "int8_act_vs_weight_only": times[("int8_weight_only", n)]
                / times[("int8_activations_forced", n)]} for n in CROSSOVER]
  print(common.table(prefill, list(prefill[0])))
  print(common.table(crossover, list(crossover[0])), flush=True)
  quality, outs = [], {}
  prompts = [ids[i * 1000:i * 1000 + PROMPT] for i in range(GREEDY_PROMPTS)]
  for v, p in variants.items():  # one prompt at a time: batch-1 decoding
    outs[v] = [infer.generate(model, p, [q], max_new_tokens=NEW, sampler=Greedy(),
                              ignore_eos=True, add_bos=False).tokens[0] for q in prompts]
    quality.append({"params": v, "perplexity": quant_bench.perplexity(model, p,
                                                                      ids[PROMPT:])})
  for row in quality:  # means over the prompts
    same = [[a == b for a, b in zip(o, r)] for o, r in zip(outs[row["params"]], outs["float32"])]
    row["greedy_agree_prefix"] = float(np.mean([(s + [False]).index(False) / NEW for s in same]))
    row["greedy_agree_all"] = float(np.mean(same))
  print(common.table(quality, list(quality[0])), flush=True)
  return {"smollm2_prefill": prefill, "smollm2_crossover": crossover,
          "smollm2_quality": quality,
          "smollm2_setup": {"ppl_tokens": windows * quant_bench.PPL_LEN, "greedy_prompt": PROMPT,
                            "greedy_prompts": GREEDY_PROMPTS,
                            "greedy_new": NEW, "iters": iters,
                            "int8_act_min_rows": packed_int.INT8_ACT_MIN_ROWS}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", default="1,16,32,64,128")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--sections", default="chain,smollm2")
  ap.add_argument("--prefill-iters", type=int, default=3)
  ap.add_argument("--ppl-windows", type=int, default=8, help="256-token windows of held-out text")
  args = ap.parse_args()
  sections = args.sections.split(",")
  load0 = os.getloadavg()
  path = common.RESULTS / "quant_int8_activations.json"
  out = json.loads(path.read_text()) if path.exists() else {}
  out.pop("machine", None), out.pop("time", None)
  if "chain" in sections:
    rows = chain_rows([int(r) for r in args.rows.split(",")], args.iters)
    faster = [r["rows"] for r in rows if r["int8_x_int8_speedup"] > 1]
    print(f"int8 x int8 faster at rows {faster}")
    out.update({"shape": {"K": K, "N": N, "layers": LAYERS}, "rows": rows,
                "int8_x_int8_faster_at": faster, "load_start": load0,
                "load_end": os.getloadavg()})
  if "smollm2" in sections:
    out.update(smollm2(args.prefill_iters, args.ppl_windows))
    out.update({"smollm2_load_start": load0, "smollm2_load_end": os.getloadavg()})
  print(f"load {load0} -> {os.getloadavg()}")
  print(f"wrote {common.write('quant_int8_activations', out)}")


if __name__ == "__main__":
  main()
