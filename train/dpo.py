"""Direct preference optimization (DPO, Rafailov et al., 2023) from the command line.

    python -m train.dpo [--model MODEL] [--data SOURCE] [--workdir DIR] [--set key=value ...]

The policy starts from MODEL (what `train.sft` takes) and learns from pairs
`{"prompt", "chosen", "rejected"}` (`train.preference_data`; `arithmetic` and `chat` are
embedded) with `dpo.loss_type` `sigmoid` (DPO) or `ipo` (Azar et al., 2023) and `dpo.beta`
(`train.preference_losses`). The reference model is the starting params, frozen
(`train.trainer.Frozen`): passed to each step, never checkpointed, read again from MODEL on
resume. With `dpo.precompute_reference=true` its log-probs of every pair are computed once
before training instead (one forward pass over the data, again on resume) and the reference
is not held while training. The run logs and reports the implicit rewards
`beta * log(pi / ref)` of the chosen and rejected responses, their margin and the pairwise
accuracy, held out, before and after.

DIR (default `./runs/dpo-PRESET`) is a run dir like SFT's: `python -m infer --workdir DIR`,
`lmjax.checkpoint.load_run(DIR)` and `lmjax.save_pretrained` use the trained policy as it is.

`--set peft.method=lora peft.rank=8 peft.targets=query,value` (`train.peft_config`; QLoRA with
`peft.base_quant=nf4`, bottleneck adapters with `peft.method=adapter`) trains an adapter on the
frozen base; the reference is then the base without the adapter, from the same arrays (no
second copy of the model), and the run writes the adapter to `DIR/adapter/` as Hugging Face
PEFT files (`load_run(DIR)` gives the base with it merged).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np

import lmjax
from lmjax.heads import check_lm_params
from train import job as job_lib
from train import preference_data, sft
from train.preference_config import DPO_PRESETS, DPOConfig
from train.preference_losses import dpo_loss, token_log_probs
from train.reward import PreferenceJob
from train.trainer import Frozen


def _policy_and_reference(trainable, frozen):
  return {"policy": trainable, "reference": frozen}


class DPO(PreferenceJob):
  """DPO/IPO: a policy from a base, the base frozen as the reference."""

  name = "dpo"
  presets = DPO_PRESETS
  shift = True

  def loss(self, config):
    d = config.dpo
    return dpo_loss(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                    precomputed=d.precompute_reference)

  def check(self, config, trainer, tokenizer):
    super().check(config, trainer, tokenizer)
    if config.dpo.precompute_reference:
      self._loaded = self._base(config, trainer)  # initial_state reuses it on a fresh run
      model, ref = trainer.model, self._loaded
      ps = self._peft(config)
      if ps:  # the reference is the base as the policy holds it (NF4 for QLoRA), no adapter
        self._frozen = ps.frozen_value(self._loaded)
        ref = ps.reference(ps.combine({}, self._frozen))
      for examples in self._data.values():
        add_reference_log_probs(model, ref, examples, config.data.seq_len,
                                config.data.batch_size)

  def partition(self, config):
    ps = self._peft(config)
    if ps:  # the adapter trains; the base is held once, the policy with it, the reference not
      return ps.init_params, (ps.frozen if config.dpo.precompute_reference
                              else ps.frozen_with(_policy_and_reference))
    if config.dpo.precompute_reference:
      return None, None  # the reference's log-probs come with the batches
    # The trainable params are the policy's own (model.init); the reference is frozen.
    model = lmjax.model_for(config.model)
    inputs = lmjax.counting.example_inputs(config.model)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs)["params"])
    return None, Frozen(boxed, _policy_and_reference)

  def _base(self, config, trainer):
    base = getattr(self, "_loaded", None)
    if base is None:
      base, _ = sft.load_base(config.base, config.model, trainer.mesh)
      check_lm_params(base, "the DPO policy")
    return base

  def frozen_params(self, config, trainer):
    self._loaded = self._base(config, trainer)  # initial_state reuses it on a fresh run
    ps = self._peft(config)
    if ps:
      frozen, self._frozen = getattr(self, "_frozen", None), None
      return ps.frozen_value(self._loaded) if frozen is None else frozen
    return self._loaded

  def initial_state(self, config, trainer):
    base, self._loaded = self._base(config, trainer), None
    if self._peft(config):
      return trainer.init_state()  # a fresh adapter (LoRA: B = 0, the policy is the base)
    return job_lib.state_from_params(trainer, base)  # the frozen copy stays as it is

  def print_report(self, result, out=print):
    v, b = result.get("validation"), result.get("before", {}).get("heldout")
    if v:
      line = (f"held-out pairwise accuracy {v['accuracy']:.3f}, reward margin "
              f"{v['margin']:.3f} (chosen {v['chosen']:.3f}, rejected {v['rejected']:.3f}), "
              f"loss {v['loss']:.4f}")
      if b:
        line += f" (before: accuracy {b['accuracy']:.3f}, loss {b['loss']:.4f})"
      out(line)


def add_reference_log_probs(model, params, examples: list[dict], seq_len: int,
                            batch: int) -> None:
  """Adds `ref_logp` (the model's log-prob of each target token) to each encoded pair, one
  pair per row, `batch` rows per compiled forward (the last batch padded with empty rows)."""
  fwd = jax.jit(lambda p, b: token_log_probs(model, p, b, jax.random.key(0), False))
  for i in range(0, len(examples), batch):
    chunk = examples[i:i + batch]
    rows = preference_data.pad_pairs(chunk + chunk[:1] * (batch - len(chunk)), seq_len)
    logp = np.asarray(fwd(params, rows))
    for j, ex in enumerate(chunk):
      ex["ref_logp"] = logp[j, :len(ex["inputs"])].astype(np.float32)


JOB = DPO()


def run(config: DPOConfig, workdir, *, hooks: Sequence[Callable] = (), train_batches=None):
  """Trains (or resumes) the DPO run in `workdir`; returns the final figures."""
  return job_lib.run(JOB, config, workdir, hooks=hooks, train_batches=train_batches)


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[Callable] = (),
         caches: bool = False) -> int:
  return job_lib.main(JOB, __doc__, argv, hooks=hooks, caches=caches)


if __name__ == "__main__":
  sys.exit(main(caches=True))
