"""Cold start of a training job: `python -m train.pretrain` (the demo preset) from the command to
its first optimizer step, in a fresh process.

* cold: empty compilation, tokenizer and tfds caches (the embedded corpus is prepared and the
  tokenizer trained, once per machine);
* warm: the same command again in a new work dir, every cache filled by the cold run;
* no compilation cache (`LMJAX_COMPILATION_CACHE=0`), the data caches warm: the baseline the
  persistent compilation cache is measured against, in the same run.

Each figure is the time until the job prints `step 1/1`; runs are interleaved and the median of
`--repeats` kept; the load average is recorded beside each.

    python benchmarks/cold_start_train.py [--repeats 3]

Writes benchmarks/results/cold_start_train.json.
"""

from __future__ import annotations

import argparse
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


def first_step(workdir: Path, caches: Path, compile_cache: str) -> dict:
  env = {**os.environ, "LMJAX_COMPILATION_CACHE": compile_cache,
         "LMJAX_PEAK_CACHE": str(caches / "peak.json"), "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  argv = [sys.executable, "-m", "train.pretrain", "--workdir", str(workdir), "--set",
          "train.steps=1", "train.log_every=1", "train.progress_bar=false", "train.eval_batches=1",
          "report.unigram_baseline=false", "report.prompts=[]", "checkpoint.async_save=false",
          f"data.tokenizer_cache_dir={caches / 'tok'}", f"data.tfds_data_dir={caches / 'tfds'}"]
  load = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  step = None
  for line in proc.stdout:
    if step is None and line.startswith("step 1/1"):
      step = time.perf_counter() - t0
  proc.wait()
  if proc.returncode or step is None:
    raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode})")
  return {"first_step_s": step, "exit_s": time.perf_counter() - t0, "load": load}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    caches, cc = tmp / "caches", str(tmp / "jax-compile")
    runs = {"cold": [first_step(tmp / "w0", caches, cc)], "warm": [], "no compilation cache": []}
    for i in range(a.repeats):
      runs["warm"].append(first_step(tmp / f"w{i + 1}", caches, cc))
      runs["no compilation cache"].append(first_step(tmp / f"n{i}", caches, "0"))
  rows = []
  for name, rs in runs.items():
    rows.append({"run": name, "first_step_s": statistics.median(r["first_step_s"] for r in rs),
                 "exit_s": statistics.median(r["exit_s"] for r in rs),
                 "load": statistics.median(r["load"] for r in rs)})
  base = rows[2]["first_step_s"]
  for r in rows:
    r["vs_no_cache"] = r["first_step_s"] / base
  print(common.table(rows, ["run", "first_step_s", "exit_s", "vs_no_cache", "load"]))
  path = common.write("cold_start_train", {
      "command": "python -m train.pretrain (demo preset, train.steps=1)", "runs": runs,
      "summary": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
