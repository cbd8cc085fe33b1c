"""What a distillation run reports: the student's perplexity and agreement with the teacher, and
the comparison with the same student trained with cross entropy only (the baseline).

The agreement figures come from `train.distill_losses.agreement_sums` (per token): the KL to
the teacher, the expected acceptance of the student as a speculative drafter for the teacher
(sum_x min(p, q), Leviathan et al., 2023) and the greedy agreement. With `report.baseline`,
`train.distill.run` also trains the same student on the same batches with `kd.alpha=0` in
`WORKDIR/baseline` and writes `WORKDIR/comparison.json` (`compare`).
"""

from __future__ import annotations

import dataclasses
import json
import math

from lmjax import checkpoint as layout
from train import job as job_lib
from train.distill_config import SYNTHETIC, SYNTHETIC_FILE, DistillConfig, with_source


def summary(ev: dict) -> dict:
  """Perplexity (from the cross entropy) and the agreement with the teacher, per token."""
  out = {"perplexity": math.exp(min(ev["ce"], 700.0)), "ce": ev["ce"], "tokens": ev["tokens"]}
  out.update({k: ev[k] for k in ("kl_teacher", "accept", "greedy_agree") if k in ev})
  return out


def baseline_config(config: DistillConfig, workdir) -> DistillConfig:
  """The same student, data and batches, with cross entropy only (`kd.alpha=0`)."""
  source = config.data.source
  if source == SYNTHETIC:
    source = f"jsonl:{layout.run_path(workdir) / SYNTHETIC_FILE}"
  return dataclasses.replace(
      with_source(config, source), method="kd", kd=dataclasses.replace(config.kd, alpha=0.0),
      report=dataclasses.replace(config.report, baseline=False))


def needs_baseline(config: DistillConfig) -> bool:
  return config.report.baseline and (config.method == "on-policy" or (
      config.method == "kd" and config.kd.alpha > 0))


def compare(workdir) -> dict:
  """The KD student beside the CE-only one (`WORKDIR/report.json`, `WORKDIR/baseline/...`);
  writes `WORKDIR/comparison.json`."""
  w = layout.run_path(workdir)
  runs = {"distilled": w, "ce_only": w / "baseline"}
  table = {}
  for name, d in runs.items():
    r = json.loads((d / "report.json").read_text())
    table[name] = {"heldout": summary(r["validation"]), "real_text": r.get("real_text")}
  job_lib.write_json(w / "comparison.json", table)
  return table


def print_comparison(table: dict, out=print) -> None:
  out(f"{'student':<10} {'split':<9} {'ppl':>8} {'KL(T||S)':>9} {'accept':>7} {'greedy':>7}")
  for name, splits in table.items():
    for split, s in splits.items():
      if s:
        nan = float("nan")
        out(f"{name:<10} {split:<9} {s['perplexity']:>8.2f} {s.get('kl_teacher', nan):>9.4f} "
            f"{s.get('accept', nan):>7.3f} {s.get('greedy_agree', nan):>7.3f}")


def print_report(result: dict, out=print) -> None:
  """The closing lines of a run (`Job.print_report`)."""
  v = result.get("validation")
  if v:
    s = summary(v)
    out(f"held-out: student perplexity {s['perplexity']:.2f}" + (
        f", KL to the teacher {s['kl_teacher']:.4f}, drafting acceptance {s['accept']:.3f}, "
        f"greedy agreement {s['greedy_agree']:.3f}" if "kl_teacher" in s else
        f", divergence to the teacher's stored top-k {v['divergence']:.4f}"
        if "divergence" in v else ""))
  o = result.get("on_policy")
  if o:
    b, a = o["student_samples"]["before"], o["student_samples"]["after"]
    out(f"on-policy: {len(o['steps'])} of {o['of_steps']} steps on the student's samples "
        f"(lmbda {o['lmbda']}); on its own samples, KL(student || teacher) "
        f"{b['kl_student']:.4f} -> {a['kl_student']:.4f}")
  r = result.get("real_text")
  if r:
    out(f"real text: student perplexity {r['perplexity']:.2f}" + (
        f", KL to the teacher {r['kl_teacher']:.4f}, drafting acceptance {r['accept']:.3f}"
        if "kl_teacher" in r else ""))
  p = result.get("peft")
  if p:
    out(f"peft: {p['method']} adapter of {p['trainable_params']:,} params written to "
        f"{p['adapter']}")
