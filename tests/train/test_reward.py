"""`python -m train.reward` on a tiny base with SmolLM2's tokenizer: one short run (shared by
the tests) learns held-out arithmetic pairs and changes every param; export to a
`LlamaForSequenceClassification` folder and back; bad input fails before training."""

import json

import jax
import numpy as np
import pytest

import lmjax
from lmjax import checkpoint as layout
from tests.train import preference_fixtures as pf
from tests.train.trainer_util import data_dirs  # noqa: F401
from train import arithmetic, dpo, reward

STEPS = 100


@pytest.fixture(scope="module")
def smol_base(tmp_path_factory):
  """A tiny random one-layer trunk with SmolLM2's real tokenizer (digits are tokens)."""
  tok = lmjax.convert.pretrained_tokenizer("smollm2-135m-instruct")
  return pf.save_base(tmp_path_factory.mktemp("base") / "smol", tok, vocab_size=49152,
                      num_decoder_layers=1)


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
  """Arithmetic pairs (`train.arithmetic`, one step, numbers up to 5): 640 train, 96 held out
  (the file's last 12%: `test` problems, disjoint from the train ones)."""
  def row(p):
    return {"prompt": p["question"], "chosen": " " + p["solution"],
            "rejected": " " + p["wrong_solution"]}
  path = tmp_path_factory.mktemp("arith") / "pairs.jsonl"
  train = [row(p) for p in arithmetic.problems(640, 0, "train", max_steps=1, max_value=5)]
  test = [row(p) for p in arithmetic.problems(96, 0, "test", max_steps=1, max_value=5)]
  path.write_text("".join(json.dumps(r) + "\n" for r in train + test))
  return path


def _config(base, source, *sets):
  return pf.config(reward.JOB, base, source, "data.seq_len=96", "data.batch_size=16",
                   "data.heldout_fraction=0.12", *sets)


@pytest.fixture(scope="module")
def trained(data_dirs, smol_base, arith, tmp_path_factory):  # noqa: F811
  """One short run: its config, result and run dir."""
  c = _config(smol_base, f"jsonl:{arith}", f"train.steps={STEPS}", "optimizer.learning_rate=3e-3",
              "optimizer.warmup_steps=8", f"optimizer.decay_steps={STEPS}")
  workdir = tmp_path_factory.mktemp("rm") / "run"
  return c, reward.run(c, workdir), workdir


def test_a_short_run_learns_held_out_arithmetic_pairs(trained):
  _, out, _ = trained
  before, after = out["before"]["heldout"], out["validation"]
  assert after["tokens"] >= 80  # held-out pairs
  assert before["accuracy"] < 0.65 and after["accuracy"] > 0.75, (before, after)
  assert after["margin"] > 0.3 and after["loss"] < before["loss"] - 0.1


def test_every_param_trains_and_the_export_round_trips(trained, smol_base, tmp_path):
  c, _, workdir = trained
  start = lmjax.heads.reward_params_from_lm(
      lmjax.load_pretrained(str(smol_base))[1], c.model, jax.random.key(c.train.seed))
  cfg, params, tok = lmjax.load_reward_model(str(workdir))
  same = [jax.tree_util.keystr(p) for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(start))
      if np.array_equal(np.asarray(a), np.asarray(b))]
  assert not same, f"params that did not change: {same}"
  # Export as a sequence-classification folder and read it back: the same rewards.
  folder = lmjax.save_pretrained(cfg, params, tok, tmp_path / "hf")
  hf = json.loads((folder / "config.json").read_text())
  assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
  cfg2, back, _ = lmjax.load_reward_model(str(folder))
  assert cfg2 == cfg
  tokens = np.asarray([tok.encode("2 + 3 = 5. The answer is 5.")], np.int32)
  forward = jax.jit(lambda p: lmjax.RewardModel(cfg).apply({"params": p}, tokens))
  np.testing.assert_allclose(np.asarray(forward(back)), np.asarray(forward(params)), rtol=1e-6)


def test_bad_input_fails_before_training(trained, smol_base, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
  assert reward.main(["--model", str(smol_base), "--data", f"jsonl:{bad}", "--workdir",
                      str(tmp_path / "r1"), "--set", "mesh.data=1", "data.seq_len=96"]) == 1
  assert "needs 'chosen' and 'rejected'" in capsys.readouterr().err
  same = tmp_path / "same.jsonl"
  same.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"}) + "\n")
  assert reward.main(["--model", str(smol_base), "--data", f"jsonl:{same}", "--workdir",
                      str(tmp_path / "r2"), "--set", "mesh.data=1", "data.seq_len=96"]) == 1
  assert "identical" in capsys.readouterr().err
  assert not layout.saved_steps(tmp_path / "r1") and not layout.saved_steps(tmp_path / "r2")
  # A reward run where a policy is expected, and a policy where a reward model is.
  _, _, run = trained
  assert dpo.main(["--model", str(run), "--data", "arithmetic", "--workdir",
                   str(tmp_path / "d"), "--set", "mesh.data=1", "data.seq_len=256"]) == 1
  assert "is a reward model" in capsys.readouterr().err
  with pytest.raises(ValueError, match="not a reward model"):
    lmjax.load_reward_model(str(smol_base))
  with pytest.raises(ValueError, match="is a reward model"):
    layout.load_run(run)
