"""Arithmetic word problems generated with a seed, answers checked by code: the verifiable task
of the RL demo, the arithmetic preference pairs and the evaluation task.

A problem is a short story of one to three steps over small whole numbers ("Mia has 7 apples.
She buys 5 more. How many apples does Mia have now?"), in the style of GSM8K (Cobbe et al.,
2021) but small enough for a 135M-parameter model. Each comes with a worked solution, one
equation per step, ending in "The answer is N." (the format `extract_answer` reads), and a
wrong solution whose first wrong step propagates, for preference pairs.

Splits are disjoint by construction: a problem's split is a hash of its text, so `train` and
`test` never share a problem however many are drawn.
"""

from __future__ import annotations

import hashlib
import random
import re

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Lily", "Noah")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")
SPLITS = ("train", "test")
ANSWER_RE = re.compile(r"answer is\s*\$?(-?\d[\d,]*)", re.IGNORECASE)
LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*")
INSTRUCTION = "Solve the problem. End with \"The answer is N.\""


def _split_of(text: str) -> str:
  """`test` for about one problem in eight, chosen by a hash of its text."""
  return "test" if hashlib.sha256(text.encode()).digest()[0] < 32 else "train"


def _problem(rng: random.Random, max_steps: int, max_value: int) -> dict:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  pronoun = "She" if name in ("Mia", "Ava", "Zoe", "Ivy", "Eva", "Lily") else "He"
  value = rng.randint(2, max_value)
  story = [f"{name} has {value} {item}."]
  steps = []
  for _ in range(rng.randint(1, max_steps)):
    op = rng.choice("+-*") if value <= max_value else rng.choice("+-")
    if op == "-" and value < 2:
      op = "+"
    if op == "+":
      n = rng.randint(1, max_value)
      story.append(rng.choice([f"{pronoun} buys {n} more.", f"{pronoun} finds {n} more.",
                               f"A friend gives {name} {n} more."]))
      new = value + n
    elif op == "-":
      n = rng.randint(1, value - 1)
      story.append(rng.choice([f"{pronoun} gives away {n}.", f"{pronoun} loses {n}."]))
      new = value - n
    else:
      n = rng.randint(2, 3)
      story.append(f"Then the number of {item} is multiplied by {n}.")
      new = value * n
    steps.append((value, op, n, new))
    value = new
  story.append(f"How many {item} does {name} have now?")
  return {"question": " ".join(story), "steps": steps, "answer": value}


def _solution(steps, answer: int) -> str:
  lines = [f"{a} {op} {n} = {r}." for a, op, n, r in steps]
  return " ".join(lines) + f" The answer is {answer}."


def _wrong_steps(rng: random.Random, steps):
  """The same steps with one result off by a small amount, the error carried forward."""
  k = rng.randrange(len(steps))
  out, value = [], None
  for i, (a, op, n, r) in enumerate(steps):
    if value is not None:
      a = value
      r = {"+": a + n, "-": a - n, "*": a * n}[op]
    if i == k:
      r = r + rng.choice([-2, -1, 1, 2])
    out.append((a, op, n, r))
    value = r
  return out, value


def problems(n: int, seed: int = 0, split: str = "train", *, max_steps: int = 2,
             max_value: int = 20) -> list[dict]:
  """`n` problems of one split, the same for the same arguments.

  Args:
    n: how many.
    seed: the generator's seed.
    split: `train` or `test` (disjoint: chosen by a hash of each problem's text).
    max_steps: at most this many operations per problem (1-3 keeps a 135M model in reach).
    max_value: starting values and addends are at most this.

  Returns:
    Dicts with `prompt` (instruction + question), `question`, `answer` (int), `solution`
    (worked, ending "The answer is N.") and `wrong_solution` (one step wrong, carried forward,
    a different final answer).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown arithmetic split {split!r}; splits are {list(SPLITS)}")
  if n < 0 or max_steps < 1 or max_value < 2:
    raise ValueError(f"need n >= 0, max_steps >= 1 and max_value >= 2, got n={n}, "
                     f"max_steps={max_steps}, max_value={max_value}")
  rng = random.Random(f"arithmetic-{seed}-{max_steps}-{max_value}")
  out, seen = [], set()
  tries = 0
  while len(out) < n:
    tries += 1
    if tries > 200 * n + 1000:
      raise ValueError(f"could not draw {n} distinct {split} problems with max_steps="
                       f"{max_steps}, max_value={max_value}; ask for fewer")
    p = _problem(rng, max_steps, max_value)
    if p["question"] in seen or _split_of(p["question"]) != split:
      continue
    seen.add(p["question"])
    wrong, wrong_answer = _wrong_steps(rng, p["steps"])
    out.append({
        "prompt": f"{INSTRUCTION}\n{p['question']}",
        "question": p["question"],
        "answer": p["answer"],
        "solution": _solution(p["steps"], p["answer"]),
        "wrong_solution": _solution(wrong, wrong_answer),
    })
  return out


def extract_answer(text: str) -> int | None:
  """The number after "The answer is" (the first such), else the last number in the text,
  else None."""
  m = ANSWER_RE.search(text)
  found = m.group(1) if m else None
  if found is None:
    numbers = LAST_NUMBER_RE.findall(text)
    found = numbers[-1] if numbers else None
  if found is None:
    return None
  try:
    return int(found.replace(",", ""))
  except ValueError:
    return None


def is_correct(text: str, answer: int) -> bool:
  """Whether a completion's answer (`extract_answer`) equals `answer`."""
  return extract_answer(text) == answer


def has_format(text: str) -> bool:
  """Whether a completion states its answer as "The answer is N" (the format reward)."""
  return ANSWER_RE.search(text) is not None
