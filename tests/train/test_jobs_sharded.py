"""Every post-training job shards the same way: two optimizer steps of SFT (full and LoRA),
reward, DPO (full and LoRA), distillation (KD, teacher frozen) and RL (GRPO, LoRA) on a
2 x 2 x 2 (data x fsdp x tensor) mesh of 8 CPU devices equal the same two steps on one device,
from the same params and batches (the job's own pipeline); the trainable params, their
optimizer state and the frozen params (PEFT base, DPO reference, KD teacher) are really split
over the devices, and every pretrained model a job reads (distillation's teacher writing its
data too) is read onto the mesh; RL's rollouts of the sharded policy draw the same tokens as
one device's."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from tests.train import preference_fixtures as pf
from tests.train import rl_util
from tests.train.test_dpo import ROWS
from tests.train.trainer_util import data_dirs  # noqa: F401
from train import config as config_lib
from train import distill, dpo, reward, rl, sft
from train import job as job_lib
from train.peft_config import PEFTConfig

SHARDED, ONE = (2, 2, 2), (1, 1, 1)  # data x fsdp x tensor
LORA = ("peft.method=lora", "peft.rank=4", "peft.alpha=8", "peft.targets=query,value,wo")
# Adam divides by sqrt(v) + eps: with the default eps (1e-8) a gradient element near 0 turns
# its float summation-order noise (which differs between meshes) into an update of up to lr.
# eps 1e-3 sits above the gradients' noise, so the update is a smooth function of them and the
# two meshes' params agree to float noise (~1e-7, measured) while the steps still move them.
RUN = ("data.seq_len=32", "data.batch_size=8", "data.heldout_fraction=0.25", "train.steps=2",
       "train.eval_batches=0", "train.progress_bar=false", "optimizer.learning_rate=1e-2",
       "optimizer.warmup_steps=0", "optimizer.decay_steps=50", "optimizer.eps=1e-3",
       "checkpoint.every=0", "checkpoint.async_save=false")
CHATS = [("the cat", "sat on the mat"), ("the dog", "ate the bone"), ("hello", "world"),
         ("the mat", "the cat sat")]


@pytest.fixture(autouse=True)
def _session_caches(data_dirs):  # noqa: F811  (a fresh compilation and peak-FLOP/s cache)
  yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny one-layer base (Hugging Face folder, byte-level BPE; every sharded dim even), chat
  rows and preference pairs."""
  root = tmp_path_factory.mktemp("jobs_sharded")
  base = pf.save_base(root / "base", num_decoder_layers=1, max_len=64)
  chats = root / "chats.jsonl"
  chats.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": q}, {"role": "assistant", "content": a}], "id": i}) + "\n"
      for i, (q, a) in enumerate(CHATS * 4)))
  pairs = root / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(ROWS * 8)))
  return base, chats, pairs


def _mesh(sizes):
  return [f"mesh.data={sizes[0]}", f"mesh.fsdp={sizes[1]}", f"mesh.tensor={sizes[2]}"]


JOBS = {  # name -> (a fresh job, its tiny config at mesh sizes `m`)
    "sft": lambda f, m: (sft.SFT(), sft.resolve_model(
        sft.PRESETS["demo"](), [f"base={f[0]}", f"data.source=jsonl:{f[1]}", *RUN, *_mesh(m)])),
    "sft_lora": lambda f, m: (sft.SFT(), sft.resolve_model(
        sft.PRESETS["demo"](), [f"base={f[0]}", f"data.source=jsonl:{f[1]}", *RUN, *LORA,
                                *_mesh(m)])),
    "reward": lambda f, m: (reward.Reward(), pf.config(
        reward.Reward(), f[0], f"jsonl:{f[2]}", *RUN, "data.seq_len=64", *_mesh(m))),
    "dpo": lambda f, m: (dpo.DPO(), pf.config(
        dpo.DPO(), f[0], f"jsonl:{f[2]}", *RUN, "data.seq_len=64", *_mesh(m))),
    "dpo_lora": lambda f, m: (dpo.DPO(), pf.config(
        dpo.DPO(), f[0], f"jsonl:{f[2]}", *RUN, "data.seq_len=64", *LORA, *_mesh(m))),
    "distill_kd": lambda f, m: (distill.Distill(), distill.resolve_models(
        distill.PRESETS["demo"](), [  # the teacher (the base) writes the data (on the first
            # run; its rows are drawn as RL's rollouts are, tested below), then KD
            f"teacher={f[0]}", "student=tiny", "method=kd", "data.source=synthetic",
            "generate.prompts=chat", "generate.num_prompts=8", "generate.max_new_tokens=8",
            "generate.batch_size=8", "model.num_decoder_layers=1", "model.max_len=64",
            "report.baseline=false", f"report.real_text=jsonl:{f[1]}", "kd.alpha=0.5",
            "kd.temperature=2.0", *RUN, *_mesh(m)])),
}


def _split_axes(tree) -> set[str]:
  """The mesh axes that split some leaf (each device holds only a slice of it)."""
  axes = set()
  for x in jax.tree.leaves(tree):
    if x.addressable_shards[0].data.shape != x.shape:
      for names in x.sharding.spec:
        axes.update((names,) if isinstance(names, str) else names or ())
  return axes


