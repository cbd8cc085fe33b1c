"""lmjax inference: kernels, decoding, sampling and caching for trained models.

Importing `infer` is cheap: the submodules load on first use.

    out = infer.generate(model, params, ["Once upon a time"], tokenizer=tok, max_new_tokens=64,
                         sampler=infer.sampling.TopP(p=0.9, temperature=0.8), seed=0)
    for step in infer.stream(model, params, "Once upon a time", tokenizer=tok):
      print(step.text[0], end="")

`python -m infer` is the command line (generation and chat; see `infer/__main__.py`).
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("decode", "requests", "results", "streaming", "stops", "sampling", "prompts",
               "speculative", "spec_rule", "prefix_cache", "prefix_glue", "chat",
               "flash_attention")
_EXPORTS = {  # name: the submodule that defines it
    **dict.fromkeys(("generate", "GenerateResult", "Candidate", "mean_log_prob"), "decode"),
    **dict.fromkeys(("stream", "StreamStep", "drain"), "streaming"),
    "PrefixCache": "prefix_cache", "SpeculativeResult": "speculative",
    **dict.fromkeys(("RewardScorer", "reward_scorer"), "reward_scorer"),
}

__all__ = [*_SUBMODULES, *_EXPORTS]


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"infer.{name}")
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"infer.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'infer' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
