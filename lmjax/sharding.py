"""Sharding by logical axis names: one rule list maps them onto the mesh axes data, fsdp, tensor.

Model code names axes ("embed", "heads", "mlp", ...) and never a mesh axis. Compilation is
`jax.jit` with `NamedSharding` in/out shardings over a `jax.sharding.Mesh` (pjit semantics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters are split over fsdp (their model-width axis) and tensor
# (heads, feed-forward width, vocab: Megatron-style); activations over batch (data, fsdp).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); one size may be -1 to take the remaining devices.

  Args:
    data, fsdp, tensor: axis sizes; their product must equal the number of devices.
    devices: default `jax.devices()` (all processes' devices under jax.distributed).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} "
                     f"tensor={tensor}")
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if rest <= 0 or len(devices) % rest:
      raise ValueError(f"{len(devices)} devices cannot fill mesh data={data} fsdp={fsdp} "
                       f"tensor={tensor}")
    sizes[sizes.index(-1)] = len(devices) // rest
  if int(np.prod(sizes)) != len(devices) or min(sizes) <= 0:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                     f"{int(np.prod(sizes))} devices; there are {len(devices)}")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # classic jit/pjit propagation
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def _fits(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (e.g. 3 kv heads over tensor=2)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axes if dim % size == 0 else None)
  return PartitionSpec(*out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a tree of `nn.Partitioned` leaves (or their abstract shapes)."""
  specs = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(boxed_tree)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fits(spec, x.shape, mesh)), mesh_specs, shapes,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """The shardings of the params `init_fn()` would make (traced abstractly, no memory)."""
  return logical_shardings(jax.eval_shape(init_fn), mesh, rules)


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES):
  """Runs `init_fn() -> boxed params` under jit so each device makes only its own shards.

  `eval_shape` gives the logical specs, the rules give NamedShardings, and
  `jax.jit(out_shardings=...)` places each shard where it lives: a model too large for one
  device never exists whole on one device.

  Returns:
    (params, shardings): the raw (unboxed) params tree and its NamedShardings.
  """
  shardings = param_shardings(init_fn, mesh, rules)
  params = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  return params, shardings


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Constrains an activation's sharding by logical names, when a mesh is set (else no-op)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = nn.logical_to_mesh_axes(names, LOGICAL_RULES)
  return jax.lax.with_sharding_constraint(x, _fits(spec, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Inputs `[B, ...]` split over (data, fsdp) on the batch dim."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
