"""Two processes under `jax.distributed` (gloo on CPU, 2 devices each) train like one process
with 4 devices fed the same global batches."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests.train.trainer_util import (  # noqa: F401
    REPO,
    data_dirs,
    tiny_config,
    tiny_sets,
    train_losses,
)
from train import data as data_lib
from train import pretrain

STEPS = 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def two_processes(args: list[str], timeout: float = 240) -> list[str]:
  """Runs `python *args` as processes 0 and 1 of one `jax.distributed` job (gloo collectives
  on CPU, 2 devices each); asserts both exit 0 and returns their stdouts."""
  port = free_port()
  procs = []
  for i in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}: {err[-3000:]}"
  return [out for out, _ in outs]


class TwoHosts:
  """The global batch two hosts would feed: host 0's rows, then host 1's."""

  def __init__(self, config, tokenizer):
    self.pipes = [data_lib.make_pipeline(config.data, tokenizer, "train", process_index=i,
                                         process_count=2) for i in range(2)]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(p) for p in self.pipes]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_two_processes_match_one_process(data_dirs, tmp_path):  # noqa: F811
  # Per host 4 rows (8 in all); the tokenizer is trained first so both hosts find it cached.
  host_config = tiny_config(data_dirs, steps=STEPS, extra=["data.batch_size=4"])
  tokenizer = data_lib.build_tokenizer(host_config.data)
  multi = tmp_path / "multi"
  sets = tiny_sets(data_dirs, steps=STEPS, extra=["data.batch_size=4", "mesh.data=-1",
                                                  "mesh.distributed=true"])
  outs = two_processes(["-m", "train.pretrain", "--workdir", str(multi), "--set", *sets])
  assert "4 cpu devices, 2 process(es)" in outs[0]
  assert "run config" in outs[0] and "run config" not in outs[1]  # Process 0 prints.

  single = tmp_path / "single"
  config = tiny_config(data_dirs, steps=STEPS, extra=["data.batch_size=8", "mesh.data=4"])
  pretrain.run(config, single, train_batches=TwoHosts(host_config, tokenizer))
  got, want = train_losses(multi), train_losses(single)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert len(set(got.values())) == STEPS  # The losses move: the steps really trained.
