"""Reward-model training from the command line: a pretrained or SFT model learns to score.

    python -m train.reward [--model MODEL] [--data SOURCE] [--workdir DIR] [--set key=value ...]

MODEL is what `train.sft` takes (a pretrained name or path, or one of our run dirs); its LM
head is replaced by a scalar head (`lmjax.RewardModel`) trained with the Bradley-Terry loss
`-log sigmoid(r_chosen - r_rejected - margin)` (`train.preference_losses`). SOURCE is
`arithmetic` or `chat` (embedded pairs), `jsonl:PATH` or `tfds:NAME` with rows
`{"prompt", "chosen", "rejected"}` (`train.preference_data`). The run reports held-out
pairwise accuracy and reward margins before and after training.

DIR (default `./runs/reward-PRESET`) is a run dir whose `config.json` says `"head": "reward"`:
`lmjax.load_reward_model(DIR)` reads it, `lmjax.save_pretrained` exports it as a Hugging Face
`LlamaForSequenceClassification` folder, and `python -m infer --best-of N --reward-model DIR`
ranks samples with it. Rerunning the command resumes.

`--set peft.method=lora peft.rank=8 peft.targets=query,value` (`train.peft_config`; QLoRA with
`peft.base_quant=nf4`, bottleneck adapters with `peft.method=adapter`) trains an adapter and
the score head on the frozen trunk; the run writes them to `DIR/adapter/` as Hugging Face PEFT
files (`task_type` "SEQ_CLS", the head as `modules_to_save`), and `lmjax.load_reward_model(DIR)`
gives the base with the adapter (LoRA merged) and the trained head.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

import lmjax
from lmjax import checkpoint as layout
from lmjax.convert.reward import SCORE_WEIGHT
from lmjax.heads import SCORE, RewardModel, reward_params_from_lm
from train import job as job_lib
from train import peft_train, preference_data, sft
from train.preference_config import REWARD_PRESETS, RewardConfig
from train.preference_losses import bradley_terry_loss

log = logging.getLogger("train.reward")


class PreferenceJob(sft.SFT):
  """What the reward and DPO jobs share: SFT's base loading and command line, pairs as data,
  the `peft` section (`train.peft_train`: the adapter trains, the base is `Frozen`)."""

  shift = False  # DPO: next-token targets
  train_also: tuple[str, ...] = ()  # base subtrees that train in full beside an adapter

  def base_model(self, config):
    """The model trained (without an adapter)."""
    return job_lib.Job.model(self, config)

  def _peft(self, config):
    key = (config.peft, config.model)
    cache = self.__dict__.setdefault("_peft_setups", {})
    if key not in cache:
      model = self.base_model(config)
      x = lmjax.counting.example_inputs(config.model)
      boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *x)["params"])
      cache[key] = peft_train.setup(config.peft, model, boxed, train_also=self.train_also)
    return cache[key]

  def model(self, config):
    ps = self._peft(config)
    return ps.model if ps else self.base_model(config)

  def partition(self, config):
    ps = self._peft(config)
    return (ps.init_params, ps.frozen) if ps else (None, None)

  def save_adapter(self, config, params) -> dict:
    """Writes `WORKDIR/adapter/` of a PEFT run; its report entry."""
    self._peft(config).save(self._workdir, config.model, params, base=config.base)
    return {"method": config.peft.method, "trainable_params": lmjax.peft.count(params)}

  def check(self, config, trainer, tokenizer):
    # Every row of both splits is read, checked and encoded now (a bad row fails before step 0).
    dc = config.data
    self._data, self._stats = {}, {}
    for split in ("train", "heldout"):
      rows = preference_data.load_rows(dc.source, split, num_pairs=dc.num_pairs,
                                       heldout_pairs=dc.heldout_pairs, seed=dc.seed,
                                       data_dir=dc.tfds_data_dir,
                                       heldout_fraction=dc.heldout_fraction,
                                       max_steps=dc.max_steps, max_value=dc.max_value)
      if jax.process_count() > 1:
        rows = rows[jax.process_index()::jax.process_count()]
      if not rows:
        raise preference_data.DataError(f"{dc.source} has no {split} rows")
      examples, stats = preference_data.encode_rows(rows, tokenizer, dc.seq_len,
                                                    shift=self.shift,
                                                    chat_template=dc.template())
      if not examples:
        raise preference_data.DataError(f"no {split} pair of {dc.source} has a response token "
                                        f"within data.seq_len={dc.seq_len}")
      self._data[split], self._stats[split] = examples, dataclasses.asdict(stats)

  def _batches(self, config, tokenizer, split):
    dc = config.data
    return preference_data.make_batches(
        self._data[split], seq_len=dc.seq_len, batch_size=dc.batch_size, split=split,
        seed=dc.seed, shuffle=dc.shuffle, pack=dc.pack, num_packing_bins=dc.num_packing_bins,
        fingerprint=[dataclasses.asdict(dc), repr(tokenizer), self.shift])

  def train_batches(self, config, tokenizer):
    return self._batches(config, tokenizer, "train")

  def eval_batches(self, config, tokenizer):
    return self._batches(config, tokenizer, "heldout")

  def before_training(self, config, trainer, state, tokenizer, start, feedback):
    self._workdir = feedback.workdir
    for split, s in self._stats.items():
      feedback.print(f"{split}: " + preference_data.PairStats(**s).describe())
    path = layout.run_path(feedback.workdir) / "before.json"
    if start:
      return layout.read_json(path, "before.json") if path.exists() else {}
    before = {"heldout": trainer.evaluate(state.params, self.eval_batches(config, tokenizer),
                                          config.train.eval_batches)}
    if jax.process_index() == 0:
      job_lib.write_json(path, before)
    feedback.print(f"held-out pairwise accuracy before training: "
                   f"{before['heldout']['accuracy']:.3f}")
    return before

  def report(self, config, trainer, params, tokenizer, before):
    out = {"data": self._stats}
    if self._peft(config):  # WORKDIR/adapter/: Hugging Face PEFT files pointing at the base
      out["peft"] = self.save_adapter(config, params)
    if before:
      out["before"] = before
    return out

  def print_report(self, result, out=print):
    v, b = result.get("validation"), result.get("before", {}).get("heldout")
    if v:
      line = (f"held-out pairwise accuracy {v['accuracy']:.3f}, mean margin {v['margin']:.3f}, "
              f"loss {v['loss']:.4f}")
      if b:
        line += f" (before: {b['accuracy']:.3f}, {b['margin']:.3f}, {b['loss']:.4f})"
      out(line)


class Reward(PreferenceJob):
  """Reward-model training: a `RewardModel` from a base, Bradley-Terry loss on pairs. With
  `peft` the adapter and the fresh `score` head train (Hugging Face PEFT's
  `modules_to_save=["score"]`); the trunk is frozen."""

  name = "reward"
  presets = REWARD_PRESETS
  train_also = (SCORE,)

  def base_model(self, config):
    return RewardModel(config.model)

  def loss(self, config):
    return bradley_terry_loss

  def _start(self, config, mesh):
    """The reward model's starting params: the base's trunk and a fresh score head."""
    lm, _ = sft.load_base(config.base, config.model, mesh)
    return reward_params_from_lm(lm, config.model, jax.random.key(config.train.seed))

  def frozen_params(self, config, trainer):  # PEFT: the trunk
    self._loaded = self._start(config, trainer.mesh)  # initial_state reuses it on a fresh run
    return self._peft(config).frozen_value(self._loaded)

  def initial_state(self, config, trainer):
    ps = self._peft(config)
    if ps:  # a fresh adapter beside the start's score head
      start, self._loaded = self._loaded, None
      key = jax.random.fold_in(jax.random.key(config.train.seed), 1)
      adapter = {k: v for k, v in nn.meta.unbox(ps.init_params(key)).items()
                 if k not in ps.train_also}
      return job_lib.state_from_params(trainer, ps.trainable_value(adapter, start))
    return job_lib.state_from_params(trainer, self._start(config, trainer.mesh), donate=True)

  def save_adapter(self, config, params) -> dict:
    self._peft(config).save(self._workdir, config.model, params, base=config.base,
                            to_hf=score_to_hf, task_type="SEQ_CLS")
    return {"method": config.peft.method, "trainable_params": lmjax.peft.count(params)}


def score_to_hf(heads: dict) -> dict:
  """A reward model's `score` `[D, 1]` as Hugging Face's `score.weight` `[1, D]`."""
  return {SCORE_WEIGHT: np.ascontiguousarray(np.asarray(heads[SCORE]).T)}


JOB = Reward()


def run(config: RewardConfig, workdir, *, hooks: Sequence[Callable] = (), train_batches=None):
  """Trains (or resumes) the reward model in `workdir`; returns the final figures."""
  return job_lib.run(JOB, config, workdir, hooks=hooks, train_batches=train_batches)


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[Callable] = (),
         caches: bool = False) -> int:
  return job_lib.main(JOB, __doc__, argv, hooks=hooks, caches=caches)


if __name__ == "__main__":
  sys.exit(main(caches=True))
