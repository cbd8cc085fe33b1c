"""RL prompts and learner batches: rows to encoded prompts, each step's prompts, and a scored
rollout to the arrays the RL loss reads (advantages by algorithm).

Rows are prompt-only: `{"prompt": "text"}` or `{"prompt": [{"role", "content"}, ...]}`; every
other field is handed to the reward functions. Text prompts become one user message rendered
with the policy's chat template (`data.chat_template=false`: the text as it is).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from infer import prompts as prompts_lib
from train import chat_data, rl_algos, rl_arithmetic
from train.rl_config import RLConfig


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Encoded prompts of one split: `ids[i]` token ids, `texts[i]` the rendered text, `fields`
  the rows' other fields (name -> list aligned with the prompts)."""

  ids: list[list[int]]
  texts: list[str]
  fields: dict[str, list]

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, idx, repeat: int = 1) -> tuple[list[list[int]], list[str], dict[str, list]]:
    """The prompts `idx` (ids once each; texts and fields repeated `repeat` times each)."""
    idx = [int(i) for i in idx]
    texts = [self.texts[i] for i in idx for _ in range(repeat)]
    fields = {k: [v[i] for i in idx for _ in range(repeat)] for k, v in self.fields.items()}
    return [self.ids[i] for i in idx], texts, fields


def load_rows(config: RLConfig, split: str) -> list[dict]:
  """Rows of "train" or "heldout"."""
  d = config.data
  if d.source == "arithmetic":
    n = d.heldout_prompts if split == "heldout" else 2000
    return rl_arithmetic.rows(n, "test" if split == "heldout" else "train", seed=d.seed,
                              max_steps=d.arithmetic_max_steps, max_value=d.arithmetic_max_value,
                              few_shot=d.arithmetic_few_shot)
  rows = chat_data.load_rows(d.source, split, data_dir=d.tfds_data_dir,
                             heldout_fraction=d.heldout_fraction, seed=d.seed)
  out = [dict(r.data) for r in rows]
  if split == "heldout":
    out = out[:d.heldout_prompts]
  return out


def encode(config: RLConfig, rows: list[dict], tokenizer, split: str) -> PromptSet:
  """Renders and encodes prompt rows; a row without a prompt, or a prompt longer than
  `rl.max_prompt_len` tokens, is a ValueError naming the row."""
  if not rows and split == "train":
    raise chat_data.DataError(f"{config.data.source} has no train rows")
  ids, texts, fields = [], [], {}
  for i, row in enumerate(rows):
    if "prompt" not in row:
      raise chat_data.DataError(f"{split} row {i} of {config.data.source} has no 'prompt' field "
                                f"(RL rows are prompt-only: {{\"prompt\": ...}}); it has "
                                f"{sorted(row)}")
    p = row["prompt"]
    if isinstance(p, str) and p and not config.data.chat_template:
      text = p
    elif isinstance(p, (list, str)) and p:
      text = prompts_lib.render_chat(with_system(p, config.data.system_prompt), tokenizer)
    else:
      raise chat_data.DataError(f"{split} row {i}: 'prompt' must be a non-empty string or a "
                                f"list of messages, got {p!r:.80}")
    x = [int(t) for t in tokenizer.encode(text)]
    bos = getattr(tokenizer, "bos_id", None)
    if not hasattr(tokenizer, "add_bos_token") and bos is not None and x[:1] != [bos]:
      x = [bos] + x
    if len(x) > config.rl.max_prompt_len:
      raise ValueError(f"{split} prompt {i} has {len(x)} tokens, more than rl.max_prompt_len="
                       f"{config.rl.max_prompt_len} (raise it, keeping max_prompt_len + "
                       f"max_new_tokens <= the model's max_len, or shorten the prompt)")
    ids.append(x)
    texts.append(text)
    for k, v in row.items():
      if k != "prompt":
        fields.setdefault(k, [None] * len(rows))[i] = v
  return PromptSet(ids, texts, fields)


def with_system(prompt: str | list[dict], system: str | None) -> list[dict]:
  """A prompt as chat messages: a text as one user message; `system` (if given) in front
  unless the messages already start with a system message."""
  msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  if system is not None and not (msgs and isinstance(msgs[0], dict)
                                 and msgs[0].get("role") == "system"):
    msgs = [{"role": "system", "content": system}, *msgs]
  return msgs


def step_prompts(n_rows: int, per_step: int, step: int, seed: int) -> np.ndarray:
  """Indices of step `step`'s prompts: epochs of a seeded shuffle, the same on resume."""
  out = []
  pos = step * per_step
  while len(out) < per_step:
    epoch, k = divmod(pos, n_rows)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    take = min(per_step - len(out), n_rows - k)
    out.extend(perm[k:k + take])
    pos += take
  return np.asarray(out, np.int64)


def advantages(config: RLConfig, rewards: np.ndarray, mask: np.ndarray, scored: dict):
  """The loss batch's `advantages` `[R, T]` (and PPO's `returns`), per algorithm.

  GRPO / RLOO: the sequence advantage on each completion token. PPO: per-token rewards
  `-beta * k1` plus the sequence reward on the last completion token, then GAE over the old
  values (advantages whitened when `rl.whiten_advantages`).
  """
  rl = config.rl
  m = mask.astype(np.float32)
  if rl.algorithm == "grpo":
    seq = np.asarray(rl_algos.group_advantages(rewards, rl.num_generations, rl.scale_rewards))
    return {"advantages": seq[:, None] * m}
  if rl.algorithm == "rloo":
    seq = np.asarray(rl_algos.rloo_advantages(rewards, rl.num_generations))
    return {"advantages": seq[:, None] * m}
  kl = np.asarray(rl_algos.kl_estimate(scored["old_log_probs"], scored["ref_log_probs"], "k1"))
  tok_r = -rl.beta * kl * m
  last = np.where(m.any(axis=1), m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1), 0)
  tok_r[np.arange(len(rewards)), last] += rewards * m.any(axis=1)
  adv, ret = rl_algos.gae(tok_r, scored["old_values"], m, rl.gamma, rl.lam)
  if rl.whiten_advantages:
    adv = rl_algos.whiten(adv, m) * m
  return {"advantages": np.asarray(adv), "returns": np.asarray(ret)}
