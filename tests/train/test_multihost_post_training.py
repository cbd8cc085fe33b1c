"""Post-training with LoRA (`train.sft` and `train.dpo` with `--set peft.method=lora`: the
adapter trains, the frozen base goes to every step) as two processes under `jax.distributed`
(gloo on CPU, 2 devices each), each reading its own half of the rows, trains like one process
with 4 devices fed the same global batches; only process 0 writes. One two-process launch runs
both jobs, one after the other (launching is much of the cost)."""

import json

import numpy as np
import pytest

from lmjax.convert import safetensors_io
from tests.train import preference_fixtures as pf
from tests.train.multihost_util import TwoHosts, two_processes
from tests.train.test_dpo import ROWS
from tests.train.test_sft import base, data  # noqa: F401
from tests.train.trainer_util import data_dirs, train_losses  # noqa: F401
from train import chat_data, dpo, sft
from train import job as job_lib
from train import preference_data as pd

STEPS = 3
TINY = ["train.log_every=1", "train.progress_bar=false", "train.eval_batches=0",
        f"train.steps={STEPS}", "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=1",
        "optimizer.decay_steps=50", "checkpoint.every=0", "checkpoint.async_save=false",
        "peft.method=lora", "peft.rank=4", "peft.alpha=8", "peft.targets=query,value"]
SFT_SETS = [*TINY, "data.seq_len=32", "data.num_packing_bins=4", "data.heldout_fraction=0.25",
            "report.replies=0"]
# DPO starts at log 2 whatever the data (LoRA's B = 0: the policy is the reference); no warmup, so
# from step 2 on the losses depend on the rows each host read.
DPO_SETS = [*TINY, "data.seq_len=64", "data.heldout_fraction=0.2", "optimizer.warmup_steps=0"]
MULTI = ["mesh.data=-1", "mesh.distributed=true"]  # Per host 4 rows, 8 in all.

# `python -m train.JOB ARGS` for each `[JOB, ARGS]` of the JSON list argv[1], in order, in one
# process (`jax.distributed` initialized by the first), saying which process writes a run file.
SPY = """
import importlib
import json
import sys
import jax
from lmjax.peft import runs
from train import job

initialize = job.initialize_distributed
job.initialize_distributed = lambda setting: jax.distributed.is_initialized() or initialize(setting)

def spy(name, write):
  def wrapped(*args, **kwargs):
    print(f"process {jax.process_index()} writes {name}", flush=True)
    return write(*args, **kwargs)
  return wrapped

job.write_json = spy("json", job.write_json)
runs.save_run_adapter = spy("adapter", runs.save_run_adapter)
for module, argv in json.loads(sys.argv[1]):
  print(f"=== job {module}", flush=True)
  if importlib.import_module(module).main(argv) != 0:
    sys.exit(1)
"""


class SFTHosts(TwoHosts):
  """The global batch of two SFT hosts: host i reads rows i, i + 2, ... (its own share)."""

  def __init__(self, config, tokenizer):
    dc = config.data
    rows = chat_data.load_rows(dc.source, "train", data_dir=dc.tfds_data_dir,
                               heldout_fraction=dc.heldout_fraction, seed=dc.seed)
    self.pipes = []
    for i in range(2):
      examples, _ = chat_data.encode_rows(rows[i::2], tokenizer, dc.seq_len,
                                          chat_template=dc.template())
      self.pipes.append(sft.make_batches(config, tokenizer, "train", examples))


