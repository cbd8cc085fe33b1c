"""Evaluation tasks: the built-in offline ones and the JSONL format of our own.

A task is a list of items of one kind:

* `choice` (multiple choice): a context and its choices, scored by log-likelihood
  (`eval_metrics`: `acc`, `acc_norm`);
* `generate`: a prompt and a reference answer; the model's greedy output, cut at the task's
  stop strings, is compared by a metric (`exact_match`, `contains`, `numeric`);
* `perplexity`: texts scored token by token in rolling windows.

Built-in tasks (all offline: shipped or generated from a seed):

==================  ============================================================================
name                what
==================  ============================================================================
``chat``            held-out replies of the embedded chat set (`train.chat_corpus`): each held-out
                    conversation's last assistant reply against 3 replies of other held-out
                    conversations (choice; the chat rendered by the model's chat template); also
                    the perplexity of the true reply
``arithmetic``      word problems of `train.arithmetic` (test split), answered with chain of
                    thought (`infer.prompts.chain_of_thought`, 3 worked train-split examples);
                    `numeric` on "The answer is N."
``shakespeare``     perplexity of the held-out works of the embedded Shakespeare corpus
                    (`train.shakespeare_tfds`), passage by passage
``jsonl:PATH``      your rows, one JSON object per line: ``{"prompt", "choices", "answer"}``
                    (choice; `answer` the index of the right choice or its text) or
                    ``{"prompt", "answer"}`` (generate; default metric `exact_match`)
==================  ============================================================================

JSONL few-shot (`num_fewshot=k`): k other rows, drawn with the seed, go before each prompt, each
written "prompt answer", separated by blank lines (lm-evaluation-harness's convention). With the
chat template on, the whole prompt is one user message and the answer follows the assistant's
generation prompt.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from infer import prompts
from train import jsonl

KINDS = ("choice", "generate", "perplexity")
BUILTIN = ("chat", "arithmetic", "shakespeare")
TEMPLATE_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Item:
  """One example. `choice`: `prompt`, `choices`, `answer` (an index); `generate`: `prompt`,
  `answer`; `perplexity`: `prompt` (the text)."""

  prompt: str
  choices: tuple[str, ...] = ()
  answer: Any = None


@dataclasses.dataclass(frozen=True)
class Task:
  """A named list of items of one kind, and how to score them."""

  name: str
  kind: str
  items: tuple[Item, ...]
  metric: str = ""  # generate: a metric of `eval_metrics.GENERATION_METRICS`
  stop: tuple[str, ...] = ()
  max_new_tokens: int = 64
  extra_metrics: tuple[str, ...] = ()  # choice: "reply_perplexity"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
    if not self.items:
      raise ValueError(f"task {self.name!r} has no items")


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  """What a user may change about a task (`python -m train.evaluate --set KEY=VALUE`).

  Attributes:
    limit: at most this many items (0: the task's default: all, or 50 arithmetic problems,
      8 Shakespeare passages).
    num_fewshot: demonstrations before each prompt (-1: the task's default: 3 for arithmetic,
      0 otherwise).
    chat_template: "on", "off" or "auto" (the task's default: on for `chat`, off otherwise).
    seed: draws the few-shot examples, the chat distractors and the arithmetic problems.
    max_new_tokens: generation budget (0: the task's, 64 / 128 for arithmetic).
    metric: a generation metric overriding the task's ("" keeps it).
    stop: stop strings overriding the task's (empty keeps them).
  """

  limit: int = 0
  num_fewshot: int = -1
  chat_template: str = "auto"
  seed: int = 0
  max_new_tokens: int = 0
  metric: str = ""
  stop: tuple[str, ...] = ()

  def __post_init__(self):
    if self.chat_template not in TEMPLATE_MODES:
      raise ValueError(f"chat_template={self.chat_template!r} must be one of {TEMPLATE_MODES}")
    if self.limit < 0 or self.num_fewshot < -1 or self.max_new_tokens < 0:
      raise ValueError(f"limit and max_new_tokens must be >= 0 and num_fewshot >= -1, got "
                       f"limit={self.limit}, num_fewshot={self.num_fewshot}, "
                       f"max_new_tokens={self.max_new_tokens}")


def _templated(opts: TaskOptions, default: bool, tokenizer) -> bool:
  on = default if opts.chat_template == "auto" else opts.chat_template == "on"
  return on and prompts.chat_template_of(tokenizer) is not None


def _as_user(text: str, tokenizer) -> str:
  return prompts.render_chat([{"role": "user", "content": text}], tokenizer)


def _limit(items: list[Item], opts: TaskOptions, default: int = 0) -> tuple[Item, ...]:
  n = opts.limit or default
  return tuple(items[:n] if n else items)


# --- built-in tasks ---------------------------------------------------------------------------


def chat_task(tokenizer, opts: TaskOptions, distractors: int = 3) -> Task:
  """Held-out chat replies as multiple choice (module docstring)."""
  from train import chat_data

  rows = chat_data.load_rows("chat", "heldout")
  convs = []
  for r in rows:
    msgs = r.data["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    convs.append((msgs[:last], msgs[last]["content"]))
  replies = sorted({reply for _, reply in convs})
  templated = _templated(opts, True, tokenizer)
  rng = random.Random(f"chat-{opts.seed}")
  items = []
  for history, reply in convs:
    others = rng.sample([x for x in replies if x != reply], distractors)
    at = rng.randrange(distractors + 1)
    choices = others[:at] + [reply] + others[at:]
    context = prompts.render_chat(history, tokenizer, chat_template=None if templated else "")
    if not templated:
      choices = [" " + c for c in choices]
    items.append(Item(context, tuple(choices), at))
  return Task("chat", "choice", _limit(items, opts), extra_metrics=("reply_perplexity",))


def arithmetic_task(tokenizer, opts: TaskOptions) -> Task:
  """Arithmetic word problems answered with chain of thought (module docstring)."""
  from train import arithmetic

  k = 3 if opts.num_fewshot < 0 else opts.num_fewshot
  n = opts.limit or 50
  test = arithmetic.problems(n, seed=opts.seed, split="test")
  shots = arithmetic.problems(k, seed=opts.seed, split="train")
  examples = [(p["question"], p["solution"].rsplit(" The answer is", 1)[0], str(p["answer"]))
              for p in shots]
  templated = _templated(opts, False, tokenizer)
  items = []
  for p in test:
    text = prompts.chain_of_thought(p["question"], examples, task=arithmetic.INSTRUCTION)
    items.append(Item(_as_user(text, tokenizer) if templated else text, answer=p["answer"]))
  stop = () if templated else ("\n\n", "\nQ:")
  return Task("arithmetic", "generate", tuple(items), metric="numeric", stop=stop,
              max_new_tokens=128)


def shakespeare_task(opts: TaskOptions) -> Task:
  """Perplexity of the held-out Shakespeare works, passage by passage."""
  from train import shakespeare_tfds as sh

  works = sh.split_works(sh.read_corpus())
  held = sh.validation_titles(works)
  texts = [p for title, body in works if title in held for p in sh.passages(body)]
  return Task("shakespeare", "perplexity", _limit([Item(t) for t in texts], opts, 8))


# --- JSONL tasks ------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
  return jsonl.read_objects(path, kind="task")


def _jsonl_item(where: str, row: dict, kind: str) -> Item:
  if not isinstance(row.get("prompt"), str) or "answer" not in row:
    raise ValueError(f"{where}: a row needs 'prompt' (a string) and 'answer', as "
                     '{"prompt", "choices", "answer"} or {"prompt", "answer"}; this row has '
                     f"keys {sorted(row)}")
  if ("choices" in row) != (kind == "choice"):
    raise ValueError(f"{where}: every row of a task must be of one kind: the first row is "
                     f"{kind!r} but this one {'has' if 'choices' in row else 'lacks'} 'choices'")
  if kind == "generate":
    return Item(row["prompt"], answer=row["answer"])
  choices, answer = row["choices"], row["answer"]
  if not isinstance(choices, list) or len(choices) < 2 or not all(
      isinstance(c, str) and c for c in choices):
    raise ValueError(f"{where}: 'choices' must be a list of >= 2 non-empty strings")
  if isinstance(answer, str):
    if answer not in choices:
      raise ValueError(f"{where}: answer {answer!r} is not one of the choices")
    answer = choices.index(answer)
  if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
    raise ValueError(f"{where}: 'answer' must be a choice's index in [0, {len(choices)}) or its "
                     f"text, got {row['answer']!r}")
  return Item(row["prompt"], tuple(choices), answer)


def jsonl_task(path: str, tokenizer, opts: TaskOptions) -> Task:
  """A task from a JSONL file (module docstring: the format)."""
  rows = _read_jsonl(Path(path).expanduser())
  kind = "choice" if "choices" in rows[0][1] else "generate"
  items = [_jsonl_item(w, r, kind) for w, r in rows]
  k = max(opts.num_fewshot, 0)
  if k >= len(items):
    raise ValueError(f"num_fewshot={k} needs more than {k} rows; {path} has {len(items)}")
  templated = _templated(opts, False, tokenizer)
  rng = random.Random(f"fewshot-{opts.seed}")
  out = []
  for i, it in enumerate(items):
    shots = rng.sample([j for j in range(len(items)) if j != i], k) if k else []

    def shown(j):
      a = items[j].choices[items[j].answer] if kind == "choice" else str(items[j].answer)
      return f"{items[j].prompt} {a}"
    text = "\n\n".join([*map(shown, shots), it.prompt])
    choices = it.choices
    if templated:
      text = _as_user(text, tokenizer)
    elif kind == "choice":
      choices = tuple(" " + c for c in choices)
    out.append(Item(text, choices, it.answer))
  return Task(Path(path).stem, kind, _limit(out, opts), metric="exact_match",
              stop=() if templated else ("\n\n",))


def load_task(name: str, tokenizer, opts: TaskOptions | None = None) -> Task:
  """The task `name` (a built-in name or `jsonl:PATH`), with `opts` applied."""
  opts = opts or TaskOptions()
  if name == "chat":
    task = chat_task(tokenizer, opts)
  elif name == "arithmetic":
    task = arithmetic_task(tokenizer, opts)
  elif name == "shakespeare":
    task = shakespeare_task(opts)
  elif name.startswith("jsonl:") and len(name) > 6:
    task = jsonl_task(name[6:], tokenizer, opts)
  else:
    raise ValueError(f"unknown task {name!r}; tasks are {list(BUILTIN)} and 'jsonl:PATH'")
  changes = {}
  if opts.metric:
    if task.kind != "generate":
      raise ValueError(f"metric={opts.metric!r} applies to generation tasks; {name!r} is a "
                       f"{task.kind} task")
    changes["metric"] = opts.metric
  if opts.stop:
    changes["stop"] = tuple(opts.stop)
  if opts.max_new_tokens:
    changes["max_new_tokens"] = opts.max_new_tokens
  return dataclasses.replace(task, **changes) if changes else task
