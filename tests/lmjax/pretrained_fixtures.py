"""Tiny pretrained-format models for the conversion tests: random Hugging Face-layout weights,
GGUF files written the way llama.cpp's `convert_hf_to_gguf.py` writes them, and a tiny
byte-level BPE tokenizer with a chat template."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import lmjax

TINY = dict(vocab_size=96, model_dim=64, num_decoder_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, ffn_dim=128, activation="swiglu", norm="rmsnorm", position="rotary",
            use_bias=False, qkv_bias=False, norm_eps=1e-5, rope_theta=10_000.0, max_len=64)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}")


def tiny_config(**overrides) -> lmjax.TransformerConfig:
  return lmjax.TransformerConfig(**{**TINY, **overrides})


def hf_weights(cfg: lmjax.TransformerConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights in the Hugging Face Llama layout (`[out, in]`)."""
  rng = np.random.default_rng(seed)
  d, f, v = cfg.model_dim, cfg.ffn_dim, cfg.vocab_size
  nh, kh = cfg.num_heads * cfg.resolved_head_dim, cfg.resolved_num_kv_heads * cfg.resolved_head_dim
  def w(*shape, scale=0.08):
    return (rng.standard_normal(shape) * scale).astype(np.float32)
  out = {"model.embed_tokens.weight": w(v, d, scale=0.5),
         "model.norm.weight": 1 + w(d, scale=0.1)}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = w(v, d, scale=0.2)
  for i in range(cfg.num_decoder_layers):
    p = f"model.layers.{i}."
    out.update({
        p + "input_layernorm.weight": 1 + w(d, scale=0.1),
        p + "post_attention_layernorm.weight": 1 + w(d, scale=0.1),
        p + "self_attn.q_proj.weight": w(nh, d), p + "self_attn.k_proj.weight": w(kh, d),
        p + "self_attn.v_proj.weight": w(kh, d), p + "self_attn.o_proj.weight": w(d, nh),
        p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
        p + "mlp.down_proj.weight": w(d, f)})
    if cfg.resolved_qkv_bias:
      out.update({p + "self_attn.q_proj.bias": w(nh, scale=0.3),
                  p + "self_attn.k_proj.bias": w(kh, scale=0.3),
                  p + "self_attn.v_proj.bias": w(kh, scale=0.3)})
  return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: half-split -> interleaved rows."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight":
    "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
  if hf in _GGUF_TOP:
    return _GGUF_TOP[hf]
  _, _, i, rest = hf.split(".", 3)
  return f"blk.{i}.{_GGUF_LAYER[rest]}"


def write_gguf(path: Path, cfg: lmjax.TransformerConfig, weights: dict[str, np.ndarray], *,
               arch: str = "llama", types: dict[str, str] | None = None,
               tokenizer: dict | None = None, extra_tensors: dict | None = None,
               drop: tuple[str, ...] = (), extra_kv: dict | None = None) -> Path:
  """Writes `weights` as llama.cpp would: GGUF names, q/k rows permuted for `llama`, matrices
  stored as `types[hf_name]` (default F32), 1-D tensors F32."""
  import gguf
  types = types or {}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny")
  w.add_block_count(cfg.num_decoder_layers)
  w.add_context_length(cfg.max_len)
  w.add_embedding_length(cfg.model_dim)
  w.add_feed_forward_length(cfg.ffn_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.resolved_num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_dimension_count(cfg.resolved_head_dim)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(0)
  for k, v in (extra_kv or {}).items():
    if isinstance(v, str):
      w.add_string(k, v)
    elif isinstance(v, float):
      w.add_float32(k, v)
    else:
      w.add_int32(k, v)
  if tokenizer:
    w.add_tokenizer_model(tokenizer["model"])
    w.add_token_list(tokenizer["tokens"])
    if "scores" in tokenizer:
      w.add_token_scores(tokenizer["scores"])
    w.add_token_types(tokenizer["types"])
    if tokenizer.get("merges"):
      w.add_token_merges(tokenizer["merges"])
    if tokenizer.get("pre"):
      w.add_tokenizer_pre(tokenizer["pre"])
    w.add_bos_token_id(tokenizer["bos"])
    w.add_eos_token_id(tokenizer["eos"])
    w.add_add_bos_token(tokenizer.get("add_bos", False))
    if tokenizer.get("chat_template"):
      w.add_chat_template(tokenizer["chat_template"])
  n, k = cfg.num_heads, cfg.resolved_num_kv_heads
  for hf, arr in weights.items():
    if hf in drop:
      continue
    arr = np.asarray(arr, np.float32)
    if arch == "llama" and ".q_proj." in hf:
      arr = llama_cpp_permute(arr, n)
    elif arch == "llama" and ".k_proj." in hf:
      arr = llama_cpp_permute(arr, k)
    qtype = types.get(hf, "F32") if arr.ndim == 2 else "F32"
    add_tensor(w, gguf_name(hf), arr, qtype)
  for name, (arr, qtype) in (extra_tensors or {}).items():
    add_tensor(w, name, arr, qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def add_tensor(writer, name: str, arr: np.ndarray, qtype: str) -> None:
  import gguf
  t = gguf.GGMLQuantizationType[qtype]
  if qtype == "F32":
    writer.add_tensor(name, arr.astype(np.float32))
  elif qtype == "F16":
    writer.add_tensor(name, arr.astype(np.float16))
  else:
    writer.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)


def byte_level_tokenizer(vocab_size: int = 96) -> lmjax.HFTokenizer:
  """A byte-level BPE trained with `tokenizers` on a few sentences, padded to `vocab_size`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                show_progress=False)
  text = ["the cat sat on the mat", "the dog ate the bone", "hello world"] * 20
  tk.train_from_iterator(text, trainer)
  assert tk.get_vocab_size() <= vocab_size
  return lmjax.HFTokenizer(tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                           unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def smollm2_cut(folder: Path, layers: int = 2) -> Path:
  """SmolLM2-135M-Instruct (the real GGUF, through `lmjax.load_pretrained`) cut to its first
  `layers` of 30 decoder layers, with its embeddings, final norm, tokenizer and chat template,
  saved as a Hugging Face folder: what runs the full model's code paths and compiles in a
  fraction of the time (tests that check no output of the model)."""
  cfg, params, tokenizer = lmjax.load_pretrained("smollm2-135m-instruct")
  decoder = {k: v for k, v in params["decoder"].items()
             if not k.startswith("layers_") or int(k.split("_")[1]) < layers}
  return lmjax.save_pretrained(cfg.replace(num_decoder_layers=layers),
                               {**params, "decoder": decoder}, tokenizer, folder)
