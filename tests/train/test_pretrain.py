"""The command line: presets build and run (shrunk) end to end; `--set` errors are clear."""

import json

import pytest

import lmjax
from lmjax import checkpoint as layout
from tests.train.trainer_util import SHRINK, data_dirs, tiny_sets, train_losses  # noqa: F401
from train import config as config_lib
from train import pretrain


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_presets_construct_and_validate(name):
  config = config_lib.preset(name)
  assert config.model.max_len >= config.data.seq_len
  n = lmjax.count_params(config.model)  # The model builds (abstractly).
  assert n > 1e6
  if name == "gpt2-124m":
    assert n == 124_439_808 and config.data.source == "tfds:lm1b"
  expected = {"demo": "causal_lm", "gpt2-124m": "causal_lm", "bert-base": "masked_lm",
              "transformer-base": "span_corruption"}[name]
  assert config.data.objective == expected
  json.dumps(config.to_dict())  # config.json is plain JSON.


@pytest.mark.parametrize("objective", sorted(SHRINK))
def test_preset_shrunk_runs_two_steps(objective, data_dirs, tmp_path, capsys):  # noqa: F811
  preset = SHRINK[objective][0]
  sets = tiny_sets(data_dirs, objective, steps=2)
  rc = pretrain.main(["--config", preset, "--workdir", str(tmp_path), "--set", *sets])
  assert rc == 0, capsys.readouterr().err
  assert layout.saved_steps(tmp_path) == [2]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["data"]["objective"] == objective and saved["train"]["steps"] == 2
  assert lmjax.TransformerConfig.from_dict(saved["model"]).model_dim == 32
  assert sorted(train_losses(tmp_path)) == [1, 2]
  assert (tmp_path / "loss.png").stat().st_size > 0
  assert (tmp_path / "tokenizer.model").exists()
  assert list((tmp_path / "tensorboard").iterdir())
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["validation"]["tokens"] > 0


def test_demo_is_the_default(monkeypatch):
  config, workdir = pretrain.parse_args([])
  assert config == config_lib.preset("demo")
  assert workdir == "./runs/demo"


@pytest.mark.parametrize("item, message", [
    ("train.stpes=3", r"unknown config key 'train.stpes': 'train' has keys \[.*'steps'"),
    ("modle.model_dim=3", r"unknown config key 'modle.model_dim': the run config has keys "
                          r"\['checkpoint', 'data', 'mesh', 'model'"),
    ("train.steps=ten", r"train.steps must be an int, got 'ten'"),
    ("train.steps=1.5", r"train.steps must be an int, got '1.5'"),
    ("optimizer.learning_rate=fast", r"optimizer.learning_rate must be a float"),
    ("checkpoint.keep_best=maybe", r"checkpoint.keep_best must be a bool \(true/false\)"),
    ("train=3", r"'train' is a section, not a value; set one of its keys"),
    ("train.steps.x=3", r"'train.steps' is a value \(an int\), not a section"),
    ("model.num_heads=5", r"num_heads=5 must divide model_dim=192"),
    ("train.steps", r"--set expects key=value"),
    ("data.tokenizer.vocab_size=abc", r"data.tokenizer.vocab_size must be an int"),
])
def test_bad_overrides_are_clear_errors(item, message, tmp_path, capsys):
  with pytest.raises(ValueError, match=message):
    config_lib.apply_overrides(config_lib.preset("demo"), [item])
  assert pretrain.main(["--workdir", str(tmp_path / "w"), "--set", item]) == 2
  assert "error:" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()  # Nothing started.


def test_overrides_parse_types():
  c = config_lib.apply_overrides(config_lib.preset("demo"), [
      "train.steps=1_000", "optimizer.clip_norm=none", "optimizer.learning_rate=1e-3",
      "mesh.distributed=true", 'report.prompts=["a, b", "c"]', "model.dtype=bfloat16",
      "data.target_seq_len=none", "data.tokenizer.normalization.lowercase=yes"])
  assert c.train.steps == 1000 and c.optimizer.clip_norm is None
  assert c.optimizer.learning_rate == 1e-3 and c.mesh.distributed is True
  assert c.report.prompts == ("a, b", "c") and c.model.dtype == "bfloat16"
  assert c.data.tokenizer.normalization.lowercase is True
  assert config_lib.apply_overrides(c, ["report.prompts=x,y"]).report.prompts == ("x", "y")
  with pytest.raises(ValueError, match=r"TrainConfig.steps='5' must be an int"):
    config_lib.TrainConfig(steps="5")
