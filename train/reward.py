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
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

import jax

from lmjax import checkpoint as layout
from lmjax.heads import RewardModel, reward_params_from_lm
from train import job as job_lib
from train import preference_data, sft
from train.preference_config import REWARD_PRESETS, RewardConfig
from train.preference_losses import bradley_terry_loss

log = logging.getLogger("train.reward")


class PreferenceJob(sft.SFT):
  """What the reward and DPO jobs share: SFT's base loading and command line, pairs as data."""

  shift = False  # DPO: next-token targets

  def model(self, config):
    return job_lib.Job.model(self, config)

  def partition(self, config):
    # The whole model trains. The `peft` section (train.peft_train) plugs in here: the
    # adapter as init_params, the base as Frozen.
    return None, None

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
  """Reward-model training: a `RewardModel` from a base, Bradley-Terry loss on pairs."""

  name = "reward"
  presets = REWARD_PRESETS

  def model(self, config):
    return RewardModel(config.model)

  def loss(self, config):
    return bradley_terry_loss

  def initial_state(self, config, trainer):
    lm, _ = sft.load_base(config.base, config.model, trainer.mesh)
    key = jax.random.key(config.train.seed)
    return job_lib.state_from_params(trainer, reward_params_from_lm(lm, config.model, key),
                                     donate=True)


JOB = Reward()


def run(config: RewardConfig, workdir, *, hooks: Sequence[Callable] = (), train_batches=None):
  """Trains (or resumes) the reward model in `workdir`; returns the final figures."""
  return job_lib.run(JOB, config, workdir, hooks=hooks, train_batches=train_batches)


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[Callable] = (),
         caches: bool = False) -> int:
  return job_lib.main(JOB, __doc__, argv, hooks=hooks, caches=caches)


if __name__ == "__main__":
  sys.exit(main(caches=True))
