"""A per-device memory plan of a training run, before anything is allocated.

    python -m train.plan --config llama3.1-8b --devices v5p-128 [--set mesh.fsdp=... ...]

Bytes per device of the params, the AdamW state, the gradients (and their accumulator), the
activations kept for the backward pass at the run's micro-batch and sequence length under its
remat policy, the logits, and a KV cache for decoding at the same batch and length; and whether
they fit the named device. A `sequence` mesh axis (context parallelism) divides each row's
tokens, so the activations and logits, over its devices. Params and optimizer state are exact:
`jax.eval_shape` of the model and of optax's init, split by the logical sharding rules over an
abstract mesh of the slice's size (no devices needed). Activations are an estimate from the
model's shapes (what each layer keeps for its backward pass, as in Korthikanti et al., 2022,
"Reducing Activation Recomputation in Large Transformer Models"), compared against XLA's own
buffer sizes in `benchmarks/scaling.py`.

Every job prints the plan of its own mesh before compiling (`train.job.run`) and refuses a run
whose plan exceeds an accelerator's memory, with the figure and what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh

import lmjax
from lmjax.config import TransformerConfig
from lmjax.sharding import MESH_AXES, logical_shardings

GiB = 1024**3
# Usable fraction of a device's memory (XLA's own buffers, fragmentation).
HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class Device:
  """A kind of accelerator slice: its device count, memory per device, devices per host."""

  name: str
  devices: int
  bytes_per_device: int
  per_host: int

  @property
  def hosts(self) -> int:
    return max(self.devices // self.per_host, 1)


def _slice(kind: str, devices: int, gib: float, per_host: int) -> Device:
  return Device(f"{kind}-{devices}" if kind.startswith("v") else f"{kind}x{devices}", devices,
                int(gib * GiB), per_host)


# HBM per chip from Google Cloud's TPU pages (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB;
# 4 chips a host in multi-host slices; v4/v5p names count TensorCores, two a chip) and NVIDIA's
# data sheets (H100 SXM 80 GB, H200 141 GB, A100 80 GB; 8 a host).
DEVICES: dict[str, Device] = {d.name: d for d in (
    *(_slice("v4", n, 32, 4) for n in (8, 32, 128, 512)),
    *(_slice("v5e", n, 16, 4) for n in (1, 4, 8, 16, 64, 256)),
    *(_slice("v5p", n, 95, 4) for n in (8, 32, 128, 512, 1024)),
    *(_slice("v6e", n, 32, 4) for n in (1, 4, 8, 16, 64, 256)),
    *(_slice("h100", n, 80 * 1e9 / GiB, 8) for n in (1, 8, 16, 64)),
    *(_slice("h200", n, 141 * 1e9 / GiB, 8) for n in (1, 8, 16, 64)),
    *(_slice("a100", n, 80 * 1e9 / GiB, 8) for n in (1, 8)),
)}
for _name in [n for n in DEVICES if n.startswith(("v4-", "v5p-"))]:
  _d = DEVICES[_name]  # v4-8 / v5p-8: 8 TensorCores = 4 chips.
  DEVICES[_name] = dataclasses.replace(_d, devices=_d.devices // 2)


def device(name: str) -> Device:
  if name not in DEVICES:
    raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)}")
  return DEVICES[name]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of each part of a training step (`total` their sum)."""

  mesh: dict[str, int]
  micro_batch: int  # rows per device per micro-batch
  seq_len: int
  params: int
  optimizer: int
  gradients: int
  activations: int
  logits: int
  kv_cache: int  # decoding at the same batch and length (not part of `total`)
  capacity: int | None = None  # bytes per device of the named device, if any
  note: str = ""

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations + self.logits

  @property
  def fits(self) -> bool | None:
    return None if self.capacity is None else self.total <= HEADROOM * self.capacity

  def table(self) -> str:
    rows = [("params", self.params), ("optimizer state (AdamW)", self.optimizer),
            ("gradients", self.gradients), ("activations (backward)", self.activations),
            ("logits (float32)", self.logits), ("total for a train step", self.total),
            ("KV cache for decoding (same batch, length)", self.kv_cache)]
    split = self.mesh.get("sequence", 1)
    tokens = f"{self.seq_len} tokens" if split == 1 else (
        f"{self.seq_len // split} of {self.seq_len} tokens")
    out = [f"memory plan per device (mesh {self.mesh}, {self.micro_batch} row(s) x "
           f"{tokens} a micro-batch per device):"]
    out += [f"  {name:<44} {_gib(v):>10}" for name, v in rows]
    if self.note:
      out.append(f"  note: {self.note}")
    if self.capacity is not None:
      verdict = "fits" if self.fits else "DOES NOT FIT"
      out.append(f"  {verdict} in {_gib(self.capacity)} a device ({HEADROOM:.0%} usable: "
                 f"{_gib(HEADROOM * self.capacity)})")
    return "\n".join(out)


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def _itemsize(dtype: str) -> int:
  return np.dtype(jax.numpy.dtype(dtype)).itemsize


