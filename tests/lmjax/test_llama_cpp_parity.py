"""lmjax against llama.cpp (`llama-cpp-python`, the `reference` extra) on the same GGUF file.

A tiny llama-architecture GGUF written the way llama.cpp's converter writes it
(tests/lmjax/pretrained_fixtures.py), read by both. Two files:

* float32 matrices, llama.cpp with a float32 KV cache: nothing is rounded on either side, so the
  logits agree to float32 accumulation order. This pins the layout (GGUF's permuted q/k rows,
  rotary, RMSNorm, GQA, tied head) independent of quantization.
* Q4_1 matrices and a Q8_0 embedding (what SmolLM2's GGUF holds), lmjax keeping the blocks
  (`load_pretrained(..., quant="keep")`): both decode the same blocks, but llama.cpp's CPU dot
  products also round each activation block of 32 to 8 bits (Q8_1 / Q8_0 activations), so the
  logits are close, not equal. The tolerance is measured against that: the observed error, with a
  margin, stays far below what a one-nibble-order bug in the kept reader gives (checked here).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax import pretrained_fixtures as fx

llama_cpp = pytest.importorskip("llama_cpp")

IDS = [5, 17, 40, 3, 60, 22, 9, 80, 33, 12, 70, 2, 94, 41, 58, 7]
# head_dim 32: lmjax keeps blocks of 32 inside one head; model_dim = heads x head_dim (GGUF's
# llama metadata has no separate key length).
CFG = dict(head_dim=32, num_heads=2, num_kv_heads=1)
# Measured (llama-cpp-python 0.3.36): float32 max |diff| 4.8e-6 of logits up to 30.5 (an RMSNorm
# eps of 1e-6 for 1e-5 gives 3e-4, rope theta 1% off 1.5e-3, q rows left permuted 3.3); Q4_1
# kept 0.12 of logits up to 30.4 (0.4%: llama.cpp's 8-bit activations; the dequantized float32
# load differs from llama.cpp by the same 0.12), tolerance 0.46; a nibble-order bug in one
# matrix gives 7.8 (layer 0) / 9.5 (layer 1).
F32_ATOL = 1e-4
Q4_REL = 0.015


def _tokenizer() -> dict:
  tokens = ["<s>", "</s>", *[chr(0x21 + i) for i in range(93)], "ab"]
  return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "types": [3, 3] + [1] * 94,
          "merges": ["a b"], "bos": 0, "eos": 1}


def _write(path, quantized: bool):
  cfg = fx.tiny_config(**CFG)
  w = fx.hf_weights(cfg)
  types = {}
  if quantized:
    types = {k: "Q4_1" for k, v in w.items() if v.ndim == 2}
    types["model.embed_tokens.weight"] = "Q8_0"
  return fx.write_gguf(path, cfg, w, tokenizer=_tokenizer(), types=types)


def _llama_logits(path) -> np.ndarray:
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=1, n_ubatch=1, n_threads=1,
                        n_threads_batch=1, logits_all=True, type_k=0, type_v=0,  # GGML F32
                        verbose=False)
  llm.eval(IDS)
  return np.array(llm.scores[:len(IDS)], np.float32)


def _swap_nibbles(qparams, layer: str):
  """`qparams` with the 4-bit codes of the first kept uint4 matrix under `layer` read
  high-nibble-first: the bug the Q4_1 tolerance has to catch."""
  done = []

  def swap(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if isinstance(x, lmjax.quant.QArray) and x.fmt == "uint4" and layer in name and not done:
      done.append(name)
      q = x.qvalue
      return dataclasses.replace(x, qvalue=(q >> 4) | (q << 4))
    return x
  tree = jax.tree_util.tree_map_with_path(
      swap, qparams.tree, is_leaf=lambda x: isinstance(x, lmjax.quant.QArray))
  assert done, f"no uint4 matrix under {layer}"
  return dataclasses.replace(qparams, tree=tree)


def test_float32_gguf_logits_equal_llama_cpp(tmp_path):
  path = _write(tmp_path / "f32.gguf", quantized=False)
  cfg, params, _ = lmjax.load_pretrained(path)
  want = _llama_logits(path)
  got = np.asarray(lmjax.model_for(cfg).apply({"params": params}, jnp.asarray([IDS]))[0])
  np.testing.assert_allclose(got, want, atol=F32_ATOL, rtol=0)
  assert np.abs(want).max() > 5  # logits of a real spread, not all near zero


def test_q4_1_kept_logits_match_llama_cpp(tmp_path):
  path = _write(tmp_path / "q4_1.gguf", quantized=True)
  cfg, kept, _ = lmjax.load_pretrained(path, quant="keep")
  leaves = jax.tree.leaves(kept.tree, is_leaf=lambda x: isinstance(x, lmjax.quant.QArray))
  assert {x.fmt for x in leaves if isinstance(x, lmjax.quant.QArray)} == {"uint4", "int8"}
  model = lmjax.model_for(cfg)
  want = _llama_logits(path)
  tol = Q4_REL * np.abs(want).max()

  def diff(qp):
    return np.abs(np.asarray(lmjax.quant.apply(model, qp, jnp.asarray([IDS]))[0]) - want).max()
  assert diff(kept) < tol
  assert diff(_swap_nibbles(kept, "layers_1")) > 3 * tol  # the tolerance sees a real bug
