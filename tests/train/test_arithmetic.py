"""The arithmetic generator: answers recomputed from the story's text, disjoint splits."""

import re

import pytest

from train import arithmetic

WORDS = {"buys": "+", "finds": "+", "gives away": "-", "loses": "-", "more": "+"}


def _recompute(question: str) -> int:
  """The answer read back from the story's words alone (an independent parser)."""
  value = int(re.search(r"has (\d+)", question).group(1))
  for sentence in question.split(". ")[1:]:
    m = re.search(r"multiplied by (\d+)", sentence)
    if m:
      value *= int(m.group(1))
      continue
    m = re.search(r"(gives away|loses) (\d+)", sentence)
    if m:
      value -= int(m.group(2))
      continue
    m = re.search(r"(\d+) more", sentence)
    if m:
      value += int(m.group(1))
  return value


def test_answers_match_the_story_and_the_worked_solution():
  for p in arithmetic.problems(200, seed=3, max_steps=3):
    assert _recompute(p["question"]) == p["answer"]
    for eq in re.findall(r"(-?\d+) ([+*-]) (\d+) = (-?\d+)", p["solution"]):
      a, op, b, r = int(eq[0]), eq[1], int(eq[2]), int(eq[3])
      assert {"+": a + b, "-": a - b, "*": a * b}[op] == r
    assert arithmetic.is_correct(p["solution"], p["answer"])
    assert not arithmetic.is_correct(p["wrong_solution"], p["answer"])
    assert p["prompt"].endswith(p["question"])


def test_splits_are_disjoint_and_seeded():
  train = arithmetic.problems(1500, seed=0, split="train")
  test = arithmetic.problems(200, seed=0, split="test")
  assert not {p["question"] for p in train} & {p["question"] for p in test}
  assert arithmetic.problems(20, seed=0, split="test") == test[:20]
  assert arithmetic.problems(20, seed=1, split="test") != test[:20]


def test_extract_answer():
  assert arithmetic.extract_answer("7 + 5 = 12. The answer is 12.") == 12
  assert arithmetic.extract_answer("so the answer is $1,204 apples") == 1204
  assert arithmetic.extract_answer("I think 3, no, 4") == 4
  assert arithmetic.extract_answer("no idea") is None
  assert arithmetic.has_format("The answer is -3.") and not arithmetic.has_format("42")


def test_bad_arguments():
  with pytest.raises(ValueError, match="splits are"):
    arithmetic.problems(3, split="validation")
  with pytest.raises(ValueError, match="max_steps"):
    arithmetic.problems(3, max_steps=0)
