"""Decode speed: prefill time, KV-cached decode tokens/s, the no-cache baseline, the roofline.

    python benchmarks/decode.py            # demo and smollm2-135m, float32 and bfloat16, B 1 and 8
    python benchmarks/decode.py --quick    # demo only

For each model, dtype and batch (prompt 128 tokens, greedy, EOS ignored); the dtypes are
float32, bfloat16 (params and compute), packed-bf16 (`lmjax.packed.pack`: bfloat16 weights
stored output-major and widened inside the loop, float32 compute) and packed-f32 (the same
layout, float32 weights):

- prefill: one jitted forward of the padded prompts into an empty cache (`prefill=True`);
- decode tokens/s: `infer.decode`'s compiled `while_loop`, started from the prefilled state and
  timed alone, B * steps / time;
- recompute: the same loop without the cache: every step runs the full forward over the fixed
  `[B, prompt + max_new]` buffer (segment ids mask the future) and reads the logits at each row's
  position; `speedup` is cached tokens/s over this;
- roofline: a decode step must read every weight once and each row's filled cache (K and V of
  every layer at the mean fill, prompt + max_new / 2), so its time is at least
  bytes / bandwidth, with the bandwidth measured in the same run (a jitted sum over a 256 MiB
  array, read-only like decoding, taken before the first case and after each).
  `of roofline` = decode tokens/s over B / that time at the best bandwidth of the run, and
  `at median bw` at the median of the measurements, `beside` at the best of the bandwidth
  measurements taken between the case's own timed decode runs (best time against best
  bandwidth over the same moments). This shared machine's bandwidth moves 25-44 GB/s between
  measurements, so the first is the conservative figure and the last the like-for-like one.
  Models whose weights fit in the CPU's cache (the demo's 12 MB in bfloat16) can pass 100%.

With `--profile` (default on for the demo model in float32) a `jax.profiler` trace of the
decode loop splits the step time by XLA op kind: matmuls (`dot`), layout copies / transposes,
cache slicing and stacking, the rest — where the time goes when below the roofline.

Writes `benchmarks/results/decode.json` with the machine and versions. CPU times are for
ratios; absolute times are quoted only from an accelerator.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lmjax  # noqa: E402
from infer import decode  # noqa: E402

# The demo model of the issue (the pretraining demo's size).
DEMO = dict(vocab_size=4096, model_dim=256, num_decoder_layers=4, num_heads=4, ffn_dim=1024,
            activation="swiglu", norm="rmsnorm", position="rotary", max_len=512, use_bias=False)
PROMPT = 128


def model_config(name: str, dtype: str) -> lmjax.TransformerConfig:
  if name == "demo":
    try:  # the lead's demo preset, once train/pretrain.py has one
      from train import pretrain  # noqa: F401
      cfg = lmjax.TransformerConfig.from_preset("demo")
    except Exception:
      cfg = lmjax.TransformerConfig(**DEMO)
  else:
    cfg = lmjax.TransformerConfig.from_preset(name)
  return cfg.replace(dtype=dtype, param_dtype=dtype)


def best_time(fn, *args, reps: int = 3) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def bandwidth(reps: int = 5) -> float:
  """Read bandwidth in bytes/s: a jitted sum over a 256 MiB float32 array (best of `reps`)."""
  x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
  t = best_time(jax.jit(jnp.sum), x, reps=reps)
  return x.nbytes / t


def time_beside_bandwidth(fn, *args, reps: int) -> tuple[float, float]:
  """(best time of `fn`, best bandwidth) over `reps` rounds that measure each in turn, so both
  see the same moments of a shared machine."""
  jax.block_until_ready(fn(*args))
  times, bws = [], []
  for _ in range(reps):
    bws.append(bandwidth(reps=2))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times), max(bws)


def init_params(model, cfg):
  @jax.jit
  def make():
    return nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"])
  return make()


# dtype name -> lmjax.packed format: weights in lmjax.packed's layout, float32 compute.
PACKED = {"packed-bf16": "bfloat16", "packed-f32": "float32"}


def decode_loop(dec: decode.Decoder):
  """`dec`'s compiled while_loop started from a given (prefilled) state."""
  def run(params, state, consts):
    def cond(s):
      return (s["t"] < consts["max_new"]) & ~jnp.all(s["done"])
    return jax.lax.while_loop(cond, lambda s: dec._step(params, s, consts), state)
  return jax.jit(run)


