"""What a batch-1 decode step can read per second here: matrix-vector products by dtype.

Decoding one token multiplies a `[1, K]` activation by every weight matrix, so its speed is
bounded by how fast the backend streams weights through a matvec. This times a chain of 30
SmolLM2-sized `[576, 1536]` matvecs (about one model's feed-forward weights) in several forms,
as weight bytes per second over the read bandwidth of a plain sum measured in the same run:

- float32 `x @ W`;
- bfloat16 weights through XLA's dot (`preferred_element_type=float32`), and upcast first;
- bfloat16 weights stored transposed `[N, K]`, multiplied and reduced over the minor axis with
  the convert fused in (the fastest bfloat16 form found).

    python benchmarks/matvec.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

K, N, LAYERS = 576, 1536, 30


def chain(matvec):
  """A jitted chain of matvecs, each input depending on the last output (no overlap)."""
  def run(ws, x):
    acc = jnp.zeros((1, N), jnp.float32)
    for w in ws:
      acc = acc + matvec(x + 1e-3 * acc[:, :K], w)
    return acc
  return jax.jit(run)


def main():
  bandwidth = common.memory_bandwidth(256)
  keys = jax.random.split(jax.random.key(0), LAYERS)
  w32 = [jax.random.normal(k, (K, N), jnp.float32) for k in keys]
  w16 = [w.astype(jnp.bfloat16) for w in w32]
  w16t = [jnp.asarray(w.T) for w in w16]
  xv = jax.random.normal(jax.random.key(1), (1, K), jnp.float32)
  cases = {
      "float32 x @ W": (w32, lambda x, w: x @ w),
      "bfloat16 dot (f32 accumulate)": (w16, lambda x, w: jnp.dot(
          x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)),
      "bfloat16 upcast, then f32 dot": (w16, lambda x, w: x @ w.astype(jnp.float32)),
      "bfloat16 W^T, fused multiply-reduce": (w16t, lambda x, w: jnp.sum(
          w.astype(jnp.float32) * x, axis=1)[None, :]),
  }
  rows = []
  for name, (ws, fn) in cases.items():
    secs = common.time_fn(chain(fn), ws, xv, iters=10)
    nbytes = sum(w.nbytes for w in ws)
    rows.append({"form": name, "weight_MB": nbytes / 1e6, "ms": secs * 1e3,
                 "GB_per_s": nbytes / secs / 1e9, "of_sum_bandwidth": nbytes / secs / bandwidth})
  print(f"read bandwidth (jnp.sum over 256 MiB, same run): {bandwidth / 1e9:.1f} GB/s")
  print(common.table(rows, ["form", "weight_MB", "ms", "GB_per_s", "of_sum_bandwidth"]))
  print(f"wrote {common.write('matvec', {'bandwidth_bytes_per_s': bandwidth, 'rows': rows})}")


if __name__ == "__main__":
  main()
