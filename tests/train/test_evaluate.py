"""`train.evaluate` / `train.eval_scoring` / `train.eval_tasks` on a tiny model with a real
byte-level BPE tokenizer: log-likelihoods against a float64 recompute from the model's logits,
batching and padding invariance, bucketed compiles, length-normalized choice, stop strings as
`infer.generate` cuts them, rolling perplexity windows, the JSONL format, a mesh, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from tests.lmjax import pretrained_fixtures as fx
from tests.lmjax.helpers import random_params
from train import eval_metrics, eval_scoring, evaluate
from train.eval_tasks import Item, Task, TaskOptions, load_task

ATOL = 2e-5  # float32 sums of up to ~40 terms of size <= 10, in another op order


@pytest.fixture(scope="module")
def tiny():
  cfg = fx.tiny_config()
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 4), jnp.int32),), 3)
  return model, params, fx.byte_level_tokenizer()


_APPLY = {}


def _logits(model, params, x):
  """The model's logits of `x` `[1, T]` (no padding), jitted once per model."""
  fn = _APPLY.setdefault(model, jax.jit(lambda p, t: model.apply({"params": p}, t)))
  return fn(params, jnp.asarray(x))


def _reference(model, params, ctx, cont):
  """float64 log-prob of `cont` after `ctx`, and greedy-ness, from the model's own logits of
  the unpadded row alone."""
  x = np.asarray([ctx + cont])[:, :-1]
  logits = np.asarray(_logits(model, params, x), np.float64)[0]
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  n, k = x.shape[1], len(cont)
  lp = sum(logp[n - k + j, cont[j]] for j in range(k))
  greedy = all(int(np.argmax(logits[n - k + j])) == cont[j] for j in range(k))
  return lp, greedy


