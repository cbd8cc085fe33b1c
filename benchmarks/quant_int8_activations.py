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

    python benchmarks/quant_int8_activations.py [--rows 1,16,32,64,128]

Measured (2026-11-30, a 2-core AVX-512 VNNI CPU under load ~9-11): at one row XLA's integer
product is ~65x slower than the packed int8 row loop (67 ms against 1.0 ms: no streamed loop
for an int32 product), so batch-1 decoding keeps weight-only int8; at 16 / 32 / 64 / 128 rows
it is 1.6x / 9.9x / 5.3x / 4.1x faster than the weight-only reader (which dequantizes the
matrix for more than 16 rows) and 1.7-2.3x faster than a float32 matmul: a prefill option, not
wired into `lmjax.packed` yet.

Writes benchmarks/results/quant_int8_activations.json (best of `--iters`, the machine's load
before and after; CPU figures are relative only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lmjax import packed  # noqa: E402

K, N, LAYERS = 576, 1536, 30


def int8_x_int8(x, w, scale):
  """`x [M, K]` float32 per-row int8 times int8 codes `w [N, K]` (scales `[N, 1]`) -> float32."""
  sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  sx = jnp.where(sx > 0, sx, 1.0)
  xq = jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8)
  acc = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * sx * scale.T


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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", default="1,16,32,64,128")
  ap.add_argument("--iters", type=int, default=10)
  args = ap.parse_args()
  load0 = os.getloadavg()
  rng = np.random.default_rng(0)
  w8 = [jnp.asarray(rng.integers(-127, 128, (N, K), dtype=np.int8)) for _ in range(LAYERS)]
  s8 = [jnp.asarray(rng.random((N, 1), dtype=np.float32) / 500) for _ in range(LAYERS)]
  wf = [(w.astype(jnp.float32) * s, None) for w, s in zip(w8, s8)]
  rows = []
  for m in (int(r) for r in args.rows.split(",")):
    x = jnp.asarray(rng.standard_normal((m, K), dtype=np.float32))
    t = {name: best(chain(fn), ws, x, iters=args.iters)
         for name, fn, ws in (("weight_only", weight_only, list(zip(w8, s8))),
                              ("int8_x_int8", int8_x_int8, list(zip(w8, s8))),
                              ("float32", float32, wf))}
    row = {"rows": m, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
           "int8_x_int8_speedup": t["weight_only"] / t["int8_x_int8"]}
    rows.append(row)
    print(common.table([row], list(row)), flush=True)
  faster = [r["rows"] for r in rows if r["int8_x_int8_speedup"] > 1]
  print(f"load {load0} -> {os.getloadavg()}; int8 x int8 faster at rows {faster}")
  print(common.table(rows, list(rows[0])))
  path = common.write("quant_int8_activations", {
      "shape": {"K": K, "N": N, "layers": LAYERS}, "rows": rows, "int8_x_int8_faster_at": faster,
      "load_start": load0,
      "load_end": os.getloadavg()})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
