"""The RL demo task: arithmetic word problems (`train.arithmetic`) with verifiable rewards.

The default reward of `train.rl` is `correct` (1 for the right final answer, read by
`train.arithmetic.extract_answer`) plus 0.1 x `formatted` (1 for stating it in the format "The
answer is N"), given as two functions so each is reported (the held-out accuracy is `correct`'s
mean); `reward` is the same sum as one function.
All follow TRL's reward convention `fn(prompts, completions, answer=[...]) -> list[float]`.
"""

from __future__ import annotations

from collections.abc import Sequence

from train import arithmetic

FORMAT_WEIGHT = 0.1


def correct(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[int],
            **_) -> list[float]:
  """1.0 where the completion's answer equals `answer`, else 0.0."""
  del prompts
  return [float(arithmetic.is_correct(c, int(a))) for c, a in zip(completions, answer)]


def formatted(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
  """1.0 where the completion states "The answer is N", else 0.0."""
  del prompts
  return [float(arithmetic.has_format(c)) for c in completions]


def reward(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[int],
           **_) -> list[float]:
  """Correctness (1) plus format (0.1)."""
  ok = correct(prompts, completions, answer=answer)
  fm = formatted(prompts, completions)
  return [c + FORMAT_WEIGHT * f for c, f in zip(ok, fm)]


def rows(n: int, split: str, *, seed: int = 0, max_steps: int = 1, max_value: int = 20,
         few_shot: int = 0) -> list[dict]:
  """`n` prompt rows of one split: `{"prompt", "answer"}` (what the reward reads).

  `few_shot` > 0: each prompt is a chat, the same `few_shot` worked train problems (user: the
  problem, assistant: its solution; drawn with another seed) before the row's own problem.
  """
  kw = {"max_steps": max_steps, "max_value": max_value}
  shots = []
  for s in arithmetic.problems(few_shot, seed + 7919, "train", **kw):
    shots += [{"role": "user", "content": s["prompt"]},
              {"role": "assistant", "content": s["solution"]}]
  return [{"prompt": [*shots, {"role": "user", "content": p["prompt"]}] if shots else p["prompt"],
           "answer": p["answer"]}
          for p in arithmetic.problems(n, seed, split, **kw)]