def _requests(seed, n, vocab=96, rows=(9, 21), max_cont=6):
  """n random requests whose rows have one of the lengths `rows` (few reference compiles)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length, k = rng.choice(rows), int(rng.integers(1, max_cont))
    out.append((rng.integers(1, vocab, length + 1 - k).tolist(),
                rng.integers(1, vocab, k).tolist()))
  return out


def test_loglikelihood_equals_float64_recompute(tiny):
  model, params, _ = tiny
  reqs = _requests(0, 9)
  # A continuation the model would produce greedily: is_greedy must say so.
  ctx = [5, 17, 33, 2, 9, 40, 61, 8]
  greedy = infer.generate(model, params, [ctx], max_new_tokens=2, ignore_eos=True,
                          sampler=infer.sampling.Greedy()).tokens[0]
  reqs.append((ctx, greedy))  # a row of 9 tokens
  scores = eval_scoring.Scorer(model, params, batch_size=4).loglikelihood(reqs)
  for (c, y), s in zip(reqs, scores):
    lp, greedy = _reference(model, params, c, y)
    assert s.logprob == pytest.approx(lp, abs=ATOL)
    assert s.is_greedy == greedy
    assert len(s.token_logprobs) == len(y)
  assert scores[-1].is_greedy


def test_batching_and_padding_change_no_score(tiny):
  model, params, _ = tiny
  reqs = _requests(1, 12)
  alone = [eval_scoring.Scorer(model, params, batch_size=1).loglikelihood([r])[0] for r in reqs]
  batched = eval_scoring.Scorer(model, params, batch_size=5).loglikelihood(reqs)
  # With a long request in the batch every row is padded to a longer bucket.
  long = ([7] * 50, [3, 4])
  mixed = eval_scoring.Scorer(model, params, batch_size=16).loglikelihood(reqs[::-1] + [long])
  for a, b, c in zip(alone, batched, mixed[:-1][::-1]):
    np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(c.token_logprobs, a.token_logprobs, atol=1e-5)
    assert a.is_greedy == b.is_greedy == c.is_greedy


def test_shapes_are_bucketed(tiny):
  model, params, _ = tiny
  model = lmjax.CausalLM(fx.tiny_config(max_len=63))  # its own cache entry: a fresh count
  scorer = eval_scoring.Scorer(model, params, batch_size=4)
  # 20 requests, rows of 9..30 tokens, continuations of 1..5: buckets (16|32) x (4|8).
  scorer.loglikelihood(_requests(2, 20, rows=(9, 14, 21, 30)))
  assert scorer.traces <= 4
  scorer.loglikelihood(_requests(3, 20, rows=(10, 13, 25, 29)))  # other lengths, same buckets
  assert eval_scoring.Scorer(model, params, batch_size=4).traces <= 4  # executables kept


def test_choice_acc_and_length_normalized_acc(tiny):
  model, params, tok = tiny
  items = (Item("the cat", (" sat", " sat on the mat", " hello world"), 1),
           Item("the dog", (" ate", " ate the bone"), 0),
           Item("hello", (" world", " the cat sat on the mat"), 1))
  got = evaluate.evaluate(model, params, tok, [Task("hand", "choice", items)],
                          config=evaluate.EvalConfig(batch_size=4))["hand"]
  acc, acc_norm = [], []
  for it in items:
    lps = [_reference(model, params, *evaluate.encode_pair(tok, it.prompt, c))[0]
           for c in it.choices]
    acc.append(int(np.argmax(lps)) == it.answer)
    acc_norm.append(int(np.argmax([lp / len(c.strip()) for lp, c in zip(lps, it.choices)]))
                    == it.answer)
  assert got["acc"] == pytest.approx(np.mean(acc))
  assert got["acc_norm"] == pytest.approx(np.mean(acc_norm))
  # The rule itself, by hand: -4 over 2 chars loses to -6 over 6 chars once normalized.
  assert eval_metrics.pick([-4.0, -6.0]) == 0
  assert eval_metrics.pick([-4.0, -6.0], [2, 6]) == 1


def test_stop_string_cuts_as_generate(tiny):
  model, params, tok = tiny
  prompts = ["the cat", "the dog ate", "hello", "the mat"]
  items = tuple(Item(p, answer="sat") for p in prompts)
  task = Task("gen", "generate", items, metric="contains", stop=("t",), max_new_tokens=12)
  got = evaluate.evaluate(model, params, tok, [task],
                          config=evaluate.EvalConfig(batch_size=4))["gen"]
  free = infer.generate(model, params, prompts, tokenizer=tok, max_new_tokens=12,
                        sampler=infer.sampling.Greedy(), ignore_eos=True)
  cut = [t[:t.find("t")] if "t" in t else None for t in free.text]
  assert any(c is not None for c in cut)
  for sample, c in zip(got["samples"], cut):
    if c is not None:
      assert sample["output"] == c
      assert "t" not in sample["output"]
  stopped = infer.generate(model, params, prompts, tokenizer=tok, max_new_tokens=12,
                           sampler=infer.sampling.Greedy(), stop=["t"])
  assert [s["output"] for s in got["samples"]] == stopped.text
  expect = np.mean([eval_metrics.score_generation("contains", t, "sat") for t in stopped.text])
  assert got["contains"] == pytest.approx(expect)


def test_generation_metrics_by_hand():
  assert eval_metrics.score_generation("exact_match", "  Paris. ", "paris") == 1.0
  assert eval_metrics.score_generation("exact_match", "Paris is", "paris") == 0.0
  assert eval_metrics.score_generation("contains", "It is Paris.", "paris") == 1.0
  assert eval_metrics.score_generation("numeric", "3 + 4 = 7. The answer is 7.", 7) == 1.0
  assert eval_metrics.score_generation("numeric", "The answer is 8.", "7") == 0.0
  with pytest.raises(ValueError, match="unknown generation metric"):
    eval_metrics.score_generation("bleu", "a", "a")


def test_rolling_windows_cover_every_token_once():
  ids = list(range(10, 33))
  for ctx in (1, 3):
    windows = eval_scoring.rolling_windows(ids, 1, 8, context=ctx)
    assert [t for _, cont in windows for t in cont] == ids
    assert windows[0][0] == [1]
    assert all(len(c) + len(y) - 1 == 8 and len(c) >= ctx for c, y in windows[1:])
    for c, y in windows[1:]:  # the context is the text right before the continuation
      start = ids.index(y[0])
      assert c == ids[start - len(c):start]
  utils = pytest.importorskip("lm_eval.utils")
  ref = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
      token_list=ids, prefix_token=1, max_seq_len=8, context_len=1)]
  assert eval_scoring.rolling_windows(ids, 1, 8) == [(list(a), list(b)) for a, b in ref]


def test_perplexity_equals_recompute(tiny):
  model, params, tok = tiny
  texts = ["the cat sat on the mat " * 4, "hello world, the dog ate the bone"]
  task = Task("ppl", "perplexity", tuple(Item(t) for t in texts))
  got = evaluate.evaluate(model, params, tok, [task],
                          config=evaluate.EvalConfig(batch_size=2, max_length=16))["ppl"]
  total, tokens = 0.0, 0
  for t in texts:  # windows scored one by one, each against its own float64 recompute
    ids = tok.encode(t, add_bos=False)
    tokens += len(ids)
    for c, y in eval_scoring.rolling_windows(ids, tok.bos_id, 16):
      total += _reference(model, params, c, y)[0]
  assert got["tokens"] == tokens
  assert got["nll_per_token"] == pytest.approx(-total / tokens, abs=1e-5)
  assert got["bits_per_byte"] == pytest.approx(
      -total / sum(len(t.encode()) for t in texts) / np.log(2), abs=1e-5)


def test_jsonl_tasks_and_errors(tmp_path, tiny):
  _, _, tok = tiny
  good = tmp_path / "mc.jsonl"
  good.write_text("\n".join(json.dumps(r) for r in [
      {"prompt": "the cat", "choices": ["sat", "ate"], "answer": "ate"},
      {"prompt": "the dog", "choices": ["sat", "ate"], "answer": 0},
      {"prompt": "hello", "choices": ["world", "mat"], "answer": 0}]))
  task = load_task(f"jsonl:{good}", tok, TaskOptions(num_fewshot=1))
  assert task.kind == "choice" and task.items[0].answer == 1
  assert task.items[0].choices == (" sat", " ate")
  shot = task.items[0].prompt.split("\n\n")
  assert len(shot) == 2 and shot[1] == "the cat" and shot[0] in ("the dog sat", "hello world")

  def bad(rows, match, **opts):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=match):
      load_task(f"jsonl:{p}", tok, TaskOptions(**opts))

  bad([{"prompt": "a", "choices": ["x", "y"], "answer": 2}], "must be a choice's index")
  bad([{"prompt": "a", "choices": ["x", "y"], "answer": "z"}], "is not one of the choices")
  bad([{"prompt": "a", "choices": ["x", "y"], "answer": 0}, {"prompt": "b", "answer": "c"}],
      "one kind")
  bad([{"question": "a", "answer": "b"}], "needs 'prompt'")
  bad(["{not json"], "not a JSON line")
  bad([{"prompt": "a", "answer": "b"}], "num_fewshot=1 needs more than 1", num_fewshot=1)
  with pytest.raises(ValueError, match="unknown task 'mmlu'"):
    load_task("mmlu", tok)
  with pytest.raises(FileNotFoundError, match="no task file"):
    load_task(f"jsonl:{tmp_path}/none.jsonl", tok)
  with pytest.raises(ValueError, match="chat_template="):
    TaskOptions(chat_template="yes")


def test_scorer_rejects_bad_requests(tiny):
  model, params, _ = tiny
  scorer = eval_scoring.Scorer(model, params, batch_size=2)
  with pytest.raises(ValueError, match="context is empty"):
    scorer.loglikelihood([([], [1])])
  with pytest.raises(ValueError, match="outside"):
    scorer.loglikelihood([([1], [96])])
  with pytest.raises(ValueError, match="does not fit"):
    scorer.loglikelihood([([1], [2] * 65)])
  with pytest.raises(ValueError, match="max_length"):
    eval_scoring.Scorer(model, params, max_length=65)
  with pytest.raises(ValueError, match="multiple of the mesh"):
    eval_scoring.Scorer(model, params, batch_size=3, mesh=lmjax.make_mesh(data=2, fsdp=2, tensor=2))


def test_mesh_gives_the_same_scores(tiny):
  model, params, tok = tiny
  mesh = lmjax.make_mesh(data=2, fsdp=2, tensor=2)
  reqs = _requests(4, 7)
  plain = eval_scoring.Scorer(model, params, batch_size=4).loglikelihood(reqs)
  with jax.set_mesh(mesh):
    sharded_params = jax.device_put(params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
  sharded = eval_scoring.Scorer(model, sharded_params, batch_size=4, mesh=mesh).loglikelihood(
      reqs)
  for a, b in zip(plain, sharded):
    np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=1e-5)


def test_cli_on_a_hugging_face_folder(tmp_path, tiny, capsys):
  model, params, tok = tiny
  folder = lmjax.save_pretrained(model.config, params, tok, tmp_path / "tiny")
  data = tmp_path / "qa.jsonl"
  data.write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in
                            [("the cat", "sat"), ("the dog", "ate")]))
  out = tmp_path / "results.json"
  rc = evaluate.main(["--model", str(folder), "--task", f"jsonl:{data}", "--set",
                      "batch_size=2", "task.max_new_tokens=4", "--out", str(out)])
  assert rc == 0
  results = json.loads(out.read_text())["results"]["qa"]
  assert results["kind"] == "generate" and results["n"] == 2
  direct = infer.generate(model, params, ["the cat", "the dog"], tokenizer=tok, max_new_tokens=4,
                          sampler=infer.sampling.Greedy(), stop=["\n\n"])
  assert [s["output"] for s in results["samples"]] == direct.text
  assert "exact_match" in capsys.readouterr().out
  assert evaluate.main(["--model", str(folder), "--task", "nope"]) == 2
  assert "unknown task 'nope'" in capsys.readouterr().err
  assert evaluate.main(["--model", str(folder), "--task", "chat", "--set", "batch=2"]) == 2