def recompute_loop(model, batch: int, length: int, steps: int):
  """Greedy decoding without a cache: each step a full forward over `[B, length]`."""
  def run(params, tokens, lengths):
    def body(i, carry):
      tokens, lengths = carry
      seg = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)
      logits = model.apply({"params": params}, tokens, segment_ids=seg)
      last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
      nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
      tokens = jax.vmap(lambda row, n, t: row.at[n].set(t))(tokens, lengths, nxt)
      return tokens, lengths + 1
    return jax.lax.fori_loop(0, steps, body, (tokens, lengths))
  return jax.jit(run)


def profile_step(dec, params, state, consts, steps: int) -> dict[str, float]:
  """Milliseconds per decode step by XLA op kind, from a perfetto trace of the loop."""
  loop = decode_loop(dec)
  jax.block_until_ready(loop(params, state, consts))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(loop(params, state, consts))
    trace = next(pathlib.Path(d).rglob("perfetto_trace.json.gz"))
    events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_op, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      per_op[e["name"]] += e["dur"]
      count[e["name"]] += 1
  kinds = collections.Counter()
  for name, us in per_op.items():
    if count[name] != steps - 1:  # ops that ran once per loop step
      continue
    parts = name.split(".")[0].split("_")
    if "dot" in parts or "ynn" in parts:
      kinds["matmul (dot)"] += us
    elif "copy" in parts or "transpose" in parts:
      kinds["layout copy / transpose"] += us
    elif any(w in name for w in ("concatenate", "slice", "dynamic-update", "scatter")):
      kinds["cache slice / stack / write"] += us
    else:
      kinds["other (elementwise, reductions)"] += us
  return {k: round(v / (steps - 1) / 1e3, 4) for k, v in kinds.most_common()}


def run_case(name, dtype, batch, new_tokens, rc_steps, profile, reps):
  is_packed = dtype in PACKED
  cfg = model_config(name, "float32" if is_packed else dtype)
  model = lmjax.CausalLM(cfg)
  params = init_params(model, cfg)
  if is_packed:  # the recompute baseline runs the same (rounded) weights unpacked
    params = jax.tree.map(lambda a: a.astype(PACKED[dtype]), params)
    weights_in = lmjax.packed.pack(model, params, PACKED[dtype])
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, cfg.vocab_size, PROMPT)) for _ in range(batch)]
  req = decode.prepare(model, prompts, max_new_tokens=new_tokens, ignore_eos=True)
  dec = decode.decoder_for(model, req.plan)
  # Prefill (and the first token's sampling, negligible beside it).
  dparams = weights_in if is_packed else params
  prefill_s = best_time(dec.start, dparams, req.inputs, req.consts, reps=reps)
  state = jax.block_until_ready(dec.start(dparams, req.inputs, req.consts))
  loop = decode_loop(dec)
  decode_s, bw_beside = time_beside_bandwidth(loop, dparams, state, req.consts,
                                              reps=max(reps, 5))
  steps = new_tokens - 1  # the first token comes from the prefill
  length = PROMPT + new_tokens
  rc = recompute_loop(model, batch, length, rc_steps)
  toks = jnp.asarray(np.pad(np.asarray(prompts, np.int32), ((0, 0), (0, new_tokens))))
  rc_s = best_time(rc, params, toks, jnp.full((batch,), PROMPT, jnp.int32), reps=1)
  weights = sum(x.nbytes for x in jax.tree.leaves(dparams))
  item = jnp.dtype(cfg.dtype).itemsize
  per_row = 2 * cfg.num_decoder_layers * cfg.resolved_num_kv_heads * cfg.resolved_head_dim * item
  step_bytes = int(weights + batch * (PROMPT + new_tokens / 2) * per_row)
  row = dict(model=name, dtype=dtype, batch=batch, prompt=PROMPT, new_tokens=new_tokens,
             cache_len=req.plan.cache_len, params=int(sum(x.size for x in jax.tree.leaves(params))),
             prefill_ms=prefill_s * 1e3, decode_step_ms=decode_s / steps * 1e3,
             decode_tok_s=batch * steps / decode_s, recompute_steps=rc_steps,
             recompute_tok_s=batch * rc_steps / rc_s, weight_bytes=int(weights),
             bytes_per_step=step_bytes, bandwidth_beside=bw_beside)
  row["speedup"] = row["decode_tok_s"] / row["recompute_tok_s"]
  if profile:
    row["profile_ms_per_step"] = profile_step(dec, dparams, state, req.consts, new_tokens)
  return row