class DPOHosts(TwoHosts):
  """The global batch of two DPO hosts: host i reads pairs i, i + 2, ..."""

  def __init__(self, config, tokenizer):
    dc = config.data
    rows = pd.load_rows(dc.source, "train", seed=dc.seed, heldout_fraction=dc.heldout_fraction)
    self.pipes = []
    for i in range(2):
      examples, _ = pd.encode_rows(rows[i::2], tokenizer, dc.seq_len, shift=True,
                                   chat_template=dc.template())
      self.pipes.append(pd.make_batches(examples, seq_len=dc.seq_len, batch_size=dc.batch_size,
                                        split="train", seed=dc.seed, shuffle=dc.shuffle,
                                        pack=dc.pack, num_packing_bins=dc.num_packing_bins))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """A tiny base and preference pairs (`tests/train/test_dpo.py`'s rows)."""
  root = tmp_path_factory.mktemp("dpo_multihost")
  path = root / "pairs.jsonl"
  path.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(ROWS * 8)))
  return pf.save_base(root / "tiny", num_decoder_layers=1), path


def _adapter(workdir) -> dict[str, np.ndarray]:
  files = safetensors_io.open_file(workdir / "adapter" / "adapter_model.safetensors")
  return {k: np.asarray(v.load(), np.float64) for k, v in files.items()}


def _multi_argv(job, base, source, sets, tmp_path) -> list:  # noqa: F811
  """`[module, argv]` running `job` (`--config demo` from `base` on `source` with `sets`) on two
  processes in `tmp_path / "multi"`."""
  return [f"train.{job.name}", ["--workdir", str(tmp_path / "multi"), "--set",
                                f"base={base}", f"data.source={source}", *sets,
                                "data.batch_size=4", *MULTI]]


def _check_two_match_one(job, hosts, base, source, sets, tmp_path, outs):  # noqa: F811
  """Checks the two-process run of `job` (`_multi_argv`; `outs`: what each process printed)
  against one process fed `hosts`' global batches: the losses and the adapters."""
  source = [f"base={base}", f"data.source={source}"]
  multi = tmp_path / "multi"
  assert "4 cpu devices, 2 process(es)" in outs[0]
  assert "process 0 writes adapter" in outs[0] and "process 0 writes json" in outs[0]
  assert "writes" not in outs[1] and "run config" not in outs[1]  # Process 0 alone.
  assert json.loads((multi / "report.json").read_text())["peft"]["method"] == "lora"

  # One process, 4 devices, fed host 0's 4 rows then host 1's 4 rows at every step.
  preset = job.presets["demo"]
  host = sft.resolve_model(preset(), [*source, *sets, "data.batch_size=4"])
  config = sft.resolve_model(preset(), [*source, *sets, "data.batch_size=8", "mesh.data=4"])
  single = tmp_path / "single"
  job_lib.run(job, config, single, train_batches=hosts(host, sft.base_tokenizer(str(base))))
  got, want = train_losses(multi), train_losses(single)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert len(set(got.values())) == STEPS  # The losses move: the steps really trained.
  a, b = _adapter(multi), _adapter(single)
  assert sorted(a) == sorted(b) and any("lora_B" in k for k in a)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-7, err_msg=k)
  assert max(np.abs(v).max() for k, v in b.items() if "lora_B" in k) > 0  # B moved from 0.


def _per_job(out: str) -> dict[str, str]:
  """A process's output split by the `=== job MODULE` lines SPY prints before each job."""
  parts = out.split("=== job ")[1:]
  return {p.split("\n", 1)[0]: p for p in parts}


def test_lora_sft_and_dpo_on_two_processes_match_one_process(base, data, pairs, data_dirs,  # noqa: F811
                                                             tmp_path):
  folder, path = pairs
  cases = [(sft.JOB, SFTHosts, base, f"jsonl:{data}", SFT_SETS),
           (dpo.JOB, DPOHosts, folder, f"jsonl:{path}", DPO_SETS)]
  runs = [_multi_argv(job, b, src, sets, tmp_path / job.name) for job, _, b, src, sets in cases]
  outs = [_per_job(o) for o in two_processes(["-c", SPY, json.dumps(runs)])]
  for job, hosts, b, src, sets in cases:
    module = f"train.{job.name}"
    assert all(module in o for o in outs), f"{module} did not run on both processes"
    _check_two_match_one(job, hosts, b, src, sets, tmp_path / job.name,
                         [o[module] for o in outs])
