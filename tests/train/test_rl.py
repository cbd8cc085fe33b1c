"""`train.rl` end to end on a test-sized verifiable task (`tests.train.rl_util`: 16-symbol
vocabulary, reward = share of "a"): GRPO raises the reward within a fixed number of steps; a
stopped and resumed run ends bitwise where the straight run did (rollout RNG included); PPO
and RLOO run their loop; bad input is refused before any rollout; a reward model's reward is
its own score of prompt + completion; a LoRA policy trains only its adapter, its KL taken to
the base (the same frozen arrays without the adapter)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import lmjax
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params
from tests.train import rl_util
from train import arithmetic, rl, rl_arithmetic, rl_data, rl_loss, rl_rewards, rollout
from train.peft_config import PEFTConfig
from train.rl_config import RLAlgoConfig, RLDataConfig


def _metrics(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward_and_resumes_bitwise(tmp_path):
  config = rl_util.tiny_config(tmp_path, "grpo", steps=6)
  straight = rl.run(config, tmp_path / "a", load_policy=rl_util.load_tiny)
  rewards = [m["reward"] for m in _metrics(tmp_path / "a")]
  assert len(rewards) == 6
  assert np.mean(rewards[-2:]) > rewards[0] + 0.25, rewards
  # Stopped after 3 steps, then resumed from its checkpoint: the same params, the same draws.
  rl.run(config, tmp_path / "b", load_policy=rl_util.load_tiny, stop_after=3)
  resumed = rl.run(config, tmp_path / "b", load_policy=rl_util.load_tiny)
  assert resumed["step"] == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
               jax.device_get(straight["state"].params))
  b = _metrics(tmp_path / "b")
  assert [m["reward"] for m in b] == rewards


@pytest.mark.parametrize("algorithm,extra", [
    ("ppo", {"updates_per_rollout": 2, "num_minibatches": 2, "beta": 0.05}),
    ("rloo", {"beta": 0.05})])
def test_ppo_and_rloo_steps(tmp_path, algorithm, extra):
  config = rl_util.tiny_config(tmp_path, algorithm, steps=2, **extra)
  rl.run(config, tmp_path / "run", load_policy=rl_util.load_tiny)
  m = _metrics(tmp_path / "run")
  assert len(m) == 2 and all(np.isfinite(x["loss"]) and np.isfinite(x["kl"]) for x in m)
  if algorithm == "ppo":
    assert "value_loss" in m[0]


def bad_count(prompts, completions, **_):
  return [0.0] * (len(completions) + 1)


def nan_reward(prompts, completions, **_):
  return [float("nan")] * len(completions)


def test_bad_input_is_refused_before_any_rollout(tmp_path, monkeypatch):
  monkeypatch.setattr(rollout, "sample", lambda *a, **k: pytest.fail("rolled out"))
  config = rl_util.tiny_config(tmp_path, "grpo", steps=1)
  for reward, match in [("python:tests.train.test_rl:bad_count", "returned 3 values for 2"),
                        ("python:tests.train.test_rl:nan_reward", "must be finite"),
                        ("python:tests.train.test_rl:missing", "has no function 'missing'"),
                        ("count_a", "python:module:function")]:
    with pytest.raises(ValueError, match=match):
      rl.run(config.__class__(**{**config.__dict__, "reward": reward}), tmp_path / "x",
             load_policy=rl_util.load_tiny)
  with pytest.raises(ValueError, match="num_generations=1: grpo needs >= 2"):
    RLAlgoConfig(algorithm="grpo", num_generations=1)
  with pytest.raises(ValueError, match="rl.beta=-0.1 must be >= 0"):
    RLAlgoConfig(beta=-0.1)
  short = rl_util.tiny_config(tmp_path, "grpo", steps=1, max_prompt_len=2)
  with pytest.raises(ValueError, match="prompt 0 has 4 tokens, more than rl.max_prompt_len=2"):
    rl.run(short, tmp_path / "y", load_policy=rl_util.load_tiny)
  assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_reward_model_reward_is_its_score_of_prompt_and_completion(tmp_path):
  cfg = fx.tiny_config(max_len=64, num_decoder_layers=1)
  tok = fx.byte_level_tokenizer()
  rm = lmjax.RewardModel(cfg)
  rparams = random_params(rm, (jnp.ones((1, 4), jnp.int32),), 1)
  lmjax.save_pretrained(cfg, rparams, tok, tmp_path / "rm")
  fns = rl_rewards.load(f"{tmp_path / 'rm'},python:tests.train.rl_util:count_a*0.5")
  prompts, completions = ["the cat", "the cat", "hello"], ["sat on a mat", "", "the dog ate"]
  total, parts = rl_rewards.score(fns, prompts, completions, {})
  forward = jax.jit(lambda t: rm.apply({"params": rparams}, t))  # one sequence, no padding
  # The reward model reads prompt + completion closed by its EOS (its end of turn).
  alone = np.array([float(forward(jnp.asarray([tok.encode(p) + tok.encode(c) + [tok.eos_id]]))[0])
                    for p, c in zip(prompts, completions)])
  np.testing.assert_allclose(parts["reward_model:rm"], alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total, alone + 0.5 * np.array([3 / 8, 0, 1 / 8]), rtol=1e-5)
  policy = lmjax.CausalLM(cfg)
  lmjax.save_pretrained(cfg, random_params(policy, (jnp.ones((1, 4), jnp.int32),), 0), tok,
                        tmp_path / "policy")
  with pytest.raises(ValueError, match="not a reward model"):
    rl_rewards.load(str(tmp_path / "policy"))


def test_lora_trains_only_the_adapter_against_the_base_as_reference(tmp_path):
  config = dataclasses.replace(
      rl_util.tiny_config(tmp_path, "grpo", steps=2, beta=0.1),
      peft=PEFTConfig(method="lora", rank=4, alpha=8.0, targets=("query", "value", "wo")))
  loop = rl.Loop(config, tmp_path / "run")
  loop.setup(rl_util.load_tiny)
  base, _ = rl_util.load_tiny(config, None)
  first = loop.step(0)
  assert first["kl"] == 0.0  # B = 0: the first rollout's policy is the base itself
  loop.step(1)
  adapter = jax.device_get(loop.state.params)
  names = {k[-1] for k in flatten_dict(adapter)}
  assert names == {"lora_a", "lora_b"}, names  # only the adapter trains
  assert any(np.abs(v).max() > 0 for k, v in flatten_dict(adapter).items() if k[-1] == "lora_b")
  # The base is frozen, held once: the reference is the same arrays without the adapter.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loop.trainer.frozen_params), base)
  p = loop.params()
  assert all(a is b for a, b in zip(jax.tree.leaves(p["policy"].base),
                                    jax.tree.leaves(p["reference"].base)))
  # The loss's KL (k3) is to the base: float64 numpy from plain forwards of the merged policy
  # and of the base.
  ro, total, _ = loop.rollout(5, range(4), loop.train_set)
  tokens, mask = ro.tokens, ro.completion_mask
  batch = {"tokens": tokens, "completion_mask": mask, "sampler_log_probs": ro.log_probs,
           "ref_log_probs": np.zeros(tokens.shape, np.float32),
           "advantages": np.zeros(tokens.shape, np.float32)}
  batch.update(jax.device_get(loop.score(p["policy"], p["reference"], None, tokens)))
  loss = jax.jit(lambda p, b: rl_loss.make_loss(config.rl)(loop.model, p, b, None, False))
  _, _, sums = loss(p, batch)
  model = lmjax.CausalLM(config.model)
  merged = lmjax.peft.merge(base, adapter, config.peft.spec())
  forward = jax.jit(lambda params: model.apply({"params": params}, tokens))

  def logp(params):
    lg = np.asarray(forward(params), np.float64)[:, :-1]
    lg = lg - lg.max(-1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
  d = logp(base) - logp(merged)  # log(ref / policy) on each predicted token
  k3 = (np.exp(d) - d - 1) * mask[:, 1:]
  assert k3.sum() > 1e-6
  np.testing.assert_allclose(float(sums["kl"]), k3.sum(), rtol=2e-3, atol=1e-7)


def test_arithmetic_prompts_with_a_worked_example_and_a_system_prompt(tmp_path):
  rows = rl_arithmetic.rows(3, "test", seed=1, max_value=9, few_shot=1)
  shot = arithmetic.problems(1, 1 + 7919, "train", max_steps=1, max_value=9)[0]
  probs = arithmetic.problems(3, 1, "test", max_steps=1, max_value=9)
  for row, p in zip(rows, probs):
    assert row["answer"] == p["answer"]
    assert row["prompt"] == [{"role": "user", "content": shot["prompt"]},
                             {"role": "assistant", "content": shot["solution"]},
                             {"role": "user", "content": p["prompt"]}]
  msgs = rl_data.with_system(rows[0]["prompt"], "Be brief.")
  assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[1:] == rows[0]["prompt"]
  assert rl_data.with_system(msgs, "Other.") == msgs  # a chat with its own system message
  assert rl_data.with_system("2+2?", None) == [{"role": "user", "content": "2+2?"}]
  with pytest.raises(ValueError, match="need data.chat_template=true"):
    RLDataConfig(arithmetic_few_shot=1, chat_template=False)
  with pytest.raises(ValueError, match="peft.method=prompt"):
    dataclasses.replace(rl_util.tiny_config(tmp_path), peft=PEFTConfig(method="prompt"))
