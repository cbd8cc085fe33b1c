"""Rewards of RL rollouts: Python functions named `python:module:function` (TRL's convention),
called on a batch of completions and checked.

    fn(prompts: list[str], completions: list[str], **row_fields) -> list[float]

`prompts` and `completions` have one entry per rollout row (prompt i repeated for each of its
G samples); every other field of the data rows comes as a keyword argument, a list aligned with
them (e.g. `answer=[...]`). Several functions may be given, comma-separated, optionally
weighted: `python:m:f,python:m:g*0.1`; the reward is their weighted sum, and each is also
reported on its own.

A folder is a reward model (`lmjax.heads.RewardModel`): a run dir of `python -m train.reward`
or a Hugging Face `*ForSequenceClassification` folder (`lmjax.load_reward_model`). Its reward of
a row is the model's score of the rendered prompt followed by the completion, closed by the
reward model's EOS (the end-of-turn token where `train.reward` read a reply's reward), encoded
with the reward model's own tokenizer; all rows of a rollout are scored in one batched forward
(`infer.RewardScorer`). It may be mixed with functions: `RUN_DIR,python:m:f*0.1`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class RewardFn:
  """One named reward function and its weight."""

  name: str
  fn: Callable
  weight: float = 1.0


class RewardModelReward:
  """A reward model as a reward function (module docstring): `fn(prompts, completions)`.

  Args:
    path: a `train.reward` run dir or a Hugging Face sequence-classification folder.
    mesh: shard its params over this mesh (default: one device).
  """

  def __init__(self, path: str, mesh=None):
    from infer.reward_scorer import reward_scorer

    try:
      self.scorer = reward_scorer(str(Path(path).expanduser()), mesh=mesh)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"reward {path!r}: not a reward model ({e})") from e
    self.tokenizer = self.scorer.tokenizer
    if self.tokenizer is None or self.tokenizer.eos_id is None:
      raise ValueError(f"reward {path!r}: the reward model has no tokenizer with an EOS; it "
                       "scores text, so it needs its own tokenizer files")

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    from infer.decode import Candidate

    tok = self.tokenizer
    cands = [Candidate([*tok.encode(c, add_bos=False, add_eos=False), tok.eos_id], [], "eos", c)
             for c in completions]
    return self.scorer.score_many(list(prompts), cands)


def _load_one(spec: str, mesh=None) -> RewardFn:
  weight = 1.0
  base = spec
  if "*" in spec:
    base, _, w = spec.rpartition("*")
    try:
      weight = float(w)
    except ValueError:
      raise ValueError(f"reward {spec!r}: the weight after '*' must be a number") from None
  kind, _, rest = base.partition(":")
  if kind == "python":
    module, _, name = rest.rpartition(":")
    if not module or not name:
      raise ValueError(f"reward {spec!r}: write python:module:function (e.g. "
                       "python:train.rl_arithmetic:reward)")
    try:
      mod = importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f"reward {spec!r}: cannot import module {module!r}: {e}") from e
    fn = getattr(mod, name, None)
    if not callable(fn):
      raise ValueError(f"reward {spec!r}: module {module!r} has no function {name!r}")
    return RewardFn(f"{module}:{name}", fn, weight)
  if Path(base).expanduser().is_dir():
    return RewardFn(f"reward_model:{Path(base).name}", RewardModelReward(base, mesh), weight)
  raise ValueError(f"reward {spec!r}: use python:module:function (TRL's convention "
                   "fn(prompts, completions, **row_fields) -> list[float]) or a reward-model "
                   "run dir")


def load(spec: str, mesh=None) -> list[RewardFn]:
  """The reward functions of a `--reward` spec (module docstring); reward models are read now,
  their params sharded over `mesh`."""
  parts = [s.strip() for s in spec.split(",") if s.strip()]
  if not parts:
    raise ValueError("reward spec is empty: give python:module:function or a reward-model "
                     "run dir")
  return [_load_one(p, mesh) for p in parts]


def score(fns: Sequence[RewardFn], prompts: Sequence[str], completions: Sequence[str],
          fields: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """`(total [R], {name: [R]})`: each function's rewards, checked, and their weighted sum.

  Raises:
    ValueError: a function returned another number of values than completions, a value that
      is not a number, or NaN / inf (naming the function and the row).
  """
  total = np.zeros(len(completions), np.float64)
  parts = {}
  for f in fns:
    out = f.fn(list(prompts), list(completions), **fields)
    try:
      vals = np.asarray(list(out), np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"reward {f.name} must return a list of floats, got {out!r:.80}") from e
    if vals.shape != (len(completions),):
      raise ValueError(f"reward {f.name} returned {vals.size} values for {len(completions)} "
                       "completions (one float per completion)")
    bad = np.flatnonzero(~np.isfinite(vals))
    if bad.size:
      raise ValueError(f"reward {f.name} returned {vals[bad[0]]} for completion {bad[0]} "
                       f"({completions[bad[0]]!r:.80}); rewards must be finite")
    parts[f.name] = vals
    total += f.weight * vals
  return total, parts


def check_on(fns: Sequence[RewardFn], prompts: Sequence[str], fields: dict[str, list]) -> None:
  """Calls every function once on placeholder completions (before any rollout), so a function
  that fails, returns the wrong count or NaN is reported before work starts."""
  score(fns, prompts, ["" for _ in prompts], fields)