def _shard_bytes(boxed: Any, mesh: AbstractMesh) -> int:
  """Bytes one device holds of a boxed abstract tree sharded by the logical rules (the
  largest shard: uneven splits are padded)."""
  shardings = logical_shardings(boxed, mesh)
  total = 0
  for x, s in zip(jax.tree.leaves(nn.meta.unbox(boxed)), jax.tree.leaves(shardings),
                  strict=True):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def placed_bytes(abstract: Any) -> int:
  """Bytes one device holds of a tree of `jax.ShapeDtypeStruct`s (or arrays) with shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract))


def _model_boxed(cfg: TransformerConfig):
  if cfg.attention == "flash":
    from infer import flash_attention  # noqa: F401  (registers the kernel's name)
  model = lmjax.model_for(cfg)
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           *lmjax.counting.example_inputs(cfg))["params"])


def activation_bytes(cfg: TransformerConfig, rows: int, seq_len: int, tensor: int,
                     sequence: int = 1) -> int:
  """What a decoder keeps for its backward pass on `rows` x `seq_len` tokens of one device,
  under the config's remat policy (attention scores only for the reference attention).

  `sequence` > 1 (context parallelism): each device holds `seq_len / sequence` tokens of a
  row, plus the keys and values of the whole row gathered for attention (the reference
  attention repeats them to every query head)."""
  c = _itemsize(cfg.dtype)
  local = seq_len // sequence
  bt = rows * local
  d, f = cfg.model_dim, cfg.ffn_dim // tensor
  q = max(cfg.num_heads // tensor, 1) * cfg.resolved_head_dim
  kv = max(cfg.resolved_num_kv_heads // tensor, 1) * cfg.resolved_head_dim
  heads = max(cfg.num_heads // tensor, 1)
  ffn_in = 2 * f if cfg.gated else f
  # One layer without remat: norm outputs and residuals (4 x D), q, k, v and the attention
  # output, the FFN's input projections and activation.
  layer = bt * c * (4 * d + 2 * q + 2 * kv + ffn_in + f)
  # The gathered keys and values of the whole row, kept by each layer; and, once, their
  # cotangents at full length in a layer's backward (before the reduce-scatter that is the
  # gather's transpose).
  gathered = 2 * rows * seq_len * c * (q if cfg.attention == "reference" else kv)
  layer += gathered if sequence > 1 else 0
  transient = gathered if sequence > 1 else 0
  # The reference attention keeps its float32 scores and probabilities.
  scores = 2 * rows * heads * local * seq_len * 4 if cfg.attention == "reference" else 0
  lse = rows * heads * local * 4
  layers = cfg.num_encoder_layers + cfg.num_decoder_layers
  full_layer = layer + scores + lse
  if cfg.remat_policy == "full":  # Layer inputs kept; one layer recomputed at a time.
    return layers * bt * d * c + full_layer + transient
  if cfg.remat_policy in ("dots", "dots_no_batch"):  # Matmul outputs kept, the rest redone.
    kept = bt * c * (2 * d + 2 * q + 2 * kv + ffn_in) + lse
    if cfg.remat_policy == "dots":
      kept += scores
    return layers * kept + full_layer + transient
  # Without remat each layer's residuals stay until its backward (stacked by the scan): also
  # what the recomputation of one layer fuses away (JAX's saved residuals,
  # `jax.ad_checkpoint.print_saved_residuals`): a gated FFN's sigmoid(gate) and act(gate)
  # beside gate, up and their product, and the reference attention's head-major copies of
  # q, k and v.
  saved = full_layer + bt * c * ((2 * f if cfg.gated else 0)
                                 + (q + 2 * kv if cfg.attention == "reference" else 0))
  return layers * saved + transient


def plan(cfg: TransformerConfig, *, mesh: dict[str, int], global_batch: int, seq_len: int,
         grad_accum: int = 1, target: Device | None = None) -> MemoryPlan:
  """The per-device memory of a training step of `cfg` on a mesh of the given axis sizes.

  Args:
    cfg: the model config (its dtypes as the run resolves them).
    mesh: `{"data": ..., "fsdp": ..., "tensor": ..., "sequence": ...}` (no -1; a missing
      `sequence` is 1).
    global_batch: rows a step over all hosts; seq_len: tokens a row.
    grad_accum: micro-batches a step (an accumulator of the gradients' size when > 1).
    target: the device kind, for `capacity` and `fits`.

  Returns:
    A `MemoryPlan`.
  """
  sizes = tuple(int(mesh.get(a, 1) if a == "sequence" else mesh[a]) for a in MESH_AXES)
  if min(sizes) < 1:
    raise ValueError(f"a plan needs every mesh axis >= 1, got {mesh}")
  if target is not None and math.prod(sizes) != target.devices:
    raise ValueError(f"mesh {mesh} has {math.prod(sizes)} devices; {target.name} has "
                     f"{target.devices}")
  params = _shard_bytes(_model_boxed(cfg), AbstractMesh(sizes, MESH_AXES))
  # AdamW keeps two moments of each parameter (in the parameter's dtype), sharded alike.
  return _with_activations(cfg, sizes, params=params, optimizer=2 * params,
                           trainable=params, global_batch=global_batch, seq_len=seq_len,
                           grad_accum=grad_accum,
                           capacity=None if target is None else target.bytes_per_device)


def plan_trainer(trainer, cfg: TransformerConfig, seq_len: int,
                 capacity: int | None = None) -> MemoryPlan:
  """The plan of a built `train.trainer.Trainer` (exact state bytes from its shardings: a
  PEFT adapter's or a policy's optimizer state only, frozen params counted as params)."""
  trainable = placed_bytes(trainer.abstract_state.params)
  params = trainable
  if trainer.frozen is not None:
    frozen = nn.meta.unbox(trainer.frozen.abstract)
    params += sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                  for x, s in zip(jax.tree.leaves(frozen),
                                  jax.tree.leaves(trainer.frozen_shardings), strict=True))
  sizes = tuple(int(trainer.mesh.shape.get(a, 1)) for a in MESH_AXES)
  return _with_activations(cfg, sizes, params=params,
                           optimizer=placed_bytes(trainer.abstract_state.opt_state),
                           trainable=trainable, global_batch=trainer.global_batch,
                           seq_len=seq_len, grad_accum=trainer.grad_accum, capacity=capacity)


def _with_activations(cfg, sizes, *, params, optimizer, trainable, global_batch, seq_len,
                      grad_accum, capacity) -> MemoryPlan:
  gradients = trainable * (2 if grad_accum > 1 else 1)
  shards = sizes[0] * sizes[1]
  if global_batch % (shards * grad_accum):
    raise ValueError(f"a step of {global_batch} rows with train.grad_accum={grad_accum} does "
                     f"not split over data x fsdp = {shards} devices: make the rows a step a "
                     f"multiple of {shards * grad_accum}")
  rows = global_batch // (shards * grad_accum)
  tensor, sequence = sizes[2], sizes[3]
  if seq_len % sequence:
    raise ValueError(f"a sequence of {seq_len} tokens does not split over mesh.sequence="
                     f"{sequence} devices: make data.seq_len a multiple of {sequence}")
  acts = activation_bytes(cfg, rows, seq_len, tensor, sequence)
  vocab = math.ceil(cfg.vocab_size / tensor)
  logits = 2 * rows * (seq_len // sequence) * vocab * 4  # float32 logits and their gradient
  layers = cfg.num_decoder_layers
  # Decoding runs with sequence=1: the sequence axis's devices then take rows of the batch.
  kv = (2 * layers * max(global_batch // (shards * sequence), 1) * seq_len
        * max(cfg.resolved_num_kv_heads // tensor, 1) * cfg.resolved_head_dim
        * _itemsize(cfg.dtype))
  note = ""
  if cfg.remat_policy != "none" and not cfg.scan_layers:
    note = ("remat without model.scan_layers=true: XLA may schedule the recomputation early "
            "and keep every layer's activations (measured on CPU); set scan_layers=true")
  return MemoryPlan(mesh=dict(zip(MESH_AXES, sizes)), micro_batch=rows, seq_len=seq_len,
                    params=params, optimizer=optimizer, gradients=gradients, activations=acts,
                    logits=logits, kv_cache=kv, capacity=capacity, note=note)


def suggestions(p: MemoryPlan, cfg: TransformerConfig, devices: int) -> list[str]:
  """What to change so a plan that does not fit may fit."""
  out = []
  m = p.mesh
  if m["fsdp"] < devices // m["tensor"]:
    out.append(f"shard params and optimizer state wider: mesh.fsdp={devices // m['tensor']} "
               "mesh.data=1")
  if cfg.remat_policy != "full":
    out.append("recompute activations: model.remat_policy=full")
  if p.micro_batch > 1:
    out.append(f"smaller micro-batches: raise train.grad_accum (now {p.micro_batch} rows a "
               "device per micro-batch)")
  if cfg.attention == "reference" and p.seq_len >= 2048:
    out.append("no T x T scores: model.attention=flash")
  if m["tensor"] == 1 and cfg.num_heads % 2 == 0:
    out.append("split heads and feed-forward: mesh.tensor=2 (or 4, 8)")
  if p.micro_batch == 1 and p.seq_len // m["sequence"] >= 4096:
    out.append(f"split each row over devices (context parallelism): mesh.sequence="
               f"{2 * m['sequence']} with mesh.fsdp (or mesh.data) halved and train.grad_accum "
               "doubled, for half a row's tokens a device")
  return out


def device_capacity() -> int | None:
  """Bytes of memory of this process's first device (an accelerator's `bytes_limit`), or None
  where the backend does not say (CPU devices share the host's memory)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def check_fits(p: MemoryPlan, cfg: TransformerConfig, devices: int) -> None:
  """Raises a `ValueError` with the figure and what to change when `p` does not fit."""
  if p.fits is False:
    raise ValueError(
        f"this run needs about {_gib(p.total)} a device and the device has "
        f"{_gib(p.capacity)} ({HEADROOM:.0%} usable); try: "
        + "; ".join(suggestions(p, cfg, devices)) + f"\n{p.table()}")


def resolve_mesh(mesh_cfg, devices: int) -> dict[str, int]:
  """Axis sizes of a `MeshConfig` on `devices` devices (its -1 filled)."""
  sizes = list(mesh_cfg.sizes)
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if devices % rest:
      raise ValueError(f"mesh {sizes} does not divide {devices} devices")
    sizes[sizes.index(-1)] = devices // rest
  if math.prod(sizes) != devices:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} x "
                     f"sequence={sizes[3]} needs {math.prod(sizes)} devices; the slice has "
                     f"{devices}")
  return dict(zip(MESH_AXES, sizes))


