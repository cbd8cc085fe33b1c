"""Best-of-N with a reward model: one batched forward picks the candidate that each candidate
scored alone (unpadded) ranks highest; the command line's --best-of N --reward-model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from infer import __main__ as cli
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg = fx.tiny_config(max_len=64, num_decoder_layers=1)
  tok = fx.byte_level_tokenizer()
  policy = lmjax.CausalLM(cfg)
  pparams = random_params(policy, (jnp.ones((1, 4), jnp.int32),), 0)
  rm = lmjax.RewardModel(cfg)
  rparams = random_params(rm, (jnp.ones((1, 4), jnp.int32),), 1)
  root = tmp_path_factory.mktemp("bon")
  lmjax.save_pretrained(cfg, pparams, tok, root / "policy")
  lmjax.save_pretrained(cfg, rparams, tok, root / "rm")
  return cfg, tok, policy, pparams, rm, rparams, root


def test_best_of_n_keeps_the_highest_reward_in_one_forward(setup):
  cfg, tok, policy, pparams, rm, rparams, _ = setup
  scorer = infer.RewardScorer(rm, rparams, tok)
  prompts = ["the cat", "hello world"]  # as many tokens: fewer shapes to compile
  kw = dict(tokenizer=tok, max_new_tokens=6, sampler=infer.sampling.TopP(p=1.0, temperature=1.0),
            seed=[3, 4])
  best = infer.generate(policy, pparams, prompts, best_of=4, scorer=scorer, **kw)
  assert scorer.calls == 1  # all 8 candidates in one forward
  every = infer.generate(policy, pparams, prompts, num_samples=4, **kw)
  forward = jax.jit(lambda t: rm.apply({"params": rparams}, t))  # one sequence, no padding
  for i in range(len(prompts)):
    ids = every.prompt_tokens[i]
    alone = [float(forward(jnp.asarray([list(ids) + every.tokens[i * 4 + j]]))[0])
             for j in range(4)]
    j = int(np.argmax(alone))
    assert best.tokens[i] == every.tokens[i * 4 + j]
    np.testing.assert_allclose(best.scores[i], alone[j], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="RewardScorer needs an lmjax.RewardModel"):
    infer.RewardScorer(policy, pparams, tok)


def test_cli_best_of_with_a_reward_model(setup, capsys):
  *_, root = setup
  assert cli.main(["--model", str(root / "policy"), "--prompt", "the cat", "--best-of", "3",
                   "--reward-model", str(root / "rm"), "--max-new-tokens", "4",
                   "--temperature", "1.0", "--no-stream"]) == 0
  out = capsys.readouterr().out
  assert "reward " in out and out.count("=== prompt") == 1
  with pytest.raises(SystemExit):
    cli.main(["--model", str(root / "policy"), "--prompt", "x", "--reward-model",
              str(root / "rm")])
  with pytest.raises(SystemExit):  # a policy given as the reward model
    cli.main(["--model", str(root / "policy"), "--prompt", "x", "--best-of", "2",
              "--reward-model", str(root / "policy"), "--no-stream"])
