"""A run saved before a setting existed resumes when the setting keeps its default (settings
added since: Llama 3 rotary scaling, PEFT), and is refused when it does not."""

import dataclasses

from train import config as config_lib
from train.checkpointing import config_differences, section_defaults
from train.sft_config import PRESETS as SFT_PRESETS

NEW_MODEL_KEYS = ("rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
                  "rope_high_freq_factor", "rope_original_max_len")


def _older(d: dict) -> dict:
  """`d` as the previous version wrote it: no rotary-scaling keys, no peft section."""
  d = {**d, "model": {k: v for k, v in d["model"].items() if k not in NEW_MODEL_KEYS}}
  d.pop("peft", None)
  return d


def test_settings_added_since_a_checkpoint_keep_it_resumable():
  config = config_lib.preset("demo")
  now = config.to_dict()
  assert config_differences(_older(now), now, section_defaults(config)) == ([], [])
  # Without the defaults the absent keys would block (the previous behaviour).
  assert config_differences(_older(now), now)[0]
  # A new setting at a non-default value is a real difference.
  changed = dataclasses.replace(config, model=config.model.replace(rope_scaling="llama3"))
  blocking, _ = config_differences(_older(now), changed.to_dict(), section_defaults(changed))
  assert blocking == ["model.rope_scaling: saved '<absent>', now 'llama3'"]


def test_sft_runs_saved_before_peft_resume_without_it():
  config = SFT_PRESETS["demo"]()
  if config.model is None:  # the model section is read from the base at run time
    config = dataclasses.replace(config, model=config_lib.preset("demo").model)
  now = config.to_dict()
  assert "peft" in now
  assert config_differences(_older(now), now, section_defaults(config)) == ([], [])
