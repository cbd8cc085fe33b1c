"""The weight map between Hugging Face Llama-family checkpoints and lmjax's `CausalLM`.

Hugging Face `LlamaForCausalLM` (also Mistral, Qwen2, SmolLM; see transformers'
`models/llama/modeling_llama.py`) stores `nn.Linear` weights as `[out, in]`; lmjax keeps
einsum kernels `[in, ...out]`:

  =============================================  ===========================================
  Hugging Face                                   lmjax (`params`)
  =============================================  ===========================================
  model.embed_tokens.weight [V, D]               embed/embedding [V, D]
  model.layers.i.input_layernorm.weight [D]      decoder/layers_i/self_attention_norm/scale
  model.layers.i.self_attn.q_proj.weight [NH, D] .../self_attention/query/kernel [D, N, H]
  model.layers.i.self_attn.k_proj.weight [KH, D] .../self_attention/key/kernel [D, K, H]
  model.layers.i.self_attn.v_proj.weight [KH, D] .../self_attention/value/kernel [D, K, H]
  model.layers.i.self_attn.{q,k,v}_proj.bias     .../self_attention/{query,key,value}/bias [N|K, H]
  model.layers.i.self_attn.o_proj.weight [D, NH] .../self_attention/out/kernel [N, H, D]
  model.layers.i.post_attention_layernorm.weight .../mlp_norm/scale [D]
  model.layers.i.mlp.gate_proj.weight [F, D]     .../mlp/wi_gate/kernel [D, F]
  model.layers.i.mlp.up_proj.weight [F, D]       .../mlp/wi_up/kernel [D, F]
  model.layers.i.mlp.down_proj.weight [D, F]     .../mlp/wo/kernel [F, D]
  model.norm.weight [D]                          decoder/final_norm/scale
  lm_head.weight [V, D] (untied only)            lm_head/kernel [D, V]
  =============================================  ===========================================

With `scan_layers=True` the layers are stacked under `decoder/layers` with a leading `[L]` axis.
Both use the half-split rotary layout (pair i = dims (i, i + H/2)), so no row reordering is
needed here; GGUF's interleaved order is undone in `lmjax.convert.gguf`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax.config import TransformerConfig
from lmjax.convert.tensors import TensorRef
from lmjax.counting import abstract_params, init_fn
from lmjax.sharding import param_shardings

# Layer tensors: Hugging Face suffix, lmjax path inside a layer, kind of transform.
LAYER_TENSORS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("input_layernorm.weight", ("self_attention_norm", "scale"), "vector"),
    ("self_attn.q_proj.weight", ("self_attention", "query", "kernel"), "in_proj"),
    ("self_attn.k_proj.weight", ("self_attention", "key", "kernel"), "in_proj"),
    ("self_attn.v_proj.weight", ("self_attention", "value", "kernel"), "in_proj"),
    ("self_attn.q_proj.bias", ("self_attention", "query", "bias"), "bias"),
    ("self_attn.k_proj.bias", ("self_attention", "key", "bias"), "bias"),
    ("self_attn.v_proj.bias", ("self_attention", "value", "bias"), "bias"),
    ("self_attn.o_proj.weight", ("self_attention", "out", "kernel"), "out_proj"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector"),
    ("mlp.gate_proj.weight", ("mlp", "wi_gate", "kernel"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "wi_up", "kernel"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "wo", "kernel"), "linear"),
)
TOP_TENSORS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("model.embed_tokens.weight", ("embed", "embedding"), "vector"),
    ("model.norm.weight", ("decoder", "final_norm", "scale"), "vector"),
    ("lm_head.weight", ("lm_head", "kernel"), "linear"),
)
# Present in some checkpoints, derived from the config, never needed.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# What a Llama-family config must be (field: required value).
_LLAMA_FAMILY = {
    "num_encoder_layers": 0, "activation": "swiglu", "norm": "rmsnorm", "norm_placement": "pre",
    "position": "rotary", "use_bias": False, "embed_norm": False, "scale_embeddings": False,
}


def check_llama_family(cfg: TransformerConfig) -> None:
  """Raises ValueError unless `cfg` is a Llama-family decoder (what the HF layout can hold)."""
  bad = {k: getattr(cfg, k) for k, v in _LLAMA_FAMILY.items() if getattr(cfg, k) != v}
  if cfg.num_decoder_layers == 0:
    bad["num_decoder_layers"] = 0
  if bad:
    raise ValueError(
        f"only Llama-family decoders map to the Hugging Face layout; this config has {bad}, "
        f"it needs {_LLAMA_FAMILY} and num_decoder_layers > 0 (qkv_bias and tie_embeddings "
        "may be either)")


def hf_shape(kind: str, lm_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The Hugging Face shape of a tensor whose lmjax shape is `lm_shape`."""
  if kind == "vector":
    return tuple(lm_shape)
  if kind == "in_proj":  # [D, N, H] <- [N*H, D]
    return (lm_shape[1] * lm_shape[2], lm_shape[0])
  if kind == "bias":  # [N, H] <- [N*H]
    return (lm_shape[0] * lm_shape[1],)
  if kind == "out_proj":  # [N, H, D] <- [D, N*H]
    return (lm_shape[2], lm_shape[0] * lm_shape[1])
  if kind == "linear":  # [in, out] <- [out, in]
    return tuple(reversed(lm_shape))
  raise ValueError(f"unknown tensor kind {kind!r}")


