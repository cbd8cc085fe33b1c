"""Prompt builders: exact formats; chat templates against renderings by Hugging Face's
transformers (committed golden, and the installed transformers when there is one)."""

import json
import re
from pathlib import Path

import pytest

from infer import prompts
from lmjax.convert import HFTokenizer

# Renderings by transformers' apply_chat_template (tests/make_chat_golden.py): SmolLM2's real
# template, a Llama-2-style one, and a probe of the variables every template is given.
GOLDEN = Path(__file__).parents[1] / "lmjax" / "golden" / "chat_templates.json"
CHAT = json.loads(GOLDEN.read_text(encoding="utf-8"))

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2+2?"}]


class Tok:
  """What `render_chat` reads of a tokenizer: a chat template and special-token strings."""

  def __init__(self, template, **special_tokens):
    self.chat_template = template
    for name, token in special_tokens.items():
      setattr(self, name, token)


def hf_tokenizer(template: str, special_tokens: dict[str, str]) -> HFTokenizer:
  """An `HFTokenizer` whose vocabulary is just these special tokens."""
  from tokenizers import Tokenizer, models
  vocab = {t: i for i, t in enumerate(dict.fromkeys(special_tokens.values()))}
  return HFTokenizer(Tokenizer(models.WordLevel(vocab)), chat_template=template,
                     **{k: special_tokens.get(k)
                        for k in ("bos_token", "eos_token", "unk_token", "pad_token")})


def _name(r: dict) -> str:
  gen = "gen" if r["add_generation_prompt"] else "nogen"
  return f"{r['template']}/{r['conversation']}/{gen}{'/kwargs' if r['kwargs'] else ''}"


def test_zero_shot():
  assert prompts.zero_shot("Translate to French.", "cheese") == (
      "Translate to French.\n\nInput: cheese\nOutput:")
  assert prompts.zero_shot("Write a haiku about rain.") == "Write a haiku about rain.\n\nOutput:"


def test_few_shot_formats_every_example_alike():
  got = prompts.few_shot("Antonyms.", [("hot", "cold"), {"input": "up", "output": "down"}],
                         "big")
  assert got == ("Antonyms.\n\nInput: hot\nOutput: cold\n\nInput: up\nOutput: down\n\n"
                 "Input: big\nOutput:")
  assert prompts.few_shot(None, [("a", "b")], "c", input_label="Q", output_label="A") == (
      "Q: a\nA: b\n\nQ: c\nA:")


def test_chain_of_thought():
  got = prompts.chain_of_thought(
      "I have 3 apples and eat one. How many are left?",
      [("Tom has 2 pens and buys 3. How many?", "He starts with 2 and adds 3, so 2 + 3 = 5.", "5")],
      task="Solve the arithmetic word problems.")
  assert got == ("Solve the arithmetic word problems.\n\n"
                 "Q: Tom has 2 pens and buys 3. How many?\n"
                 "A: He starts with 2 and adds 3, so 2 + 3 = 5. The answer is 5.\n\n"
                 "Q: I have 3 apples and eat one. How many are left?\nA:")
  assert prompts.chain_of_thought("Why?") == "Q: Why?\nA: Let's think step by step."


def test_chat_fallback_without_template():
  assert prompts.render_chat(MESSAGES, Tok(None)) == (
      "System: Be brief.\nUser: Hi!\nAssistant: Hello.\nUser: 2+2?\nAssistant:")
  assert prompts.render_chat(MESSAGES[1:2], add_generation_prompt=False) == "User: Hi!"


@pytest.mark.parametrize("r", CHAT["renderings"], ids=_name)
def test_chat_templates_render_as_transformers_did(r):
  """`render_chat` and `HFTokenizer.apply_chat_template` against the committed golden."""
  t = CHAT["templates"][r["template"]]
  gen = r["add_generation_prompt"]
  renders = [
      lambda: prompts.render_chat(r["messages"], Tok(t["template"], **t["special_tokens"]),
                                  add_generation_prompt=gen, **r["kwargs"]),
      lambda: hf_tokenizer(t["template"], t["special_tokens"]).apply_chat_template(
          r["messages"], gen, **r["kwargs"])]
  for render in renders:
    if "error" in r:
      with pytest.raises(ValueError, match=re.escape(r["error"])):
        render()
    else:
      assert render() == r["text"]


def test_chat_golden_is_what_transformers_renders_now():
  """The golden against the installed transformers (when it is installed)."""
  transformers = pytest.importorskip("transformers")
  import jinja2

  from tests.make_chat_golden import template_tokenizer
  made = CHAT["versions"]["transformers"]
  if transformers.__version__.split(".")[0] != made.split(".")[0]:
    pytest.skip(f"the golden was made with transformers {made}, this is "
                f"{transformers.__version__}")
  for r in CHAT["renderings"]:
    t = CHAT["templates"][r["template"]]
    tok = template_tokenizer(t["template"], t["special_tokens"])
    assert tok.special_tokens_map == t["special_tokens"]
    kw = dict(tokenize=False, add_generation_prompt=r["add_generation_prompt"], **r["kwargs"])
    if "error" in r:
      with pytest.raises(jinja2.exceptions.TemplateError, match=re.escape(r["error"])):
        tok.apply_chat_template(r["messages"], **kw)
    else:
      assert tok.apply_chat_template(r["messages"], **kw) == r["text"], _name(r)


def test_chat_template_errors_are_value_errors():
  with pytest.raises(ValueError, match="not valid jinja"):
    prompts.render_chat(MESSAGES, chat_template="{% for %}")
  with pytest.raises(ValueError, match="'nope' is undefined"):
    prompts.render_chat(MESSAGES, chat_template="{{ nope + 'x' }}")


def test_bad_input():
  with pytest.raises(ValueError, match="role"):
    prompts.render_chat([{"role": "wizard", "content": "a"}])
  with pytest.raises(ValueError, match="non-empty list"):
    prompts.render_chat([])
  with pytest.raises(ValueError, match="content"):
    prompts.render_chat([{"role": "user"}])
  with pytest.raises(ValueError, match="instruction"):
    prompts.zero_shot("  ")
  with pytest.raises(ValueError, match="example 0"):
    prompts.few_shot("t", [("only input",)], "q")
  with pytest.raises(ValueError, match="triple"):
    prompts.chain_of_thought("q", [("q", "a")])
