"""Sharding by logical axis names: one rule list maps them onto the mesh axes data, fsdp, tensor
and sequence.

Model code names axes ("embed", "heads", "mlp", ...) and never a mesh axis. Compilation is
`jax.jit` with `NamedSharding` in/out shardings over a `jax.sharding.Mesh` (pjit semantics).

The `sequence` axis is context parallelism (as in MaxText's `context` axis; Liu et al., 2023,
"Ring Attention with Blockwise Transformers" for the ring variant): activations are split on
their length, and attention gathers the keys and values of the whole sequence (an all-gather
over `sequence`) while each device keeps its own block of queries. Parameters are split over
`sequence` as over `fsdp` (their model-width axis), so the devices of that axis share the state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
SEQUENCE_AXIS = "sequence"

# Logical name -> mesh axes. Parameters are split over fsdp and sequence (their model-width
# axis) and tensor (heads, feed-forward width, vocab: Megatron-style); activations over batch
# (data, fsdp) and length (sequence). Keys and values inside attention are whole on length
# ("activation_kv_length"): gathered over sequence.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_kv_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1,
              devices=None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, sequence); one size may be -1 to take the remaining
  devices.

  Args:
    data, fsdp, tensor, sequence: axis sizes; their product must equal the number of devices.
      `sequence` > 1 splits activations on their length (context parallelism).
    devices: default `jax.devices()` (all processes' devices under jax.distributed).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor, sequence]
  named = f"data={data} fsdp={fsdp} tensor={tensor} sequence={sequence}"
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {named}")
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if rest <= 0 or len(devices) % rest:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {named}")
    sizes[sizes.index(-1)] = len(devices) // rest
  if int(np.prod(sizes)) != len(devices) or min(sizes) <= 0:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} x "
                     f"sequence={sizes[3]} needs {int(np.prod(sizes))} devices; there are "
                     f"{len(devices)}")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # classic jit/pjit propagation
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def _fits(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (e.g. 3 kv heads over tensor=2), axes the mesh
  does not have (one made without `sequence`), and size-1 axes from a group of several (so
  `("fsdp", "sequence")` with sequence=1 reads `"fsdp"`)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    names = tuple(a for a in names if a in mesh.shape)
    if len(names) > 1:
      names = tuple(a for a in names if mesh.shape[a] > 1) or names[:1]
    if not names:
      out.append(None)
      continue
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append((names[0] if len(names) == 1 else names) if dim % size == 0 else None)
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
  if mesh.empty or not set(MESH_AXES[:3]) <= set(mesh.axis_names):
    return x
  spec = nn.logical_to_mesh_axes(names, LOGICAL_RULES)
  return jax.lax.with_sharding_constraint(x, _fits(spec, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Inputs `[B, ...]` split over (data, fsdp) on the batch dim."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def to_host(tree: Any) -> Any:
  """The arrays of `tree` as numpy arrays with their global values, on every process.

  Under `jax.distributed` an array split over devices of other processes cannot be fetched
  (`jax.device_get` raises): those are gathered to every host (`process_allgather`, a
  collective: every process must call this with the same tree). Fully replicated and
  fully addressable arrays are copied from this host's devices.
  """
  leaves, treedef = jax.tree.flatten(tree)
  split = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
           and not x.is_fully_addressable and not x.is_fully_replicated]
  out = jax.device_get([None if i in split else x for i, x in enumerate(leaves)])
  if split:
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather([leaves[i] for i in split], tiled=True)
    for i, x in zip(split, gathered):
      out[i] = np.asarray(x)
  return jax.tree.unflatten(treedef, out)


def sequence_shards() -> int:
  """Size of the `sequence` axis of the mesh set by `jax.set_mesh` (1 with no mesh, a mesh
  without that axis, or inside a `shard_map` that already made it manual)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names or SEQUENCE_AXIS in mesh.manual_axes:
    return 1
  return int(mesh.shape[SEQUENCE_AXIS])


def check_sequence_split(length: int, what: str = "sequence length") -> int:
  """Raises unless `length` splits evenly over the mesh's `sequence` axis; returns its size."""
  n = sequence_shards()
  if n > 1 and length % n:
    raise ValueError(f"{what} {length} does not split over the mesh's sequence axis "
                     f"(mesh.sequence={n}): make it a multiple of {n}, or use mesh.sequence=1")
  return n


# A key segment id no query has: hides the keys a device must not see (see `gather_context`).
HIDDEN_SEGMENT = int(np.iinfo(np.int32).min)


def gather_context(k: jax.Array, v: jax.Array, q_ids: jax.Array | None,
                   kv_ids: jax.Array | None, *, causal: bool, axis: str = SEQUENCE_AXIS):
  """Inside a `shard_map` manual over `axis`: the keys and values of the whole sequence for this
  device's block of queries (context parallelism by all-gather, as in MaxText).

  Device r of n holds queries `[r*T, (r+1)*T)` and the same block of keys. The keys of every
  device are gathered (`S = n*T`). A kernel's causal rule is static (query i sees key j iff
  j <= i + S - T, right for the last block only), so for a causal call the gathered keys are
  rotated right by `(n-1-r)*T`: key `r*T + i` then sits where the rule puts the diagonal of
  query i, and the keys that wrapped around to the front (the future, `j >= (r+1)*T`) get the
  segment id `HIDDEN_SEGMENT`, which no query has.

  Args:
    k, v: this device's `[B, T, K, H]` keys and values.
    q_ids: `[B, T]` query segment ids or None; kv_ids: `[B, T]` key segment ids or None.
    causal: whether the attention is causal (queries and keys of the same sequence).

  Returns:
    `(k, v, q_ids, kv_ids)`: `[B, S, K, H]` keys and values, `[B, T]` and `[B, S]` segment ids
    (all ones where none were given and a mask is needed), or None ids for a non-causal call
    without segments.
  """
  n = jax.lax.axis_size(axis)
  b, t = k.shape[:2]
  k, v = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v))
  if kv_ids is not None:
    kv_ids = jax.lax.all_gather(kv_ids.astype(np.int32), axis, axis=1, tiled=True)
  if not causal:
    return k, v, q_ids, kv_ids
  if kv_ids is None:
    q_ids, kv_ids = jnp.ones((b, t), np.int32), jnp.ones((b, n * t), np.int32)
  shift = (n - 1 - jax.lax.axis_index(axis)) * t
  k, v, kv_ids = (jnp.roll(x, shift, axis=1) for x in (k, v, kv_ids))
  wrapped = jnp.arange(n * t)[None, :] < shift
  return k, v, q_ids, jnp.where(wrapped, HIDDEN_SEGMENT, kv_ids)
