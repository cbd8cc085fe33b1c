"""`train.job.Job.hooks`: a job's own `Trainer.fit` hooks run after each step, after the
caller's `hooks` (so they see the state the next step trains from), and a state they return
replaces the run's."""

import jax
import numpy as np

from tests.train.test_sft import base, config, data  # noqa: F401
from tests.train.trainer_util import data_dirs  # noqa: F401
from train import job as job_lib
from train import sft


def test_job_hooks_run_after_the_callers_and_may_replace_the_state(base, data, tmp_path):  # noqa: F811
  assert tuple(job_lib.Job().hooks(None)) == ()  # A job has none unless it says so.
  calls, seen = [], {}
  zeroed = {}

  def caller(step, state):
    calls.append(("caller", step))
    if step == 2:  # The caller replaces the state: the job's hook must see the replacement.
      zeroed["state"] = state.replace(params=jax.tree.map(lambda x: x * 0, state.params))
      return zeroed["state"]
    return None

  class Hooked(sft.SFT):
    def hooks(self, config):
      def follow(step, state):
        calls.append(("job", step))
        seen[step] = state
        if step == config.train.steps:  # The job's replacement is what the run returns.
          return state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
        return None
      return (follow,)

  cfg = config(base, data, "train.steps=3", "report.replies=0")
  out = job_lib.run(Hooked(), cfg, tmp_path / "run", hooks=[caller])
  assert calls == [(who, s) for s in (1, 2, 3) for who in ("caller", "job")]
  assert seen[2] is zeroed["state"]
  for got, last in zip(jax.tree.leaves(out["state"].params), jax.tree.leaves(seen[3].params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(last) + 1)
