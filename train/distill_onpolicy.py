"""On-policy distillation (GKD, Agarwal et al., 2024): the student learns on its own samples.

On a fraction `kd.lmbda` of the steps (chosen by a hash of the run seed and the step, so a
resumed run makes the same choices), the batch is the student's own completions of the data's
prompts, sampled from its current params with the compiled decoder (`train.rollout.sample`);
the teacher then scores every completion token in the KD loss (alpha = 1: the divergence only,
with `kd.beta`, GKD's reverse KL at 1). The other steps take the data's own batches. The loss
mask is the completion alone: not the prompt, and nothing after the EOS that ended it.

The batches follow the params: `OnPolicyBatches.update(step, params)` hands them the student's
newest params; `train.distill` calls it before step 0 and, through its `Trainer.fit` hook
(`Job.hooks`), after every step, so a rollout always samples the student the last step
produced. The steps that were on-policy are recorded (`served`) for the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infer import prompts as prompts_lib
from train import chat_data, rollout


def prompt_ids(rows: list[chat_data.Row], tokenizer, chat_template: str | None = None
               ) -> list[list[int]]:
  """Each row's prompt (the chat up to its first trained assistant turn, rendered with the
  generation prompt; a pair's prompt text) as token ids, BOS first when the tokenizer wants
  one (`train.chat_data`'s rule). `{"text"}` rows have no prompt and are skipped."""
  texts = []
  for row in rows:
    kind, value = chat_data.to_example(row)
    if kind == "chat":
      msgs, start = value
      first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= start)
      texts.append(prompts_lib.render_chat(msgs[:first], tokenizer, chat_template=chat_template))
    elif kind == "pair":
      texts.append(value[0])
  out = []
  bos = tokenizer.bos_id if chat_data._wants_bos(tokenizer) else None
  for ids in tokenizer.encode(texts, add_bos=False, add_eos=False) if texts else []:
    ids = [int(i) for i in ids]
    out.append(ids if bos is None or (ids and ids[0] == bos) else [bos, *ids])
  return out


def batch_of(ro: rollout.Rollout) -> dict[str, np.ndarray]:
  """A rollout `[R, T + 1]` as next-token rows `[R, T]` with the completion as the loss mask."""
  tokens, real = ro.tokens, ro.prompt_mask | ro.completion_mask
  t = tokens.shape[1] - 1
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": ro.completion_mask[:, 1:].astype(np.float32),
          "segment_ids": real[:, :-1].astype(np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (len(tokens), 1))}


class OnPolicyBatches:
  """Endless train batches: the student's samples on a `lmbda` fraction of the steps, the
  data's batches (`offline`) on the others."""

  def __init__(self, model, tokenizer, prompts: list[list[int]], offline, *, lmbda: float,
               batch_size: int, seq_len: int, max_new_tokens: int, seed: int):
    budget = seq_len + 1 - max_new_tokens
    self.prompts = [p for p in prompts if len(p) <= budget]
    if not self.prompts:
      raise ValueError(f"no prompt fits data.seq_len={seq_len} with generate.max_new_tokens="
                       f"{max_new_tokens} (prompts may have at most {budget} tokens)")
    self.model, self.tokenizer, self.offline = model, tokenizer, offline
    self.lmbda, self.batch_size, self.seq_len = lmbda, batch_size, seq_len
    self.max_new_tokens, self.seed = max_new_tokens, seed
    self.params: Any = None
    self.step = 0
    self.served: list[int] = []  # The steps whose batch was the student's own samples.

  def update(self, step: int, params) -> None:
    """The student's `params` after `step` steps (as `infer` takes them; the trainer's hook
    convention): the next batch, step `step`'s, samples from them."""
    self.params, self.step = params, step

  def on_policy(self, step: int) -> bool:
    return np.random.default_rng([self.seed, step]).random() < self.lmbda

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step = self.step
    if not self.on_policy(step):
      return next(self.offline)
    if self.params is None:
      raise RuntimeError("OnPolicyBatches has no params: call update(step, params) first")
    self.served.append(step)
    rng = np.random.default_rng([self.seed, step, 1])
    pick = rng.choice(len(self.prompts), self.batch_size, replace=True)
    return self.samples(self.params, [self.prompts[i] for i in pick],
                        rollout.step_seed(self.seed, step))

  def samples(self, params, prompts: list[list[int]], seed: int) -> dict[str, np.ndarray]:
    """A batch (`batch_of`) of the student's (`params`) completions of `prompts`."""
    ro = rollout.sample(self.model, params, prompts, tokenizer=self.tokenizer,
                        max_new_tokens=self.max_new_tokens, length=self.seq_len + 1, seed=seed)
    return batch_of(ro)

  def get_state(self):
    return self.offline.get_state()

  def set_state(self, state) -> None:
    self.offline.set_state(state)

  def close(self) -> None:
    self.offline.close()
