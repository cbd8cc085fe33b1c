"""What an RL run writes and shows: per-step metrics (`metrics.jsonl`, TensorBoard, a line per
logged step), held-out evaluations, the before-training evaluation (`before.json`, reused on
resume) and `rl.png` (reward, KL and held-out accuracy / reward against the step)."""

from __future__ import annotations

import json
import math

from lmjax import checkpoint as layout
from train import job as job_lib


class MetricsWriter:
  """Appends RL metrics to `WORKDIR/metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir, start: int, enabled: bool = True):
    self.workdir = layout.run_path(workdir)
    self.enabled = enabled
    self.train_curve: list[dict] = []
    self.eval_curve: list[dict] = []
    self._jsonl = self._tb = None
    if not enabled:
      return
    path = self.workdir / "metrics.jsonl"
    if path.exists():  # the history up to `start` (a resumed run continues the curves)
      for line in path.read_text().splitlines():
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if rec.get("step", start + 1) <= start and "reward" in rec:
          (self.eval_curve if rec.get("split") == "heldout" else self.train_curve).append(rec)
    self._jsonl = open(path, "a")  # noqa: SIM115 (closed in close())
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def _write(self, rec: dict, prefix: str) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    for k, v in rec.items():
      if k not in ("step", "split") and isinstance(v, float) and math.isfinite(v):
        self._tb.add_scalar(f"{prefix}/{k}", v, rec["step"])

  def before(self, evaluate) -> dict:
    """The held-out figures before training (read back from `before.json` on resume)."""
    path = self.workdir / "before.json"
    if path.exists():
      return json.loads(path.read_text())
    out = evaluate()
    if self.enabled:
      job_lib.write_json(path, out)
      print(f"held-out before training: {_fmt(out)}", flush=True)
      self._write({"step": 0, "split": "heldout", **out}, "heldout")
      self.eval_curve.append({"step": 0, **out})
    return out

  def train(self, step: int, metrics: dict, log_every: int, total: int) -> None:
    rec = {"step": step, **metrics}
    self.train_curve.append(rec)
    self._write(rec, "train")
    if self.enabled and (step % log_every == 0 or step == total):
      print(f"step {step}/{total}  reward {metrics['reward']:.3f}  kl {metrics['kl']:.4f}  "
            f"len {metrics['completion_length']:.1f}  clip {metrics['clip_fraction']:.3f}  "
            f"{metrics['step_s']:.1f} s (rollout {metrics['rollout_s']:.1f} s, "
            f"{metrics.get('cpu_s', 0.0):.0f} CPU s)", flush=True)

  def eval(self, step: int, metrics: dict) -> None:
    self.eval_curve.append({"step": step, **metrics})
    self._write({"step": step, "split": "heldout", **metrics}, "heldout")
    if self.enabled:
      print(f"step {step}: held-out {_fmt(metrics)}", flush=True)

  def plot(self):
    """`rl.png`: train reward, KL, held-out reward(s) per step."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is

    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    tc = self.train_curve
    if tc:
      axes[0].plot([r["step"] for r in tc], [r["reward"] for r in tc], label="train reward")
      axes[1].plot([r["step"] for r in tc], [r["kl"] for r in tc], color="C1")
    for k in sorted({k for r in self.eval_curve for k in r if k.startswith("reward")}):
      pts = [(r["step"], r[k]) for r in self.eval_curve if k in r]
      axes[2].plot(*zip(*pts), "o-", label=k)
    axes[0].set_title("train reward (mean)")
    axes[1].set_title("KL to reference (per token)")
    axes[2].set_title("held-out (greedy)")
    for ax in axes:
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    if self.eval_curve:
      axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = self.workdir / "rl.png"
    fig.savefig(path, dpi=100)
    return path

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl = self._tb = None


def _fmt(m: dict) -> str:
  return "  ".join(f"{k} {v:.3f}" for k, v in m.items())


def print_summary(result: dict, out=print) -> None:
  b, a = result.get("before") or {}, result.get("heldout") or {}
  for k in a:
    if k in b:
      out(f"held-out {k}: {b[k]:.3f} before -> {a[k]:.3f} after")
