"""Flash attention: speed and memory of our Pallas kernel against cuDNN, XLA and the reference.

FlashAttention (Dao et al., 2022) and FlashAttention-2 (Dao, 2023) trade the T x S score matrix
for recomputation; this script measures what that buys. Sequence 1k, 4k and 16k, bfloat16, head
dim 128, causal and not, at a constant 16k tokens per batch (B = 16k / T, N = 16 heads):

- on a GPU or TPU: forward and forward+backward time and achieved TFLOP/s for `flash_attention`,
  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU) and `implementation="xla"`, and the
  plain-jnp reference; ratios against the reference timed in the same run; and a check that the
  kernel's output and gradients match the reference at 1k (the hardware correctness check).
- everywhere: the compiled peak memory of each (`jit(f).lower(...).compile().memory_analysis()`)
  as the sequence grows. On the CPU only this is reported: the kernels run in the Pallas
  interpreter there, which says nothing about speed; its memory still shows O(T) against O(T S).

FLOPs count the two matmuls of the forward (4 B N T S H, times the visible fraction when causal);
forward+backward is 3.5 times that (7 matmuls), as in the FlashAttention papers.

  python benchmarks/flash_attention.py [--seqs 1024,4096,16384] [--budget-s 270]

Writes benchmarks/results/flash_attention_{cpu,gpu,tpu}.json.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

from infer.flash_attention import flash_attention, reference_attention  # noqa: E402

TOKENS = 16384  # per batch: B = TOKENS // T
HEADS, HEAD_DIM, DTYPE = 16, 128, jnp.bfloat16


def _impls(platform: str) -> dict:
  """name -> attention function `(q, k, v, causal) -> out`, for this platform."""
  impls = {}
  if platform == "cpu":  # The kernels only run interpreted here: memory, not speed.
    for backend in ("gpu", "tpu"):
      impls[f"flash[{backend},interpret]"] = functools.partial(
          flash_attention, interpret=True, backend=backend)
  else:
    impls["flash"] = functools.partial(flash_attention, interpret=False)
  if platform == "gpu":
    impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
  impls["xla"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="xla")
  impls["reference"] = reference_attention
  return {name: _wrap(fn) for name, fn in impls.items()}


def _wrap(fn):
  def fwd(q, k, v, *, causal):
    return fn(q, k, v, causal=causal)

  def fwd_bwd(q, k, v, do, *, causal):
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, causal=causal), q, k, v)
    return out, pull(do)

  return fwd, fwd_bwd


def _inputs(t: int, batch: int | None = None):
  b = batch or max(1, TOKENS // t)
  rng = np.random.default_rng(0)
  q, k, v, do = (jnp.asarray(rng.standard_normal((b, t, HEADS, HEAD_DIM), np.float32), DTYPE)
                 for _ in range(4))
  return q, k, v, do


def _flops(q, causal: bool) -> float:
  b, t, n, h = q.shape
  visible = t * (t + 1) / 2 if causal else t * t
  return 4.0 * b * n * h * visible


def _compile(fn, *args):
  """The compiled executable and its memory figures (peak = arguments + outputs + temps)."""
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    return compiled, {}
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)
  return compiled, {"temp_mib": stats.temp_size_in_bytes / 2**20, "peak_mib": peak / 2**20}


def _max_err(got, want) -> float:
  got = jax.tree.leaves(got)
  want = jax.tree.leaves(want)
  return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                   / max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32))))))
             for a, b in zip(got, want))


def run(seqs: list[int], budget_s: float) -> dict:
  platform = jax.default_backend()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  timed = platform != "cpu"
  impls = _impls(platform)
  start = time.perf_counter()
  rows, skipped = [], []
  if timed:  # Hardware correctness check first: the kernel against the reference at 1k.
    q, k, v, do = _inputs(1024, batch=2)
    (ff, fb), (rf, rb) = impls["flash"], impls["reference"]
    check = {}
    for causal in (False, True):
      check[f"causal={causal}"] = {
          "out_rel_err": _max_err(jax.jit(ff, static_argnames="causal")(q, k, v, causal=causal),
                                  rf(q, k, v, causal=causal)),
          "grads_rel_err": _max_err(
              jax.jit(fb, static_argnames="causal")(q, k, v, do, causal=causal)[1],
              jax.jit(rb, static_argnames="causal")(q, k, v, do, causal=causal)[1]),
      }
  for t in seqs:
    q, k, v, do = _inputs(t)
    causal_modes = (False, True) if timed else (True,)
    for causal in causal_modes:
      for name, (fwd, fwd_bwd) in impls.items():
        if time.perf_counter() - start > budget_s:
          skipped.append(f"{name} T={t} causal={causal}: over the time budget")
          continue
        row = {"impl": name, "T": t, "B": q.shape[0], "causal": causal}
        f1 = functools.partial(fwd, causal=causal)
        f2 = functools.partial(fwd_bwd, causal=causal)
        try:
          for tag, fn, args in (("fwd", f1, (q, k, v)), ("fwd_bwd", f2, (q, k, v, do))):
            compiled, mem = _compile(fn, *args)
            row.update({f"{tag}_{key}": val for key, val in mem.items()})
            if timed:
              sec = common.time_fn(compiled, *args, warmup=1, iters=5)
              flops = _flops(q, causal) * (1.0 if tag == "fwd" else 3.5)
              row[f"{tag}_ms"] = sec * 1e3
              row[f"{tag}_tflops"] = flops / sec / 1e12
        except Exception as e:  # noqa: BLE001 - an OOM or unsupported config is a result too
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
  # Ratios against the reference measured in this run: memory saved, and (timed) speed-up.
  base = {(r["T"], r["causal"]): r for r in rows if r["impl"] == "reference"}
  for r in rows:
    ref = base.get((r["T"], r["causal"]), {})
    for tag in ("fwd", "fwd_bwd"):
      if r.get(f"{tag}_peak_mib") and f"{tag}_peak_mib" in ref:
        r[f"{tag}_mem_reference_over_this"] = ref[f"{tag}_peak_mib"] / r[f"{tag}_peak_mib"]
      if f"{tag}_ms" in r and f"{tag}_ms" in ref:
        r[f"{tag}_speedup_vs_reference"] = ref[f"{tag}_ms"] / r[f"{tag}_ms"]
  payload = {
      "config": {"tokens_per_batch": TOKENS, "heads": HEADS, "head_dim": HEAD_DIM,
                 "dtype": jnp.dtype(DTYPE).name, "seqs": seqs},
      "mode": "speed and memory" if timed else
              "memory only (CPU: kernels run in the Pallas interpreter; times would be "
              "meaningless)",
      "rows": rows,
      "skipped": skipped,
      "wall_s": time.perf_counter() - start,
  }
  if timed:
    payload["correctness_vs_reference_T1024"] = check
  return payload


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seqs", default="1024,4096,16384")
  parser.add_argument("--budget-s", type=float, default=270.0,
                      help="stop starting new measurements after this many seconds")
  args = parser.parse_args(argv)
  payload = run([int(x) for x in args.seqs.split(",")], args.budget_s)
  platform = jax.default_backend()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  cols = ["impl", "T", "B", "causal", "fwd_peak_mib", "fwd_bwd_peak_mib",
          "fwd_bwd_mem_reference_over_this"]
  if payload["mode"] == "speed and memory":
    cols += ["fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops",
             "fwd_speedup_vs_reference", "fwd_bwd_speedup_vs_reference"]
  print(payload["mode"])
  print(common.table(payload["rows"], cols + ["error"]))
  if "correctness_vs_reference_T1024" in payload:
    print("kernel vs reference at T=1024:", payload["correctness_vs_reference_T1024"])
  for line in payload["skipped"]:
    print("skipped:", line)
  print("wrote", common.write(f"flash_attention_{platform}", payload))


if __name__ == "__main__":
  main()
