"""Checkpoints: SIGTERM then rerun equals a straight run (bitwise); a torn newest step falls back
to the previous one; a mismatched config is refused and nothing is touched; keep-K and best."""

import hashlib
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import checkpoint as layout
from tests.train.trainer_util import (  # noqa: F401
    data_dirs,
    run_cli,
    tiny_config,
    tiny_sets,
    train_losses,
)
from train import pretrain
from train.checkpointing import Checkpointer
from train.trainer import TrainState

N = 3
SIGTERM_AT = """
import os, signal, sys
from train import pretrain

def hook(step, state):  # A real SIGTERM to this process at the end of step N.
  if step == int(sys.argv[1]):
    os.kill(os.getpid(), signal.SIGTERM)

sys.exit(pretrain.main(sys.argv[2:], hooks=[hook]))
"""


def snapshot(folder):
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def data_state(workdir, step):
  return json.loads((layout.checkpoint_dir(workdir) / str(step) / layout.DATA /
                     "process_0-of-1.json").read_text())


def test_sigterm_then_rerun_equals_a_straight_run(data_dirs, tmp_path):  # noqa: F811
  sets = tiny_sets(data_dirs, steps=2 * N, extra=[f"checkpoint.every={N}"])
  straight = tmp_path / "straight"
  pretrain.run(tiny_config(data_dirs, steps=2 * N, extra=[f"checkpoint.every={N}"]), straight)

  resumed = tmp_path / "resumed"
  args = ["--workdir", str(resumed), "--set", *sets]
  first = run_cli([str(N), *args], script=SIGTERM_AT)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f"preempted: saved step {N}" in first.stdout
  assert layout.saved_steps(resumed) == [N]
  second = run_cli(args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"resuming from step {N}" in second.stdout
  assert layout.saved_steps(resumed) == [N, 2 * N]

  _, want, _ = layout.load_run(straight, 2 * N)
  _, got, _ = layout.load_run(resumed, 2 * N)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  assert data_state(resumed, 2 * N) == data_state(straight, 2 * N)
  assert data_state(resumed, N) == data_state(straight, N)
  assert data_state(resumed, N) != data_state(resumed, 2 * N)
  assert train_losses(resumed) == train_losses(straight)  # Every step, bitwise.


@pytest.fixture(scope="module")
def four_steps(data_dirs, tmp_path_factory):  # noqa: F811
  """A run of 4 steps saved at 2 and 4, with the params of each step kept by a hook."""
  workdir = tmp_path_factory.mktemp("four_steps")
  seen = {}

  def keep(step, state):
    seen[step] = jax.device_get(state.params)

  config = tiny_config(data_dirs, steps=4, extra=["checkpoint.every=2", "checkpoint.keep=5"])
  result = pretrain.run(config, workdir, hooks=[keep])
  assert layout.saved_steps(workdir) == [2, 4]
  return workdir, seen, result


def test_torn_newest_step_warns_and_the_previous_step_restores(four_steps, data_dirs,  # noqa: F811
                                                               tmp_path, caplog):
  src, seen, _ = four_steps
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  for f in (workdir / "checkpoints" / "4").rglob("*"):  # Tear the newest step.
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  # The trainer warns, moves step 4 aside (kept), resumes from step 2, and its step 3 is
  # bitwise the original step 3.
  torn = snapshot(workdir / "checkpoints" / "4")
  config = tiny_config(data_dirs, steps=4, extra=["checkpoint.every=2", "checkpoint.keep=5"])
  with caplog.at_level(logging.WARNING):
    pretrain.run(config, workdir)
  assert "checkpoint step 4 does not restore" in caplog.text
  assert snapshot(workdir / "checkpoints_corrupt" / "4") == torn
  assert layout.saved_steps(workdir) == [2, 4]
  losses = [m for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
  resume = losses.index({"event": "resume", "step": 2})
  after = {m["step"]: m["loss"] for m in losses[resume:] if "loss" in m and "split" not in m}
  before = train_losses(src)
  assert after == {3: before[3], 4: before[4]}
  _, params, _ = layout.load_run(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), seen[4])


def test_mismatched_checkpoint_is_refused_and_nothing_is_touched(four_steps, data_dirs,  # noqa: F811
                                                                 tmp_path, capsys):
  src, _, _ = four_steps
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  before = snapshot(workdir)
  sets = tiny_sets(data_dirs, steps=6, extra=["model.model_dim=64", "optimizer.b2=0.99"])
  rc = pretrain.main(["--workdir", str(workdir), "--set", *sets])
  err = capsys.readouterr().err
  assert rc == 1
  assert "checkpoint step 4" in err and "model.model_dim: saved 32, now 64" in err
  assert "Nothing was deleted" in err
  assert snapshot(workdir) == before
  # A batch that does not split over the mesh fails before anything is read or written.
  sets = tiny_sets(data_dirs, steps=6, extra=["mesh.data=4", "data.batch_size=6"])
  assert pretrain.main(["--workdir", str(workdir), "--set", *sets]) == 1
  assert "does not split over the mesh's batch axes" in capsys.readouterr().err
  assert snapshot(workdir) == before


def test_keeps_the_last_k_and_the_best_by_validation_loss(tmp_path):
  state = TrainState({"w": jnp.ones(3)}, {"count": jnp.zeros((), jnp.int32)})
  ckpt = Checkpointer(tmp_path, keep=2, keep_best=True)
  val = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5}  # Step 4 is the best.
  for step in range(1, 10):
    metrics = {"loss": val[step]} if step in val else None
    ckpt.save(step, state, {"model": {}}, {}, metrics)
  ckpt.close()
  assert layout.saved_steps(tmp_path) == [4, 8, 9]
