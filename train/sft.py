"""Supervised fine-tuning (SFT) from the command line: a pretrained model learns to answer.

    python -m train.sft [--model MODEL] [--data SOURCE] [--workdir DIR] [--set key=value ...]

MODEL is anything `lmjax.load_pretrained` takes (`smollm2-135m-instruct`, a `.gguf`, a Hugging
Face folder) or one of our run dirs (`runs/demo`); SOURCE is `chat` (the embedded English chat
set), `jsonl:PATH` or `tfds:NAME` with rows `{"messages"}`, `{"prompt", "completion"}` or
`{"text"}` (`train.chat_data`). The loss is next-token cross entropy on the response tokens only
(every assistant turn and the end-of-turn token closing it); several examples share a row, each
attending only inside itself. With no arguments, the `demo` preset fine-tunes
SmolLM2-135M-Instruct on the embedded chat set (a few minutes on 2 CPU cores) and prints the
held-out loss and a few held-out replies before and after.

DIR (default `./runs/sft-PRESET`) is a run dir like pretraining's: `config.json` (its `model`
section the fine-tuned `TransformerConfig`), `tokenizer/` (the base model's Hugging Face
tokenizer and chat template) or `tokenizer.model`, `checkpoints/`, `metrics.jsonl`,
`tensorboard/`, `loss.png`, `report.json`. `lmjax.checkpoint.load_run(DIR)`,
`python -m infer --workdir DIR --chat ...` and `lmjax.save_pretrained` use it as it is.
Rerunning the command resumes; `-v` shows INFO logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import jax

import lmjax
from lmjax import checkpoint as layout
from lmjax.config import TransformerConfig
from train import chat_data, objectives, packing, peft_train
from train import config as config_lib
from train import job as job_lib
from train.data import DataIterator
from train.sft_config import (  # noqa: F401
    MODEL_MAY_CHANGE,
    PRESETS,
    SFTConfig,
    SFTDataConfig,
    SFTReportConfig,
)

log = logging.getLogger("train.sft")

# --- the base model ---------------------------------------------------------------------------


def _is_run_dir(base: str) -> bool:
  """A run dir of ours (`config.json` + `checkpoints/`), not a Hugging Face folder."""
  return "://" in base or (Path(base).expanduser() / layout.CHECKPOINT_DIR).is_dir()


def base_config(base: str) -> TransformerConfig:
  """The `TransformerConfig` of a base model, without reading its weights."""
  if _is_run_dir(base):
    run = layout.read_json(layout.run_path(base) / layout.CONFIG_FILE, f"run {base!r}")
    return layout.model_config_of(run, base)
  return lmjax.convert.pretrained_config(base)


def load_base(base: str, config: TransformerConfig, mesh: jax.sharding.Mesh):
  """`(params, tokenizer)` of a base model, sharded over `mesh` (never whole on one device)."""
  if _is_run_dir(base):
    _, params, tokenizer = layout.load_run(base, mesh=mesh)
  else:
    runs = {k: getattr(config, k) for k in lmjax.convert.pretrained.OVERRIDABLE}
    _, params, tokenizer = lmjax.load_pretrained(base, config.param_dtype, mesh=mesh, **runs)
  if tokenizer is None:
    raise ValueError(f"{base!r} has no tokenizer; SFT renders chats with the model's own "
                     "tokenizer (give a model with tokenizer files)")
  return params, tokenizer


def base_tokenizer(base: str):
  """The tokenizer of a base model (None: it has none), without reading its weights."""
  if _is_run_dir(base):
    return layout.load_run_tokenizer(base)
  return lmjax.convert.pretrained_tokenizer(base)


# --- batches -------------------------------------------------------------------------------------


def _encoded(config: SFTConfig, tokenizer, split: str
             ) -> tuple[list[chat_data.Row], list, chat_data.EncodeStats]:
  dc = config.data
  rows = chat_data.load_rows(dc.source, split, data_dir=dc.tfds_data_dir,
                             heldout_fraction=dc.heldout_fraction, seed=dc.seed)
  if jax.process_count() > 1:
    rows = rows[jax.process_index()::jax.process_count()]
  if not rows:
    hint = (": raise data.heldout_fraction (a jsonl file's held-out rows are chosen by a hash "
            "of each row)" if split == "heldout" else "")
    raise chat_data.DataError(f"{dc.source} has no {split} rows"
                              + (" on this host" if jax.process_count() > 1 else "") + hint)
  examples, stats = chat_data.encode_rows(rows, tokenizer, dc.seq_len,
                                          chat_template=dc.template())
  return rows, examples, stats


def make_batches(config: SFTConfig, tokenizer, split: str, examples=None) -> DataIterator:
  """Batches of `split` ("train": shuffled, endless; "heldout": one pass, the last padded), each
  `inputs, targets, loss_mask, segment_ids, positions` `[batch_size, seq_len]`."""
  dc = config.data
  if examples is None:
    _, examples, _ = _encoded(config, tokenizer, split)
  train = split == "train"
  ds = grain.MapDataset.source(examples)
  if train and dc.shuffle:
    ds = ds.shuffle(seed=dc.seed)
  if train:
    ds = ds.repeat(None)
  lengths = {"inputs": dc.seq_len, "targets": dc.seq_len, "loss_mask": dc.seq_len}
  it = packing.pack(ds.to_iter_dataset(), lengths, num_bins=dc.num_packing_bins, seed=dc.seed,
                    shuffle=train and dc.shuffle, max_per_row=None if dc.pack else 1)
  it = it.map(packing.finalize_lm).batch(dc.batch_size, drop_remainder=train)
  if not train:
    it = it.map(packing.PadBatch(dc.batch_size))
  vocab = getattr(tokenizer, "model_proto", None) or repr(tokenizer).encode()
  blob = json.dumps([dataclasses.asdict(dc), split, jax.process_index(), jax.process_count(),
                     hashlib.sha256(vocab).hexdigest(), len(examples)], sort_keys=True)
  return DataIterator(it, hashlib.sha256(blob.encode()).hexdigest()[:16])


# --- the job -------------------------------------------------------------------------------------


class SFT(job_lib.Job):
  """Supervised fine-tuning: chat/instruction rows, loss on the responses, from a base model."""

  name = "sft"
  presets = PRESETS

  def add_arguments(self, p):
    p.add_argument("--model", default=None,
                   help="the base model: a pretrained name or path, or a run dir "
                        "(default: the preset's, smollm2-135m-instruct)")
    p.add_argument("--data", default=None,
                   help="rows: chat (embedded), jsonl:PATH or tfds:NAME (default: chat)")

  def config_from_args(self, args):
    if args.config not in self.presets:
      raise ValueError(f"unknown sft preset {args.config!r}; presets are {sorted(self.presets)}")
    config = self.presets[args.config]()
    sets = [s for group in args.sets for s in group]
    if args.model:
      sets.insert(0, f"base={args.model}")
    if args.data:
      sets.insert(0, f"data.source={args.data}")
    return resolve_model(config, sets)

  def prepare(self, config):
    return job_lib.resolve_precision(resolve_model(config, []) if config.model is None
                                     else config)

  def loss(self, config):
    return objectives.causal_lm_loss  # With the response mask as the loss mask.

  # --- PEFT (`config.peft`, `train.peft_train`): the adapter trains, the base is frozen ------

  def _peft(self, config):
    key = (config.peft, config.model)
    cache = self.__dict__.setdefault("_peft_setups", {})
    if key not in cache:
      cache[key] = peft_train.setup(config.peft, lmjax.model_for(config.model),
                                    lmjax.peft.boxed_abstract(config.model))
    return cache[key]

  def model(self, config):
    ps = self._peft(config)
    return ps.model if ps else super().model(config)

  def partition(self, config):
    ps = self._peft(config)
    return (ps.init_params, ps.frozen) if ps else (None, None)

  def frozen_params(self, config, trainer):
    params, _ = load_base(config.base, config.model, trainer.mesh)
    self._base_embedding = params["embed"]["embedding"]
    return self._peft(config).frozen_value(params)

  def eval_target(self, config, trainer, params):
    ps = self._peft(config)
    if ps is None:
      return super().eval_target(config, trainer, params)
    if config.peft.method != "lora" or config.peft.base_quant != "none":
      return None  # eval tasks score plain params: LoRA merges into them, the others do not
    adapted = lmjax.peft.merge_adapted(ps.adapted(params, trainer.frozen_params))
    return trainer.model.model, adapted.base

  def tokenizer(self, config, workdir, restored):
    if restored and layout.has_tokenizer(workdir):
      return layout.load_run_tokenizer(workdir)
    tok = base_tokenizer(config.base)
    if tok is None:
      raise ValueError(f"{config.base!r} has no tokenizer; SFT renders chats with the model's "
                       "own tokenizer (give a model with tokenizer files)")
    return tok

  def check(self, config, trainer, tokenizer):
    self._tokenizer = tokenizer
    # Every row of both splits is read, checked and encoded now (a bad row fails before step 0).
    self._data, self._stats = {}, {}
    for split in ("train", "heldout"):
      rows, examples, stats = _encoded(config, tokenizer, split)
      if split == "heldout":
        self._heldout_rows = rows
      if not examples:
        raise chat_data.DataError(f"no {split} example of {config.data.source} has a response "
                                  f"token within data.seq_len={config.data.seq_len}")
      self._data[split] = examples
      log.info("%s: %s", split, stats.describe())
      self._stats[split] = dataclasses.asdict(stats)

  def initial_state(self, config, trainer):
    ps = self._peft(config)
    if ps and config.peft.prompt_init_text:  # the soft prompt starts as the text's embeddings
      ids = self._tokenizer.encode(config.peft.prompt_init_text)
      value = peft_train.prompt_from_text(self._base_embedding, ids,
                                          config.peft.num_virtual_tokens)
      return job_lib.state_from_params(trainer, {"embed": {"prompt_embeddings": value}})
    if ps:
      return trainer.init_state()
    params, _ = load_base(config.base, config.model, trainer.mesh)
    return job_lib.state_from_params(trainer, params, donate=True)

  def train_batches(self, config, tokenizer):
    return make_batches(config, tokenizer, "train", self._data["train"])

  def eval_batches(self, config, tokenizer):
    return make_batches(config, tokenizer, "heldout", self._data["heldout"])

  def before_training(self, config, trainer, state, tokenizer, start, feedback):
    self._workdir = feedback.workdir
    for split, s in self._stats.items():
      feedback.print(f"{split}: " + chat_data.EncodeStats(**s).describe())
    path = layout.run_path(feedback.workdir) / "before.json"
    if start and path.exists():
      return json.loads(path.read_text())
    if start:
      return {}
    before = {"heldout": trainer.evaluate(state.params, self.eval_batches(config, tokenizer),
                                          config.train.eval_batches),
              "replies": self._replies(config, trainer, state.params, tokenizer)}
    if jax.process_index() == 0:
      job_lib.write_json(path, before)
    feedback.print(f"held-out loss before fine-tuning: {before['heldout']['loss']:.4f}")
    return before

  def _replies(self, config, trainer, params, tokenizer) -> list[dict]:
    import infer
    from infer import prompts
    from train import report

    rows = self._heldout_rows[:config.report.replies]
    if not rows:
      return []
    ps = self._peft(config)
    host = report.gather_params(params if ps is None else ps.adapted(params,
                                                                     trainer.frozen_params))
    if jax.process_index() != 0:
      return []
    chats, answers = [], []
    for r in rows:
      kind, value = chat_data.to_example(r)
      if kind == "chat":
        msgs, start = value
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= start)
        chats.append(prompts.render_chat(msgs[:last], tokenizer,
                                         chat_template=config.data.template()))
        answers.append(msgs[last]["content"])
      elif kind == "pair":
        chats.append(value[0])
        answers.append(value[1])
    if not chats:
      return []
    model = trainer.model.model if ps else trainer.model
    out = infer.generate(model, host, chats, tokenizer=tokenizer,
                         max_new_tokens=config.report.max_new_tokens,
                         sampler=infer.sampling.Greedy())
    return [{"prompt": c, "reference": a, "reply": t.strip()}
            for c, a, t in zip(chats, answers, out.text)]

  def report(self, config, trainer, params, tokenizer, before):
    out = {"data": self._stats}
    ps = self._peft(config)
    if ps:  # WORKDIR/adapter/: Hugging Face PEFT files pointing at the base
      ps.save(self._workdir, config.model, params, base=config.base)
      out["peft"] = {"method": config.peft.method, "trainable_params": lmjax.peft.count(params)}
    if before:
      out["before"] = before
    out["replies"] = self._replies(config, trainer, params, tokenizer)
    return out

  def print_report(self, result, out=print):
    v, b = result.get("validation"), result.get("before", {}).get("heldout")
    if v:
      line = f"held-out response loss {v['loss']:.4f}, token accuracy {v['accuracy']:.3f}"
      if b:
        line += f" (before fine-tuning: {b['loss']:.4f}, {b['accuracy']:.3f})"
      out(line)
    before = {r["prompt"]: r["reply"] for r in result.get("before", {}).get("replies", [])}
    for r in result.get("replies", []):
      out(f"--- {r['prompt'].strip()[-80:]!r}\n  reference: {r['reference']}")
      if r["prompt"] in before:
        out(f"  before:    {before[r['prompt']]}")
      out(f"  after:     {r['reply']}")


def resolve_model(config: SFTConfig, sets: Sequence[str]) -> SFTConfig:
  """Applies `--set`s; reads the base's model config and applies the `model.*` ones to it."""
  model_sets = [s for s in sets if s.startswith("model.")]
  other = [s for s in sets if not s.startswith("model.")]
  stub = dataclasses.replace(config, model=None)
  stub = config_lib.apply_overrides(stub, other)
  model = config.model if config.model is not None and stub.base == config.base else (
      base_config(stub.base))
  keys = sorted({s.partition("=")[0][len("model."):] for s in model_sets})
  bad = [k for k in keys if k not in MODEL_MAY_CHANGE]
  if bad:
    raise ValueError(f"--set model.{bad[0]}: fine-tuning keeps the base model's shape; model keys "
                     f"that may change: {list(MODEL_MAY_CHANGE)}")
  with_model = dataclasses.replace(stub, model=model)
  return config_lib.apply_overrides(with_model, model_sets) if model_sets else with_model


JOB = SFT()


def run(config: SFTConfig, workdir, *, hooks: Sequence[Callable] = (), train_batches=None):
  """Fine-tunes (or resumes) the run in `workdir`; returns the final figures (`job.run`)."""
  return job_lib.run(JOB, config, workdir, hooks=hooks, train_batches=train_batches)


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[Callable] = (),
         caches: bool = False) -> int:
  return job_lib.main(JOB, __doc__, argv, hooks=hooks, caches=caches)


if __name__ == "__main__":
  sys.exit(main(caches=True))
