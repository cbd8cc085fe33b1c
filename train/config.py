"""Run configs: frozen dataclasses (model, data, optimizer, mesh, checkpoints, loop, report),
named presets, and `--set a.b=c` overrides checked against the dataclass fields and types.

    config = preset("demo")
    config = apply_overrides(config, ["train.steps=200", "model.num_decoder_layers=2"])

An unknown key, or a value of the wrong type, is a ValueError naming the key and the keys (or
the type) allowed. Every section validates itself on creation, so a bad value fails before any
work starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from lmjax.config import TransformerConfig
from lmjax.tokenizer import TokenizerConfig
from train.data import DataConfig

PRECISIONS = ("auto", "float32", "bfloat16", "model")


def _check_types(obj: Any) -> None:
  """Checks every field of a dataclass against its annotation (int is not bool; ints are
  accepted, and stored, as floats)."""
  for f in dataclasses.fields(obj):
    hint = typing.get_type_hints(type(obj))[f.name]
    value = getattr(obj, f.name)
    ok, value = _conforms(value, hint)
    if not ok:
      raise ValueError(f"{type(obj).__name__}.{f.name}={value!r} must be {_type_name(hint)}")
    object.__setattr__(obj, f.name, value)


def _conforms(value: Any, hint: Any) -> tuple[bool, Any]:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None:
      return type(None) in args, value
    return _conforms(value, next(a for a in args if a is not type(None)))
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      return False, value
    checked = [_conforms(v, args[0]) for v in value]
    return all(ok for ok, _ in checked), tuple(v for _, v in checked)
  if hint is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok, float(value) if ok else value
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool), value
  return isinstance(value, hint), value


def _type_name(hint: Any) -> str:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    inner = next(a for a in args if a is not type(None))
    return f"{_type_name(inner)} or none"
  if origin is tuple:
    return f"a list of {_type_name(args[0])} (comma-separated, or a JSON list)"
  if hint is bool:
    return "a bool (true/false)"
  return {int: "an int", float: "a float", str: "a string"}.get(hint, getattr(hint, "__name__",
                                                                             str(hint)))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW (Loshchilov & Hutter, 2019) with linear warmup and cosine decay (Loshchilov &
  Hutter, 2017, SGDR), global-norm clipping (Pascanu et al., 2013).

  Weight decay applies to matmul kernels and embeddings only, not to norms and biases.
  `decay_steps` None decays over the whole run (`train.steps`) to
  `learning_rate * final_lr_fraction`.
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 100
  decay_steps: int | None = None
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0

  def __post_init__(self):
    _check_types(self)
    if self.learning_rate <= 0 or self.warmup_steps < 0:
      raise ValueError(f"optimizer: learning_rate={self.learning_rate} must be > 0 and "
                       f"warmup_steps={self.warmup_steps} >= 0")
    if self.decay_steps is not None and self.decay_steps < 1:
      raise ValueError(f"optimizer.decay_steps={self.decay_steps} must be >= 1 or none")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ValueError(f"optimizer.final_lr_fraction={self.final_lr_fraction}; in [0, 1]")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
      raise ValueError("optimizer: b1 and b2 must be in [0, 1) and eps > 0")
    if self.weight_decay < 0 or (self.clip_norm is not None and self.clip_norm <= 0):
      raise ValueError("optimizer: weight_decay must be >= 0 and clip_norm > 0 (or none)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axes (see `lmjax.sharding`): one may be -1 (the rest of the devices).

  Explicit sizes whose product is below the device count use the first devices only.
  `distributed`: call `jax.distributed.initialize()` (true), never (false), or when the
  environment names a coordinator or a multi-host TPU slice (none, the default).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  distributed: bool | None = None

  def __post_init__(self):
    _check_types(self)
    sizes = (self.data, self.fsdp, self.tensor)
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ValueError(f"mesh: data={self.data} fsdp={self.fsdp} tensor={self.tensor}; each "
                       "must be >= 1, and at most one may be -1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints in `WORKDIR/checkpoints`: every `every` steps (0: only at the end, on
  preemption and at evals), asynchronously; the last `keep`, plus the best by validation loss
  when `keep_best`. `resume`: continue from the newest good checkpoint in the work dir."""

  every: int = 500
  keep: int = 3
  keep_best: bool = True
  async_save: bool = True
  resume: bool = True

  def __post_init__(self):
    _check_types(self)
    if self.every < 0 or self.keep < 1:
      raise ValueError(f"checkpoint: every={self.every} must be >= 0 and keep={self.keep} >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: steps, accumulation, evaluation and logging cadence, precision, seed.

  `grad_accum` splits each batch (`data.batch_size` rows per host) into that many
  micro-batches. `eval_batches` 0 evaluates one full pass of `eval_split`. `precision`:
  "auto" computes in bfloat16 on TPU/GPU and float32 on CPU, with float32 params and optimizer
  state; "float32"/"bfloat16" force the compute dtype; "model" keeps the model's dtypes.
  """

  steps: int = 1000
  grad_accum: int = 1
  seed: int = 0
  eval_every: int = 200
  eval_batches: int = 0
  eval_split: str = "validation"
  log_every: int = 10
  precision: str = "auto"
  progress_bar: bool = True

  def __post_init__(self):
    _check_types(self)
    if self.steps < 1 or self.grad_accum < 1 or self.log_every < 1:
      raise ValueError(f"train: steps={self.steps}, grad_accum={self.grad_accum} and "
                       f"log_every={self.log_every} must be >= 1")
    if self.eval_every < 0 or self.eval_batches < 0:
      raise ValueError("train: eval_every and eval_batches must be >= 0 (0: at the end only / "
                       "one full pass)")
    if self.precision not in PRECISIONS:
      raise ValueError(f"train.precision={self.precision!r}; allowed: {PRECISIONS}")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  """What the end of a run reports: validation perplexity beside a unigram baseline, and
  continuations of `prompts` sampled with top-p (Holtzman et al., 2020)."""

  unigram_baseline: bool = False
  prompts: tuple[str, ...] = ()
  max_new_tokens: int = 48
  top_p: float = 0.9
  temperature: float = 0.8

  def __post_init__(self):
    _check_types(self)
    if self.max_new_tokens < 1 or not 0 < self.top_p <= 1 or self.temperature < 0:
      raise ValueError("report: max_new_tokens must be >= 1, top_p in (0, 1], temperature >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a training run needs; `to_dict()` is what `WORKDIR/config.json` holds."""

  model: TransformerConfig
  data: DataConfig
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  report: ReportConfig = dataclasses.field(default_factory=ReportConfig)

  def __post_init__(self):
    _check_types(self)
    if self.model.max_len < self.data.seq_len:
      raise ValueError(f"model.max_len={self.model.max_len} is below data.seq_len="
                       f"{self.data.seq_len}; raise model.max_len or lower data.seq_len")

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


# --- presets -------------------------------------------------------------------------------

def _demo() -> RunConfig:
  # Sized for 2 CPU cores (~0.4-0.5 s a step idle, about 5 minutes in all): a 4-layer,
  # 192-wide decoder with rotary positions (Su et al., 2021) and RMSNorm (Zhang & Sennrich,
  # 2019), 600 steps of 16 x 128 tokens (~0.8 epochs). For a tiny budget a smaller model seeing
  # more tokens beats a wider one (Hoffmann et al., 2022).
  return RunConfig(
      model=TransformerConfig(
          vocab_size=4096, model_dim=192, num_decoder_layers=4, num_heads=4, ffn_dim=768,
          activation="gelu", norm="rmsnorm", position="rotary", max_len=128, use_bias=False,
          norm_eps=1e-6),
      data=DataConfig(source="shakespeare", objective="causal_lm", seq_len=128, batch_size=16,
                      tokenizer=TokenizerConfig(vocab_size=4096, num_sentinels=0)),
      optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=50, weight_decay=0.1,
                                final_lr_fraction=0.05),
      checkpoint=CheckpointConfig(every=200, keep=2),
      train=TrainConfig(steps=600, eval_every=300, eval_batches=0, log_every=10),
      report=ReportConfig(unigram_baseline=True, prompts=(
          "ROMEO:\n", "First Citizen:\nWe are", "KING HENRY:\nO God,", "To be, or not to be,")))


