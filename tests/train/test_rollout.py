"""`train.rollout`: rows laid out for a learner (completion mask through the EOS, nothing after
it), the sampler's log-probs equal to a no-cache full forward, rollouts from the params as they
are now (a changed policy samples differently), and bad prompts refused before sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmjax
from tests.lmjax.helpers import random_params, tiny
from train import rollout
from train.trainer import Trainer

EOS = list(range(3, 12))  # many EOS ids, so most random rows stop early


def _setup():
  model = lmjax.CausalLM(tiny())
  return model, random_params(model, (jnp.ones((1, 8), jnp.int32),), 0)


def test_rows_masks_and_sampler_log_probs_match_a_full_forward():
  model, params = _setup()
  prompts = [[1, 20, 30, 40], [1, 50], [1, 60, 70]]
  ro = rollout.sample(model, params, prompts, num_samples=2, max_new_tokens=10, length=16,
                      seed=5, eos_id=EOS)
  assert ro.tokens.shape == (6, 16) and list(ro.prompt_index) == [0, 0, 1, 1, 2, 2]
  assert "eos" in ro.stop_reason
  for k, comp in enumerate(ro.completions):
    p = prompts[k // 2]
    n = len(p)
    assert ro.tokens[k, :n].tolist() == p and ro.prompt_mask[k].sum() == n
    on = np.flatnonzero(ro.completion_mask[k])
    assert on.tolist() == list(range(n, n + len(comp)))  # contiguous, right after the prompt
    if ro.stop_reason[k] == "eos":
      assert comp[-1] in EOS and not any(t in EOS for t in comp[:-1])  # through the EOS
    else:
      assert len(comp) == 10
    assert not ro.completion_mask[k, n + len(comp):].any()
    assert np.all(ro.log_probs[k][~ro.completion_mask[k]] == 0)
  # The KV-cached decoder's log-probs equal a teacher-forced forward over the whole rows.
  lp, _ = rollout.token_log_probs(model.apply({"params": params}, jnp.asarray(ro.tokens)),
                                  jnp.asarray(ro.tokens))
  np.testing.assert_allclose(np.where(ro.completion_mask, lp, 0), ro.log_probs, atol=2e-5)
  # By hand for one token: log_softmax of the logits before it.
  k, t = 0, len(prompts[0])
  logits = model.apply({"params": params}, jnp.asarray(ro.tokens[:1, :t]))[0, -1]
  z = np.asarray(logits, np.float64)
  want = z[ro.tokens[0, t]] - z.max() - np.log(np.exp(z - z.max()).sum())
  assert float(ro.log_probs[0, t]) == pytest.approx(float(want), abs=2e-5)


def test_the_rollout_samples_the_current_params():
  model, _ = _setup()
  x = jnp.ones((1, 8), jnp.int32)
  trainer = Trainer(model, lambda m, p, b, r, t: _pull(m, p, b), optax.sgd(1.0),
                    lmjax.make_mesh(1, 1, 1, devices=jax.devices()[:1]), init_inputs=(x,),
                    global_batch=2)
  state = trainer.init_state()
  prompts = [[1, 20, 30], [1, 40]]

  def sample(params):
    return rollout.sample(model, params, prompts, num_samples=2, max_new_tokens=8, seed=3,
                          eos_id=2)

  first = sample(state.params)
  np.testing.assert_array_equal(sample(state.params).tokens, first.tokens)  # same seed, same
  batch = {"inputs": np.full((2, 4), 7, np.int32)}
  for step in range(3):  # push every next token toward id 7
    state, _ = trainer.train_step(state, step, batch)
  after = sample(state.params)
  assert not np.array_equal(after.tokens, first.tokens)
  assert (after.tokens[after.completion_mask] == 7).mean() > 0.9


def _pull(model, params, batch):
  logits = model.apply({"params": params}, batch["inputs"])
  lp = jax.nn.log_softmax(logits, -1)[..., 7]
  return -jnp.sum(lp), jnp.float32(lp.size), {}


def test_bad_prompts_are_refused_before_sampling(monkeypatch):
  model, params = _setup()
  from infer import decode

  monkeypatch.setattr(decode, "generate", lambda *a, **k: pytest.fail("sampled"))
  with pytest.raises(ValueError, match="at most 6 tokens"):
    rollout.sample(model, params, [[1] * 7], max_new_tokens=10, length=16, eos_id=2)
  with pytest.raises(ValueError, match="at least one prompt"):
    rollout.sample(model, params, [], eos_id=2)


def test_step_seeds_differ_by_step_and_repeat():
  seeds = [rollout.step_seed(0, s) for s in range(50)]
  assert len(set(seeds)) == 50 and seeds == [rollout.step_seed(0, s) for s in range(50)]
  assert rollout.step_seed(1, 0) != seeds[0]
