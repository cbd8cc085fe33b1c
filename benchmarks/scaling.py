"""The memory plan against what XLA allocates, and step time over 1-8 CPU devices.

1. For a mid-size decoder (12 scanned layers, 512 wide, 8K vocab) on several mesh shapes of 8 CPU
   devices: `train.plan`'s bytes per device (params, AdamW state, gradients + activations +
   logits) beside the measured ones: the state's shards on device 0 (exact), and the compiled
   train step's temporary buffers (`memory_analysis().temp_size_in_bytes`, XLA's own figure for
   gradients, activations and logits together), under two remat policies.
2. Step time of gpt2-124m (128 tokens a row, 8 rows a step) on 1, 2, 4 and 8 CPU devices
   (recorded, not a speed-up: the 8 CPU "devices" share this machine's cores).

    python benchmarks/scaling.py

Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import lmjax  # noqa: E402
from train import plan as plan_lib  # noqa: E402
from train.config import OptimizerConfig  # noqa: E402
from train.objectives import causal_lm_loss  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.trainer import Trainer  # noqa: E402

MB = 2**20


def _on_device(tree, dev) -> int:
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


def _trainer(cfg, sizes, batch):
  mesh = lmjax.make_mesh(*sizes, devices=jax.devices()[:int(np.prod(sizes))])
  return Trainer(lmjax.CausalLM(cfg), causal_lm_loss, make_optimizer(OptimizerConfig(), 10),
                 mesh, init_inputs=lmjax.counting.example_inputs(cfg), global_batch=batch)


def _batch(cfg, rows, seq):
  x = np.random.default_rng(0).integers(1, cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((rows, seq), np.float32),
          "segment_ids": np.ones((rows, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()}


def memory_rows():
  rows, seq, batch = [], 512, 16
  for remat in ("none", "full"):
    cfg = lmjax.TransformerConfig(
        vocab_size=8192, model_dim=512, num_decoder_layers=12, num_heads=8, num_kv_heads=4,
        ffn_dim=1536, activation="swiglu", norm="rmsnorm", position="rotary", max_len=seq,
        use_bias=False, remat_policy=remat, scan_layers=True)
    for sizes in ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)):
      trainer = _trainer(cfg, sizes, batch)
      state = trainer.init_state()
      dev = jax.devices()[0]
      plan = plan_lib.plan_trainer(trainer, cfg, seq)
      with jax.set_mesh(trainer.mesh):
        compiled = trainer._step.lower(state, np.int32(0), trainer.place(_batch(cfg, batch, seq)),
                                       None).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      predicted_temp = plan.gradients + plan.activations + plan.logits
      rows.append({
          "remat": remat, "mesh": "x".join(map(str, sizes)),
          "params_MB_plan": plan.params / MB,
          "params_MB_measured": _on_device(state.params, dev) / MB,
          "opt_MB_plan": plan.optimizer / MB,
          "opt_MB_measured": _on_device(state.opt_state, dev) / MB,
          "step_temp_MB_plan": predicted_temp / MB, "step_temp_MB_xla": temp / MB,
          "temp_ratio": predicted_temp / temp})
      print(common.table(rows[-1:], list(rows[-1])), flush=True)
  return rows


def step_rows():
  cfg = lmjax.TransformerConfig.from_preset("gpt2-124m", max_len=128)
  out = []
  for n in (1, 2, 4, 8):
    trainer = _trainer(cfg, (1, n, 1), 8)
    state = trainer.init_state()
    b = _batch(cfg, 8, 128)
    state, m = trainer.train_step(state, 0, b)
    common.block(m)
    import time
    times = []
    for i in range(3):
      t0 = time.perf_counter()
      state, m = trainer.train_step(state, i + 1, b)
      common.block(m)
      times.append(time.perf_counter() - t0)
    out.append({"devices": n, "mesh": f"1x{n}x1", "step_s": float(np.median(times)),
                "tokens_per_s": 8 * 128 / float(np.median(times))})
    print(common.table(out[-1:], list(out[-1])), flush=True)
  return out


def main():
  load = os.getloadavg()
  bandwidth = common.memory_bandwidth()
  mem = memory_rows()
  steps = step_rows()
  cols = list(mem[0])
  print(common.table(mem, cols))
  print(common.table(steps, list(steps[0])))
  path = common.write("scaling", {
      "load_avg_start": load, "load_avg_end": os.getloadavg(),
      "memory_bandwidth_GBps": bandwidth / 1e9, "memory": mem, "steps": steps,
      "note": "8 host-platform CPU devices share 2 cores: step times are not a speed-up"})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
