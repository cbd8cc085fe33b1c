"""Prompt builders: exact formats, chat templates (checked against Hugging Face's renderer)."""

import pytest

from infer import prompts

# ChatML, as SmolLM2-Instruct and Qwen2 write it.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama-2 style: bos/eos tokens, a system block folded into the first turn, raise_exception.
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

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2+2?"}]


class Tok:
  def __init__(self, template):
    self.chat_template = template
    self.bos_token, self.eos_token = "<s>", "</s>"


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


def test_chat_templates_match_hugging_face():
  hf = pytest.importorskip("transformers.utils.chat_template_utils")
  for template in (CHATML, LLAMA2):
    for gen in (True, False):
      for msgs in (MESSAGES, MESSAGES[1:]):
        ours = prompts.render_chat(msgs, Tok(template), add_generation_prompt=gen)
        rendered, _ = hf.render_jinja_template(
            conversations=[msgs], chat_template=template, add_generation_prompt=gen,
            bos_token="<s>", eos_token="</s>")
        assert ours == rendered[0]
  assert prompts.render_chat(MESSAGES[1:2], Tok(CHATML)) == (
      "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
      "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_bad_input():
  with pytest.raises(ValueError, match="alternate"):
    prompts.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                        Tok(LLAMA2))
  with pytest.raises(ValueError, match="role"):
    prompts.render_chat([{"role": "wizard", "content": "a"}])
  with pytest.raises(ValueError, match="non-empty list"):
    prompts.render_chat([])
  with pytest.raises(ValueError, match="content"):
    prompts.render_chat([{"role": "user"}])
  with pytest.raises(ValueError, match="not valid jinja"):
    prompts.render_chat(MESSAGES, chat_template="{% for %}")
  with pytest.raises(ValueError, match="instruction"):
    prompts.zero_shot("  ")
  with pytest.raises(ValueError, match="example 0"):
    prompts.few_shot("t", [("only input",)], "q")
  with pytest.raises(ValueError, match="triple"):
    prompts.chain_of_thought("q", [("q", "a")])
