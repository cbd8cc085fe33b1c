"""A multi-turn chat on the command line (`python -m infer --model M --interactive`).

User turns come from stdin, one a line, until EOF or `/exit`; `/reset` forgets the conversation
(the system message stays). Each turn's prompt is the conversation rendered with the model's
chat template (`infer.prompts.render_chat`), and the answer is streamed (`infer.stream`) as it
comes, with the request's sampler, stop strings, drafter (`--draft`).

The conversation is kept as the tokens the model read and wrote, as llama.cpp's interactive
mode keeps it, not re-encoded from text: turn n's prompt is turn n - 1's prompt and answer
tokens, then the tokens of the template's text that follows the answer (its end-of-turn, the
new user message, the opening of the next answer). Re-encoding the text could split the answer
into other tokens than the model wrote (byte-level BPE merges across the template's boundary),
and the prefix cache would miss from there on. With the conversation in an `infer.PrefixCache`
(which stores each prompt and its answer), turn n prefills only the tokens turn n - 1 did not
run through the model: its answer's last token (never fed back) and the new text. When the
rendered conversation does not extend the text of those tokens (an answer cut at a stop
string), the turn's prompt is the rendered text, encoded as any prompt.

The same prompts, built once per turn and passed to `infer.generate` without a cache, give the
same answers (tests/infer/test_chat.py).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from infer import prompts as prompts_lib
from infer import streaming

__all__ = ["Conversation", "run"]

EXIT, RESET = "/exit", "/reset"


class Conversation:
  """The messages and tokens of a chat so far.

  Args:
    tokenizer: the model's tokenizer (its chat template renders the turns).
    system: a system message first, or None.
  """

  def __init__(self, tokenizer, system: str | None = None):
    self.tokenizer, self.system = tokenizer, system
    self.reset()

  def reset(self) -> None:
    """Back to the system message alone."""
    self.messages: list[dict[str, str]] = (
        [{"role": "system", "content": self.system}] if self.system else [])
    self.ids: list[int] | None = None  # the tokens the model read and wrote so far
    self.text: str | None = None  # the rendered text those tokens stand for
    self._pending: tuple[list[dict[str, str]], str] | None = None

  def prompt(self, user: str) -> str | list[int]:
    """The next turn's prompt: token ids continuing the conversation's tokens, or (first turn,
    or a conversation the rendered text does not extend) the rendered text."""
    messages = [*self.messages, {"role": "user", "content": user}]
    full = prompts_lib.render_chat(messages, self.tokenizer, add_generation_prompt=True)
    self._pending = (messages, full)
    if self.ids is not None and full.startswith(self.text):
      more = full[len(self.text):]
      return self.ids + (list(self.tokenizer.encode(more, add_bos=False)) if more else [])
    return full

  def answered(self, result) -> None:
    """Adds the answer of a `GenerateResult` of `prompt`'s request (one sequence)."""
    messages, full = self._pending
    tokens, reason, answer = result.tokens[0], result.stop_reason[0], result.text[0]
    self.messages = [*messages, {"role": "assistant", "content": answer}]
    self.ids = list(result.prompt_tokens[0]) + list(tokens)
    said = self.tokenizer.decode(tokens[:-1] if reason == "eos" else tokens) if tokens else ""
    if reason == "eos":  # decode leaves the EOS out; the template writes it after the answer
      said += _eos_text(self.tokenizer)
    self.text = full + said


def _eos_text(tokenizer) -> str:
  from lmjax.convert.chat_template import special_tokens_map
  return special_tokens_map(tokenizer).get("eos_token") or ""


def run(model, params, tokenizer, generate_kw: dict[str, Any], *, system: str | None = None,
        stream: bool = True, stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
  """The chat loop: reads turns from `stdin` (default `sys.stdin`), prints each answer on
  `stdout` (streamed, or whole when not `stream`) followed by a newline, and a line of
  statistics per turn on `stderr`. `generate_kw`: `infer.stream`'s keyword arguments (with a
  `prefix_cache`). Returns the exit status (0; a turn the model cannot take, such as one past
  its context, is reported and skipped)."""
  stdin = sys.stdin if stdin is None else stdin
  stdout = sys.stdout if stdout is None else stdout
  stderr = sys.stderr if stderr is None else stderr
  conv, cache = Conversation(tokenizer, system), generate_kw.get("prefix_cache")
  interactive = stdin.isatty()
  while True:
    if interactive:
      stderr.write("> ")
      stderr.flush()
    line = stdin.readline()
    if not line:
      break
    user = line.rstrip("\r\n")
    if user.strip() == EXIT:
      break
    if user.strip() == RESET:
      conv.reset()
      print("[conversation reset]", file=stderr)
      continue
    if not user.strip():
      continue
    before = None if cache is None else cache.stats()
    try:
      steps = streaming.stream(model, params, [conv.prompt(user)], **generate_kw)

      def show(step):
        if stream:
          stdout.write(step.text[0])
          stdout.flush()
      result = streaming.drain(steps, show)
    except ValueError as e:  # e.g. the conversation no longer fits the model's context
      print(f"[error: {e}; /reset starts over]", file=stderr)
      continue
    conv.answered(result)
    stdout.write(("" if stream else result.text[0]) + "\n")
    stdout.flush()
    info = f"{result.stop_reason[0]}, {len(result.tokens[0])} tokens"
    if before is not None:
      after = cache.stats()
      info += (f"; prompt {len(result.prompt_tokens[0])} tokens, "
               f"{after['prefilled_tokens'] - before['prefilled_tokens']} prefilled")
    if hasattr(result, "acceptance_rate"):
      info += f"; acceptance rate {result.acceptance_rate:.2f}"
    print(f"[{info}]", file=stderr)
  return 0
