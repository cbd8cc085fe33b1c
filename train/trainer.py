"""One trainer for every job: a sharded train state, a jitted step with gradient accumulation,
evaluation, and the loop (checkpoints, preemption, NaN stop, feedback).

Pretraining, SFT, RLHF and distillation differ only in their batches and their loss, a function
`loss_fn(model, params, batch, rng, train) -> (loss_sum, num_tokens, metrics_sums)` (see
`train.objectives`). The state (params and optimizer state) is sharded over a mesh
(`data`, `fsdp`, `tensor`) by the logical rules of `lmjax.sharding`; batches are split over
(`data`, `fsdp`) and placed with `jax.make_array_from_process_local_data`, so on many hosts each
host feeds only its own rows.

Params the loss reads but the optimizer never updates (a pretrained base under PEFT, the
reference model of DPO and RL, a distillation teacher) are `Frozen`: passed to every step as an
argument (never closed over, never donated, never checkpointed), sharded by their own logical
names; the train state then holds only the trainable params and their optimizer state, and
gradients are taken of those alone.

Gradient accumulation splits each batch into `grad_accum` micro-batches, scanned in the step;
losses, token counts and gradients are summed over them and divided once by the real tokens,
so k micro-batches give the gradient of one k-times-larger batch.

A model whose config names `attention="flash"` trains through the Pallas kernel of
`infer.flash_attention` (which the trainer imports, so registers, for it): compiled on a TPU or
GPU, run per device in a `shard_map` over the mesh; on a CPU run in the Pallas interpreter
(`interpret_on_cpu`), not the reference that inference falls back to there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lmjax.sharding import logical_shardings
from train.objectives import LossFn

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class TrainState:
  """What a step changes: the raw params tree and the optax state."""

  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Frozen:
  """Params a loss reads and the optimizer never updates.

  Attributes:
    abstract: their boxed abstract tree (`jax.eval_shape` of an init, `nn.Partitioned`
      leaves), whose logical axis names give their shardings.
    combine: `(trainable, frozen) -> params`, what the loss function receives as `params`
      (e.g. `{"policy": trainable, "reference": frozen}`, or a base with an adapter).
  """

  abstract: Any
  combine: Callable[[Any, Any], Any]


def _trainable_only(trainable, frozen):
  del frozen
  return trainable


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN or inf; the run stopped at `step`."""

  def __init__(self, step: int, loss: float, grad_norm: float):
    super().__init__(
        f"non-finite training loss at step {step} (loss {loss}, gradient norm {grad_norm}); "
        "the run stopped and kept its last good checkpoint (lower the learning rate, raise "
        "warmup, or check the data)")
    self.step = step


