"""Pretraining from the command line.

    python -m train.pretrain [--config PRESET] [--workdir DIR] [--set key=value ...]

PRESET is one of `train.config.PRESETS` (default `demo`: a small decoder on the embedded
Shakespeare corpus, a few minutes on a laptop CPU); DIR defaults to `./runs/PRESET`. Rerunning
the same command resumes from the newest good checkpoint in DIR; SIGTERM (a TPU VM preemption)
saves the current step and exits with status 0. Multi-host (a TPU pod slice, or several
processes): `jax.distributed.initialize()` runs when the environment names a coordinator
(`JAX_COORDINATOR_ADDRESS`, with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` off cloud TPUs) or a
multi-host TPU slice, or with `--set mesh.distributed=true`.
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
from train import config as config_lib
from train import data as data_lib
from train import objectives, report
from train.checkpointing import Checkpointer, CheckpointMismatchError
from train.feedback import Feedback, peak_flops
from train.optimizer import learning_rate_schedule, make_optimizer
from train.trainer import Trainer, TrainState

log = logging.getLogger("train.pretrain")


def parse_args(argv: Sequence[str] | None) -> tuple[config_lib.RunConfig, str]:
  p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="demo", choices=sorted(config_lib.PRESETS),
                 help="run preset (default: demo)")
  p.add_argument("--workdir", default=None, help="run folder (default: ./runs/PRESET)")
  p.add_argument("--set", dest="sets", action="append", nargs="+", default=[],
                 metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")
  args = p.parse_args(argv)
  config = config_lib.apply_overrides(config_lib.preset(args.config),
                                      [s for group in args.sets for s in group])
  return config, args.workdir or f"./runs/{args.config}"


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


def resolve_precision(config: config_lib.RunConfig) -> config_lib.RunConfig:
  """Mixed precision: bfloat16 compute on TPU/GPU (float32 on CPU), float32 params/state."""
  p = config.train.precision
  if p == "model":
    return config
  dtype = p if p != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  return dataclasses.replace(config, model=config.model.replace(dtype=dtype,
                                                                param_dtype="float32"))


def build_mesh(mesh: config_lib.MeshConfig) -> jax.sharding.Mesh:
  devices = jax.devices()
  sizes = (mesh.data, mesh.fsdp, mesh.tensor)
  want = int(np.prod(sizes))
  if -1 not in sizes and want < len(devices) and jax.process_count() == 1:
    log.info("mesh %s uses %d of %d devices", sizes, want, len(devices))
    devices = devices[:want]
  return lmjax.make_mesh(*sizes, devices=devices)


def build_trainer(config: config_lib.RunConfig,
                  mesh: jax.sharding.Mesh | None = None) -> Trainer:
  """The trainer of a run config: its model, the objective's loss, AdamW, over the mesh."""
  cfg, dc = config.model, config.data
  objectives.check_model_fits(dc.objective, cfg.num_encoder_layers, cfg.num_decoder_layers)
  steps = config.train.steps
  return Trainer(lmjax.model_for(cfg), objectives.loss_for(dc.objective),
                 make_optimizer(config.optimizer, steps),
                 build_mesh(config.mesh) if mesh is None else mesh,
                 init_inputs=lmjax.counting.example_inputs(cfg),
                 global_batch=dc.batch_size * jax.process_count(),
                 grad_accum=config.train.grad_accum, seed=config.train.seed,
                 learning_rate=learning_rate_schedule(config.optimizer, steps))


