"""Distillation from the command line: a small student learns from a large teacher.

    python -m train.distill [--teacher MODEL] [--student MODEL_OR_CONFIG]
        [--method data|kd|on-policy] [--data SOURCE] [--workdir DIR] [--set key=value ...]

MODEL is anything `lmjax.load_pretrained` takes or one of our run dirs; the student may also be
an `lmjax.PRESETS` name (a new model, e.g. `smollm2-student`, ~17M parameters), which takes the
teacher's vocabulary and tokenizer. Teacher and student must share the vocabulary.

* `data` (data distillation; sequence-level KD, Kim & Rush, 2016): the teacher answers prompts
  with `infer.generate` (`train.distill_data`; `data.source=synthetic`, the default, writes
  `DIR/synthetic.jsonl`, resumable), and the student trains on the answers with SFT's loss
  (cross entropy on the response tokens; `train.sft`'s batches).
* `kd` (Hinton et al., 2015; GKD, Agarwal et al., 2024): on the same batches, the student
  matches the teacher's token distributions: `kd.alpha` x T^2 x generalized JSD(`kd.beta`) at
  temperature `kd.temperature` plus (1 - alpha) x cross entropy (`train.distill_losses`). The
  teacher is frozen (`train.trainer.Frozen`: an argument of the jitted step, sharded like the
  student, never updated or checkpointed) and runs in the same step. Or, with
  `generate.store_topk=K kd.teacher=stored`, the teacher's top-K log-probs of every trained
  token are computed once and stored beside the jsonl data (`train.distill_topk`, resumable),
  and the student trains from them with no teacher loaded (the divergence over the teacher's
  top K, renormalized).
* `on-policy` (GKD, with lambda `kd.lmbda`): on that fraction of the steps the student samples
  its own completions of the data's prompts with the compiled decoder (`train.rollout`, shared
  with RL), and the teacher scores every token of them (`train.distill_onpolicy`; the loss is
  the divergence alone, alpha = 1; `kd.beta=1` is GKD's reverse KL). The report's `on_policy`
  section lists the steps that trained on the student's samples and the student's KL to the
  teacher on its own samples of held-out prompts before and after training. The rollouts
  follow the newest params through the job's `Trainer.fit` hook (`Job.hooks`).

`--set peft.method=lora peft.rank=8` (any `train.peft_config` method) trains an adapter on a
pretrained student's frozen weights instead of every weight (`train.distill_peft`): the frozen
tree then holds the student's base and the teacher, and the run writes the adapter as Hugging
Face PEFT files to `DIR/adapter/` (`load_run(DIR)` merges it into the base).

SOURCE is `synthetic` or any `train.sft` source (`chat`, `jsonl:PATH`, `tfds:NAME`): KD runs on
real text too. With no arguments, the `demo` preset distills SmolLM2-135M-Instruct into a new
~17M student on its answers to chat and arithmetic prompts (about 15 minutes on 2 CPU cores),
trains the same student with cross entropy only on the same batches (`DIR/baseline`,
`report.baseline`), and compares both on held-out teacher answers and on real text (the chat
set's held-out split): perplexity, KL to the teacher, and how well each would draft for the
teacher in speculative decoding (expected acceptance sum_x min(p, q), greedy agreement).

DIR (default `./runs/distill-PRESET`) is a run dir like SFT's: `lmjax.checkpoint.load_run(DIR)`
returns the student (config, params, the teacher's tokenizer), e.g. as a speculative drafter;
`report.json` holds the figures, `comparison.json` the KD-vs-CE table. Rerunning resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence

import jax

import lmjax
from lmjax import checkpoint as layout
from train import (
    chat_data,
    distill_data,
    distill_onpolicy,
    distill_peft,
    distill_report,
    distill_topk,
    sft,
)
from train import config as config_lib
from train import job as job_lib
from train.distill_config import (  # noqa: F401
    METHODS,
    PRESETS,
    SYNTHETIC,
    SYNTHETIC_FILE,
    DistillConfig,
    DistillDataConfig,
    DistillReportConfig,
    check_method,
    check_vocab,
    is_new_student,
    with_source,
)
from train.distill_losses import kd_loss, stored_kd_loss
from train.distill_report import baseline_config, compare, needs_baseline, print_comparison
from train.sft_config import MODEL_MAY_CHANGE

log = logging.getLogger("train.distill")


def resolve_models(config: DistillConfig, sets: Sequence[str]) -> DistillConfig:
  """Applies `--set`s; reads the teacher's and the student's model configs and applies the
  `model.*` (student) and `teacher_model.*` ones to them."""
  model_sets = [s for s in sets if s.startswith(("model.", "teacher_model."))]
  other = [s for s in sets if s not in model_sets]
  stub = config_lib.apply_overrides(dataclasses.replace(config, model=None, teacher_model=None),
                                    other)
  teacher = (config.teacher_model if config.teacher_model is not None
             and stub.teacher == config.teacher else sft.base_config(stub.teacher))
  if config.model is not None and stub.student == config.student:
    student = config.model
  elif is_new_student(stub.student):
    student = lmjax.TransformerConfig.from_preset(stub.student, vocab_size=teacher.vocab_size)
  else:
    student = sft.base_config(stub.student)
  fixed = [s for s in model_sets if s.startswith("teacher_model.")
           or not is_new_student(stub.student)]
  bad = sorted({s.partition("=")[0] for s in fixed
                if s.partition("=")[0].split(".", 1)[1] not in MODEL_MAY_CHANGE})
  if bad:
    raise ValueError(f"--set {bad[0]}: a pretrained model keeps its shape; model keys that may "
                     f"change: {list(MODEL_MAY_CHANGE)} (a new student, an lmjax preset name, "
                     "may change any)")
  out = dataclasses.replace(stub, model=student, teacher_model=teacher)
  return config_lib.apply_overrides(out, model_sets) if model_sets else out


class Distill(job_lib.Job):
  """Distillation: a student trained on a teacher's answers (`data`) or distributions (`kd`)."""

  name = "distill"
  presets = PRESETS

  def add_arguments(self, p):
    p.add_argument("--teacher", default=None, help="the teacher: a pretrained name or path, or a "
                   "run dir (default: smollm2-135m-instruct)")
    p.add_argument("--student", default=None, help="the student: a pretrained name or path, a "
                   "run dir, or an lmjax preset name for a new model (default: smollm2-student)")
    p.add_argument("--method", default=None, choices=METHODS, help="default: the preset's (kd)")
    p.add_argument("--data", default=None, help="synthetic (the teacher's answers), chat, "
                   "jsonl:PATH or tfds:NAME (default: synthetic)")

  def config_from_args(self, args):
    if args.config not in self.presets:
      raise ValueError(f"unknown distill preset {args.config!r}; presets are "
                       f"{sorted(self.presets)}")
    sets = [s for group in args.sets for s in group]
    for flag, key in ((args.teacher, "teacher"), (args.student, "student"),
                      (args.method, "method"), (args.data, "data.source")):
      if flag:
        sets.insert(0, f"{key}={flag}")
    config = resolve_models(self.presets[args.config](), sets)
    check_method(config)
    return config

  def prepare(self, config):
    if config.model is None or config.teacher_model is None:
      config = resolve_models(config, [])
    check_method(config)
    config = job_lib.resolve_precision(config)
    dtype, param_dtype = config_lib.resolve_dtypes(config.train.precision, config.teacher_model,
                                                   jax.default_backend())
    return dataclasses.replace(config, teacher_model=config.teacher_model.replace(
        dtype=dtype, param_dtype=param_dtype))

  def loss(self, config):
    alpha = {"data": 0.0, "on-policy": 1.0}.get(config.method, config.kd.alpha)
    kd = dataclasses.replace(config.kd, alpha=alpha)
    if config.kd.teacher == "stored":
      return stored_kd_loss(kd)
    return kd_loss(lmjax.model_for(config.teacher_model), kd)

  # --- what trains (the student, or its `peft` adapter) and what is frozen (`distill_peft`) --

  def model(self, config):
    ps = distill_peft.peft_setup(config)
    return ps.model if ps else super().model(config)

  def partition(self, config):
    return distill_peft.partition(config)

  def frozen_params(self, config, trainer):
    teacher, self._teacher_params = getattr(self, "_teacher_params", None), None
    return distill_peft.frozen_value(
        config, lambda: sft.load_base(config.student, config.model, trainer.mesh)[0],
        lambda: teacher if teacher is not None else sft.load_base(
            config.teacher, config.teacher_model, trainer.mesh)[0])

  def _student(self, config, params):
    """The student's params from the trainable ones, as rollouts take them."""
    frozen = self._trainer.frozen_params if config.peft.enabled else None
    return distill_peft.student_params(config, params, frozen)

  def tokenizer(self, config, workdir, restored):
    self._workdir = layout.run_path(workdir)
    if restored and layout.has_tokenizer(workdir):
      return layout.load_run_tokenizer(workdir)
    tok = sft.base_tokenizer(config.teacher)
    if tok is None:
      raise ValueError(f"the teacher {config.teacher!r} has no tokenizer; the student uses the "
                       "teacher's (give a model with tokenizer files)")
    return tok

  def _load_teacher(self, config):
    """The teacher that writes the synthetic data (or its top-k), sharded over the trainer's
    mesh as the frozen teacher is, and kept for `frozen_params`. With many processes only
    process 0 generates: it reads the teacher onto its own devices and every process reads the
    frozen copy again onto the mesh."""
    one = jax.process_count() == 1
    params, tok = sft.load_base(config.teacher, config.teacher_model,
                                self._trainer.mesh if one else None)
    self._teacher_params = params if one else None
    return lmjax.model_for(config.teacher_model), params, tok

  def check(self, config, trainer, tokenizer):
    self._gen, self._on_policy, self._trainer = None, None, trainer
    data = config
    if config.data.source == SYNTHETIC:
      path = self._workdir / SYNTHETIC_FILE
      if jax.process_index() == 0:
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._gen = distill_data.generate_dataset(
            path, config.generate, config.teacher, lambda: self._load_teacher(config))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("distill: synthetic data written")
      data = with_source(config, f"jsonl:{path}")
    self._table = None
    if config.kd.teacher == "stored":
      self._store_topk(config, data, tokenizer)
    self._data, self._stats, self._rows = {}, {}, {}
    for split in ("train", "heldout"):
      rows, examples, stats = sft._encoded(data, tokenizer, split)
      self._rows[split] = rows
      self._data[split], self._stats[split] = examples, dataclasses.asdict(stats)
    self._real = None
    if config.report.real_text != data.data.source:
      _, self._real, _ = sft._encoded(with_source(config, config.report.real_text), tokenizer,
                                      "heldout")

  def _store_topk(self, config, data, tokenizer):
    """Writes (or completes) the teacher's top-k beside the jsonl data; keeps them attached to
    each split's examples (`self._topk`)."""
    path = data.data.source.removeprefix("jsonl:")
    dc = config.data
    examples = {split: distill_topk.encoded_rows(
        chat_data.load_rows(data.data.source, split, heldout_fraction=dc.heldout_fraction,
                            seed=dc.seed), tokenizer, dc.seq_len, dc.template())
        for split in ("train", "heldout")}
    if jax.process_index() == 0:
      self._topk_stats = distill_topk.write_store(
          path, examples["train"] + examples["heldout"], k=config.generate.store_topk,
          settings={"teacher": config.teacher, "seq_len": dc.seq_len,
                    "chat_template": dc.template()},
          load_teacher=lambda: self._load_teacher(config)[:2],
          batch_size=config.generate.batch_size)
      self._teacher_params = None  # Not needed to train.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("distill: teacher top-k written")
    self._table = distill_topk.load_table(path)
    self._topk = {split: distill_topk.attach(ex, self._table) for split, ex in examples.items()}
    self._topk_fingerprint = json.dumps([config.teacher, config.generate.store_topk, path,
                                         jax.process_index(), jax.process_count()])

  def _batches(self, config, tokenizer, split):
    if self._table is not None:
      return distill_topk.make_batches(config.data, split, self._topk[split], self._table,
                                       self._topk_fingerprint)
    return sft.make_batches(config, tokenizer, split, self._data[split])

  def initial_state(self, config, trainer):
    if is_new_student(config.student) or config.peft.enabled:  # LoRA: B = 0, the base itself
      return trainer.init_state()
    params, _ = sft.load_base(config.student, config.model, trainer.mesh)
    return job_lib.state_from_params(trainer, params, donate=True)

  def train_batches(self, config, tokenizer):
    batches = self._batches(config, tokenizer, "train")
    self._on_policy = None
    if config.method == "on-policy":
      self._on_policy = distill_onpolicy.OnPolicyBatches(
          lmjax.model_for(config.model), tokenizer,
          distill_onpolicy.prompt_ids(self._rows["train"], tokenizer, config.data.template()),
          batches, lmbda=config.kd.lmbda, batch_size=config.data.batch_size,
          seq_len=config.data.seq_len, max_new_tokens=config.generate.max_new_tokens,
          seed=config.train.seed)
      return self._on_policy
    return batches

  def hooks(self, config):
    if config.method != "on-policy":
      return ()

    def follow(step, state):  # After each step: the next rollout samples the params it made.
      if self._on_policy is not None:  # (None: the caller gave its own train batches.)
        self._on_policy.update(step, self._student(config, state.params))

    return (follow,)

  def before_training(self, config, trainer, state, tokenizer, start, feedback):
    if self._on_policy is None:  # Not on-policy, or the caller gave its own train batches.
      return {}
    self._on_policy.update(start, self._student(config, state.params))
    self._start = start
    return {"student_samples": self._own_samples(config, trainer, state.params)}

  def _own_samples(self, config, trainer, params) -> dict:
    """The student's KL to the teacher (both ways), acceptance and greedy agreement, per token
    of its own samples (the rollout sampler) of held-out prompts (the train prompts when no
    held-out prompt fits), the same prompts and seed each time."""
    op = self._on_policy
    held = distill_onpolicy.prompt_ids(self._rows["heldout"], op.tokenizer,
                                       config.data.template())
    held = [p for p in held if len(p) <= config.data.seq_len + 1 - op.max_new_tokens]
    pool = held or op.prompts
    prompts = [pool[i % len(pool)] for i in range(config.data.batch_size)]
    batch = op.samples(self._student(config, params), prompts, seed=config.train.seed + 1)
    ev = trainer.evaluate(params, iter([batch]), 1)
    return {k: ev[k] for k in ("kl_student", "kl_teacher", "accept", "greedy_agree", "tokens")}

  def eval_batches(self, config, tokenizer):
    return self._batches(config, tokenizer, "heldout")

  def report(self, config, trainer, params, tokenizer, before):
    out = {"method": config.method, "data": self._stats,
           "student_params": lmjax.count_params(trainer.abstract_state.params)}
    if self._gen is not None:
      out["generation"] = self._gen
    if self._table is not None:
      out["stored_topk"] = getattr(self, "_topk_stats", None)
    if self._on_policy is not None:
      steps = config.train.steps - self._start
      out["on_policy"] = {
          "lmbda": config.kd.lmbda, "steps": self._on_policy.served,
          "fraction": len(self._on_policy.served) / max(steps, 1), "of_steps": steps,
          "from_step": self._start,  # "before" is at this step (a resumed run's restart).
          "student_samples": {"before": before["student_samples"],
                              "after": self._own_samples(config, trainer, params)}}
    if self._real:
      real = sft.make_batches(with_source(config, config.report.real_text), tokenizer,
                              "heldout", self._real)
      out["real_text"] = distill_report.summary(trainer.evaluate(params, real,
                                                                 config.train.eval_batches))
    ps = distill_peft.peft_setup(config)
    if ps:  # DIR/adapter/: Hugging Face PEFT files pointing at the student's base
      ps.save(self._workdir, config.model, params, base=config.student)
      out["peft"] = {"method": config.peft.method, "trainable_params": lmjax.peft.count(params),
                     "adapter": str(self._workdir / "adapter")}
    return out

  def print_report(self, result, out=print):
    distill_report.print_report(result, out)


