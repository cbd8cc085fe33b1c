"""Hugging Face PEFT format: adapters made by `peft` on transformers' LlamaForCausalLM load here
with equal logits, and ours load there (reference extra; committed goldens check without it).

Goldens (tests/lmjax/golden/peft_lora_hf/, peft_lora_hf.npz): `peft` 0.21 LoRA (r=4, alpha=8,
q/v/o/down, B randomized) and soft prompt (k=3) on a tiny random Llama; regenerate with
`LMJAX_WRITE_GOLDEN=1 python -m pytest tests/lmjax/test_peft_hf.py`.
"""

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import peft
from lmjax.convert import hf as hf_convert
from lmjax.convert import layout
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params

GOLDEN = Path(__file__).parent / "golden"
TOKENS = np.array([[5, 17, 33, 2, 90, 41, 7], [11, 3, 64, 64, 8, 1, 29]], np.int32)


@functools.cache
def _base():
  cfg = fx.tiny_config()
  model = lmjax.CausalLM(cfg)
  return cfg, model, random_params(model, (jnp.ones((1, 4), jnp.int32),), 0)


@functools.cache
def _jitted():
  _, model, _ = _base()
  return (jax.jit(lambda p, t: model.apply({"params": p}, t)),
          jax.jit(lambda a, t: peft.apply(model, a, t)))


def _hf_model(cfg, params):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_convert.config_to_hf(cfg).items()
                                       if k not in ("architectures", "torch_dtype")})
  m = transformers.LlamaForCausalLM(hf_cfg).eval()
  sd = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in
        layout.params_to_hf(cfg, params).items()}
  m.load_state_dict(sd, strict=False)
  return m


def _hf_logits(m, tokens=TOKENS):
  import torch
  with torch.no_grad():
    return m(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _make_hf_adapters(folder: Path, cfg, params) -> dict:
  """With the reference: peft's own LoRA and prompt-tuning adapters and their logits."""
  torch = pytest.importorskip("torch")
  hp = pytest.importorskip("peft")
  torch.manual_seed(0)
  lcfg = hp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj",
                                                           "down_proj"], lora_dropout=0.0)
  m = hp.get_peft_model(_hf_model(cfg, params), lcfg)
  with torch.no_grad():
    for n, p in m.named_parameters():
      if "lora_B" in n:
        p.normal_(0, 0.2)
  m.save_pretrained(folder / "peft_lora_hf")
  out = {"lora": _hf_logits(m)}
  torch.manual_seed(1)
  pcfg = hp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
  m = hp.get_peft_model(_hf_model(cfg, params), pcfg)
  m.save_pretrained(folder / "peft_prompt_hf")
  out["prompt"] = _hf_logits(m)
  return out


@pytest.fixture(scope="module")
def golden():
  if os.environ.get("LMJAX_WRITE_GOLDEN"):
    cfg, _, params = _base()
    logits = _make_hf_adapters(GOLDEN, cfg, params)
    np.savez(GOLDEN / "peft_hf.npz", tokens=TOKENS, **logits)
  return dict(np.load(GOLDEN / "peft_hf.npz"))


def test_peft_made_adapters_load_with_equal_logits(golden):
  cfg, model, params = _base()
  fwd, pfwd = _jitted()
  ad, spec = peft.load_adapter(GOLDEN / "peft_lora_hf", cfg)
  assert spec.rank == 4 and spec.scale == 2.0 and set(spec.targets) == {
      "query", "value", "out", "wo"}
  got = pfwd(peft.adapt(params, ad, spec), jnp.asarray(golden["tokens"]))
  base = fwd(params, jnp.asarray(golden["tokens"]))
  assert np.abs(golden["lora"] - np.asarray(base)).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(got, golden["lora"], atol=2e-4, rtol=2e-4)
  ad, spec = peft.load_adapter(GOLDEN / "peft_prompt_hf", cfg)
  assert spec.num_virtual_tokens == 3
  got = pfwd(peft.adapt(params, ad, spec), jnp.asarray(golden["tokens"]))
  np.testing.assert_allclose(got, golden["prompt"][:, 3:], atol=2e-4, rtol=2e-4)


def test_ours_load_in_peft_with_equal_logits(tmp_path):
  hp = pytest.importorskip("peft")
  cfg, model, params = _base()
  spec = peft.LoRAConfig(rank=2, alpha=6.0, targets=("k_proj", "wi_gate", "wi_up"))
  rng = np.random.default_rng(5)
  ad = jax_tree_random(peft.init(spec, cfg, jax.random.key(1)), rng)
  peft.save_adapter(tmp_path / "ours", cfg, ad, spec, base_model="tiny")
  meta = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert meta["target_modules"] == ["gate_proj", "k_proj", "up_proj"]
  m = hp.PeftModel.from_pretrained(_hf_model(cfg, params), tmp_path / "ours")
  want = _hf_logits(m)
  got = _jitted()[1](peft.adapt(params, ad, spec), jnp.asarray(TOKENS))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  again, spec2 = peft.load_adapter(tmp_path / "ours", cfg)  # and back, exactly
  assert (spec2.rank, spec2.scale, set(spec2.targets)) == (2, 3.0, {"key", "wi_gate", "wi_up"})
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(ad)):
    np.testing.assert_array_equal(a, b)


def jax_tree_random(boxed, rng):
  import flax.linen as nn
  raw = nn.meta.unbox(boxed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.2, jnp.float32),
                      raw)


def test_bad_adapter_files_are_refused(tmp_path):
  cfg, _, _ = _base()
  (tmp_path / "ia3").mkdir()
  (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
  with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
    peft.load_adapter(tmp_path / "ia3", cfg)
  other = fx.tiny_config(model_dim=32, head_dim=8)
  with pytest.raises(ValueError, match="another model"):
    peft.load_adapter(GOLDEN / "peft_lora_hf", other)
  with pytest.raises(ValueError, match="layers"):
    peft.load_adapter(GOLDEN / "peft_lora_hf", fx.tiny_config(num_decoder_layers=1))
