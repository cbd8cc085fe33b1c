"""Cold start (issue 22): the persistent compilation cache across processes, no recompiles for a
changed `max_new_tokens` or prompt length within their buckets, and the converted-weights
cache giving back exactly the params a fresh load makes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from infer import decode
from lmjax.convert import pretrained, weights_cache
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params, tiny

pytest.importorskip("gguf", reason="writing GGUF files needs the gguf package")
pytest.importorskip("tokenizers", reason="GGUF tokenizers need the tokenizers package")

ROOT = Path(__file__).resolve().parents[2]
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
# Every matrix quantized in some block format (q and k rows permuted, as llama.cpp stores them).
TYPES = {"model.embed_tokens.weight": "Q8_0", "model.layers.0.self_attn.q_proj.weight": "Q4_1",
         "model.layers.0.self_attn.k_proj.weight": "Q4_0",
         "model.layers.1.self_attn.q_proj.weight": "Q8_0", "model.layers.0.mlp.up_proj.weight":
         "Q4_1", "model.layers.1.mlp.down_proj.weight": "Q4_0", "lm_head.weight": "Q8_0"}


def _tokenizer() -> dict:
  from tests.lmjax.test_pretrained_gguf import bytes_to_unicode
  alphabet = list(bytes_to_unicode().values())
  return {"model": "gpt2", "pre": "smollm", "tokens": ["<s>", "</s>", *alphabet[:94]],
          "types": [3, 3] + [1] * 94, "merges": [], "bos": 0, "eos": 1,
          "chat_template": fx.CHAT_TEMPLATE}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
  """A tiny quantized llama GGUF with a byte-level tokenizer and a chat template."""
  cfg = fx.tiny_config(tie_embeddings=False, max_len=256)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return fx.write_gguf(path, cfg, fx.hf_weights(cfg, seed=3), types=TYPES, tokenizer=_tokenizer())


@contextlib.contextmanager
def counting_compiles():
  """Counts XLA compilations (backend compiles, cache reads included) inside the block."""
  seen: list[str] = []

  def listen(event, secs, **kwargs):
    if event == BACKEND_COMPILE:
      seen.append(kwargs.get("fun_name", "?"))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


# ------------------------------------------------------------------ the compilation cache


def _cli(gguf: Path, cache_home: Path) -> tuple[dict, str]:
  """`python -m infer --timings` in a fresh process with its caches under `cache_home`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("LMJAX_", "JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env.update(XDG_CACHE_HOME=str(cache_home), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  run = subprocess.run(
      [sys.executable, "-m", "infer", "--model", str(gguf), "--chat", "the cat",
       "--max-new-tokens", "6", "--no-stream", "--timings"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  line = [x for x in run.stderr.splitlines() if x.startswith("timings: ")]
  assert len(line) == 1, run.stderr[-3000:]
  return json.loads(line[0][len("timings: "):]), run.stdout


@pytest.mark.slow
def test_a_second_process_reads_every_executable_from_the_cache(gguf_file, tmp_path):
  """The command line turns the cache on by default; the second run compiles nothing (so no
  per-run constant is baked into any executable), and answers the same."""
  first, out1 = _cli(gguf_file, tmp_path)
  assert first["executables"] >= 1 and first["cache_hits"] == 0
  assert first["process_compiled"] == first["process_executables"] >= first["executables"]
  cached = sorted(p.name for p in (tmp_path / "lmjax" / "jax-compile").iterdir()
                  if p.name.endswith("-cache"))
  assert any(n.startswith("jit__run") for n in cached), cached  # the decode loop itself
  assert len(list((tmp_path / "lmjax" / "weights").glob("*.safetensors"))) == 1
  second, out2 = _cli(gguf_file, tmp_path)
  assert second["process_compiled"] == 0 and second["process_executables"] >= 1
  assert second["cache_hits"] == second["executables"] >= 1  # the decode loop among them
  assert out2 == out1 and "=== prompt 0, sample 0" in out1


@pytest.fixture
def restored_jax_cache_config():
  """Puts JAX's compilation-cache settings back after a test that enables the cache."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size",
           "jax_persistent_cache_min_compile_time_secs", "jax_enable_compilation_cache")
  saved = {n: getattr(jax.config, n) for n in names}
  yield
  cc.reset_cache()
  for n, v in saved.items():
    jax.config.update(n, v)


def test_enable_follows_its_arguments_and_environment(tmp_path, monkeypatch,
                                                      restored_jax_cache_config):
  from lmjax import compilation_cache as cc
  before = jax.config.jax_compilation_cache_dir
  for off in ("0", "off", "False"):
    monkeypatch.setenv(cc.ENV, off)
    assert cc.enable() is None
    assert jax.config.jax_compilation_cache_dir == before
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.setenv(cc.ENV, "1")
  assert cc.enable() == (tmp_path / "xdg" / "lmjax" / "jax-compile").resolve()
  monkeypatch.setenv(cc.ENV, str(tmp_path / "env"))
  monkeypatch.setenv(cc.ENV_MAX_BYTES, "12345")
  assert cc.enable() == (tmp_path / "env").resolve()
  assert jax.config.jax_compilation_cache_dir == str((tmp_path / "env").resolve())
  assert jax.config.jax_compilation_cache_max_size == 12345
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert (tmp_path / "env").stat().st_mode & 0o077 == 0  # the owner's alone
  monkeypatch.delenv(cc.ENV)
  monkeypatch.delenv(cc.ENV_MAX_BYTES)
  assert cc.enable() == (tmp_path / "xdg" / "lmjax" / "jax-compile").resolve()
  assert jax.config.jax_compilation_cache_max_size == cc.DEFAULT_MAX_BYTES
  assert cc.enable(tmp_path / "arg", max_bytes=10**6) == (tmp_path / "arg").resolve()
  with pytest.raises(ValueError, match="max_bytes=0 must be an int >= 1"):
    cc.enable(tmp_path, max_bytes=0)
  monkeypatch.setenv(cc.ENV_MAX_BYTES, "lots")
  with pytest.raises(ValueError, match="LMJAX_COMPILATION_CACHE_MAX_BYTES='lots' is not"):
    cc.enable(tmp_path)


# ---------------------------------------------------------------------- compiling less


@pytest.fixture(scope="module")
def causal():
  cfg = tiny("causal", max_len=256)
  model = lmjax.CausalLM(cfg)
  return model, random_params(model, (jnp.ones((1, 4), jnp.int32),), 1)


def test_max_new_tokens_and_prompt_length_within_their_buckets_do_not_recompile(causal):
  model, p = causal
  short, longer = [5, 9, 3, 7, 11], [5, 9, 3, 7, 11, 4, 8, 2, 6, 10, 12, 13, 3, 5]  # bucket 16
  first = infer.generate(model, p, [short], max_new_tokens=8, ignore_eos=True)
  with counting_compiles() as compiled:
    more = infer.generate(model, p, [short], max_new_tokens=60, ignore_eos=True)
    other = infer.generate(model, p, [longer], max_new_tokens=45, ignore_eos=True)
    steps = list(infer.stream(model, p, [short], max_new_tokens=8, ignore_eos=True))
    steps2 = list(infer.stream(model, p, [longer], max_new_tokens=50, ignore_eos=True))
  streamed = [s for s in compiled if "_start" in s or "_step" in s]
  assert [s for s in compiled if "_run" in s] == []
  assert len(streamed) == 2  # stream's own two functions, once, for both lengths
  # The same numbers as a loop compiled for each: greedy runs extend each other.
  assert more.tokens[0][:8] == first.tokens[0] and len(more.tokens[0]) == 60
  assert np.stack([s.tokens for s in steps], axis=1).tolist() == first.tokens
  assert [int(s.tokens[0]) for s in steps2][:45] == other.tokens[0]
  # Crossing a bucket does compile (the counter sees compiles).
  with counting_compiles() as compiled:
    infer.generate(model, p, [short], max_new_tokens=65, ignore_eos=True)
    infer.generate(model, p, [longer + [3, 4, 5]], max_new_tokens=8, ignore_eos=True)
  assert len([s for s in compiled if "_run" in s]) == 2


def test_the_cache_is_sized_from_the_buckets(causal):
  model, _ = causal
  plans = {decode.prepare(model, [[3] * n], max_new_tokens=m).plan
           for n in (1, 9, 16) for m in (1, 30, 64)}
  assert len(plans) == 1
  (plan,) = plans
  assert (plan.prompt_len, plan.buffer, plan.cache_len) == (16, 64, 128)
  # At most max_len (rounded to the multiple) and never less than the padded prompt.
  near = decode.prepare(model, [[3] * 200], max_new_tokens=56).plan
  assert (near.prompt_len, near.cache_len) == (256, 256)


# ------------------------------------------------------------ the converted-weights cache


def _equal_trees(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("packed,dtype,scan", [(None, "float32", False),
                                               (None, "bfloat16", True),
                                               ("float32", "float32", False),
                                               ("bfloat16", "float32", True)])
def test_weights_cache_gives_the_params_of_a_fresh_load(gguf_file, tmp_path, monkeypatch,
                                                        packed, dtype, scan):
  kw = dict(dtype=dtype, scan_layers=scan)
  cfg, fresh, _ = lmjax.load_pretrained(gguf_file, **kw)
  if packed is not None:
    fresh = lmjax.packed.pack(lmjax.model_for(cfg), fresh, packed)
  folder = tmp_path / "weights"
  _, first, _ = lmjax.load_pretrained(gguf_file, packed=packed, weights_cache=folder, **kw)
  (entry,) = folder.glob("*.safetensors")
  assert entry.name.startswith(weights_cache.file_sha256(gguf_file))
  def refuse(*args, **kwargs):
    raise AssertionError("converted again instead of read from the cache")
  monkeypatch.setattr(pretrained, "build_params", refuse)
  got_cfg, cached, tok = lmjax.load_pretrained(gguf_file, packed=packed, weights_cache=folder,
                                               **kw)
  assert got_cfg == cfg and tok is not None
  for got in (first, cached):
    assert isinstance(got, lmjax.packed.PackedParams) == (packed is not None)
    if packed is not None:
      assert (got.fmt, got.packed) == (fresh.fmt, fresh.packed)
      got, want = got.tree, fresh.tree
    else:
      want = fresh
    _equal_trees(got, want)


def test_weights_cache_is_keyed_checked_and_never_fatal(gguf_file, tmp_path, monkeypatch):
  folder = tmp_path / "weights"
  cfg, want, _ = lmjax.load_pretrained(gguf_file)
  lmjax.load_pretrained(gguf_file, weights_cache=folder)
  lmjax.load_pretrained(gguf_file, weights_cache=folder, dtype="bfloat16")
  lmjax.load_pretrained(gguf_file, weights_cache=folder, packed="float32")
  assert len(list(folder.glob("*.safetensors"))) == 3  # one per dtype / layout
  entry = folder / weights_cache._cache_name(gguf_file, cfg, None)
  # A damaged file: a warning, then the params converted afresh (and the file rewritten).
  entry.write_bytes(b"\x08" + b"\0" * 7 + b"garbage!")
  with pytest.warns(UserWarning, match="weights cache: cannot read"):
    _, got, _ = lmjax.load_pretrained(gguf_file, weights_cache=folder)
  _equal_trees(got, want)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, got, _ = lmjax.load_pretrained(gguf_file, weights_cache=folder)
  _equal_trees(got, want)
  # Made for another config (what an older lmjax might have written): not used.
  monkeypatch.setattr(weights_cache, "_config_text", lambda c: "another config")
  monkeypatch.setattr(pretrained, "build_params", lambda *a, **k: {"converted": jnp.zeros(1)})
  _, got, _ = lmjax.load_pretrained(gguf_file, weights_cache=folder)
  assert set(got) == {"converted"}
  monkeypatch.undo()
  # Off: False, or $LMJAX_WEIGHTS_CACHE=0 even when asked for (True); None: only the variable.
  monkeypatch.delenv(weights_cache.WEIGHTS_CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert weights_cache.weights_cache_folder(False) is None
  assert weights_cache.weights_cache_folder(None) is None
  assert weights_cache.weights_cache_folder(True) == tmp_path / "xdg" / "lmjax" / "weights"
  monkeypatch.setenv(weights_cache.WEIGHTS_CACHE_ENV, "0")
  assert weights_cache.weights_cache_folder(True) is None
  monkeypatch.setenv(weights_cache.WEIGHTS_CACHE_ENV, str(tmp_path / "w2"))
  assert weights_cache.weights_cache_folder(None) == tmp_path / "w2"
  # The size bound: the least recently used files go first.
  monkeypatch.setenv(weights_cache.WEIGHTS_CACHE_MAX_BYTES_ENV, "1")
  lmjax.load_pretrained(gguf_file, weights_cache=folder, packed="bfloat16")
  assert [p.name for p in folder.glob("*.safetensors")] == [
      weights_cache._cache_name(gguf_file, cfg, "bfloat16")]


def test_packing_at_load_from_a_folder_and_its_errors(gguf_file, tmp_path):
  """A Hugging Face folder packs at load too (no weights cache: its tensors are floats)."""
  cfg, params, tok = lmjax.load_pretrained(gguf_file)
  folder = lmjax.save_pretrained(cfg, params, tok, tmp_path / "hf")
  _, got, _ = lmjax.load_pretrained(folder, packed="bfloat16", weights_cache=tmp_path / "w")
  want = lmjax.packed.pack(lmjax.model_for(cfg), params, "bfloat16")
  assert (got.fmt, got.packed) == (want.fmt, want.packed)
  _equal_trees(got.tree, want.tree)
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match=r"packed='int8' is not a packed format; formats: "
                                       r"\('bfloat16', 'float32'\)"):
    lmjax.load_pretrained(gguf_file, packed="int8")
  with pytest.raises(ValueError, match="give a mesh or packed, not both"):
    lmjax.load_pretrained(gguf_file, packed="float32",
                          mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
