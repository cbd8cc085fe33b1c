"""Run configs: frozen dataclasses (model, data, optimizer, mesh, checkpoints, loop, report),
named presets; `--set a.b=c` overrides are checked against the dataclass fields and types
(`train.overrides`).

    config = preset("demo")
    config = apply_overrides(config, ["train.steps=200", "model.num_decoder_layers=2"])

An unknown key, or a value of the wrong type, is a ValueError naming the key and the keys (or
the type) allowed. Every section validates itself on creation, and `RunConfig` checks the
sections against each other (`check_sections`), so a bad value fails before any work starts.
What needs the tokenizer (the report prompts' real token counts) is checked by the job once the
tokenizer is loaded, still before step 0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from lmjax.config import TransformerConfig
from lmjax.tokenizer import TokenizerConfig
from train import objectives
from train.data import DataConfig, row_lengths
from train.overrides import apply_overrides, check_types, parse_value  # noqa: F401

PRECISIONS = ("auto", "float32", "bfloat16", "model")


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
    check_types(self)
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
  `sequence` > 1 splits each row's tokens over that many devices (context parallelism, for
  long contexts; `data.seq_len` must split evenly, and decoding needs sequence=1).
  `distributed`: call `jax.distributed.initialize()` (true), never (false), or when the
  environment names a coordinator or a multi-host TPU slice (none, the default).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1
  distributed: bool | None = None

  def __post_init__(self):
    check_types(self)
    sizes = self.sizes
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ValueError(f"mesh: data={self.data} fsdp={self.fsdp} tensor={self.tensor} "
                       f"sequence={self.sequence}; each must be >= 1, and at most one may be -1")

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    """(data, fsdp, tensor, sequence), the order of `lmjax.make_mesh`'s arguments."""
    return (self.data, self.fsdp, self.tensor, self.sequence)


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
    check_types(self)
    if self.every < 0 or self.keep < 1:
      raise ValueError(f"checkpoint: every={self.every} must be >= 0 and keep={self.keep} >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: steps, accumulation, evaluation and logging cadence, precision, seed.

  `grad_accum` splits each batch (`data.batch_size` rows per host) into that many
  micro-batches. `eval_batches` 0 evaluates one full pass of `eval_split` ("train", an endless
  stream, needs `eval_batches` > 0 or `data.num_epochs`).

  `precision` (see `resolve_dtypes`): "model" keeps `model.dtype` and `model.param_dtype`.
  "auto" computes in bfloat16 on TPU/GPU and float32 on CPU, with float32 params and optimizer
  state, when the model's dtypes are both float32 (the defaults); a model given another dtype
  keeps its own dtypes (the explicit setting wins). "float32"/"bfloat16" compute in that dtype
  with float32 params; a model dtype that contradicts them (a `param_dtype` other than float32,
  or a `dtype` other than float32 and the precision) is refused when the config is made.
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
    check_types(self)
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
  """What the end of a run reports: validation perplexity beside a unigram baseline, and what
  the model makes of `prompts` (`train.report.prompt_report`): a causal LM continues them,
  sampling with top-p (Holtzman et al., 2020) at `temperature`; a seq2seq or span-corruption
  model generates from them as encoder input (greedy; span corruption fills a span after the
  prompt unless it writes sentinels); a masked LM fills their `<mask>` tokens (or a masked
  middle span) with its argmax. `max_new_tokens` bounds generation."""

  unigram_baseline: bool = False
  prompts: tuple[str, ...] = ()
  max_new_tokens: int = 48
  top_p: float = 0.9
  temperature: float = 0.8

  def __post_init__(self):
    check_types(self)
    if self.max_new_tokens < 1 or not 0 < self.top_p <= 1 or self.temperature < 0:
      raise ValueError("report: max_new_tokens must be >= 1, top_p in (0, 1], temperature >= 0")


@dataclasses.dataclass(frozen=True)
class TaskEvalConfig:
  """Tasks scored at each evaluation of a training run (`train.evaluate`: `chat`,
  `arithmetic`, `shakespeare`, `jsonl:PATH`), e.g. `--set eval.tasks=chat,arithmetic
  eval.limit=20`; their metrics (`chat/acc`, ...) are logged beside the validation loss.
  `limit`: items a task (0: all); `batch_size`: rows a forward pass (rounded up to the mesh's
  batch shards)."""

  tasks: tuple[str, ...] = ()
  limit: int = 20
  batch_size: int = 8

  def __post_init__(self):
    check_types(self)
    if self.limit < 0 or self.batch_size < 1:
      raise ValueError(f"eval: limit={self.limit} must be >= 0 and batch_size="
                       f"{self.batch_size} >= 1")


QAT_FORMATS = ("none", "int8", "int4", "nf4")
QUANT_CHOICES = ("true", "false", "int8", "int4", "nf4")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization-aware training (`train.qat`): with `qat` set, the trained model's weights are
  fake-quantized in every training and evaluation step (a straight-through estimator), exactly
  as `lmjax.quant.quantize(model, params, qat, group_size, embeddings=..., head=...)` then
  serves them, so the validation loss is the quantized model's.

  `group_size`: weights per group (-1: the format's default, int8 per channel and int4/nf4 64;
  none: the whole axis). `embeddings` / `head`: "true" (in `qat`'s format), "false" (float),
  or another format for the token embedding (so a tied output projection) / an untied head.
  """

  qat: str = "none"
  group_size: int | None = -1
  embeddings: str = "true"
  head: str = "true"

  def __post_init__(self):
    check_types(self)
    if self.qat not in QAT_FORMATS:
      raise ValueError(f"quant.qat={self.qat!r}; allowed: {QAT_FORMATS}")
    if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
      raise ValueError(f"quant.group_size={self.group_size}; allowed: an int >= 1, -1 (the "
                       "format's default) or none (the whole axis)")
    for key in ("embeddings", "head"):
      if getattr(self, key) not in QUANT_CHOICES:
        raise ValueError(f"quant.{key}={getattr(self, key)!r}; allowed: {QUANT_CHOICES}")

  @property
  def enabled(self) -> bool:
    return self.qat != "none"

  def quantize_args(self) -> dict[str, Any]:
    """The keyword arguments of `lmjax.quant.quantize` (besides the format) this asks for."""
    def choice(v: str) -> bool | str:
      return {"true": True, "false": False}.get(v, v)
    return {"group_size": self.group_size, "embeddings": choice(self.embeddings),
            "head": choice(self.head)}


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
  eval: TaskEvalConfig = dataclasses.field(default_factory=TaskEvalConfig)
  quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)

  def __post_init__(self):
    check_types(self)
    check_sections(self)

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


_FLOAT32 = ("float32", "float32")


def resolve_dtypes(precision: str, model: TransformerConfig, backend: str) -> tuple[str, str]:
  """`(dtype, param_dtype)` the model trains with under `train.precision` on `backend`."""
  own = (model.dtype, model.param_dtype)
  if precision == "model" or (precision == "auto" and own != _FLOAT32):
    return own
  if precision == "auto":
    return ("float32" if backend == "cpu" else "bfloat16"), "float32"
  return precision, "float32"


def check_sections(c: RunConfig) -> None:
  """Checks the sections of a run config against each other (ValueError naming the keys)."""
  m, d, t, r = c.model, c.data, c.train, c.report
  try:
    objectives.check_model_fits(d.objective, m.num_encoder_layers, m.num_decoder_layers)
  except ValueError as e:
    raise ValueError(f"data.objective={d.objective!r} and model: {e}; change "
                     "model.num_encoder_layers / model.num_decoder_layers or data.objective"
                     ) from e
  # Rows must fit the context.
  if m.max_len < d.seq_len:
    raise ValueError(f"model.max_len={m.max_len} is below data.seq_len="
                     f"{d.seq_len}; raise model.max_len or lower data.seq_len")
  trained = d.tokenizer_path is None  # The tokenizer is trained from data.tokenizer settings.
  try:
    _, dec_len = row_lengths(d, num_sentinels=d.tokenizer.num_sentinels if trained else None)
  except ValueError as e:
    raise ValueError(f"data: {e}") from e
  if m.num_encoder_layers and m.num_decoder_layers and dec_len > m.max_len:
    what = ("data.target_seq_len" if d.target_seq_len else
            f"what span corruption of data.seq_len={d.seq_len} needs" if
            d.objective == "span_corruption" else "data.seq_len")
    raise ValueError(f"decoder rows of {dec_len} tokens ({what}) pass model.max_len="
                     f"{m.max_len}; raise model.max_len or lower data.target_seq_len")
  if trained and d.tokenizer.vocab_size > m.vocab_size:
    raise ValueError(f"data.tokenizer.vocab_size={d.tokenizer.vocab_size} is above "
                     f"model.vocab_size={m.vocab_size}: set model.vocab_size >= "
                     f"{d.tokenizer.vocab_size} or a smaller data.tokenizer.vocab_size")
  # Precision against the model's dtypes.
  p = t.precision
  if p not in ("model", "auto") and (m.param_dtype != "float32" or m.dtype not in ("float32", p)):
    raise ValueError(
        f"train.precision={p!r} trains with dtype {p!r} and float32 params, but "
        f"model.dtype={m.dtype!r} and model.param_dtype={m.param_dtype!r} ask otherwise: set "
        "train.precision=model (or auto) to keep the model's dtypes, or leave model.dtype and "
        "model.param_dtype at float32")
  # Evaluation reads a finite split.
  if t.eval_split == "train" and t.eval_batches == 0 and d.num_epochs is None:
    raise ValueError("train.eval_split='train' reads the endless (repeated) train stream, and "
                     "train.eval_batches=0 would evaluate forever: set train.eval_batches > 0 "
                     "or data.num_epochs")
  # The report's prompts fit the context (exactly, with the tokenizer, when the job starts).
  if r.prompts:
    empty = [i for i, prompt in enumerate(r.prompts) if not prompt]
    if empty:
      raise ValueError(f"report.prompts {list(r.prompts)}: prompt(s) {empty} are empty")
    if d.objective == "causal_lm" and r.max_new_tokens > m.max_len - 2:
      raise ValueError(
          f"report.max_new_tokens={r.max_new_tokens} does not fit model.max_len={m.max_len}: "
          "each prompt (bos and at least one token) plus the new tokens must fit the context, "
          f"so report.max_new_tokens <= {m.max_len - 2}; lower it or raise model.max_len")
    if d.objective in ("seq2seq", "span_corruption") and r.max_new_tokens > m.max_len:
      raise ValueError(
          f"report.max_new_tokens={r.max_new_tokens} passes the decoder's context "
          f"model.max_len={m.max_len}; use report.max_new_tokens <= {m.max_len} or raise "
          "model.max_len")


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


def _llama_class(model: str, *, seq_len: int, batch_size: int,
                 learning_rate: float) -> Callable[[], RunConfig]:
  """Pretraining of a Llama-class shape on a TPU slice or GPU hosts (`python -m train.plan`
  sizes the mesh first): bfloat16 compute with float32 params and AdamW state, full remat,
  scanned layers, the flash kernel (no T x T scores), fsdp over the remaining devices;
  `batch_size` rows per host."""
  def make() -> RunConfig:
    cfg = TransformerConfig.from_preset(model, max_len=seq_len, remat_policy="full",
                                        scan_layers=True, attention="flash")
    return RunConfig(
        model=cfg,
        data=DataConfig(source="tfds:c4/en", objective="causal_lm", seq_len=seq_len,
                        batch_size=batch_size,
                        tokenizer=TokenizerConfig(vocab_size=cfg.vocab_size, num_sentinels=0)),
        optimizer=OptimizerConfig(learning_rate=learning_rate, warmup_steps=2000,
                                  weight_decay=0.1, b2=0.95, final_lr_fraction=0.1),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        train=TrainConfig(steps=100_000, eval_every=1000, eval_batches=20, log_every=10,
                          precision="bfloat16"))
  return make


PRESETS = {"demo": _demo, "gpt2-124m": _gpt2, "bert-base": _bert,
           "transformer-base": _transformer_base,
           # Llama 3 hyper-parameters (Meta, 2024): peak lr 3e-4 (8B) / 1.5e-4 (70B), 8K context.
           "llama3.2-1b": _llama_class("llama3.2-1b", seq_len=8192, batch_size=16,
                                       learning_rate=3e-4),
           "llama3.1-8b": _llama_class("llama3.1-8b", seq_len=8192, batch_size=16,
                                       learning_rate=3e-4),
           "llama3.1-70b": _llama_class("llama3.1-70b", seq_len=8192, batch_size=16,
                                        learning_rate=1.5e-4),
           "qwen2.5-7b": _llama_class("qwen2.5-7b", seq_len=8192, batch_size=16,
                                      learning_rate=3e-4),
           # Long context: 64K tokens a row.
           "llama3.1-8b-64k": _llama_class("llama3.1-8b", seq_len=65536, batch_size=8,
                                           learning_rate=3e-5)}


def preset(name: str) -> RunConfig:
  """A named run config (see `PRESETS`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown run preset {name!r}; presets are {sorted(PRESETS)}")
  return PRESETS[name]()