def _gpt2() -> RunConfig:
  # Radford et al. 2019 (GPT-2 small) on LM1B (Chelba et al., 2013); hyper-parameters after
  # nanoGPT: 0.5M tokens a step with 16 hosts x 32 rows x 1024 tokens (scale grad_accum to fit).
  return RunConfig(
      model=TransformerConfig.from_preset("gpt2-124m"),
      data=DataConfig(source="tfds:lm1b", objective="causal_lm", seq_len=1024, batch_size=32,
                      tokenizer=TokenizerConfig(vocab_size=50257, num_sentinels=0)),
      optimizer=OptimizerConfig(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1,
                                b2=0.95),
      checkpoint=CheckpointConfig(every=2000, keep=3),
      train=TrainConfig(steps=100_000, eval_every=2000, eval_batches=50, log_every=50))


def _bert() -> RunConfig:
  # Devlin et al. 2019, phase 1: 128 tokens, 256 rows a step, lr 1e-4, warmup 10k, wd 0.01.
  return RunConfig(
      model=TransformerConfig.from_preset("bert-base", max_len=512),
      data=DataConfig(source="tfds:lm1b", objective="masked_lm", seq_len=128, batch_size=256,
                      tokenizer=TokenizerConfig(vocab_size=30522, num_sentinels=0)),
      optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.01,
                                b2=0.999, final_lr_fraction=0.0),
      checkpoint=CheckpointConfig(every=5000, keep=3),
      train=TrainConfig(steps=900_000, eval_every=5000, eval_batches=50, log_every=100))


