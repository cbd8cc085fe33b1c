"""Shared benchmark plumbing: timing, the machine's own matmul peak and bandwidth, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def kernel_off(kernel_module, off: bool = True):
  """While tracing: a CPU kernel module's `applies` answers False (XLA's path) when `off`."""
  real = kernel_module.applies
  if off:
    kernel_module.applies = lambda *args: False
  try:
    yield
  finally:
    kernel_module.applies = real


def block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
                      x)


def time_fn(fn, *args, warmup: int = 1, iters: int = 3) -> float:
  """Median seconds per call of an already-jitted `fn` (after warm-up calls)."""
  for _ in range(warmup):
    block(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def matmul_peak(dtype="float32", n: int = 2048, iters: int = 5) -> float:
  """FLOP/s of a large `jnp.dot` in `dtype`: this machine's practical peak, measured now."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  return 2.0 * n**3 / time_fn(f, a, b, iters=iters)


def memory_bandwidth(mbytes: int = 512, iters: int = 5) -> float:
  """Bytes/s of reading a large float32 array once (a sum), measured now."""
  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  return x.nbytes / time_fn(f, x, iters=iters)


def machine() -> dict:
  return {
      "platform": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()[:1]],
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "python": platform.python_version(),
      "jax": jax.__version__,
  }


def write(name: str, payload: dict) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.json"
  payload = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
  path.write_text(json.dumps(payload, indent=2, default=float))
  return path


def table(rows: list[dict], columns: list[str]) -> str:
  widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
  lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
  return "\n".join(lines)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def train_steps(trainer, state, batches, steps: int, warmup: int,
                real_tokens=lambda b: int((b["segment_ids"] > 0).sum())) -> tuple[dict, list]:
  """Times `steps + warmup` steps of an lmjax `Trainer` on `batches`.

  Returns the figures over the steps after `warmup` (real tokens/s by `real_tokens(batch)`, s per
  step, the per-step mean losses) and each step's metrics (host copies).
  """
  metrics, times, real = [], [], []
  for i in range(steps + warmup):
    b = next(batches)
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, i, b)
    metrics.append(jax.device_get(m))
    times.append(time.perf_counter() - t0)
    real.append(real_tokens(b))
  t, n = sum(times[warmup:]), sum(real[warmup:])
  losses = [float(m["loss_sum"] / m["tokens"]) for m in metrics]
  return ({"tokens_per_s": n / t, "step_s": t / steps, "real_tokens_per_step": n / steps,
           "loss_step1": losses[0], "losses": losses}, metrics)
