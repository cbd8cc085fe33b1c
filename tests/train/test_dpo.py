"""`python -m train.dpo` on a tiny base: log 2 at the start, every policy param trained, bitwise
resume after a crash (the reference read again from the base), precomputed reference log-probs,
the loss type and beta reach the loss, and bad settings fail."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import checkpoint as layout
from tests.train import preference_fixtures as pf
from tests.train.trainer_util import data_dirs, metrics, train_losses  # noqa: F401
from train import dpo
from train import preference_data as pd

ROWS = [{"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"},
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello there"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": "the cat sat on the mat", "rejected": "the cat ate the mat"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return pf.save_base(tmp_path_factory.mktemp("base") / "tiny", num_decoder_layers=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
  path.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(ROWS * 8)))
  return path


def _config(base, data, *sets):
  return pf.config(dpo.JOB, base, f"jsonl:{data}", "data.seq_len=64", "data.batch_size=8",
                   "data.heldout_fraction=0.2", "optimizer.learning_rate=1e-2", *sets)


@pytest.fixture(scope="module")
def whole(data_dirs, base, data, tmp_path_factory):  # noqa: F811
  """Four steps, checkpoints at steps 2 and 4: its config, result and run dir."""
  c = _config(base, data, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2")
  workdir = tmp_path_factory.mktemp("dpo") / "whole"
  return c, dpo.run(c, workdir), workdir


def test_dpo_starts_at_log_2_and_trains_every_policy_param(whole, base):
  _, out, workdir = whole
  first = [m for m in metrics(workdir) if m.get("step") == 1 and "loss" in m][0]
  assert abs(first["loss"] - np.log(2)) < 1e-5  # policy == reference at step 0
  after, before = out["validation"], out["before"]["heldout"]
  assert after["loss"] < before["loss"] and after["margin"] > before["margin"]
  _, start, _ = lmjax.load_pretrained(str(base))
  _, trained, _ = layout.load_run(workdir)
  same = [jax.tree_util.keystr(p) for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(trained), jax.tree.leaves(start))
      if np.array_equal(np.asarray(a), np.asarray(b))]
  assert not same, f"params that did not change: {same}"


def test_resume_after_a_crash_is_bitwise(whole, tmp_path):
  # The run as a crash after step 2's checkpoint leaves it: step 4's checkpoint is gone.
  c, _, workdir = whole
  crashed = tmp_path / "crashed"
  shutil.copytree(workdir, crashed)
  assert layout.saved_steps(crashed) == [2, 4]
  shutil.rmtree(layout.checkpoint_dir(crashed) / "4")
  out = dpo.run(c, crashed)
  assert out["step"] == 4 and layout.saved_steps(crashed) == [2, 4]
  assert {"event": "resume", "step": 2} in metrics(crashed)
  _, want, _ = layout.load_run(workdir)
  _, resumed, _ = layout.load_run(crashed)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_precomputed_reference_log_probs_give_the_same_run(whole, tmp_path):
  # The reference's log-probs computed once before training (one pair per row, not packed)
  # instead of a reference forward each step: the same losses and held-out figures.
  c, out, workdir = whole
  pre = dpo.run(dataclasses.replace(c, dpo=dataclasses.replace(c.dpo, precompute_reference=True)),
                tmp_path / "pre")
  np.testing.assert_allclose(list(train_losses(tmp_path / "pre").values()),
                             list(train_losses(workdir).values()), rtol=1e-4)
  for k in ("loss", "accuracy", "margin", "chosen", "rejected"):
    np.testing.assert_allclose(pre["validation"][k], out["validation"][k], rtol=1e-3, atol=1e-5)


class Fixed:
  """A stand-in model whose logits are its params."""

  def apply(self, variables, *args, **kwargs):
    return variables["params"]


@pytest.mark.parametrize("loss_type,beta,want", [("sigmoid", 0.5, np.log(2.0)),
                                                 ("ipo", 0.25, (1 / (2 * 0.25)) ** 2)])
def test_the_loss_type_and_beta_reach_the_loss(base, data, loss_type, beta, want):
  # At policy == reference, DPO is log 2 and IPO is (1 / (2 beta))^2 whatever the pair.
  c = _config(base, data, f"dpo.loss_type={loss_type}", f"dpo.beta={beta}")
  _, _, tok = lmjax.load_pretrained(str(base))
  ex, _ = pd.encode_rows([pd.Row(r, f"row {i}") for i, r in enumerate(ROWS)], tok, 64,
                         shift=True)
  batch = {k: jnp.asarray(v) for k, v in pd.pad_pairs(ex, 64).items()}
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64, 96)), jnp.float32)
  loss, n, _ = dpo.JOB.loss(c)(Fixed(), {"policy": logits, "reference": logits}, batch,
                               jax.random.key(0), False)
  assert float(n) == 3
  np.testing.assert_allclose(float(loss) / 3, want, rtol=1e-6)


def test_bad_settings_fail(base, data, tmp_path, capsys):
  assert dpo.main(["--model", str(base), "--data", f"jsonl:{data}", "--workdir",
                   str(tmp_path / "x"), "--set", "dpo.loss_type=kto"]) == 2
  assert "dpo.loss_type" in capsys.readouterr().err
  assert dpo.main(["--model", str(base), "--data", f"jsonl:{data}", "--workdir",
                   str(tmp_path / "x"), "--set", "dpo.beta=0"]) == 2
  assert "dpo.beta" in capsys.readouterr().err
