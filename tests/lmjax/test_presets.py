"""Presets of published models: parameter counts equal the published figures, and Llama 3's
rotary scaling equals transformers' (a committed golden when transformers is absent)."""

from pathlib import Path

import numpy as np
import pytest

import lmjax
from lmjax.embeddings import rotary_inv_freq

GOLDEN = Path(__file__).parent / "golden" / "llama3_rope_inv_freq.npy"

# Parameter counts of the released checkpoints (the safetensors metadata of each model card).
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "gpt2-124m": 124_439_808,
    "llama3.2-1b": 1_235_814_400,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_are_the_published_ones(name):
  assert lmjax.count_params(lmjax.TransformerConfig.from_preset(name)) == PUBLISHED[name]


def test_llama3_rotary_scaling_equals_transformers():
  cfg = lmjax.TransformerConfig.from_preset("llama3.2-1b")
  got = np.asarray(rotary_inv_freq(cfg.resolved_head_dim, cfg.rope_theta,
                                   cfg.rope_scaling_params))
  np.testing.assert_allclose(got, np.load(GOLDEN), rtol=1e-6)
  plain = np.asarray(rotary_inv_freq(cfg.resolved_head_dim, cfg.rope_theta))
  assert np.array_equal(got[:8], plain[:8]) and (got[-8:] < plain[-8:] / 31).all()
  try:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  except ImportError:
    return
  hf = LlamaConfig(hidden_size=cfg.model_dim, num_attention_heads=cfg.num_heads,
                   max_position_embeddings=cfg.max_len,
                   head_dim=cfg.resolved_head_dim, rope_theta=cfg.rope_theta,
                   rope_scaling=lmjax.convert.hf._rope_to_hf(cfg)["rope_scaling"])
  want = ROPE_INIT_FUNCTIONS["llama3"](hf)[0].numpy()
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bad_rope_scaling_is_refused():
  with pytest.raises(ValueError, match="rope_scaling='yarn' is not allowed"):
    lmjax.TransformerConfig(rope_scaling="yarn")
  with pytest.raises(ValueError, match="rope_low_freq_factor < rope_high_freq_factor"):
    lmjax.TransformerConfig(rope_scaling="llama3", rope_low_freq_factor=4.0)
