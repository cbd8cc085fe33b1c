"""`python -m train.sft` with a `peft` section: only the adapter trains, the run writes
Hugging Face PEFT files, `load_run` merges them; bad PEFT settings fail before step 0."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import lmjax
from lmjax import checkpoint as layout
from lmjax import peft
from lmjax.convert import safetensors_io
from tests.lmjax.peft_fixtures import random_adapter, tiny_base
from tests.train.test_sft import base, config, data  # noqa: F401
from tests.train.trainer_util import data_dirs, metrics  # noqa: F401
from train import config as config_lib
from train import peft_train, sft
from train.peft_config import PEFTConfig


@pytest.fixture(autouse=True)
def _session_caches(data_dirs):  # noqa: F811
  yield


def test_overrides_parse_the_peft_section():
  c = config_lib.apply_overrides(PEFTConfig(), ["method=lora", "rank=4", "targets=query,v_proj",
                                                "base_quant=nf4"])
  assert (c.method, c.rank, c.targets, c.base_quant) == ("lora", 4, ("query", "v_proj"), "nf4")
  with pytest.raises(ValueError, match="peft.method='lorra'"):
    PEFTConfig(method="lorra")
  with pytest.raises(ValueError, match="rank=0"):
    PEFTConfig(method="lora", rank=0)


def test_lora_sft_trains_only_the_adapter_and_load_run_merges_it(base, data, tmp_path):  # noqa: F811
  cfg = config(base, data, "peft.method=lora", "peft.rank=4", "peft.alpha=8",
               "peft.targets=query,value", "train.steps=6")
  out = sft.run(cfg, tmp_path / "run")
  state = out["state"]
  leaves = flatten_dict(state.params)
  assert leaves and {p[-1] for p in leaves} == {"lora_a", "lora_b"}  # the adapter alone
  assert all(p[-2] in ("query", "value") for p in leaves)
  losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
  assert losses[-1] < losses[0]
  folder = tmp_path / "run" / "adapter"
  meta = json.loads((folder / "adapter_config.json").read_text())
  assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["base_model_name_or_path"]
  tensors = {k: np.asarray(v.load(), np.float64)
             for k, v in safetensors_io.open_file(folder / "adapter_model.safetensors").items()}
  _, merged, _ = layout.load_run(tmp_path / "run")
  base_params, _ = sft.load_base(str(base), cfg.model, None)
  mf, bf = flatten_dict(merged), flatten_dict(base_params)
  n_changed = 0
  for path, w in bf.items():
    m = np.asarray(mf[path], np.float64)
    layer = next((int(p.split("_")[1]) for p in path if p.startswith("layers_")), None)
    if path[-1] == "kernel" and path[-2] in ("query", "value"):
      name = {"query": "q_proj", "value": "v_proj"}[path[-2]]
      key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
      a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]  # [r,in] [out,r]
      want = np.asarray(w, np.float64) + 2.0 * (b @ a).T.reshape(w.shape)
      np.testing.assert_allclose(m, want, atol=1e-5)
      n_changed += int(np.abs(m - np.asarray(w)).max() > 1e-6)
    else:
      np.testing.assert_array_equal(m, np.asarray(w, np.float64))  # the base, untouched
  assert n_changed > 0


def test_bad_peft_settings_fail_before_training(base, data, tmp_path, capsys):  # noqa: F811
  argv = ["--model", str(base), "--data", f"jsonl:{data}", "--workdir", str(tmp_path / "r"),
          "--set", "train.steps=1", "data.seq_len=32", "peft.method=lora", "peft.targets=qkv"]
  assert sft.main(argv) == 1
  err = capsys.readouterr().err
  assert "LoRA target 'qkv' matches no projection" in err
  assert not (tmp_path / "r").exists()
  argv[-2:] = ["peft.method=prompt", "data.pack=true"]
  assert sft.main(argv) == 2
  assert "data.pack=false" in capsys.readouterr().err


def test_glue_gives_other_jobs_a_reference_at_no_extra_memory_and_trainable_heads():
  """What reward/DPO/RL/distill call (`train.peft_train.setup`): the policy is the base with the
  adapter, the reference the base alone from the same arrays; a reward head trains beside it."""
  b = tiny_base()
  ps = peft_train.setup(PEFTConfig(method="lora", rank=2, targets=("query", "wo")), b.model,
                        peft.boxed_abstract(b.cfg))
  assert set(flatten_dict(nn.meta.unbox(ps.init_params(jax.random.key(0))))) == {
      p[:-1] + (k,) for p in flatten_dict(b.params) if p[-2] in ("query", "wo")
      for k in ("lora_a", "lora_b") if p[-1] == "kernel"}
  ad = random_adapter(ps.spec, b.cfg, 4)
  both = ps.frozen_with(lambda pol, ref: {"policy": pol, "reference": ref}).combine(ad, b.params)
  np.testing.assert_array_equal(b.pfwd(both["reference"], b.x), b.fwd(b.params, b.x))
  np.testing.assert_allclose(b.pfwd(both["policy"], b.x), b.fwd(peft.merge(b.params, ad, ps.spec),
                                                                 b.x), atol=2e-5)
  for r, p in zip(jax.tree.leaves(both["reference"].base), jax.tree.leaves(b.params)):
    assert r is p  # the reference holds the base's own arrays, no copy
  rm = lmjax.RewardModel(b.cfg)
  boxed = jax.eval_shape(lambda: rm.init(jax.random.key(0), b.x)["params"])
  ps = peft_train.setup(PEFTConfig(method="lora", rank=2), rm, boxed, train_also=("score",))
  assert "score" in ps.init_params(jax.random.key(0)) and "score" not in ps.abstract
  with pytest.raises(ValueError, match="train_also"):
    peft_train.setup(PEFTConfig(method="lora"), rm, boxed, train_also=("head",))
