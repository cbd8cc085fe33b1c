"""What every training job shares: the command line, the work dir, the mesh, checkpoints with
resume, feedback and the end-of-run report. A job (`train.pretrain`, `train.sft`, ...) is a
`Job` subclass that says only what differs: its run config, model, tokenizer, batches and loss.

    python -m train.<job> [--config PRESET] [--workdir DIR] [--set key=value ...] [-v]

`run(job, config, workdir)` trains or resumes: it restores the newest good checkpoint of the work
dir (its config must match, `train.checkpointing`), checks everything it can before step 0, then
writes `config.json` and the tokenizer, trains with `Trainer.fit` and writes `report.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

import lmjax
from lmjax import checkpoint as layout
from lmjax.checkpoint import CheckpointReadError
from train import config as config_lib
from train import plan as plan_lib
from train import qat as qat_lib
from train.checkpointing import Checkpointer, CheckpointMismatchError, section_defaults
from train.feedback import Feedback, peak_flops
from train.optimizer import learning_rate_schedule, make_optimizer
from train.trainer import Frozen, Trainer, TrainState

log = logging.getLogger("train.job")


class Job:
  """One kind of training run. Subclasses set `name`, `presets`, and override the hooks."""

  name = "job"
  presets: dict[str, Callable[[], Any]] = {}
  default_preset = "demo"

  # --- the command line ----------------------------------------------------------------------

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    """Job-specific arguments (e.g. `--model`, `--data`)."""

  def config_from_args(self, args: argparse.Namespace) -> Any:
    """The run config of the parsed command line (preset, then `--set`)."""
    if args.config not in self.presets:
      raise ValueError(f"unknown {self.name} preset {args.config!r}; presets are "
                       f"{sorted(self.presets)}")
    return config_lib.apply_overrides(self.presets[args.config](),
                                      [s for group in args.sets for s in group])

  # --- the run -------------------------------------------------------------------------------

  def prepare(self, config: Any) -> Any:
    """The config the run trains with (precision resolved, a pretrained model read, ...)."""
    return resolve_precision(config)

  def model(self, config: Any):
    return lmjax.model_for(config.model)

  def loss(self, config: Any):
    raise NotImplementedError

  def partition(self, config: Any) -> tuple[Callable[[jax.Array], Any] | None, Frozen | None]:
    """`(init_params, frozen)` for a run that trains part of what its loss reads (an adapter
    on a frozen base, a policy beside a frozen reference, a student beside a teacher); `(None,
    None)` trains the model's own params (`Trainer`'s arguments of the same names)."""
    return None, None

  def frozen_params(self, config: Any, trainer: Trainer) -> Any:
    """The values of `partition`'s frozen params, on a fresh run and on resume alike (they
    are never checkpointed)."""
    raise NotImplementedError(f"{type(self).__name__}.partition names frozen params: "
                              "override frozen_params")

  def tokenizer(self, config: Any, workdir, restored: bool):
    """The tokenizer: the work dir's own when resuming, else the job's."""
    raise NotImplementedError

  def check(self, config: Any, trainer: Trainer, tokenizer) -> None:
    """What only the tokenizer and the data can tell, checked before step 0."""

  def initial_state(self, config: Any, trainer: Trainer) -> TrainState:
    return trainer.init_state()

  def train_batches(self, config: Any, tokenizer) -> Iterator[dict[str, np.ndarray]]:
    raise NotImplementedError

  def eval_batches(self, config: Any, tokenizer) -> Iterator[dict[str, np.ndarray]]:
    raise NotImplementedError

  def tokens_per_row(self, config: Any) -> int:
    return config.data.seq_len

  def hooks(self, config: Any) -> Sequence[Callable[[int, TrainState], TrainState | None]]:
    """The job's own `Trainer.fit` hooks, `fn(step, state) -> state | None` after each step
    (e.g. on-policy batches following the newest params); run after the caller's `hooks`
    (`run`), so they see the state the next step trains from."""
    return ()

  def before_training(self, config: Any, trainer: Trainer, state: TrainState, tokenizer,
                      start: int, feedback: Feedback) -> dict[str, Any]:
    """Figures of the starting point (e.g. SFT's held-out loss before fine-tuning)."""
    return {}

  def eval_target(self, config: Any, trainer: Trainer, params) -> tuple[Any, Any] | None:
    """`(model, params)` that `eval.tasks` score: the trained model itself; None where the
    job cannot give a plain `CausalLM` and params (then the tasks are skipped, with a note)."""
    if trainer.frozen is not None or not isinstance(trainer.model, lmjax.CausalLM):
      return None
    return trainer.model, params

  def report(self, config: Any, trainer: Trainer, params, tokenizer,
             before: dict[str, Any]) -> dict[str, Any]:
    """The end-of-run figures added to `report.json`."""
    return {}

  def print_report(self, result: dict[str, Any], out=print) -> None:
    v = result.get("validation")
    if v:
      out(f"validation perplexity {v['perplexity']:.2f} (loss {v['loss']:.4f})")


def resolve_precision(config):
  """The model's dtypes under `train.precision` on this backend (`config_lib.resolve_dtypes`:
  mixed precision, bfloat16 compute on TPU/GPU and float32 params, unless the model's own
  dtypes were set)."""
  dtype, param_dtype = config_lib.resolve_dtypes(config.train.precision, config.model,
                                                 jax.default_backend())
  if (dtype, param_dtype) == (config.model.dtype, config.model.param_dtype):
    return config
  return dataclasses.replace(config, model=config.model.replace(dtype=dtype,
                                                                param_dtype=param_dtype))


def build_mesh(mesh: config_lib.MeshConfig) -> jax.sharding.Mesh:
  devices = jax.devices()
  sizes = mesh.sizes
  want = int(np.prod(sizes))
  if -1 not in sizes and want < len(devices) and jax.process_count() == 1:
    log.info("mesh %s uses %d of %d devices", sizes, want, len(devices))
    devices = devices[:want]
  return lmjax.make_mesh(*sizes, devices=devices)


def _quant(config) -> config_lib.QuantConfig:
  """The run's `quant` section (a config without one trains in float)."""
  return getattr(config, "quant", config_lib.QuantConfig())


def build_trainer(job: Job, config, mesh: jax.sharding.Mesh | None = None) -> Trainer:
  """The trainer of a run config: the job's model and loss, AdamW, over the mesh."""
  steps = config.train.steps
  init_params, frozen = job.partition(config)
  model, quant = job.model(config), _quant(config)
  loss, frozen = qat_lib.wrap(quant, model, job.loss(config), frozen)  # `quant.qat`
  trainer = Trainer(model, loss, make_optimizer(config.optimizer, steps),
                    build_mesh(config.mesh) if mesh is None else mesh,
                    init_inputs=lmjax.counting.example_inputs(config.model),
                    global_batch=config.data.batch_size * jax.process_count(),
                    grad_accum=config.train.grad_accum, seed=config.train.seed,
                    learning_rate=learning_rate_schedule(config.optimizer, steps),
                    init_params=init_params, frozen=frozen)
  qat_lib.check(quant, model, trainer.abstract_state.params)
  return trainer


def state_from_params(trainer: Trainer, params, *, donate: bool = False) -> TrainState:
  """A train state starting from given params (fine-tuning), each shard placed on its own
  device by the trainer's shardings, with a fresh optimizer state. `donate`: the given arrays
  are consumed (no second copy of the model in device memory)."""
  def init(p):
    p = jax.tree.map(lambda x, s: x.astype(s.dtype), p, trainer.abstract_state.params)
    return TrainState(p, trainer.tx.init(p))

  with jax.set_mesh(trainer.mesh):
    return jax.jit(init, in_shardings=(trainer.state_shardings.params,),
                   out_shardings=trainer.state_shardings,
                   donate_argnums=0 if donate else ())(params)


def _qat_report(job: Job, config, trainer: Trainer, params, tokenizer, pipes: list,
                workdir) -> dict[str, Any]:
  """A QAT run's `report.json` entry: the validation figures of the same params read as float
  (the `validation` figures are the quantized model's, as served), and how to serve it."""
  float_trainer = build_trainer(
      job, dataclasses.replace(config, quant=config_lib.QuantConfig()), trainer.mesh)
  float_trainer.frozen_params = trainer.frozen_params  # placed alike (same partition)
  it = job.eval_batches(config, tokenizer)
  pipes.append(it)
  val = float_trainer.evaluate(params, it, config.train.eval_batches)
  return {"qat": config.quant.qat, **config.quant.quantize_args(),
          "validation_float": val, "serve": qat_lib.served_command(config.quant, workdir)}


def write_json(path, data: dict) -> None:
  """Writes JSON (atomically on a local disk)."""
  text = json.dumps(data, indent=2)
  if layout.is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def run(job: Job, config, workdir: str | os.PathLike, *, hooks: Sequence[Callable] = (),
        train_batches: Iterator[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final figures.

  `train_batches` replaces the job's train pipeline (tests: the same global batch from other
  host layouts); `hooks` go to `Trainer.fit`, before the job's own (`Job.hooks`).
  """
  workdir = layout.run_path(workdir)
  config = job.prepare(config)
  cfg, steps = config.model, config.train.steps
  trainer = build_trainer(job, config)
  memory = plan_lib.plan_trainer(trainer, cfg, job.tokens_per_row(config),
                                 plan_lib.device_capacity())
  plan_lib.check_fits(memory, cfg, jax.device_count())
  run_dict = config.to_dict()
  is_main = jax.process_index() == 0

  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
                      async_save=config.checkpoint.async_save)
  ckpt.defaults = section_defaults(config)
  pipes: list = []
  feedback = None
  try:
    restored = None
    if ckpt.steps():
      if not config.checkpoint.resume:
        raise ValueError(f"{workdir} holds checkpoints at steps {ckpt.steps()} and "
                         "checkpoint.resume=false: use another --workdir (nothing was deleted)")
      restored = ckpt.restore_latest(trainer.abstract_state, run_dict, TrainState)
    tokenizer = job.tokenizer(config, workdir, restored is not None)
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                       f"{cfg.vocab_size}: set model.vocab_size >= {tokenizer.vocab_size}")
    job.check(config, trainer, tokenizer)
    if getattr(config, "eval", None) and config.eval.tasks:
      from train import evaluate as evaluate_lib

      evaluate_lib.check_tasks(config.eval, tokenizer)
    if trainer.frozen is not None:
      trainer.set_frozen(job.frozen_params(config, trainer))
    if restored is None:
      state, start, data_state = job.initial_state(config, trainer), 0, None
    else:
      state, start, data_state = restored
    if train_batches is None:
      train_batches = job.train_batches(config, tokenizer)
      pipes.append(train_batches)
    if data_state:
      try:
        train_batches.set_state(data_state)
      except (ValueError, KeyError) as e:
        raise CheckpointMismatchError(f"checkpoint step {start}: {e}") from e
    if is_main:  # Everything checked: now the work dir is written.
      workdir.mkdir(parents=True, exist_ok=True)
      write_json(workdir / layout.CONFIG_FILE, run_dict)
      if not (restored is not None and layout.has_tokenizer(workdir)):
        layout.save_run_tokenizer(tokenizer, workdir)

    feedback = Feedback(
        workdir, total_steps=steps, start_step=start, log_every=config.train.log_every,
        tokens_per_step=trainer.global_batch * job.tokens_per_row(config),
        flops_per_token=lmjax.flops_per_token(cfg, job.tokens_per_row(config)),
        peak=peak_flops(cfg.dtype)[0] * jax.process_count(),
        progress_bar=config.train.progress_bar, learning_rate=trainer.learning_rate)
    n_params = lmjax.count_params(trainer.abstract_state.params)
    if trainer.frozen is not None:
      frozen = lmjax.count_params(trainer.frozen.abstract)
      n_params = f"{n_params:,} trainable ({frozen:,} frozen)"
    else:
      n_params = f"{n_params:,}"
    feedback.print(f"run config (saved to {workdir / layout.CONFIG_FILE}):\n" + "\n".join(
        f"  {k}: {json.dumps(v)}" for k, v in run_dict.items()))
    feedback.print(f"{type(trainer.model).__name__} with {n_params} params; mesh "
                   f"{dict(trainer.mesh.shape)} on {jax.device_count()} "
                   f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es); "
                   + (f"resuming from step {start}" if start else "starting at step 0"))
    feedback.print(memory.table())

    evals: dict[str, Any] = {}

    def evaluate(params):
      it = job.eval_batches(config, tokenizer)
      pipes.append(it)
      evals["last"] = trainer.evaluate(params, it, config.train.eval_batches)
      if getattr(config, "eval", None) and config.eval.tasks:
        from train import evaluate as evaluate_lib

        target = qat_lib.served_target(_quant(config),
                                       job.eval_target(config, trainer, params))
        evals["last"].update(evaluate_lib.training_metrics(
            config.eval, target, trainer.mesh, tokenizer, feedback.print))
      return evals["last"]

    def save(step, state, val):
      data = train_batches.get_state() if hasattr(train_batches, "get_state") else None
      ckpt.save(step, state, run_dict, data, val)

    before = job.before_training(config, trainer, state, tokenizer, start, feedback)
    t0 = time.perf_counter()
    state, step, reason = trainer.fit(
        state, train_batches, start_step=start, steps=steps,
        eval_every=config.train.eval_every, evaluate=evaluate, checkpoint=save,
        checkpoint_every=config.checkpoint.every, feedback=feedback,
        hooks=[*hooks, *job.hooks(config)])
    ckpt.wait()
    result = {"step": step, "reason": reason, "train_seconds": time.perf_counter() - t0}
    if reason == "preempted":
      feedback.print(f"preempted: saved step {step} in {ckpt.directory}; rerun the same "
                     "command to resume")
      return result
    if "last" not in evals:  # Already trained to `steps`: evaluate for the report.
      evaluate(state.params)
    result["validation"] = evals["last"]
    if _quant(config).enabled:
      result["quant"] = _qat_report(job, config, trainer, state.params, tokenizer, pipes,
                                    workdir)
    result.update(job.report(config, trainer, state.params, tokenizer, before))
    if is_main:
      write_json(workdir / "report.json", result)
    result["state"] = state
    return result
  finally:
    ckpt.close()
    for p in pipes:
      p.close()
    if feedback is not None:
      feedback.close()


# --- the command line ------------------------------------------------------------------------


def parser(job: Job, doc: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m train.{job.name}", description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=job.default_preset, choices=sorted(job.presets),
                 help=f"run preset (default: {job.default_preset})")
  p.add_argument("--workdir", default=None,
                 help=f"run folder (default: {default_workdir(job, 'PRESET')})")
  p.add_argument("--set", dest="sets", action="append", nargs="+", default=[],
                 metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")
  p.add_argument("-v", "--verbose", action="store_true",
                 help="INFO logs, and tensorflow-datasets' output while preparing a dataset")
  job.add_arguments(p)
  return p


def default_workdir(job: Job, preset: str) -> str:
  return f"./runs/{preset}" if job.name == "pretrain" else f"./runs/{job.name}-{preset}"


def _multi_host_env() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize_distributed(setting: bool | None) -> bool:
  """`jax.distributed.initialize()` when asked (True) or when the environment says so (None)."""
  if setting is False or (setting is None and not _multi_host_env()):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives only.
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True


def workdir_contents(workdir) -> str:
  """The entries of a work dir, folders with a trailing '/', for the closing line."""
  path = layout.run_path(workdir)
  names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                 if not p.name.startswith("."))
  return ", ".join(names)


def _new_workdir(workdir: str) -> str:
  """A work dir name next to `workdir` that does not exist yet (for the mismatch hint)."""
  base = workdir.rstrip("/")
  n = 2
  while not layout.is_remote(base) and os.path.exists(f"{base}-{n}"):
    n += 1
  return f"{base}-{n}"


def main(job: Job, doc: str, argv: Sequence[str] | None = None, *,
         hooks: Sequence[Callable] = (), caches: bool = False) -> int:
  """`python -m train.<job>`: parse, check, run, report. Exit status 2 for a bad command line,
  1 for a run that stopped with an error, 0 when done or preempted (rerun to resume).
  `caches`: JAX's persistent compilation cache (`lmjax.compilation_cache`, as the command
  line runs; a call from Python leaves it alone)."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = parser(job, doc).parse_args(argv)
  # -v: INFO records of train.* (and tfds's output when the embedded corpus is prepared).
  logging.getLogger("train").setLevel(logging.INFO if args.verbose else logging.NOTSET)
  try:
    config = job.config_from_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = args.workdir or default_workdir(job, args.config)
  if caches:
    lmjax.compilation_cache.enable_for_command(f"python -m train.{job.name}")
  initialize_distributed(config.mesh.distributed)
  try:
    result = run(job, config, workdir, hooks=hooks)
  except CheckpointMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    print(f"hint: add --workdir {_new_workdir(workdir)} to start a new run with these "
          f"settings; the run in {workdir} continues only with the settings it was saved with.",
          file=sys.stderr)
    return 1
  except (ValueError, FloatingPointError, FileNotFoundError, CheckpointReadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0 and result["reason"] == "done":
    job.print_report(result)
    if "quant" in result:
      print(qat_lib.report_line(result))
    print(f"wrote {workdir}: {workdir_contents(workdir)}")
  return 0
