"""The command line: presets build and run (shrunk) end to end; `--set` errors are clear."""

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import checkpoint as layout
from lmjax import tokenizer as tk
from tests.train.trainer_util import SHRINK, data_dirs, tiny_sets, train_losses  # noqa: F401
from train import config as config_lib
from train import pretrain, report


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_presets_construct_and_validate(name):
  config = config_lib.preset(name)
  assert config.model.max_len >= config.data.seq_len
  n = lmjax.count_params(config.model)  # The model builds (abstractly).
  assert n > 1e6
  if name == "gpt2-124m":
    assert n == 124_439_808 and config.data.source == "tfds:lm1b"
  expected = {"bert-base": "masked_lm", "transformer-base": "span_corruption"}.get(
      name, "causal_lm")
  assert config.data.objective == expected
  json.dumps(config.to_dict())  # config.json is plain JSON.


PROMPTS = ["ROMEO:", "To be, or <mask> to be"]


@pytest.mark.parametrize("objective", sorted(SHRINK))
def test_preset_shrunk_runs_two_steps(objective, data_dirs, tmp_path, capsys):  # noqa: F811
  preset = SHRINK[objective][0]
  sets = tiny_sets(data_dirs, objective, steps=2,
                   extra=[f"report.prompts={json.dumps(PROMPTS)}", "report.max_new_tokens=4"])
  rc = pretrain.main(["--config", preset, "--workdir", str(tmp_path), "--set", *sets])
  out, err = capsys.readouterr()
  assert rc == 0, err
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
  # The closing line names everything the work dir holds.
  closing = out.strip().splitlines()[-1]
  held = sorted(p.name + ("/" if p.is_dir() else "") for p in tmp_path.iterdir())
  assert {"report.json", "tokenizer.model", "config.json", "checkpoints/"} <= set(held)
  assert closing == f"wrote {tmp_path}: {', '.join(held)}"
  # Every objective reports its prompts (checked against a direct computation).
  assert list(report["samples"]) == PROMPTS
  check_prompt_report(objective, report, tmp_path)
  heading = {"causal_lm": "samples (infer.generate with infer.sampling.TopP):",
             "masked_lm": "mask fills (argmax of the MaskedLM at each <mask>):",
             "span_corruption": "span fills (infer.generate with infer.sampling.Greedy):"}
  assert heading[objective] in out


def check_prompt_report(objective, report, workdir):
  cfg, params, tok = layout.load_run(workdir)
  specials = [0, 1, 2, 3, tok.mask_id, *tok.sentinel_ids]
  if objective == "causal_lm":
    assert report["sample_kind"] == "continuation"
    assert all(isinstance(t, str) for t in report["samples"].values())
  elif objective == "masked_lm":
    assert report["sample_kind"] == "fill"
    # A prompt without <mask> gets a middle span masked, shown in the input, filled in.
    assert "<mask>" in report["sample_inputs"]["ROMEO:"]
    assert "<mask>" not in report["samples"]["ROMEO:"] and report["fills"]["ROMEO:"]
    # The written <mask>: the argmax over non-special tokens of the MaskedLM (unpadded here).
    prompt = PROMPTS[1]
    ids = [tok.bos_id, *tok.encode(prompt), tok.eos_id]
    at = ids.index(tok.mask_id)
    logits = np.array(lmjax.MaskedLM(cfg).apply({"params": params}, jnp.asarray([ids])))
    logits[..., specials] = -np.inf
    best = int(logits[0, at].argmax())
    assert report["fills"][prompt] == [tok.decode([best])]
    assert report["samples"][prompt] == tok.decode(ids[:at] + [best] + ids[at + 1:])
    assert report["sample_inputs"][prompt] == tok.decode(ids)
  else:
    assert report["sample_kind"] == "spans"
    # Greedy decoding recomputed without a cache: encoder input = prompt, first sentinel, eos.
    model = lmjax.Seq2SeqLM(cfg)
    for prompt in PROMPTS:
      enc = [*tok.encode(prompt), tok.sentinel_ids[0], tok.eos_id]
      new = greedy_recompute(model, params, enc, 4, tok)
      assert report["samples"][prompt] == tok.decode(new)
      assert report["sample_inputs"][prompt] == tok.decode(enc)


def greedy_recompute(model, params, enc, steps, tok):
  """Greedy decoding of a Seq2SeqLM without a cache: the whole decoder input each step (padded
  on the right to one length: the decoder is causal, so the padding changes nothing before)."""
  apply = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
  dec, new = [tok.bos_id], []
  for _ in range(steps):
    padded = np.zeros((1, steps + 1), np.int32)
    padded[0, :len(dec)] = dec
    nxt = int(np.argmax(apply(params, jnp.asarray([enc]), jnp.asarray(padded))[0, len(dec) - 1]))
    if nxt == tok.eos_id:
      break
    new.append(nxt)
    dec.append(nxt)
  return new