def to_lmjax(kind: str, w: np.ndarray, lm_shape: tuple[int, ...]) -> np.ndarray:
  """A Hugging Face tensor in lmjax's layout `lm_shape`."""
  if kind in ("vector", "bias"):
    return w.reshape(lm_shape)
  return np.ascontiguousarray(w.T).reshape(lm_shape)  # in_proj, out_proj, linear


def to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  """An lmjax tensor in the Hugging Face layout."""
  if kind == "vector":
    return w
  if kind == "bias":
    return w.reshape(-1)
  if kind == "in_proj":
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
  if kind == "out_proj":
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
  return np.ascontiguousarray(w.T)  # linear


def plan(cfg: TransformerConfig) -> dict[tuple[str, ...], tuple[list[str], str, tuple[int, ...]]]:
  """For each lmjax param path: its Hugging Face names (L of them when scanned), kind, shape.

  Raises:
    ValueError: the config is not a Llama-family decoder.
  """
  check_llama_family(cfg)
  top = {path: (name, kind) for name, path, kind in TOP_TENSORS}
  layer = {path: (suffix, kind) for suffix, path, kind in LAYER_TENSORS}
  out = {}
  for path, sds in flatten_dict(abstract_params(cfg)).items():
    shape = tuple(sds.shape)
    if path in top:
      name, kind = top[path]
      out[path] = ([name], kind, shape)
      continue
    m = re.fullmatch(r"layers_(\d+)", path[1]) if len(path) > 2 and path[0] == "decoder" else None
    if m and path[2:] in layer:
      suffix, kind = layer[path[2:]]
      out[path] = ([f"model.layers.{m.group(1)}.{suffix}"], kind, shape)
    elif len(path) > 2 and path[:2] == ("decoder", "layers") and path[2:] in layer:
      suffix, kind = layer[path[2:]]
      names = [f"model.layers.{i}.{suffix}" for i in range(cfg.num_decoder_layers)]
      out[path] = (names, kind, shape)
    else:
      raise ValueError(f"lmjax param {'/'.join(path)} has no Hugging Face counterpart")
  return out


def check_tensors(cfg: TransformerConfig, tensors: Mapping[str, TensorRef], where: str) -> dict:
  """Checks names and shapes of `tensors` against `cfg` before anything is read.

  Returns:
    `plan(cfg)`.

  Raises:
    ValueError: a tensor the config needs is missing, one is left over, or a shape differs.
  """
  p = plan(cfg)
  needed = {n for names, _, _ in p.values() for n in names}
  missing = sorted(needed - set(tensors), key=natural_key)
  if missing:
    raise ValueError(
        f"{where} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]} (config: "
        f"{cfg.num_decoder_layers} layers, qkv_bias={cfg.resolved_qkv_bias}, "
        f"tie_embeddings={cfg.tie_embeddings})")
  extra = sorted((n for n in set(tensors) - needed if not IGNORED.fullmatch(n)), key=natural_key)
  if cfg.tie_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")  # some tied checkpoints store the embedding twice
  if extra:
    raise ValueError(
        f"{where} has {len(extra)} tensor(s) a Llama-family model (Llama, Mistral, Qwen2, "
        f"SmolLM) does not use, e.g. {extra[:5]}; this architecture is not supported")
  for names, kind, shape in p.values():
    lm_shape = shape[1:] if _stacked(cfg, names) else shape
    want = hf_shape(kind, lm_shape)
    for n in names:
      if tuple(tensors[n].shape) != want:
        raise ValueError(
            f"tensor {n!r} in {tensors[n].source} has shape {tuple(tensors[n].shape)}; the "
            f"config (model_dim={cfg.model_dim}, heads={cfg.num_heads}, "
            f"kv_heads={cfg.resolved_num_kv_heads}, head_dim={cfg.resolved_head_dim}, "
            f"ffn_dim={cfg.ffn_dim}, vocab={cfg.vocab_size}) needs {want}")
  return p


