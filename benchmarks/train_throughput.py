"""Tokens/s and MFU of the trainer's step, and its overhead over the bare model step.

For each run preset (`demo`, `gpt2-124m`), on synthetic full batches of the preset's shape:

- bare: `benchmarks/model_step.py`'s step (value_and_grad of a mean cross entropy, AdamW),
  jitted, on the same model, batch and sequence length;
- trainer step: `Trainer.train_step` (host batch placement, packed segment ids and positions,
  masked token sums, clipping, the weight-decay mask, metrics);
- trainer loop: `Trainer.fit` over the same batches with feedback (metrics.jsonl, TensorBoard
  every `log_every` steps, the per-step NaN check), no checkpoints or evals.

Each is timed over blocks of `--steps` steps dispatched back to back (as a training loop runs),
the three kinds interleaved for `--rounds` rounds (the machine may be shared), medians reported.
MFU is against this machine's matmul peak measured in the same run.

  python benchmarks/train_throughput.py [--presets demo,gpt2-124m] [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import model_step  # noqa: E402

import lmjax  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import pretrain  # noqa: E402
from train.feedback import Feedback  # noqa: E402

# Per preset: (--set overrides for a CPU-sized batch, rows, sequence length).
SIZES = {"demo": ([], None, None),
         "gpt2-124m": (["data.batch_size=2", "data.seq_len=512"], 2, 512)}


def synthetic_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.integers(3, vocab, (rows, seq + 1), dtype=np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((rows, seq), np.float32),
          "segment_ids": np.ones((rows, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()}


def bench(name: str, steps: int, rounds: int, peak: float) -> list[dict]:
  sets, rows, seq = SIZES[name]
  config = config_lib.apply_overrides(config_lib.preset(name),
                                      [*sets, "mesh.data=1", f"train.steps={steps + 2}"])
  config = pretrain.resolve_precision(config)
  cfg, rows, seq = config.model, config.data.batch_size, config.data.seq_len
  batches = [synthetic_batch(rows, seq, cfg.vocab_size, i) for i in range(4)]
  flops_tok = lmjax.flops_per_token(cfg, seq)

  trainer = pretrain.build_trainer(config)
  state = trainer.init_state()
  bare_step = model_step.make_step(
      lambda p, t, m=trainer.model: m.apply({"params": p}, t), optax.adamw(1e-4))
  params = jax.tree.map(jnp.copy, state.params)
  bare = [params, optax.adamw(1e-4).init(params)]
  tokens = [jnp.asarray(np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)) for b in batches]

  def run_bare(i):
    bare[0], bare[1], loss = bare_step(bare[0], bare[1], tokens[i % len(tokens)])
    return loss

  holder = [state]

  def run_trainer(i):
    holder[0], metrics = trainer.train_step(holder[0], i, batches[i % len(batches)])
    return metrics

  def run_loop(i):  # `steps` steps of the real loop, with feedback.
    with tempfile.TemporaryDirectory() as tmp:
      fb = Feedback(tmp, total_steps=i + steps, start_step=i, tokens_per_step=rows * seq,
                    flops_per_token=flops_tok, peak=peak, log_every=config.train.log_every,
                    progress_bar=False)
      holder[0], _, _ = trainer.fit(holder[0], itertools.cycle(batches), start_step=i,
                                    steps=i + steps, feedback=fb)
      fb.close()
    return holder[0].params

  def block(fn):  # `steps` steps dispatched back to back (pipelined), then wait.
    t0 = time.perf_counter()
    if fn is run_loop:
      out = fn(0)
    else:
      out = [fn(i) for i in range(steps)][-1]
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps

  jax.block_until_ready((run_bare(0), run_trainer(0)))  # Compile both.
  times = {run_bare: [], run_trainer: [], run_loop: []}
  for _ in range(rounds):  # Interleaved, so a busy moment hits all three alike.
    for fn, out in times.items():
      out.append(block(fn))
  t_bare, t_trainer, t_fit = (statistics.median(v) for v in times.values())

  def row(kind, secs):
    tps = rows * seq / secs
    return {"preset": name, "kind": kind, "params": lmjax.count_params(state.params),
            "batch": rows, "seq": seq, "step_s": secs, "tokens_per_s": tps,
            "mfu": tps * flops_tok / peak}

  rows_out = [row("bare model step", t_bare), row("trainer step", t_trainer),
              row("trainer loop", t_fit)]
  rows_out[1]["overhead_vs_bare"] = t_trainer / t_bare - 1
  rows_out[2]["overhead_vs_bare"] = t_fit / t_bare - 1
  return rows_out


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--presets", default="demo,gpt2-124m")
  ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
  ap.add_argument("--rounds", type=int, default=3, help="interleaved blocks of each kind")
  args = ap.parse_args()
  peak = common.matmul_peak("float32")
  print(f"matmul peak (float32, measured now): {peak / 1e9:.1f} GFLOP/s", flush=True)
  rows = []
  for name in args.presets.split(","):
    rows += bench(name, args.steps, args.rounds, peak)
    for r in rows[-3:]:
      print(r, flush=True)
  peak_after = common.matmul_peak("float32")
  print(common.table(rows, ["preset", "kind", "params", "batch", "seq", "step_s",
                            "tokens_per_s", "mfu", "overhead_vs_bare"]))
  print(f"matmul peak at the end: {peak_after / 1e9:.1f} GFLOP/s")
  path = common.write("train_throughput", {
      "dtype": "float32", "matmul_peak_flops": peak, "matmul_peak_flops_end": peak_after,
      "steps": args.steps, "rounds": args.rounds,
      "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