JOB = Distill()


def run(config: DistillConfig, workdir, *, hooks: Sequence[Callable] = (), train_batches=None):
  """Distills (or resumes) the run in `workdir`, then the CE-only baseline when
  `report.baseline`; returns the final figures (`job.run`), with `comparison` if any."""
  result = job_lib.run(JOB, config, workdir, hooks=hooks, train_batches=train_batches)
  if result["reason"] == "done" and needs_baseline(config):
    job_lib.run(JOB, baseline_config(config, workdir), layout.run_path(workdir) / "baseline")
    result["comparison"] = compare(workdir)
  return result


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[Callable] = (),
         caches: bool = False) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rc = job_lib.main(JOB, __doc__, argv, hooks=hooks, caches=caches)
  if rc:
    return rc
  args = job_lib.parser(JOB, __doc__).parse_args(argv)
  config = JOB.config_from_args(args)
  workdir = args.workdir or job_lib.default_workdir(JOB, args.config)
  if not needs_baseline(config) or not (layout.run_path(workdir) / "report.json").exists():
    return rc
  base = baseline_config(config, workdir)
  print(f"baseline: the same student with cross entropy only on the same batches "
        f"({workdir}/baseline)")
  rc = job_lib.main(JOB, __doc__, [*argv, "--workdir", f"{workdir}/baseline", "--set",
                                   "method=kd", "kd.alpha=0", "report.baseline=false",
                                   f"data.source={base.data.source}"], caches=caches)
  if rc:
    return rc
  print_comparison(compare(workdir))
  return 0


if __name__ == "__main__":
  sys.exit(main(caches=True))