def _check_sharded(trainer, state, frozen_too: bool) -> None:
  """The params, their optimizer state and the frozen params are split over the mesh's fsdp
  and tensor axes (replicated over data)."""
  assert trainer.mesh.devices.size == 8 and trainer.mesh.shape["tensor"] == 2
  trees = {"trainable params": state.params, "optimizer state": state.opt_state}
  if frozen_too:
    trees["frozen params"] = trainer.frozen_params
  for what, tree in trees.items():
    assert _split_axes(tree) == {"fsdp", "tensor"}, f"{what} split over {_split_axes(tree)}"


def _job_steps(job, config, workdir, batches=None):
  """Two optimizer steps of `job` as `train.job.run` sets them up (the job's model, loss,
  partition, frozen params, initial state and batches), without the run's reports."""
  config = job.prepare(config)
  trainer = job_lib.build_trainer(job, config)
  tokenizer = job.tokenizer(config, workdir, False)
  job.check(config, trainer, tokenizer)
  if trainer.frozen is not None:
    trainer.set_frozen(job.frozen_params(config, trainer))
  state = job.initial_state(config, trainer)
  if batches is None:
    it = job.train_batches(config, tokenizer)
    batches = [next(it) for _ in range(2)]
    it.close()
  start = jax.device_get(state.params)
  losses = []
  for step, batch in enumerate(batches):
    state, m = trainer.train_step(state, step, batch)
    losses.append(float(m["loss_sum"]) / float(m["tokens"]))
  return trainer, state, start, losses, batches


def _assert_same_run(one, sharded):
  """The same losses at each step and the same params after the last (lr = 1e-2)."""
  np.testing.assert_allclose(sharded["losses"], one["losses"], rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(sharded["params"]), jax.device_get(one["params"]))


@pytest.mark.parametrize("name", list(JOBS))
def test_two_steps_on_a_2x2x2_mesh_equal_one_device(name, files, tmp_path, monkeypatch):
  loads = []  # every pretrained model the job reads: (the mesh asked for, the axes splitting it)
  load_base = sft.load_base

  def recording(base, config, mesh):
    params, tok = load_base(base, config, mesh)
    loads.append((mesh, _split_axes(params)))
    return params, tok

  monkeypatch.setattr(sft, "load_base", recording)
  runs = {}
  batches = None
  for sizes in (SHARDED, ONE):  # one work dir: distillation's teacher writes its data once
    job, config = JOBS[name](files, sizes)
    loads.clear()
    trainer, state, start, losses, batches = _job_steps(job, config, tmp_path, batches)
    assert trainer.mesh.devices.size == np.prod(sizes)
    if sizes == SHARDED:
      _check_sharded(trainer, state, frozen_too=trainer.frozen is not None)
      # Pretrained weights (a base, a DPO reference, a teacher writing data) are read onto the
      # trainer's mesh, never whole onto one device.
      assert loads and all(mesh is trainer.mesh for mesh, _ in loads), [m for m, _ in loads]
      assert all(axes == {"fsdp", "tensor"} for _, axes in loads), loads
    runs[sizes] = {"losses": losses, "params": state.params, "start": start}
  # The same starting point, then the same steps.
  jax.tree.map(np.testing.assert_array_equal, runs[SHARDED]["start"], runs[ONE]["start"])
  _assert_same_run(runs[ONE], runs[SHARDED])
  assert all(np.isfinite(runs[ONE]["losses"]))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(runs[ONE]["params"]), runs[ONE]["start"])
  assert max(jax.tree.leaves(moved)) > 1e-4  # the steps did train
  if name == "distill_kd":  # the KD batches are the sharded teacher's answers
    assert (tmp_path / distill.SYNTHETIC_FILE).read_text().count("\n") >= 4


def test_grpo_lora_rollouts_and_steps_on_a_2x2x2_mesh_equal_one_device(tmp_path, monkeypatch):
  sampled = []
  sample = rl.rollout.sample

  def recording(model, params, *a, **kw):
    out = sample(model, params, *a, **kw)
    sampled[-1].append(np.asarray(out.tokens))
    return out

  monkeypatch.setattr(rl.rollout, "sample", recording)
  runs = {}
  for sizes in (ONE, SHARDED):
    config = rl_util.tiny_config(tmp_path, "grpo", steps=2, beta=0.1)
    config = dataclasses.replace(config, mesh=config_lib.MeshConfig(*sizes), peft=PEFTConfig(
        method="lora", rank=4, alpha=8.0, targets=("query", "value", "wo")))
    loop = rl.Loop(config, tmp_path / f"rl{sizes}")
    loop.setup(rl_util.load_tiny)
    start = jax.device_get(loop.state.params)
    sampled.append([])
    losses = [loop.step(s)["loss"] for s in range(2)]
    assert loop.trainer.mesh.devices.size == np.prod(sizes)
    if sizes == SHARDED:
      _check_sharded(loop.trainer, loop.state, frozen_too=True)
    runs[sizes] = {"losses": losses, "params": loop.state.params, "start": start}
  jax.tree.map(np.testing.assert_array_equal, runs[SHARDED]["start"], runs[ONE]["start"])
  # Each step's rollout (a fixed key per step) drew the same tokens from the sharded policy.
  one, eight = sampled
  assert len(one) == len(eight) == 2
  for a, b in zip(one, eight):
    np.testing.assert_array_equal(b, a)
  _assert_same_run(runs[ONE], runs[SHARDED])
