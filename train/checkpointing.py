"""Training checkpoints: orbax `CheckpointManager` saves of params, optimizer state, the run
config and each host's data position; resume with fallback past damaged steps.

Layout: `lmjax.checkpoint` (so `lmjax.checkpoint.load_run` reads params without train/).
Policy:

- saves are asynchronous (the arrays are copied to host memory, then written in the
  background); the last `keep` steps are kept, plus the best by validation loss (orbax
  `LatestN` or `BestN`); nothing else is ever deleted or overwritten;
- resume takes the newest step. Its saved config must match this run's, except for the keys in
  `MAY_CHANGE` (cadences, mesh, learning-rate schedule, ...), and its arrays must have this
  run's shapes: otherwise a `CheckpointMismatchError` names the step and the differences, and
  nothing is touched;
- a newest step proven damaged (`lmjax.checkpoint.is_damaged`: a file of it missing,
  truncated or unparsable; non-finite params) is moved aside to `WORKDIR/checkpoints_corrupt/`,
  with a warning, and the previous step restores. Any other error while reading it (a
  PermissionError, a network error or timeout, an unexpected error) is raised as a
  `CheckpointReadError` naming the step's folder, and nothing is moved: a transient storage
  problem must not push a run back to an older step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from lmjax import checkpoint as layout
from lmjax.checkpoint import CheckpointReadError, DamagedCheckpointError

log = logging.getLogger(__name__)

# Config keys that may differ between a checkpoint and the run resuming it ("section.*": all).
MAY_CHANGE = (
    "train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.progress_bar", "train.precision", "train.grad_accum", "checkpoint.*", "mesh.*",
    "report.*", "eval.*", "model.dtype", "model.attention", "model.remat_policy",
    "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.decay_steps",
    "optimizer.final_lr_fraction", "optimizer.weight_decay", "optimizer.b1", "optimizer.b2",
    "optimizer.eps", "data.worker_buffer_size", "data.read_threads",
    "data.read_buffer_size", "data.tokenizer_cache_dir", "data.tfds_data_dir",
)


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not belong to this run's config (nothing was changed on disk)."""


# --- a per-process JSON item (each host's data iterator position) ---------------------------

def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Writes one JSON file per process, `process_<i>-of-<n>.json` (as grain's handler does)."""

  def save(self, directory: epath.Path, args: ProcessJsonSave):
    (directory / _process_file()).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: ProcessJsonRestore | None = None):
    path = directory / _process_file()
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing (saved with another number of processes?)")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


# --- config comparison ---------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _may_change(key: str) -> bool:
  return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in MAY_CHANGE)


def section_defaults(config: Any) -> dict[str, Any]:
  """`{"section.key": default}` of every section of a run config whose dataclass has defaults
  for all its fields: what a key absent from an older checkpoint's config meant then."""
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if not dataclasses.is_dataclass(value):
      continue
    try:
      default = type(value)()
    except TypeError:  # a section with required fields
      continue
    out.update(_flatten({f.name: json.loads(json.dumps(dataclasses.asdict(default)))}))
  return out


def config_differences(saved: dict, current: dict,
                       defaults: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
  """`(blocking, allowed)`: lines "key: saved X, now Y" for keys that differ. A key absent
  from `saved` (a setting added after the checkpoint was written) is no difference when the
  current value is its default (`defaults`, flattened)."""
  a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
  defaults = defaults or {}
  blocking, allowed = [], []
  for key in sorted(set(a) | set(b)):
    if key not in a and key in defaults and b.get(key) == defaults[key]:
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      line = f"{key}: saved {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}"
      (allowed if _may_change(key) else blocking).append(line)
  return blocking, allowed


def _shape_differences(saved_meta: Any, target: Any, item: str) -> list[str]:
  """Leaves whose path or shape differ between orbax metadata and the abstract target."""
  def name(k) -> str:  # Orbax stores a namedtuple's `.count` as `['count']`: compare names.
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in p): tuple(getattr(x, "shape", ())) for p, x in flat}

  s, t = shapes(saved_meta), shapes(target)
  out = [f"{item}/{k}: saved {s.get(k, 'absent')}, now {t.get(k, 'absent')}"
         for k in sorted(set(s) | set(t)) if s.get(k) != t.get(k)]
  return out[:20] + ([f"... and {len(out) - 20} more"] if len(out) > 20 else [])