def _stacked(cfg: TransformerConfig, names: list[str]) -> bool:
  return cfg.scan_layers and names[0].startswith("model.layers.")


def natural_key(name: str) -> list:
  """Sort key putting "layers.2" before "layers.10" (numbers compared as numbers)."""
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def build_params(cfg: TransformerConfig, tensors: Mapping[str, TensorRef], *, where: str,
                 mesh: jax.sharding.Mesh | None = None) -> dict:
  """lmjax params from Hugging Face-layout tensors, one tensor in host memory at a time.

  Args:
    cfg: the model config; params are cast to `cfg.param_dtype`.
    tensors: name -> `TensorRef` in the Hugging Face layout.
    where: the checkpoint's description for errors.
    mesh: when given, each param is placed with its `NamedSharding` from
      `lmjax.sharding.param_shardings`, and each of this process's devices receives its shard
      read from the file alone (`jax.make_array_from_callback` over a view of the memory-mapped
      tensor: a host of a pod slice reads and converts only the slices its devices hold, and
      holds at most one slice in float32 at a time; GGUF's quantized blocks are dequantized
      whole); else on the default device.

  Returns:
    The raw params tree of `CausalLM(cfg)`.
  """
  p = check_tensors(cfg, tensors, where)
  shardings = flatten_dict(param_shardings(init_fn(cfg), mesh)) if mesh is not None else None
  dtype = jnp.dtype(cfg.param_dtype)
  out = {}
  for path, (names, kind, shape) in p.items():
    stacked = _stacked(cfg, names)
    lm_shape = shape[1:] if stacked else shape
    if shardings is None:
      parts = [to_lmjax(kind, np.asarray(tensors[n].load(), np.float32), lm_shape).astype(dtype)
               for n in names]
      out[path] = jax.device_put(np.stack(parts) if stacked else parts[0])
      del parts
      continue
    views = [lmjax_view(kind, tensors[n].load(), lm_shape) for n in names]
    out[path] = jax.make_array_from_callback(
        shape, shardings[path], functools.partial(_read_slice, views, stacked, dtype))
    del views
  return unflatten_dict(out)


def lmjax_view(kind: str, w: np.ndarray, lm_shape: tuple[int, ...]) -> np.ndarray:
  """`to_lmjax` without copying where numpy can: a strided view of `w` (a memory map stays one).

  Every layout change is a transpose and a split of one axis, which a view expresses.
  """
  if kind in ("vector", "bias"):
    return w.reshape(lm_shape)
  return w.T.reshape(lm_shape)


def _read_slice(views: list[np.ndarray], stacked: bool, dtype, index: tuple) -> np.ndarray:
  """One device's shard: only `index`'s elements are read (and converted) from the views."""
  if not stacked:
    return np.asarray(views[0][index], np.float32).astype(dtype, copy=False)
  layers, rest = index[0], index[1:]
  return np.stack([np.asarray(v[rest], np.float32).astype(dtype, copy=False)
                   for v in views[layers]])


def params_to_hf(cfg: TransformerConfig, params: dict) -> dict[str, np.ndarray]:
  """Hugging Face-layout numpy tensors (name -> array, dtype kept) of lmjax `params`.

  Sharded arrays are gathered one at a time (across processes too).
  """
  p = plan(cfg)
  flat = flatten_dict(params)
  missing = sorted("/".join(k) for k in set(p) - set(flat))
  extra = sorted("/".join(k) for k in set(flat) - set(p))
  if missing or extra:
    raise ValueError(f"params do not match the config: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  out = {}
  for path, (names, kind, shape) in p.items():
    a = _host(flat[path])
    if a.shape != shape:
      raise ValueError(f"param {'/'.join(path)} has shape {a.shape}; the config needs {shape}")
    stacked = _stacked(cfg, names)
    for i, n in enumerate(names):
      out[n] = to_hf(kind, a[i] if stacked else a)
  return out


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
