"""Pretraining from the command line.

    python -m train.pretrain [--config PRESET] [--workdir DIR] [--set key=value ...] [-v]

PRESET is one of `train.config.PRESETS` (default `demo`: a small decoder on the embedded
Shakespeare corpus, a few minutes on a laptop CPU); DIR defaults to `./runs/PRESET`. Rerunning
the same command resumes from the newest good checkpoint in DIR; SIGTERM (a TPU VM preemption)
saves the current step and exits with status 0. Multi-host (a TPU pod slice, or several
processes): `jax.distributed.initialize()` runs when the environment names a coordinator
(`JAX_COORDINATOR_ADDRESS`, with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` off cloud TPUs) or a
multi-host TPU slice, or with `--set mesh.distributed=true`. `-v` also shows INFO logs and
tensorflow-datasets' own output when the embedded corpus is prepared.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from lmjax import checkpoint as layout
from train import config as config_lib
from train import data as data_lib
from train import job as job_lib
from train import objectives, report, sources
from train.job import build_mesh, initialize_distributed, resolve_precision  # noqa: F401
from train.trainer import Trainer


class Pretrain(job_lib.Job):
  """Pretraining: the data pipeline's objective (causal LM, masked LM, span corruption,
  seq2seq) on a model initialized from scratch."""

  name = "pretrain"
  presets = config_lib.PRESETS

  def loss(self, config):
    objectives.check_model_fits(config.data.objective, config.model.num_encoder_layers,
                                config.model.num_decoder_layers)
    return objectives.loss_for(config.data.objective)

  def tokenizer(self, config, workdir, restored):
    dc = config.data
    if restored and layout.has_tokenizer(workdir) and not dc.tokenizer_path:
      return layout.load_run_tokenizer(workdir)
    return data_lib.build_tokenizer(dc)

  def check(self, config, trainer, tokenizer):
    # The report's prompts fit the context, and the evaluation split exists.
    dc = config.data
    report.check_prompts(trainer.model, tokenizer, dc.objective, config.report)
    sources.resolve_source(dc.source, config.train.eval_split, data_dir=dc.tfds_data_dir)

  def train_batches(self, config, tokenizer):
    return data_lib.make_pipeline(config.data, tokenizer, "train")

  def eval_batches(self, config, tokenizer):
    return data_lib.make_pipeline(config.data, tokenizer, config.train.eval_split)

  def report(self, config, trainer, params, tokenizer, before):
    return _final_report(config, trainer, params, tokenizer)

  def print_report(self, result, out=print):
    print_report(result, out)


JOB = Pretrain()


def parse_args(argv: Sequence[str] | None) -> tuple[config_lib.RunConfig, str]:
  """The run config and work dir of a command line."""
  args = _parser().parse_args(argv)
  return JOB.config_from_args(args), args.workdir or job_lib.default_workdir(JOB, args.config)


def _parser():
  return job_lib.parser(JOB, __doc__)


def build_trainer(config: config_lib.RunConfig,
                  mesh: jax.sharding.Mesh | None = None) -> Trainer:
  """The trainer of a run config: its model, the objective's loss, AdamW, over the mesh."""
  return job_lib.build_trainer(JOB, config, mesh)


def run(config: config_lib.RunConfig, workdir: str | os.PathLike, *,
        hooks: Sequence[Callable] = (),
        train_batches: Iterator[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final figures (`job.run`)."""
  return job_lib.run(JOB, config, workdir, hooks=hooks, train_batches=train_batches)


def _final_report(config, trainer, params, tokenizer) -> dict[str, Any]:
  out = {}
  rc, dc = config.report, config.data
  if rc.unigram_baseline:
    counts = report.unigram_counts(
        data_lib.make_pipeline(report.one_epoch(dc), tokenizer, "train"), config.model.vocab_size)
    out["unigram"] = report.unigram_perplexity(
        counts, data_lib.make_pipeline(dc, tokenizer, config.train.eval_split),
        config.train.eval_batches)
  if rc.prompts:
    host_params = report.gather_params(params)
    if jax.process_index() == 0:
      out.update(report.prompt_report(trainer.model, host_params, tokenizer, dc.objective, rc,
                                      seed=config.train.seed))
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
    kind = result.get("sample_kind", "continuation")
    feedback_print({"continuation": "samples", "output": "outputs", "spans": "span fills",
                    "fill": "mask fills"}[kind] + f" ({result['sampler']}):")
    inputs = result.get("sample_inputs", {})
    for prompt, text in result["samples"].items():
      if kind == "continuation":
        feedback_print(f"--- {prompt!r}\n{prompt}{text}")
      elif kind == "fill":
        feedback_print(f"--- {prompt!r} as {inputs[prompt]!r}, filled "
                       f"{result['fills'][prompt]}\n{text}")
      else:
        shown = f" as {inputs[prompt]!r}" if prompt in inputs else ""
        feedback_print(f"--- {prompt!r}{shown} ->\n{text}")


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[Callable] = (),
         caches: bool = False) -> int:
  return job_lib.main(JOB, __doc__, argv, hooks=hooks, caches=caches)


if __name__ == "__main__":
  sys.exit(main(caches=True))