def _transformer_base() -> RunConfig:
  # Vaswani et al. 2017 base model, pretrained with T5 span corruption (Raffel et al., 2020):
  # 512 encoder tokens, 15% noise, mean span 3 (100 sentinels).
  return RunConfig(
      model=TransformerConfig.from_preset("transformer-base"),
      data=DataConfig(source="tfds:lm1b", objective="span_corruption", seq_len=512,
                      batch_size=128,
                      tokenizer=TokenizerConfig(vocab_size=37000, num_sentinels=100)),
      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10_000, weight_decay=0.01,
                                b2=0.98, final_lr_fraction=0.0),
      checkpoint=CheckpointConfig(every=5000, keep=3),
      train=TrainConfig(steps=500_000, eval_every=5000, eval_batches=50, log_every=100))


PRESETS = {"demo": _demo, "gpt2-124m": _gpt2, "bert-base": _bert,
           "transformer-base": _transformer_base}


def preset(name: str) -> RunConfig:
  """A named run config (see `PRESETS`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown run preset {name!r}; presets are {sorted(PRESETS)}")
  return PRESETS[name]()


# --- --set overrides -----------------------------------------------------------------------

_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}


def parse_value(raw: str, hint: Any, key: str) -> Any:
  """`raw` (a command-line string) as the type `hint`, or a ValueError naming `key`."""
  def bad():
    return ValueError(f"--set {key}={raw}: {key} must be {_type_name(hint)}, got {raw!r}")

  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if raw.strip().lower() in ("none", "null"):
      return None
    try:
      return parse_value(raw, next(a for a in args if a is not type(None)), key)
    except ValueError:
      raise bad() from None
  if origin is tuple:
    text = raw.strip()
    if text.startswith("["):
      try:
        items = json.loads(text)
      except json.JSONDecodeError:
        raise bad() from None
      if not isinstance(items, list):
        raise bad()
      items = [i if isinstance(i, str) else json.dumps(i) for i in items]
    else:
      items = [s.strip() for s in text.split(",")] if text else []
    try:
      return tuple(parse_value(i, args[0], key) for i in items)
    except ValueError:
      raise bad() from None
  text = raw.strip()
  if hint is bool:
    if text.lower() not in _BOOLS:
      raise bad()
    return _BOOLS[text.lower()]
  if hint is int:
    if not re.fullmatch(r"[+-]?\d+", text.replace("_", "")):
      raise bad()
    return int(text.replace("_", ""))
  if hint is float:
    try:
      return float(text)
    except ValueError:
      raise bad() from None
  if hint is str:
    return raw
  raise bad()


def _keys(obj: Any) -> list[str]:
  return sorted(f.name for f in dataclasses.fields(obj))


def _parse(obj: Any, path: list[str], raw: str, key: str, done: str = "") -> Any:
  """Checks `key` against the dataclass fields and parses `raw` by the field's type."""
  name = path[0]
  where = f"'{done}'" if done else "the run config"
  if name not in _keys(obj):
    raise ValueError(f"unknown config key {key!r}: {where} has keys {_keys(obj)}")
  hint = typing.get_type_hints(type(obj))[name]
  here = f"{done}.{name}" if done else name
  value = getattr(obj, name)
  if len(path) == 1:
    if dataclasses.is_dataclass(value):
      raise ValueError(f"config key {key!r} is a section, not a value; set one of its keys: "
                       f"{[f'{here}.{k}' for k in _keys(value)]}")
    return parse_value(raw, hint, key)
  if not dataclasses.is_dataclass(value):
    raise ValueError(f"unknown config key {key!r}: {here!r} is a value "
                     f"({_type_name(hint)}), not a section")
  return _parse(value, path[1:], raw, key, here)


def _apply(obj: Any, updates: dict[str, Any], done: str, given: dict[str, str]) -> Any:
  changes = {}
  for name, value in updates.items():
    here = f"{done}.{name}" if done else name
    changes[name] = _apply(getattr(obj, name), value, here, given) if isinstance(
        value, dict) else value
  try:
    return dataclasses.replace(obj, **changes)
  except (TypeError, ValueError) as e:
    sets = [f"{k}={v}" for k, v in given.items() if not done or k.startswith(done + ".")]
    raise ValueError(f"--set {' '.join(sets)}: {e}") from e


def apply_overrides(config: RunConfig, sets: Sequence[str]) -> RunConfig:
  """Applies `key=value` overrides (`model.num_heads=8`, `data.tokenizer.vocab_size=512`,
  `report.prompts=["a", "b"]`); a later one of the same key wins.

  All keys and types are checked first; then each changed section is rebuilt once with all
  its changes and validates, so the order of the overrides does not matter.
  """
  updates: dict[str, Any] = {}
  given: dict[str, str] = {}
  for item in sets:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
    path = key.split(".")
    value = _parse(config, path, raw, key)
    node = updates
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
    given[key] = raw
  return _apply(config, updates, "", given) if updates else config
