"""`lmjax.checkpoint`: `load_run` gives back exactly what the trainer saved (params, config,
tokenizer), skips a damaged newest step, and fails clearly; bare params folders round-trip."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import checkpoint as ckpt
from tests.lmjax.helpers import tiny, tokens
from tests.train.trainer_util import data_dirs, tiny_config  # noqa: F401
from train import data as data_lib
from train import pretrain


@pytest.fixture(scope="module")
def trained(data_dirs, tmp_path_factory):  # noqa: F811
  workdir = tmp_path_factory.mktemp("run")
  seen = {}

  def keep(step, state):  # The trainer's own params after each step.
    seen[step] = jax.device_get(state.params)

  config = tiny_config(data_dirs, steps=4, extra=["checkpoint.every=2"])
  pretrain.run(config, workdir, hooks=[keep])
  return workdir, seen, config


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), b)


def test_load_run_restores_exactly_what_the_trainer_saved(trained):
  workdir, seen, config = trained
  assert ckpt.saved_steps(workdir) == [2, 4]
  cfg, params, tok = ckpt.load_run(workdir)
  assert cfg == config.model
  _equal(params, seen[4])
  _, params2, _ = ckpt.load_run(workdir, step=2)
  _equal(params2, seen[2])
  text = "To be, or not to be, that is the question"
  assert tok.encode(text) == data_lib.build_tokenizer(config.data).encode(text)
  logits = lmjax.model_for(cfg).apply({"params": params}, jnp.asarray([tok.encode(text)]))
  assert logits.shape[-1] == cfg.vocab_size and np.isfinite(np.asarray(logits)).all()
  # Sharded over a mesh on request.
  mesh = lmjax.make_mesh(data=2, fsdp=2, tensor=2)
  _, sharded, _ = ckpt.load_run(workdir, mesh=mesh)
  assert sharded["embed"]["embedding"].addressable_shards[0].data.shape == (256, 16)
  _equal(sharded, seen[4])


def test_load_run_skips_a_damaged_newest_step(trained, tmp_path, caplog):
  import shutil

  workdir, seen, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  for f in (copy / "checkpoints" / "4" / ckpt.PARAMS).rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with caplog.at_level(logging.WARNING):
    _, params, _ = ckpt.load_run(copy)
  assert "checkpoint step 4 of" in caplog.text and "trying the previous step" in caplog.text
  _equal(params, seen[2])
  with pytest.raises(ValueError, match=r"no checkpoint of run .* restores:\n  step 4: "):
    ckpt.load_run(copy, step=4)


def test_load_run_errors(trained, tmp_path):
  workdir, _, _ = trained
  with pytest.raises(FileNotFoundError, match="no run folder"):
    ckpt.load_run(tmp_path / "nothing")
  with pytest.raises(ValueError, match=r"no checkpoint at step 3; saved steps are \[2, 4\]"):
    ckpt.load_run(workdir, step=3)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text('{"model": {"model_dim": 30, "num_heads": 4}}')
  with pytest.raises(ValueError, match="not a valid TransformerConfig: .*num_heads=4 must "
                                       "divide model_dim=30"):
    ckpt.load_run(tmp_path / "bad")


def test_save_and_restore_params_folder(tmp_path):
  cfg = tiny()
  model = lmjax.model_for(cfg)
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), tokens(0, 1, 8)))[
      "params"])()
  folder = ckpt.save_params(tmp_path / "p", params)
  _equal(ckpt.restore_params(folder, cfg), jax.device_get(params))
  with pytest.raises(FileExistsError, match="never overwrites"):
    ckpt.save_params(folder, params)