def add_roofline(row: dict, bw: float, median_bw: float) -> None:
  step_s = row["bytes_per_step"] / bw
  row.update(roofline_step_ms=step_s * 1e3, roofline_tok_s=row["batch"] / step_s,
             of_roofline=row["decode_tok_s"] / (row["batch"] / step_s))
  median_s = row["bytes_per_step"] / median_bw
  row["of_roofline_median_bw"] = row["decode_tok_s"] / (row["batch"] / median_s)
  beside_s = row["bytes_per_step"] / row["bandwidth_beside"]
  row["of_roofline_beside"] = row["decode_tok_s"] / (row["batch"] / beside_s)


def machine() -> dict:
  cpu = platform.processor()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import jaxlib
  return dict(platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
              device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
              python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
              flax=flax.__version__, numpy=np.__version__,
              load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="the demo model only")
  ap.add_argument("--models", default="demo,smollm2-135m")
  ap.add_argument("--new-tokens", type=int, default=128, help="demo model")
  ap.add_argument("--smollm-new-tokens", type=int, default=24)
  ap.add_argument("--dtypes", default=",".join(["float32", "bfloat16", *PACKED]))
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                  help="trace demo/float32 decoding and split its step time by op kind")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
  args = ap.parse_args(argv)
  bws = [bandwidth()]
  print(f"read bandwidth: {bws[0] / 1e9:.1f} GB/s (measured again after each case; the best "
        "is the roofline's)")
  models = ["demo"] if args.quick else args.models.split(",")
  cases = [(m, args.new_tokens, 16, 3) if m == "demo" else (m, args.smollm_new_tokens, 1, 3)
           for m in models]
  rows = []
  print(f"{'model':>13} {'dtype':>11} {'B':>2} {'prefill ms':>10} {'step ms':>8} {'tok/s':>8} "
        f"{'no-cache tok/s':>14} {'speedup':>7}")
  for name, new_tokens, rc_steps, reps in cases:
    for dtype in args.dtypes.split(","):
      for batch in map(int, args.batches.split(",")):
        t0 = time.perf_counter()
        r = run_case(name, dtype, batch, new_tokens, rc_steps,
                     args.profile and name == "demo" and dtype == "float32", reps)
        r["wall_s"] = time.perf_counter() - t0
        rows.append(r)
        print(f"{name:>13} {dtype:>11} {batch:>2} {r['prefill_ms']:10.1f} "
              f"{r['decode_step_ms']:8.2f} {r['decode_tok_s']:8.1f} {r['recompute_tok_s']:14.1f} "
              f"{r['speedup']:7.1f}", flush=True)
        if "profile_ms_per_step" in r:
          print("    step time by op kind (ms, traced):", r["profile_ms_per_step"])
        bws.append(bandwidth())
  bw, median_bw = max(bws), float(np.median(bws))
  print(f"\nroofline at {bw / 1e9:.1f} GB/s (best of {len(bws)} measurements; median "
        f"{median_bw / 1e9:.1f}, min {min(bws) / 1e9:.1f}): weights + filled cache read once per "
        "step")
  print(f"{'model':>13} {'dtype':>11} {'B':>2} {'MB/step':>8} {'roof ms':>8} {'roof tok/s':>10} "
        f"{'tok/s':>8} {'of roof':>7} {'at median bw':>12} {'beside':>6}")
  for r in rows:
    add_roofline(r, bw, median_bw)
    print(f"{r['model']:>13} {r['dtype']:>11} {r['batch']:>2} {r['bytes_per_step'] / 1e6:8.1f} "
          f"{r['roofline_step_ms']:8.2f} {r['roofline_tok_s']:10.1f} {r['decode_tok_s']:8.1f} "
          f"{r['of_roofline']:7.0%} {r['of_roofline_median_bw']:12.0%} "
          f"{r['of_roofline_beside']:6.0%}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(benchmark="decode", machine=machine(),
                                 bandwidth_bytes_per_s=bw, median_bandwidth=median_bw,
                                 bandwidth_samples=bws,
                                 prompt=PROMPT, results=rows),
                            indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
