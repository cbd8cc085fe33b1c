"""lmjax: functional Flax (linen) transformers for the whole life of a language model."""

from lmjax import checkpoint, compilation_cache, heads, inspect, packed, peft, quant
from lmjax.attention_ops import (
    SegmentIds,
    get_attention,
    reference_attention,
    register_attention,
)
from lmjax.cache import KVCache, init_cache
from lmjax.config import PRESETS, TransformerConfig
from lmjax.convert import HFTokenizer, load_pretrained, save_pretrained
from lmjax.counting import count_params, flops_per_token, model_for
from lmjax.heads import RewardModel, load_reward_model
from lmjax.limits import checked
from lmjax.sharding import LOGICAL_RULES, init_sharded, make_mesh
from lmjax.transformer import CausalLM, MaskedLM, Seq2SeqLM

__all__ = [
    "checkpoint",
    "compilation_cache",
    "heads",
    "inspect",
    "packed",
    "peft",
    "quant",
    "LOGICAL_RULES",
    "PRESETS",
    "CausalLM",
    "HFTokenizer",
    "KVCache",
    "MaskedLM",
    "RewardModel",
    "SegmentIds",
    "Seq2SeqLM",
    "TransformerConfig",
    "checked",
    "count_params",
    "flops_per_token",
    "get_attention",
    "init_cache",
    "init_sharded",
    "load_pretrained",
    "load_reward_model",
    "make_mesh",
    "model_for",
    "reference_attention",
    "register_attention",
    "save_pretrained",
]
