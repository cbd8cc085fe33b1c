"""Presets build and match published parameter counts; bad configs fail clearly."""

import jax
import pytest

import lmjax
from lmjax import attention_ops
from lmjax.counting import matmul_params


@pytest.mark.parametrize("name", sorted(lmjax.PRESETS))
def test_every_preset_builds_abstractly(name):
  cfg = lmjax.TransformerConfig.from_preset(name)
  n = lmjax.count_params(cfg)  # jax.eval_shape inside: no memory
  assert n > 0
  assert lmjax.flops_per_token(cfg, 512) > 6 * n * 0.5


def test_published_parameter_counts():
  # GPT-2 small with tied embeddings, biases, 1024 learned positions (Radford et al., 2019).
  assert lmjax.count_params(lmjax.TransformerConfig.from_preset("gpt2-124m")) == 124_439_808
  # SmolLM2-135M as published on its model card (tied embeddings).
  assert lmjax.count_params(lmjax.TransformerConfig.from_preset("smollm2-135m")) == 134_515_008
  # BERT-base encoder without the pooler is about 109M (Devlin et al., 2019): 108.9M with
  # token types; ours has no token-type table but an MLM head transform and output bias.
  bert = lmjax.count_params(lmjax.TransformerConfig.from_preset("bert-base"))
  assert abs(bert - 109e6) / 109e6 < 0.01
  # The base transformer of Vaswani et al. (2017) is quoted as 65M (vocab ~37k shared).
  base = lmjax.count_params(lmjax.TransformerConfig.from_preset("transformer-base"))
  assert abs(base - 65e6) / 65e6 < 0.05


def test_flops_per_token_matches_hand_count():
  cfg = lmjax.TransformerConfig.from_preset("gpt2-124m")
  d, f, v, l = 768, 3072, 50257, 12
  per_layer = 4 * d * d + 2 * d * f
  assert matmul_params(cfg) == l * per_layer + v * d
  assert lmjax.flops_per_token(cfg, 1024) == 6 * (l * per_layer + v * d) + 12 * l * 1024 * d


def test_overrides_and_roundtrip():
  cfg = lmjax.TransformerConfig.from_preset("tiny", num_decoder_layers=3)
  assert cfg.num_decoder_layers == 3
  assert lmjax.TransformerConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.resolved_head_dim == 16 and cfg.resolved_num_kv_heads == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_dim=30, num_heads=4), "num_heads=4 must divide model_dim=30"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
    (dict(activation="tanh"), "activation='tanh' is not allowed"),
    (dict(norm="batchnorm"), "norm='batchnorm'"),
    (dict(position="alibi"), "position='alibi'"),
    (dict(dtype="float8"), "dtype='float8'"),
    (dict(num_encoder_layers=0, num_decoder_layers=0), "num_encoder_layers > 0"),
    (dict(dropout_rate=1.0), "dropout_rate=1.0"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(remat_policy="sometimes"), "remat_policy='sometimes'"),
    (dict(attention="flashy"), "attention='flashy' is not allowed; choose one of ('reference', "
                               "'flash'"),
    (dict(attention=""), "attention='' is not allowed"),
])
def test_bad_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
    lmjax.TransformerConfig(**kwargs)


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown preset 'gpt5'.*presets are"):
    lmjax.TransformerConfig.from_preset("gpt5")
  with pytest.raises(ValueError, match=r"unknown TransformerConfig field\(s\) \['heads'\]"):
    lmjax.TransformerConfig.from_preset("tiny", heads=3)


def test_wrong_family_errors():
  cfg = lmjax.TransformerConfig.from_preset("bert-base", num_encoder_layers=1, model_dim=32,
                                            num_heads=2, ffn_dim=32, vocab_size=50)
  with pytest.raises(ValueError, match="CausalLM needs num_decoder_layers > 0"):
    jax.eval_shape(lambda: lmjax.CausalLM(cfg).init(jax.random.key(0),
                                                    jax.numpy.zeros((1, 4), "int32")))


def test_attention_names_are_known_or_registered(monkeypatch):
  """`attention` is validated on creation: the reference, "flash" (registered by infer when a
  config names it, so accepted before), or a name registered with `register_attention`."""
  assert lmjax.TransformerConfig(attention="flash").attention == "flash"
  with pytest.raises(ValueError, match=r"attention='mine' is not allowed.*register_attention"):
    lmjax.TransformerConfig(attention="mine")
  monkeypatch.setitem(attention_ops._ATTENTION_FNS, "mine", attention_ops.reference_attention)
  assert lmjax.TransformerConfig(attention="mine").attention == "mine"
  with pytest.raises(ValueError, match=r"choose one of \('reference', 'flash', .*'mine'"):
    lmjax.TransformerConfig(attention="theirs")
