"""The trainer: each objective learns; accumulation equals one big batch; sharded equals one
device; bad batches and NaN losses fail clearly."""

import itertools
import math

import jax
import numpy as np
import pytest

import lmjax
from lmjax import checkpoint as layout
from tests.train.trainer_util import SHRINK, data_dirs, tiny_config  # noqa: F401
from train import data as data_lib
from train import pretrain
from train.config import OptimizerConfig
from train.optimizer import decay_mask, learning_rate_schedule
from train.trainer import NonFiniteLossError, check_batch_divisible


def batches(config, n, split="train"):
  tok = data_lib.build_tokenizer(config.data)
  it = data_lib.make_pipeline(config.data, tok, split)
  return list(itertools.islice(it, n)), tok


@pytest.mark.parametrize("objective", sorted(SHRINK))
def test_each_objective_lowers_the_validation_loss(objective, data_dirs):  # noqa: F811
  config = tiny_config(data_dirs, objective, steps=12)
  trainer = pretrain.build_trainer(config)
  train, tok = batches(config, 12)
  val, _ = batches(config, 2, "validation")
  state = trainer.init_state()
  before = trainer.evaluate(state.params, iter(val))
  state, step, reason = trainer.fit(state, iter(train), start_step=0, steps=12)
  after = trainer.evaluate(state.params, iter(val))
  assert (step, reason) == (12, "done")
  assert before["tokens"] == after["tokens"] > 50
  assert abs(before["loss"] - math.log(512)) < 0.5  # Starts near uniform.
  assert after["loss"] < before["loss"] - 0.7, (before, after)
  assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
  assert 0 <= after["accuracy"] <= 1 and after["accuracy"] > before["accuracy"]


def _train(config, data, steps, mesh=None):
  """Params after each step (host copies) and the losses."""
  trainer = pretrain.build_trainer(config, mesh)
  state = trainer.init_state()
  params, losses = [], []
  for i in range(steps):
    state, m = trainer.train_step(state, i, data[i])
    params.append(jax.device_get(state.params))
    losses.append(float(m["loss_sum"] / m["tokens"]))
  return params, losses


def _assert_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_accumulation_equals_one_big_batch(data_dirs):  # noqa: F811
  config = tiny_config(data_dirs, steps=12)
  data, _ = batches(config, 3)
  for b in data:  # Rows 0 and 1 end early (as padding would), in micro-batches 0 and 1.
    b["loss_mask"][:2, 8:] = 0
  # Micro-batch i holds rows i, i + 4 (see Trainer._micro_batches); their real-token counts
  # differ, so a mean per micro-batch would weigh tokens unequally and fail this test.
  counts = [b["loss_mask"].reshape(2, 4, -1).sum((0, 2)) for b in data]
  assert any(len(set(c.tolist())) > 1 for c in counts)
  big, big_losses = _train(config, data, 3)
  acc_config = tiny_config(data_dirs, steps=3, extra=["train.grad_accum=4"])
  acc, acc_losses = _train(acc_config, data, 3)
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
  _assert_close(acc[-1], big[-1], rtol=1e-4, atol=1e-6)
  # The check has teeth: one step fewer is far from equal.
  with pytest.raises(AssertionError):
    _assert_close(acc[-1], big[-2], rtol=1e-4, atol=1e-6)


def test_sharded_training_matches_one_device(data_dirs):  # noqa: F811
  assert jax.device_count() == 8
  config = tiny_config(data_dirs, steps=12)
  data, _ = batches(config, 2)
  one, one_losses = _train(config, data, 2)
  mesh = lmjax.make_mesh(data=2, fsdp=2, tensor=2)
  sharded_trainer = pretrain.build_trainer(config, mesh)
  state = sharded_trainer.init_state()
  emb = state.params["embed"]["embedding"]  # [V, D] split over tensor and fsdp.
  assert emb.addressable_shards[0].data.shape == (512 // 2, 32 // 2)
  assert state.opt_state[1][0].mu["embed"]["embedding"].sharding == emb.sharding
  many, many_losses = _train(config, data, 2, mesh)
  np.testing.assert_allclose(many_losses, one_losses, rtol=2e-5)
  _assert_close(many[-1], one[-1], rtol=1e-4, atol=2e-6)


def test_batch_not_divisible_by_data_axes_is_an_error_up_front(data_dirs, tmp_path,  # noqa: F811
                                                               capsys):
  mesh = lmjax.make_mesh(data=4, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match=r"global batch 6 rows .* data x fsdp = 4 x 2 = 8: it "
                                       r"must be a multiple of grad_accum x 8 = 8"):
    check_batch_divisible(6, 1, mesh)
  with pytest.raises(ValueError, match=r"grad_accum=2 .* multiple of grad_accum x 8 = 16"):
    check_batch_divisible(8, 2, mesh)
  check_batch_divisible(16, 2, mesh)
  config = tiny_config(data_dirs, extra=["mesh.data=4", "data.batch_size=6"])
  with pytest.raises(ValueError, match="does not split over the mesh's batch axes"):
    pretrain.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # Raised before anything was written.


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    data_dirs, tmp_path, capsys):  # noqa: F811
  config = tiny_config(data_dirs, steps=8, extra=["checkpoint.every=2"])

  def poison(step, state):  # After step 3, the params turn NaN: step 4's loss is NaN.
    if step == 3:
      return state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    return None

  with pytest.raises(NonFiniteLossError, match="non-finite training loss at step 4") as e:
    pretrain.run(config, tmp_path, hooks=[poison])
  assert e.value.step == 4
  assert layout.saved_steps(tmp_path) == [2]
  _, params, _ = lmjax.checkpoint.load_run(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


def test_weight_decay_mask_and_schedule():
  for scan in (False, True):  # A scanned norm scale is [L, D]: still not decayed.
    cfg = lmjax.TransformerConfig.from_preset("tiny", use_bias=True, scan_layers=scan)
    abstract = lmjax.counting.abstract_params(cfg)
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(abstract))[0]
    decayed = {jax.tree_util.keystr(p) for p, d in flat if d}
    assert decayed and all(k.endswith(("['kernel']", "['embedding']")) for k in decayed)
    assert not any("norm" in k or "bias" in k for k in decayed)
    assert len(decayed) == sum(1 for p, _ in flat if jax.tree_util.keystr(p).endswith(
        ("['kernel']", "['embedding']")))
  sched = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                                 final_lr_fraction=0.1), total_steps=110)
  assert float(sched(0)) == 0 and float(sched(5)) == pytest.approx(5e-4)
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # Half-way: cosine 1/2.
  assert float(sched(110)) == pytest.approx(1e-4) and float(sched(500)) == pytest.approx(1e-4)


def test_cpu_peak_replaces_a_figure_measured_on_a_busy_machine(tmp_path, monkeypatch):
  """A cached CPU peak lower than what a matmul reaches now (taken while the machine was busy)
  is replaced, so MFU cannot read over 100% from a stale figure."""
  import json as json_lib
  import os
  import platform

  from train import feedback

  path = tmp_path / "peak.json"
  key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|float32"
  path.write_text(json_lib.dumps({key: 1.0}))
  monkeypatch.setenv("LMJAX_PEAK_CACHE", str(path))
  peak, _ = feedback.peak_flops("float32")
  assert peak > 1e9 and json_lib.loads(path.read_text())[key] == peak