def attention_scope(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
  """What the trainer traces its model under: for `attention="flash"`, the kernel's
  `interpret_on_cpu` (importing `infer.flash_attention` registers the name); else nothing."""
  if getattr(getattr(model, "config", None), "attention", None) != "flash":
    return contextlib.nullcontext
  from infer import flash_attention  # train -> infer is allowed; infer never imports train.

  return flash_attention.interpret_on_cpu


def check_batch_divisible(global_batch: int, grad_accum: int, mesh: jax.sharding.Mesh) -> None:
  """Each micro-batch must split evenly over the mesh's batch axes (data x fsdp)."""
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if global_batch % (grad_accum * shards):
    raise ValueError(
        f"global batch {global_batch} rows (data.batch_size x {jax.process_count()} hosts) "
        f"with train.grad_accum={grad_accum} does not split over the mesh's batch axes "
        f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {shards}: it must be a "
        f"multiple of grad_accum x {shards} = {grad_accum * shards}")


class Trainer:
  """A model, a loss and an optax optimizer over a mesh.

  Args:
    model: a linen module (`lmjax.CausalLM`, ...).
    loss_fn: `(model, params, batch, rng, train) -> (loss_sum, num_tokens, metrics_sums)`.
    tx: the optax optimizer (`train.optimizer.make_optimizer`).
    mesh: a mesh with axes data, fsdp, tensor (`lmjax.make_mesh`).
    init_inputs: example inputs for `model.init` (shapes only matter).
    global_batch: rows of one step over all hosts; checked against the mesh up front.
    grad_accum: micro-batches per step.
    seed: params init and dropout (step s uses fold_in(key(seed + 1), s)).
    learning_rate: the schedule (step -> rate), for logging.
    init_params: `key -> boxed trainable params` (default: `model.init(key, *init_inputs)`),
      e.g. an adapter's params alone.
    frozen: params the loss reads but never trains (`Frozen`); give their values with
      `set_frozen` before the first step.
  """

  def __init__(self, model: nn.Module, loss_fn: LossFn, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, *, init_inputs: Sequence[Any], global_batch: int,
               grad_accum: int = 1, seed: int = 0,
               learning_rate: Callable[[int], float] | None = None,
               init_params: Callable[[jax.Array], Any] | None = None,
               frozen: Frozen | None = None):
    check_batch_divisible(global_batch, grad_accum, mesh)
    self.model, self.loss_fn, self.tx, self.mesh = model, loss_fn, tx, mesh
    self.grad_accum, self.seed, self.learning_rate = grad_accum, seed, learning_rate
    self.global_batch = global_batch
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    self._attention_scope = attention_scope(model)
    if init_params is None:
      self._init_params = lambda: model.init(jax.random.key(seed), *init_inputs)["params"]
    else:
      self._init_params = lambda: init_params(jax.random.key(seed))
    self.frozen = frozen
    self._combine = _trainable_only if frozen is None else frozen.combine
    self.frozen_shardings = None if frozen is None else logical_shardings(frozen.abstract, mesh)
    self.frozen_params = None if frozen is None else ()
    with self._attention_scope():
      boxed = jax.eval_shape(
          lambda: TrainState(self._init_params(), tx.init(self._init_params())))
    self.state_shardings = logical_shardings(boxed, mesh)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
        self.state_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_in = replicated if frozen is None else self.frozen_shardings
    self._step = jax.jit(
        self._train_step, donate_argnums=0,
        in_shardings=(self.state_shardings, replicated, self.batch_sharding, frozen_in),
        out_shardings=(self.state_shardings, replicated))
    self._eval = jax.jit(
        self._eval_step,
        in_shardings=(self.state_shardings.params, self.batch_sharding, frozen_in),
        out_shardings=replicated)

  # --- state and batches ---------------------------------------------------------------------

  @contextlib.contextmanager
  def _tracing(self):
    """The mesh and the attention scope, around every call that may trace the model."""
    with jax.set_mesh(self.mesh), self._attention_scope():
      yield

  def init_state(self) -> TrainState:
    """Fresh params and optimizer state, each shard made on its own device."""
    def init():
      params = nn.meta.unbox(self._init_params())
      return TrainState(params, self.tx.init(params))

    with self._tracing():
      return jax.jit(init, out_shardings=self.state_shardings)()

  def set_frozen(self, params) -> None:
    """The frozen params' values, each shard placed on its own device (arrays already sharded
    this way stay where they are); checked against `Frozen.abstract` first."""
    if self.frozen is None:
      raise ValueError("this trainer has no frozen params (Trainer(frozen=...))")
    want = nn.meta.unbox(self.frozen.abstract)
    try:
      jax.tree.map(lambda a, b: None, want, params)
    except ValueError as e:
      raise ValueError(f"the frozen params do not have the structure the trainer was built "
                       f"with: {e}") from e
    bad = [f"{jax.tree_util.keystr(p)}: {tuple(x.shape)} (want {tuple(w.shape)})"
           for (p, x), w in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(want), strict=True) if x.shape != w.shape]
    if bad:
      raise ValueError("frozen params of the wrong shape: " + "; ".join(bad[:5]))
    with jax.set_mesh(self.mesh):
      self.frozen_params = jax.jit(
          lambda p: jax.tree.map(lambda x, w: x.astype(w.dtype), p, want),
          out_shardings=self.frozen_shardings)(params)

  def _frozen_args(self):
    if self.frozen is not None and self.frozen_params == ():
      raise ValueError("the trainer's frozen params were never given: call set_frozen first")
    return self.frozen_params

  def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows -> global arrays split over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  # --- the compiled steps --------------------------------------------------------------------

  def _micro_batches(self, batch):
    k = self.grad_accum
    spec = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES))

    def split(x):  # [B, ...] -> [k, B/k, ...]; each device's rows stay on it.
      x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)

  def _train_step(self, state: TrainState, step: jax.Array, batch, frozen):
    rng = jax.random.fold_in(jax.random.key(self.seed + 1), step)

    def loss(params, mb, r):
      loss_sum, n, sums = self.loss_fn(self.model, self._combine(params, frozen), mb, r, True)
      return loss_sum, (n, sums)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if self.grad_accum == 1:
      (loss_sum, (n, sums)), grads = grad_fn(state.params, batch, jax.random.fold_in(rng, 0))
    else:
      micro = self._micro_batches(batch)
      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, state.params, first, rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def body(acc, inp):
        i, mb = inp
        out = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, out), None

      ((loss_sum, (n, sums)), grads), _ = jax.lax.scan(
          body, zeros, (jnp.arange(self.grad_accum), micro))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss_sum": loss_sum, "tokens": n, "grad_norm": optax.tree.norm(grads), **sums}
    return TrainState(params, opt_state), metrics

  def _eval_step(self, params, batch, frozen):
    loss_sum, n, sums = self.loss_fn(self.model, self._combine(params, frozen), batch,
                                     jax.random.key(0), False)
    return {"loss_sum": loss_sum, "tokens": n, **sums}

  def train_step(self, state: TrainState, step: int, batch: dict[str, np.ndarray]):
    """One optimizer step on this host's rows (`step`: the 0-based index, for dropout)."""
    with self._tracing():
      return self._step(state, np.int32(step), self.place(batch), self._frozen_args())

  # --- evaluation ----------------------------------------------------------------------------

  def evaluate(self, params, batches: Iterator[dict[str, np.ndarray]],
               max_batches: int = 0) -> dict[str, float]:
    """Loss, perplexity and token accuracy over `batches` (all of them, or `max_batches`),
    and every other metric sum of the loss divided by its token (or pair) count.

    On many hosts, a host whose split runs out first feeds empty (all-masked) batches until
    every host is done, so the collectives stay in step.
    """
    totals, count, template = None, 0, None
    with self._tracing():
      while not max_batches or count < max_batches:
        batch = next(batches, None)
        if batch is not None:
          template = batch
        if not _any_process(batch is not None):
          break
        if batch is None:
          batch = _empty_like(template, self.global_batch // jax.process_count())
        out = self._eval(params, self.place(batch), self._frozen_args())
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        count += 1
    if totals is None:
      raise ValueError("the evaluation split gave no batches")
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    n = max(totals["tokens"], 1.0)
    loss = totals["loss_sum"] / n
    extra = {k: v / n for k, v in totals.items() if k not in ("loss_sum", "tokens", "correct")}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": totals.get("correct", 0.0) / n, "tokens": totals["tokens"],
            "batches": float(count), **extra}

  # --- the loop ------------------------------------------------------------------------------

  def fit(self, state: TrainState, train_batches: Iterator[dict[str, np.ndarray]], *,
          start_step: int, steps: int, eval_every: int = 0,
          evaluate: Callable[[Any], dict[str, float]] | None = None,
          checkpoint: Callable[[int, TrainState, dict | None], None] | None = None,
          checkpoint_every: int = 0, feedback=None,
          hooks: Sequence[Callable[[int, TrainState], TrainState | None]] = ()):
    """Trains from `start_step` to `steps`.

    Evaluates every `eval_every` steps and at the end; calls `checkpoint(step, state,
    val_metrics)` every `checkpoint_every` steps, at each evaluation, at the end, and when
    SIGTERM arrives (then returns early). `hooks(step, state)` run after each step and may
    return a replacement state (tests use them to inject faults or signals).

    Returns:
      `(state, step, reason)`, reason "done" or "preempted".

    Raises:
      NonFiniteLossError: a NaN/inf loss or gradient norm; no checkpoint of that step or later
        is written.
    """
    stop = _StopFlag()
    step, pending = start_step, None
    try:
      while step < steps:
        batch = next(train_batches)
        state, metrics = self.train_step(state, step, batch)
        step += 1
        if pending is not None:  # The previous step's metrics are ready by now.
          self._finish(*pending, feedback)
        pending = (step, metrics)
        for hook in hooks:
          state = hook(step, state) or state
        preempted = _any_process(stop.is_set)
        do_eval = evaluate is not None and (
            step == steps or (eval_every and step % eval_every == 0))
        do_save = checkpoint is not None and (
            do_eval or preempted or step == steps
            or (checkpoint_every and step % checkpoint_every == 0))
        if do_eval or do_save:
          self._finish(*pending, feedback)
          pending = None
        val = None
        if do_eval:
          val = evaluate(state.params)
          if feedback is not None:
            feedback.eval(step, val)
        if do_save:
          checkpoint(step, state, val)
        if preempted:
          return state, step, "preempted"
      if pending is not None:
        self._finish(*pending, feedback)
      return state, step, "done"
    finally:
      stop.restore()

  def _finish(self, step: int, metrics, feedback) -> None:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(host["loss_sum"]) and math.isfinite(host["grad_norm"])):
      raise NonFiniteLossError(step, host["loss_sum"] / max(host["tokens"], 1.0),
                               host["grad_norm"])
    if feedback is not None:
      feedback.train_step(step, host)


def _empty_like(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  return {k: np.zeros((rows, *v.shape[1:]), v.dtype) for k, v in batch.items()}


def _any_process(flag: bool) -> bool:
  """True when `flag` is true on any process (a host-level all-gather on many hosts)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


class _StopFlag:
  """Catches SIGTERM (a TPU VM preemption notice) while training; restores the old handler."""

  def __init__(self):
    self._set = False
    self._old = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting")
    self._set = True

  @property
  def is_set(self) -> bool:
    return self._set

  def restore(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None
