"""What a run shows and writes: metrics (TensorBoard events and `metrics.jsonl`), a progress bar
with loss, tokens/s, MFU and ETA, and a loss-curve PNG at each evaluation. Only process 0
writes or prints.

MFU (model FLOPs utilization, Chowdhery et al., 2022, PaLM) is tokens/s x
`lmjax.flops_per_token` over the peak FLOP/s of the devices: a table of dense bf16 peaks for
TPU and GPU kinds, and on CPU a quick `jnp.dot` measured once and cached.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per JAX device (a TPU v2/v3 device is one core; later TPUs one chip).
PEAK_FLOPS = (
    ("TPU v2", 22.5e12), ("TPU v3", 61.5e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12), ("TPU7x", 2307e12),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A10G", 70e12), ("L40S", 362e12), ("L4", 121e12), ("V100", 125e12),
    ("T4", 65e12), ("RTX 4090", 165e12),
)


def _cache_path() -> Path:
  return Path(os.environ.get("LMJAX_PEAK_CACHE",
                             Path.home() / ".cache" / "lmjax" / "peak_flops.json"))


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, iters: int = 5) -> float:
  """FLOP/s of an `n x n` `jnp.dot` on the default device (best of `iters`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """`(FLOP/s of all this process's devices, where the figure came from)`.

  TPU/GPU: the table times the local device count. CPU: the best of a matmul measured now and
  the best measured before, kept in `~/.cache/lmjax/peak_flops.json` (`$LMJAX_PEAK_CACHE`) per
  processor, core count and dtype.
  """
  devices = jax.local_devices()
  kind = devices[0].device_kind
  if devices[0].platform != "cpu":
    for name, flops in PEAK_FLOPS:
      if name.lower() in kind.lower():
        return flops * len(devices), f"table: {name} x {len(devices)}"
    return math.nan, f"unknown device kind {kind!r} (no MFU)"
  key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{dtype}"
  path = _cache_path()
  try:
    cache = json.loads(path.read_text())
  except (OSError, ValueError):
    cache = {}
  # Measured on every run (about 0.1 s) and the best figure kept: a measurement taken while the
  # machine was busy must not stay as the peak (it made MFU read over 100% on a quiet machine).
  now = measure_matmul_flops(dtype)
  if now > cache.get(key, 0.0):
    cache[key] = now
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(cache, indent=1))
    except OSError:
      pass
  return float(cache[key]), f"CPU {dtype} matmul, measured (cache {path})"


