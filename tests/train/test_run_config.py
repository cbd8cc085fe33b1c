"""Run configs check their sections against each other when made, before any work: the report
against the context, the objective against the model family, rows against `max_len`, the
tokenizer against the vocabulary, `train.precision` against the model's dtypes."""

import pytest

from train import config as config_lib
from train import pretrain


def demo(*sets):
  return config_lib.apply_overrides(config_lib.preset("demo"), list(sets))


@pytest.mark.parametrize("sets, message", [
    # The example: the whole run trained, then the report failed.
    (["report.max_new_tokens=500"],
     r"report.max_new_tokens=500 does not fit model.max_len=128.*<= 126"),
    (["report.max_new_tokens=127"], r"report.max_new_tokens <= 126"),
    (['report.prompts=["a", ""]'], r"prompt\(s\) \[1\] are empty"),
    (["data.objective=masked_lm"],
     r"data.objective='masked_lm' and model: .*encoder-only.*num_encoder_layers=0"),
    (["data.objective=span_corruption"], r"encoder-decoder \(Seq2SeqLM\)"),
    (["model.num_encoder_layers=2", "model.num_decoder_layers=0", "report.prompts=[]"],
     r"objective 'causal_lm' trains a decoder-only"),
    (["data.seq_len=256"], r"model.max_len=128 is below data.seq_len=256"),
    (["data.tokenizer.vocab_size=8192"],
     r"data.tokenizer.vocab_size=8192 is above model.vocab_size=4096"),
    (["train.eval_split=train"], r"train.eval_split='train' .*set train.eval_batches > 0"),
    (["train.precision=float32", "model.dtype=bfloat16"],
     r"train.precision='float32' .* model.dtype='bfloat16'.*train.precision=model"),
    (["train.precision=bfloat16", "model.param_dtype=bfloat16"],
     r"model.param_dtype='bfloat16' ask otherwise"),
])
def test_sections_are_checked_against_each_other(sets, message, tmp_path, capsys):
  with pytest.raises(ValueError, match=message):
    demo(*sets)
  # The job refuses it at once (exit 2), and nothing is written.
  assert pretrain.main(["--workdir", str(tmp_path / "w"), "--set", *sets]) == 2
  assert "error:" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def base(objective="seq2seq", **kw):
  enc_dec = dict(num_encoder_layers=1, num_decoder_layers=1)
  model = config_lib.TransformerConfig(vocab_size=512, model_dim=32, num_heads=2, ffn_dim=64,
                                       max_len=kw.pop("max_len", 64), **enc_dec)
  data = config_lib.DataConfig(
      source="jsonl:/x.jsonl:input,target" if objective == "seq2seq" else "shakespeare",
      objective=objective, seq_len=kw.pop("seq_len", 64),
      target_seq_len=kw.pop("target_seq_len", None),
      tokenizer=config_lib.TokenizerConfig(vocab_size=512,
                                           num_sentinels=kw.pop("num_sentinels", 16)))
  return config_lib.RunConfig(model=model, data=data,
                              report=config_lib.ReportConfig(**kw))


def test_encoder_decoder_rows_and_report_fit():
  assert base().data.objective == "seq2seq"
  with pytest.raises(ValueError, match=r"decoder rows of 96 tokens \(data.target_seq_len\) pass "
                                       "model.max_len=64"):
    base(target_seq_len=96)
  with pytest.raises(ValueError, match=r"report.max_new_tokens=65 passes the decoder's context "
                                       "model.max_len=64"):
    base(prompts=("a",), max_new_tokens=65)
  assert base(prompts=("a",), max_new_tokens=64).report.max_new_tokens == 64
  # Span corruption: the decoder length it needs, and enough sentinels, are known up front.
  assert base("span_corruption").data.objective == "span_corruption"
  with pytest.raises(ValueError, match=r"data: target_seq_len=4; span corruption with "
                                       "seq_len=64 needs decoder length >= "):
    base("span_corruption", target_seq_len=4)
  with pytest.raises(ValueError, match=r"data: span_corruption of \d+ tokens makes \d+ spans, "
                                       "but the tokenizer has 2 sentinels"):
    base("span_corruption", num_sentinels=2)


def test_precision_and_the_model_dtypes():
  """auto picks the dtypes only for a model left at float32; an explicit dtype wins."""
  cpu = pretrain.resolve_precision  # The tests run on the CPU backend.
  assert cpu(demo()).model.dtype == "float32"
  wins = cpu(demo("model.dtype=bfloat16"))
  assert (wins.model.dtype, wins.model.param_dtype) == ("bfloat16", "float32")
  wins = cpu(demo("model.param_dtype=bfloat16"))
  assert (wins.model.dtype, wins.model.param_dtype) == ("float32", "bfloat16")
  forced = cpu(demo("train.precision=bfloat16"))
  assert (forced.model.dtype, forced.model.param_dtype) == ("bfloat16", "float32")
  agree = cpu(demo("train.precision=bfloat16", "model.dtype=bfloat16"))
  assert agree.model.dtype == "bfloat16"
  kept = cpu(demo("train.precision=model", "model.dtype=float16", "model.param_dtype=bfloat16"))
  assert (kept.model.dtype, kept.model.param_dtype) == ("float16", "bfloat16")
  assert config_lib.resolve_dtypes("auto", demo().model, "tpu") == ("bfloat16", "float32")
  assert config_lib.resolve_dtypes("auto", demo("model.dtype=float16").model,
                                   "tpu") == ("float16", "float32")
