"""Checkpoints: SIGTERM (between checkpoint steps) then rerun equals a straight run (bitwise); a
torn newest step falls back to the previous one, while a storage error (not damage) is raised
with the path and moves nothing; a mismatched config is refused and nothing is touched; keep-K
and best; `load_run` prints no misleading orbax warning."""

import hashlib
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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
from train.checkpointing import Checkpointer, CheckpointMismatchError, CheckpointReadError
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
  """SIGTERM at step N + 1, between two checkpoint steps (every N): that step is saved, the
  process exits 0, and the rerun resumes there and ends bitwise where a straight run does."""
  stop = N + 1
  assert stop % N  # Not a checkpoint step: only the SIGTERM path saves it.
  extra = [f"checkpoint.every={N}", "checkpoint.keep=5"]
  sets = tiny_sets(data_dirs, steps=2 * N, extra=extra)
  straight = tmp_path / "straight"
  pretrain.run(tiny_config(data_dirs, steps=2 * N, extra=extra), straight)
  assert layout.saved_steps(straight) == [N, 2 * N]

  resumed = tmp_path / "resumed"
  args = ["--workdir", str(resumed), "--set", *sets]
  first = run_cli([str(stop), *args], script=SIGTERM_AT)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f"preempted: saved step {stop}" in first.stdout
  assert layout.saved_steps(resumed) == [N, stop]
  assert max(train_losses(resumed)) == stop  # It stopped there.
  second = run_cli(args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"resuming from step {stop}" in second.stdout
  assert layout.saved_steps(resumed) == [N, stop, 2 * N]

  _, want, _ = layout.load_run(straight, 2 * N)
  _, got, _ = layout.load_run(resumed, 2 * N)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  assert data_state(resumed, 2 * N) == data_state(straight, 2 * N)
  assert data_state(resumed, N) == data_state(straight, N)
  assert data_state(resumed, N) != data_state(resumed, stop) != data_state(resumed, 2 * N)
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


def _largest_array_file(item_dir):
  """The biggest tensorstore data file of an orbax item (its arrays' bytes)."""
  return max((f for f in item_dir.rglob("*") if f.is_file() and f.parent.name == "d"),
             key=lambda f: f.stat().st_size)


# Orbax leaves the other reads of a failed restore as coroutines that pytest reports unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("tear", ["every file", "the params' array file"])
def test_torn_newest_step_warns_and_the_previous_step_restores(four_steps, data_dirs,  # noqa: F811
                                                               tmp_path, caplog, tear):
  src, seen, _ = four_steps
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  step_dir = workdir / "checkpoints" / "4"
  torn_files = [f for f in step_dir.rglob("*") if f.is_file()] if tear == "every file" else [
      _largest_array_file(step_dir / layout.PARAMS)]  # Its JSON metadata all still reads.
  for f in torn_files:  # Tear the newest step.
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


STORAGE_ERRORS = {  # What a read of a good checkpoint may raise when storage misbehaves.
    "PermissionError": lambda path: PermissionError(13, "Permission denied", path),
    "ConnectionError": lambda path: ConnectionError(f"connection reset reading {path}"),
    "TimeoutError": lambda path: TimeoutError(f"timed out reading {path}"),
    "tensorstore PERMISSION_DENIED": lambda path: ValueError(
        f'PERMISSION_DENIED: Error reading "w/0" in OCDBT database at "{path}"'),
    "unexpected": lambda path: RuntimeError("an error nobody planned for"),
}


def _failing_restore(monkeypatch, step, make_error):
  """Orbax's `CheckpointManager.restore` of `step` raises `make_error(path)` (as a read that
  fails for a reason of the storage, not of the bytes, would)."""
  original = ocp.CheckpointManager.restore

  def restore(self, s, *args, **kwargs):
    if s == step:
      raise make_error(str(self.directory / str(s) / layout.PARAMS))
    return original(self, s, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)


@pytest.mark.parametrize("error", list(STORAGE_ERRORS))
def test_a_storage_error_is_raised_with_the_path_and_nothing_moves(four_steps, data_dirs,  # noqa: F811
                                                                   tmp_path, monkeypatch, error):
  """Only a checkpoint proven damaged is moved aside: a read that fails otherwise (the step
  is fine, the storage is not) raises, naming the step's folder, and touches nothing."""
  src, _, _ = four_steps
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  before = snapshot(workdir)
  _failing_restore(monkeypatch, 4, STORAGE_ERRORS[error])
  config = tiny_config(data_dirs, steps=6, extra=["checkpoint.every=2", "checkpoint.keep=5"])
  step_dir = layout.checkpoint_dir(workdir) / "4"
  with pytest.raises(CheckpointReadError, match="left in place") as e:
    pretrain.run(config, workdir)
  assert f"checkpoint step 4 at {str(step_dir)!r}" in str(e.value)
  assert e.value.step == 4 and str(e.value.path) == str(step_dir)
  assert not (workdir / "checkpoints_corrupt").exists()
  assert snapshot(workdir) == before  # Not moved, and no step trained or saved.
  # `load_run` does not fall back to step 2 past such an error either.
  with pytest.raises(CheckpointReadError, match="checkpoint step 4 at"):
    layout.load_run(workdir)


def test_a_step_saved_by_other_processes_is_refused_not_moved(four_steps, data_dirs,  # noqa: F811
                                                               tmp_path):
  """A step whose data positions are another process count's is no damage: refused, kept."""
  src, _, _ = four_steps
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  data = layout.checkpoint_dir(workdir) / "4" / layout.DATA
  mine = data / "process_0-of-1.json"
  for i in range(2):
    (data / f"process_{i}-of-2.json").write_text(mine.read_text())
  mine.unlink()
  before = snapshot(workdir)
  config = tiny_config(data_dirs, steps=6, extra=["checkpoint.every=2", "checkpoint.keep=5"])
  with pytest.raises(CheckpointMismatchError, match=r"process_0-of-2.json, process_1-of-2.json"
                                                    r"\), not process_0-of-1.json"):
    pretrain.run(config, workdir)
  assert snapshot(workdir) == before


def test_what_proves_a_checkpoint_damaged(tmp_path):
  step_dir = tmp_path / "7"
  step_dir.mkdir()

  def chained(outer, inner):
    try:
      try:
        raise inner
      except BaseException as e:
        raise outer from e
    except BaseException as e:
      return e

  damaged = [
      json.JSONDecodeError("Expecting value", "", 0),
      ValueError("DATA_LOSS: Error reading ... Error decoding"),
      ValueError("OUT_OF_RANGE: Requested byte range [0, 2291) is not valid"),
      ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream"),
      ValueError("NOT_FOUND: Error reading ... does not exist"),
      FileNotFoundError(2, "No such file", str(step_dir / "params" / "_METADATA")),
      layout.DamagedCheckpointError("no readable metadata for item 'params'"),
      chained(Exception("Encountered error while reading array index"),
              ValueError("OUT_OF_RANGE: truncated")),
      chained(ValueError("meta is not readable JSON"), UnicodeDecodeError("utf-8", b"", 0, 1, "")),
  ]
  not_proven = [
      PermissionError(13, "Permission denied"), ConnectionError("reset"), TimeoutError("slow"),
      OSError(5, "Input/output error"), RuntimeError("unexpected"), ValueError("some value"),
      ValueError("PERMISSION_DENIED: Error reading"), ValueError("UNAVAILABLE: try again"),
      ValueError("DEADLINE_EXCEEDED: slow"),
      chained(Exception("Encountered error while reading array index"),
              PermissionError(13, "Permission denied")),
      # Bad JSON after a dropped connection: the connection, not the bytes, may be to blame.
      chained(json.JSONDecodeError("Expecting value", "", 0), ConnectionError("reset")),
  ]
  for e in damaged:
    assert layout.is_damaged(e, step_dir), repr(e)
  for e in not_proven:
    assert not layout.is_damaged(e, step_dir), repr(e)
  # A file missing because the whole step is gone (another process, a lost mount): not proven.
  assert not layout.is_damaged(FileNotFoundError(2, "No such file"), tmp_path / "8")


def test_load_run_prints_no_read_only_warning(four_steps, caplog, capfd):
  """Orbax warns "Given directory is read only" whenever a manager is opened read-only, which
  `load_run` does to promise no writes; the run folder is writable: the warning misleads."""
  src, seen, _ = four_steps
  with caplog.at_level(logging.INFO, logger="absl"):
    _, params, _ = layout.load_run(src)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), seen[4])
  assert caplog.records  # Orbax's other (info) records do reach the log.
  assert "read only" not in caplog.text
  out, err = capfd.readouterr()
  assert "read only" not in out + err


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
