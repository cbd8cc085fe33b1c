"""Two processes under `jax.distributed` (gloo on CPU, 2 devices each): the launcher and the global
batch of two hosts, for the multi-process tests (tests/train/test_multihost_*.py)."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests.train.trainer_util import REPO
from train import data as data_lib


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
    flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2",
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