def plan_run(config, target: Device, *, backend: str = "tpu") -> MemoryPlan:
  """The plan of a run config (`train.config.RunConfig` or a job's) on a device kind: its
  mesh on the slice, `data.batch_size` rows a host, its precision on that backend."""
  from train import config as config_lib

  dtype, param_dtype = config_lib.resolve_dtypes(config.train.precision, config.model, backend)
  cfg = config.model.replace(dtype=dtype, param_dtype=param_dtype)
  return plan(cfg, mesh=resolve_mesh(config.mesh, target.devices),
              global_batch=config.data.batch_size * target.hosts,
              seq_len=config.data.seq_len, grad_accum=config.train.grad_accum, target=target)


def main(argv: Sequence[str] | None = None) -> int:
  from train import config as config_lib

  p = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="demo", help="a train.pretrain run preset")
  p.add_argument("--devices", required=True, help=f"one of {sorted(DEVICES)}")
  p.add_argument("--set", dest="sets", action="append", nargs="+", default=[],
                 metavar="KEY=VALUE")
  args = p.parse_args(argv)
  try:
    target = device(args.devices)
    config = config_lib.apply_overrides(config_lib.preset(args.config),
                                        [s for g in args.sets for s in g])
    backend = "gpu" if args.devices.startswith(("h", "a")) else "tpu"
    result = plan_run(config, target, backend=backend)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.config} on {target.name} ({target.devices} devices, {target.hosts} host(s), "
        f"{config.data.batch_size} rows a host = {config.data.batch_size * target.hosts} a step; "
        f"{lmjax.count_params(config.model):,} params)")
  print(result.table())
  if not result.fits:
    print("to fit, try: " + "; ".join(suggestions(result, config.model, target.devices)))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