def test_seq2seq_report_generates_from_the_prompt():
  """seq2seq: the encoder reads the prompt and EOS (as in training); the output is greedy, the
  same as a no-cache recompute; a prompt past the context is refused before any compute."""
  text = "\n\n".join(f"thou art the king {i} and queen of night" for i in range(50))
  tok = tk.train_tokenizer([text], tk.TokenizerConfig(vocab_size=300, num_sentinels=4),
                           use_cache=False)
  cfg = lmjax.TransformerConfig(vocab_size=300, model_dim=32, num_heads=2, ffn_dim=64,
                                num_encoder_layers=1, num_decoder_layers=1, max_len=16)
  model = lmjax.Seq2SeqLM(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                               jnp.ones((1, 4), jnp.int32))["params"]
  # Weights far from the small init, so the output depends on every encoder token.
  params = jax.tree.map(lambda x: x * 8.0, params)
  rc = config_lib.ReportConfig(prompts=("thou art", "the king and queen"), max_new_tokens=5)
  report.check_prompts(model, tok, "seq2seq", rc)
  out = report.prompt_report(model, params, tok, "seq2seq", rc)
  assert out["sample_kind"] == "output" and out["sampler"].endswith("Greedy")
  for prompt in rc.prompts:
    new = greedy_recompute(model, params, [*tok.encode(prompt), tok.eos_id],
                           rc.max_new_tokens, tok)
    assert out["samples"][prompt] == tok.decode(new)
  long = config_lib.ReportConfig(prompts=("thou art the king " * 8,), max_new_tokens=5)
  with pytest.raises(ValueError, match=r"report.prompts=.*model.max_len=16: prompt 0 has \d+ "
                                       "tokens, longer than the model's context"):
    report.check_prompts(model, tok, "seq2seq", long)


@pytest.mark.parametrize("sets, message", [
    # Passes the config's bound (bos + 1 token + 8 <= 32), but not with the real tokenizer.
    (['report.prompts=["ROMEO: O, she doth teach the torches to burn bright!"]',
      "report.max_new_tokens=8"],
     r"report.prompts=.* with report.max_new_tokens=8 and model.max_len=32: prompt 0 \(\d+ "
     r"tokens\) \+ max_new_tokens=8 passes the model's context"),
    (["train.eval_split=test"], r"no split 'test'; it has \['train', 'validation'\]"),
])
def test_what_needs_the_tokenizer_or_data_fails_before_step_0(sets, message, data_dirs,  # noqa: F811
                                                              tmp_path, capsys):
  workdir = tmp_path / "run"
  rc = pretrain.main(["--workdir", str(workdir), "--set", *tiny_sets(data_dirs, extra=sets)])
  assert rc == 1
  assert re.search(message, capsys.readouterr().err)
  # Refused before step 0: nothing trained or written (the checkpoint manager, made first,
  # leaves its empty folder).
  assert [p.name for p in workdir.iterdir()] == ["checkpoints"]
  assert not list((workdir / "checkpoints").iterdir())


def test_resume_refusals_say_what_to_do(data_dirs, tmp_path, capsys):  # noqa: F811
  workdir = tmp_path / "demo"
  sets = tiny_sets(data_dirs, steps=2)
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets]) == 0
  capsys.readouterr()
  # The worker count is part of the data position: refused by name (not an opaque mismatch).
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets, "data.num_workers=1"]) == 1
  err = capsys.readouterr().err
  assert "data.num_workers: saved 0, now 1" in err
  # Another model in the same work dir (the README's --set example after the demo ran): the
  # keys that differ, and the two ways on.
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets,
                        "model.num_decoder_layers=3"]) == 1
  err = capsys.readouterr().err
  assert "model.num_decoder_layers: saved 2, now 3" in err
  assert (f"hint: add --workdir {workdir}-2 to start a new run with these settings; the run in "
          f"{workdir} continues only with the settings it was saved with.") in err
  assert layout.saved_steps(workdir) == [2]


def test_verbose_flag_turns_on_info_logs(tmp_path):
  train_log = logging.getLogger("train")
  assert pretrain._parser().parse_args(["-v"]).verbose
  try:
    assert pretrain.main(["-v", "--set", "train.steps=ten"]) == 2
    assert train_log.level == logging.INFO
    assert pretrain.main(["--set", "train.steps=ten"]) == 2
    assert train_log.level == logging.NOTSET
  finally:
    train_log.setLevel(logging.NOTSET)


def test_demo_is_the_default(monkeypatch):
  config, workdir = pretrain.parse_args([])
  assert config == config_lib.preset("demo")
  assert workdir == "./runs/demo"


@pytest.mark.parametrize("item, message", [
    ("train.stpes=3", r"unknown config key 'train.stpes': 'train' has keys \[.*'steps'"),
    ("modle.model_dim=3", r"unknown config key 'modle.model_dim': the run config has keys "
                          r"\['checkpoint', 'data', 'eval', 'mesh', 'model'"),
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
