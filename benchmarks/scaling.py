"""The memory plan against what XLA allocates, and step time over 1-8 CPU devices.

1. For a mid-size decoder (8 scanned layers, 512 wide, 8K vocab, 512-token rows) on several mesh
   shapes of 8 CPU devices (data, fsdp, tensor and sequence splits) and two remat policies:
   `train.plan`'s bytes per device beside XLA's own figures for the compiled train step
   (`compiled.memory_analysis()`: the arguments, i.e. the state's shards and the batch, and the
   temporary buffers, i.e. gradients, activations, logits and the optimizer's update). The
   step is compiled against the abstract state (nothing is allocated: 8 replicas of a model
   on one host's memory is what got an earlier version of this benchmark killed).
2. Step time of gpt2-124m (128 tokens a row, 8 rows a step) on 1, 2, 4 and 8 CPU devices, fsdp
   over all of them (recorded, not a speed-up: the 8 CPU "devices" share this machine's cores);
   each trainer is freed before the next.

Measured here (benchmarks/results/scaling.json): data / fsdp / tensor shapes within 10% (total)
under both remat policies; `sequence` shapes not: `lmjax.layers.project` flattens `[B, T, D]`
to `[B*T, D]` for a 2-D matmul, which XLA cannot keep split on T, so outside attention each
device computes (and, without remat, keeps) its rows at their full length. With a 3-D einsum
there, the per-layer bytes of 1x2x1x4 match the plan (99.5 MB measured, 96 MB planned a layer).

    python benchmarks/scaling.py

Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import gc
import os
import sys
import time
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
SEQ, BATCH = 512, 16
# (data, fsdp, tensor, sequence)
SHAPES = ((8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 4, 2, 1), (1, 2, 1, 4), (2, 1, 2, 2),
          (1, 4, 1, 2))
BATCH_KEYS = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
              "segment_ids": np.int32, "positions": np.int32}


def mid_config(remat: str) -> lmjax.TransformerConfig:
  return lmjax.TransformerConfig(
      vocab_size=8192, model_dim=512, num_decoder_layers=8, num_heads=8, num_kv_heads=4,
      ffn_dim=1536, activation="swiglu", norm="rmsnorm", position="rotary", max_len=SEQ,
      use_bias=False, remat_policy=remat, scan_layers=True)


def _trainer(cfg, sizes, batch):
  mesh = lmjax.make_mesh(*sizes, devices=jax.devices()[:int(np.prod(sizes))])
  return Trainer(lmjax.CausalLM(cfg), causal_lm_loss, make_optimizer(OptimizerConfig(), 10),
                 mesh, init_inputs=lmjax.counting.example_inputs(cfg), global_batch=batch)


def _abstract_batch(trainer, rows, seq):
  return {k: jax.ShapeDtypeStruct((rows, seq), t, sharding=trainer.batch_sharding)
          for k, t in BATCH_KEYS.items()}


def memory_row(remat: str, sizes) -> dict:
  cfg = mid_config(remat)
  trainer = _trainer(cfg, sizes, BATCH)
  with jax.set_mesh(trainer.mesh):
    compiled = trainer._step.lower(trainer.abstract_state, np.int32(0),
                                   _abstract_batch(trainer, BATCH, SEQ), None).compile()
  ma = compiled.memory_analysis()
  plan = plan_lib.plan_trainer(trainer, cfg, SEQ)
  batch_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                    for x in _abstract_batch(trainer, BATCH, SEQ).values())
  state = ma.argument_size_in_bytes - batch_bytes
  temp = ma.temp_size_in_bytes
  predicted_temp = plan.gradients + plan.activations + plan.logits
  measured = state + temp
  return {
      "remat": remat, "mesh": "x".join(map(str, sizes)),
      "state_MB_plan": (plan.params + plan.optimizer) / MB, "state_MB_xla": state / MB,
      "temp_MB_plan": predicted_temp / MB, "temp_MB_xla": temp / MB,
      "total_MB_plan": plan.total / MB, "total_MB_xla": measured / MB,
      "total_error": plan.total / measured - 1, "temp_error": predicted_temp / temp - 1}


def memory_rows():
  rows = []
  for remat in ("none", "full"):
    for sizes in SHAPES:
      rows.append(memory_row(remat, sizes))
      print(common.table(rows[-1:], list(rows[-1])), flush=True)
      gc.collect()
  return rows


def step_rows():
  cfg = lmjax.TransformerConfig.from_preset("gpt2-124m", max_len=128)
  rng = np.random.default_rng(0)
  x = rng.integers(1, cfg.vocab_size, (8, 129)).astype(np.int32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((8, 128), np.float32),
           "segment_ids": np.ones((8, 128), np.int32),
           "positions": np.broadcast_to(np.arange(128, dtype=np.int32), (8, 128)).copy()}
  out = []
  for n in (1, 2, 4, 8):
    trainer = _trainer(cfg, (1, n, 1, 1), 8)
    state = trainer.init_state()
    state, m = trainer.train_step(state, 0, batch)
    common.block(m)
    times = []
    for i in range(3):
      t0 = time.perf_counter()
      state, m = trainer.train_step(state, i + 1, batch)
      common.block(m)
      times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    out.append({"devices": n, "mesh": f"1x{n}x1x1", "step_s": step,
                "tokens_per_s": 8 * 128 / step, "load_avg_1m": os.getloadavg()[0]})
    print(common.table(out[-1:], list(out[-1])), flush=True)
    del trainer, state, m
    gc.collect()
    jax.clear_caches()
  return out


def main():
  load = os.getloadavg()
  mem = memory_rows()
  steps = step_rows()
  print(common.table(mem, list(mem[0])))
  print(common.table(steps, list(steps[0])))
  errors = [abs(r["total_error"]) for r in mem]
  path = common.write("scaling", {
      "load_avg_start": load, "load_avg_end": os.getloadavg(),
      "model": {k: getattr(mid_config("none"), k) for k in (
          "vocab_size", "model_dim", "num_decoder_layers", "num_heads", "num_kv_heads",
          "ffn_dim")},
      "batch": BATCH, "seq_len": SEQ, "memory": mem,
      "max_abs_total_error": max(errors), "steps": steps,
      "note": ("memory: XLA's figures for the compiled step (state = arguments less the batch; "
               "temp = temporaries), no arrays allocated; 8 host-platform CPU devices share 2 "
               "cores: step times are not a speed-up")})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
