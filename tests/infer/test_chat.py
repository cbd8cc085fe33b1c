"""`python -m infer --interactive`: a multi-turn chat on stdin gives the answers `generate` gives
on the same conversation built by hand, and each turn prefills only its new tokens."""

import io
import re
import sys

import jax.numpy as jnp
import pytest

import infer
import infer.__main__ as cli
import lmjax
from infer import prefix_cache
from infer.prompts import render_chat
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params

pytest.importorskip("tokenizers", reason="the byte-level BPE fixture needs tokenizers")

SYSTEM = "Be brief."
TURN = "\n<|im_start|>user: {}<|im_end|>\n<|im_start|>assistant: "  # fx.CHAT_TEMPLATE's text
NEW = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  cfg = fx.tiny_config(max_len=256)
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 4), jnp.int32),), 4)
  return lmjax.save_pretrained(cfg, params, fx.byte_level_tokenizer(),
                               tmp_path_factory.mktemp("chat") / "tiny")


def test_turns_equal_generate_on_the_whole_conversation(folder, monkeypatch, capsys):
  made = []

  class Recorded(prefix_cache.PrefixCache):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)
  monkeypatch.setattr(prefix_cache, "PrefixCache", Recorded)
  monkeypatch.setattr(sys, "stdin", io.StringIO(
      "the cat sat\nhello world\n\n/reset\nthe dog\n/exit\nnever read\n"))
  code = cli.main(["--model", str(folder), "--interactive", "--system", SYSTEM,
                   "--max-new-tokens", str(NEW), "--stream"])
  assert code == 0
  out, err = capsys.readouterr()

  # The reference: the conversation built by hand, one uncached `generate` per turn.
  cfg, params, tok = lmjax.load_pretrained(str(folder))
  model = lmjax.CausalLM(cfg)
  kw = dict(tokenizer=tok, max_new_tokens=NEW)
  sys_msg = {"role": "system", "content": SYSTEM}
  p1 = render_chat([sys_msg, {"role": "user", "content": "the cat sat"}], tok)
  r1 = infer.generate(model, params, p1, **kw)
  # Turn 2 continues the tokens turn 1 read and wrote (the EOS closing the answer, or the
  # template's <|im_end|> after an answer cut by the length), then the template's next text.
  after = ("" if r1.stop_reason[0] == "eos" else "<|im_end|>") + TURN.format("hello world")
  p2 = r1.prompt_tokens[0] + r1.tokens[0] + tok.encode(after, add_bos=False)
  r2 = infer.generate(model, params, [p2], **kw)
  # After /reset: a fresh conversation.
  r3 = infer.generate(model, params, render_chat(
      [sys_msg, {"role": "user", "content": "the dog"}], tok), **kw)
  assert out == "".join(r.text[0] + "\n" for r in (r1, r2, r3))
  assert "[conversation reset]" in err

  # Turn 2 prefilled exactly what turn 1 did not run through the model: its answer's last
  # token (never fed back) and the new text; turn 1 prefilled its whole prompt.
  stats = [tuple(map(int, m)) for m in re.findall(r"prompt (\d+) tokens, (\d+) prefilled", err)]
  n1, n2 = len(r1.prompt_tokens[0]), len(p2)
  new2 = n2 - (n1 + len(r1.tokens[0]) - 1)
  assert stats[:2] == [(n1, n1), (n2, new2)]
  assert len(stats) == 3 and stats[2][0] == len(r3.prompt_tokens[0])
  assert stats[2][1] < stats[2][0]  # the system message's tokens came from the cache
  (cache,) = made
  assert cache.prefilled_tokens == sum(s[1] for s in stats)
  assert cache.hit_tokens == sum(s[0] - s[1] for s in stats)


def test_bad_interactive_arguments_exit_2(capsys):
  for argv, message in (
      (["--interactive", "--num-samples", "2"], "--interactive answers each turn once"),
      (["--interactive", "--best-of", "2"], "--interactive answers each turn once"),
      (["--interactive", "--prompt", "a"], "not allowed with argument"),
  ):
    with pytest.raises(SystemExit) as e:
      cli.main(["--model", "m", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
