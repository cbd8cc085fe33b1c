"""Prompt builders: zero-shot, few-shot, chain-of-thought, and chat templates.

Formats (all plain text; the blank line is the separator between blocks):

zero-shot (an instruction, optionally an input; Wei et al., 2022, "Finetuned Language Models
Are Zero-Shot Learners", for the instruction framing)::

    {instruction}

    Input: {input}
    Output:

few-shot (a task description and k demonstrations; Brown et al., 2020, "Language Models are
Few-Shot Learners"): every example and the query use the same labels::

    {task}

    Input: {x_1}
    Output: {y_1}

    ...

    Input: {query}
    Output:

chain-of-thought (Wei et al., 2022, "Chain-of-Thought Prompting Elicits Reasoning in Large
Language Models"): worked examples with their reasoning, then the question; with no examples,
the zero-shot trigger "Let's think step by step." (Kojima et al., 2022)::

    {task}

    Q: {question_1}
    A: {reasoning_1} The answer is {answer_1}.

    Q: {question}
    A:

chat: `[{"role": "system" | "user" | "assistant", "content": str}, ...]` rendered with the
tokenizer's chat template (a jinja2 string) by `lmjax.convert.render_chat_template`, exactly as
Hugging Face's `apply_chat_template` renders it (the same template variables: the tokenizer's
special tokens, `messages`, `add_generation_prompt`, `tools`, `documents`, `raise_exception`,
`strftime_now`, ...), or, when there is none, the plain fallback::

    System: {content}
    User: {content}
    Assistant: {content}
    Assistant:

(one line per message, "Role: content"; the last line only with `add_generation_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmjax.convert.chat_template import render_chat_template, special_tokens_map

__all__ = ["chain_of_thought", "chat_template_of", "few_shot", "render_chat", "zero_shot"]

ROLES = ("system", "user", "assistant", "tool")
COT_TRIGGER = "Let's think step by step."


def _text(name: str, value: Any, *, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    raise ValueError(f"{name} must be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise ValueError(f"{name} must not be empty")
  return value


def zero_shot(instruction: str, input: str | None = None, *, input_label: str = "Input",
              output_label: str = "Output") -> str:
  """An instruction, optionally followed by an input, ending where the answer goes.

  Args:
    instruction: what to do ("Translate to French.").
    input: the text to do it on; None for an instruction alone.
    input_label, output_label: the labels of the input and answer lines.

  Returns:
    The prompt (module docstring: the format).
  """
  instruction = _text("instruction", instruction).strip()
  if input is None:
    return f"{instruction}\n\n{output_label}:"
  return f"{instruction}\n\n{input_label}: {_text('input', input).strip()}\n{output_label}:"


def _pair(i: int, example: Any) -> tuple[str, str]:
  if isinstance(example, Mapping):
    if set(example) != {"input", "output"}:
      raise ValueError(f"example {i} must have keys 'input' and 'output', got {sorted(example)}")
    x, y = example["input"], example["output"]
  elif isinstance(example, Sequence) and not isinstance(example, str) and len(example) == 2:
    x, y = example
  else:
    raise ValueError(f"example {i} must be an (input, output) pair or a dict, got {example!r}")
  return _text(f"example {i} input", x).strip(), _text(f"example {i} output", y).strip()


def few_shot(task: str | None, examples: Sequence, query: str, *, input_label: str = "Input",
             output_label: str = "Output") -> str:
  """A task description, k demonstrations and the query, all formatted alike.

  Args:
    task: what the examples show; None to give only the examples.
    examples: (input, output) pairs or `{"input": ..., "output": ...}` dicts (k >= 0).
    query: the new input.
    input_label, output_label: the labels of every input and output line.

  Returns:
    The prompt, ending with "{output_label}:" (module docstring: the format).
  """
  if isinstance(examples, str | Mapping):
    raise ValueError("examples must be a sequence of (input, output) pairs")
  blocks = [] if task is None else [_text("task", task).strip()]
  for i, ex in enumerate(examples):
    x, y = _pair(i, ex)
    blocks.append(f"{input_label}: {x}\n{output_label}: {y}")
  blocks.append(f"{input_label}: {_text('query', query).strip()}\n{output_label}:")
  return "\n\n".join(blocks)


def chain_of_thought(question: str, examples: Sequence = (), *, task: str | None = None,
                     trigger: str = COT_TRIGGER) -> str:
  """Worked examples with step-by-step reasoning, then the question.

  Args:
    question: the question to answer.
    examples: (question, reasoning, answer) triples or dicts with those keys; the answer line
      reads "A: {reasoning} The answer is {answer}.".
    task: an optional description first.
    trigger: with no examples, the answer line starts with it (zero-shot chain of thought).

  Returns:
    The prompt, ending with "A:" (or "A: {trigger}" with no examples).
  """
  if isinstance(examples, str | Mapping):
    raise ValueError("examples must be a sequence of (question, reasoning, answer) triples")
  blocks = [] if task is None else [_text("task", task).strip()]
  for i, ex in enumerate(examples):
    if isinstance(ex, Mapping):
      if set(ex) != {"question", "reasoning", "answer"}:
        raise ValueError(f"example {i} must have keys 'question', 'reasoning', 'answer', got "
                         f"{sorted(ex)}")
      q, r, a = ex["question"], ex["reasoning"], ex["answer"]
    elif isinstance(ex, Sequence) and not isinstance(ex, str) and len(ex) == 3:
      q, r, a = ex
    else:
      raise ValueError(f"example {i} must be a (question, reasoning, answer) triple, got {ex!r}")
    q = _text(f"example {i} question", q).strip()
    r = _text(f"example {i} reasoning", r).strip()
    a = _text(f"example {i} answer", a).strip().rstrip(".")
    blocks.append(f"Q: {q}\nA: {r} The answer is {a}.")
  last = f"Q: {_text('question', question).strip()}\nA:"
  if not examples and trigger:
    last += f" {trigger}"
  blocks.append(last)
  return "\n\n".join(blocks)


def _check_messages(messages: Any) -> list[dict]:
  if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
    raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    if m["role"] not in ROLES:
      raise ValueError(f"message {i} has role {m['role']!r}; allowed roles: {ROLES}")
    _text(f"message {i} content", m["content"], allow_empty=True)
    out.append(dict(m))
  return out


def chat_template_of(tokenizer: Any) -> str | None:
  """The tokenizer's chat template (a jinja string), or None."""
  template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
  if template is not None and not isinstance(template, str):
    raise ValueError(f"tokenizer.chat_template must be a jinja string or None, got {template!r}")
  return template or None


def render_chat(messages: Sequence[Mapping[str, str]], tokenizer: Any = None, *,
                chat_template: str | None = None, add_generation_prompt: bool = True,
                **template_kwargs) -> str:
  """Chat messages as one prompt string, by the model's chat template or the plain fallback.

  Args:
    messages: `[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]`.
    tokenizer: supplies `chat_template` and the special-token strings it has (`bos_token`,
      `eos_token`, ...: `lmjax.convert.chat_template.special_tokens_map`).
    chat_template: a jinja2 template overriding the tokenizer's.
    add_generation_prompt: end with the opening of an assistant turn.
    **template_kwargs: extra variables for the template (`tools=...`, `documents=...`, ...);
      they override the special tokens.

  Returns:
    The prompt text. Encode it without adding a BOS when the template already writes one
    (`generate` skips a BOS the text already starts with).

  Raises:
    ValueError: bad messages, or a template that is not valid jinja or fails on them.
  """
  messages = _check_messages(messages)
  template = chat_template if chat_template is not None else chat_template_of(tokenizer)
  if not template:
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if add_generation_prompt:
      lines.append("Assistant:")
    return "\n".join(lines)
  return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                              **{**special_tokens_map(tokenizer), **template_kwargs})
