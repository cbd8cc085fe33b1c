"""Tests of the per-example objective transforms: proportions and exact reconstruction."""

import numpy as np
import pytest

from train import objectives_data as od

SENTINELS = tuple(range(5, 105))
EOS, BOS, MASK = 2, 1, 4


def undo_span_corruption(enc, dec, sentinels=SENTINELS, eos=EOS):
  """Puts the target spans back in place of the sentinels (independent of the code)."""
  assert enc[-1] == eos and dec[-1] == eos
  spans, current = {}, None
  for t in dec[:-1]:
    if t in sentinels:
      current = int(t)
      spans[current] = []
    else:
      spans[current].append(int(t))
  out = []
  for t in enc[:-1]:
    out.extend(spans.pop(int(t)) if t in sentinels else [int(t)])
  assert not spans
  return out


def test_causal_lm_examples_shift_and_chunk():
  ids = np.arange(10, 20)
  ex = od.causal_lm_examples(ids, 4, bos_id=BOS, eos_id=EOS)
  seq = [BOS, *range(10, 20), EOS]
  assert [e["inputs"].tolist() for e in ex] == [seq[0:4], seq[4:8], seq[8:11]]
  assert [e["targets"].tolist() for e in ex] == [seq[1:5], seq[5:9], seq[9:12]]
  assert od.causal_lm_examples(np.array([], int), 4, bos_id=None, eos_id=None) == []


def test_mlm_proportions_and_reconstruction():
  rng = np.random.default_rng(0)
  special = np.array([0, 1, 2, 3, 4])
  random_ids = np.arange(105, 1000)
  n_eligible = n_chosen = n_mask = n_random = n_same = 0
  for _ in range(1500):
    length = int(rng.integers(20, 128))
    tokens = rng.integers(105, 1000, size=length)
    tokens[0], tokens[-1] = BOS, EOS
    out = od.mask_tokens(tokens, rng, mask_id=MASK, random_ids=random_ids, special_ids=special)
    chosen = out["loss_mask"] == 1
    assert out["inputs"].dtype == np.int32 and out["loss_mask"].dtype == np.float32
    assert not chosen[0] and not chosen[-1]  # specials are never chosen
    assert (out["inputs"][~chosen] == tokens[~chosen]).all()
    assert (out["targets"][~chosen] == 0).all()
    # Targets put back where chosen reconstruct the input exactly.
    assert (np.where(chosen, out["targets"], out["inputs"]) == tokens).all()
    assert chosen.sum() == max(1, round(0.15 * (length - 2)))
    n_eligible += length - 2
    n_chosen += chosen.sum()
    got = out["inputs"][chosen]
    n_mask += (got == MASK).sum()
    n_same += (got == tokens[chosen]).sum()
    n_random += ((got != MASK) & (got != tokens[chosen])).sum()
  assert n_chosen / n_eligible == pytest.approx(0.15, abs=0.005)
  assert n_mask / n_chosen == pytest.approx(0.8, abs=0.015)
  # A random replacement equals the original with probability 1/895: negligible.
  assert n_random / n_chosen == pytest.approx(0.1, abs=0.01)
  assert n_same / n_chosen == pytest.approx(0.1, abs=0.01)


def _noise_mask(enc, dec):
  """Where the noise was, from the sentinels and the lengths of their spans."""
  lengths, current = {}, None
  for t in dec[:-1]:
    if t in SENTINELS:
      current = t
      lengths[t] = 0
    else:
      lengths[current] += 1
  return np.concatenate([[True] * lengths[t] if t in SENTINELS else [False] for t in enc[:-1]])


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.3, 8.0)])
def test_span_corruption_proportions_and_reconstruction(density, mean_span):
  rng = np.random.default_rng(1)
  total = noise = spans = 0
  noise_by_position = np.zeros(150)
  for _ in range(600):
    tokens = rng.integers(200, 1000, size=int(rng.integers(150, 250)))
    enc, dec = od.span_corruption(tokens, rng, sentinel_ids=SENTINELS, eos_id=EOS,
                                  density=density, mean_span=mean_span)
    assert undo_span_corruption(enc, dec) == tokens.tolist()
    n_spans = int(np.isin(enc, SENTINELS).sum())
    assert list(enc[np.isin(enc, SENTINELS)]) == list(SENTINELS[:n_spans])
    total += len(tokens)
    noise += len(dec) - 1 - n_spans
    spans += n_spans
    noise_by_position += _noise_mask(enc, dec)[:150]
  assert noise / total == pytest.approx(density, abs=0.003)
  assert noise / spans == pytest.approx(mean_span, rel=0.03)
  # Noise is spread over the sequence, not bunched at one end (T5 never starts with noise).
  rate = noise_by_position / 600
  assert rate[0] == 0
  assert rate[20:80].mean() == pytest.approx(density, abs=0.03)
  assert rate[80:].mean() == pytest.approx(density, abs=0.03)


def test_span_corruption_short_and_odd_lengths():
  rng = np.random.default_rng(2)
  for length in [0, 1, 2, 3, 5, 17, 64]:
    tokens = rng.integers(200, 1000, size=length)
    enc, dec = od.span_corruption(tokens, rng, sentinel_ids=SENTINELS, eos_id=EOS)
    assert undo_span_corruption(enc, dec) == tokens.tolist()
    assert (len(enc), len(dec)) == (od.span_corruption_lengths(length, 0.15, 3.0)
                                    if length >= 2 else (length + 1, 1))
  with pytest.raises(ValueError, match="sentinels"):
    od.span_corruption(rng.integers(200, 1000, 100), rng, sentinel_ids=(5, 6), eos_id=EOS)


def test_span_lengths_match_t5():
  # T5's random_spans_helper: inputs_length=512 gives 568 raw tokens and 114 targets
  # (t5.data.preprocessors; the "span_corruption" task of the T5 paper).
  assert od.span_corruption_raw_length(512, 0.15, 3.0) == 568
  assert od.span_corruption_lengths(568, 0.15, 3.0) == (512, 114)


def test_seq2seq_example_truncates_and_keeps_eos():
  ex = od.seq2seq_example(np.arange(10, 30), np.arange(40, 45), enc_len=8, dec_len=8,
                          bos_id=BOS, eos_id=EOS)
  assert ex["encoder_inputs"].tolist() == list(range(10, 17)) + [EOS]
  assert ex["decoder_targets"].tolist() == list(range(40, 45)) + [EOS]
  assert ex["decoder_inputs"].tolist() == [BOS] + list(range(40, 45))
