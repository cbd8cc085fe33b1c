"""Chat templates: the one renderer of Hugging Face chat templates (Jinja2).

`render_chat_template` renders a chat template (Jinja2) as transformers' `apply_chat_template`
does (`transformers/utils/chat_template_utils.py`): an immutable sandbox with `trim_blocks`,
`lstrip_blocks` and the `loopcontrols` extension; globals `raise_exception`, `strftime_now`,
`dict` and a `namespace` that refuses underscore names; a `tojson` filter that keeps non-ASCII
text; the `{% generation %}` block (rendered as its body); and the variables `messages` (keys
whose value is None dropped; a `reasoning` or `thinking` field also given as
`reasoning_content`, and `thinking`), `tools` and `documents` (None unless given),
`add_generation_prompt`, and each special token the tokenizer has (`bos_token`, `eos_token`,
`unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`: `special_tokens_map`; those it
lacks stay undefined). It is the one renderer: `HFTokenizer.apply_chat_template` and
`infer.prompts.render_chat` call it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                             "cls_token", "mask_token")


def special_tokens_map(tokenizer: Any) -> dict[str, str]:
  """The special-token strings a chat template is given, as transformers' `special_tokens_map`:
  each of `SPECIAL_TOKENS_ATTRIBUTES` that `tokenizer` has as a string (none for None)."""
  out = {}
  for name in SPECIAL_TOKENS_ATTRIBUTES:
    value = getattr(tokenizer, name, None) if tokenizer is not None else None
    if isinstance(value, str):
      out[name] = value
  return out


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_message(i: int, message: Any) -> dict[str, Any]:
  """A message as transformers gives it to the template: keys whose value is None dropped, its
  reasoning (under any of `_REASONING_FIELDS`) also as `reasoning_content` and `thinking`."""
  if not isinstance(message, Mapping):
    raise ValueError(f"message {i} must be a dict, got {message!r}")
  out = {k: v for k, v in message.items() if v is not None}
  reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
  if reasoning is not None:
    out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
  return out


def _jinja():
  try:
    import jinja2
  except ImportError as e:
    raise ImportError("chat templates need `jinja2`: pip install 'jinja2>=3.1.6'") from e
  import re
  version = tuple(int(re.match(r"\d*", x).group() or 0) for x in jinja2.__version__.split(".")[:3])
  if version < (3, 1, 6):  # older sandboxes have known escapes
    raise ImportError(f"chat templates need jinja2 >= 3.1.6 (its sandbox runs the model's "
                      f"template, untrusted code); this is {jinja2.__version__}: "
                      "pip install -U jinja2")
  return jinja2


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  import datetime

  jinja2 = _jinja()
  from jinja2 import nodes
  from jinja2.ext import Extension
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
    transformers): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  class Namespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore names (no way into Python internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's signature, so namespace(self=...) works
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        Namespace.check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      Namespace.check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot store underscore-prefixed attributes, got {name!r}")

  class Dict:
    """`dict(...)` and `dict.fromkeys(...)` without the dict type's other attributes."""

    def __call__(self, *args, **kwargs):
      return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
      return dict.fromkeys(*args, **kwargs)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, "jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, dict=Dict(), namespace=Namespace,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"the chat template is not valid jinja: {e}") from e


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, tools: Sequence[Mapping] | None = None,
                         documents: Sequence[Mapping] | None = None, **variables) -> str:
  """Renders a Hugging Face chat template (Jinja2) as transformers' `apply_chat_template` does.

  The template sees what transformers gives it (module docstring): `messages`, `tools`,
  `documents`, `add_generation_prompt` and `variables`, with transformers' globals and filters.

  Args:
    template: the Jinja2 source.
    messages: the chat, `[{"role": ..., "content": ...}, ...]` (other keys are passed on).
    add_generation_prompt: end with the opening of an assistant turn (transformers' own
      default is False; lmjax's is True, as prompts for generation want it).
    tools: JSON schemas of the tools (dicts), or None.
    documents: dicts (e.g. `{"title", "text"}`) for retrieval-augmented templates, or None.
    **variables: more template variables: the special tokens (`special_tokens_map(tokenizer)`),
      and any a template reads (e.g. `enable_thinking`).

  Raises:
    ValueError: the template is not valid Jinja, or fails on these messages (its
      `raise_exception`, an undefined variable used, ...); the message says which.
    ImportError: jinja2 is missing or older than 3.1.6.
  """
  for what, items in (("tools", tools), ("documents", documents)):
    if items is not None and (isinstance(items, str | Mapping) or not all(
        isinstance(x, Mapping) for x in items)):
      raise ValueError(f"{what} must be a list of dicts (JSON schemas for tools), got "
                       f"{items!r}")
  compiled = _compile(template)
  jinja2 = _jinja()
  chat = [_template_message(i, m) for i, m in enumerate(messages)]
  try:
    return compiled.render(messages=chat, tools=None if tools is None else list(tools),
                           documents=None if documents is None else list(documents),
                           add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"the chat template failed on these messages: {e}") from e
