"""`python -m train.dpo` and `python -m train.reward` with a `peft` section: only the adapter
(and a reward model's score head) trains, the base is frozen and held once (DPO's reference is
its own arrays without the adapter), the losses and rewards equal float64 recomputes on merged
weights, the run writes Hugging Face PEFT files that `load_run` / `load_reward_model` merge,
and bad combinations fail before step 0."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import lmjax
from lmjax import checkpoint as layout
from lmjax import peft
from lmjax.convert import safetensors_io
from lmjax.quant.qarray import QArray
from tests.train import preference_fixtures as pf
from tests.train.test_dpo import ROWS, base, data  # noqa: F401
from tests.train.trainer_util import data_dirs, metrics, train_losses  # noqa: F401
from train import dpo, reward
from train import job as job_lib
from train import preference_data as pd

LORA = ("peft.method=lora", "peft.rank=4", "peft.alpha=8", "peft.targets=query,value,wo")


def _run(job, base, data, tmp_path_factory):  # noqa: F811
  """A 3-step LoRA run of `job`: its config, result and run dir."""
  c = _config(job, base, data, "train.steps=3")
  workdir = tmp_path_factory.mktemp(job.name) / "lora"
  return c, job_lib.run(job, c, workdir), workdir


def _config(job, base, data, *sets):  # noqa: F811
  return pf.config(job, base, f"jsonl:{data}", "data.seq_len=64", "data.batch_size=8",
                   "data.heldout_fraction=0.2", "optimizer.learning_rate=2e-2", *LORA, *sets)


def _batch(folder):
  _, _, tok = lmjax.load_pretrained(str(folder))
  ex, _ = pd.encode_rows([pd.Row(r, f"row {i}") for i, r in enumerate(ROWS)], tok, 64,
                         shift=True)
  return {k: jnp.asarray(v) for k, v in pd.pad_pairs(ex, 64).items()}


def _merged64(params, adapter, spec) -> dict:
  """The base with LoRA folded in, in float64 numpy: `W + (alpha / r) A B` per kernel."""
  flat = {p: np.asarray(v, np.float64) for p, v in flatten_dict(params).items()}
  ad = flatten_dict(jax.device_get(nn.meta.unbox(adapter)))
  for path in {p[:-1] for p in ad if p[-1] == "lora_a"}:
    a, b = np.asarray(ad[path + ("lora_a",)], np.float64), np.asarray(ad[path + ("lora_b",)],
                                                                      np.float64)
    w = flat[path + ("kernel",)]
    r = a.shape[-1]
    lead = w.ndim - (a.ndim - 1) - (b.ndim - 1)  # a scanned kernel's [L] axis
    a2 = a.reshape(a.shape[:lead] + (-1, r))
    b2 = b.reshape(b.shape[:lead] + (r, -1))
    flat[path + ("kernel",)] = w + spec.scale * (a2 @ b2).reshape(w.shape)
  return {"/".join(p): v for p, v in flat.items()}


def _unflat(d):
  from flax.traverse_util import unflatten_dict
  return unflatten_dict({tuple(k.split("/")): v for k, v in d.items()})


def _log_softmax64(logits, targets):
  lg = np.asarray(logits, np.float64)
  lg = lg - lg.max(-1, keepdims=True)
  lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  return np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]


def _pair_logps64(logp, batch):
  """Per pair `(chosen, rejected)` summed response log-probs, float64, in pair order."""
  mask, pair, sign = (np.asarray(batch[k]) for k in ("loss_mask", "pair", "sign"))
  out = []
  for row in range(logp.shape[0]):
    for p in sorted(set(pair[row][pair[row] > 0].tolist())):
      sel = (pair[row] == p) & (mask[row] > 0)
      out.append((logp[row][sel & (sign[row] > 0)].sum(), logp[row][sel & (sign[row] < 0)].sum()))
  return np.asarray(out)


@pytest.fixture(scope="module")
def lora_dpo(data_dirs, base, data, tmp_path_factory):  # noqa: F811
  return _run(dpo.JOB, base, data, tmp_path_factory)


def test_lora_dpo_trains_the_adapter_against_the_base_itself(lora_dpo, base):  # noqa: F811
  c, out, workdir = lora_dpo
  adapter = jax.device_get(out["state"].params)
  leaves = flatten_dict(adapter)
  assert {p[-1] for p in leaves} == {"lora_a", "lora_b"}  # only the adapter trains
  assert {p[-2] for p in leaves} == {"query", "value", "wo"}
  first = [m for m in metrics(workdir) if m.get("step") == 1 and "loss" in m][0]
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)  # B = 0: policy == reference
  # The reference is the frozen base's own arrays (held once), not a copy.
  ps = dpo.JOB._peft(c)
  params, _ = dpo.sft.load_base(c.base, c.model, None)
  frozen = ps.frozen_value(params)
  combine = dpo.JOB.partition(c)[1].combine  # what the job's loss gets
  both = combine(adapter, frozen)
  for pol, ref, b in zip(jax.tree.leaves(both["policy"].base),
                         jax.tree.leaves(both["reference"].base), jax.tree.leaves(params)):
    assert pol is ref is b
  assert both["reference"].adapter == {}
  base_n = lmjax.count_params(params)
  assert lmjax.count_params(ps.frozen.abstract) == base_n  # one copy of the weights, frozen
  assert peft.count(adapter) < base_n // 10
  # The step-0 gradient: nonzero on every lora_B, zero on every lora_A (B = 0 there).
  batch = _batch(base)
  loss = dpo.JOB.loss(c)
  a0 = nn.meta.unbox(ps.init_params(jax.random.key(0)))
  grad = jax.grad(lambda a: loss(ps.model, combine(a, frozen), batch, jax.random.key(0),
                                 False)[0])(a0)
  for path, g in flatten_dict(grad).items():
    if path[-1] == "lora_a":
      assert not np.any(np.asarray(g)), path
    else:
      assert np.abs(np.asarray(g)).max() > 1e-6, path
  # The trained adapter's loss = a float64 recompute from plain forwards of the merged policy.
  got, n, _ = jax.jit(lambda a: loss(ps.model, combine(a, frozen), batch, jax.random.key(0),
                                     False))(adapter)
  model = lmjax.CausalLM(c.model)
  fwd = jax.jit(lambda p: model.apply({"params": p}, batch["inputs"],
                                      segment_ids=batch["segment_ids"],
                                      positions=batch["positions"]))
  merged = _unflat({k: v.astype(np.float32) for k, v in _merged64(params, adapter,
                                                                    ps.spec).items()})
  pol = _pair_logps64(_log_softmax64(fwd(merged), batch["targets"]), batch)
  ref = _pair_logps64(_log_softmax64(fwd(params), batch["targets"]), batch)
  h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
  assert np.abs(h).max() > 1e-3  # the policy has moved
  want = np.sum(np.log1p(np.exp(-c.dpo.beta * h)))
  assert float(n) == len(h)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_lora_dpo_writes_peft_files_that_load_run_merges(lora_dpo, base):  # noqa: F811
  c, out, workdir = lora_dpo
  meta = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
  assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM"
  assert meta["base_model_name_or_path"] == str(base)
  _, merged, tok = layout.load_run(workdir)
  assert tok is not None
  params, _ = dpo.sft.load_base(c.base, c.model, None)
  want = _merged64(params, out["state"].params, c.peft.spec())
  for k, v in flatten_dict(merged).items():
    np.testing.assert_allclose(np.asarray(v, np.float64), want["/".join(k)], atol=1e-6)


def test_lora_dpo_with_precomputed_reference_log_probs_is_the_same_run(lora_dpo, tmp_path):
  c, out, workdir = lora_dpo
  pre = dataclasses.replace(c, dpo=dataclasses.replace(c.dpo, precompute_reference=True))
  got = dpo.run(pre, tmp_path / "pre")
  np.testing.assert_allclose(list(train_losses(tmp_path / "pre").values()),
                             list(train_losses(workdir).values()), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(got["state"].params), jax.tree.leaves(out["state"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)


def test_qlora_dpo_holds_an_nf4_base_and_starts_at_log_2(data_dirs, base, data, tmp_path):  # noqa: F811
  c = _config(dpo.JOB, base, data, "train.steps=1", "peft.base_quant=nf4",
              "peft.nf4_block_size=16")
  dpo.run(c, tmp_path / "q")
  first = [m for m in metrics(tmp_path / "q") if m.get("step") == 1 and "loss" in m][0]
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)
  abstract = dpo.JOB._peft(c).frozen.abstract
  assert any(isinstance(x, QArray) for x in jax.tree.leaves(
      abstract, is_leaf=lambda x: isinstance(x, QArray)))
  assert json.loads((tmp_path / "q" / "adapter" / "adapter_config.json").read_text()
                    )["lmjax_base_quant"] == "nf4"


@pytest.fixture(scope="module")
def lora_rm(data_dirs, base, data, tmp_path_factory):  # noqa: F811
  return _run(reward.JOB, base, data, tmp_path_factory)


def test_lora_reward_model_trains_the_adapter_and_score_head(lora_rm, base):  # noqa: F811
  c, out, workdir = lora_rm
  trained = jax.device_get(out["state"].params)
  leaves = flatten_dict(trained)
  assert {p[-1] for p in leaves} == {"lora_a", "lora_b", "score"}
  start = lmjax.heads.reward_params_from_lm(lmjax.load_pretrained(str(base))[1], c.model,
                                            jax.random.key(c.train.seed))
  assert np.abs(trained["score"] - np.asarray(start["score"])).max() > 1e-4  # the head trains
  assert all(np.abs(v).max() > 0 for p, v in leaves.items() if p[-1] == "lora_b")
  # The run's files: LoRA + the head as PEFT's modules_to_save of a SEQ_CLS adapter.
  folder = workdir / "adapter"
  meta = json.loads((folder / "adapter_config.json").read_text())
  assert meta["task_type"] == "SEQ_CLS" and meta["modules_to_save"] == ["score"]
  tensors = safetensors_io.open_file(folder / "adapter_model.safetensors")
  np.testing.assert_array_equal(tensors["base_model.model.score.weight"].load(),
                                trained["score"].T)
  # load_reward_model: the merged trunk and the head; its rewards = float64-merged weights'.
  cfg, params, _ = lmjax.load_reward_model(str(workdir))
  with pytest.raises(ValueError, match="is a reward model"):
    layout.load_run(workdir)
  trunk = {k: v for k, v in start.items() if k != "score"}
  want = _unflat({k: v.astype(np.float32) for k, v in _merged64(trunk, trained,
                                                                c.peft.spec()).items()})
  want["score"] = trained["score"]
  batch = _batch(base)
  rm = lmjax.RewardModel(cfg)
  fwd = jax.jit(lambda p: rm.apply({"params": p}, batch["inputs"],
                                   segment_ids=batch["segment_ids"],
                                   positions=batch["positions"], per_token=True))
  ps = reward.JOB._peft(c)
  adapted = jax.jit(lambda a: ps.model.apply({"params": ps.combine(a, ps.frozen_value(start))},
                                             batch["inputs"], segment_ids=batch["segment_ids"],
                                             positions=batch["positions"], per_token=True))
  ref = np.asarray(fwd(want), np.float64)
  np.testing.assert_allclose(np.asarray(fwd(params)), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(adapted(trained)), ref, rtol=1e-5, atol=1e-6)
  assert out["validation"]["accuracy"] >= 0  # evaluated through the adapter


def test_bad_combinations_fail_before_training(base, data, tmp_path, capsys):  # noqa: F811
  common = ["--model", str(base), "--data", f"jsonl:{data}", "--set", "mesh.data=1",
            "data.seq_len=64", "train.steps=1"]
  for job in (reward, dpo):
    assert job.main(common + ["peft.method=prompt", "--workdir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"soft prompts are not supported by train.{job.JOB.name}" in err, err
    assert job.main(common + ["peft.method=lora", "peft.targets=qkv",
                              "--workdir", str(tmp_path / "t")]) == 1
    assert "LoRA target 'qkv' matches no projection" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()


def test_hugging_face_peft_loads_the_reward_adapter_with_equal_rewards(lora_rm, base):  # noqa: F811
  torch = pytest.importorskip("torch")
  peft_hf = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  _, _, workdir = lora_rm
  cfg, params, tok = lmjax.load_reward_model(str(workdir))
  ids = tok.encode("2 + 3 = 5. The answer is 5.")
  ours = np.asarray(lmjax.RewardModel(cfg).apply({"params": params}, np.asarray([ids])))
  m = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(base), num_labels=1, torch_dtype=torch.float32)
  m.config.pad_token_id = None  # one row: the reward is read at its last token
  pm = peft_hf.PeftModel.from_pretrained(m, str(workdir / "adapter")).eval()
  with torch.no_grad():
    theirs = pm(torch.tensor([ids])).logits[:, 0].numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