def _write_json(path, data: dict) -> None:
  """Writes JSON (atomically on a local disk)."""
  text = json.dumps(data, indent=2)
  if layout.is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def run(config: config_lib.RunConfig, workdir: str | os.PathLike, *,
        hooks: Sequence[Callable] = (),
        train_batches: Iterator[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final figures.

  `train_batches` replaces the train pipeline (tests: the same global batch from other host
  layouts); `hooks` go to `Trainer.fit`.
  """
  workdir = layout.run_path(workdir)
  config = resolve_precision(config)
  cfg, dc = config.model, config.data
  steps = config.train.steps
  trainer = build_trainer(config)
  mesh = trainer.mesh
  run_dict = config.to_dict()
  is_main = jax.process_index() == 0

  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
                      async_save=config.checkpoint.async_save)
  pipes = []
  feedback = None
  try:
    restored = None
    if ckpt.steps():
      if not config.checkpoint.resume:
        raise ValueError(f"{workdir} holds checkpoints at steps {ckpt.steps()} and "
                         "checkpoint.resume=false: use another --workdir (nothing was deleted)")
      restored = ckpt.restore_latest(trainer.abstract_state, run_dict, TrainState)
    tok_path = workdir / layout.TOKENIZER_FILE
    if restored is not None and tok_path.exists() and not dc.tokenizer_path:
      tokenizer = layout.load_tokenizer(tok_path)
    else:
      tokenizer = data_lib.build_tokenizer(dc)
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                       f"{cfg.vocab_size}: set model.vocab_size >= {tokenizer.vocab_size}")
    if restored is None:
      state, start, data_state = trainer.init_state(), 0, None
    else:
      state, start, data_state = restored
    if train_batches is None:
      train_batches = data_lib.make_pipeline(dc, tokenizer, "train")
      pipes.append(train_batches)
    if data_state:
      try:
        train_batches.set_state(data_state)
      except (ValueError, KeyError) as e:
        raise CheckpointMismatchError(f"checkpoint step {start}: {e}") from e
    if is_main:  # Everything checked: now the work dir is written.
      workdir.mkdir(parents=True, exist_ok=True)
      _write_json(workdir / layout.CONFIG_FILE, run_dict)
      if not (tok_path.exists() and restored is not None):
        layout.save_tokenizer(tokenizer, tok_path)

    feedback = Feedback(
        workdir, total_steps=steps, start_step=start, log_every=config.train.log_every,
        tokens_per_step=trainer.global_batch * dc.seq_len,
        flops_per_token=lmjax.flops_per_token(cfg, dc.seq_len),
        peak=peak_flops(cfg.dtype)[0] * jax.process_count(),
        progress_bar=config.train.progress_bar, learning_rate=trainer.learning_rate)
    n_params = lmjax.count_params(trainer.abstract_state.params)
    feedback.print(f"run config (saved to {workdir / layout.CONFIG_FILE}):\n" + "\n".join(
        f"  {k}: {json.dumps(v)}" for k, v in run_dict.items()))
    feedback.print(f"{type(trainer.model).__name__} with {n_params:,} params; mesh "
                   f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
                   f"devices, {jax.process_count()} process(es); "
                   + (f"resuming from step {start}" if start else "starting at step 0"))

    def eval_batches():
      it = data_lib.make_pipeline(dc, tokenizer, config.train.eval_split)
      pipes.append(it)
      return it

    evals = {}

    def evaluate(params):
      evals["last"] = trainer.evaluate(params, eval_batches(), config.train.eval_batches)
      return evals["last"]

    def save(step, state, val):
      data = train_batches.get_state() if hasattr(train_batches, "get_state") else None
      ckpt.save(step, state, run_dict, data, val)

    t0 = time.perf_counter()
    state, step, reason = trainer.fit(
        state, train_batches, start_step=start, steps=steps,
        eval_every=config.train.eval_every, evaluate=evaluate, checkpoint=save,
        checkpoint_every=config.checkpoint.every, feedback=feedback, hooks=hooks)
    ckpt.wait()
    result = {"step": step, "reason": reason, "train_seconds": time.perf_counter() - t0}
    if reason == "preempted":
      feedback.print(f"preempted: saved step {step} in {ckpt.directory}; rerun the same "
                     "command to resume")
      return result
    if "last" not in evals:  # Already trained to `steps`: evaluate for the report.
      evaluate(state.params)
    result["validation"] = evals["last"]
    result.update(_final_report(config, trainer, state.params, tokenizer))
    if is_main:
      _write_json(workdir / "report.json", result)
    result["state"] = state
    return result
  finally:
    ckpt.close()
    for p in pipes:
      p.close()
    if feedback is not None:
      feedback.close()


def _final_report(config, trainer, params, tokenizer) -> dict[str, Any]:
  out = {}
  rc, dc = config.report, config.data
  if rc.unigram_baseline:
    counts = report.unigram_counts(
        data_lib.make_pipeline(report.one_epoch(dc), tokenizer, "train"), config.model.vocab_size)
    out["unigram"] = report.unigram_perplexity(
        counts, data_lib.make_pipeline(dc, tokenizer, config.train.eval_split),
        config.train.eval_batches)
  if rc.prompts and config.data.objective == "causal_lm":
    host_params = report.gather_params(params)
    if jax.process_index() == 0:
      texts, how = report.sample(trainer.model, host_params, tokenizer, rc.prompts,
                                 max_new_tokens=rc.max_new_tokens, top_p=rc.top_p,
                                 temperature=rc.temperature, seed=config.train.seed)
      out["samples"] = dict(zip(rc.prompts, texts))
      out["sampler"] = how
  return out


def print_report(result: dict[str, Any], feedback_print=print) -> None:
  v = result.get("validation")
  if v:
    line = f"validation perplexity {v['perplexity']:.2f} (loss {v['loss']:.4f})"
    if "unigram" in result:
      u = result["unigram"]
      line += (f" vs unigram baseline {u['perplexity']:.2f} (loss {u['loss']:.4f}) on the same "
               f"{int(u['tokens']):,} validation tokens")
    feedback_print(line)
  if result.get("samples"):
    feedback_print(f"samples ({result['sampler']}):")
    for prompt, text in result["samples"].items():
      feedback_print(f"--- {prompt!r}\n{prompt}{text}")


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[Callable] = ()) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    config, workdir = parse_args(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  initialize_distributed(config.mesh.distributed)
  try:
    result = run(config, workdir, hooks=hooks)
  except (ValueError, FloatingPointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0 and result["reason"] == "done":
    print_report(result)
    print(f"wrote {workdir}: config.json, checkpoints/, metrics.jsonl, tensorboard/, loss.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
