"""`lmjax.RewardModel`: the reward is read at the last real token (padding and packing do not
move it), per-token values are causal prefix rewards, logical names, and the HF export
(golden/reward_seqcls.json: transformers' LlamaForSequenceClassification rewards of the same
folder, so CI without torch still checks the export)."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import heads
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params, tiny

GOLDEN = Path(__file__).parent / "golden" / "reward_seqcls.json"


@functools.cache
def _forward(cfg):
  """One compiled forward per config (and per shape): rewards `[B]` or values `[B, T]`."""
  model = lmjax.RewardModel(cfg)

  @functools.partial(jax.jit, static_argnames="per_token")
  def f(params, tokens, segment_ids=None, per_token=False):
    return model.apply({"params": params}, tokens, segment_ids=segment_ids, per_token=per_token)
  return f


def test_reward_is_read_at_the_last_real_token_whatever_the_padding_or_packing():
  cfg = tiny()
  params = random_params(lmjax.RewardModel(cfg), (jnp.ones((1, 4), jnp.int32),), 0)
  fwd = functools.partial(_forward(cfg), params)
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 97, 7), rng.integers(1, 97, 4)
  alone = [float(fwd(jnp.asarray(s[None]))[0]) for s in (a, b)]  # no padding: the reference
  # Per-token values are the rewards of each prefix alone (causal): a recompute without cache.
  values = np.asarray(fwd(jnp.asarray(a[None]), per_token=True))[0]
  np.testing.assert_allclose(values[[3, 6]], [float(fwd(jnp.asarray(a[None, :4]))[0]), alone[0]],
                             rtol=1e-5, atol=1e-6)
  # Right padding with other tokens than 0 (segment id 0 marks it).
  tokens, seg = heads.pad_rows([list(a), list(b)], 12)
  tokens[0, 7:], tokens[1, 4:] = 5, 9
  padded = fwd(jnp.asarray(tokens), jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(padded), alone, rtol=1e-5, atol=1e-6)
  # Packed: row 0 holds b then a (segments 1, 2) and a padding token; row 1 holds a alone.
  row = np.zeros((2, 12), np.int32)
  pseg = np.zeros((2, 12), np.int32)
  row[0, :4], row[0, 4:11], row[0, 11] = b, a, 7
  pseg[0, :4], pseg[0, 4:11] = 1, 2
  row[1, :7], pseg[1, :7] = a, 1
  vals = fwd(jnp.asarray(row), jnp.asarray(pseg), per_token=True)
  got = np.asarray(heads.segment_rewards(vals, jnp.asarray(pseg), 2))
  np.testing.assert_allclose(got[0], alone[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], [alone[0], 0.0], rtol=1e-5, atol=1e-6)
  last = np.asarray(fwd(jnp.asarray(row), jnp.asarray(pseg)))  # the row's last real token
  np.testing.assert_allclose(last, [alone[0], alone[0]], rtol=1e-5, atol=1e-6)


def test_the_head_has_logical_names_and_the_trunk_is_the_lms():
  cfg = tiny()
  ones = jnp.ones((1, 4), jnp.int32)
  boxed = jax.eval_shape(lambda: lmjax.RewardModel(cfg).init(jax.random.key(0), ones)["params"])
  assert boxed["score"].names == ("embed", "score")
  assert "lm_head" not in boxed and set(boxed) == {"embed", "decoder", "score"}
  lm = random_params(lmjax.CausalLM(cfg), (ones,), 0)
  rm = heads.reward_params_from_lm(lm, cfg, jax.random.key(1))
  assert rm["embed"] is lm["embed"] and rm["decoder"] is lm["decoder"]  # not copies
  assert rm["score"].shape == (cfg.model_dim, 1) and 0 < float(jnp.std(rm["score"])) < 0.05
  with pytest.raises(ValueError, match="already a reward model"):
    heads.reward_params_from_lm(rm, cfg, jax.random.key(1))
  with pytest.raises(ValueError, match="reward model"):
    heads.check_lm_params(rm)


def test_transformers_loads_the_exported_reward_model(tmp_path):
  cfg = fx.tiny_config()
  params = random_params(lmjax.RewardModel(cfg), (jnp.ones((1, 4), jnp.int32),), 3)
  folder = lmjax.save_pretrained(cfg, params, fx.byte_level_tokenizer(), tmp_path / "rm")
  tokens = np.random.default_rng(4).integers(3, cfg.vocab_size, (3, 9)).astype(np.int32)
  ours = np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))
  # transformers reads the reward at the last token that is not the pad id: never the EOS a
  # reply ends with (this tokenizer's pad is its EOS), so the pad id written is the BOS.
  tok = fx.byte_level_tokenizer()
  hf_config = json.loads((folder / "config.json").read_text())
  assert hf_config["pad_token_id"] == tok.bos_id != tok.eos_id
  golden = json.loads(GOLDEN.read_text())
  np.testing.assert_array_equal(tokens, golden["tokens"])
  np.testing.assert_allclose(ours, golden["transformers"], rtol=1e-4, atol=1e-5)
  cfg2, back, _ = lmjax.load_reward_model(str(folder))
  assert cfg2 == cfg
  np.testing.assert_allclose(np.asarray(_forward(cfg)(back, jnp.asarray(tokens))), ours,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="is a reward model"):
    lmjax.load_pretrained(str(folder))
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
  assert type(hf).__name__ == "LlamaForSequenceClassification"
  ended = tokens.copy()
  ended[:, -1] = tok.eos_id  # replies end with the EOS: the reward is read there
  with torch.no_grad():
    theirs = hf(torch.tensor(np.r_[tokens, ended], dtype=torch.long)).logits[:, 0].numpy()
  ours_ended = np.asarray(_forward(cfg)(params, jnp.asarray(ended)))
  np.testing.assert_allclose(np.r_[ours, ours_ended], theirs, rtol=1e-4, atol=1e-5)