class Feedback:
  """Collects per-step metrics and shows/writes them (process 0 only).

  Args:
    workdir: where `metrics.jsonl`, `tensorboard/` and `loss.png` go.
    total_steps, start_step: for the bar and the ETA.
    tokens_per_step: tokens the whole step processes (all hosts, padding included).
    flops_per_token: training FLOPs per token (`lmjax.flops_per_token`).
    peak: FLOP/s of all devices of the run (nan: no MFU).
    log_every: steps per logged point.
    progress_bar: show a tqdm bar on a terminal (else one line per logged point).
    learning_rate: the schedule (0-based step -> rate), logged with the other metrics.
  """

  def __init__(self, workdir: str | Path, *, total_steps: int, start_step: int,
               tokens_per_step: int, flops_per_token: float, peak: float, log_every: int = 10,
               progress_bar: bool = True, learning_rate=None):
    from lmjax.checkpoint import is_remote, run_path

    self.workdir = run_path(workdir)
    self._remote = is_remote(workdir)  # No appends on object stores: rewrite metrics.jsonl.
    self._lines: list[str] = []
    self.writer = jax.process_index() == 0
    self.total, self.step = total_steps, start_step
    self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
    self.log_every, self.learning_rate = log_every, learning_rate
    self._window: dict[str, float] = {}
    self._window_steps = 0
    self._t_last: float | None = None
    self._step_time: float | None = None
    self.train_curve: list[tuple[int, float]] = []
    self.eval_curve: list[tuple[int, float]] = []
    self.last: dict[str, float] = {}
    self._bar = self._tb = self._jsonl = None
    if not self.writer:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._read_history(start_step)
    if not self._remote:
      self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
    if start_step:
      self._write({"event": "resume", "step": start_step})
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
    if progress_bar and sys.stderr.isatty():
      from tqdm import tqdm

      self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

  def _read_history(self, upto: int) -> None:
    path = self.workdir / "metrics.jsonl"
    if not path.exists():
      return
    train, evals = {}, {}
    lines = path.read_text().splitlines()
    if self._remote:
      self._lines = lines
    for line in lines:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if "loss" not in rec or rec.get("step", upto + 1) > upto:
        continue
      (evals if rec.get("split") == "validation" else train)[rec["step"]] = rec["loss"]
    self.train_curve, self.eval_curve = sorted(train.items()), sorted(evals.items())

  def print(self, *msg: Any) -> None:
    if not self.writer:
      return
    text = " ".join(str(m) for m in msg)
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def _write(self, rec: dict) -> None:
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(rec) + "\n")
      self._jsonl.flush()
    elif self._remote and self.writer:
      self._lines.append(json.dumps(rec))

  def _sync(self) -> None:
    """Remote work dirs: rewrites metrics.jsonl whole (at evaluations and at the end)."""
    if self._remote and self.writer:
      (self.workdir / "metrics.jsonl").write_text("".join(f"{x}\n" for x in self._lines))

  def train_step(self, step: int, metrics: dict[str, float]) -> None:
    """One step's host metrics (sums: `loss_sum`, `tokens`, `correct`; and `grad_norm`).
    Called in step order, as each step's results arrive."""
    now = time.perf_counter()
    if self._t_last is not None:
      dt = (now - self._t_last) / max(step - self.step, 1)
      self._step_time = dt if self._step_time is None else 0.9 * self._step_time + 0.1 * dt
      for k, v in metrics.items():
        self._window[k] = self._window.get(k, 0.0) + v
      self._window_steps += 1
      self._window["time"] = self._window.get("time", 0.0) + dt
    self._t_last, self.step = now, step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
    if step % self.log_every == 0 or step == self.total:
      self._log(step, metrics)

  def _log(self, step: int, latest: dict[str, float]) -> None:
    w = self._window or {**latest, "time": math.nan}
    n = max(self._window_steps, 1)
    tokens = max(w.get("tokens", 0.0), 1.0)
    rec = {"step": step, "loss": w["loss_sum"] / tokens, "accuracy": w.get("correct", 0) / tokens,
           "grad_norm": w.get("grad_norm", math.nan) / n,
           "learning_rate": (float(self.learning_rate(step - 1)) if self.learning_rate
                             else math.nan)}
    if self._window_steps:
      tps = self.tokens_per_step * n / w["time"]
      rec.update(tokens_per_s=tps, step_s=w["time"] / n,
                 mfu=tps * self.flops_per_token / self.peak)
    self._window, self._window_steps = {}, 0
    self.last = rec
    self.train_curve.append((step, rec["loss"]))
    if not self.writer:
      return
    self._write(rec)
    for k, v in rec.items():
      if k != "step" and math.isfinite(v):
        self._tb.add_scalar(f"train/{k}", v, step)
    eta = self._step_time * (self.total - step) if self._step_time else math.nan
    text = (f"loss {rec['loss']:.4f}  tok/s {rec.get('tokens_per_s', math.nan):,.0f}  "
            f"MFU {100 * rec.get('mfu', math.nan):.1f}%  ETA {_duration(eta)}")
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=False)
    else:
      self.print(f"step {step}/{self.total}  {text}")

  def eval(self, step: int, metrics: dict[str, float]) -> None:
    """Validation metrics at `step`: written, printed, and added to the loss-curve PNG."""
    self.eval_curve.append((step, metrics["loss"]))
    if not self.writer:
      return
    self._write({"step": step, "split": "validation", **metrics})
    for k, v in metrics.items():
      self._tb.add_scalar(f"eval/{k}", v, step)
    self._tb.flush()
    self._sync()
    self.print(f"step {step}: validation loss {metrics['loss']:.4f}  perplexity "
               f"{metrics['perplexity']:.2f}  accuracy {metrics['accuracy']:.3f}  "
               f"({int(metrics['tokens'])} tokens)")
    self.plot()

  def plot(self):
    """Writes `loss.png`: the training loss (per logged point) and the validation loss."""
    if not self.writer:
      return None
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if self.train_curve:
      ax.plot(*zip(*self.train_curve), label="train", lw=1)
    if self.eval_curve:
      ax.plot(*zip(*self.eval_curve), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = self.workdir / "loss.png"
    path.write_bytes(buf.getvalue())
    return path

  def close(self) -> None:
    self._sync()
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
    self._bar = self._tb = self._jsonl = None


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
