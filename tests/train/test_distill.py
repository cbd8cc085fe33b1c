"""`train.distill`: resumable teacher data, KD steps on the one trainer (the student's KL to the
teacher falls, the teacher never changes), the vocabulary check, and the command line end to
end on a tiny pretrained-format teacher (Hugging Face folder, byte-level BPE, chat template)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmjax
from lmjax import checkpoint as layout
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import init, random_params, tiny, tokens
from tests.train.trainer_util import data_dirs  # noqa: F401
from train import chat_data, distill, distill_data
from train.distill_losses import KDConfig, kd_loss
from train.trainer import Frozen, Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  cfg = fx.tiny_config(max_len=256)
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 4), jnp.int32),), 0)
  params = jax.tree.map(lambda x: x * 0.5, params)
  return lmjax.save_pretrained(cfg, params, fx.byte_level_tokenizer(),
                               tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(autouse=True)
def _session_caches(data_dirs):  # noqa: F811  (a fresh compilation and peak-FLOP/s cache)
  yield


def test_generation_resumes_where_it_stopped_and_keeps_its_settings(teacher, tmp_path):
  gc = distill_data.GenerateConfig(prompts="chat", num_prompts=6, max_new_tokens=6, batch_size=4)
  loads = []

  def load():
    loads.append(1)
    cfg, params, tok = lmjax.load_pretrained(teacher)
    return lmjax.CausalLM(cfg), params, tok

  whole = tmp_path / "whole.jsonl"
  out = distill_data.generate_dataset(whole, gc, "tiny", load, log=lambda *a: None)
  lines = whole.read_text().splitlines()
  assert out["rows"] == len(lines) == 6 - out["skipped_empty"] >= 4
  # The rows are SFT rows (conversational prompt/completion), with the settings beside them.
  rows = [chat_data.Row(json.loads(line), "x") for line in lines]
  assert all(chat_data.to_example(r)[0] == "chat" for r in rows)
  settings = json.loads((tmp_path / "whole.jsonl.json").read_text())
  assert settings["teacher"] == "tiny" and settings["temperature"] == gc.temperature
  # A crash after two rows and half a third: the rerun writes exactly what one run wrote.
  cut = tmp_path / "cut.jsonl"
  cut.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
  (tmp_path / "cut.jsonl.json").write_text(json.dumps(settings))
  distill_data.generate_dataset(cut, gc, "tiny", load, log=lambda *a: None)
  assert sorted(cut.read_text().splitlines()) == sorted(lines)
  n = len(loads)
  distill_data.generate_dataset(cut, gc, "tiny", load, log=lambda *a: None)
  assert len(loads) == n  # Nothing left to do: the teacher is not even loaded.
  other = distill_data.GenerateConfig(prompts="chat", num_prompts=6, max_new_tokens=6,
                                      temperature=0.5)
  with pytest.raises(ValueError, match="other settings.*temperature"):
    distill_data.generate_dataset(cut, other, "tiny", load)


def test_kd_steps_lower_the_kl_and_never_change_the_teacher():
  cfg = tiny()
  x = jnp.ones((1, 8), jnp.int32)
  teacher_model, teacher = init(cfg.replace(num_decoder_layers=3), x, seed=5)
  teacher = random_params(teacher_model, (x,), 3)  # A peaked, far-from-uniform teacher.
  student_model = lmjax.CausalLM(cfg)
  boxed = jax.eval_shape(lambda: teacher_model.init(jax.random.key(0), x)["params"])
  frozen = Frozen(boxed, lambda s, t: {"student": s, "teacher": t})
  mesh = lmjax.make_mesh(2, 2, 2)
  trainer = Trainer(student_model, kd_loss(teacher_model, KDConfig(alpha=1.0)), optax.adam(3e-2),
                    mesh, init_inputs=(x,), global_batch=8, frozen=frozen)
  trainer.set_frozen(teacher)
  state = trainer.init_state()
  seq = np.asarray(tokens(1, 8, 17))
  batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((8, 16), np.float32),
           "segment_ids": np.ones((8, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}

  def kl(params):  # KL(teacher || student) per token, in float64 from the two models' logits.
    ls = np.asarray(student_model.apply({"params": params}, batch["inputs"]), np.float64)
    lt = np.asarray(teacher_model.apply({"params": teacher}, batch["inputs"]), np.float64)
    ls -= np.log(np.exp(ls - ls.max(-1, keepdims=True)).sum(-1, keepdims=True)) + ls.max(-1,
                                                                                       keepdims=True)
    lt -= np.log(np.exp(lt - lt.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lt.max(-1,
                                                                                       keepdims=True)
    return float((np.exp(lt) * (lt - ls)).sum(-1).mean())

  before = kl(jax.device_get(state.params))
  for step in range(12):
    state, m = trainer.train_step(state, step, batch)
  after = kl(jax.device_get(state.params))
  assert after < 0.5 * before, (before, after)
  # The step's own divergence metric is the same KL (alpha=1, T=1, beta=0).
  np.testing.assert_allclose(float(m["loss_sum"] / m["tokens"]), float(m["divergence"] / 128))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen_params), teacher)


def test_vocab_mismatch_and_bad_methods_are_refused_before_any_work(teacher):
  preset = distill.PRESETS["demo"]()
  with pytest.raises(ValueError, match="teacher's vocabulary has 96 ids and the student's 100"):
    distill.resolve_models(preset, [f"teacher={teacher}", "student=tiny", "model.vocab_size=100"])
  c = distill.resolve_models(preset, [f"teacher={teacher}", "student=tiny"])
  assert c.model.vocab_size == c.teacher_model.vocab_size == 96 and c.model.model_dim == 64
  with pytest.raises(ValueError, match="keeps its shape"):
    distill.resolve_models(preset, [f"teacher={teacher}", f"student={teacher}",
                                    "model.num_heads=2"])
  with pytest.raises(ValueError, match="method data trains on the teacher's answers"):
    distill.check_method(distill.resolve_models(preset, [f"teacher={teacher}", "student=tiny",
                                                         "method=data", "data.source=chat"]))
  assert distill.main(["--teacher", str(teacher), "--method", "kd", "--set",
                       "generate.prompts=poems"]) == 2


def test_command_line_distills_and_compares_with_the_ce_only_student(teacher, tmp_path, capsys):
  wd = tmp_path / "run"
  rc = distill.main([
      "--teacher", str(teacher), "--student", "tiny", "--workdir", str(wd), "--set",
      "generate.prompts=chat", "generate.num_prompts=12", "generate.max_new_tokens=8",
      "generate.batch_size=12", "data.seq_len=64", "data.heldout_fraction=0.25",
      "train.steps=3", "train.log_every=1", "train.progress_bar=false", "checkpoint.every=0",
      "checkpoint.async_save=false", "mesh.data=1", "model.max_len=64", "report.baseline=true"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "ce_only    real_text" in printed
  # The student is a run dir a drafter can load: the teacher's vocabulary and tokenizer.
  cfg, params, tok = layout.load_run(wd)
  assert cfg.vocab_size == 96 and cfg.num_decoder_layers == 2
  assert tok.vocab_size == fx.byte_level_tokenizer().vocab_size
  rows = (wd / "synthetic.jsonl").read_text().splitlines()
  assert len(rows) >= 8 and json.loads(rows[0])["completion"][0]["role"] == "assistant"
  base = json.loads((wd / "baseline" / "config.json").read_text())
  assert base["kd"]["alpha"] == 0.0 and base["data"]["source"] == f"jsonl:{wd}/synthetic.jsonl"
  assert not (wd / "baseline" / "synthetic.jsonl").exists()  # The same data, not regenerated.
  table = json.loads((wd / "comparison.json").read_text())
  for name in ("distilled", "ce_only"):
    for split in ("heldout", "real_text"):
      s = table[name][split]
      assert s["tokens"] > 0 and 0 < s["accept"] <= 1 and s["kl_teacher"] >= 0
  # The two students differ (one saw the teacher's distributions), from the same start.
  _, base_params, _ = layout.load_run(wd / "baseline")
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params),
                                                   jax.tree.leaves(base_params)))


def test_on_policy_batches_are_the_students_samples_with_only_completions_masked(teacher):
  from train import distill_onpolicy, rollout

  t_cfg, t_params, tok = lmjax.load_pretrained(teacher)
  t_model = lmjax.CausalLM(t_cfg)
  s_model = lmjax.CausalLM(t_cfg.replace(num_decoder_layers=1))
  s_params = random_params(s_model, (jnp.ones((1, 4), jnp.int32),), 7)
  s_params["embed"]["embedding"] = s_params["embed"]["embedding"] * 6.0  # Peaked (tied head).
  rows = [chat_data.Row({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": "ok"}]}, "x")
          for q in ("hi", "the cat", "a dog sat")]
  prompts = distill_onpolicy.prompt_ids(rows, tok)
  it = distill_onpolicy.OnPolicyBatches(s_model, tok, prompts, iter(()), lmbda=1.0,
                                        batch_size=4, seq_len=40, max_new_tokens=16, seed=3)
  it.update(0, s_params)  # Step 0 samples s_params.
  batch = next(it)
  # The same draws as a rollout of the student (prompts picked by the same rule)...
  pick = np.random.default_rng([3, 0, 1]).choice(3, 4, replace=True)
  ro = rollout.sample(s_model, s_params, [prompts[i] for i in pick], tokenizer=tok,
                      max_new_tokens=16, length=41, seed=rollout.step_seed(3, 0))
  np.testing.assert_array_equal(batch["inputs"], ro.tokens[:, :-1])
  # ...far likelier under the student than under the teacher (a no-cache forward of each).
  def mean_logp(model, params):
    lp = jax.nn.log_softmax(model.apply({"params": params}, batch["inputs"]), -1)
    lp = np.take_along_axis(np.asarray(lp), batch["targets"][..., None], -1)[..., 0]
    return float((lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
  assert mean_logp(s_model, s_params) > mean_logp(t_model, t_params) + 1.0
  # The loss mask covers the completion through its EOS: never the prompt or what follows.
  for r in range(4):
    n, comp = len(prompts[pick[r]]), ro.completions[r]
    want = np.zeros(40, np.float32)
    want[n - 1:n - 1 + len(comp)] = 1
    np.testing.assert_array_equal(batch["loss_mask"][r], want)
    if ro.stop_reason[r] == "eos":
      assert batch["targets"][r, n - 2 + len(comp)] == tok.eos_id
  # The job's `Trainer.fit` hook (`Job.hooks`) hands each new state's params to the next
  # rollout: after step 6 the batch of step 6 samples them.
  moved = jax.tree.map(lambda x: x * 1.5, s_params)
  job = distill.Distill()
  job._on_policy, job._trainer = it, None
  (follow,) = job.hooks(dataclasses.replace(distill.PRESETS["demo"](), method="on-policy"))
  assert job.hooks(distill.PRESETS["demo"]()) == ()  # kd: no hook
  follow(6, type("State", (), {"params": moved})())
  pick = np.random.default_rng([3, 6, 1]).choice(3, 4, replace=True)
  ro = rollout.sample(s_model, moved, [prompts[i] for i in pick], tokenizer=tok,
                      max_new_tokens=16, length=41, seed=rollout.step_seed(3, 6))
  np.testing.assert_array_equal(next(it)["inputs"], ro.tokens[:, :-1])
  assert it.served == [0, 6]


def _reverse_kl(s_model, s_params, t_model, t_params, batch):
  """KL(student || teacher) per completion token, float64 from no-cache forwards of each."""
  def log_probs(model, params):
    z = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lq, lp = log_probs(s_model, s_params), log_probs(t_model, t_params)
  kl = (np.exp(lq) * (lq - lp)).sum(-1)
  return float((kl * batch["loss_mask"]).sum() / batch["loss_mask"].sum())


def test_on_policy_command_line_trains_on_the_students_samples_and_lowers_its_kl(
    teacher, tmp_path, capsys, monkeypatch):
  from train import distill_onpolicy, rollout

  t_cfg, t_params, tok = lmjax.load_pretrained(teacher)
  s_cfg = t_cfg.replace(num_decoder_layers=1, max_len=64)
  s_model, t_model = lmjax.CausalLM(s_cfg), lmjax.CausalLM(t_cfg)
  s_params = random_params(s_model, (jnp.ones((1, 4), jnp.int32),), 11)
  student = lmjax.save_pretrained(s_cfg, s_params, tok, tmp_path / "student")
  data = tmp_path / "chats.jsonl"
  words = ["the cat", "the dog", "hello world", "the mat", "a bone", "the cat sat", "hello",
           "the dog ate"]
  data.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": f"{w} {i}"}, {"role": "assistant", "content": "the cat"}]})
      + "\n" for i in range(4) for w in words))
  wd, lmbda, steps, seed, new = tmp_path / "run", 0.5, 6, 1, 12
  # What each rollout sampled from, and the trainer's state after each step (a caller's hook;
  # the job's own hook runs after it and is what keeps the rollouts on the newest params).
  sampled, after = [], {0: s_params}
  sample = rollout.sample

  def recording_sample(model, params, *a, **kw):
    sampled.append(jax.device_get(params))
    return sample(model, params, *a, **kw)

  monkeypatch.setattr(distill_onpolicy.rollout, "sample", recording_sample)

  def record(step, state):
    after[step] = jax.device_get(state.params)

  rc = distill.main([
      "--teacher", str(teacher), "--student", str(student), "--method", "on-policy",
      "--data", f"jsonl:{data}", "--workdir", str(wd), "--set", f"kd.lmbda={lmbda}",
      "kd.beta=1.0", f"generate.max_new_tokens={new}", "data.seq_len=40", "data.batch_size=8",
      "data.heldout_fraction=0.25", f"report.real_text=jsonl:{data}", "report.baseline=false",
      f"train.steps={steps}", f"train.seed={seed}", "train.progress_bar=false",
      "optimizer.learning_rate=3e-2", "optimizer.warmup_steps=0", "checkpoint.every=0",
      "checkpoint.async_save=false", "mesh.data=1"], hooks=[record])
  assert rc == 0
  assert "on-policy: " in capsys.readouterr().out
  report = json.loads((wd / "report.json").read_text())["on_policy"]
  # The steps that trained on the student's samples are exactly GKD's lambda draws, which
  # pick a lambda fraction of the steps.
  rule = [s for s in range(steps) if np.random.default_rng([seed, s]).random() < lmbda]
  assert report["steps"] == rule and 0 < len(rule) < steps and max(rule) > 0
  # Each on-policy step sampled the params the previous steps made (never stale ones); the
  # first and last rollouts are the report's before/after samples of held-out prompts.
  assert len(sampled) == len(rule) + 2
  for s, params in zip(rule, sampled[1:-1]):
    jax.tree.map(np.testing.assert_array_equal, params, after[s])
  jax.tree.map(np.testing.assert_array_equal, sampled[-1], after[steps])
  assert report["fraction"] == len(rule) / steps and report["lmbda"] == lmbda
  draws = np.random.default_rng(0).integers(0, 2**31, 4000)
  picked = np.mean([np.random.default_rng([seed, int(s)]).random() < lmbda for s in draws])
  assert abs(picked - lmbda) < 0.03
  # The student's KL to the teacher on its own samples of the held-out prompts, recomputed
  # in float64 on the same draws (same prompts, same seed) from the first and the last params.
  rows = chat_data.load_rows(f"jsonl:{data}", "heldout", heldout_fraction=0.25)
  prompts = distill_onpolicy.prompt_ids(rows, tok)
  prompts = [prompts[i % len(prompts)] for i in range(8)]
  _, final, _ = layout.load_run(wd)
  kls = {}
  for name, params in (("before", s_params), ("after", final)):
    ro = rollout.sample(s_model, params, prompts, tokenizer=tok, max_new_tokens=new, length=41,
                        seed=seed + 1)
    kls[name] = _reverse_kl(s_model, params, t_model, t_params, distill_onpolicy.batch_of(ro))
    np.testing.assert_allclose(report["student_samples"][name]["kl_student"], kls[name],
                               rtol=2e-3)
  assert kls["after"] < 0.7 * kls["before"], kls


def test_stored_topk_teacher_logits_resume_match_the_live_teacher_and_train_without_it(
    teacher, tmp_path, capsys):
  from train import distill_topk

  wd, k = tmp_path / "run", 8
  args = ["--teacher", str(teacher), "--student", "tiny", "--method", "kd", "--workdir", str(wd),
          "--set", "kd.teacher=stored", f"generate.store_topk={k}", "generate.prompts=chat",
          "generate.num_prompts=8", "generate.max_new_tokens=8", "generate.batch_size=4",
          "data.seq_len=64", "data.heldout_fraction=0.25", "train.steps=2",
          "train.progress_bar=false", "checkpoint.every=0", "checkpoint.async_save=false",
          "mesh.data=1", "model.max_len=64", "report.baseline=false",
          f"report.real_text=jsonl:{wd}/synthetic.jsonl"]
  assert distill.main(args) == 0
  printed = capsys.readouterr().out
  assert "frozen)" not in printed  # No teacher in the train step.
  report = json.loads((wd / "report.json").read_text())
  assert report["stored_topk"]["k"] == k and report["validation"]["divergence"] > 0
  data = wd / "synthetic.jsonl"
  t_cfg, t_params, tok = lmjax.load_pretrained(teacher)
  t_model = lmjax.CausalLM(t_cfg)
  rows = [chat_data.Row(json.loads(line), "x") for line in data.read_text().splitlines()]
  table = distill_topk.load_table(data)
  assert set(table.index) == {r.data["id"] for r in rows}
  # Each stored position holds the live teacher's top-k log-probs of the next token of the
  # row as the student trains on it (SFT's encoding), from a no-cache float64 recompute.
  for row in rows[:3]:
    ex = chat_data.encode_example(chat_data.to_example(row), tok, 64)
    z = np.asarray(t_model.apply({"params": t_params}, ex["inputs"][None]), np.float64)[0]
    z -= z.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    pos, at = table.index[row.data["id"]]
    np.testing.assert_array_equal(pos, np.flatnonzero(ex["loss_mask"]))
    want = np.sort(lp[pos], -1)[:, ::-1][:, :k]
    np.testing.assert_allclose(table.logprobs[at], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(lp[pos], table.ids[at], -1), want,
                               rtol=1e-4, atol=1e-5)
  # Resumable: a lost shard is recomputed alone, to the same values; a complete store loads
  # no teacher; other settings are refused.
  shards = sorted(distill_topk.store_dir(data).glob("shard-*.npz"))
  assert len(shards) >= 2
  shards[-1].unlink()
  examples = distill_topk.encoded_rows(rows, tok, 64, None)
  settings = json.loads((distill_topk.store_dir(data) / "settings.json").read_text())
  settings.pop("k")
  loads = []

  def load():
    loads.append(1)
    return t_model, t_params

  out = distill_topk.write_store(data, examples, k=k, settings=settings, load_teacher=load,
                                 batch_size=4, log=lambda *a: None)
  assert 0 < out["computed"] <= 4 and out["rows"] == len(rows) and len(loads) == 1
  again = distill_topk.load_table(data)
  for rid, (_, at) in table.index.items():
    np.testing.assert_array_equal(again.ids[again.index[rid][1]], table.ids[at])
    np.testing.assert_allclose(again.logprobs[again.index[rid][1]], table.logprobs[at],
                               rtol=1e-6)
  assert distill_topk.write_store(data, examples, k=k, settings=settings, load_teacher=load,
                                  log=lambda *a: None)["computed"] == 0 and len(loads) == 1
  with pytest.raises(ValueError, match="other settings.*k"):
    distill_topk.write_store(data, examples, k=4, settings=settings, load_teacher=load)
  assert distill.main([*args[:-1], "kd.teacher=stored", "generate.store_topk=0"]) == 2
