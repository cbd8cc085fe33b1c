"""Every code block of the README runs as written, in order, on tiny settings, so the README
cannot rot.

The blocks run in document order in a scratch folder, Python blocks in one namespace, command
lines in-process through the jobs' `main(argv)`: training commands get tiny-run `--set`
overrides appended (later keys win), generation commands a small `--max-new-tokens`; a
`gs://my-bucket` path becomes a local folder. `pip install` lines are what CI itself runs, and
`gcloud` lines need a TPU pod slice: both are only listed.

`smollm2-135m-instruct` stands for SmolLM2-135M-Instruct cut to its first `SMOLLM2_LAYERS` of 30
decoder layers (its own tokenizer, chat template and embeddings; a Hugging Face folder made by
`tests.lmjax.pretrained_fixtures.smollm2_cut`): every block runs the same code, and
compiling the 30 unrolled layers, a minute and a half here, is not what this test checks. The
full model's GGUF load, generation and chat are checked by tests/lmjax/test_pretrained_*.py and
tests/infer/test_cli.py.
"""

import importlib
import json
import re
import shlex
import shutil

import pytest

from lmjax.convert import pretrained as pretrained_lib
from tests.lmjax.pretrained_fixtures import smollm2_cut
from tests.train.trainer_util import REPO, data_dirs, tiny_sets  # noqa: F401

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SFT_TINY = ["train.steps=2", "data.batch_size=2", "data.seq_len=64", "train.eval_batches=2",
            "report.replies=1", "report.max_new_tokens=4", "train.progress_bar=false",
            "checkpoint.async_save=false", "mesh.data=1"]
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_LAYERS = 2


class _Folder:
  """A registered name's source (`pretrained.PretrainedSource`) that is a local folder."""

  def __init__(self, folder):
    self.folder = folder

  def path(self):
    return self.folder


@pytest.fixture(scope="module")
def small_smollm2(tmp_path_factory):
  return smollm2_cut(tmp_path_factory.mktemp("smollm2") / "small", SMOLLM2_LAYERS)


def blocks(lang: str | None = None) -> list[tuple[int, str, str]]:
  """`(line, language, code)` of the README's fenced blocks, in order."""
  text = README.read_text()
  return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
          for m in FENCE.finditer(text) if lang is None or m.group(1) == lang]


def commands(code: str) -> list[str]:
  """The command lines of a bash block: continuations joined, comments dropped."""
  joined = re.sub(r"\\\n\s*", " ", code)
  out = []
  for line in joined.splitlines():
    line = "" if line.lstrip().startswith("#") else line.split(" #")[0].strip()
    if line.startswith("gcloud"):  # its && is inside the quoted remote command
      out.append(line)
      continue
    out += [p.strip() for p in line.split("&&") if p.strip()]
  return out


def run_command(line: str, scratch, data_dirs) -> str:  # noqa: F811
  argv = shlex.split(line.replace("gs://my-bucket", str(scratch / "bucket")))
  if argv[:2] == ["pip", "install"] or argv[0] == "gcloud" or argv[:3] == [
      "python", "-m", "pytest"]:
    return "listed"
  assert argv[:2] == ["python", "-m"], f"a README command this test does not know: {line}"
  module, args = argv[2], argv[3:]
  if module == "train.pretrain":
    job, tiny = importlib.import_module(module), tiny_sets(data_dirs, steps=2, seq=64)
  elif module == "train.sft":
    job, tiny = importlib.import_module(module), SFT_TINY
  elif module == "train.plan":
    from train import plan

    assert plan.main(args) == 0, line
    return "ran"
  elif module == "infer":
    from infer import __main__ as cli

    assert cli.main([*args, "--max-new-tokens", "4", "--no-stream"]) == 0, line
    return "ran"
  else:
    raise AssertionError(f"a README command this test does not know: {line}")
  if "my_chats.jsonl" in line:  # the README's own example of a user's file
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}."}]} for i in range(40)]
    (scratch / "my_chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = [*tiny, "data.heldout_fraction=0.2"]
  assert job.main([*args, "--set", *tiny]) == 0, line
  return "ran"


@pytest.mark.slow
def test_every_block_runs_in_order(data_dirs, small_smollm2, tmp_path, monkeypatch):  # noqa: F811
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(pretrained_lib.PRETRAINED, SMOLLM2, _Folder(small_smollm2))
  assert pretrained_lib.pretrained_config(SMOLLM2).num_decoder_layers == SMOLLM2_LAYERS
  namespace = {"__name__": "readme"}
  seen = []
  for line, lang, code in blocks():
    if lang == "python":
      try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
      except Exception as e:
        raise AssertionError(f"the README's python block at line {line} fails: {e!r}") from e
      seen.append((line, "python"))
    elif lang == "bash":
      seen += [(line, run_command(c, tmp_path, data_dirs)) for c in commands(code)]
  assert sum(kind == "ran" for _, kind in seen) >= 6, seen
  assert sum(kind == "python" for _, kind in seen) >= 4, seen


def test_the_set_up_commands_are_the_ci_commands_and_tensorboard_is_installed():
  """The README's second set-up command is what .ci/run runs; `tensorboard`, which the README
  tells users to run, comes with the install."""
  setup = commands(blocks("bash")[0][2])
  ci = (REPO / ".ci" / "run").read_text()
  test_line = [c for c in setup if "pytest" in c]
  assert test_line and all(c in " && ".join(commands(ci)) for c in test_line[:1])
  assert "tensorboard>=" in (REPO / "setup.cfg").read_text()
  assert shutil.which("tensorboard") or importlib.util.find_spec("tensorboard")