class Checkpointer:
  """Saves and restores a training run's checkpoints in `WORKDIR/checkpoints`."""

  def __init__(self, workdir, keep: int = 3, keep_best: bool = True,
               async_save: bool = True):
    self.workdir = layout.run_path(workdir)
    self.directory = layout.checkpoint_dir(self.workdir)
    self.defaults: dict[str, Any] = {}  # `section_defaults` of the run config (set by the job)
    keep_policies = [policies.LatestN(n=keep)]
    if keep_best:
      keep_policies.append(policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True,
                                          n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        enable_async_checkpointing=async_save, create=True)
    handlers = {layout.PARAMS: ocp.StandardCheckpointHandler(),
                layout.OPT_STATE: ocp.StandardCheckpointHandler(),
                layout.META: ocp.JsonCheckpointHandler(), layout.DATA: ProcessJsonHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, run_config: dict, data_state: dict | None,
           metrics: dict | None = None) -> None:
    """Starts an asynchronous save of `state` (`params`, `opt_state`) at `step`."""
    meta = {"step": step, "config": run_config, "metrics": metrics or {},
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    items = {layout.PARAMS: ocp.args.StandardSave(state.params),
             layout.OPT_STATE: ocp.args.StandardSave(state.opt_state),
             layout.META: ocp.args.JsonSave(meta),
             layout.DATA: ProcessJsonSave(data_state or {})}
    best = {"val_loss": float(metrics["loss"])} if metrics and "loss" in metrics else None
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=best, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _move_aside(self, step: int) -> epath.Path:
    """Moves a damaged step out of the manager's folder (kept, never deleted)."""
    dest_root = self.workdir / "checkpoints_corrupt"
    dest = dest_root / str(step)
    n = 1
    while dest.exists():
      dest, n = dest_root / f"{step}-{n}", n + 1
    if jax.process_index() == 0:
      dest_root.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"lmjax_move_aside_{step}")
    self.manager.reload()
    return dest

  def _check(self, step: int, run_config: dict, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError when the step does not fit; another error when its files
    do not read (`is_damaged` tells damage from the rest)."""
    meta = layout.read_step_meta(self.workdir, step)
    blocking, allowed = config_differences(meta.get("config", {}), run_config, self.defaults)
    if blocking:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} was saved by a different run config:\n  "
          + "\n  ".join(blocking)
          + f"\nOnly these may change when resuming: {list(MAY_CHANGE)}. Use another --workdir "
          "to start a new run, or set the saved values. Nothing was deleted.")
    if allowed:
      log.warning("resuming from step %d with changed settings:\n  %s", step,
                  "\n  ".join(allowed))
    data_dir = self.directory / str(step) / layout.DATA
    mine = _process_file()
    if data_dir.is_dir() and not (data_dir / mine).exists():
      others = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
      if others:  # Another number of processes saved it: not damage.
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} holds the data positions of other "
            f"processes ({', '.join(others)}), not {mine}: resume with the number of "
            "processes that saved it. Nothing was deleted.")
    item_meta = self.manager.item_metadata(step)
    diffs = []
    for item in (layout.PARAMS, layout.OPT_STATE):
      saved = item_meta[item] if item in item_meta else None
      if saved is None:
        raise DamagedCheckpointError(
            f"checkpoint step {step}: no readable metadata for item {item!r}")
      diffs += _shape_differences(saved, getattr(abstract_state, item), item)
    if diffs:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} holds arrays of other shapes than this "
          "run's model and optimizer:\n  " + "\n  ".join(diffs) + "\nNothing was deleted.")

  def restore_latest(self, abstract_state: Any, run_config: dict, make_state):
    """Restores the newest good step.

    Args:
      abstract_state: the state's `ShapeDtypeStruct`s with shardings (restored into these).
      run_config: this run's config dict, compared with the saved one.
      make_state: `(params, opt_state) -> state`.

    Returns:
      `(state, step, data_state)`, or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable step belongs to another config.
      CheckpointReadError: a step failed to read for a reason that is not proven damage
        (permissions, network, ...); it was left in place.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      step_dir = self.directory / str(step)
      try:
        self._check(step, run_config, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            layout.PARAMS: ocp.args.StandardRestore(abstract_state.params),
            layout.OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
            layout.DATA: ProcessJsonRestore()}))
        _check_finite(restored[layout.PARAMS], step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 (orbax, tensorstore and json raise many kinds)
        if not layout.is_damaged(e, step_dir):
          raise CheckpointReadError(step, step_dir, e) from e
        dest = self._move_aside(step)
        log.warning("checkpoint step %d does not restore (%s: %s); moved it to %s and trying "
                    "the previous step", step, type(e).__name__, str(e)[:400], dest)
        continue
      state = make_state(restored[layout.PARAMS], restored[layout.OPT_STATE])
      return state, step, restored[layout.DATA]
    return None


def _check_finite(params: Any, step: int) -> None:
  finite = jax.jit(lambda t: jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)]))
  ok = np.asarray(finite(params))
  if not ok.all():
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    bad = [p for p, good in zip(paths, ok) if not good]
    raise DamagedCheckpointError(f"checkpoint step {step} holds non-finite params in {bad[:5]}")
